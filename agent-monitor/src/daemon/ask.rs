//! Ask mode in the monitor: held DNS queries (from the proxy) and held calls (from `run`'s ask
//! channel) go to the [`AskDesk`]; decisions (control `decide`, the decision service, timeouts,
//! withdrawals) come back here, where the approval's kernel entry is written first and only then
//! is the held call released, so the kernel judges it again with the entry in place.

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

/// The allowlist entry an approval of `a` stands for (policy syntax).
fn entry_of(a: &HeldAction) -> (List, String) {
    match a {
        HeldAction::Dns { name, .. } => (List::Network, format!("{name}:1-65535")),
        HeldAction::Connect { address, port, .. } => (
            List::Network,
            std::net::SocketAddr::new(*address, *port).to_string(),
        ),
        HeldAction::Exec { path, .. } => (List::Exec, path.clone()),
        // The socket's own path (where the name led), which the list then matches by identity:
        // a symlink's name would name no socket (docs/unix-sockets.md).
        HeldAction::Unix { path, resolved, .. } => {
            (List::Unix, resolved.clone().unwrap_or_else(|| path.clone()))
        }
        // `apply_approval` takes every approval of an open before (`always` is refused: the
        // policy has no way to allow a file despite `files.deny`).
        HeldAction::Open { .. } => unreachable!("opens are approved by approve_open"),
    }
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

impl Monitor {
    /// `AskChannel` from `run_pid`: only the `run` this daemon placed for (agent, task), of an
    /// agent in ask mode.
    pub(super) fn open_ask_channel(
        &self,
        run_pid: u32,
        agent: &str,
        task: &str,
    ) -> anyhow::Result<()> {
        let Some(placement) = self.ident.placement(run_pid) else {
            bail!("pid {run_pid} is not an `agent-monitor run` this daemon placed");
        };
        let Some(entry) = self.ident.task(placement.task_cgroup) else {
            bail!("the task pid {run_pid} was placed in is gone");
        };
        if entry.agent != agent || entry.task != task {
            bail!(
                "`run` {run_pid} was placed for agent {} task {}, not agent {agent} task {task}",
                entry.agent,
                entry.task
            );
        }
        match self.generations.live().get(agent).map(|p| p.mode()) {
            Some(crate::policy::model::Mode::Ask) => {
                self.publish_ask_allowlists();
                Ok(())
            }
            _ => bail!("agent {agent} is not in ask mode"),
        }
    }

    /// Puts the own allowlist of every ask-mode agent in force where the ask channels read it
    /// (at a channel's opening and after every reload). The channels send a changed one on.
    pub(super) fn publish_ask_allowlists(&self) {
        let lists: AskAllowlists = self
            .generations
            .live()
            .iter()
            .filter(|p| p.mode() == crate::policy::model::Mode::Ask)
            .map(|p| {
                let list = AskAllowlist {
                    connect: p.network().iter().map(|r| r.text().to_string()).collect(),
                    exec: p.exec().iter().map(|r| r.text().to_string()).collect(),
                };
                (p.agent().to_string(), list)
            })
            .collect();
        self.ask.allowlists.send_if_modified(|old| {
            let changed = **old != lists;
            if changed {
                *old = Arc::new(lists);
            }
            changed
        });
    }

    /// A query of an ask-mode agent for a name off its list.
    pub(super) fn on_dns_ask(
        &mut self,
        dns_index: u32,
        name: String,
        qtype: String,
        reply: oneshot::Sender<Option<Vec<PortRange>>>,
    ) {
        let Some(agent) = self
            .dns
            .proxies
            .endpoints()
            .get(dns_index as usize)
            .map(|(a, _)| a.clone())
        else {
            let _ = reply.send(None);
            return;
        };
        let client = self.dns.client(&agent).cloned();
        let (pid, task, uid, chain) = match &client {
            Some(c) => {
                let a = self.subject_action(&c.subject, Object::Control, Verdict::Denied);
                (a.pid, Some(a.task), Some(a.uid), a.chain)
            }
            None => (0, None, None, Vec::new()),
        };
        let now = monotonic_ns();
        if self.ask.names.approved(&agent, task.as_deref(), &name, now) {
            self.ask.counters.allowed_without_asking += 1;
            let _ = reply.send(Some(vec![ALL_PORTS]));
            return;
        }
        if self
            .ask
            .denied_names
            .approved(&agent, task.as_deref(), &name, now)
        {
            self.ask.counters.denied_without_asking += 1;
            let _ = reply.send(None);
            return;
        }
        let key = format!("{agent}\0dns\0{name}");
        let request = self.pending_request(
            &agent,
            task,
            uid,
            pid,
            chain,
            HeldAction::Dns { name, qtype },
        );
        self.hold(
            NewRequest {
                request,
                key: Some(key),
            },
            Waiter::Dns(reply),
        );
    }

    pub(super) fn pending_request(
        &self,
        agent: &str,
        task: Option<String>,
        uid: Option<u32>,
        pid: u32,
        chain: Vec<crate::action::ChainLink>,
        action: HeldAction,
    ) -> PendingRequest {
        PendingRequest {
            id: 0,
            agent: agent.to_string(),
            spiffe_id: Some(self.spiffe_id(agent)),
            task,
            uid,
            pid,
            chain: chain
                .into_iter()
                .map(|l| ChainProcess {
                    pid: l.pid,
                    exe: l.exe,
                    args: l.args,
                })
                .collect(),
            action,
            held_ms: 0,
            expires_in_ms: 0,
        }
    }

    pub(super) fn hold(&mut self, new: NewRequest, waiter: Waiter) {
        let now = monotonic_ns();
        match self.ask.desk.hold(new, waiter, now) {
            Ok(Hold::Joined(_)) => {}
            Ok(Hold::New(id)) => {
                self.ask.counters.held += 1;
                let Some(request) = self.ask.desk.get(id, now) else {
                    return;
                };
                self.report_held(&request);
                if let Ok(line) = serde_json::to_string(&PendingEvent::Held(request.clone())) {
                    let _ = self.ask.followers.send(line);
                }
                if let Some((url, timeout)) = self.ask.approver.clone() {
                    let to_monitor = self.ask.to_monitor.clone();
                    tokio::spawn(async move {
                        let result = approver::ask(&url, &request, timeout).await;
                        let _ = to_monitor.send(AskIn::Approver { id, result }).await;
                    });
                }
            }
            Err((e, waiter)) => {
                self.ask.counters.refused_full += 1;
                tracing::warn!("ask mode: {e}");
                answer(waiter, false, vec![], None, None);
            }
        }
    }

    /// A call `run` holds on its ask channel.
    pub(super) fn on_ask_in(&mut self, input: AskIn) {
        match input {
            AskIn::Call {
                run_pid,
                call,
                answers,
            } => self.on_ask_call(run_pid, call, answers),
            AskIn::Closed { run_pid } => {
                let now = monotonic_ns();
                let ended = self.ask.desk.withdraw(
                    |r| {
                        (r.chain.first().map(|c| c.pid) == Some(run_pid) || r.pid == run_pid).then(
                            || {
                                format!(
                                    "the ask channel of `run` {run_pid} closed: its held calls \
                                     went with it"
                                )
                            },
                        )
                    },
                    now,
                );
                for e in ended {
                    self.finish(e, None);
                }
            }
            AskIn::Approver { id, result } => {
                let decision = match result {
                    Ok(d) => d,
                    Err(e) => {
                        self.ask.counters.approver_errors += 1;
                        tracing::warn!(id, "decision service: {e}; the request is denied");
                        Decision::Deny {
                            reason: Some(format!("decision service: {e}")),
                        }
                    }
                };
                // Decided already (an operator was faster, or it timed out): nothing to do.
                if let Err(DeskError::Refused { why, .. }) =
                    self.decide(id, &decision, "approver-url")
                {
                    // A scope this request cannot take (`always` for an open): denied, not
                    // left to time out.
                    let deny = Decision::Deny {
                        reason: Some(format!("decision service: {why}")),
                    };
                    let _ = self.decide(id, &deny, "approver-url");
                }
            }
        }
    }

    fn on_ask_call(
        &mut self,
        run_pid: u32,
        call: AskCall,
        answers: mpsc::UnboundedSender<AskAnswer>,
    ) {
        let refuse = |answers: &mpsc::UnboundedSender<AskAnswer>, why: &str| {
            tracing::warn!(run_pid, "ask channel: {why}");
            let _ = answers.send(AskAnswer {
                call: call.call,
                allow: false,
                outcome: None,
                grant_ms: None,
            });
        };
        let Some(placement) = self.ident.placement(run_pid) else {
            return refuse(&answers, "not a `run` this daemon placed");
        };
        let Some(entry) = self.ident.task(placement.task_cgroup) else {
            return refuse(&answers, "its task is gone");
        };
        let (agent, task) = (entry.agent.clone(), entry.task.clone());
        let comm = identity::procfs::comm(call.pid).unwrap_or_default();
        let chain = self.ident.chain(call.pid, &comm);
        if chain.len() > 1 && chain[0].pid != run_pid {
            return refuse(
                &answers,
                &format!("pid {} is not a process of its task", call.pid),
            );
        }
        if self.already_allowed(&agent, &task, &call.action) {
            self.ask.counters.allowed_without_asking += 1;
            let _ = answers.send(AskAnswer {
                call: call.call,
                allow: true,
                outcome: None,
                grant_ms: None,
            });
            return;
        }
        let uid = identity::procfs::credentials(call.pid).map(|c| c.uid);
        let request = self.pending_request(&agent, Some(task), uid, call.pid, chain, call.action);
        self.hold(
            NewRequest { request, key: None },
            Waiter::Channel {
                answers,
                call: call.call,
            },
        );
    }

    /// Whether the kernel would let the action through now (policy, learned addresses, task
    /// grants): then it is released at once, and the kernel judges it anyway.
    fn already_allowed(&self, agent: &str, task: &str, action: &HeldAction) -> bool {
        let Some(policy) = self.generations.live().get(agent) else {
            return false;
        };
        let grants = self
            .grants
            .find(agent, task)
            .and_then(|n| self.grants.get(n))
            .and_then(|t| t.grants.as_ref());
        match action {
            HeldAction::Dns { name, .. } => policy.check_name(name).allowed,
            HeldAction::Connect { address, port, .. } => {
                // DNS: the kernel sends every port-53 datagram and connect of an agent to its
                // DNS proxy, which judges (and in ask mode holds) the name itself.
                if *port == common::DNS_PORT {
                    return true;
                }
                if policy.check_connect(*address, *port).allowed {
                    return true;
                }
                let table = crate::policy::to_table_addr(*address);
                if grants.is_some_and(|g| {
                    g.net
                        .iter()
                        .any(|r| r.covers(table) && (r.ports.lo..=r.ports.hi).contains(port))
                }) {
                    return true;
                }
                let index = self
                    .dns
                    .proxies
                    .endpoints()
                    .iter()
                    .position(|(a, _)| a == agent);
                index.is_some_and(|i| self.dns.learned.lookup(i as u32, *address, *port).is_some())
            }
            HeldAction::Exec {
                path,
                device,
                inode,
                ..
            } => {
                policy.check_exec(path).allowed
                    || grants.is_some_and(|g| g.exec.iter().any(|r| r.matches(path)))
                    || match (self.grants.find(agent, task), device, inode) {
                        (Some(number), Some(device), Some(inode)) => self.ask.exec_grants.covers(
                            number,
                            path,
                            *device,
                            *inode,
                            monotonic_ns(),
                        ),
                        _ => false,
                    }
            }
            // `run` judged it against the list it was placed with and found it off the list;
            // its grants for this socket are its own (it connects unix sockets itself).
            HeldAction::Unix { .. } => false,
            // Opens are held by the file guard, not on `run`'s channel.
            HeldAction::Open { .. } => false,
        }
    }

    /// Ask mode's part of a metrics scrape.
    pub(super) fn ask_metrics(&self) -> crate::output::ask_metrics::AskMetrics {
        let c = &self.ask.counters;
        crate::output::ask_metrics::AskMetrics {
            held: c.held,
            pending: self.ask.desk.len() as u64,
            ended: vec![
                ("approved", c.approved),
                ("denied", c.denied),
                ("timeout", c.timeout),
                ("withdrawn", c.withdrawn),
            ],
            allowed_without_asking: c.allowed_without_asking,
            denied_without_asking: c.denied_without_asking,
            approver_errors: c.approver_errors,
            refused_full: c.refused_full,
            decision_seconds: c.decision_seconds.clone(),
        }
    }

    /// `pending`: the held requests, oldest first.
    pub(super) fn pending(&self) -> Vec<PendingRequest> {
        self.ask.desk.pending(monotonic_ns())
    }

    /// Decides request `id`: for an approval its kernel entry (or allowlist entry) first, then
    /// the held calls are released. A failed entry turns the approval into a denial.
    pub(super) fn decide(
        &mut self,
        id: u64,
        decision: &Decision,
        approver: &str,
    ) -> Result<Outcome, DeskError> {
        let now = monotonic_ns();
        if let Some(why) = self
            .ask
            .desk
            .get(id, now)
            .and_then(|r| super::ask_files::scope_refusal(&r, decision))
        {
            return Err(DeskError::Refused { id, why });
        }
        let mut ended = self.ask.desk.decide(id, decision, approver, now)?;
        let mut ports = vec![ALL_PORTS];
        if let Decision::Allow { scope, ttl_ms } = decision {
            match self.apply_approval(&ended.request, *scope, *ttl_ms, approver, now) {
                Ok(p) => ports = p,
                Err(why) => {
                    tracing::error!(id, "approval could not be put in force: {why:#}");
                    ended.outcome.verdict = "denied".into();
                    ended.outcome.scope = None;
                    ended.outcome.reason = Some(format!("approval not put in force: {why:#}"));
                }
            }
        }
        let outcome = ended.outcome.clone();
        let grant_ms = super::unix_ask::grant_ms(&ended.request.action, decision, &outcome);
        self.finish_granting(ended, Some(ports), grant_ms);
        Ok(outcome)
    }

    /// Writes what an approval needs before the call is released; the ports a DNS answer gets.
    fn apply_approval(
        &mut self,
        r: &PendingRequest,
        scope: Scope,
        ttl_ms: Option<u64>,
        approver: &str,
        now: u64,
    ) -> anyhow::Result<Vec<PortRange>> {
        let task = r.task.clone().unwrap_or_default();
        // An exec is approved by the file `run` held, if it is still that file.
        let held = match &r.action {
            HeldAction::Exec {
                path,
                device: Some(device),
                inode: Some(inode),
                ..
            } => Some(held_file(path, *device, *inode)?),
            HeldAction::Exec { .. } if scope != Scope::Always => {
                return Err(HeldFileError::NoFile.into());
            }
            _ => None,
        };
        if scope == Scope::Always && matches!(r.action, HeldAction::Unix { .. }) {
            super::unix_ask::check_always(&r.agent, self.generations.live().get(&r.agent))?;
        }
        match (scope, &r.action) {
            (Scope::Once | Scope::Task, HeldAction::Exec { path, .. }) => {
                let Some(file) = held else {
                    return Err(HeldFileError::NoFile.into());
                };
                super::grant_book::GrantBook::check_start(&task, ttl_ms)?;
                let once = scope == Scope::Once;
                let expires_ns = match (once, ttl_ms) {
                    (true, _) => now + ONCE_ENTRY.as_nanos() as u64,
                    (false, Some(ms)) => now.saturating_add(ms.saturating_mul(1_000_000)),
                    (false, None) => u64::MAX,
                };
                let number = self.grants.number(&r.agent, &task);
                self.ask.exec_grants.grant(
                    &mut self.kernel,
                    r.id,
                    number,
                    path,
                    file,
                    once,
                    expires_ns,
                )?;
            }
            (Scope::Once, HeldAction::Dns { name, .. }) => {
                // The answer's addresses are learned as for a listed name, for its TTL.
                self.ask
                    .names
                    .approve(&r.agent, None, name, now + ONCE_NAME.as_nanos() as u64);
            }
            (Scope::Task, HeldAction::Dns { name, .. }) => {
                let until = ttl_ms.map_or(u64::MAX, |ms| now.saturating_add(ms * 1_000_000));
                self.ask.names.approve(&r.agent, Some(&task), name, until);
            }
            // `run` connects the very socket it held; a task grant lives in that `run`
            // (AskAnswer::grant_ms). Nothing goes into the kernel: the connector's connect runs
            // no unix hook.
            (Scope::Once | Scope::Task, HeldAction::Unix { .. }) => {}
            (scope, HeldAction::Open { device, inode, .. }) => {
                self.approve_open(r, scope, ttl_ms, (*device, *inode), now)?;
            }
            (Scope::Once, action) => {
                // An exact task grant with a short expiry of its own, outside the grant book (the
                // task's other grants keep their expiry); the kernel refuses it after that.
                let (connect, exec) = grant_texts_of(action);
                let (net, execs) = crate::policy::parse_grants(&connect, &exec)?;
                let number = self.grants.number(&r.agent, &task);
                let tables = crate::policy::compile_grants(number, &task, &net, &execs)?;
                let expires_ns = now + ONCE_ENTRY.as_nanos() as u64;
                super::grant_book::GrantTables::set_task_grants(
                    &mut self.kernel,
                    &tables,
                    common::Expiry { expires_ns },
                )?;
                let connect = match action {
                    HeldAction::Connect { address, port, .. } => {
                        Some((crate::policy::to_table_addr(*address), *port))
                    }
                    _ => None,
                };
                self.ask.once.add(
                    r.id,
                    expires_ns,
                    OnceEntry {
                        tables,
                        task: number,
                        connect,
                    },
                );
            }
            (Scope::Task, action) => {
                let (connect, exec) = grant_texts_of(action);
                let number = self.grants.number(&r.agent, &task);
                self.grants.start(
                    &mut self.kernel,
                    number,
                    &task,
                    &connect,
                    &exec,
                    ttl_ms,
                    now,
                )?;
            }
            (Scope::Always, action) => {
                let (list, entry) = entry_of(action);
                let comment = format!(
                    "request {}: {} by agent {} task {}, approved by {approver} at {}",
                    r.id,
                    describe(action),
                    r.agent,
                    task,
                    humantime::format_rfc3339_seconds(SystemTime::now())
                );
                let dir = self.generations.dir().to_path_buf();
                let previous = approved_file::append(&dir, &r.agent, list, &entry, &comment)?;
                if let Err(why) = self.reload(&format!("ask approval {}", r.id)) {
                    if let Err(e) = approved_file::restore(&previous) {
                        tracing::error!(
                            "putting {} back after a failed reload: {e}",
                            previous.path.display()
                        );
                    }
                    anyhow::bail!("{why}");
                }
            }
        }
        Ok(vec![ALL_PORTS])
    }

    /// Answers the held calls of a request that ended and reports it.
    fn finish(&mut self, ended: Ended<Waiter>, ports: Option<Vec<PortRange>>) {
        self.finish_granting(ended, ports, None);
    }

    /// [`finish`](Self::finish), telling `run` how long it keeps a unix socket's task grant.
    fn finish_granting(
        &mut self,
        ended: Ended<Waiter>,
        ports: Option<Vec<PortRange>>,
        grant_ms: Option<u64>,
    ) {
        let allow = ended.approved();
        let c = &mut self.ask.counters;
        match ended.outcome.verdict.as_str() {
            "approved" => c.approved += 1,
            "timeout" => c.timeout += 1,
            "withdrawn" => c.withdrawn += 1,
            _ => c.denied += 1,
        }
        if ended.outcome.verdict != "withdrawn" {
            c.decision_seconds
                .0
                .observe(ended.waited_ns as f64 / 1_000_000_000.0);
        }
        if !allow
            && ended.outcome.verdict != "withdrawn"
            && let HeldAction::Dns { name, .. } = &ended.request.action
        {
            let until = monotonic_ns() + ONCE_NAME.as_nanos() as u64;
            let task = ended.request.task.as_deref();
            self.ask
                .denied_names
                .approve(&ended.request.agent, task, name, until);
        }
        let ports = ports.unwrap_or_default();
        for w in ended.waiters {
            answer(w, allow, ports.clone(), Some(&ended.outcome), grant_ms);
        }
        self.report_decided(&ended.request, &ended.outcome, ended.waited_ns);
        if let Ok(line) = serde_json::to_string(&PendingEvent::Decided(ended.outcome)) {
            let _ = self.ask.followers.send(line);
        }
    }

    /// A connect the kernel allowed by a task grant: if it used up a `once` approval's entry,
    /// the entry goes now (the approval was for that call only).
    pub(super) fn ask_saw_connect(&mut self, c: &event::ConnectEvent) {
        let key = (crate::policy::to_table_addr(c.addr), c.port);
        let task = c.subject.task;
        if let Some(entry) = self
            .ask
            .once
            .take_used(|e| e.task == task && e.connect == Some(key))
            && let Err(e) =
                super::grant_book::GrantTables::remove_task_grants(&mut self.kernel, &entry.tables)
        {
            tracing::warn!("removing a used once approval's kernel entry: {e:#}");
        }
    }

    /// An exec the kernel allowed by a task grant: which ask approval allowed it, if one did
    /// (a `once` script grant is used up now).
    pub(super) fn ask_saw_exec(&mut self, e: &event::ExecEvent) -> Option<String> {
        if self.ask.exec_grants.len() == 0 {
            return None;
        }
        let seen = SeenExec {
            task: e.subject.task,
            file_dev: e.file_dev,
            file_ino: e.file_ino,
            path: &e.path,
            script: e.interpreter.is_some(),
        };
        self.ask.exec_grants.saw_exec(&mut self.kernel, &seen)
    }

    /// The exec approvals of task `number` as `status` lists them among the task's grants.
    pub(super) fn ask_exec_grant_texts(&self, number: u32, now: u64) -> Vec<String> {
        self.ask
            .exec_grants
            .of_task(number)
            .map(|(text, expires_ns)| match expires_ns {
                u64::MAX => format!("{text}, until task end"),
                t => format!("{text}, {} s left", t.saturating_sub(now) / 1_000_000_000),
            })
            .collect()
    }

    /// `task end`: the task's exec approvals leave the kernel too; returns how many there were.
    pub(super) fn ask_task_ended(&mut self, agent: &str, task: &str) -> usize {
        let files = self.ask_files_task_ended(agent, task);
        files
            + match self.grants.find(agent, task) {
                Some(number) => self.ask.exec_grants.end_task(&mut self.kernel, number),
                None => 0,
            }
    }

    /// Timeouts, the end of `once` entries, and (at the sweep) requests of exited processes.
    pub(super) fn ask_tick(&mut self, check_liveness: bool) {
        let now = monotonic_ns();
        for e in self.ask.desk.expire(now) {
            self.finish(e, None);
        }
        self.ask.exec_grants.expire(&mut self.kernel, now);
        for entry in self.ask.once.due(now) {
            if let Err(e) =
                super::grant_book::GrantTables::remove_task_grants(&mut self.kernel, &entry.tables)
            {
                tracing::warn!("removing a once approval's kernel entry: {e:#}");
            }
        }
        if check_liveness && self.ask.desk.len() > 0 {
            let gone: std::collections::HashSet<u32> = self
                .ask
                .desk
                .pids()
                .filter(|&pid| pid != 0 && !identity::procfs::running(pid))
                .collect();
            if !gone.is_empty() {
                let ended = self.ask.desk.withdraw(
                    |r| {
                        gone.contains(&r.pid)
                            .then(|| format!("process {} exited while its call was held", r.pid))
                    },
                    now,
                );
                for e in ended {
                    self.finish(e, None);
                }
            }
            let grants = &self.grants;
            self.ask
                .names
                .expire(now, |agent, task| grants.find(agent, task).is_none());
            self.ask
                .denied_names
                .expire(now, |agent, task| grants.find(agent, task).is_none());
        }
        if check_liveness {
            self.ask_files_sweep(now);
        }
    }

    fn ask_notice(&self, r: &PendingRequest, verdict: &str, message: String) -> Notice {
        let level = match verdict {
            "pending" | "approved" => Level::Notice,
            _ => Level::Warning,
        };
        let mut n = Notice::new(message_id::ASK_REQUEST, level, message)
            .field("AGENT_ID", &r.agent)
            .field("TASK_ID", r.task.as_deref().unwrap_or("?"))
            // ACTION=ask: a request, not an action the kernel judged (readers of the trail, such
            // as `policy suggest`, count it without judging it); HELD_ACTION says what waits.
            .field("ACTION", "ask")
            .field("HELD_ACTION", action_kind(&r.action))
            .field("VERDICT", verdict)
            .field("REQUEST_ID", r.id)
            .field("PID", r.pid);
        if let Some(uid) = r.uid {
            n = n.field("AGENT_UID", uid);
        }
        match &r.action {
            HeldAction::Dns { name, .. } => n = n.field("DNS_NAME", name),
            HeldAction::Connect {
                transport,
                address,
                port,
                host,
            } => {
                n = n
                    .field("DEST_ADDR", address)
                    .field("DEST_PORT", port)
                    .field("DEST_TRANSPORT", transport);
                if let Some(h) = host {
                    n = n.field("DEST_HOST", h);
                }
            }
            HeldAction::Exec { path, .. } => n = n.field("EXE", path),
            HeldAction::Unix { .. } => n = super::unix_ask::notice_fields(n, &r.action),
            HeldAction::Open {
                path, open_flags, ..
            } => n = n.field("FILE_PATH", path).field("OPEN_FLAGS", open_flags),
        }
        n
    }

    fn report_held(&mut self, r: &PendingRequest) {
        let msg = format!(
            "agent {} task {}: {} held as request {} (ask mode), waiting for a decision",
            r.agent,
            r.task.as_deref().unwrap_or("?"),
            describe(&r.action),
            r.id
        );
        let n = self.ask_notice(r, "pending", msg);
        self.report_ask(r, n);
    }

    /// To journald as a notice, and to the JSON trail as a record with the same fields (JSON
    /// names: lower case, `uid` for `AGENT_UID`), the time, SPIFFE id and process chain.
    fn report_ask(&mut self, r: &PendingRequest, n: Notice) {
        let mut record = serde_json::Map::new();
        for (name, value) in &n.fields {
            let key = match *name {
                "AGENT_UID" => "uid".to_string(),
                other => other.to_ascii_lowercase(),
            };
            let value = match value.parse::<u64>() {
                Ok(number) if matches!(*name, "PID" | "AGENT_UID" | "REQUEST_ID" | "DEST_PORT") => {
                    serde_json::Value::from(number)
                }
                _ => serde_json::Value::from(value.as_str()),
            };
            record.insert(key, value);
        }
        record.insert("agent_spiffe_id".into(), r.spiffe_id.clone().into());
        record.insert(
            "process_chain".into(),
            serde_json::to_value(&r.chain).unwrap_or_default(),
        );
        record.insert("message".into(), n.message.clone().into());
        record.insert(
            "time".into(),
            humantime::format_rfc3339_nanos(SystemTime::now())
                .to_string()
                .into(),
        );
        self.reporter.record(&serde_json::Value::Object(record));
        self.reporter.notice(n);
    }

    fn report_decided(&mut self, r: &PendingRequest, o: &Outcome, waited_ns: u64) {
        let scope = o.scope.map(|s| match s {
            Scope::Once => "once",
            Scope::Task => "task",
            Scope::Always => "always",
        });
        let msg = format!(
            "agent {} task {}: request {} ({}) {}{} by {} after {} ms{}",
            r.agent,
            r.task.as_deref().unwrap_or("?"),
            r.id,
            describe(&r.action),
            o.verdict,
            scope.map(|s| format!(" ({s})")).unwrap_or_default(),
            o.approver,
            waited_ns / 1_000_000,
            o.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        let mut n = self
            .ask_notice(r, &o.verdict, msg)
            .field("APPROVER", &o.approver);
        if let Some(s) = scope {
            n = n.field("DECISION_SCOPE", s);
        }
        if let Some(reason) = &o.reason {
            n = n.field("REASON", reason);
        }
        self.report_ask(r, n);
    }
}

/// `--allow-connect` / `--allow-exec` texts of an action (as `task start` takes them).
fn grant_texts_of(a: &HeldAction) -> (Vec<String>, Vec<String>) {
    match a {
        HeldAction::Connect { address, port, .. } => (
            vec![std::net::SocketAddr::new(*address, *port).to_string()],
            vec![],
        ),
        HeldAction::Exec { path, .. } => (vec![], vec![path.clone()]),
        HeldAction::Dns { .. } | HeldAction::Open { .. } | HeldAction::Unix { .. } => {
            (vec![], vec![])
        }
    }
}
