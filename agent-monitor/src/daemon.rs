//! The daemon: wiring of policy, kernel, identity, control socket and sinks, signals and shutdown.
//!
//! One task (the monitor) owns the kernel object and all state; the control socket's connections
//! talk to it through a channel, so nothing is locked per event.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_monitor_common::{self as common, AgentSlot, DnsProxy};
use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::action::{Action, Destination, DnsQuery, ExecFile, NetTarget, Object, Verdict};
use crate::bpf::{ActionStream, Kernel};
use crate::cli::DaemonArgs;
use crate::control::{self, AgentStatus, Counters, Request, Response, SinkStatus, TaskStatus};
use crate::dns::learned::{Grant, KernelChange, LearnedTable};
use crate::dns::proxy::{Proxies, ProxyConfig};
use crate::dns::{Outcome, QueryReport};
use crate::event::{self, KernelEvent};
use crate::exec_files::ExecFiles;
use crate::identity::grant_state;
use crate::identity::selected::Selected;
use crate::identity::{
    self, AgentCgroups, DEFAULT_TASK, Peer, ProcessTable, Tasks, UNVERIFIED_TASK, agent_id,
};
use crate::output::journald::{self, message_id};
use crate::output::metrics::{self, Scrape};
use crate::output::{FailureThrottle, OutputConfig, Outputs};
use crate::policy::KernelTables;
use crate::policy::{ExecFacts, PolicySet};

/// How often empty task cgroups are removed and exited processes forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Longest delay of an allowed action or lifecycle record: the kernel queues those without waking
/// the daemon (a wake-up per record slowed every agent connect); denials and alerts wake it.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// How long an exited process still names its place in its descendants' chains.
const KEEP_EXITED: Duration = Duration::from_secs(60);
/// Allowlist indices in the kernel tables come in two banks of this size: a reload writes the new
/// allowlists in the bank not in use, switches every agent over in `AGENT_TABLES` (one map update
/// each; identities hold the agent's stable id, not the index), then deletes the old bank. No
/// agent ever sees a half-written allowlist.
const BANK_STRIDE: u32 = 1 << 20;
/// Recent actions kept for `agent-monitor events`.
const HISTORY: usize = 1000;
/// A pause after switching agents to the new bank before the old entries go: a program that read
/// the old slot just before the switch finishes its lookup (they run for microseconds, under RCU).
const SWAP_GRACE: Duration = Duration::from_millis(10);
/// Replaced policy sets kept to explain records judged before a reload (a few seconds' worth).
const SUPERSEDED_KEPT: usize = 8;
/// Identity map use at which placements start being logged as a warning.
const IDENTITY_WARN_PERCENT: u64 = 90;

/// CLOCK_MONOTONIC in ns, the clock of the kernel's record times (bpf_ktime_get_ns).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn main(args: DaemonArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-monitor daemon: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("agent-monitor daemon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the daemon needs root (it loads eBPF programs and manages cgroups)");
    }
    if args.uninstall {
        return uninstall(&args.pin_dir, &args.state_file);
    }
    tracing::info!("loading the policies in {}", args.policies.display());
    let policies = crate::policy_dir::load_dir(&args.policies)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "refusing to start: invalid policies in {}",
                args.policies.display()
            )
        })?;
    if policies.is_empty() {
        tracing::warn!(
            "no policy files (*.toml) in {}: `agent-monitor run` will refuse every agent",
            args.policies.display()
        );
    }
    // Checked here so that a bad set stops the start before anything is loaded or pinned.
    let compiled = policies
        .compile()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("refusing to start: the policies do not fit the kernel tables")?;
    tracing::info!(
        "{} agent(s) in {} ms: {} network and {} exec allowlist entries (at most {} and {} fit)",
        policies.len(),
        t0.elapsed().as_millis(),
        compiled.net.len(),
        compiled.exec.len(),
        crate::policy::NET_ENTRIES_PER_SET,
        crate::policy::EXEC_ENTRIES_PER_SET,
    );

    for w in crate::exec_lint::warnings(&policies) {
        tracing::warn!("{w}");
    }
    for w in crate::confine::selector_warnings(&policies) {
        tracing::warn!("{w}");
    }
    for did in crate::host::ensure_kernel_filesystems()? {
        tracing::info!("{did}");
    }
    let cgroup_root = crate::host::cgroup2_root()?;
    refuse_host_capture(&policies, &cgroup_root).context("refusing to start")?;
    let layout = crate::host::tracepoint_layout()?;
    let cgroups = AgentCgroups::new(&cgroup_root)?;
    let admin_gid = match &args.admin_group {
        None => None,
        Some(g) => Some(admin_group_gid(g)?),
    };
    let trust_domain = match &args.trust_domain {
        Some(d) => check_trust_domain(d)?,
        None => check_trust_domain(&host_name())
            .context("the host name is not a valid trust domain; set --trust-domain")?,
    };
    refuse_if_already_running(&args.socket.control_socket).await?;

    let offsets = crate::host::kernel_offsets()?;
    let hook_cgroups = crate::bpf::HookCgroups {
        root: cgroup_root.clone(),
        agents: cgroups.base().to_path_buf(),
    };
    let mut kernel = Kernel::open(&args.pin_dir, &hook_cgroups, &layout, &offsets)?;
    // The proxies' kernel entries are written by `apply_policies`, keyed by the live bank.
    let (dns_reports, dns_proxies) = start_dns_proxies(&args, &policies)?;
    let stream = kernel.take_actions()?;
    let outputs = Outputs::open(&OutputConfig {
        journal_allowed: args.journal_allowed,
        json_path: args.json_log.clone(),
        storm_window: Duration::from_secs(args.storm_window),
    })
    .context("opening the output sinks")?;
    let metrics_listener = match args.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let (events_tx, _) = broadcast::channel(4096);
    let mut monitor = Monitor {
        kernel,
        selected: Selected::default(),
        bindings_adopted: false,
        registry: Tasks::default(),
        cgroup_root: cgroup_root.clone(),
        admin_gid,
        trust_domain,
        policies: crate::policy::PolicySet::default(),
        exec_files: ExecFiles::default(),
        policies_dir: args.policies.clone(),
        policies_loaded: SystemTime::now(),
        bank_base: 0,
        grant_file: GrantStateFile::new(&args.state_file, &args.pin_dir),
        grant_recovery: GrantRecovery::default(),
        socket_watch_sticky: None,
        cgroups,
        tasks: HashMap::new(),
        procs: ProcessTable::default(),
        placed: HashMap::new(),
        unscoped_runs: HashMap::new(),
        placed_privileges: HashMap::new(),
        daemon_files: Vec::new(),
        outputs,
        per_agent: HashMap::new(),
        by_action: BTreeMap::new(),
        counters: Counters::default(),
        started: SystemTime::now(),
        decode_errors_logged: 0,
        history: VecDeque::with_capacity(HISTORY),
        events_tx: events_tx.clone(),
        identity_warned: false,
        tag_room_warned: false,
        superseded: VecDeque::new(),
        predecessor_until_ns: 0,
        learned: LearnedTable::default(),
        dns_withheld: HashMap::new(),
        dns_notices: Default::default(),
        dns_grace_ns: args.dns_grace.saturating_mul(1_000_000_000),
        dns_clients: HashMap::new(),
        dns_proxies,
    };
    // What the previous daemon governed stays governed: its tasks come back from the pinned
    // identity map (names from the cgroup tree) and its grants from the state file (as far as the
    // kernel still holds them), then the policy on disk applies to them.
    monitor.recover_tasks()?;
    monitor.recover_grants()?;
    monitor
        .apply_policies(policies)
        .context("refusing to start: applying the policies to the kernel")?;
    if matches!(monitor.kernel.origin, crate::bpf::Origin::Adopted { .. }) {
        monitor.predecessor_until_ns = monotonic_ns();
    }
    monitor.superseded.clear();
    let retired = monitor.kernel.retire_previous_build();
    monitor.loss_baseline();
    monitor.report_origin(retired);
    // Bound last: a client that reaches the socket finds enforcement active.
    let listener = bind_control_socket(&args.socket.control_socket, admin_gid)?;
    // Any failure before this removed what this start pinned; from now on the pins outlive us.
    monitor.kernel.keep_pins();
    // Now that the socket exists (the grant state file may not yet: see `daemon_files`).
    monitor.daemon_files = crate::privileges::daemon_files(
        &args.policies,
        &args.socket.control_socket,
        &args.state_file,
        args.json_log.as_deref(),
        std::fs::read_link("/proc/self/exe").ok().as_deref(),
        |p| p.exists(),
    )
    .iter()
    .map(|p| p.display().to_string())
    .collect();

    let m = &monitor.kernel.mechanisms;
    tracing::info!(
        agents = monitor.policies.len(),
        cgroup_root = %cgroup_root.display(),
        pin_dir = %args.pin_dir.display(),
        "enforcement active in {} ms; exec: {}; connect: {}",
        t0.elapsed().as_millis(),
        m.exec_enforcement,
        m.connect_enforcement
    );
    for a in &m.attached {
        tracing::info!("attached {a}");
    }
    for r in &m.refused {
        tracing::warn!("not available: {r}");
    }
    let names: Vec<String> = monitor
        .policies
        .iter()
        .map(|p| format!("{} ({})", p.agent(), p.mode().as_str()))
        .collect();
    tracing::info!(
        "policies from {}: {}",
        args.policies.display(),
        names.join(", ")
    );
    journald::event(
        message_id::ENFORCEMENT_ACTIVE,
        libsystemd::logging::Priority::Notice,
        &format!(
            "agent-monitor enforcing for {} agent(s); programs pinned in {}",
            monitor.policies.len(),
            args.pin_dir.display()
        ),
        &[
            ("PIN_DIR", args.pin_dir.display().to_string()),
            ("POLICY_DIR", args.policies.display().to_string()),
        ],
    );

    let (requests_tx, requests_rx) = mpsc::channel(64);
    let (scrapes_tx, scrapes_rx) = mpsc::channel(8);
    let socket_path = args.socket.control_socket.clone();
    tokio::spawn(serve_control(listener, requests_tx, events_tx));
    if let Some(l) = metrics_listener {
        tracing::info!(
            "metrics on http://{}/metrics",
            args.metrics.map_or(String::new(), |a| a.to_string())
        );
        tokio::spawn(metrics::serve(l, scrapes_tx));
    }
    // Handlers are in place before READY, so a reload right after it cannot kill the daemon.
    let signals = Signals::new()?;
    // systemd (Type=notify): ready only now that enforcement is active and the socket serves.
    notify(&[libsystemd::daemon::NotifyState::Ready]);

    let result = monitor
        .run(stream, requests_rx, scrapes_rx, signals, dns_reports)
        .await;
    notify(&[libsystemd::daemon::NotifyState::Stopping]);
    monitor.outputs.flush();
    if let Err(e) = monitor.kernel.heartbeat() {
        tracing::warn!("leaving the last heartbeat: {e:#}");
    }
    let _ = std::fs::remove_file(&socket_path);
    let msg = format!(
        "stopped; enforcement continues from the programs pinned in {} (`agent-monitor daemon \
         --uninstall --pin-dir {0}` ends it)",
        args.pin_dir.display()
    );
    tracing::info!("{msg}");
    journald::event(
        message_id::STOPPING,
        libsystemd::logging::Priority::Notice,
        &msg,
        &[("PIN_DIR", args.pin_dir.display().to_string())],
    );
    result
}

/// `daemon --uninstall`: removes the pins, so the programs detach and enforcement stops, and the
/// grant state file of that pin directory (its grants went with the maps).
fn uninstall(pin_dir: &Path, state_file: &Path) -> anyhow::Result<()> {
    // Output into a closed pipe ends the command by SIGPIPE instead of std's panic (exit 101).
    use crate::stdout::outln as println;
    let removed = crate::bpf::uninstall(pin_dir)?;
    match grant_state::remove_if_of(state_file, pin_dir) {
        Ok(true) => println!("removed the grant state file {}", state_file.display()),
        Ok(false) => {}
        Err(e) => eprintln!(
            "agent-monitor daemon --uninstall: could not remove the grant state file {}: {e}",
            state_file.display()
        ),
    }
    // Empty agent and task cgroups go too; one with processes stays (and is named).
    match crate::host::cgroup2_root() {
        Ok(root) => {
            let base = root.join("agent-monitor");
            let cleanup = crate::identity::AgentCgroups::remove_empty_below(&base);
            if !cleanup.removed.is_empty() {
                println!(
                    "removed {} empty agent cgroup(s) below {}",
                    cleanup.removed.len(),
                    base.display()
                );
            }
            for left in &cleanup.left {
                println!("left cgroup {left}");
            }
        }
        Err(e) => eprintln!("agent-monitor daemon --uninstall: agent cgroups not removed: {e:#}"),
    }
    if removed.is_empty() {
        println!("nothing pinned in {}", pin_dir.display());
    } else {
        println!(
            "removed from {}: {}; agent-monitor enforcement has stopped",
            pin_dir.display(),
            removed.join(", ")
        );
        journald::event(
            message_id::STOPPING,
            libsystemd::logging::Priority::Notice,
            &format!(
                "agent-monitor uninstalled from {}: enforcement stopped",
                pin_dir.display()
            ),
            &[("PIN_DIR", pin_dir.display().to_string())],
        );
    }
    Ok(())
}

/// The signals the daemon acts on: TERM and INT stop it, HUP reloads the policy directory.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
        })
    }
}

/// sd_notify; a no-op when not started by systemd (no NOTIFY_SOCKET).
fn notify(state: &[libsystemd::daemon::NotifyState]) {
    if let Err(e) = libsystemd::daemon::notify(false, state) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// Starts one DNS proxy endpoint per agent and points the kernel's redirection at it. Returns the
/// channel on which the endpoints report queries to the monitor.
fn start_dns_proxies(
    args: &DaemonArgs,
    policies: &PolicySet,
) -> anyhow::Result<(mpsc::Receiver<QueryReport>, Proxies)> {
    let upstream = match args.dns_upstream {
        Some(a) => Some(a),
        None => match crate::dns::upstream_from_resolv_conf(Path::new("/etc/resolv.conf")) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("{e:#}: agents' allowed DNS queries will get SERVFAIL");
                None
            }
        },
    };
    let config = Arc::new(ProxyConfig {
        upstream,
        timeout: Duration::from_millis(args.dns_timeout_ms),
    });
    let (tx, rx) = mpsc::channel(1024);
    let mut proxies = Proxies::new(config, tx);
    for policy in policies.iter() {
        proxies.ensure(policy)?;
    }
    tracing::info!(
        upstream = %upstream.map_or("none".to_string(), |a| a.to_string()),
        grace_s = args.dns_grace,
        "DNS proxy: agents' port-53 traffic is redirected to a per-agent endpoint on loopback"
    );
    Ok((rx, proxies))
}

/// Two daemons would attach every program twice; the control socket tells whether one runs.
async fn refuse_if_already_running(path: &Path) -> anyhow::Result<()> {
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "another agent-monitor daemon is already serving {}",
            path.display()
        );
    }
    Ok(())
}

/// The admin group's gid.
fn admin_group_gid(name: &str) -> anyhow::Result<u32> {
    let group = match name.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(gid.into()),
        Err(_) => nix::unistd::Group::from_name(name),
    }
    .with_context(|| format!("--admin-group {name:?}: looking it up"))?
    .with_context(|| format!("--admin-group {name:?}: no such group"))?;
    Ok(group.gid.as_raw())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_`.
fn check_trust_domain(d: &str) -> anyhow::Result<String> {
    let ok = !d.is_empty()
        && d.len() <= 255
        && d.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if !ok {
        bail!(
            "trust domain {d:?}: expected lower-case letters, digits, '.', '-', '_' (as in spiffe://DOMAIN/agent/NAME)"
        );
    }
    Ok(d.to_string())
}

/// Binds the control socket (replacing a stale one): root-only, or root:ADMIN 0660.
fn bind_control_socket(path: &Path, admin_gid: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = match admin_gid {
        None => 0o600,
        Some(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid))
                .with_context(|| format!("giving {} to the admin group", path.display()))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

/// A request from a control connection, with the kernel-reported identity of the caller.
struct ControlCall {
    request: Request,
    peer: Peer,
    reply: oneshot::Sender<Response>,
}

/// One action for `events` followers: (agent, audit-trail JSON line).
type EventLine = Arc<(String, String)>;

async fn serve_control(
    listener: UnixListener,
    to_monitor: mpsc::Sender<ControlCall>,
    events: broadcast::Sender<EventLine>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let to_monitor = to_monitor.clone();
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, to_monitor, events).await {
                tracing::warn!("control connection: {e:#}");
            }
        });
    }
}

async fn serve_connection(
    stream: UnixStream,
    to_monitor: mpsc::Sender<ControlCall>,
    events: broadcast::Sender<EventLine>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let peer_pidfd = {
        use std::os::fd::AsRawFd as _;
        crate::identity::peer::peer_pidfd(stream.as_raw_fd())
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(control::MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("no request within 10 s")??;
    let mut follow: Option<(broadcast::Receiver<EventLine>, Option<String>)> = None;
    let response = {
        let request = control::parse_request(&line);
        if let Ok(Request::Events {
            follow: true,
            agent,
        }) = &request
        {
            // Subscribed before the history is taken, so no action falls between the two.
            follow = Some((events.subscribe(), agent.clone()));
        }
        match (request, cred.pid()) {
            (Err(message), _) => Response::Error { message },
            (Ok(_), None) => Response::Error {
                message: "the kernel did not report the caller's pid".into(),
            },
            (Ok(request), Some(pid)) => {
                let peer = Peer::from_cred(pid as u32, cred.uid(), cred.gid());
                // Who the caller is comes from /proc of the pid that connected: only while that
                // process still runs (checked after the read, through a pidfd that cannot name a
                // reused pid). Else an agent connects, exits and leaves the connection to a
                // descendant, and a pid without /proc reads as no agent's.
                // Kernels before 6.5 have no SO_PEERPIDFD: there the pid's /proc entry, read
                // after the peer's identity was, is the best check (a reused pid can pass).
                let connected_still_runs = match &peer_pidfd {
                    Ok(fd) => crate::identity::peer::still_running(fd, pid as u32),
                    Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| {
                            tracing::warn!(
                                "this kernel has no SO_PEERPIDFD (Linux 6.5): a control request \
                                 is checked against the connecting pid's /proc entry instead, \
                                 which a reused pid can pass"
                            )
                        });
                        std::path::Path::new(&format!("/proc/{pid}/status")).exists()
                    }
                    Err(_) => false,
                };
                match connected_still_runs {
                    true => {
                        let (reply, answer) = oneshot::channel();
                        to_monitor
                            .send(ControlCall {
                                request,
                                peer,
                                reply,
                            })
                            .await
                            .context("monitor stopped")?;
                        answer.await.context("monitor dropped the request")?
                    }
                    false => Response::Error {
                        message: format!(
                            "the process that connected (pid {pid}) no longer runs: a request is \
                             judged by the process that made the connection"
                        ),
                    },
                }
            }
        }
    };
    let (response, history) = match (response, follow.is_some()) {
        (Response::Events { history }, true) => (Response::Events { history: vec![] }, history),
        (r, _) => {
            // Refused (authorization) or not a follow: nothing streams.
            follow = None;
            (r, vec![])
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    let Some((mut rx, agent)) = follow else {
        return Ok(());
    };
    for v in history {
        write.write_all(format!("{v}\n").as_bytes()).await?;
    }
    loop {
        let line = match rx.recv().await {
            Ok(ev) if agent.as_ref().is_none_or(|a| *a == ev.0) => format!("{}\n", ev.1),
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"lagged\":{n}}}\n"),
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        if write.write_all(line.as_bytes()).await.is_err() {
            // The follower went away.
            return Ok(());
        }
    }
}

/// The identity a `KIND_TAGGED` record carries (stable agent id, not an allowlist index).
fn tagged_identity(subject: &event::Subject) -> AgentSlot {
    AgentSlot {
        agent: subject.agent,
        mode: 0,
        task: subject.task,
        source: subject.source,
    }
}

fn tagged_identity_of(agent: u32) -> AgentSlot {
    AgentSlot {
        agent,
        mode: 0,
        task: common::TASK_NONE,
        source: 0,
    }
}

/// Selectors that would capture PID 1 or the daemon on this host refuse the whole set (see
/// `identity::host_capture`), before anything is written: at start before the programs load, at
/// reload before the new bank.
fn refuse_host_capture(set: &PolicySet, cgroup_root: &Path) -> anyhow::Result<()> {
    let found = identity::host_capture::issues(
        set,
        &identity::host_capture::Protected::host("the daemon"),
        &identity::host_capture::LiveHost { cgroup_root },
    );
    if !found.is_empty() {
        bail!(
            "selectors that would capture the host:\n{}",
            found.join("\n")
        );
    }
    Ok(())
}

/// Why the `sys_enter_socket` watch is needed from the start, if it is: agents identified by
/// selectors ([identity]) run without `run`'s seccomp filter, and in alert mode that filter lets
/// other socket families pass for this watch to report.
fn socket_watch_at_start(policies: &PolicySet) -> Option<String> {
    let names = |pick: &dyn Fn(&crate::policy::Policy) -> bool| -> Vec<&str> {
        policies
            .iter()
            .filter(|p| pick(p))
            .map(|p| p.agent())
            .collect()
    };
    let selected = names(&|p| !p.selectors().is_empty());
    let alert = names(&|p| p.mode() == crate::policy::model::Mode::Alert);
    let mut why = Vec::new();
    if !selected.is_empty() {
        why.push(format!(
            "agents identified by [identity] selectors have no seccomp filter: {}",
            selected.join(", ")
        ));
    }
    if !alert.is_empty() {
        why.push(format!(
            "`run`'s filter lets other socket families pass in alert mode: {}",
            alert.join(", ")
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Why process `pid`, about to be placed, needs the `sys_enter_socket` watch: it was placed by a
/// control client other than this program's own `run` (which gives the command its seccomp
/// filter). Told apart by the executable file: the same file as the daemon's is `run`; anything
/// else, or a file we cannot read, counts as unfiltered (the safe side).
fn unfiltered_placement(pid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let file = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let ours = file("/proc/self/exe");
    let theirs = file(&format!("/proc/{pid}/exe"));
    if ours.is_some() && ours == theirs {
        return None;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".into());
    Some(format!(
        "process {pid} ({exe}) was placed by a control client other than `agent-monitor run`, \
         so it has no seccomp filter"
    ))
}

/// Why a socket was refused (or, alert, reported), by the mechanism that judged it.
fn socket_reason(sk: &event::SocketEvent) -> String {
    let inet = matches!(sk.family, common::AF_INET | common::AF_INET6);
    match (inet, sk.verdict) {
        (true, _) => "agents may create TCP and UDP inet sockets only (cgroup sock_create): raw, \
                      ICMP ping, SCTP and MPTCP sockets reach endpoints the connect and sendmsg \
                      hooks do not judge"
            .into(),
        (false, _) => "a socket family the cgroup hooks cannot judge (vsock, packet…): it was \
                       created (`agent-monitor run` refuses these in enforce mode with its \
                       seccomp filter; this process is in alert mode or was not started by run)"
            .into(),
    }
}

/// A live (agent, task) cgroup.
struct TaskEntry {
    agent: String,
    task: String,
    path: PathBuf,
}

/// The identity of a process as the daemon can tell it from outside (same order as the kernel).
#[derive(Clone, Copy, Debug)]
struct ProcessIdentity {
    slot: AgentSlot,
    /// It is in one of `run`'s (agent, task) cgroups (moving it means moving its cgroup).
    in_run_cgroup: bool,
}

#[derive(Default)]
struct AgentCounters {
    actions: u64,
    allowed: u64,
    denied: u64,
    alerts: u64,
}

/// Owner of the kernel object and of all daemon state.
struct Monitor {
    kernel: Kernel,
    /// Selectors of every policy, armed or waiting, and the uids `run --user` bound.
    selected: Selected,
    /// The uid bindings a previous daemon left in the pinned map were looked at (first apply).
    bindings_adopted: bool,
    /// Task numbers and grants.
    registry: Tasks,
    cgroup_root: PathBuf,
    admin_gid: Option<u32>,
    trust_domain: String,
    policies: PolicySet,
    /// Files the exact exec rules name, mirrored in the kernel's file-identity map.
    exec_files: ExecFiles,
    policies_dir: PathBuf,
    policies_loaded: SystemTime,
    /// First agent index of the live bank (0 or `BANK_STRIDE`).
    bank_base: u32,
    /// Where the grants in force are kept for a restarted daemon.
    grant_file: GrantStateFile,
    /// What became of a predecessor's grants (see `recover_grants`).
    grant_recovery: GrantRecovery,
    /// Why the socket() watch stays on whatever the policy says: an agent placed without `run`'s
    /// filter (for the daemon's life), or agents recovered from a predecessor that watched them.
    socket_watch_sticky: Option<String>,
    cgroups: AgentCgroups,
    /// cgroup id → (agent, task).
    tasks: HashMap<u64, TaskEntry>,
    procs: ProcessTable,
    /// Placed `run` processes (pid → task cgroup id): the only senders of seccomp reports.
    placed: HashMap<u32, u64>,
    /// Placed `run`s whose command is not in a Landlock domain (pid → task cgroup id, why).
    unscoped_runs: HashMap<u32, (u64, String)>,
    /// What each placed process said its command holds (none: it did not say), for `status`.
    placed_privileges: HashMap<u32, Option<control::Privileges>>,
    /// The daemon's files root agents see read-only (privileges.rs), named in every placement.
    daemon_files: Vec<String>,
    outputs: Outputs,
    per_agent: HashMap<String, AgentCounters>,
    /// (agent, action, verdict) → count, for the metrics.
    by_action: BTreeMap<(String, &'static str, &'static str), u64>,
    counters: Counters,
    started: SystemTime,
    decode_errors_logged: u64,
    /// Recent actions as (agent, audit JSON), for `events`.
    /// The last `HISTORY` actions as (agent, audit line), for `events`.
    history: VecDeque<EventLine>,
    events_tx: broadcast::Sender<EventLine>,
    identity_warned: bool,
    /// pid_max exceeds the tag map's capacity (see `check_identity_room`).
    tag_room_warned: bool,
    /// Policy sets replaced by reloads, with the monotonic time until which each was in force.
    superseded: VecDeque<(u64, PolicySet)>,
    /// After an adoption: records judged until this monotonic time used the predecessor's tables.
    predecessor_until_ns: u64,
    /// Addresses agents resolved through the DNS proxy (mirror of the kernel's `DNS_LEARNED`),
    /// keyed by the proxy's start-up index (stable across reloads; see `dns_kernel_index`).
    learned: LearnedTable,
    /// Addresses of allowed answers not learned, by agent and why (status, metrics).
    dns_withheld: HashMap<(String, crate::dns::Withheld), u64>,
    dns_notices: crate::dns::NoticeGate,
    dns_grace_ns: u64,
    /// Per agent, its latest DNS redirect: who is behind the next query its proxy reports.
    dns_clients: HashMap<String, event::ConnectEvent>,
    /// Each agent's DNS proxy, by the proxy's index (stable across reloads).
    dns_proxies: Proxies,
}

impl Monitor {
    async fn run(
        &mut self,
        mut stream: ActionStream,
        mut requests: mpsc::Receiver<ControlCall>,
        mut scrapes: mpsc::Receiver<Scrape>,
        signals: Signals,
        mut dns: mpsc::Receiver<QueryReport>,
    ) -> anyhow::Result<()> {
        let Signals {
            mut term,
            mut int,
            mut hup,
            mut usr1,
        } = signals;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        // systemd's watchdog is pinged from this loop, so a stuck monitor gets restarted (and the
        // restarted daemon adopts the pinned programs).
        let watchdog = libsystemd::daemon::watchdog_enabled(false);
        let mut watchdog_tick =
            tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<Result<KernelEvent, event::DecodeError>> = Vec::with_capacity(1024);
        loop {
            tokio::select! {
                r = stream.next_batch(|bytes| batch.push(event::decode(bytes))) => {
                    r.context("reading the action ring buffer")?;
                    for ev in batch.drain(..) {
                        self.on_event(ev);
                    }
                }
                _ = drain.tick() => {
                    stream.drain_now(|bytes| batch.push(event::decode(bytes)));
                    for ev in batch.drain(..) {
                        self.on_event(ev);
                    }
                }
                Some(report) = dns.recv() => {
                    // The kernel's record of the agent's DNS packet was written before the packet
                    // reached the proxy: read what is in the ring now, so the query is
                    // attributed to the process that sent it.
                    stream.drain_now(|bytes| batch.push(event::decode(bytes)));
                    for ev in batch.drain(..) {
                        self.on_event(ev);
                    }
                    self.on_dns(report);
                }
                Some(call) = requests.recv() => {
                    let response = self.on_request(call.request, &call.peer);
                    let _ = call.reply.send(response);
                }
                Some(scrape) = scrapes.recv() => {
                    let _ = scrape.send(metrics::render(&self.metrics_snapshot()));
                }
                _ = sweep.tick() => self.sweep(),
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    notify(&[libsystemd::daemon::NotifyState::Watchdog]);
                }
                _ = hup.recv() => {
                    // The outcome is logged and journaled by reload itself.
                    let _ = self.reload("SIGHUP");
                }
                _ = usr1.recv() => match self.outputs.reopen() {
                    Ok(()) => tracing::info!("SIGUSR1: audit trail reopened"),
                    Err(e) => tracing::error!("SIGUSR1: {e}; still writing to the old file"),
                },
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            }
            // One write per burst of records rather than one per action.
            self.outputs.flush();
        }
    }

    /// Re-reads the policy directory and applies it; all or nothing. The error names file, line
    /// and reason, and also goes to journald at priority err.
    fn reload(&mut self, trigger: &str) -> Result<String, String> {
        let dir = self.policies_dir.clone();
        let result = crate::policy_dir::load_dir(&dir)
            .map_err(|e| format!("invalid policies in {}:\n{e}", dir.display()))
            .and_then(|set| {
                let agents = set.len();
                for w in crate::exec_lint::warnings(&set) {
                    tracing::warn!("{w}");
                }
                self.apply_policies(set)
                    .map(|()| agents)
                    .map_err(|e| format!("{e:#}"))
            });
        match result {
            Ok(agents) => {
                self.counters.reloads += 1;
                let msg = format!(
                    "policy reloaded from {} ({trigger}): {agents} agent(s), applied to {} running task(s)",
                    dir.display(),
                    self.tasks.len()
                );
                tracing::info!("{msg}");
                journald::event(
                    message_id::RELOAD_APPLIED,
                    libsystemd::logging::Priority::Notice,
                    &msg,
                    &[("POLICY_DIR", dir.display().to_string())],
                );
                Ok(msg)
            }
            Err(e) => {
                self.counters.reload_failures += 1;
                let msg = format!(
                    "policy reload ({trigger}) refused, the previous policy stays in force: {e}"
                );
                tracing::error!("{msg}");
                journald::event(
                    message_id::RELOAD_FAILED,
                    libsystemd::logging::Priority::Error,
                    &msg,
                    &[
                        ("POLICY_DIR", dir.display().to_string()),
                        ("RELOAD_ERROR", e.clone()),
                    ],
                );
                Err(msg)
            }
        }
    }

    /// Puts `set` in force for new and running agents without a moment of deny-all or allow-all:
    /// the new allowlists go into the other bank of agent indices beside the old ones, each agent
    /// cgroup is switched over in one map update (index and mode together), then the old bank
    /// goes. On a failure before the switch nothing has changed.
    fn apply_policies(&mut self, set: PolicySet) -> anyhow::Result<()> {
        refuse_host_capture(&set, &self.cgroup_root)?;
        let live = self.kernel.state(common::STATE_LIVE_BANK)?;
        let next: u32 = if live == 0 { 1 } else { 0 };
        let base = next * BANK_STRIDE;
        if set.len() > common::MAX_AGENTS as usize {
            bail!(
                "{} agents: the kernel's agent table holds {}",
                set.len(),
                common::MAX_AGENTS
            );
        }
        let mut ids: HashMap<u32, &str> = HashMap::new();
        for p in set.iter() {
            if let Some(other) = ids.insert(agent_id(p.agent()), p.agent()) {
                bail!(
                    "agents {other:?} and {:?} have the same kernel id (a hash of the name): \
                     rename one",
                    p.agent()
                );
            }
        }
        let tables = set
            .compile()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .rebased(base);
        // Files named by exact exec rules, keyed in the new bank too.
        let mut files = ExecFiles::default();
        let file_entries = files.refresh(&set, base).add;
        // DNS: an agent the set adds gets its proxy now (its kernel entry is written with the
        // others below); each agent's proxy endpoint and learned addresses under its new index.
        for p in set.iter() {
            self.dns_proxies
                .ensure(p)
                .with_context(|| format!("starting the DNS proxy of agent {:?}", p.agent()))?;
        }
        let dns: Vec<(u32, DnsProxy)> = self
            .dns_proxies
            .endpoints()
            .iter()
            .filter_map(|(name, ports)| set.index_of(name).map(|i| (base + i, *ports)))
            .collect();
        // Learned addresses move to the new bank from the daemon's table (live ones only, within
        // each agent's new limit). The limits add up to at most half the map, so both banks fit
        // side by side: learned state can never make a reload fail (compile checked the sum).
        let limits: HashMap<u32, u32> = set
            .learned_limits()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .zip(set.iter())
            .filter_map(|(limit, p)| self.dns_index(p.agent()).map(|i| (i, limit)))
            .collect();
        let carried = self.learned.carried(&limits, monotonic_ns());
        if let Err(e) = self
            .kernel
            .write_allowlists(&tables)
            .and_then(|()| self.kernel.update_exec_files(&file_entries, &[]))
            .and_then(|()| {
                for (index, ports) in &dns {
                    self.kernel.set_dns_proxy(*index, *ports)?;
                }
                Ok(())
            })
        {
            // Entries of the next bank left by an interrupted earlier attempt would be counted
            // against capacity; clear them for the next try.
            let old_base = self.bank_base;
            let _ = self
                .kernel
                .retain_allowlists(|a| (old_base..old_base + BANK_STRIDE).contains(&a));
            return Err(e);
        }
        let mut kept = Vec::with_capacity(carried.len());
        for (dns, addr, value) in &carried {
            let index = self
                .dns_proxies
                .endpoints()
                .get(*dns as usize)
                .and_then(|(name, _)| set.index_of(name));
            // Not expected (the budget keeps room); if it happens the address is forgotten, and
            // the agent resolves it again, rather than the reload being refused.
            match index.map(|i| self.kernel.write_learned(base + i, *addr, value)) {
                Some(Ok(())) => kept.push((*dns, *addr)),
                Some(Err(e)) => tracing::error!(
                    "a learned address could not move to the new policy bank, forgotten: {e:#}"
                ),
                None => {}
            }
        }
        // The switch: one update per agent in the table the kernel translates identities through.
        for (i, p) in set.indexed() {
            let table = AgentSlot {
                agent: base + i,
                mode: p.mode().kernel_value(),
                task: common::TASK_NONE,
                source: 0,
            };
            if let Err(e) = self.kernel.set_agent_table(agent_id(p.agent()), table) {
                // Its id keeps the old index, whose entries go below: it is denied everything.
                tracing::error!(
                    agent = p.agent(),
                    "switching to the new policy failed, the agent is denied everything: {e:#}"
                );
            }
        }
        // Agents whose policy went away: no entry = no allowlist, enforce (fail closed).
        let keep: std::collections::HashSet<u32> =
            set.iter().map(|p| agent_id(p.agent())).collect();
        for id in self.kernel.agent_table_ids()? {
            if !keep.contains(&id) {
                self.kernel.remove_agent_table(id)?;
            }
        }
        self.kernel
            .set_state(common::STATE_LIVE_BANK, u64::from(next))?;
        std::thread::sleep(SWAP_GRACE);
        let removed = self
            .kernel
            .retain_allowlists(|a| (base..base + BANK_STRIDE).contains(&a))?;
        tracing::debug!(removed, "old allowlist bank removed");
        for t in self.tasks.values() {
            if set.get(&t.agent).is_none() {
                tracing::warn!(
                    agent = t.agent,
                    task = t.task,
                    "the agent has no policy any more; its running processes are denied every action"
                );
            }
        }
        // Records judged until now may still be in the ring buffer: keep the old set to explain
        // them (see `explain`).
        self.exec_files = files;
        // The proxies answer by the new host rules from the next query on.
        self.dns_proxies.update(set.iter());
        for (dns, lost) in self.learned.set_limits(limits, &kept) {
            if let Some((agent, _)) = self.dns_proxies.endpoints().get(dns as usize) {
                tracing::info!(
                    agent,
                    lost,
                    "learned addresses dropped by the reload (agent removed or its dns.max_learned lowered)"
                );
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
        let old = std::mem::replace(&mut self.policies, set);
        if self.superseded.len() == SUPERSEDED_KEPT {
            self.superseded.pop_front();
        }
        self.superseded.push_back((monotonic_ns(), old));
        self.bank_base = base;
        self.policies_loaded = SystemTime::now();
        for w in crate::delegation_lint::warnings(&self.policies) {
            tracing::warn!("{w}");
        }
        self.rearm_selectors();
        let why =
            socket_watch_at_start(&self.policies).or_else(|| self.socket_watch_sticky.clone());
        if let Err(e) = self.kernel.watch_socket_syscalls(why.as_deref()) {
            tracing::error!("socket() watch: {e:#}");
        }
        Ok(())
    }

    /// Selectors of the policies in force, armed from scratch (issue 4's `Selected::arm` is
    /// re-runnable): the new set's entries are written over the old (same stable ids), then kernel
    /// entries no selector of the new set owns — left by the previous policy or a previous
    /// daemon — are removed.
    fn rearm_selectors(&mut self) {
        let registry = &mut self.registry;
        let policies = &self.policies;
        let mut selected = Selected::from_policies(policies, |agent| AgentSlot {
            agent: agent_id(agent),
            mode: policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value()),
            task: registry.number(agent, DEFAULT_TASK),
            source: common::SOURCE_RUN,
        });
        // Tags of task switches (this daemon's or a predecessor's) keep the kernel looking at tags.
        selected.tags_in_use = self.selected.tags_in_use || !self.kernel.tags().is_empty();
        selected.bound = self.carried_bindings(&selected);
        self.selected = selected;
        self.arm_selectors();
        if let Err(e) = self.remove_stale_selectors() {
            tracing::error!("removing selectors of the previous policy: {e:#}");
        }
        match self.tag_running_selected() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                processes = n,
                "running processes of selected executables (and their descendants) are now their agent"
            ),
            Err(e) => tracing::error!("tagging running processes of selected executables: {e:#}"),
        }
    }

    /// The uid bindings that stay under the policies of `next` (see `identity::uid_binding` for
    /// their lifetime): this daemon's, and at the first apply those a previous daemon left in the
    /// pinned map (every uid entry no `uids` selector claims, for an agent that has a policy).
    /// Each kept binding is rewritten for the agent's `default` task as numbered now.
    fn carried_bindings(&mut self, next: &Selected) -> identity::uid_binding::Bindings {
        let mut candidates = std::mem::take(&mut self.selected.bound);
        if !self.bindings_adopted {
            self.bindings_adopted = true;
            match self.kernel.uid_selector_entries() {
                Ok(entries) => {
                    for (uid, slot) in entries {
                        let Some(p) = self
                            .policies
                            .iter()
                            .find(|p| agent_id(p.agent()) == slot.agent)
                        else {
                            continue;
                        };
                        candidates
                            .entry(uid)
                            .or_insert(identity::uid_binding::Binding {
                                agent: p.agent().to_string(),
                                slot,
                                origin: "a previous daemon (adopted from the pinned uid map)"
                                    .into(),
                            });
                    }
                }
                Err(e) => tracing::error!("reading the pinned uid map: {e:#}"),
            }
        }
        let mut kept = identity::uid_binding::Bindings::new();
        for (uid, mut b) in candidates {
            let Some(policy) = self.policies.get(&b.agent) else {
                tracing::warn!(
                    uid,
                    agent = b.agent,
                    "uid binding ended: the agent has no policy any more; processes of uid {uid} are no agent's now"
                );
                continue;
            };
            if let Some(identity::uid_binding::Owner::Selector { agent, at }) = next.uid_owner(uid)
            {
                if agent != b.agent {
                    tracing::warn!(
                        uid,
                        "uid {uid} was bound to agent {} by {}; the `uids` selector of agent {agent} at {at} outranks the binding: its processes are agent {agent} now",
                        b.agent,
                        b.origin
                    );
                }
                continue;
            }
            // Bindings give the `default` task, as a selector does; re-numbered for this daemon.
            let mode = policy.mode().kernel_value();
            b.slot = AgentSlot {
                agent: agent_id(&b.agent),
                mode,
                task: self.registry.number(&b.agent, DEFAULT_TASK),
                source: common::SOURCE_UID,
            };
            if let Err(e) = self.kernel.set_uid_selector(uid, b.slot) {
                tracing::error!(uid, agent = b.agent, "rewriting the uid binding: {e:#}");
            }
            kept.insert(uid, b);
        }
        kept
    }

    /// Binds `uid` to `agent` for `run --user` (pid `pid`): checked by `place` before the
    /// placement (`arm` says whether it is new), armed before `run` forks its command. Returns the
    /// warnings for `run` (the uid's processes outside the agent, which are the agent now).
    fn bind_uid(
        &mut self,
        agent: &str,
        uid: u32,
        pid: u32,
        arm: bool,
    ) -> anyhow::Result<Vec<String>> {
        if arm {
            let mode = self
                .policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value());
            let slot = AgentSlot {
                agent: agent_id(agent),
                mode,
                task: self.registry.number(agent, DEFAULT_TASK),
                source: common::SOURCE_UID,
            };
            self.kernel
                .set_uid_selector(uid, slot)
                .with_context(|| format!("binding uid {uid} to agent {agent}"))?;
            self.selected.bound.insert(
                uid,
                identity::uid_binding::Binding {
                    agent: agent.to_string(),
                    slot,
                    origin: format!("`run --user` (pid {pid})"),
                },
            );
            self.kernel.set_identity_config(self.selected.config())?;
            tracing::info!(
                uid,
                agent,
                pid,
                "uid bound to the agent by `run --user`: every process of uid {uid} on this host is agent {agent}, whoever starts it"
            );
        }
        let found = identity::uid_binding::outsiders(uid, agent);
        let warning =
            identity::uid_binding::outsiders_warning(uid, agent, "bound by `run --user`", &found);
        if let Some(w) = &warning {
            tracing::warn!(uid, agent, "{w}");
        }
        Ok(warning.into_iter().collect())
    }

    /// The kernel tags at exec and fork only, so a process that already runs a selected
    /// executable (or descends from one) when the selector is armed — daemon start, reload — is
    /// found here through procfs and tagged, every thread. Repeated until a pass finds nothing
    /// new: a child forked before its parent was tagged is caught by the next pass, one forked
    /// after inherits the tag in the kernel. Processes with an identity already keep it (except a
    /// uid one, which an executable selector outranks, as at exec). Returns processes tagged.
    fn tag_running_selected(&mut self) -> anyhow::Result<usize> {
        let files: HashMap<common::ExecFileKey, AgentSlot> =
            self.kernel.exec_selector_entries()?.into_iter().collect();
        if files.is_empty() {
            return Ok(0);
        }
        let mut done: HashMap<u32, AgentSlot> = HashMap::new();
        for _pass in 0..5 {
            let procs = identity::procfs::processes();
            let mut found: HashMap<u32, AgentSlot> = HashMap::new();
            let free = |pid: u32| {
                self.identify(pid)
                    .is_none_or(|id| id.slot.source == common::SOURCE_UID)
            };
            for &(pid, _) in &procs {
                if done.contains_key(&pid) || !free(pid) {
                    continue;
                }
                let Ok(st) = identity::selected::stamp(Path::new(&format!("/proc/{pid}/exe")))
                else {
                    continue;
                };
                if let Some(slot) = files.get(&st.selector_key()) {
                    found.insert(
                        pid,
                        AgentSlot {
                            source: common::SOURCE_EXECUTABLE,
                            ..*slot
                        },
                    );
                }
            }
            // Descendants, parents first: repeat until no untagged child of a tagged one is left.
            loop {
                let mut more = Vec::new();
                for &(pid, ppid) in &procs {
                    if found.contains_key(&pid) || done.contains_key(&pid) {
                        continue;
                    }
                    let parent = found.get(&ppid).or_else(|| done.get(&ppid));
                    if let Some(slot) = parent
                        && free(pid)
                    {
                        more.push((pid, *slot));
                    }
                }
                if more.is_empty() {
                    break;
                }
                found.extend(more);
            }
            if found.is_empty() {
                break;
            }
            for (pid, slot) in found {
                for tid in identity::procfs::threads(pid) {
                    self.kernel.tag_thread(tid, slot)?;
                }
                done.insert(pid, slot);
            }
        }
        Ok(done.len())
    }

    fn remove_stale_selectors(&mut self) -> anyhow::Result<()> {
        let armed = self.selected.kernel_keys();
        for uid in self.kernel.uid_selectors()? {
            if !armed.uids.contains(&uid) {
                self.kernel.remove_uid_selector(uid)?;
            }
        }
        for key in self.kernel.exec_selectors()? {
            if !armed.files.contains(&key) {
                self.kernel.remove_exec_selector(key)?;
            }
        }
        for (id, slot) in self.kernel.agent_cgroups()? {
            let selector = matches!(slot.source, common::SOURCE_CGROUP | common::SOURCE_UNIT);
            if selector && !armed.cgroups.contains(&id) && !self.tasks.contains_key(&id) {
                self.kernel.remove_agent_cgroup(id)?;
            }
        }
        Ok(())
    }

    /// Takes over the tasks a previous daemon left in the pinned identity map. Entries whose
    /// cgroup is gone are dropped; the others get their names back from the cgroup tree.
    fn recover_tasks(&mut self) -> anyhow::Result<()> {
        let entries = self.kernel.agent_cgroups()?;
        if entries.is_empty() {
            return Ok(());
        }
        // Task numbers a predecessor handed out may live on in tags: never allocate them again.
        let tags = self.kernel.tags();
        let highest = entries
            .iter()
            .map(|(_, s)| s.task)
            .chain(tags.iter().map(|(_, s)| s.task))
            .max()
            .unwrap_or(0);
        self.registry.skip_past(highest);
        // A predecessor's agents may have been placed without `run`'s filter: keep its watch.
        if self
            .kernel
            .mechanisms
            .socket_syscall_watch
            .starts_with("on")
        {
            self.socket_watch_sticky = Some(
                "agents recovered from the previous daemon, which watched socket() for them".into(),
            );
        }
        let tree = self.cgroups.tasks();
        let mut stale = 0;
        for (id, slot) in entries {
            // Selector cgroups are the selectors' business (`rearm_selectors`).
            if slot.source != common::SOURCE_RUN {
                continue;
            }
            match tree.iter().find(|t| t.id == id) {
                Some(t) => {
                    if !self.registry.adopt(&t.agent, &t.task, slot.task) {
                        tracing::warn!(
                            agent = t.agent,
                            task = t.task,
                            number = slot.task,
                            "recovered task number clashes; keeping the first"
                        );
                    }
                    for pid in AgentCgroups::processes(&t.path) {
                        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|_| "?".into());
                        self.procs.add_root(pid, exe, identity::proc_args(pid));
                    }
                    self.tasks.insert(
                        id,
                        TaskEntry {
                            agent: t.agent.clone(),
                            task: t.task.clone(),
                            path: t.path.clone(),
                        },
                    );
                }
                None => {
                    stale += 1;
                    self.kernel.remove_agent_cgroup(id)?;
                }
            }
        }
        tracing::info!(
            tasks = self.tasks.len(),
            stale,
            tags = tags.len(),
            "recovered the running tasks of the previous daemon"
        );
        Ok(())
    }

    /// Takes over a predecessor's task grants: those the state file records, not expired, whose
    /// entries the kernel still holds exactly (a file older than the kernel could otherwise bring
    /// back a grant that was ended or narrowed). Every other grant entry is revoked, so nothing
    /// stays granted that `task end` could not take back. After a fresh install (empty maps) a
    /// leftover state file is removed. Reported by `report_origin`.
    fn recover_grants(&mut self) -> anyhow::Result<()> {
        if !matches!(self.kernel.origin, crate::bpf::Origin::Adopted { .. }) {
            self.grant_file.remove_leftover();
            return Ok(());
        }
        let kernel = self.kernel.task_grants()?;
        let now = monotonic_ns();
        let mut r = GrantRecovery::default();
        let mut keep = std::collections::HashSet::new();
        let mut expired = std::collections::HashSet::new();
        match self.grant_file.load() {
            // Without grants in the kernel nothing is lost, whatever the file says.
            Err(_) if kernel.numbers().is_empty() => {}
            Err(why) => r.why.push(why),
            Ok(records) => {
                for rec in records {
                    let name = format!("task {} of agent {}", rec.task, rec.agent);
                    if rec.expires_ns <= now {
                        r.expired += rec.rules();
                        expired.insert(rec.number);
                        continue;
                    }
                    // The task may be known from the cgroup tree already: by the same number.
                    let same_number = match self.registry.find(&rec.agent, &rec.task) {
                        Some(n) => n == rec.number,
                        None => self.registry.adopt(&rec.agent, &rec.task, rec.number),
                    };
                    if !same_number {
                        r.why.push(format!(
                            "{name}: recorded number {} clashes with a recovered task",
                            rec.number
                        ));
                        continue;
                    }
                    let tables = match crate::policy::compile_grants(
                        rec.number, &rec.task, &rec.net, &rec.exec,
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            r.why.push(format!("{name}: {e}"));
                            continue;
                        }
                    };
                    if let Err(e) = kernel.holds_exactly(rec.number, &tables, rec.expires_ns) {
                        r.why.push(format!(
                            "{name}: {e} (the state file is older than the kernel's grants)"
                        ));
                        continue;
                    }
                    r.tasks += 1;
                    r.recovered += rec.rules();
                    keep.insert(rec.number);
                    if let Some(t) = self.registry.get_mut(rec.number) {
                        t.grants = Some(identity::tasks::Grants {
                            net: rec.net,
                            exec: rec.exec,
                            expires_ns: rec.expires_ns,
                            kernel: tables,
                        });
                    }
                }
            }
        }
        r.revoked_entries = kernel.entries(|n| !keep.contains(&n) && !expired.contains(&n));
        let removed = self.kernel.retain_task_grants(|n| keep.contains(&n))?;
        for why in &r.why {
            tracing::warn!("task grants not recovered: {why}");
        }
        tracing::info!(
            tasks = r.tasks,
            grants = r.recovered,
            expired = r.expired,
            revoked_entries = r.revoked_entries,
            removed_entries = removed,
            "recovered the task grants of the previous daemon"
        );
        self.grant_recovery = r;
        // The file now says what is in force again (or that nothing is).
        self.grant_file.save(&self.registry);
        Ok(())
    }

    /// Losses before this daemon started are reported by `report_origin`, not as new ones.
    fn loss_baseline(&mut self) {
        if let Ok(k) = self.kernel.counters() {
            self.counters.lost_records = k[common::COUNTER_RECORDS_LOST as usize];
            self.counters.actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
            self.counters.alerts_refused_unrecordable =
                k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize];
        }
    }

    fn report_origin(&mut self, retired_links: usize) {
        if let crate::bpf::Origin::Adopted {
            away_seconds,
            lost_while_away,
            replaced_build,
        } = self.kernel.origin.clone()
        {
            let away = away_seconds.map_or("an unknown time".into(), |s| format!("{s:.1} s"));
            let g = &self.grant_recovery;
            let msg = format!(
                "adopted the pinned programs of the previous daemon, which was away for {away}; \
                 {lost_while_away} kernel records were lost meanwhile (their verdicts applied); \
                 {} running task(s) and {} process tag(s) recovered; task grants: {} recovered \
                 in {} task(s), {} expired while away, {} kernel grant entries revoked{}{}",
                self.tasks.len(),
                self.kernel.tags().len(),
                g.recovered,
                g.tasks,
                g.expired,
                g.revoked_entries,
                if g.why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", g.why.join("; "))
                },
                if replaced_build {
                    format!(
                        "; they came from another build and were replaced ({retired_links} old \
                         link(s) detached after the new programs were attached)"
                    )
                } else {
                    String::new()
                }
            );
            tracing::warn!("{msg}");
            journald::event(
                message_id::ADOPTED,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    (
                        "AWAY_SECONDS",
                        away_seconds.map_or(String::new(), |s| format!("{s:.3}")),
                    ),
                    ("LOST_RECORDS", lost_while_away.to_string()),
                    ("RECOVERED_TASKS", self.tasks.len().to_string()),
                    ("GRANTS_RECOVERED", g.recovered.to_string()),
                    ("GRANTS_EXPIRED", g.expired.to_string()),
                    ("GRANTS_REVOKED", g.revoked_entries.to_string()),
                    ("GRANTS_NOT_RECOVERED_WHY", g.why.join("; ")),
                    ("PIN_DIR", self.kernel.mechanisms.pin_dir.clone()),
                ],
            );
        }
    }

    fn metrics_snapshot(&mut self) -> metrics::Snapshot {
        self.report_kernel_losses();
        metrics::Snapshot {
            actions: self
                .by_action
                .iter()
                .map(|((a, k, v), n)| (a.clone(), *k, *v, *n))
                .collect(),
            records_lost: self.counters.lost_records,
            actions_lost: self.counters.actions_lost,
            alerts_refused_unrecordable: self.counters.alerts_refused_unrecordable,
            source_routed_packets: self.counters.source_routed_packets,
            undecodable_records: self.counters.undecodable_records,
            verdict_disagreements: self.counters.verdict_disagreements,
            occupancy: self
                .kernel
                .occupancy()
                .unwrap_or_default()
                .into_iter()
                .map(|o| (o.map, o.used, o.capacity))
                .collect(),
            reloads: self.counters.reloads,
            reload_failures: self.counters.reload_failures,
            sinks: self
                .outputs
                .stats()
                .into_iter()
                .map(|s| (s.sink.to_string(), s.written, s.failed))
                .chain(std::iter::once(self.grant_file.stats()))
                .collect(),
            journald_aggregated: self.outputs.aggregated(),
            dns_withheld: self
                .dns_withheld
                .iter()
                .map(|((agent, kind), n)| (agent.clone(), kind.as_str(), *n))
                .collect(),
            dns_learned: self
                .policies
                .iter()
                .filter_map(|p| {
                    let i = self.dns_index(p.agent())?;
                    Some((
                        p.agent().to_string(),
                        u64::from(self.learned.held(i)),
                        u64::from(self.learned.limit(i)),
                    ))
                })
                .collect(),
            agents: self.policies.len() as u64,
            tasks: self.tasks.len() as u64,
            processes: self.procs.len() as u64,
            away_seconds: match &self.kernel.origin {
                crate::bpf::Origin::Adopted { away_seconds, .. } => away_seconds.unwrap_or(0.0),
                crate::bpf::Origin::Installed => 0.0,
            },
        }
    }

    fn on_request(&mut self, request: Request, peer: &Peer) -> Response {
        let inside = self.identify(peer.pid).map(|id| self.names(&id.slot));
        let admin = peer.is_admin(self.admin_gid);
        if let Err(why) = control::authorize(
            &request,
            admin,
            inside.as_ref().map(|(a, t)| (a.as_str(), t.as_str())),
        ) {
            self.report_refusal(&request, peer, inside, &why);
            return Response::Error { message: why };
        }
        let pid = peer.pid;
        let result = match request {
            Request::Place {
                agent,
                task,
                user,
                unscoped,
                privileges,
            } => {
                let placed = self.place(&agent, &task, pid, user, unscoped);
                if placed.is_ok() {
                    self.note_privileges(&agent, &task, pid, privileges);
                }
                placed.map(|(cgroup, warnings)| Response::Placed {
                    mode: self
                        .policies
                        .get(&agent)
                        .map(|p| p.mode().as_str().to_string()),
                    read_only: self.daemon_files.clone(),
                    agent,
                    task,
                    cgroup,
                    warnings,
                })
            }
            Request::Caught(caught) => self.on_caught(pid, caught).map(|()| Response::Recorded {}),
            Request::Status {} => Ok(Response::Status(self.status())),
            Request::Reload {} => Ok(match self.reload("control socket") {
                Ok(message) => Response::Reloaded {
                    agents: self
                        .policies
                        .iter()
                        .map(|p| p.agent().to_string())
                        .collect(),
                    message,
                },
                Err(message) => Response::Error { message },
            }),
            Request::Events { agent, .. } => Ok(Response::Events {
                history: self
                    .history
                    .iter()
                    .filter(|e| agent.as_ref().is_none_or(|want| *want == e.0))
                    .filter_map(|e| serde_json::from_str(&e.1).ok())
                    .collect(),
            }),
            Request::TaskStart {
                agent,
                task,
                allow_connect,
                allow_exec,
                ttl_ms,
                pid: target,
            } => self.task_start(&agent, &task, &allow_connect, &allow_exec, ttl_ms, target),
            Request::TaskEnd { agent, task } => self.task_end(&agent, &task),
            Request::TaskNarrow {
                agent,
                task,
                keep_connect,
                keep_exec,
                ttl_ms,
            } => self.task_narrow(&agent, &task, &keep_connect, &keep_exec, ttl_ms),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(pid, "control request refused: {e:#}");
            Response::Error {
                message: format!("{e:#}"),
            }
        })
    }

    /// A refused control request goes to journald (ACTION=control, VERDICT=denied) under the
    /// caller's own agent when it is one, else under the agent it asked about.
    fn report_refusal(
        &mut self,
        request: &Request,
        peer: &Peer,
        inside: Option<(String, String)>,
        why: &str,
    ) {
        let (agent, task) = inside.clone().unwrap_or_else(|| {
            request
                .target()
                .map(|(a, t)| (a.to_string(), t.to_string()))
                .unwrap_or_else(|| ("?".into(), "?".into()))
        });
        let target = request
            .target()
            .map(|(a, t)| format!(" for agent {a} task {t}"))
            .unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", peer.pid))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{}/exe", peer.pid))
            .ok()
            .map(|p| p.display().to_string());
        tracing::warn!(
            pid = peer.pid,
            uid = peer.uid,
            "control request {} refused: {why}",
            request.op()
        );
        let action = Action {
            time: SystemTime::now(),
            spiffe_id: self.spiffe_id(&agent),
            chain: self.procs.chain(peer.pid, &comm),
            agent,
            task,
            verdict: Verdict::Denied,
            pid: peer.pid,
            uid: peer.uid,
            comm,
            exe,
            object: Object::Control,
            enforcement: Some("refused"),
            reason: format!("{}{target} refused: {why}", request.op()),
        };
        self.report(action);
    }

    /// Which agent process `pid` is, in the kernel's order: its own `run` cgroup, its tag, a
    /// selected ancestor cgroup, its uid.
    fn identify(&self, pid: u32) -> Option<ProcessIdentity> {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|c| identity::peer::parse_cgroup_v2(&c));
        if let Some((agent, task)) = cgroup
            .as_deref()
            .and_then(identity::peer::run_cgroup_identity)
        {
            // By the stable id, so a process whose agent lost its policy is still inside it.
            let number = self.registry.find(agent, task).unwrap_or(common::TASK_NONE);
            let mode = self
                .policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value());
            return Some(ProcessIdentity {
                slot: AgentSlot {
                    agent: agent_id(agent),
                    mode,
                    task: number,
                    source: common::SOURCE_RUN,
                },
                in_run_cgroup: true,
            });
        }
        let by_selector = self
            .kernel
            .thread_tag(pid)
            .or_else(|| cgroup.as_deref().and_then(|c| self.selected.by_cgroup(c)))
            .or_else(|| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let uid = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                self.selected.by_uid(uid)
            });
        by_selector.map(|slot| ProcessIdentity {
            slot,
            in_run_cgroup: false,
        })
    }

    /// (agent, task) names of an identity (`slot.agent` is the stable id).
    fn names(&self, slot: &AgentSlot) -> (String, String) {
        let agent = self
            .policies
            .iter()
            .map(|p| p.agent())
            .chain(self.tasks.values().map(|t| t.agent.as_str()))
            .chain(self.registry.get(slot.task).map(|t| t.agent.as_str()))
            .find(|a| agent_id(a) == slot.agent)
            .map_or_else(|| format!("agent-{:08x}", slot.agent), str::to_string);
        let task = self
            .registry
            .get(slot.task)
            .map_or_else(|| "none".to_string(), |t| t.name.clone());
        (agent, task)
    }

    fn spiffe_id(&self, agent: &str) -> String {
        format!("spiffe://{}/agent/{agent}", self.trust_domain)
    }

    fn agent_slot(&mut self, agent: &str, task: &str, source: u32) -> anyhow::Result<AgentSlot> {
        if self.policies.get(agent).is_none() {
            let known: Vec<&str> = self.policies.iter().map(|p| p.agent()).collect();
            bail!(
                "no policy for agent {agent:?} in {} (agents with a policy: {})",
                self.policies_dir.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        identity::check_task_id(task).map_err(anyhow::Error::msg)?;
        let policy = self.policies.get(agent).context("policy vanished")?;
        Ok(AgentSlot {
            agent: agent_id(agent),
            mode: policy.mode().kernel_value(),
            task: self.registry.number(agent, task),
            source,
        })
    }

    /// A call `run`'s seccomp filter caught, reported by that `run`. Only the `run` process this
    /// daemon placed may report, for its own task and its own processes; identity comes from the
    /// placement, never from the report, and the record is only ever denied or alert.
    fn on_caught(&mut self, peer_pid: u32, c: control::CaughtReport) -> anyhow::Result<()> {
        let Some(&cgroup_id) = self.placed.get(&peer_pid) else {
            bail!("pid {peer_pid} is not an `agent-monitor run` this daemon placed");
        };
        let Some(entry) = self.tasks.get(&cgroup_id) else {
            bail!("the task pid {peer_pid} was placed in is gone");
        };
        let (agent, task) = (entry.agent.clone(), entry.task.clone());
        let chain = self.procs.chain(c.pid, &c.comm);
        // A process the table knows must descend from that `run`.
        if chain.len() > 1 && chain[0].pid != peer_pid {
            bail!(
                "pid {} is not a process of the task `run` {peer_pid} started",
                c.pid
            );
        }
        let process_target = |syscall: &String, target: &control::CaughtTarget, signal| {
            let (agent, task) = self.target_agent(target).unzip();
            crate::action::ProcessTarget {
                syscall: syscall.clone(),
                signal,
                pid: target.pid,
                comm: target.comm.clone(),
                agent,
                task,
            }
        };
        let (object, reason) = match &c.call {
            control::CaughtCall::Socket {
                family,
                sock_type,
                protocol,
            } => (
                Object::Socket(event::socket_description(
                    *family as u16,
                    *sock_type,
                    *protocol,
                )),
                "a socket family the cgroup hooks cannot judge (vsock, packet…): agents keep \
                 unix, inet, inet6 and netlink (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::Socketcall { op } => (
                Object::Socket(format!("socketcall op {op} (i386)")),
                "i386 socketcall keeps its arguments in user memory, out of the filter's \
                 reach (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::IoUringSetup => (
                Object::IoUring("io_uring_setup".to_string()),
                "io_uring creates sockets without the socket system call (seccomp filter of \
                 `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::Bpf => (
                Object::Seccomp("bpf".to_string()),
                "bpf(2) from a root agent: pinned maps open by file permission alone, and uid 0 \
                 owns them (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::SeccompListener => (
                Object::Seccomp("seccomp listener".to_string()),
                "a seccomp notification listener would let the agent answer the calls the \
                 `run` filter catches: always refused"
                    .to_string(),
            ),
            control::CaughtCall::ProcessAccess { syscall, target } => (
                Object::Ptrace(process_target(syscall, target, None)),
                self.reach_reason(target, "reach into"),
            ),
            control::CaughtCall::Signal {
                syscall,
                target,
                signal,
            } => (
                Object::Signal(process_target(syscall, target, Some(*signal))),
                self.reach_reason(target, "signal"),
            ),
            control::CaughtCall::Other { name } => (
                Object::Seccomp(name.clone()),
                if name.starts_with("ioctl ") {
                    "typing into the terminal the agent shares with whoever started it (read as \
                     that shell's next command): always refused (seccomp filter of \
                     `agent-monitor run`)"
                        .to_string()
                } else {
                    "caught by the seccomp filter of `agent-monitor run`".to_string()
                },
            ),
        };
        let verdict = if c.refused {
            Verdict::Denied
        } else {
            Verdict::Alert
        };
        if matches!(object, Object::Socket(_)) {
            self.counters.sockets_refused += 1;
        }
        self.counters.seccomp_caught += 1;
        let subject = event::Subject {
            cgroup_id,
            pid: c.pid,
            tid: c.pid,
            uid: c.uid,
            comm: c.comm.clone(),
            ..event::Subject::unknown()
        };
        let action = Action {
            exe: c.exe.or_else(|| self.procs.exe(c.pid).map(str::to_string)),
            enforcement: c.refused.then_some("eperm"),
            reason,
            chain,
            ..self.action(&subject, agent, task, object, verdict)
        };
        self.report(action);
        Ok(())
    }

    /// The agent and task a process that an agent tried to reach belongs to, from what `run`
    /// read while the call waited (its cgroup and uid); the pid only for a selector's thread tag.
    fn target_agent(&self, t: &control::CaughtTarget) -> Option<(String, String)> {
        if t.supervisor {
            return None;
        }
        if let Some((agent, task)) = t
            .cgroup
            .as_deref()
            .and_then(identity::peer::run_cgroup_identity)
        {
            return Some((agent.to_string(), task.to_string()));
        }
        let slot = self
            .kernel
            .thread_tag(t.pid)
            .or_else(|| t.cgroup.as_deref().and_then(|c| self.selected.by_cgroup(c)))
            .or_else(|| t.uid.and_then(|u| self.selected.by_uid(u)))?;
        Some(self.names(&slot))
    }

    /// Why a ptrace-family call or a signal to `t` was refused, in words.
    fn reach_reason(&self, t: &control::CaughtTarget, verb: &str) -> String {
        let whose = if t.supervisor {
            "the agent's own `agent-monitor run` (its seccomp supervisor)".to_string()
        } else {
            match self.target_agent(t) {
                Some((agent, task)) => format!("a process of agent {agent} task {task}"),
                None => "a process outside every agent".to_string(),
            }
        };
        format!(
            "an agent may {verb} only processes of its own task; pid {} ({}) is {whose} \
             (seccomp filter and Landlock scope of `agent-monitor run`)",
            t.pid, t.comm
        )
    }

    /// Keeps what placed process `pid` said its command holds, for `status`; a command that
    /// kept every capability of root is worth a warning (it can undo its own confinement).
    fn note_privileges(
        &mut self,
        agent: &str,
        task: &str,
        pid: u32,
        privileges: Option<control::Privileges>,
    ) {
        if let Some(p) = privileges.as_ref().filter(|p| p.kept_all) {
            let msg = format!(
                "agent {agent} task {task}: `run` {pid} started its command with every capability \
                 of root (--keep-capabilities, uid {}): it can leave or undo its own confinement \
                 and other agents'",
                p.uid
            );
            tracing::warn!("{msg}");
            journald::event(
                message_id::CAPABILITIES_KEPT,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    ("AGENT_ID", agent.to_string()),
                    ("TASK_ID", task.to_string()),
                    ("RUN_PID", pid.to_string()),
                    ("AGENT_UID", p.uid.to_string()),
                ],
            );
        }
        self.placed_privileges.insert(pid, privileges);
    }

    /// Makes `pid` a process of `agent`, task `task`; with `user` (`run --user`), binds that uid
    /// to the agent. Returns the task cgroup and warnings for `run`.
    fn place(
        &mut self,
        agent: &str,
        task: &str,
        pid: u32,
        user: Option<u32>,
        unscoped: Option<String>,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let slot = self.agent_slot(agent, task, common::SOURCE_RUN)?;
        // Refused before anything changes: a uid that is root's or another agent's.
        let arm_uid = match user {
            Some(uid) => Some((
                uid,
                identity::uid_binding::may_bind(agent, uid, self.selected.uid_owner(uid))
                    .map_err(anyhow::Error::msg)?,
            )),
            None => None,
        };
        // Before the process becomes an agent: from then on its socket() calls are watched.
        // Sticky for the daemon's life (cheap to keep right; a reload recomputes it).
        if let Some(why) = unfiltered_placement(pid) {
            self.kernel.watch_socket_syscalls(Some(&why))?;
            self.socket_watch_sticky = Some(why);
        }
        let cg = self.enter_task_cgroup(agent, task, slot, pid)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        self.procs.add_root(pid, exe, identity::proc_args(pid));
        self.placed.insert(pid, cg.id);
        tracing::info!(agent, task, pid, cgroup = %cg.path.display(), "agent process placed");
        if let Some(why) = unscoped {
            tracing::warn!(
                agent,
                task,
                pid,
                "`run` could not scope its command to its own processes: {why}"
            );
            self.unscoped_runs.insert(pid, (cg.id, why));
        }
        let warnings = match arm_uid {
            Some((uid, arm)) => self.bind_uid(agent, uid, pid, arm)?,
            None => Vec::new(),
        };
        Ok((cg.path.display().to_string(), warnings))
    }

    /// Moves `pid` into the (agent, task) cgroup, creating it and its identity entry first.
    fn enter_task_cgroup(
        &mut self,
        agent: &str,
        task: &str,
        slot: AgentSlot,
        pid: u32,
    ) -> anyhow::Result<identity::TaskCgroup> {
        let cg = self.cgroups.task(agent, task)?;
        // The identity entry exists before the process enters the cgroup: no unjudged window.
        self.check_identity_room();
        // A failed insert (map full) refuses the placement: the command never runs ungoverned.
        self.kernel.add_agent_cgroup(cg.id, slot)?;
        self.tasks.insert(
            cg.id,
            TaskEntry {
                agent: agent.to_string(),
                task: task.to_string(),
                path: cg.path.clone(),
            },
        );
        self.cgroups.place(&cg, pid)?;
        Ok(cg)
    }

    /// Grants `task` of `agent` what is given (added to what it has; all its grants then share
    /// the new expiry) and optionally moves process `target` into it.
    fn task_start(
        &mut self,
        agent: &str,
        task: &str,
        connect: &[String],
        exec: &[String],
        ttl_ms: Option<u64>,
        target: Option<u32>,
    ) -> anyhow::Result<Response> {
        if task == UNVERIFIED_TASK {
            bail!(
                "task {UNVERIFIED_TASK:?} holds processes of an executable whose digest did not match; it is never granted anything"
            );
        }
        if let Some(ms) = ttl_ms {
            identity::tasks::check_ttl_ms(ms).map_err(anyhow::Error::msg)?;
        }
        let slot = self.agent_slot(agent, task, common::SOURCE_TASK_SWITCH)?;
        let (mut net, mut execs) =
            crate::policy::parse_grants(connect, exec).map_err(anyhow::Error::msg)?;
        let old = self
            .registry
            .get_mut(slot.task)
            .and_then(|t| t.grants.take());
        if let Some(old) = &old {
            net.extend(old.net.iter().cloned());
            execs.extend(old.exec.iter().cloned());
        }
        let now = monotonic_ns();
        let expires_ns = ttl_ms.map_or(u64::MAX, |ms| {
            now.saturating_add(ms.saturating_mul(1_000_000))
        });
        let kernel_tables = crate::policy::compile_grants(slot.task, task, &net, &execs)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // New entries first (same keys are overwritten), then the old keys that are gone: no
        // moment in which a grant that continues is missing.
        self.kernel
            .set_task_grants(&kernel_tables, common::Expiry { expires_ns })?;
        if let Some(old) = &old {
            let stale = stale_entries(&old.kernel, &kernel_tables);
            self.kernel.remove_task_grants(&stale)?;
        }
        let texts = grant_texts(&net, &execs);
        if let Some(t) = self.registry.get_mut(slot.task) {
            t.grants = (!net.is_empty() || !execs.is_empty()).then(|| identity::tasks::Grants {
                net,
                exec: execs,
                expires_ns,
                kernel: kernel_tables,
            });
        }
        self.grant_file.save(&self.registry);
        let moved = match target {
            Some(pid) => {
                self.move_into_task(agent, task, slot, pid)?;
                Some(pid)
            }
            None => None,
        };
        tracing::info!(agent, task, grants = ?texts, ttl_ms, moved, "task started");
        Ok(Response::TaskStarted {
            agent: agent.to_string(),
            task: task.to_string(),
            grants: texts,
            expires_in_ms: ttl_ms,
            moved,
        })
    }

    /// Moves process `pid` (an agent process of `agent`) into `task`: a `run` process changes
    /// cgroup; a selector-identified one has every thread re-tagged (its later children inherit).
    fn move_into_task(
        &mut self,
        agent: &str,
        task: &str,
        slot: AgentSlot,
        pid: u32,
    ) -> anyhow::Result<()> {
        let Some(id) = self.identify(pid) else {
            bail!(
                "process {pid} is not an agent process; `task start --pid` moves processes of the agent only"
            );
        };
        if id.slot.agent != slot.agent {
            let (other, _) = self.names(&id.slot);
            bail!("process {pid} is agent {other}, not {agent}");
        }
        if id.in_run_cgroup {
            let slot = AgentSlot {
                source: common::SOURCE_RUN,
                ..slot
            };
            self.enter_task_cgroup(agent, task, slot, pid)?;
        } else {
            self.selected.tags_in_use = true;
            self.kernel.set_identity_config(self.selected.config())?;
            let threads: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .with_context(|| format!("listing the threads of {pid}"))?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            for tid in threads {
                self.kernel.tag_thread(tid, slot)?;
            }
        }
        tracing::info!(agent, task, pid, "process moved into task");
        Ok(())
    }

    /// Ends `task` of `agent`: its grants leave the kernel now.
    fn task_end(&mut self, agent: &str, task: &str) -> anyhow::Result<Response> {
        let Some(number) = self.registry.find(agent, task) else {
            bail!("agent {agent:?} has no task {task:?}");
        };
        let revoked = self.revoke(number)?;
        tracing::info!(agent, task, revoked, "task ended");
        Ok(Response::TaskEnded {
            agent: agent.to_string(),
            task: task.to_string(),
            revoked,
        })
    }

    /// Narrows `task` of `agent` to a subset of its grants, ending no later than before.
    fn task_narrow(
        &mut self,
        agent: &str,
        task: &str,
        keep_connect: &[String],
        keep_exec: &[String],
        ttl_ms: Option<u64>,
    ) -> anyhow::Result<Response> {
        if let Some(ms) = ttl_ms {
            identity::tasks::check_ttl_ms(ms).map_err(anyhow::Error::msg)?;
        }
        let Some(number) = self.registry.find(agent, task) else {
            bail!("agent {agent:?} has no task {task:?}");
        };
        let Some(old) = self.registry.get(number).and_then(|t| t.grants.clone()) else {
            bail!("task {task:?} of agent {agent:?} has no grants to narrow");
        };
        let now = monotonic_ns();
        let wanted = ttl_ms.map(|ms| now.saturating_add(ms.saturating_mul(1_000_000)));
        let (net, exec, expires_ns) =
            identity::tasks::narrow(&old, keep_connect, keep_exec, wanted)
                .map_err(anyhow::Error::msg)?;
        let tables = crate::policy::compile_grants(number, task, &net, &exec)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Kept entries are rewritten with the (possibly earlier) expiry, then the rest removed.
        self.kernel
            .set_task_grants(&tables, common::Expiry { expires_ns })?;
        self.kernel
            .remove_task_grants(&stale_entries(&old.kernel, &tables))?;
        let texts = grant_texts(&net, &exec);
        if let Some(t) = self.registry.get_mut(number) {
            t.grants = (!texts.is_empty()).then(|| identity::tasks::Grants {
                net,
                exec,
                expires_ns,
                kernel: tables,
            });
        }
        self.grant_file.save(&self.registry);
        tracing::info!(agent, task, grants = ?texts, "task narrowed");
        Ok(Response::TaskNarrowed {
            agent: agent.to_string(),
            task: task.to_string(),
            grants: texts,
            expires_in_ms: (expires_ns != u64::MAX)
                .then(|| expires_ns.saturating_sub(now) / 1_000_000),
        })
    }

    /// Removes the grants of task `number`; returns how many there were.
    fn revoke(&mut self, number: u32) -> anyhow::Result<usize> {
        let Some(grants) = self.registry.get_mut(number).and_then(|t| t.grants.take()) else {
            return Ok(0);
        };
        // The file first: if the kernel update fails, a restart then revokes (never re-grants).
        self.grant_file.save(&self.registry);
        self.kernel.remove_task_grants(&grants.kernel)?;
        Ok(grants.net.len() + grants.exec.len())
    }

    /// Arms what selectors can be armed, re-verifies changed executables, writes the kernel's
    /// selector configuration and reports what changed.
    fn arm_selectors(&mut self) {
        let registry = &mut self.registry;
        let report = self
            .selected
            .arm(&mut self.kernel, &self.cgroup_root, |agent| AgentSlot {
                agent: agent_id(agent),
                mode: common::MODE_ENFORCE,
                task: registry.number(agent, UNVERIFIED_TASK),
                source: common::SOURCE_EXECUTABLE,
            });
        if let Err(e) = self.kernel.set_identity_config(self.selected.config()) {
            tracing::error!("writing the selector configuration: {e:#}");
        }
        for a in report.armed {
            tracing::info!("selector armed: {a}");
        }
        for w in report.waiting {
            tracing::info!("selector waiting: {w}");
        }
        for r in report.restored {
            tracing::warn!("selector verified again: {r}");
        }
        for e in report.errors {
            tracing::error!("selector not armed: {e}");
        }
        for (agent, uid) in report.uids_armed {
            let found = identity::uid_binding::outsiders(uid, &agent);
            if let Some(w) =
                identity::uid_binding::outsiders_warning(uid, &agent, "a `uids` selector", &found)
            {
                tracing::warn!(uid, agent, "{w}");
            }
        }
        for (agent, m) in report.mismatches {
            tracing::error!(agent, "executable selector digest mismatch: {m}");
            let action = Action {
                time: SystemTime::now(),
                spiffe_id: self.spiffe_id(&agent),
                agent,
                task: UNVERIFIED_TASK.to_string(),
                verdict: Verdict::Alert,
                pid: std::process::id(),
                uid: 0,
                comm: "agent-monitor".into(),
                exe: None,
                object: Object::Identity,
                chain: Vec::new(),
                enforcement: None,
                reason: format!("executable selector digest mismatch: {m}"),
            };
            self.report(action);
        }
    }

    /// Warns (once per crossing) when the identity map nears its capacity; when it is full,
    /// placements are refused rather than run ungoverned.
    fn check_identity_room(&mut self) {
        let used = self.tasks.len() as u64;
        let cap = u64::from(common::MAX_AGENT_CGROUPS);
        let high = used * 100 >= cap * IDENTITY_WARN_PERCENT;
        if high && !self.identity_warned {
            tracing::warn!(
                used,
                capacity = cap,
                "the agent identity map is nearly full; new agent tasks will be refused when it is"
            );
        }
        self.identity_warned = high;
        // The tag map holds every thread only while pid_max fits in it (it was sized at load);
        // a pid_max raised since then could let a fork flood fill it.
        let tag_room = self
            .kernel
            .occupancy()
            .ok()
            .and_then(|o| o.into_iter().find(|m| m.map == "PROCESS_AGENTS"))
            .map(|m| m.capacity);
        let pid_max = crate::host::pid_max().map(u64::from);
        let short = matches!((tag_room, pid_max), (Some(c), Some(p)) if p > c);
        if short && !self.tag_room_warned {
            tracing::error!(
                pid_max,
                capacity = tag_room,
                "kernel.pid_max was raised above the thread-tag map's capacity: a fork flood of a \
                 selector-identified agent could now fill it; restart after `agent-monitor daemon \
                 --uninstall` to resize"
            );
        }
        self.tag_room_warned = short;
    }

    fn sweep(&mut self) {
        if let Err(e) = self.kernel.heartbeat() {
            tracing::warn!("heartbeat: {e:#}");
        }
        self.outputs.close_storms(SystemTime::now());
        let now = monotonic_ns();
        self.procs.prune(now, KEEP_EXITED.as_nanos() as u64);
        self.expire_learned();
        // A package upgrade replaces a file (new inode): follow it.
        let change = self.exec_files.refresh(&self.policies, self.bank_base);
        if !change.add.is_empty() || !change.remove.is_empty() {
            tracing::info!(
                added = change.add.len(),
                removed = change.remove.len(),
                "files named by exact exec rules changed"
            );
            if let Err(e) = self.kernel.update_exec_files(&change.add, &change.remove) {
                tracing::warn!("{e:#}");
            }
        }
        // The kernel already refuses expired grants; this only tidies the maps.
        for number in self.registry.expired(now) {
            let names = self
                .registry
                .get(number)
                .map(|t| (t.agent.clone(), t.name.clone()));
            match self.revoke(number) {
                Ok(n) => {
                    tracing::info!(task = ?names, grants = n, "task grants expired and removed")
                }
                Err(e) => tracing::warn!("removing expired grants of {names:?}: {e:#}"),
            }
        }
        self.arm_selectors();
        self.report_kernel_losses();
        let gone: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| AgentCgroups::remove_if_empty(&t.path))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Err(e) = self.kernel.remove_agent_cgroup(id) {
                tracing::warn!("{e:#}");
            }
            if let Some(t) = self.tasks.remove(&id) {
                tracing::info!(
                    agent = t.agent,
                    task = t.task,
                    "task ended: no process left"
                );
            }
        }
    }

    /// Logs what the kernel could not hand over since the last look, once per interval with the
    /// count: the records are gone, but nobody should learn it from `status` alone.
    fn report_kernel_losses(&mut self) {
        let k = match self.kernel.counters() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("reading kernel counters: {e:#}");
                return;
            }
        };
        let grown = |now: u64, before: &mut u64| std::mem::replace(before, now) < now;
        let lost = k[common::COUNTER_RECORDS_LOST as usize];
        let actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
        if lost > self.counters.lost_records {
            let msg = format!(
                "{} kernel records lost (ring buffer full), {} of them agent actions: their \
                 verdicts were enforced but they are not reported ({lost} lost in total)",
                lost - self.counters.lost_records,
                actions_lost.saturating_sub(self.counters.actions_lost)
            );
            tracing::warn!("{msg}");
            journald::event(
                message_id::RECORDS_LOST,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    (
                        "LOST_RECORDS",
                        (lost - self.counters.lost_records).to_string(),
                    ),
                    ("LOST_TOTAL", lost.to_string()),
                ],
            );
        }
        self.counters.lost_records = lost;
        self.counters.actions_lost = actions_lost;
        if grown(
            k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize],
            &mut self.counters.alerts_refused_unrecordable,
        ) {
            tracing::warn!(
                total = self.counters.alerts_refused_unrecordable,
                "alert-mode agents' off-list actions were refused because the ring buffer could \
                 not take their records (an off-list action never happens unrecorded)"
            );
        }
        self.counters.grants_expired_in_kernel = k[common::COUNTER_GRANTS_EXPIRED as usize];
        // Identity anomalies: logged when they grow, always counted.
        if grown(
            k[common::COUNTER_TAGS_FULL as usize],
            &mut self.counters.tags_full,
        ) {
            tracing::error!(
                total = self.counters.tags_full,
                "processes could not be tagged (PROCESS_AGENTS full): they are not treated as agents"
            );
        }
        if grown(
            k[common::COUNTER_SELECTOR_CONFLICTS as usize],
            &mut self.counters.selector_conflicts,
        ) {
            tracing::warn!(
                total = self.counters.selector_conflicts,
                "a process exec'd another agent's selected executable; it stays with the agent that holds it by a higher-ranked selector"
            );
        }
        self.counters.source_routed_packets = k[common::COUNTER_SOURCE_ROUTED as usize];
        self.counters.dns_no_proxy = k[common::COUNTER_DNS_NO_PROXY as usize];
        self.counters.dns_orig_missing = k[common::COUNTER_DNS_ORIG_MISSING as usize];
    }

    fn on_event(&mut self, ev: Result<KernelEvent, event::DecodeError>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                self.counters.undecodable_records += 1;
                // Logged for the first ones, then once per 1000: counted always.
                if self.decode_errors_logged < 5
                    || self.counters.undecodable_records.is_multiple_of(1000)
                {
                    self.decode_errors_logged += 1;
                    tracing::warn!(
                        total = self.counters.undecodable_records,
                        "undecodable kernel record: {e}"
                    );
                }
                return;
            }
        };
        match ev {
            KernelEvent::Fork { subject, child } => {
                self.procs.on_fork(subject.pid, child, &subject.comm)
            }
            KernelEvent::Exit { subject } => {
                self.procs.on_exit(subject.pid, subject.ktime_ns);
                // Its pid may be reused: no longer a `run` that may report.
                self.placed.remove(&subject.pid);
                self.unscoped_runs.remove(&subject.pid);
                self.placed_privileges.remove(&subject.pid);
            }
            KernelEvent::Tagged {
                subject,
                path,
                retagged_from,
            } => {
                let (agent, task) = self.names(&tagged_identity(&subject));
                tracing::info!(
                    agent,
                    task,
                    pid = subject.pid,
                    path,
                    "process became an agent by its executable selector"
                );
                if let Some(prior) = retagged_from {
                    let was = self.names(&tagged_identity_of(prior)).0;
                    let why = format!(
                        "selector conflict: pid {} was agent {was} (uid selector) and exec'd {path}, selected by agent {agent}; the executable selector outranks the uid selector, so it is now agent {agent}",
                        subject.pid
                    );
                    self.report_conflict(&subject, agent, task, path.clone(), why);
                }
                self.procs
                    .add_root(subject.pid, path, identity::proc_args(subject.pid));
            }
            KernelEvent::ClaimRefused {
                subject,
                path,
                claimed_by,
            } => {
                let (agent, task) = self.names(&tagged_identity(&subject));
                let claimant = self.names(&tagged_identity_of(claimed_by)).0;
                let why = format!(
                    "selector conflict: pid {} exec'd {path}, selected by agent {claimant}, but it is agent {agent} by a higher-ranked identity ({}); it stays agent {agent}",
                    subject.pid,
                    source_name(subject.source)
                );
                self.report_conflict(&subject, agent, task, path, why);
            }
            KernelEvent::Exec(e) => {
                self.procs
                    .on_exec(e.subject.pid, &e.path, identity::proc_args(e.subject.pid));
                let action = self.exec_action(&e);
                self.report(action);
            }
            KernelEvent::Connect(c) => {
                let action = self.connect_action(&c);
                self.report(action);
            }
            KernelEvent::Socket(sk) => {
                let action = self.socket_action(&sk);
                self.report(action);
            }
            KernelEvent::SourceRoute(r) => {
                let action = self.source_route_action(&r);
                self.report(action);
            }
            KernelEvent::DnsRedirect(c) => {
                let (agent, _) = self.identity(&c.subject);
                if c.dns_refused {
                    let server = Destination {
                        addr: c.addr,
                        port: c.port,
                        transport: event::transport(c.sock_type),
                    };
                    let query = DnsQuery {
                        name: None,
                        server: Some(server),
                    };
                    let action = Action {
                        enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
                        reason: "DNS traffic, and the agent has no DNS proxy endpoint for this \
                                 address family"
                            .into(),
                        ..self.subject_action(&c.subject, Object::Dns(query), c.verdict)
                    };
                    self.report(action);
                } else {
                    self.dns_clients.insert(agent, c);
                }
            }
        }
    }

    /// A process two agents claimed: resolved by precedence in the kernel, reported here as
    /// ACTION=identity VERDICT=alert (PRIORITY err) so the operator fixes the selectors.
    fn report_conflict(
        &mut self,
        subject: &event::Subject,
        agent: String,
        task: String,
        path: String,
        why: String,
    ) {
        tracing::warn!("{why}");
        let action = Action {
            exe: Some(path),
            reason: why,
            ..self.action(subject, agent, task, Object::Identity, Verdict::Alert)
        };
        self.report(action);
    }

    /// Reports one query the DNS proxy judged; for an allowed answer, first installs its
    /// addresses in the kernel and tells the proxy it may reply.
    fn on_dns(&mut self, r: QueryReport) {
        let policy = self
            .dns_proxies
            .endpoints()
            .get(r.agent as usize)
            .and_then(|(name, _)| self.policies.get(name));
        let Some(policy) = policy else {
            tracing::error!(
                agent = r.agent,
                "DNS report for an unknown agent index (or an agent a reload removed)"
            );
            return;
        };
        let agent = policy.agent().to_string();
        let enforce = policy.mode() == crate::policy::model::Mode::Enforce;
        // The DNS-rebinding opt-in for the name asked, if the policy has one.
        let private_ok = policy.private_answers_for(&r.name).map(str::to_string);
        self.counters.dns_queries += 1;
        let (verdict, enforcement, reason) = match r.outcome {
            Outcome::Refused { reason } => {
                self.counters.dns_refused += 1;
                (Verdict::Denied, Some("refused"), reason)
            }
            Outcome::Malformed { reason } => {
                self.counters.dns_malformed += 1;
                (
                    Verdict::Denied,
                    Some("not forwarded"),
                    format!("{reason}; not forwarded"),
                )
            }
            Outcome::Overloaded => {
                self.counters.dns_overloaded += 1;
                (
                    Verdict::Denied,
                    Some("servfail"),
                    "too many queries of this agent in flight; answered SERVFAIL unjudged".into(),
                )
            }
            Outcome::UpstreamFailed { allowed, reason } => {
                self.counters.dns_upstream_failures += 1;
                tracing::warn!(
                    agent,
                    name = r.name,
                    "DNS upstream failed: {reason}; answered SERVFAIL"
                );
                let verdict = if allowed {
                    Verdict::Allowed
                } else {
                    Verdict::Alert
                };
                (
                    verdict,
                    Some("servfail"),
                    format!("{reason}; answered SERVFAIL"),
                )
            }
            Outcome::Answered {
                allowed,
                reason,
                rcode,
                addrs,
                cnames,
                ports,
                installed,
            } => {
                let chain = if cnames.is_empty() {
                    String::new()
                } else {
                    format!(" via CNAME {}", cnames.join(" > "))
                };
                let list = crate::dns::brief_list(
                    addrs.iter().map(|(a, ttl)| format!("{a} (ttl {ttl}s)")),
                );
                if allowed {
                    // DNS rebinding: a non-public address is not learned unless the policy lets
                    // this name answer with one.
                    let host = crate::dns::scope::host_addresses();
                    let (private, public): (Vec<_>, Vec<_>) = addrs.iter().partition(|(a, _)| {
                        private_ok.is_none()
                            && crate::dns::scope::non_public_here(*a, &host).is_some()
                    });
                    let result = self.install(r.agent, &r.name, &reason, &public, &ports);
                    let result = result.map(|over_limit| {
                        let private: Vec<IpAddr> = private.iter().map(|(a, _)| *a).collect();
                        self.withheld(&agent, &r.name, &private, &over_limit, enforce);
                        let limit_reached = !over_limit.is_empty();
                        let mut strip = private;
                        strip.extend(over_limit);
                        (strip, limit_reached)
                    });
                    if let Some(tx) = installed {
                        let _ = tx.send(match &result {
                            Ok((strip, limit_reached)) => Ok(crate::dns::Installed {
                                strip: if enforce { strip.clone() } else { Vec::new() },
                                limit_reached: *limit_reached,
                            }),
                            Err(e) => Err(e.clone()),
                        });
                    }
                    match result {
                        Ok((strip, limit_reached)) if !strip.is_empty() => {
                            let learned = crate::dns::brief_list(
                                addrs
                                    .iter()
                                    .filter(|(a, _)| !strip.contains(a))
                                    .map(|(a, ttl)| format!("{a} (ttl {ttl}s)")),
                            );
                            let why = if limit_reached {
                                "over the agent's learned-address limit or non-public"
                            } else {
                                "non-public, and no dns.private_answers entry covers the name"
                            };
                            let withheld =
                                crate::dns::brief_list(strip.iter().map(ToString::to_string));
                            let text = format!(
                                "{reason}; {rcode}{chain}; learned [{learned}]; not learned ({why}): [{withheld}]"
                            );
                            if !enforce {
                                (
                                    Verdict::Alert,
                                    None,
                                    format!("{text} (alert mode: answered unchanged)"),
                                )
                            } else if addrs.iter().all(|(a, _)| strip.contains(a)) {
                                let (code, verdict) = if limit_reached {
                                    ("servfail", "answered SERVFAIL")
                                } else {
                                    ("refused", "answered REFUSED")
                                };
                                (Verdict::Denied, Some(code), format!("{text}; {verdict}"))
                            } else {
                                (
                                    Verdict::Allowed,
                                    Some("stripped"),
                                    format!("{text}; taken out of the reply"),
                                )
                            }
                        }
                        Ok(_) => (
                            Verdict::Allowed,
                            None,
                            format!("{reason}; {rcode}{chain}; learned [{list}]"),
                        ),
                        Err(e) => {
                            self.counters.dns_install_failures += 1;
                            tracing::error!(agent, name = r.name, "{e}; answered SERVFAIL");
                            (
                                Verdict::Allowed,
                                Some("servfail"),
                                format!("{reason}; not installed: {e}; answered SERVFAIL"),
                            )
                        }
                    }
                } else {
                    (
                        Verdict::Alert,
                        None,
                        format!(
                            "{reason} (alert mode: forwarded); {rcode}{chain}; answer [{list}] not learned"
                        ),
                    )
                }
            }
        };
        let client = self.dns_clients.get(&agent).cloned();
        let query = DnsQuery {
            name: Some(r.name),
            server: client.as_ref().map(|c| Destination {
                addr: c.addr,
                port: c.port,
                transport: r.transport,
            }),
        };
        let base = match &client {
            Some(c) => self.subject_action(&c.subject, Object::Dns(query), verdict),
            None => Action {
                agent: agent.clone(),
                task: "?".into(),
                ..self.subject_action(&event::Subject::unknown(), Object::Dns(query), verdict)
            },
        };
        let action = Action {
            enforcement,
            reason: format!("{} query: {reason}", r.qtype),
            ..base
        };
        self.report(action);
    }

    /// Writes every address of an allowed answer into the agent's kernel allowlist, until its TTL
    /// plus the grace, as far as the agent's learned-address limit allows; returns the addresses
    /// over the limit (not learned). On a failure the table forgets what the kernel does not hold.
    fn install(
        &mut self,
        agent: u32,
        name: &str,
        rule: &str,
        addrs: &[&(IpAddr, u32)],
        ports: &[common::PortRange],
    ) -> Result<Vec<IpAddr>, String> {
        let mut over_limit = Vec::new();
        let now = monotonic_ns();
        for &&(addr, ttl) in addrs {
            let grant = Grant {
                name: name.to_string(),
                rule: rule.to_string(),
                expires_ns: now
                    .saturating_add(u64::from(ttl).saturating_mul(1_000_000_000))
                    .saturating_add(self.dns_grace_ns),
                ports: ports.to_vec(),
            };
            let Ok(value) = self.learned.learn(agent, addr, grant, now) else {
                over_limit.push(addr);
                continue;
            };
            let written = match self.dns_kernel_index(agent) {
                Some(k) => self.kernel.write_learned(k, addr, &value),
                None => Err(anyhow::anyhow!("the agent has no policy any more")),
            };
            if let Err(e) = written {
                self.learned.unlearn(agent, addr, name);
                return Err(format!("{e:#}"));
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
        Ok(over_limit)
    }

    /// Counts and reports addresses of an allowed answer that `agent` was not given: a journald
    /// notice (rate-limited per agent and kind; the counters and the query's own entry have
    /// every one).
    fn withheld(
        &mut self,
        agent: &str,
        name: &str,
        private: &[IpAddr],
        over_limit: &[IpAddr],
        enforce: bool,
    ) {
        let index = self.dns_index(agent).unwrap_or(u32::MAX);
        let (held, limit) = (self.learned.held(index), self.learned.limit(index));
        for (kind, addrs) in [
            (crate::dns::Withheld::NonPublic, private),
            (crate::dns::Withheld::Limit, over_limit),
        ] {
            if addrs.is_empty() {
                continue;
            }
            let n = addrs.len() as u64;
            match kind {
                crate::dns::Withheld::NonPublic => self.counters.dns_withheld_non_public += n,
                crate::dns::Withheld::Limit => {
                    self.counters.dns_withheld_limit += n;
                    self.counters.dns_limit_reached += 1;
                }
            }
            *self
                .dns_withheld
                .entry((agent.to_string(), kind))
                .or_default() += n;
            let Some(unsaid) = self.dns_notices.admit(agent, kind, monotonic_ns()) else {
                continue;
            };
            let list = crate::dns::brief_list(addrs.iter().map(ToString::to_string));
            let outcome = if enforce {
                "taken out of the reply"
            } else {
                "alert mode: left in the reply, connects to them are alerts"
            };
            let msg = match kind {
                crate::dns::Withheld::NonPublic => format!(
                    "agent {agent}: {name} answered non-public addresses [{list}]; not learned                      ({outcome}); a dns.private_answers entry allows this name"
                ),
                crate::dns::Withheld::Limit => format!(
                    "agent {agent}: learned-address limit reached ({held} of {limit}); {n}                      address(es) of {name} not learned [{list}] ({outcome}); room comes back                      as learned addresses expire"
                ),
            };
            tracing::warn!("{msg}");
            journald::event(
                message_id::DNS_WITHHELD,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    ("AGENT_ID", agent.to_string()),
                    ("DNS_NAME", name.to_string()),
                    ("WITHHELD", kind.as_str().to_string()),
                    ("WITHHELD_ADDRS", list),
                    ("WITHHELD_COUNT", n.to_string()),
                    ("LEARNED", held.to_string()),
                    ("LEARNED_LIMIT", limit.to_string()),
                    ("NOTICES_SUPPRESSED", unsaid.to_string()),
                ],
            );
        }
    }

    /// The DNS proxy start-up index of `agent` (how the learned table keys it).
    fn dns_index(&self, agent: &str) -> Option<u32> {
        self.dns_proxies
            .endpoints()
            .iter()
            .position(|(a, _)| a == agent)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The kernel agent index (live bank) of the agent whose DNS proxy has start-up index `dns`.
    fn dns_kernel_index(&self, dns: u32) -> Option<u32> {
        let (name, _) = self.dns_proxies.endpoints().get(dns as usize)?;
        self.policies.index_of(name).map(|i| self.bank_base + i)
    }

    /// Removes expired learned addresses from the kernel (which already ignores them).
    fn expire_learned(&mut self) {
        for change in self.learned.expire(monotonic_ns()) {
            let result = match change {
                KernelChange::Write(agent, addr, value) => match self.dns_kernel_index(agent) {
                    Some(k) => self.kernel.write_learned(k, addr, &value),
                    None => Ok(()),
                },
                KernelChange::Remove(agent, addr) => match self.dns_kernel_index(agent) {
                    Some(k) => self.kernel.remove_learned(k, addr),
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                tracing::warn!("expiring a learned address: {e:#}");
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
    }

    /// Agent and task of an event, from the identity the kernel judged with.
    /// Records carry the allowlist index the kernel judged with (live bank, or the previous one
    /// for records judged just before a reload).
    fn identity(&self, subject: &event::Subject) -> (String, String) {
        let task = self.registry.get(subject.task);
        if task.is_none()
            && let Some(t) = self.tasks.get(&subject.cgroup_id)
        {
            return (t.agent.clone(), t.task.clone());
        }
        let agent = self
            .agent_at(subject.agent)
            .or_else(|| task.map(|t| t.agent.clone()))
            .unwrap_or_else(|| format!("agent-index-{}", subject.agent));
        let task = task.map_or_else(|| "none".to_string(), |t| t.name.clone());
        (agent, task)
    }

    /// The agent whose allowlists sit at kernel index `index`.
    fn agent_at(&self, index: u32) -> Option<String> {
        let in_bank = |base: u32| index.checked_sub(base).filter(|p| *p < BANK_STRIDE);
        let name = |set: &PolicySet, pos: u32| {
            set.policies()
                .get(pos as usize)
                .map(|p| p.agent().to_string())
        };
        if let Some(pos) = in_bank(self.bank_base) {
            return name(&self.policies, pos);
        }
        let pos = in_bank(self.bank_base ^ BANK_STRIDE)?;
        name(&self.superseded.back()?.1, pos)
    }

    /// Why a grant allowed an action: the task's grant rule that covers it.
    fn grant_reason(
        &self,
        task: u32,
        rule: impl Fn(&identity::tasks::Grants) -> Option<String>,
    ) -> String {
        match self.registry.get(task) {
            Some(t) => match t.grants.as_ref().and_then(rule) {
                Some(r) => format!("granted to task {} by `task start`: {r}", t.name),
                None => format!(
                    "granted to task {} by `task start` (grant since ended)",
                    t.name
                ),
            },
            None => "granted to an unknown task".into(),
        }
    }

    fn exec_action(&mut self, e: &event::ExecEvent) -> Action {
        let (agent, task) = self.identity(&e.subject);
        let reason = if e.granted {
            self.grant_reason(e.subject.task, |g| {
                g.exec
                    .iter()
                    .find(|r| {
                        r.matches(&e.path) || e.interpreter.as_deref().is_some_and(|i| r.matches(i))
                    })
                    .map(|r| format!("exec {}", r.text()))
            })
        } else if e.truncated {
            format!(
                "{} {} bytes cannot be matched",
                crate::action::REASON_EXEC_PATH_TOO_LONG,
                common::EXEC_PATH_LEN - 1
            )
        } else if e.unreadable {
            // The name, the interpreter or the file could not be read.
            crate::action::REASON_EXEC_PATH_UNREADABLE.to_string()
        } else {
            // File-identity entries are keyed by the kernel index (bank + position).
            let agent_index = self.policies.index_of(&agent).map(|i| self.bank_base + i);
            let file_rule = agent_index
                .and_then(|a| self.exec_files.rule_for(a, e.file_dev, e.file_ino))
                .map(str::to_string);
            let facts = ExecFacts {
                name: &e.path,
                interpreter: e.interpreter.as_deref(),
                file_rule: file_rule.as_deref(),
                initial_user_ns: !e.user_ns,
            };
            let why = self.explain(&agent, e.verdict, e.subject.ktime_ns, |p| {
                p.check_exec_facts(&facts)
            });
            let file = format!(
                "file {}:{} inode {}",
                e.file_dev >> 20,
                e.file_dev & 0xf_ffff,
                e.file_ino
            );
            match e.basis {
                common::EXEC_BASIS_FILE => format!("{why} (the file that runs, {file})"),
                _ => format!("{why} ({file})"),
            }
        };
        if e.user_ns {
            self.counters.execs_in_user_namespaces += 1;
        }
        if e.truncated {
            self.counters.exec_paths_too_long += 1;
        }
        if e.unreadable {
            self.counters.exec_paths_unreadable += 1;
        }
        if e.not_normal {
            self.counters.exec_paths_not_normal += 1;
        }
        let file = ExecFile {
            path: e.path.clone(),
            interpreter: e.interpreter.clone(),
        };
        Action {
            enforcement: e.killed.then_some("sigkill"),
            reason,
            ..self.action(&e.subject, agent, task, Object::Exec(file), e.verdict)
        }
    }

    fn connect_action(&mut self, c: &event::ConnectEvent) -> Action {
        let (agent, task) = self.identity(&c.subject);
        let grant = self
            .dns_index(&agent)
            .and_then(|i| self.learned.lookup(i, c.addr, c.port))
            .cloned();
        let mut reason = match (&grant, c.learned) {
            _ if c.dns_refused => "the destination is another agent's DNS proxy endpoint, which \
                                   only that agent's redirected DNS traffic may use"
                .to_string(),
            (Some(g), true) => format!(
                "allowed: the agent resolved {} to this address through the DNS proxy ({})",
                g.name, g.rule
            ),
            (None, true) => {
                // The kernel allowed it from an entry the daemon does not know.
                self.counters.verdict_disagreements += 1;
                tracing::error!(agent, addr = %c.addr, "kernel allowed a learned address the daemon did not learn");
                "allowed by a learned DNS address the daemon does not know".into()
            }
            _ if c.granted => {
                let addr = crate::policy::to_table_addr(c.addr);
                self.grant_reason(c.subject.task, |g| {
                    g.net
                        .iter()
                        .find(|r| {
                            r.covers(addr) && r.ports().lo <= c.port && c.port <= r.ports().hi
                        })
                        .map(|r| format!("connect {}", r.text()))
                })
            }
            (_, false) => self.explain(&agent, c.verdict, c.subject.ktime_ns, |p| {
                p.check_connect(c.addr, c.port)
            }),
        };
        if c.unspecified {
            reason.push_str(" (the unspecified address goes to loopback: judged as loopback)");
        }
        if c.connected_peer {
            reason.push_str(" (the send named no address: judged as the socket's connected peer)");
        }
        let exe = self
            .procs
            .exe(c.subject.pid)
            .map(str::to_string)
            .or_else(|| {
                std::fs::read_link(format!("/proc/{}/exe", c.subject.pid))
                    .ok()
                    .map(|p| p.display().to_string())
            });
        let target = NetTarget {
            destination: Destination {
                addr: c.addr,
                port: c.port,
                transport: event::transport(c.sock_type),
            },
            host: grant.map(|g| g.name),
        };
        let object = if c.send {
            Object::Sendmsg(target)
        } else {
            Object::Connect(target)
        };
        Action {
            exe,
            enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
            reason,
            ..self.action(&c.subject, agent, task, object, c.verdict)
        }
    }

    /// A source-routed packet of an agent's socket. The record's task is whoever ran when the
    /// packet left, so no program is named; the agent and task are the socket's.
    fn source_route_action(&mut self, r: &event::SourceRouteEvent) -> Action {
        let (agent, task) = self.identity(&r.subject);
        let option = match (r.first_hop, r.detail) {
            (IpAddr::V4(_), 0x83) => "an IPv4 loose source route (LSRR)".to_string(),
            (IpAddr::V4(_), 0x89) => "an IPv4 strict source route (SSRR)".to_string(),
            (IpAddr::V4(_), t) => format!("IPv4 options (first option type {t:#x})"),
            (IpAddr::V6(_), t) => format!("an IPv6 routing header (type {t})"),
        };
        let transport = match r.protocol {
            6 => "tcp",
            17 => "udp",
            _ => "other",
        };
        let object = Object::SourceRoute {
            first_hop: r.first_hop,
            transport,
        };
        Action {
            enforcement: (r.verdict == Verdict::Denied).then_some("dropped"),
            reason: format!(
                "the packet carried {option}: it would go to its first hop {} instead of the \
                 destination judged; agents' sockets may not set the path of their packets",
                r.first_hop
            ),
            ..self.action(&r.subject, agent, task, object, r.verdict)
        }
    }

    fn socket_action(&mut self, sk: &event::SocketEvent) -> Action {
        let (agent, task) = self.identity(&sk.subject);
        self.counters.sockets_refused += 1;
        let exe = self.procs.exe(sk.subject.pid).map(str::to_string);
        let object = Object::Socket(event::socket_description(
            sk.family,
            sk.sock_type,
            sk.protocol,
        ));
        Action {
            exe,
            enforcement: (sk.verdict == Verdict::Denied).then_some("eperm"),
            reason: socket_reason(sk),
            ..self.action(&sk.subject, agent, task, object, sk.verdict)
        }
    }

    /// `action` for a subject whose agent and task come from its cgroup.
    fn subject_action(&self, subject: &event::Subject, object: Object, verdict: Verdict) -> Action {
        let (agent, task) = self.identity(subject);
        self.action(subject, agent, task, object, verdict)
    }

    /// The parts of an action every kind shares: who acted, as what, with which verdict.
    fn action(
        &self,
        subject: &event::Subject,
        agent: String,
        task: String,
        object: Object,
        verdict: Verdict,
    ) -> Action {
        Action {
            time: SystemTime::now(),
            chain: self.procs.chain(subject.pid, &subject.comm),
            spiffe_id: self.spiffe_id(&agent),
            agent,
            task,
            verdict,
            pid: subject.pid,
            uid: subject.uid,
            comm: subject.comm.clone(),
            exe: None,
            object,
            enforcement: None,
            reason: String::new(),
        }
    }

    /// The userspace evaluator's account of a kernel verdict. A disagreement means the compiled
    /// tables and the policy model differ: counted and logged, the kernel's verdict stands.
    fn explain(
        &mut self,
        agent: &str,
        verdict: Verdict,
        judged_at_ns: u64,
        check: impl Fn(&crate::policy::Policy) -> crate::policy::Decision,
    ) -> String {
        let kernel_allowed = verdict == Verdict::Allowed;
        let current = self.policies.get(agent).map(&check);
        if let Some(d) = current.as_ref().filter(|d| d.allowed == kernel_allowed) {
            return d.to_string();
        }
        // A record the kernel judged before a reload finished is read after it: the policy in
        // force then explains it.
        for (until_ns, set) in self.superseded.iter().rev() {
            if judged_at_ns <= *until_ns
                && let Some(d) = set.get(agent).map(&check)
                && d.allowed == kernel_allowed
            {
                return format!("{d} (policy in force before a reload)");
            }
        }
        if judged_at_ns <= self.predecessor_until_ns {
            // Judged by the pinned tables of the previous daemon, whose policy files may have
            // changed since: not a disagreement between our tables and our evaluator.
            return "judged by the policy in force before this daemon started".into();
        }
        let Some(decision) = current else {
            return "agent unknown to this daemon".into();
        };
        self.counters.verdict_disagreements += 1;
        tracing::error!(
            agent,
            "kernel verdict {} but policy evaluation says {}: {}",
            verdict.as_str(),
            if decision.allowed {
                "allowed"
            } else {
                "not allowed"
            },
            decision.to_string()
        );
        decision.to_string()
    }

    fn report(&mut self, action: Action) {
        self.counters.actions += 1;
        let c = self.per_agent.entry(action.agent.clone()).or_default();
        c.actions += 1;
        match action.verdict {
            Verdict::Allowed => c.allowed += 1,
            Verdict::Denied => {
                c.denied += 1;
                self.counters.denied += 1;
            }
            Verdict::Alert => {
                c.alerts += 1;
                self.counters.alerts += 1;
            }
        }
        *self
            .by_action
            .entry((
                action.agent.clone(),
                action.kind().as_str(),
                action.verdict.as_str(),
            ))
            .or_default() += 1;
        self.outputs.emit(&action);
        // Kept as the audit line itself: building and dropping a JSON value tree per action
        // cost the daemon most of a core at 100k actions/s; `events` parses on request.
        match crate::output::json::json_line(&action) {
            Ok(mut line) => {
                line.pop(); // the newline
                let event: EventLine = Arc::new((action.agent, line));
                if self.events_tx.receiver_count() > 0 {
                    let _ = self.events_tx.send(Arc::clone(&event));
                }
                if self.history.len() == HISTORY {
                    self.history.pop_front();
                }
                self.history.push_back(event);
            }
            Err(e) => tracing::debug!("action not kept for `events`: {e}"),
        }
    }

    fn status(&mut self) -> control::Status {
        self.report_kernel_losses();
        self.counters.tracked_processes = self.procs.len() as u64;
        self.counters.exec_rule_files = self.exec_files.len() as u64;
        // Agents with a policy, then agents whose policy went away while their tasks run on
        // (they are denied everything).
        let mut names: Vec<(String, String)> = self
            .policies
            .iter()
            .map(|p| (p.agent().to_string(), p.mode().as_str().to_string()))
            .collect();
        let mut orphaned: Vec<String> = self
            .tasks
            .values()
            .filter(|t| self.policies.get(&t.agent).is_none())
            .map(|t| t.agent.clone())
            .collect();
        orphaned.sort();
        orphaned.dedup();
        names.extend(
            orphaned
                .into_iter()
                .map(|a| (a, "no policy (denied everything)".to_string())),
        );
        let now = monotonic_ns();
        let agents = names
            .into_iter()
            .map(|(agent, mode)| {
                let c = self.per_agent.get(&agent);
                let grants_of = |task: &str| {
                    let g = self
                        .registry
                        .find(&agent, task)
                        .and_then(|n| self.registry.get(n))
                        .and_then(|t| t.grants.as_ref());
                    let texts = g.map_or_else(Vec::new, |g| grant_texts(&g.net, &g.exec));
                    let left = g
                        .filter(|g| g.expires_ns != u64::MAX)
                        .map(|g| g.expires_ns.saturating_sub(now) / 1_000_000);
                    (texts, left)
                };
                let placements_in = |cgroup_id: u64| {
                    let mut v: Vec<control::Placement> = self
                        .placed
                        .iter()
                        .filter(|(_, cg)| **cg == cgroup_id)
                        .map(|(pid, _)| control::Placement {
                            pid: *pid,
                            privileges: self.placed_privileges.get(pid).cloned().flatten(),
                        })
                        .collect();
                    v.sort_by_key(|p| p.pid);
                    v
                };
                let mut tasks: Vec<TaskStatus> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.agent == agent)
                    .map(|(&id, t)| {
                        let (grants, left) = grants_of(&t.task);
                        let mut unscoped: Vec<String> = self
                            .unscoped_runs
                            .iter()
                            .filter(|(_, (cg, _))| *cg == id)
                            .map(|(pid, (_, why))| format!("run {pid}: {why}"))
                            .collect();
                        unscoped.sort();
                        TaskStatus {
                            task: t.task.clone(),
                            cgroup: t.path.display().to_string(),
                            processes: AgentCgroups::processes(&t.path),
                            grants,
                            grants_expire_in_ms: left,
                            unscoped,
                            placements: placements_in(id),
                        }
                    })
                    .collect();
                // Tasks with grants but no `run` cgroup (selector processes, or not started yet).
                for (_, t) in self.registry.of_agent(&agent) {
                    if t.grants.is_some() && !tasks.iter().any(|x| x.task == t.name) {
                        let (grants, left) = grants_of(&t.name);
                        tasks.push(TaskStatus {
                            task: t.name.clone(),
                            grants,
                            grants_expire_in_ms: left,
                            ..Default::default()
                        });
                    }
                }
                tasks.sort_by(|a, b| a.task.cmp(&b.task));
                let dns_proxy = self
                    .dns_proxies
                    .endpoints()
                    .iter()
                    .find(|(a, _)| *a == agent)
                    .map(|(_, dns)| control::DnsEndpoint {
                        udp4: dns.udp4,
                        tcp4: dns.tcp4,
                        udp6: dns.udp6,
                        tcp6: dns.tcp6,
                    });
                let dns_index = self.dns_index(&agent).unwrap_or(u32::MAX);
                let withheld = |kind| {
                    self.dns_withheld
                        .get(&(agent.clone(), kind))
                        .copied()
                        .unwrap_or(0)
                };
                AgentStatus {
                    dns_learned: self.learned.held(dns_index),
                    dns_learned_limit: self.learned.limit(dns_index),
                    dns_withheld_non_public: withheld(crate::dns::Withheld::NonPublic),
                    dns_withheld_limit: withheld(crate::dns::Withheld::Limit),
                    selectors: self.selected.describe(&agent),
                    agent,
                    mode,
                    tasks,
                    actions: c.map_or(0, |c| c.actions),
                    allowed: c.map_or(0, |c| c.allowed),
                    denied: c.map_or(0, |c| c.denied),
                    alerts: c.map_or(0, |c| c.alerts),
                    dns_proxy,
                }
            })
            .collect();
        control::Status {
            started_unix: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            policies: self.policies_dir.display().to_string(),
            mechanisms: serde_json::to_value(&self.kernel.mechanisms).unwrap_or_default(),
            agents,
            origin: serde_json::to_value(&self.kernel.origin).unwrap_or_default(),
            occupancy: serde_json::to_value(self.kernel.occupancy().unwrap_or_default())
                .unwrap_or_default(),
            policies_loaded_unix: self
                .policies_loaded
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            journal_query: crate::output::journald::this_process_query(),
            counters: Counters {
                journald_aggregated: self.outputs.aggregated(),
                ..self.counters.clone()
            },
            sinks: self
                .outputs
                .stats()
                .into_iter()
                .map(|s| (s.sink.to_string(), s.written, s.failed))
                .chain(std::iter::once(self.grant_file.stats()))
                .map(|(sink, written, failed)| SinkStatus {
                    sink,
                    written,
                    failed,
                })
                .collect(),
        }
    }
}

/// The grant state file (see [`grant_state`]) and how writing it went. A failed write never fails
/// the grant change (the kernel is the truth): it is counted (`status`, metrics: sink
/// `grant-state-file`), logged once per burst, and at worst a restarted daemon revokes grants it
/// could have kept.
struct GrantStateFile {
    path: PathBuf,
    pin_dir: PathBuf,
    /// This boot's id (written into the file), or why the file cannot be used at all.
    boot_id: Result<String, String>,
    written: u64,
    failed: u64,
    throttle: FailureThrottle,
}

impl GrantStateFile {
    const SINK: &'static str = "grant-state-file";

    fn new(path: &Path, pin_dir: &Path) -> Self {
        let boot_id = match grant_state::other_owner(path, pin_dir) {
            // A second daemon (on a private pin directory) left at the default path must not
            // clobber the first one's grants: it keeps none across restarts instead.
            Some(owner) => {
                let why = format!(
                    "{} holds the grants of the daemon on pin directory {owner}; give this one \
                     its own --state-file",
                    path.display()
                );
                tracing::warn!("{why}");
                Err(why)
            }
            None => grant_state::boot_id()
                .map_err(|e| format!("reading {}: {e}", grant_state::BOOT_ID_PATH)),
        };
        GrantStateFile {
            path: path.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            boot_id,
            written: 0,
            failed: 0,
            throttle: FailureThrottle::default(),
        }
    }

    /// The predecessor's records, or why there are none to use.
    fn load(&self) -> Result<Vec<grant_state::Recorded>, String> {
        let boot_id = self.boot_id.as_ref().map_err(Clone::clone)?;
        match grant_state::read(&self.path) {
            Ok(Some(text)) => grant_state::decode(&self.path, &text, boot_id, &self.pin_dir)
                .map_err(|e| e.to_string()),
            Ok(None) => Err(format!(
                "no grant state file {} (first start with --state-file, or it was removed)",
                self.path.display()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Rewrites the file with the grants in force in `tasks`.
    fn save(&mut self, tasks: &Tasks) {
        let now = Instant::now();
        let result = self.boot_id.clone().and_then(|boot_id| {
            let text = grant_state::encode(&boot_id, &self.pin_dir, grant_state::records(tasks));
            grant_state::write(&self.path, &text).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => {
                self.written += 1;
                if let Some(n) = self.throttle.success(now) {
                    tracing::warn!(
                        path = %self.path.display(),
                        unreported_failures = n,
                        total_failed = self.failed,
                        "grant state file written again; failures since the last report: {n}"
                    );
                }
            }
            Err(e) => {
                self.failed += 1;
                if let Some(n) = self.throttle.failure(now, 1) {
                    tracing::warn!(
                        path = %self.path.display(),
                        failures_since_last_report = n,
                        total_failed = self.failed,
                        "cannot write the grant state file (the grants stay in force; a restarted \
                         daemon would revoke them): {e}"
                    );
                }
            }
        }
    }

    /// After a fresh install: the maps hold no grants, so a file left by an earlier daemon of
    /// this pin directory describes none.
    fn remove_leftover(&self) {
        match grant_state::remove_if_of(&self.path, &self.pin_dir) {
            Ok(true) => tracing::info!(
                "removed the grant state file {} left by an earlier daemon (its grants went with \
                 its pinned maps)",
                self.path.display()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot remove the stale grant state file {}: {e}",
                self.path.display()
            ),
        }
    }

    /// (sink name, written, failed) for `status` and the metrics.
    fn stats(&self) -> (String, u64, u64) {
        (Self::SINK.to_string(), self.written, self.failed)
    }
}

/// What became of a predecessor's task grants at adoption.
#[derive(Default)]
struct GrantRecovery {
    /// Tasks whose grants were taken over, and their grants (rules).
    tasks: usize,
    recovered: usize,
    /// Grants (rules) recorded but expired while no daemon ran.
    expired: usize,
    /// Kernel grant entries removed because nothing recoverable described them.
    revoked_entries: usize,
    /// Why grants were not recovered (the whole file, or one task).
    why: Vec<String>,
}

/// Entries of `old` that `new` does not write again (compared by prefix length and key bytes).
fn stale_entries(old: &KernelTables, new: &KernelTables) -> KernelTables {
    let net = old
        .net
        .iter()
        .filter(|(len, key, _)| !new.net.iter().any(|(l, k, _)| l == len && k == key))
        .cloned()
        .collect();
    let exec = old
        .exec
        .iter()
        .filter(|(len, key)| {
            !new.exec
                .iter()
                .any(|(l, k)| l == len && k.agent == key.agent && k.path == key.path)
        })
        .cloned()
        .collect();
    KernelTables { net, exec }
}

/// How a process became an agent, in words (`SOURCE_*`).
fn source_name(source: u32) -> &'static str {
    match source {
        common::SOURCE_RUN => "agent-monitor run",
        common::SOURCE_CGROUP => "cgroup selector",
        common::SOURCE_UNIT => "systemd unit selector",
        common::SOURCE_EXECUTABLE => "executable selector",
        common::SOURCE_UID => "uid selector",
        common::SOURCE_TASK_SWITCH => "task start --pid",
        _ => "unknown",
    }
}

/// Grants as `status` and the task commands show them: `connect ADDR`, `exec PATH`.
fn grant_texts(net: &[crate::policy::NetRule], exec: &[crate::policy::ExecRule]) -> Vec<String> {
    net.iter()
        .map(|r| format!("connect {}", r.text()))
        .chain(exec.iter().map(|r| format!("exec {}", r.text())))
        .collect()
}
