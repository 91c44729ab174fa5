//! The daemon: wiring of policy, kernel, identity, control socket and sinks, signals and shutdown.
//!
//! One task (the monitor) owns the kernel object and all state; the control socket's connections
//! talk to it through a channel, so nothing is locked per event.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_monitor_common::{self as common, AgentSlot, DnsProxy};
use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::action::{Action, ActionKind, Destination, Verdict};
use crate::bpf::{ActionStream, Kernel};
use crate::cli::DaemonArgs;
use crate::control::{self, AgentStatus, Counters, Request, Response, SinkStatus, TaskStatus};
use crate::dns::learned::{Grant, KernelChange, LearnedTable};
use crate::dns::proxy::ProxyConfig;
use crate::dns::{Outcome, QueryReport};
use crate::event::{self, KernelEvent};
use crate::exec_files::ExecFiles;
use crate::identity::selected::Selected;
use crate::identity::{
    self, AgentCgroups, DEFAULT_TASK, Peer, ProcessTable, Tasks, UNVERIFIED_TASK,
};
use crate::output::{OutputConfig, Outputs};
use crate::policy::KernelTables;
use crate::policy::{ExecFacts, PolicySet};

/// How often empty task cgroups are removed and exited processes forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Longest delay of an allowed action or lifecycle record: the kernel queues those without waking
/// the daemon (a wake-up per record slowed every agent connect); denials and alerts wake it.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// How long an exited process still names its place in its descendants' chains.
const KEEP_EXITED: Duration = Duration::from_secs(60);

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
    let tables = policies
        .compile()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("refusing to start: the policies do not fit the kernel tables")?;

    for w in crate::exec_lint::warnings(&policies) {
        tracing::warn!("{w}");
    }
    for did in crate::host::ensure_kernel_filesystems()? {
        tracing::info!("{did}");
    }
    let cgroup_root = crate::host::cgroup2_root()?;
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
    // Without selectors every agent process lives below `run`'s cgroup tree.
    let agent_scope = if policies.iter().any(|p| !p.selectors().is_empty()) {
        cgroup_root.as_path()
    } else {
        cgroups.base()
    };
    let mut kernel = Kernel::load(&cgroup_root, agent_scope, &layout, &offsets)?;
    kernel.install_allowlists(&tables)?;
    kernel.watch_socket_syscalls(socket_watch_at_start(&policies).as_deref())?;
    let mut exec_files = ExecFiles::default();
    let change = exec_files.refresh(&policies);
    kernel.update_exec_files(&change.add, &change.remove)?;
    let (dns_reports, dns_endpoints) = start_dns_proxies(&args, &policies, &mut kernel).await?;
    let stream = kernel.take_actions()?;
    let outputs = Outputs::open(&OutputConfig {
        journal_allowed: args.journal_allowed,
        json_path: args.json_log.clone(),
    })
    .context("opening the output sinks")?;
    let mut tasks = Tasks::default();
    let mut selected = Selected::from_policies(&policies, |agent| AgentSlot {
        agent: policies.index_of(agent).unwrap_or(u32::MAX),
        mode: policies
            .get(agent)
            .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value()),
        task: tasks.number(agent, DEFAULT_TASK),
        source: common::SOURCE_RUN,
    });
    // Bound last: a client that reaches the socket finds enforcement active.
    let listener = bind_control_socket(&args.socket.control_socket, admin_gid)?;

    let m = &kernel.mechanisms;
    tracing::info!(
        agents = policies.len(),
        cgroup_root = %cgroup_root.display(),
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
    let names: Vec<String> = policies
        .iter()
        .map(|p| format!("{} ({})", p.agent(), p.mode().as_str()))
        .collect();
    tracing::info!(
        "policies from {}: {}",
        args.policies.display(),
        names.join(", ")
    );

    let (requests_tx, requests_rx) = mpsc::channel(64);
    let socket_path = args.socket.control_socket.clone();
    tokio::spawn(serve_control(listener, requests_tx));

    let mut monitor = Monitor {
        kernel,
        selected: Selected::default(),
        registry: tasks,
        cgroup_root: cgroup_root.clone(),
        admin_gid,
        trust_domain,
        policies,
        exec_files,
        policies_dir: args.policies.clone(),
        cgroups,
        tasks: HashMap::new(),
        procs: ProcessTable::default(),
        placed: HashMap::new(),
        outputs,
        per_agent: HashMap::new(),
        counters: Counters::default(),
        started: SystemTime::now(),
        decode_errors_logged: 0,
        learned: LearnedTable::default(),
        dns_grace_ns: args.dns_grace.saturating_mul(1_000_000_000),
        dns_clients: HashMap::new(),
        dns_endpoints,
    };
    std::mem::swap(&mut monitor.selected, &mut selected);
    monitor.arm_selectors();
    let result = monitor.run(stream, requests_rx, dns_reports).await;
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped; enforcement ends with the daemon (programs detached)");
    result
}

/// Starts one DNS proxy endpoint per agent and points the kernel's redirection at it. Returns the
/// channel on which the endpoints report queries to the monitor.
async fn start_dns_proxies(
    args: &DaemonArgs,
    policies: &PolicySet,
    kernel: &mut Kernel,
) -> anyhow::Result<(mpsc::Receiver<QueryReport>, Vec<DnsProxy>)> {
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
    let mut endpoints = Vec::new();
    for (index, policy) in policies.indexed() {
        let ports =
            crate::dns::proxy::spawn(index, policy.clone(), config.clone(), tx.clone()).await?;
        kernel.set_dns_proxy(index, ports)?;
        endpoints.push(ports);
        tracing::debug!(agent = policy.agent(), ?ports, "DNS proxy endpoint");
    }
    tracing::info!(
        upstream = %upstream.map_or("none".to_string(), |a| a.to_string()),
        grace_s = args.dns_grace,
        "DNS proxy: agents' port-53 traffic is redirected to a per-agent endpoint on loopback"
    );
    Ok((rx, endpoints))
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

async fn serve_control(listener: UnixListener, to_monitor: mpsc::Sender<ControlCall>) {
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
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, to_monitor).await {
                tracing::warn!("control connection: {e:#}");
            }
        });
    }
}

async fn serve_connection(
    stream: UnixStream,
    to_monitor: mpsc::Sender<ControlCall>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(control::MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("no request within 10 s")??;
    let response = {
        match (control::parse_request(&line), cred.pid()) {
            (Err(message), _) => Response::Error { message },
            (Ok(_), None) => Response::Error {
                message: "the kernel did not report the caller's pid".into(),
            },
            (Ok(request), Some(pid)) => {
                let (reply, answer) = oneshot::channel();
                to_monitor
                    .send(ControlCall {
                        request,
                        peer: Peer::from_cred(pid as u32, cred.uid(), cred.gid()),
                        reply,
                    })
                    .await
                    .context("monitor stopped")?;
                answer.await.context("monitor dropped the request")?
            }
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
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
    /// Selectors of every policy, armed or waiting.
    selected: Selected,
    /// Task numbers and grants.
    registry: Tasks,
    cgroup_root: PathBuf,
    admin_gid: Option<u32>,
    trust_domain: String,
    policies: PolicySet,
    /// Files the exact exec rules name, mirrored in the kernel's file-identity map.
    exec_files: ExecFiles,
    policies_dir: PathBuf,
    cgroups: AgentCgroups,
    /// cgroup id → (agent, task).
    tasks: HashMap<u64, TaskEntry>,
    procs: ProcessTable,
    /// Placed `run` processes (pid → task cgroup id): the only senders of seccomp reports.
    placed: HashMap<u32, u64>,
    outputs: Outputs,
    per_agent: HashMap<String, AgentCounters>,
    counters: Counters,
    started: SystemTime,
    decode_errors_logged: u64,
    /// Addresses agents resolved through the DNS proxy (mirror of the kernel's `DNS_LEARNED`).
    learned: LearnedTable,
    dns_grace_ns: u64,
    /// Per agent, its latest DNS redirect: who is behind the next query its proxy reports.
    dns_clients: HashMap<String, event::ConnectEvent>,
    /// Each agent's DNS proxy ports, by kernel index.
    dns_endpoints: Vec<DnsProxy>,
}

impl Monitor {
    async fn run(
        &mut self,
        mut stream: ActionStream,
        mut requests: mpsc::Receiver<ControlCall>,
        mut dns: mpsc::Receiver<QueryReport>,
    ) -> anyhow::Result<()> {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
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
                _ = sweep.tick() => self.sweep(),
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            }
            // One write per burst of records rather than one per action.
            self.outputs.flush();
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
            Request::Place { agent, task } => {
                self.place(&agent, &task, pid)
                    .map(|cgroup| Response::Placed {
                        mode: self
                            .policies
                            .get(&agent)
                            .map(|p| p.mode().as_str().to_string()),
                        agent,
                        task,
                        cgroup,
                    })
            }
            Request::Caught(caught) => self.on_caught(pid, caught).map(|()| Response::Recorded {}),
            Request::Status {} => Ok(Response::Status(self.status())),
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
            kind: ActionKind::Control,
            verdict: Verdict::Denied,
            pid: peer.pid,
            uid: peer.uid,
            comm,
            exe,
            destination: None,
            interpreter: None,
            socket: None,
            dest_host: None,
            dns_name: None,
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
            && let Some(index) = self.policies.index_of(agent)
        {
            let number = self.registry.find(agent, task).unwrap_or(common::TASK_NONE);
            let mode = self
                .policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value());
            return Some(ProcessIdentity {
                slot: AgentSlot {
                    agent: index,
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

    /// (agent, task) names of a kernel slot.
    fn names(&self, slot: &AgentSlot) -> (String, String) {
        let agent = self
            .policies
            .policies()
            .get(slot.agent as usize)
            .map_or_else(
                || format!("agent-{}", slot.agent),
                |p| p.agent().to_string(),
            );
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
        let Some(index) = self.policies.index_of(agent) else {
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
            agent: index,
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
        let (kind, object, reason) = match &c.call {
            control::CaughtCall::Socket {
                family,
                sock_type,
                protocol,
            } => (
                ActionKind::Socket,
                event::socket_description(*family as u16, *sock_type, *protocol),
                "a socket family the cgroup hooks cannot judge (vsock, packet…): agents keep \
                 unix, inet, inet6 and netlink (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::Socketcall { op } => (
                ActionKind::Socket,
                format!("socketcall op {op} (i386)"),
                "i386 socketcall keeps its arguments in user memory, out of the filter's \
                 reach (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::IoUringSetup => (
                ActionKind::IoUring,
                "io_uring_setup".to_string(),
                "io_uring creates sockets without the socket system call (seccomp filter of \
                 `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::SeccompListener => (
                ActionKind::Seccomp,
                "seccomp listener".to_string(),
                "a seccomp notification listener would let the agent answer the calls the \
                 `run` filter catches: always refused"
                    .to_string(),
            ),
            control::CaughtCall::Other { name } => (
                ActionKind::Seccomp,
                name.clone(),
                "caught by the seccomp filter of `agent-monitor run`".to_string(),
            ),
        };
        let verdict = if c.refused {
            Verdict::Denied
        } else {
            Verdict::Alert
        };
        if kind == ActionKind::Socket {
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
            socket: Some(object),
            enforcement: c.refused.then_some("eperm"),
            reason,
            chain,
            ..self.action(&subject, agent, task, kind, verdict)
        };
        self.report(action);
        Ok(())
    }

    /// Makes `pid` a process of `agent`, task `task`.
    fn place(&mut self, agent: &str, task: &str, pid: u32) -> anyhow::Result<String> {
        let slot = self.agent_slot(agent, task, common::SOURCE_RUN)?;
        // Before the process becomes an agent: from then on its socket() calls are watched.
        // Sticky for the daemon's life (cheap to keep right; a reload recomputes it).
        if let Some(why) = unfiltered_placement(pid) {
            self.kernel.watch_socket_syscalls(Some(&why))?;
        }
        let cg = self.enter_task_cgroup(agent, task, slot, pid)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        self.procs.add_root(pid, exe, identity::proc_args(pid));
        self.placed.insert(pid, cg.id);
        tracing::info!(agent, task, pid, cgroup = %cg.path.display(), "agent process placed");
        Ok(cg.path.display().to_string())
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
        self.kernel.remove_task_grants(&grants.kernel)?;
        Ok(grants.net.len() + grants.exec.len())
    }

    /// Arms what selectors can be armed, re-verifies changed executables, writes the kernel's
    /// selector configuration and reports what changed.
    fn arm_selectors(&mut self) {
        let registry = &mut self.registry;
        let policies = &self.policies;
        let report = self
            .selected
            .arm(&mut self.kernel, &self.cgroup_root, |agent| AgentSlot {
                agent: policies.index_of(agent).unwrap_or(u32::MAX),
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
        for (agent, m) in report.mismatches {
            tracing::error!(agent, "executable selector digest mismatch: {m}");
            let action = Action {
                time: SystemTime::now(),
                spiffe_id: self.spiffe_id(&agent),
                agent,
                task: UNVERIFIED_TASK.to_string(),
                kind: ActionKind::Identity,
                verdict: Verdict::Alert,
                pid: std::process::id(),
                uid: 0,
                comm: "agent-monitor".into(),
                exe: None,
                destination: None,
                interpreter: None,
                socket: None,
                dest_host: None,
                dns_name: None,
                chain: Vec::new(),
                enforcement: None,
                reason: format!("executable selector digest mismatch: {m}"),
            };
            self.report(action);
        }
    }

    fn sweep(&mut self) {
        let now = monotonic_ns();
        self.procs.prune(now, KEEP_EXITED.as_nanos() as u64);
        self.expire_learned();
        // A package upgrade replaces a file (new inode): follow it.
        let change = self.exec_files.refresh(&self.policies);
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
        let lost = k[common::COUNTER_RECORDS_LOST as usize];
        if lost > self.counters.lost_records {
            tracing::warn!(
                lost = lost - self.counters.lost_records,
                total = lost,
                "kernel records lost (ring buffer full): their verdicts were enforced but are not reported"
            );
        }
        self.counters.lost_records = lost;
        self.counters.grants_expired_in_kernel = k[common::COUNTER_GRANTS_EXPIRED as usize];
        // Identity anomalies: logged when they grow, always counted.
        let grown = |now: u64, before: &mut u64| std::mem::replace(before, now) < now;
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
            }
            KernelEvent::Tagged {
                subject,
                path,
                retagged_from,
            } => {
                let (agent, task) = self.identity(&subject);
                tracing::info!(
                    agent,
                    task,
                    pid = subject.pid,
                    path,
                    "process became an agent by its executable selector"
                );
                if let Some(prior) = retagged_from {
                    let was = self.agent_name(prior);
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
                let (agent, task) = self.identity(&subject);
                let claimant = self.agent_name(claimed_by);
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
            KernelEvent::DnsRedirect(c) => {
                let (agent, _) = self.identity(&c.subject);
                if c.dns_refused {
                    let action = Action {
                        destination: Some(Destination {
                            addr: c.addr,
                            port: c.port,
                            transport: event::transport(c.sock_type),
                        }),
                        enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
                        reason: "DNS traffic, and the agent has no DNS proxy endpoint for this \
                                 address family"
                            .into(),
                        ..self.subject_action(&c.subject, ActionKind::Dns, c.verdict)
                    };
                    self.report(action);
                } else {
                    self.dns_clients.insert(agent, c);
                }
            }
        }
    }

    fn agent_name(&self, index: u32) -> String {
        self.names(&AgentSlot {
            agent: index,
            mode: 0,
            task: common::TASK_NONE,
            source: 0,
        })
        .0
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
            ..self.action(subject, agent, task, ActionKind::Identity, Verdict::Alert)
        };
        self.report(action);
    }

    /// Reports one query the DNS proxy judged; for an allowed answer, first installs its
    /// addresses in the kernel and tells the proxy it may reply.
    fn on_dns(&mut self, r: QueryReport) {
        let Some(policy) = self.policies.policies().get(r.agent as usize) else {
            tracing::error!(agent = r.agent, "DNS report for an unknown agent index");
            return;
        };
        let agent = policy.agent().to_string();
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
                let list: Vec<String> = addrs
                    .iter()
                    .map(|(a, ttl)| format!("{a} (ttl {ttl}s)"))
                    .collect();
                if allowed {
                    let result = self.install(r.agent, &r.name, &reason, &addrs, &ports);
                    if let Some(tx) = installed {
                        let _ = tx.send(result.clone());
                    }
                    match result {
                        Ok(()) => (
                            Verdict::Allowed,
                            None,
                            format!("{reason}; {rcode}{chain}; learned [{}]", list.join(", ")),
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
                            "{reason} (alert mode: forwarded); {rcode}{chain}; answer [{}] not learned",
                            list.join(", ")
                        ),
                    )
                }
            }
        };
        let client = self.dns_clients.get(&agent).cloned();
        let base = match &client {
            Some(c) => self.subject_action(&c.subject, ActionKind::Dns, verdict),
            None => Action {
                agent: agent.clone(),
                task: "?".into(),
                ..self.subject_action(&event::Subject::unknown(), ActionKind::Dns, verdict)
            },
        };
        let action = Action {
            destination: client.map(|c| Destination {
                addr: c.addr,
                port: c.port,
                transport: r.transport,
            }),
            dns_name: Some(r.name),
            enforcement,
            reason: format!("{} query: {reason}", r.qtype),
            ..base
        };
        self.report(action);
    }

    /// Writes every address of an allowed answer into the agent's kernel allowlist, until its TTL
    /// plus the grace. On a failure the table forgets what the kernel does not hold.
    fn install(
        &mut self,
        agent: u32,
        name: &str,
        rule: &str,
        addrs: &[(IpAddr, u32)],
        ports: &[common::PortRange],
    ) -> Result<(), String> {
        let now = monotonic_ns();
        for &(addr, ttl) in addrs {
            let grant = Grant {
                name: name.to_string(),
                rule: rule.to_string(),
                expires_ns: now
                    .saturating_add(u64::from(ttl).saturating_mul(1_000_000_000))
                    .saturating_add(self.dns_grace_ns),
                ports: ports.to_vec(),
            };
            let value = self.learned.learn(agent, addr, grant, now);
            if let Err(e) = self.kernel.write_learned(agent, addr, &value) {
                self.learned.unlearn(agent, addr, name);
                return Err(format!("{e:#}"));
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
        Ok(())
    }

    /// Removes expired learned addresses from the kernel (which already ignores them).
    fn expire_learned(&mut self) {
        for change in self.learned.expire(monotonic_ns()) {
            let result = match change {
                KernelChange::Write(agent, addr, value) => {
                    self.kernel.write_learned(agent, addr, &value)
                }
                KernelChange::Remove(agent, addr) => self.kernel.remove_learned(agent, addr),
            };
            if let Err(e) = result {
                tracing::warn!("expiring a learned address: {e:#}");
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
    }

    /// Agent and task of an event, from the identity the kernel judged with.
    fn identity(&self, subject: &event::Subject) -> (String, String) {
        if self.registry.get(subject.task).is_none()
            && let Some(t) = self.tasks.get(&subject.cgroup_id)
        {
            return (t.agent.clone(), t.task.clone());
        }
        self.names(&AgentSlot {
            agent: subject.agent,
            mode: 0,
            task: subject.task,
            source: subject.source,
        })
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
            let agent_index = self.policies.index_of(&agent);
            let file_rule = agent_index
                .and_then(|a| self.exec_files.rule_for(a, e.file_dev, e.file_ino))
                .map(str::to_string);
            let facts = ExecFacts {
                name: &e.path,
                interpreter: e.interpreter.as_deref(),
                file_rule: file_rule.as_deref(),
                initial_user_ns: !e.user_ns,
            };
            let why = self.explain(&agent, e.verdict, |p| p.check_exec_facts(&facts));
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
        Action {
            exe: Some(e.path.clone()),
            interpreter: e.interpreter.clone(),
            enforcement: e.killed.then_some("sigkill"),
            reason,
            ..self.action(&e.subject, agent, task, ActionKind::Exec, e.verdict)
        }
    }

    fn connect_action(&mut self, c: &event::ConnectEvent) -> Action {
        let (agent, task) = self.identity(&c.subject);
        let grant = self
            .policies
            .index_of(&agent)
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
            (_, false) => self.explain(&agent, c.verdict, |p| p.check_connect(c.addr, c.port)),
        };
        if c.unspecified {
            reason.push_str(" (the unspecified address goes to loopback: judged as loopback)");
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
        let kind = if c.send {
            ActionKind::Sendmsg
        } else {
            ActionKind::Connect
        };
        Action {
            exe,
            destination: Some(Destination {
                addr: c.addr,
                port: c.port,
                transport: event::transport(c.sock_type),
            }),
            dest_host: grant.map(|g| g.name),
            enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
            reason,
            ..self.action(&c.subject, agent, task, kind, c.verdict)
        }
    }

    fn socket_action(&mut self, sk: &event::SocketEvent) -> Action {
        let (agent, task) = self.identity(&sk.subject);
        self.counters.sockets_refused += 1;
        let exe = self.procs.exe(sk.subject.pid).map(str::to_string);
        Action {
            exe,
            socket: Some(event::socket_description(
                sk.family,
                sk.sock_type,
                sk.protocol,
            )),
            enforcement: (sk.verdict == Verdict::Denied).then_some("eperm"),
            reason: socket_reason(sk),
            ..self.action(&sk.subject, agent, task, ActionKind::Socket, sk.verdict)
        }
    }

    /// `action` for a subject whose agent and task come from its cgroup.
    fn subject_action(
        &self,
        subject: &event::Subject,
        kind: ActionKind,
        verdict: Verdict,
    ) -> Action {
        let (agent, task) = self.identity(subject);
        self.action(subject, agent, task, kind, verdict)
    }

    /// The parts of an action every kind shares: who acted, as what, with which verdict.
    fn action(
        &self,
        subject: &event::Subject,
        agent: String,
        task: String,
        kind: ActionKind,
        verdict: Verdict,
    ) -> Action {
        Action {
            time: SystemTime::now(),
            chain: self.procs.chain(subject.pid, &subject.comm),
            spiffe_id: self.spiffe_id(&agent),
            agent,
            task,
            kind,
            verdict,
            pid: subject.pid,
            uid: subject.uid,
            comm: subject.comm.clone(),
            exe: None,
            interpreter: None,
            socket: None,
            destination: None,
            dest_host: None,
            dns_name: None,
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
        check: impl Fn(&crate::policy::Policy) -> crate::policy::Decision,
    ) -> String {
        let Some(policy) = self.policies.get(agent) else {
            return "agent unknown to this daemon".into();
        };
        let decision = check(policy);
        let kernel_allowed = verdict == Verdict::Allowed;
        if decision.allowed != kernel_allowed {
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
        }
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
        self.outputs.emit(&action);
    }

    fn status(&mut self) -> control::Status {
        self.report_kernel_losses();
        self.counters.tracked_processes = self.procs.len() as u64;
        self.counters.exec_rule_files = self.exec_files.len() as u64;
        let agents = self
            .policies
            .iter()
            .zip(self.dns_endpoints.iter())
            .map(|(p, dns)| {
                let c = self.per_agent.get(p.agent());
                let now = monotonic_ns();
                let grants_of = |task: &str| {
                    let g = self
                        .registry
                        .find(p.agent(), task)
                        .and_then(|n| self.registry.get(n))
                        .and_then(|t| t.grants.as_ref());
                    let texts = g.map_or_else(Vec::new, |g| grant_texts(&g.net, &g.exec));
                    let left = g
                        .filter(|g| g.expires_ns != u64::MAX)
                        .map(|g| g.expires_ns.saturating_sub(now) / 1_000_000);
                    (texts, left)
                };
                let mut tasks: Vec<TaskStatus> = self
                    .tasks
                    .values()
                    .filter(|t| t.agent == p.agent())
                    .map(|t| {
                        let (grants, left) = grants_of(&t.task);
                        TaskStatus {
                            task: t.task.clone(),
                            cgroup: t.path.display().to_string(),
                            processes: AgentCgroups::processes(&t.path),
                            grants,
                            grants_expire_in_ms: left,
                        }
                    })
                    .collect();
                // Tasks with grants but no `run` cgroup (selector processes, or not started yet).
                for (_, t) in self.registry.of_agent(p.agent()) {
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
                AgentStatus {
                    agent: p.agent().to_string(),
                    mode: p.mode().as_str().into(),
                    tasks,
                    selectors: self.selected.describe(p.agent()),
                    actions: c.map_or(0, |c| c.actions),
                    allowed: c.map_or(0, |c| c.allowed),
                    denied: c.map_or(0, |c| c.denied),
                    alerts: c.map_or(0, |c| c.alerts),
                    dns_proxy: Some(control::DnsEndpoint {
                        udp4: dns.udp4,
                        tcp4: dns.tcp4,
                        udp6: dns.udp6,
                        tcp6: dns.tcp6,
                    }),
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
            counters: self.counters.clone(),
            sinks: self
                .outputs
                .stats()
                .into_iter()
                .map(|s| SinkStatus {
                    sink: s.sink.to_string(),
                    written: s.written,
                    failed: s.failed,
                })
                .collect(),
        }
    }
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
