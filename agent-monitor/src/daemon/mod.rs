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
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::action::{Action, Destination, DnsQuery, ExecFile, NetTarget, Object, Verdict};
use crate::bpf::{ActionStream, Kernel};
use crate::cli::DaemonArgs;
use crate::control::{self, AgentStatus, Request, Response, SinkStatus, TaskStatus};
use crate::dns::QueryReport;
use crate::dns::proxy::{Proxies, ProxyConfig};
use crate::event::{self, KernelEvent};
use crate::exec_files::ExecFiles;
use crate::identity::grant_state;
use crate::identity::procfs::LiveProcs;
use crate::identity::{
    self, AgentCgroups, IdentityDirectory, Peer, ProcessIdentity, UNVERIFIED_TASK, agent_id,
};
use crate::output::journald::message_id;
use crate::output::metrics::{self, Scrape};
use crate::output::notice::{Level, Notice, Notices};
use crate::output::{OutputConfig, Outputs};
use crate::policy::{ExecFacts, PolicySet};

mod ask;
mod ask_desk;
mod ask_files;
mod dns_learner;
mod egress_flows;
mod file_guard;
mod generations;
mod grant_book;
mod grants;
mod inputs;
mod interception;
mod records;
mod reload;
mod reporter;
mod reports;
mod request_warnings;
mod requests;
mod selectors;
mod server_names;
mod startup;
mod unix;
mod unix_ask;
mod unix_hooks;
mod unix_peer;

use dns_learner::{DnsLearner, Live};
use generations::{Explanation, Generations};
use grant_book::{GrantBook, GrantStateFile, grant_texts};
use inputs::{Input, Inputs, Signals};
use reporter::{EventLine, Reporter};
use requests::*;
use startup::*;

/// How long an exited process still names its place in its descendants' chains.
const KEEP_EXITED: Duration = Duration::from_secs(60);

/// How often the kernel's server-name flows are checked for sockets closed before they sent
/// anything (one sock_diag dump of the host's TCP sockets).
const SNI_SWEEP: Duration = Duration::from_secs(10);

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

/// sd_notify; a no-op when not started by systemd (no NOTIFY_SOCKET).
fn notify(state: &[libsystemd::daemon::NotifyState]) {
    if let Err(e) = libsystemd::daemon::notify(false, state) {
        tracing::warn!("sd_notify failed: {e}");
    }
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
    /// Counters, history, `events` and every output.
    reporter: Reporter,
    /// Learned addresses, DNS proxies and what they report.
    dns: DnsLearner,
    /// The file guard (`[files]`), its reports and what it was last told.
    files: file_guard::FileGuardState,
    /// The local CA, leaf cache and upstream TLS of HTTP interception (none if the CA could not
    /// be read or created: interception is then off, and said so at start).
    interceptor: Option<crate::intercept::Interceptor>,
    /// Held requests of ask-mode agents and their decisions.
    ask: ask::AskState,
    /// Connects redirected to the egress endpoint, until it asks about them.
    egress: egress_flows::EgressFlows,
    /// The request-rule warnings logged for the policy set in force.
    request_warnings: request_warnings::RequestWarnings,
}

impl Monitor {
    /// The event loop: each input goes to the owner of its concern.
    async fn run(
        &mut self,
        stream: ActionStream,
        requests: mpsc::Receiver<ControlCall>,
        scrapes: mpsc::Receiver<Scrape>,
        signals: Signals,
        dns: mpsc::Receiver<QueryReport>,
        egress: mpsc::Receiver<crate::egress::EgressInput>,
    ) -> anyhow::Result<()> {
        let mut inputs = Inputs::new(stream, requests, scrapes, signals, dns, egress);
        inputs.files = self.files.reports.take();
        inputs.asks = self.ask.inbox.take();
        loop {
            inputs.ask_due = self.ask.due();
            let input = inputs.next(self.generations.retire_due()).await?;
            for record in inputs.records.drain(..) {
                self.on_event(record);
            }
            match input {
                Input::Records => {}
                Input::Dns(report) => self.on_dns(report),
                Input::Request(call) => {
                    // An `always` approval reloads too.
                    if matches!(call.request, Request::Reload {} | Request::Decide { .. }) {
                        self.retire_old_bank_after_grace().await;
                    }
                    let response = self.on_request(call.request, &call.peer);
                    let _ = call.reply.send(response);
                }
                Input::Scrape(scrape) => {
                    let _ = scrape.send(metrics::render(&self.metrics_snapshot()));
                }
                Input::Sweep => {
                    self.sweep();
                    // systemctl, a cgroup tree search, sha256 of changed executables: blocking,
                    // asked on a blocking thread; the answer comes back as `Input::Probed`.
                    inputs.probe_selectors(|| self.ident.arm_plan(&self.cgroup_root));
                }
                Input::Probed(Ok(probed)) => self.arm_selectors(&probed),
                Input::Probed(Err(e)) => {
                    tracing::error!("selector probe failed (asked again at the next sweep): {e}")
                }
                Input::Watchdog => notify(&[libsystemd::daemon::NotifyState::Watchdog]),
                Input::Reload => {
                    self.retire_old_bank_after_grace().await;
                    // The outcome is logged and journaled by reload itself.
                    let _ = self.reload("SIGHUP");
                }
                Input::Reopen => match self.reporter.reopen() {
                    Ok(()) => tracing::info!("SIGUSR1: audit trail reopened"),
                    Err(e) => tracing::error!("SIGUSR1: {e}; still writing to the old file"),
                },
                Input::Stop(signal) => {
                    tracing::info!("{signal}: stopping");
                    // The pinned tables outlive us: leave no old bank for the next daemon.
                    self.retire_old_bank_after_grace().await;
                    return Ok(());
                }
                Input::RetireBank => self.retire_old_bank(),
                Input::FileGuard(report) => self.on_file_report(report),
                Input::Ask(a) => {
                    // The decision service's `always` reloads: the old bank must be gone first.
                    self.retire_old_bank_after_grace().await;
                    self.on_ask_in(a)
                }
                Input::AskDue => self.ask_tick(false),
                Input::Egress(e) => self.on_egress(e),
            }
            // Selectors change with probes, reloads and `run --user`: the guard's copy follows.
            self.sync_file_roster();
            // One write per burst of records rather than one per action.
            self.reporter.flush();
        }
    }

    /// Deletes the allowlist bank the last reload switched away from, once the grace is over (a
    /// program that read the old slot just before the switch has finished its lookup by then).
    fn retire_old_bank(&mut self) {
        match self.generations.retire_old_bank(&mut self.kernel) {
            Ok(removed) => tracing::debug!(removed, "old allowlist bank removed"),
            Err(e) => tracing::error!(
                "removing the old allowlist bank (retried at the next reload): {e:#}"
            ),
        }
    }

    /// Waits out what is left of the grace, on the runtime's timer, then retires the old bank:
    /// a reload writes its set into that bank.
    async fn retire_old_bank_after_grace(&mut self) {
        if let Some(due) = self.generations.retire_due() {
            inputs::at(Some(due)).await;
            self.retire_old_bank();
        }
    }

    /// A query an agent's DNS proxy judged: the learner installs and counts, the query is
    /// reported as the process behind the agent's latest redirect.
    fn on_dns(&mut self, report: QueryReport) {
        if let crate::dns::Outcome::Ask { .. } = &report.outcome {
            let QueryReport {
                agent,
                name,
                qtype,
                outcome: crate::dns::Outcome::Ask { reply },
                ..
            } = report
            else {
                return;
            };
            return self.on_dns_ask(agent, name, qtype, reply);
        }
        let live = Live {
            policies: self.generations.live(),
            bank_base: self.generations.bank_base(),
        };
        let Some(query) = self.dns.on_report(
            report,
            live,
            &mut self.kernel,
            &mut self.reporter,
            monotonic_ns(),
        ) else {
            return;
        };
        let base = match &query.client {
            Some(c) => self.subject_action(&c.subject, query.object(), query.verdict),
            None => Action {
                agent: query.agent.clone(),
                task: "?".into(),
                ..self.subject_action(&event::Subject::unknown(), query.object(), query.verdict)
            },
        };
        self.reporter.action(query.into_action(base));
    }

    fn sweep(&mut self) {
        if let Err(e) = self.kernel.heartbeat() {
            tracing::warn!("heartbeat: {e:#}");
        }
        self.reporter.close_storms(SystemTime::now());
        self.reporter.tick();
        let now = monotonic_ns();
        self.ident.prune(now, KEEP_EXITED.as_nanos() as u64);
        let live = Live {
            policies: self.generations.live(),
            bank_base: self.generations.bank_base(),
        };
        self.dns
            .expire(live, &mut self.kernel, &mut self.reporter, now);
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
        if now.saturating_sub(self.egress.sni_swept_ns) >= SNI_SWEEP.as_nanos() as u64 {
            self.egress.sni_swept_ns = now;
            self.sweep_server_name_flows();
        }
        self.ask_tick(true);
        self.reporter.kernel_losses(&self.kernel);
        for (id, t) in self.ident.take_empty_tasks() {
            if let Err(e) = self.kernel.remove_agent_cgroup(id) {
                tracing::warn!("{e:#}");
            }
            tracing::info!(
                agent = t.agent,
                task = t.task,
                "task ended: no process left"
            );
            self.ask_files_task_ended(&t.agent, &t.task);
        }
    }
}
