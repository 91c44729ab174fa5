//! Ask mode in the monitor: held DNS queries (from the proxy) and held calls (from `run`'s ask
//! channel) go to the [`AskDesk`]; decisions (control `decide`, the decision service, timeouts,
//! withdrawals) come back here, where the approval's kernel entry is written first and only then
//! is the held call released, so the kernel judges it again with the entry in place.

mod approval;
mod intake;
mod reports;

use agent_monitor_common::PortRange;

use super::ask_desk::approved_file::{self, List};
use super::ask_desk::approver::{self, ApproverError};
use super::ask_desk::exec_grants::{ExecGrants, HeldFileError, SeenExec, held_file};
use super::ask_desk::{AskDesk, DeskError, Ended, Hold, NameApprovals, NewRequest, OnceEntries};
use super::*;
use crate::control::{
    AskAllowlist, AskAnswer, AskCall, ChainProcess, Decision, HeldAction, Outcome, PendingEvent,
    PendingRequest, Scope,
};
use crate::policy::KernelTables;

/// How long the kernel entry of a `once` connect approval lives: the released call runs at once.
const ONCE_ENTRY: Duration = Duration::from_secs(5);
/// How long a `once` approval of a name answers the resolver's retransmissions and its other
/// record types (A, AAAA) without asking again.
const ONCE_NAME: Duration = Duration::from_secs(30);
/// Held requests at once; beyond it a call is denied at once (and counted).
const DESK_CAPACITY: usize = 10_000;
/// Ports a name approval makes its answer's addresses reachable on.
const ALL_PORTS: PortRange = PortRange { lo: 1, hi: 65535 };

/// The kernel entry of a `once` approval, and the call that uses it up.
pub(super) struct OnceEntry {
    tables: KernelTables,
    task: u32,
    /// For a connect: the address (as the kernel tables key it) and port.
    connect: Option<(std::net::Ipv6Addr, u16)>,
}

/// The own allowlist of each agent in ask mode, by agent.
pub(super) type AskAllowlists = std::collections::BTreeMap<String, AskAllowlist>;

/// Who waits for a decision.
pub(super) enum Waiter {
    /// A call on `run`'s ask channel.
    Channel {
        answers: mpsc::UnboundedSender<AskAnswer>,
        call: u64,
    },
    /// A DNS proxy query.
    Dns(oneshot::Sender<Option<Vec<PortRange>>>),
    /// An open the file guard holds (`hold` is the guard's number for it).
    Open {
        guard: crate::files::GuardDecider,
        hold: u64,
    },
}

/// What reaches the monitor for ask mode besides control requests and DNS reports.
pub(super) enum AskIn {
    /// A call `run` holds (`run_pid` is the `run` that opened the channel).
    Call {
        run_pid: u32,
        call: AskCall,
        answers: mpsc::UnboundedSender<AskAnswer>,
    },
    /// `run`'s ask channel closed: its held calls are gone with it.
    Closed { run_pid: u32 },
    /// The decision service answered (or failed).
    Approver {
        id: u64,
        result: Result<Decision, ApproverError>,
    },
}

/// Counts for metrics and `status`.
#[derive(Default, Debug)]
pub(super) struct AskCounters {
    pub(super) held: u64,
    pub(super) approved: u64,
    pub(super) denied: u64,
    pub(super) timeout: u64,
    pub(super) withdrawn: u64,
    pub(super) allowed_without_asking: u64,
    pub(super) denied_without_asking: u64,
    pub(super) approver_errors: u64,
    pub(super) refused_full: u64,
    /// Seconds from hold to decision (shared with every scrape's registry).
    pub(super) decision_seconds: crate::output::ask_metrics::DecisionSeconds,
}

/// Everything of ask mode the monitor holds.
pub(super) struct AskState {
    pub(super) desk: AskDesk<Waiter>,
    names: NameApprovals,
    /// Names just denied (or timed out) for an agent and task: the resolver's retransmits and
    /// its A/AAAA pair are refused for `ONCE_NAME` without asking again.
    denied_names: NameApprovals,
    once: OnceEntries<OnceEntry>,
    /// The kernel entries of `once` and `task` approvals of execs (by file).
    pub(super) exec_grants: ExecGrants,
    /// `pending --follow` subscribers: one JSON `PendingEvent` per line.
    pub(super) followers: broadcast::Sender<String>,
    /// Each ask-mode agent's own allowlist, for the ask channels (`run` judges calls on it
    /// without asking); replaced when the policy in force changes.
    pub(super) allowlists: tokio::sync::watch::Sender<Arc<AskAllowlists>>,
    approver: Option<(hyper::Uri, Duration)>,
    pub(super) to_monitor: mpsc::Sender<AskIn>,
    /// The receiving end of `to_monitor`, until the event loop takes it.
    pub(super) inbox: Option<mpsc::Receiver<AskIn>>,
    pub(super) counters: AskCounters,
    /// Task approvals of opens, as the file guard consults them.
    pub(super) file_grants: super::ask_desk::file_grants::FileGrants,
}

impl AskState {
    pub(super) fn new(
        timeout: Duration,
        approver: Option<hyper::Uri>,
        approver_timeout: Duration,
    ) -> Self {
        let (to_monitor, inbox) = mpsc::channel(1024);
        AskState {
            inbox: Some(inbox),
            desk: AskDesk::new(timeout.as_nanos() as u64, DESK_CAPACITY),
            names: NameApprovals::default(),
            denied_names: NameApprovals::default(),
            once: OnceEntries::default(),
            exec_grants: ExecGrants::default(),
            followers: broadcast::channel(4096).0,
            allowlists: tokio::sync::watch::channel(Arc::default()).0,
            approver: approver.map(|u| (u, approver_timeout.min(timeout))),
            to_monitor,
            counters: AskCounters::default(),
            file_grants: Default::default(),
        }
    }

    /// When the monitor must come back for a timeout or a `once` entry's end.
    pub(super) fn due(&self) -> Option<Instant> {
        let next = [
            self.desk.next_deadline(),
            self.once.next(),
            self.exec_grants.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(Instant::now() + Duration::from_nanos(next.saturating_sub(monotonic_ns())))
    }
}

fn answer(
    waiter: Waiter,
    allow: bool,
    ports: Vec<PortRange>,
    outcome: Option<&Outcome>,
    grant_ms: Option<u64>,
) {
    match waiter {
        Waiter::Channel { answers, call } => {
            // A closed channel: `run` went away, its call is gone with it.
            let _ = answers.send(AskAnswer {
                call,
                allow,
                outcome: outcome.cloned(),
                grant_ms,
            });
        }
        Waiter::Dns(reply) => {
            let _ = reply.send(allow.then_some(ports));
        }
        Waiter::Open { guard, hold } => guard.decide(hold, allow),
    }
}

fn action_kind(a: &HeldAction) -> &'static str {
    match a {
        HeldAction::Dns { .. } => "dns",
        HeldAction::Connect { .. } => "connect",
        HeldAction::Exec { .. } => "exec",
        HeldAction::Unix { .. } => "connect",
        HeldAction::Open { .. } => "open",
    }
}

fn describe(a: &HeldAction) -> String {
    crate::ask_cmd::action_text(a)
}

/// Who decided, as `APPROVER` says it: "uid 1000 (alice)".
pub(super) fn operator(uid: u32) -> String {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "?".into());
    format!("uid {uid} ({name})")
}
