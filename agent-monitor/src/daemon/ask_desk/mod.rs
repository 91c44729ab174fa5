//! The ask desk: the owner of held requests of ask-mode agents. It numbers them, keeps their
//! deadlines in one ordered map (no timer, thread or fd per request: the monitor waits for
//! [`AskDesk::next_deadline`] only), takes decisions, times requests out (deny, "timeout"),
//! withdraws those whose process went away, and remembers recent outcomes so an id decided twice
//! gets a precise error. Pure: the clock is a `now_ns` argument, the held calls are `W` (whatever
//! answers them: an ask channel line, a DNS proxy's oneshot), so it is tested without root.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::control::{Decision, Outcome, PendingRequest, Scope};

pub(super) mod approved_file;
pub(super) mod approver;
pub(super) mod exec_grants;
pub(super) mod file_grants;
#[cfg(test)]
mod tests;

/// Outcomes kept for "already decided" answers.
const DECIDED_KEPT: usize = 4096;

/// Why a decision was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeskError {
    #[error("no held request {0} (unknown id; `agent-monitor pending` lists the held ones)")]
    Unknown(u64),
    #[error("request {id} was already decided: {verdict} by {approver}")]
    AlreadyDecided {
        id: u64,
        verdict: String,
        approver: String,
    },
    #[error("held requests at their limit ({0}); the call is denied")]
    Full(usize),
    /// The decision cannot apply to this kind of request; it stays held for another decision.
    #[error("request {id}: {why}; it is still held (approve it another way, or deny it)")]
    Refused { id: u64, why: String },
}

/// What a new request is, before the desk numbers it (times are filled in when shown).
pub(super) struct NewRequest {
    pub(super) request: PendingRequest,
    /// Requests with the same key while one is held join it (a resolver's retransmissions, the
    /// A and AAAA queries of one name) instead of making a new one.
    pub(super) key: Option<String>,
}

/// A held request and the calls waiting for it.
struct Held<W> {
    request: PendingRequest,
    key: Option<String>,
    held_ns: u64,
    deadline_ns: u64,
    waiters: Vec<W>,
}

/// How [`AskDesk::hold`] took a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hold {
    /// A new request with this id (to report, and to send to the decision service).
    New(u64),
    /// Joined the request already held under the same key.
    Joined(u64),
}

/// A request that ended, with the calls to answer.
pub(super) struct Ended<W> {
    pub(super) request: PendingRequest,
    pub(super) outcome: Outcome,
    /// Time from hold to decision.
    pub(super) waited_ns: u64,
    pub(super) waiters: Vec<W>,
}

impl<W> Ended<W> {
    /// Whether the held calls are to be released (the kernel judges them again).
    pub(super) fn approved(&self) -> bool {
        self.outcome.verdict == "approved"
    }
}

pub(super) struct AskDesk<W> {
    next_id: u64,
    timeout_ns: u64,
    capacity: usize,
    /// By id: oldest first.
    held: BTreeMap<u64, Held<W>>,
    /// (deadline, id): the next timeout is the first.
    deadlines: BTreeSet<(u64, u64)>,
    by_key: HashMap<String, u64>,
    decided: HashMap<u64, Outcome>,
    decided_order: VecDeque<u64>,
}

impl<W> AskDesk<W> {
    pub(super) fn new(timeout_ns: u64, capacity: usize) -> Self {
        AskDesk {
            next_id: 1,
            timeout_ns,
            capacity,
            held: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            by_key: HashMap::new(),
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds `new` until a decision, the timeout, or a withdrawal; `waiter` is answered then.
    /// At capacity the waiter comes back with the error (the caller denies it).
    pub(super) fn hold(
        &mut self,
        new: NewRequest,
        waiter: W,
        now_ns: u64,
    ) -> Result<Hold, (DeskError, W)> {
        if let Some(id) = new.key.as_ref().and_then(|k| self.by_key.get(k)).copied()
            && let Some(h) = self.held.get_mut(&id)
        {
            h.waiters.push(waiter);
            return Ok(Hold::Joined(id));
        }
        if self.held.len() >= self.capacity {
            return Err((DeskError::Full(self.capacity), waiter));
        }
        let id = self.next_id;
        self.next_id += 1;
        let deadline_ns = now_ns.saturating_add(self.timeout_ns);
        let mut request = new.request;
        request.id = id;
        if let Some(k) = &new.key {
            self.by_key.insert(k.clone(), id);
        }
        self.deadlines.insert((deadline_ns, id));
        self.held.insert(
            id,
            Held {
                request,
                key: new.key,
                held_ns: now_ns,
                deadline_ns,
                waiters: vec![waiter],
            },
        );
        Ok(Hold::New(id))
    }

    /// The held requests, oldest first, with their times as of `now_ns`.
    pub(super) fn pending(&self, now_ns: u64) -> Vec<PendingRequest> {
        self.held.values().map(|h| view(h, now_ns)).collect()
    }

    pub(super) fn get(&self, id: u64, now_ns: u64) -> Option<PendingRequest> {
        self.held.get(&id).map(|h| view(h, now_ns))
    }

    /// When the first held request times out (CLOCK_MONOTONIC ns).
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Decides request `id`. `approver` says who ("uid 0 (root)", "approver-url").
    pub(super) fn decide(
        &mut self,
        id: u64,
        decision: &Decision,
        approver: &str,
        now_ns: u64,
    ) -> Result<Ended<W>, DeskError> {
        if !self.held.contains_key(&id) {
            return Err(match self.decided.get(&id) {
                Some(o) => DeskError::AlreadyDecided {
                    id,
                    verdict: o.verdict.clone(),
                    approver: o.approver.clone(),
                },
                None => DeskError::Unknown(id),
            });
        }
        let (verdict, scope, reason) = match decision {
            Decision::Allow { scope, .. } => ("approved", Some(*scope), None),
            Decision::Deny { reason } => ("denied", None, reason.clone()),
        };
        Ok(self.end(id, verdict, scope, approver, reason, now_ns))
    }

    /// Requests whose deadline passed: denied, "timeout".
    pub(super) fn expire(&mut self, now_ns: u64) -> Vec<Ended<W>> {
        let due: Vec<u64> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ns)
            .map(|(_, id)| *id)
            .collect();
        due.into_iter()
            .map(|id| {
                self.end(
                    id,
                    "timeout",
                    None,
                    "timeout",
                    Some("no decision before --ask-timeout: denied".into()),
                    now_ns,
                )
            })
            .collect()
    }

    /// Withdraws the requests `gone` names (their process exited, their `run` went away).
    pub(super) fn withdraw(
        &mut self,
        gone: impl Fn(&PendingRequest) -> Option<String>,
        now_ns: u64,
    ) -> Vec<Ended<W>> {
        let ids: Vec<(u64, String)> = self
            .held
            .iter()
            .filter_map(|(id, h)| gone(&h.request).map(|why| (*id, why)))
            .collect();
        ids.into_iter()
            .map(|(id, why)| self.end(id, "withdrawn", None, "withdrawn", Some(why), now_ns))
            .collect()
    }

    /// Pids of the held requests (for the liveness check).
    pub(super) fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.values().map(|h| h.request.pid)
    }

    fn end(
        &mut self,
        id: u64,
        verdict: &str,
        scope: Option<Scope>,
        approver: &str,
        reason: Option<String>,
        now_ns: u64,
    ) -> Ended<W> {
        let h = self
            .held
            .remove(&id)
            .expect("caller checked the id is held");
        self.deadlines.remove(&(h.deadline_ns, id));
        if let Some(k) = &h.key {
            self.by_key.remove(k);
        }
        let outcome = Outcome {
            id,
            verdict: verdict.to_string(),
            scope,
            approver: approver.to_string(),
            reason,
        };
        self.decided.insert(id, outcome.clone());
        self.decided_order.push_back(id);
        if self.decided_order.len() > DECIDED_KEPT
            && let Some(old) = self.decided_order.pop_front()
        {
            self.decided.remove(&old);
        }
        let waited_ns = now_ns.saturating_sub(h.held_ns);
        let request = view(&h, now_ns);
        Ended {
            request,
            outcome,
            waited_ns,
            waiters: h.waiters,
        }
    }
}

fn view<W>(h: &Held<W>, now_ns: u64) -> PendingRequest {
    PendingRequest {
        held_ms: now_ns.saturating_sub(h.held_ns) / 1_000_000,
        expires_in_ms: h.deadline_ns.saturating_sub(now_ns) / 1_000_000,
        ..h.request.clone()
    }
}

/// Names an approval of scope `once` or `task` lets through without asking again: a resolver
/// retransmits a held query and asks A and AAAA separately, and a `task` approval of a name
/// covers the task's later queries. Keyed by (agent, task or none for any task, name).
#[derive(Default)]
pub(super) struct NameApprovals {
    until: HashMap<(String, Option<String>, String), u64>,
}

impl NameApprovals {
    pub(super) fn approve(&mut self, agent: &str, task: Option<&str>, name: &str, until_ns: u64) {
        let key = (
            agent.to_string(),
            task.map(str::to_string),
            name.to_string(),
        );
        let e = self.until.entry(key).or_insert(0);
        *e = (*e).max(until_ns);
    }

    /// Whether `name` is approved for `agent` (and `task`, when a task approval is asked about).
    pub(super) fn approved(
        &self,
        agent: &str,
        task: Option<&str>,
        name: &str,
        now_ns: u64,
    ) -> bool {
        let live = |t: Option<&str>| {
            self.until
                .get(&(agent.to_string(), t.map(str::to_string), name.to_string()))
                .is_some_and(|&u| u > now_ns)
        };
        live(None) || task.is_some_and(|t| live(Some(t)))
    }

    /// Forgets approvals that ran out; those of a task that ended (`task_gone`).
    pub(super) fn expire(&mut self, now_ns: u64, task_gone: impl Fn(&str, &str) -> bool) {
        self.until.retain(|(agent, task, _), u| {
            *u > now_ns && !task.as_deref().is_some_and(|t| task_gone(agent, t))
        });
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.until.len()
    }
}

/// Kernel entries of `once` approvals, removed after a short while: the held call runs right
/// after its release, and the entry's own expiry makes the kernel refuse it after that anyway.
pub(super) struct OnceEntries<T> {
    entries: BTreeMap<(u64, u64), T>,
}

impl<T> Default for OnceEntries<T> {
    fn default() -> Self {
        OnceEntries {
            entries: BTreeMap::new(),
        }
    }
}

impl<T> OnceEntries<T> {
    pub(super) fn add(&mut self, id: u64, expires_ns: u64, entry: T) {
        self.entries.insert((expires_ns, id), entry);
    }

    /// The entries whose time is over, to remove from the kernel.
    pub(super) fn due(&mut self, now_ns: u64) -> Vec<T> {
        let keep = self.entries.split_off(&(now_ns.saturating_add(1), 0));
        std::mem::replace(&mut self.entries, keep)
            .into_values()
            .collect()
    }

    pub(super) fn next(&self) -> Option<u64> {
        self.entries.first_key_value().map(|((t, _), _)| *t)
    }

    /// Takes the first entry `used` recognises (the released call was seen done), to remove it
    /// from the kernel before its time is over.
    pub(super) fn take_used(&mut self, used: impl Fn(&T) -> bool) -> Option<T> {
        let key = *self.entries.iter().find(|(_, e)| used(e))?.0;
        self.entries.remove(&key)
    }
}
