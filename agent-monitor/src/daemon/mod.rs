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

use crate::action::{Action, ActionKind, Destination, Verdict};
use crate::bpf::{ActionStream, Kernel};
use crate::cli::DaemonArgs;
use crate::control::{self, AgentStatus, Counters, Request, Response, SinkStatus, TaskStatus};
use crate::dns::learned::{Grant, KernelChange, LearnedTable};
use crate::dns::proxy::{Proxies, ProxyConfig};
use crate::dns::{Outcome, QueryReport};
use crate::event::{self, KernelEvent};
use crate::exec_files::ExecFiles;
use crate::identity::grant_state;
use crate::identity::procfs::LiveProcs;
use crate::identity::{
    self, AgentCgroups, IdentityDirectory, Peer, ProcessIdentity, UNVERIFIED_TASK, agent_id,
};
use crate::output::journald::{self, message_id};
use crate::output::metrics::{self, Scrape};
use crate::output::{OutputConfig, Outputs};
use crate::policy::{ExecFacts, PolicySet};

mod dns_answers;
mod generations;
mod grant_book;
mod grants;
mod records;
mod reload;
mod reports;
mod requests;
mod selectors;
mod startup;

use generations::{Explanation, Generations};
use grant_book::{GrantBook, GrantStateFile, grant_texts};
use requests::*;
use startup::*;

/// How often empty task cgroups are removed and exited processes forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Longest delay of an allowed action or lifecycle record: the kernel queues those without waking
/// the daemon (a wake-up per record slowed every agent connect); denials and alerts wake it.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// How long an exited process still names its place in its descendants' chains.
const KEEP_EXITED: Duration = Duration::from_secs(60);
/// Recent actions kept for `agent-monitor events`.
const HISTORY: usize = 1000;
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

/// One action for `events` followers: (agent, audit-trail JSON line).
type EventLine = Arc<(String, String)>;

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
    /// Who is an agent process: task cgroups, placed `run`s, the process table, selectors.
    ident: IdentityDirectory,
    /// Task numbers, their grants and the grant state file.
    grants: GrantBook,
    cgroup_root: PathBuf,
    admin_gid: Option<u32>,
    trust_domain: String,
    /// The policy set in force, its bank, and the sets before it.
    generations: Generations,
    /// Files the exact exec rules name, mirrored in the kernel's file-identity map.
    exec_files: ExecFiles,
    /// Why the socket() watch stays on whatever the policy says: an agent placed without `run`'s
    /// filter (for the daemon's life), or agents recovered from a predecessor that watched them.
    socket_watch_sticky: Option<String>,
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

    fn sweep(&mut self) {
        if let Err(e) = self.kernel.heartbeat() {
            tracing::warn!("heartbeat: {e:#}");
        }
        self.outputs.close_storms(SystemTime::now());
        let now = monotonic_ns();
        self.ident.prune(now, KEEP_EXITED.as_nanos() as u64);
        self.expire_learned();
        // A package upgrade replaces a file (new inode): follow it.
        let change = self
            .exec_files
            .refresh(self.generations.live(), self.generations.bank_base());
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
        self.grants.expire(&mut self.kernel, now);
        self.arm_selectors();
        self.report_kernel_losses();
        for (id, t) in self.ident.take_empty_tasks() {
            if let Err(e) = self.kernel.remove_agent_cgroup(id) {
                tracing::warn!("{e:#}");
            }
            tracing::info!(
                agent = t.agent,
                task = t.task,
                "task ended: no process left"
            );
        }
    }
}
