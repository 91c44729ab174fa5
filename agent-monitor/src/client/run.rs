//! `run`: starts a command as an agent's task (placed by the daemon, under the filter and the
//! confinement its agent's policy asks for), supervises it and exits with its status.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::RunArgs;
use crate::control::{self, Request, Response};

/// `run`'s own failures, as in env(1)/timeout(1): 125 ours, 126 cannot execute, 127 not found.
const EXIT_OURS: u8 = 125;
const EXIT_CANNOT_EXECUTE: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

pub fn run(args: RunArgs) -> ExitCode {
    let task = args
        .task
        .clone()
        .unwrap_or_else(|| format!("run-{}", std::process::id()));
    let program = match resolve(&args.command[0]) {
        Some(p) => p,
        None => {
            eprintln!(
                "agent-monitor run: command not found: {}",
                args.command[0].to_string_lossy()
            );
            return ExitCode::from(EXIT_NOT_FOUND);
        }
    };
    let drop_to = match args
        .user
        .as_deref()
        .map(|u| Credentials::lookup(u, args.group.as_deref()))
    {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("agent-monitor run: {e}");
            return ExitCode::from(EXIT_OURS);
        }
    };
    // The command's Landlock domain (confine.rs), made before the fork; where the kernel cannot
    // scope it, say so here and to the daemon (`status` shows it), and go on: the seccomp
    // supervisor still refuses and reports calls aimed outside the task.
    let scope = match crate::confine::ProcessScope::prepare() {
        Ok(s) => Ok(s),
        Err(crate::confine::Unscoped(why)) => {
            eprintln!(
                "agent-monitor run: WARNING: the command is not scoped to its own processes: \
                 {why}. Signals and ptrace-family calls aimed outside the agent are still \
                 refused and reported by the seccomp filter, but opens of another process's \
                 /proc/PID/mem, environ or fd/ are not refused."
            );
            Err(why)
        }
    };
    // What the command keeps of root's privileges (privileges.rs), prepared before the fork.
    let uid = drop_to
        .as_ref()
        .map_or_else(|| nix::unistd::geteuid().as_raw(), |c| c.uid.as_raw());
    let mut confinement = match crate::privileges::Confinement::prepare(uid, args.keep_capabilities)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent-monitor run: {e}");
            return ExitCode::from(EXIT_OURS);
        }
    };
    let privileges = confinement.report();
    if confinement.keeps_all() {
        eprintln!(
            "agent-monitor run: WARNING: --keep-capabilities: the command keeps {}; as root it \
             can leave or undo its own confinement and other agents' (use --user, or drop the flag)",
            crate::privileges::describe(&privileges)
        );
    }
    let req = Request::Place {
        agent: args.agent.clone(),
        task: task.clone(),
        // Bound to the agent before the command runs: the uid is the agent wherever it runs.
        user: drop_to.as_ref().map(|c| c.uid.as_raw()),
        unscoped: scope.as_ref().err().cloned(),
        privileges: Some(privileges),
    };
    let mut scope = scope.ok();
    // Made while `run` is still outside the agent (unix_connect.rs, caught_channel.rs): the
    // connector that makes an agent's judged unix connects, and the channel reports go by.
    let unix_connector = crate::sandbox::UnixConnector::spawn()
        .map_err(|e| eprintln!("agent-monitor run: cannot start the unix connector: {e}"))
        .ok();
    let reporter = crate::sandbox::CaughtReporter::open(args.socket.control_socket.clone());
    // The ask channel's connection too (used only if the daemon says ask mode).
    let ask_connection = crate::sandbox::AskChannel::connect(&args.socket.control_socket);
    let agent_ca_bundle;
    let (enforce, ask_mode) = match control::call(&args.socket.control_socket, &req) {
        // An older daemon does not say: the stricter filter.
        Ok(Response::Placed {
            mode,
            warnings,
            read_only,
            ca_bundle,
            unix,
            ..
        }) => {
            agent_ca_bundle = ca_bundle;
            // Every mode: judged on the resolved socket; off the list refused (enforce), held
            // (ask), or connected and reported once by the supervisor (alert).
            match (unix, unix_connector) {
                (Some(section), Some(connector)) => crate::sandbox::arm_unix_for_mode(
                    connector,
                    section,
                    mode.as_deref().unwrap_or("enforce"),
                ),
                (Some(_), None) => eprintln!(
                    "agent-monitor run: WARNING: no unix connector: the agent's unix connects \
                     are judged by name only (docs/unix-sockets.md)"
                ),
                _ => {}
            }
            for w in warnings {
                eprintln!("agent-monitor run: warning: {w}");
            }
            confinement.protect(&read_only);
            (
                mode.as_deref() != Some("alert"),
                mode.as_deref() == Some("ask"),
            )
        }
        Ok(other) => {
            eprintln!("agent-monitor run: unexpected answer from the daemon: {other:?}");
            return ExitCode::from(EXIT_OURS);
        }
        Err(e) => {
            eprintln!("agent-monitor run: {e}");
            return ExitCode::from(EXIT_OURS);
        }
    };
    // From here this process is the agent; the command inherits its cgroup, and the seccomp
    // filter for the routes the cgroup hooks cannot judge (sandbox.rs), whose listener the
    // child hands back to us over `theirs`.
    // An ask-mode agent's held calls wait for the daemon's answers on this channel; without it
    // every one of them would be refused, so the command does not start.
    let ask_channel = match ask_mode {
        false => {
            drop(ask_connection);
            None
        }
        true => {
            match ask_connection
                .and_then(|c| crate::sandbox::AskChannel::open_on(c, &args.agent, &task))
            {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!(
                        "agent-monitor run: agent {} is in ask mode: {e}",
                        args.agent
                    );
                    return ExitCode::from(EXIT_OURS);
                }
            }
        }
    };
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agent-monitor run: socketpair for the seccomp listener: {e}");
            return ExitCode::from(EXIT_OURS);
        }
    };
    let filter = if ask_mode {
        crate::sandbox::ask_filter(confinement.confines_root(), theirs.as_raw_fd())
    } else if crate::sandbox::unix_armed() && enforce {
        crate::sandbox::unix_filter(confinement.confines_root(), theirs.as_raw_fd())
    } else if crate::sandbox::unix_armed() {
        crate::sandbox::unix_alert_filter(confinement.confines_root())
    } else {
        crate::sandbox::filter(enforce, confinement.confines_root())
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agent-monitor run: {e}");
            return ExitCode::from(EXIT_OURS);
        }
    };
    let mut command = std::process::Command::new(&program);
    command.arg0(&args.command[0]).args(&args.command[1..]);
    // The daemon intercepts HTTPS: the command's runtimes trust its CA (docs/http-interception.md).
    if let Some(bundle) = &agent_ca_bundle {
        command.envs(crate::intercept::agent_env::variables(bundle));
    }
    // A root agent owns the CA key's file like root does: hide its directory from it.
    let hide_ca_key = agent_ca_bundle
        .as_deref()
        .map(crate::intercept::agent_env::key_dir)
        .filter(|dir| confinement.confines_root() && dir.exists())
        .and_then(|dir| {
            std::ffi::CString::new(std::os::unix::ffi::OsStringExt::into_vec(
                dir.into_os_string(),
            ))
            .ok()
        });
    let to_parent = theirs.as_raw_fd();
    // SAFETY: the closure makes async-signal-safe syscalls only (seccomp, sendmsg, close,
    // landlock_restrict_self, prctl, capset, setgroups, setgid, setuid, unshare, mount) on values
    // prepared before the fork. The filter and the scoping Landlock domain go first, while we are still root
    // (without no_new_privs both need CAP_SYS_ADMIN); neither restricts the calls that follow.
    // The privileges go next, the switch to --user inside (it needs CAP_SETUID and CAP_SETGID).
    unsafe {
        command.pre_exec(move || {
            crate::sandbox::install(&filter, to_parent)?;
            if let Some(scope) = scope.take() {
                scope.enter()?;
            }
            if let Some(dir) = &hide_ca_key {
                crate::intercept::agent_env::hide_in_own_namespace(dir)?;
            }
            confinement.apply(|| match &drop_to {
                Some(c) => c.apply(),
                None => Ok(()),
            })
        })
    };
    let reporting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // An ask-mode filter holds the command's own exec: its supervisor must be serving before
    // spawn() returns (spawn waits for that exec).
    let ours = match ask_channel {
        Some(channel) => {
            supervise_asking(
                ours,
                channel,
                (args.agent.clone(), task.clone()),
                args.socket.control_socket.clone(),
                reporting.clone(),
                reporter,
            );
            None
        }
        None => Some((ours, reporter)),
    };
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "agent-monitor run: cannot execute {}: {e}",
                program.display()
            );
            return ExitCode::from(EXIT_CANNOT_EXECUTE);
        }
    };
    drop(theirs);
    match ours.map(|(ours, reporter)| (crate::sandbox::receive_listener(&ours), reporter)) {
        Some((Ok(listener), reporter)) => supervise(listener, enforce, reporting.clone(), reporter),
        Some((Err(e), _)) => {
            // Without a supervisor the kernel fails the caught calls (ENOSYS): closed, but say so.
            eprintln!("agent-monitor run: {e}; caught calls will fail unreported");
        }
        None => {}
    }
    forward_signals(child.id());
    let status = child.wait();
    // A call the supervisor answered just before the command exited is still being reported:
    // let that report reach the daemon (bounded: a daemon that does not answer is reported on
    // stderr by the supervisor thread).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while reporting.load(std::sync::atomic::Ordering::SeqCst)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            (None, None) => ExitCode::from(EXIT_OURS),
        },
        Err(e) => {
            eprintln!("agent-monitor run: waiting for the command: {e}");
            ExitCode::from(EXIT_OURS)
        }
    }
}

use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;

/// Answers the calls the agent's seccomp filter catches, on a thread of its own, and reports each
/// to the daemon. A report that cannot be delivered is printed on our stderr: never dropped
/// silently.
fn supervise(
    listener: std::os::fd::OwnedFd,
    enforce: bool,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut reporter: crate::sandbox::CaughtReporter,
) {
    std::thread::spawn(move || {
        let why = crate::sandbox::supervise(listener, enforce, &busy, |c| reporter.report(c));
        eprintln!("agent-monitor run: seccomp supervisor stopped: {why}");
    });
}

/// [`supervise`] for an ask-mode agent, started before the command: receives the listener from
/// the child, then holds calls and asks about them on `channel` (reopened on the same socket for
/// (agent, task) if the daemon restarts), answering each when the daemon answers.
fn supervise_asking(
    from_child: std::os::unix::net::UnixStream,
    channel: crate::sandbox::AskChannel,
    (agent, task): (String, String),
    socket: PathBuf,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut reporter: crate::sandbox::CaughtReporter,
) {
    std::thread::spawn(move || {
        let listener = match crate::sandbox::receive_listener(&from_child) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("agent-monitor run: {e}; caught calls will fail unreported");
                return;
            }
        };
        let reopen = || crate::sandbox::AskChannel::open(&socket, &agent, &task);
        let result = crate::sandbox::supervise_asking(listener, channel, reopen, &busy, |c| {
            reporter.report(c)
        });
        if let Err(why) = result {
            eprintln!("agent-monitor run: seccomp supervisor stopped: {why}");
        }
    });
}

/// The absolute path the kernel will be asked to execute, so allowlists see a canonical spelling
/// rather than whatever PATH search the libc would do.
fn resolve(cmd: &OsString) -> Option<PathBuf> {
    let p = PathBuf::from(cmd);
    if p.components().count() > 1 || p.is_absolute() {
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(&p))
        .find(|c| is_executable(c))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Termination signals sent to `run` go to the command too, so `run` can stand in for it.
fn forward_signals(child: u32) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT])
    else {
        eprintln!("agent-monitor run: cannot install signal forwarding; signals reach only run");
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child as i32, sig) };
        }
    });
}

/// Why `run --user USER [--group GROUP]` could not be resolved; names the option and value.
#[derive(Debug, thiserror::Error)]
enum CredentialsError {
    #[error("--user {user:?}: {source}")]
    UserLookup { user: String, source: nix::Error },
    #[error("--user {0:?}: no such user in the user database")]
    NoSuchUser(String),
    #[error("--group {group:?}: {source}")]
    GroupLookup { group: String, source: nix::Error },
    #[error("--group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error("--user {0:?}: name has a NUL byte")]
    NulInName(String),
    #[error("--user {user:?}: reading its groups: {source}")]
    Groups { user: String, source: nix::Error },
}

/// Who `run --user` becomes, resolved before fork.
struct Credentials {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    groups: Vec<nix::unistd::Gid>,
}

impl Credentials {
    fn lookup(user: &str, group: Option<&str>) -> Result<Credentials, CredentialsError> {
        use nix::unistd::{Group, User};
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(uid.into()),
            Err(_) => User::from_name(user),
        };
        let u = found
            .map_err(|source| CredentialsError::UserLookup {
                user: user.to_string(),
                source,
            })?
            .ok_or_else(|| CredentialsError::NoSuchUser(user.to_string()))?;
        let gid = match group {
            None => u.gid,
            Some(g) => {
                let found = match g.parse::<u32>() {
                    Ok(gid) => Group::from_gid(gid.into()),
                    Err(_) => Group::from_name(g),
                };
                found
                    .map_err(|source| CredentialsError::GroupLookup {
                        group: g.to_string(),
                        source,
                    })?
                    .ok_or_else(|| CredentialsError::NoSuchGroup(g.to_string()))?
                    .gid
            }
        };
        let name = std::ffi::CString::new(u.name.clone())
            .map_err(|_| CredentialsError::NulInName(user.to_string()))?;
        let groups =
            nix::unistd::getgrouplist(&name, gid).map_err(|source| CredentialsError::Groups {
                user: user.to_string(),
                source,
            })?;
        Ok(Credentials {
            uid: u.uid,
            gid,
            groups,
        })
    }

    /// In the child, after fork: groups first, uid last (after setuid nothing else is allowed).
    fn apply(&self) -> std::io::Result<()> {
        nix::unistd::setgroups(&self.groups)?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        Ok(())
    }
}
