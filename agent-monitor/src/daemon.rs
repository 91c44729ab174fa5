//! The daemon: wiring of policy, kernel, identity, control socket and sinks, signals and shutdown.
//!
//! One task (the monitor) owns the kernel object and all state; the control socket's connections
//! talk to it through a channel, so nothing is locked per event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use agent_monitor_common::{self as common, AgentSlot};
use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::action::{Action, ActionKind, Destination, Verdict};
use crate::bpf::{ActionStream, Kernel};
use crate::cli::DaemonArgs;
use crate::control::{self, AgentStatus, Counters, Request, Response, SinkStatus, TaskStatus};
use crate::event::{self, KernelEvent};
use crate::identity::{self, AgentCgroups, ProcessTable};
use crate::output::{OutputConfig, Outputs};
use crate::policy::PolicySet;

/// How often empty task cgroups are removed and exited processes forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
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

    for did in crate::host::ensure_kernel_filesystems()? {
        tracing::info!("{did}");
    }
    let cgroup_root = crate::host::cgroup2_root()?;
    let layout = crate::host::tracepoint_layout()?;
    let cgroups = AgentCgroups::new(&cgroup_root)?;
    refuse_if_already_running(&args.socket.control_socket).await?;

    let mut kernel = Kernel::load(&cgroup_root, &layout)?;
    kernel.install_allowlists(&tables)?;
    let stream = kernel.take_actions()?;
    let outputs = Outputs::open(&OutputConfig {
        journal_allowed: args.journal_allowed,
        json_path: args.json_log.clone(),
    })
    .context("opening the output sinks")?;
    // Bound last: a client that reaches the socket finds enforcement active.
    let listener = bind_control_socket(&args.socket.control_socket)?;

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
        policies,
        policies_dir: args.policies.clone(),
        cgroups,
        tasks: HashMap::new(),
        procs: ProcessTable::default(),
        outputs,
        per_agent: HashMap::new(),
        counters: Counters::default(),
        started: SystemTime::now(),
        decode_errors_logged: 0,
    };
    let result = monitor.run(stream, requests_rx).await;
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped; enforcement ends with the daemon (programs detached)");
    result
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

/// Binds the root-only control socket (replacing a stale one).
fn bind_control_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    Ok(listener)
}

/// A request from a control connection, with the kernel-reported identity of the caller.
struct ControlCall {
    request: Request,
    peer_pid: u32,
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
    let response = if cred.uid() != 0 {
        Response::Error {
            message: "the control socket is root-only".into(),
        }
    } else {
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
                        peer_pid: pid as u32,
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

/// A live (agent, task) cgroup.
struct TaskEntry {
    agent: String,
    task: String,
    path: PathBuf,
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
    policies: PolicySet,
    policies_dir: PathBuf,
    cgroups: AgentCgroups,
    /// cgroup id → (agent, task).
    tasks: HashMap<u64, TaskEntry>,
    procs: ProcessTable,
    outputs: Outputs,
    per_agent: HashMap<String, AgentCounters>,
    counters: Counters,
    started: SystemTime,
    decode_errors_logged: u64,
}

impl Monitor {
    async fn run(
        &mut self,
        mut stream: ActionStream,
        mut requests: mpsc::Receiver<ControlCall>,
    ) -> anyhow::Result<()> {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
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
                Some(call) = requests.recv() => {
                    let response = self.on_request(call.request, call.peer_pid);
                    let _ = call.reply.send(response);
                }
                _ = sweep.tick() => self.sweep(),
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            }
        }
    }

    fn on_request(&mut self, request: Request, peer_pid: u32) -> Response {
        match request {
            Request::Place { agent, task } => match self.place(&agent, &task, peer_pid) {
                Ok(cgroup) => Response::Placed {
                    agent,
                    task,
                    cgroup,
                },
                Err(e) => {
                    tracing::warn!(agent, task, pid = peer_pid, "placement refused: {e:#}");
                    Response::Error {
                        message: format!("{e:#}"),
                    }
                }
            },
            Request::Status {} => Response::Status(self.status()),
        }
    }

    /// Makes `pid` a process of `agent`, task `task`.
    fn place(&mut self, agent: &str, task: &str, pid: u32) -> anyhow::Result<String> {
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
        let mode = policy.mode().kernel_value();
        let cg = self.cgroups.task(agent, task)?;
        // The identity entry exists before the process enters the cgroup: no unjudged window.
        self.kernel.add_agent_cgroup(
            cg.id,
            AgentSlot {
                agent: index,
                mode,
                task: common::TASK_NONE,
                source: common::SOURCE_RUN,
            },
        )?;
        self.tasks.insert(
            cg.id,
            TaskEntry {
                agent: agent.to_string(),
                task: task.to_string(),
                path: cg.path.clone(),
            },
        );
        self.cgroups.place(&cg, pid)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        self.procs.add_root(pid, exe);
        tracing::info!(agent, task, pid, cgroup = %cg.path.display(), "agent process placed");
        Ok(cg.path.display().to_string())
    }

    fn sweep(&mut self) {
        self.procs
            .prune(monotonic_ns(), KEEP_EXITED.as_nanos() as u64);
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
            KernelEvent::Exit { subject } => self.procs.on_exit(subject.pid, subject.ktime_ns),
            KernelEvent::Tagged { subject, path, .. } => {
                self.procs.add_root(subject.pid, path);
            }
            KernelEvent::Exec(e) => {
                self.procs.on_exec(e.subject.pid, &e.path);
                let action = self.exec_action(&e);
                self.report(action);
            }
            KernelEvent::Connect(c) => {
                let action = self.connect_action(&c);
                self.report(action);
            }
        }
    }

    fn identity(&self, cgroup_id: u64) -> (String, String) {
        match self.tasks.get(&cgroup_id) {
            Some(t) => (t.agent.clone(), t.task.clone()),
            None => ("?".into(), format!("cgroup-{cgroup_id}")),
        }
    }

    fn exec_action(&mut self, e: &event::ExecEvent) -> Action {
        let (agent, task) = self.identity(e.subject.cgroup_id);
        let reason = if e.truncated {
            format!(
                "exec path longer than {} bytes cannot be matched",
                common::EXEC_PATH_LEN - 1
            )
        } else if e.unreadable {
            "exec path unreadable in the kernel".to_string()
        } else {
            self.explain(&agent, e.verdict, |p| p.check_exec(&e.path))
        };
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
            enforcement: e.killed.then_some("sigkill"),
            reason,
            ..self.action(&e.subject, agent, task, ActionKind::Exec, e.verdict)
        }
    }

    fn connect_action(&mut self, c: &event::ConnectEvent) -> Action {
        let (agent, task) = self.identity(c.subject.cgroup_id);
        let reason = self.explain(&agent, c.verdict, |p| p.check_connect(c.addr, c.port));
        let exe = self
            .procs
            .exe(c.subject.pid)
            .map(str::to_string)
            .or_else(|| {
                std::fs::read_link(format!("/proc/{}/exe", c.subject.pid))
                    .ok()
                    .map(|p| p.display().to_string())
            });
        Action {
            exe,
            destination: Some(Destination {
                addr: c.addr,
                port: c.port,
                transport: event::transport(c.sock_type),
            }),
            enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
            reason,
            ..self.action(&c.subject, agent, task, ActionKind::Connect, c.verdict)
        }
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
            agent,
            task,
            kind,
            verdict,
            pid: subject.pid,
            uid: subject.uid,
            comm: subject.comm.clone(),
            exe: None,
            destination: None,
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
        let agents = self
            .policies
            .iter()
            .map(|p| {
                let c = self.per_agent.get(p.agent());
                let mut tasks: Vec<TaskStatus> = self
                    .tasks
                    .values()
                    .filter(|t| t.agent == p.agent())
                    .map(|t| TaskStatus {
                        task: t.task.clone(),
                        cgroup: t.path.display().to_string(),
                        processes: AgentCgroups::processes(&t.path),
                    })
                    .collect();
                tasks.sort_by(|a, b| a.task.cmp(&b.task));
                AgentStatus {
                    agent: p.agent().to_string(),
                    mode: p.mode().as_str().into(),
                    tasks,
                    actions: c.map_or(0, |c| c.actions),
                    allowed: c.map_or(0, |c| c.allowed),
                    denied: c.map_or(0, |c| c.denied),
                    alerts: c.map_or(0, |c| c.alerts),
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
