//! The client commands: `run`, `status`, `reload`, `events`, `task start/end/narrow`, `policy
//! check` (`policy suggest`/`test` are in `policy_cmd`).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{EventsArgs, PolicyCommand, RunArgs, SocketOnlyArgs, StatusArgs, TaskCommand};
use crate::control::{self, Request, Response};
// Every answer goes to stdout through these: a closed pipe ends the command by SIGPIPE instead of
// the panic (exit 101) of std's `println!`.
use crate::stdout::outln as println;

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
            // Alert mode: the kernel hook reports by name and lets through; nothing to hold.
            match (unix, unix_connector) {
                (Some(section), Some(connector)) if mode.as_deref() != Some("alert") => {
                    crate::sandbox::arm_unix(connector, section)
                }
                (Some(_), None) if mode.as_deref() != Some("alert") => eprintln!(
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
        false => None,
        true => {
            match crate::sandbox::AskChannel::open(&args.socket.control_socket, &args.agent, &task)
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
    } else if crate::sandbox::unix_armed() {
        crate::sandbox::unix_filter(confinement.confines_root(), theirs.as_raw_fd())
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

pub fn task(cmd: TaskCommand) -> ExitCode {
    let (socket, req) = match cmd {
        TaskCommand::Start(a) => (
            a.socket.control_socket,
            Request::TaskStart {
                agent: a.agent,
                task: a.task,
                allow_connect: a.allow_connect,
                allow_exec: a.allow_exec,
                ttl_ms: a
                    .ttl
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
                pid: a.pid,
            },
        ),
        TaskCommand::End(a) => (
            a.socket.control_socket,
            Request::TaskEnd {
                agent: a.agent,
                task: a.task,
            },
        ),
        TaskCommand::Narrow(a) => (
            a.socket.control_socket,
            Request::TaskNarrow {
                agent: a.agent,
                task: a.task,
                keep_connect: a.keep_connect,
                keep_exec: a.keep_exec,
                ttl_ms: a
                    .ttl
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
            },
        ),
    };
    let until = |ms: Option<u64>| match ms {
        Some(ms) => format!(
            "for {}",
            humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000)))
        ),
        None => "until `task end`".to_string(),
    };
    match control::call(&socket, &req) {
        Ok(Response::TaskStarted {
            agent,
            task,
            grants,
            expires_in_ms,
            moved,
        }) => {
            println!(
                "task {task} of agent {agent} started; grants [{}] {}",
                grants.join(", "),
                until(expires_in_ms)
            );
            if let Some(pid) = moved {
                println!("process {pid} moved into task {task}");
            }
            ExitCode::SUCCESS
        }
        Ok(Response::TaskNarrowed {
            agent,
            task,
            grants,
            expires_in_ms,
        }) => {
            println!(
                "task {task} of agent {agent} narrowed; grants [{}] {}",
                grants.join(", "),
                until(expires_in_ms)
            );
            ExitCode::SUCCESS
        }
        Ok(Response::TaskEnded {
            agent,
            task,
            revoked,
        }) => {
            println!("task {task} of agent {agent} ended; {revoked} grant(s) revoked");
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor task: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor task: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn status(args: StatusArgs) -> ExitCode {
    let status = match control::call(&args.socket.control_socket, &Request::Status {}) {
        Ok(Response::Status(s)) => s,
        Ok(other) => {
            eprintln!("agent-monitor status: unexpected answer: {other:?}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("agent-monitor status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agent-monitor status: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!("policies: {}", status.policies);
    crate::ask_cmd::print_status(&status.pending);
    if !status.journal_query.is_empty() {
        // Entries are matched by fields journald sets itself; anyone can forge the others.
        println!(
            "journald: {} (only entries this daemon wrote; add e.g. AGENT_ID=NAME VERDICT=denied)",
            status.journal_query
        );
    }
    match status.origin.get("kind").and_then(|k| k.as_str()) {
        Some("adopted") => println!(
            "kernel state: adopted from pins (previous daemon away {} s, {} records lost meanwhile{})",
            status.origin["away_seconds"]
                .as_f64()
                .map_or("?".into(), |s| format!("{s:.1}")),
            status.origin["lost_while_away"],
            if status.origin["replaced_build"] == true {
                "; programs of another build replaced without a gap"
            } else {
                ""
            }
        ),
        Some(k) => println!("kernel state: {k}"),
        None => {}
    }
    if let Some(pins) = status.mechanisms.get("pin_dir").and_then(|v| v.as_str()) {
        println!("pinned in: {pins} (`agent-monitor daemon --uninstall` ends enforcement)");
    }
    let m = &status.mechanisms;
    let text = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
    let list = |k: &str| -> Vec<String> {
        m.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    println!("exec enforcement: {}", text("exec_enforcement"));
    println!("connect enforcement: {}", text("connect_enforcement"));
    for a in list("attached") {
        println!("attached: {a}");
    }
    println!("socket() watch: {}", text("socket_syscall_watch"));
    println!("unix-socket hooks: {}", text("unix_socket_hooks"));
    for r in list("refused") {
        println!("not available: {r}");
    }
    println!(
        "counters: {} actions, {} denied, {} alerts, {} lost records, {} undecodable, {} verdict disagreements, {} tracked processes",
        status.counters.actions,
        status.counters.denied,
        status.counters.alerts,
        status.counters.lost_records,
        status.counters.undecodable_records,
        status.counters.verdict_disagreements,
        status.counters.tracked_processes
    );
    println!(
        "operation: {} actions lost ({} of them alert-mode actions refused as unrecordable), {} reloads, {} reload failures, {} denials folded into journald summaries",
        status.counters.actions_lost,
        status.counters.alerts_refused_unrecordable,
        status.counters.reloads,
        status.counters.reload_failures,
        status.counters.journald_aggregated
    );
    for o in status.occupancy.as_array().into_iter().flatten() {
        println!(
            "map {}: {} of {} entries",
            o["map"].as_str().unwrap_or("?"),
            o["used"],
            o["capacity"]
        );
    }
    println!(
        "identity: {} refusals by an expired grant (in the kernel), {} untaggable processes (map full), {} selector conflicts",
        status.counters.grants_expired_in_kernel,
        status.counters.tags_full,
        status.counters.selector_conflicts
    );
    println!(
        "network path: {} source-routed packets of agents' sockets (dropped in enforce mode)",
        status.counters.source_routed_packets
    );
    let c = &status.counters;
    println!(
        "dns: {} queries, {} refused, {} upstream failures, {} install failures, {} malformed, {} overloaded, {} without proxy, {} originals forgotten, {} learned addresses, {} non-public answer addresses withheld, {} addresses over agents' learned limits ({} answers)",
        c.dns_queries,
        c.dns_refused,
        c.dns_upstream_failures,
        c.dns_install_failures,
        c.dns_malformed,
        c.dns_overloaded,
        c.dns_no_proxy,
        c.dns_orig_missing,
        c.dns_learned,
        c.dns_withheld_non_public,
        c.dns_withheld_limit,
        c.dns_limit_reached
    );
    for s in &status.sinks {
        println!(
            "sink {}: {} written, {} failed",
            s.sink, s.written, s.failed
        );
    }
    for a in &status.agents {
        println!(
            "agent {} ({}): {} actions, {} allowed, {} denied, {} alerts",
            a.agent, a.mode, a.actions, a.allowed, a.denied, a.alerts
        );
        if a.dns_learned_limit > 0 || a.dns_withheld_non_public > 0 {
            println!(
                "  dns: {} of {} learned addresses; withheld: {} non-public, {} over the limit",
                a.dns_learned, a.dns_learned_limit, a.dns_withheld_non_public, a.dns_withheld_limit
            );
        }
        for sel in &a.selectors {
            println!("  selector {sel}");
        }
        for t in &a.tasks {
            let pids: Vec<String> = t.processes.iter().map(u32::to_string).collect();
            println!("  task {}: processes [{}]", t.task, pids.join(" "));
            for p in &t.placements {
                match &p.privileges {
                    Some(privileges) => println!(
                        "    run {}: {}",
                        p.pid,
                        crate::privileges::describe(privileges)
                    ),
                    None => println!(
                        "    placed {}: privileges not reported (not placed by `agent-monitor run`)",
                        p.pid
                    ),
                }
            }
            if !t.grants.is_empty() {
                let until = t
                    .grants_expire_in_ms
                    .map_or("until `task end`".to_string(), |ms| {
                        format!(
                            "for {} more",
                            humantime::format_duration(std::time::Duration::from_secs(
                                ms.div_ceil(1000)
                            ))
                        )
                    });
                println!("    grants [{}] {until}", t.grants.join(", "));
            }
            for u in &t.unscoped {
                println!("    NOT scoped to its own processes (no Landlock domain): {u}");
            }
        }
    }
    ExitCode::SUCCESS
}

pub fn reload(args: SocketOnlyArgs) -> ExitCode {
    match control::call(&args.socket.control_socket, &Request::Reload {}) {
        Ok(Response::Reloaded { message, .. }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor reload: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor reload: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn events(args: EventsArgs) -> ExitCode {
    use std::io::Write as _;
    let print = |v: &serde_json::Value| -> bool {
        let line = if args.json {
            v.to_string()
        } else if let Some(n) = v.get("lagged") {
            format!("!! {n} actions went by too fast to show here (see the JSON audit trail)")
        } else {
            format!(
                "{} {}",
                v["time"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("?")
            )
        };
        // A closed pipe (`events -f | head`) ends the stream quietly, by SIGPIPE.
        if let Err(e) = writeln!(std::io::stdout(), "{line}") {
            crate::stdout::failed(&e);
        }
        true
    };
    let req = Request::Events {
        follow: args.follow,
        agent: args.agent.clone(),
    };
    // Following, the daemon streams the recent history as lines before the new actions; a
    // one-shot call gets it in the response.
    let result =
        control::call_then(
            &args.socket.control_socket,
            &req,
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => print(&v),
                Err(e) => {
                    eprintln!(
                        "agent-monitor events: unreadable line from the daemon ({e}): {line}"
                    );
                    true
                }
            },
        );
    match result {
        Ok(Response::Events { history }) => {
            for v in &history {
                if !print(v) {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor events: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor events: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn policy(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check { path } => match crate::policy_dir::load_path(&path) {
            Ok(set) => {
                // Host-dependent refusals, the same the daemon applies at start and reload.
                let capture = crate::identity::host_capture::issues(
                    &set,
                    &crate::identity::host_capture::Protected::host("this `policy check`"),
                    &crate::identity::host_capture::LiveHost {
                        cgroup_root: &crate::host::cgroup2_root()
                            .unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup")),
                    },
                );
                if !capture.is_empty() {
                    for c in capture {
                        eprintln!("{c}");
                    }
                    return ExitCode::FAILURE;
                }
                // Valid, but worth a second look: printed, not failed.
                for w in crate::exec_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::unix_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::delegation_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                // A uid selector takes every process of the uid: say which run now.
                for p in &set {
                    for u in &p.selectors().uids {
                        let found = crate::identity::uid_binding::outsiders(u.value, p.agent());
                        if let Some(w) = crate::identity::uid_binding::outsiders_warning(
                            u.value,
                            p.agent(),
                            "a `uids` selector, once loaded",
                            &found,
                        ) {
                            eprintln!("{}: warning: {w}", u.at);
                        }
                    }
                }
                for w in crate::confine::selector_warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::files::check_warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::policy::request_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                // What the daemon would refuse before loading anything: the kernel maps' limits.
                if let Err(e) = set.compile() {
                    eprintln!("{}: does not fit the kernel: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                let names: Vec<&str> = set.iter().map(|p| p.agent()).collect();
                println!(
                    "{}: ok, {} agent(s): {}",
                    path.display(),
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Suggest(args) => crate::policy_cmd::suggest_cmd(args),
        PolicyCommand::Test(args) => crate::policy_cmd::test_cmd(args),
    }
}
