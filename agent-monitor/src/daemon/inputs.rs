//! Everything the monitor waits for, behind one `next()`: kernel records, control requests,
//! metrics scrapes, DNS proxy reports, timers and signals. The event loop (`Monitor::run`) only
//! hands each [`Input`] to the owner of its concern.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::requests::ControlCall;
use crate::bpf::ActionStream;
use crate::dns::QueryReport;
use crate::event::{self, KernelEvent};
use crate::identity::selected::{ProbePlan, Probed};
use crate::output::metrics::Scrape;

/// How often empty task cgroups are removed and exited processes forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Longest delay of an allowed action or lifecycle record: the kernel queues those without waking
/// the daemon (a wake-up per record slowed every agent connect); denials and alerts wake it.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The signals the daemon acts on: TERM and INT stop it, HUP reloads the policy directory, USR1
/// reopens the audit trail.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
        })
    }
}

/// One thing for the monitor to do. Kernel records read with it are in [`Inputs::records`], to be
/// handled first.
pub(super) enum Input {
    /// Only the records.
    Records,
    /// A query an agent's DNS proxy judged (the records read before it name who sent it).
    Dns(QueryReport),
    Request(ControlCall),
    Scrape(Scrape),
    /// Periodic tidying (cgroups, processes, expiry, kernel counters).
    Sweep,
    /// Time to tell systemd's watchdog the loop is alive.
    Watchdog,
    /// SIGHUP: reload the policy directory.
    Reload,
    /// SIGUSR1: reopen the audit trail.
    Reopen,
    /// SIGTERM or SIGINT (named).
    Stop(&'static str),
    /// The grace after a bank switch is over: the old allowlist bank can go.
    RetireBank,
    /// What the host said about the selectors (systemd units, cgroups, changed executables),
    /// asked on a blocking thread by [`Inputs::probe_selectors`]; the error is that thread's.
    Probed(Result<Probed, tokio::task::JoinError>),
    /// What the file guard judged or did (`crate::files`).
    FileGuard(crate::files::FileReport),
    /// Ask mode: a call `run` holds, its channel closing, the decision service's answer.
    Ask(super::ask::AskIn),
    /// Ask mode: a held request's deadline or a `once` entry's end.
    AskDue,
    /// The egress endpoint asks about a flow or reports a connection (the records read before
    /// it hold the flow's redirect).
    Egress(crate::egress::EgressInput),
}

pub(super) struct Inputs {
    stream: ActionStream,
    requests: mpsc::Receiver<ControlCall>,
    scrapes: mpsc::Receiver<Scrape>,
    dns: mpsc::Receiver<QueryReport>,
    signals: Signals,
    sweep: tokio::time::Interval,
    drain: tokio::time::Interval,
    watchdog: Option<tokio::time::Interval>,
    /// The selector probe running on a blocking thread, if one is.
    probe: Option<tokio::task::JoinHandle<Probed>>,
    egress: mpsc::Receiver<crate::egress::EgressInput>,
    /// Kernel records read by the last `next()`, decoded.
    pub(super) records: Vec<Result<KernelEvent, event::DecodeError>>,
    /// The file guard's reports, when it runs.
    pub(super) files: Option<mpsc::Receiver<crate::files::FileReport>>,
    /// Ask mode's inputs (see [`Input::Ask`]); set by the monitor at start.
    pub(super) asks: Option<mpsc::Receiver<super::ask::AskIn>>,
    /// When ask mode needs the monitor next (set by the monitor before each `next()`).
    pub(super) ask_due: Option<Instant>,
}

impl Inputs {
    pub(super) fn new(
        stream: ActionStream,
        requests: mpsc::Receiver<ControlCall>,
        scrapes: mpsc::Receiver<Scrape>,
        signals: Signals,
        dns: mpsc::Receiver<QueryReport>,
        egress: mpsc::Receiver<crate::egress::EgressInput>,
    ) -> Self {
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // systemd's watchdog is pinged from the loop, so a stuck monitor gets restarted (and the
        // restarted daemon adopts the pinned programs).
        let watchdog =
            libsystemd::daemon::watchdog_enabled(false).map(|d| tokio::time::interval(d / 2));
        Inputs {
            stream,
            requests,
            scrapes,
            dns,
            signals,
            sweep: tokio::time::interval(SWEEP_EVERY),
            drain,
            watchdog,
            probe: None,
            egress,
            records: Vec::with_capacity(1024),
            files: None,
            asks: None,
            ask_due: None,
        }
    }

    /// Waits for the next input; an error is the ring buffer failing. `retire_at` is when the
    /// old allowlist bank may go (see `Generations::retire_due`), if one waits.
    pub(super) async fn next(&mut self, retire_at: Option<Instant>) -> anyhow::Result<Input> {
        Ok(tokio::select! {
            r = self.stream.next_batch(|bytes| self.records.push(event::decode(bytes))) => {
                r.context("reading the action ring buffer")?;
                Input::Records
            }
            _ = self.drain.tick() => {
                self.stream.drain_now(|bytes| self.records.push(event::decode(bytes)));
                Input::Records
            }
            Some(report) = self.dns.recv() => {
                // The kernel's record of the agent's DNS packet was written before the packet
                // reached the proxy: read what is in the ring now, so the query is attributed
                // to the process that sent it.
                self.stream.drain_now(|bytes| self.records.push(event::decode(bytes)));
                Input::Dns(report)
            }
            Some(call) = self.requests.recv() => Input::Request(call),
            Some(scrape) = self.scrapes.recv() => Input::Scrape(scrape),
            _ = self.sweep.tick() => Input::Sweep,
            _ = tick(&mut self.watchdog) => Input::Watchdog,
            _ = at(retire_at) => Input::RetireBank,
            probed = join(&mut self.probe) => {
                self.probe = None;
                Input::Probed(probed)
            }
            Some(a) = recv(&mut self.asks) => Input::Ask(a),
            _ = at(self.ask_due) => Input::AskDue,
            _ = self.signals.hup.recv() => Input::Reload,
            _ = self.signals.usr1.recv() => Input::Reopen,
            _ = self.signals.term.recv() => Input::Stop("SIGTERM"),
            _ = self.signals.int.recv() => Input::Stop("SIGINT"),
            Some(report) = recv(&mut self.files) => Input::FileGuard(report),
            Some(e) = self.egress.recv() => {
                // The kernel wrote the flow's redirect record before the connect reached the
                // endpoint: read it now.
                self.stream.drain_now(|bytes| self.records.push(event::decode(bytes)));
                Input::Egress(e)
            }
        })
    }
}

impl Inputs {
    /// Asks the host about the selectors (`plan`) on a blocking thread, unless the previous
    /// probe is still running (its answer comes first; the next sweep asks again). The answer
    /// arrives as [`Input::Probed`].
    pub(super) fn probe_selectors(&mut self, plan: impl FnOnce() -> ProbePlan) {
        if self.probe.is_none() {
            let plan = plan();
            self.probe = Some(tokio::task::spawn_blocking(move || plan.run()));
        }
    }
}

/// The running probe's answer; never, without one.
async fn join(
    probe: &mut Option<tokio::task::JoinHandle<Probed>>,
) -> Result<Probed, tokio::task::JoinError> {
    match probe {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// The next message of an optional receiver; never, without one.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Returns at `instant`; never, without one.
pub(super) async fn at(instant: Option<Instant>) {
    match instant {
        Some(i) => tokio::time::sleep_until(i.into()).await,
        None => std::future::pending().await,
    }
}

/// The next tick of an optional timer; never, without one.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}
