//! Ask mode in the file guard: the opens of denied files by ask-mode agents that wait for the
//! daemon's decision (the hold book), and the task approvals the daemon gave (the grant set),
//! consulted before an open is held again. Pure: the clock is a `now_ns` argument
//! (CLOCK_MONOTONIC, the daemon's clock too) and a held open is any `E` (the fanotify event in
//! the guard, a number in the tests), so the bounds and timeouts are tested without root.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::OpenReport;
use super::judge::FileId;

/// Opens held at once for one agent, at most; beyond it an open is refused (and counted).
pub const HELD_PER_AGENT: usize = 64;
/// Opens held at once in all, at most (each keeps the kernel's descriptor of its file).
pub const HELD_TOTAL: usize = 512;
/// What the guard waits beyond the daemon's ask timeout before it refuses a held open itself:
/// the daemon's timeout answers first; this only bounds an open whose daemon went silent.
pub const GUARD_MARGIN: Duration = Duration::from_secs(5);

/// A held open, as the guard tells the daemon (`FileReport::Hold`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOpen {
    /// The guard's number for it: the daemon's decision names it.
    pub hold: u64,
    /// Who opened what; `verdict` is `denied` (what it becomes without an approval).
    pub open: OpenReport,
}

/// A task approval of an open: the agent's task (as `run`'s cgroup names it) may open this file
/// until `until_ns` (CLOCK_MONOTONIC; `u64::MAX`: until the daemon revokes it at the task's end).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileGrant {
    pub agent: String,
    pub task: String,
    pub file: FileId,
    pub until_ns: u64,
}

/// Why the guard refused an ask-mode open itself, without a decision of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("ask mode: no daemon is connected to ask; denied (fail closed)")]
    NoDaemon,
    #[error(
        "ask mode: {held} opens of agent {agent} are held already (at most {HELD_PER_AGENT}); \
         denied ({refused} refused so)"
    )]
    AgentFull {
        agent: String,
        held: usize,
        refused: u64,
    },
    #[error("ask mode: {HELD_TOTAL} opens are held already; denied ({refused} refused so)")]
    Full { refused: u64 },
    #[error(
        "ask mode: the guard's queue to the daemon was full, so it could not ask; denied \
         (counted among the lost reports)"
    )]
    QueueFull,
    #[error("ask mode: held, then the daemon went away before deciding; denied (fail closed)")]
    DaemonGone,
    #[error(
        "ask mode: held, and no decision came within the daemon's ask timeout and {} s more; \
         denied",
        GUARD_MARGIN.as_secs()
    )]
    Timeout,
}

struct Held<E> {
    event: E,
    report: OpenReport,
    deadline_ns: u64,
}

/// The held opens: bounded per agent and in all, each with a deadline of its own.
pub struct HoldBook<E> {
    next: u64,
    held: BTreeMap<u64, Held<E>>,
    deadlines: BTreeSet<(u64, u64)>,
    per_agent: HashMap<String, usize>,
    per_agent_limit: usize,
    total_limit: usize,
    /// Opens refused because a bound was reached, since the guard started.
    pub refused_full: u64,
}

impl<E> Default for HoldBook<E> {
    /// Numbered from the clock, so that no two guards of one boot (one replacing another) give
    /// the same number: a late decision meant for a guard that is gone never answers another
    /// guard's open.
    fn default() -> Self {
        HoldBook {
            next: monotonic_ns().max(1),
            ..HoldBook::with_limits(HELD_PER_AGENT, HELD_TOTAL)
        }
    }
}

impl<E> HoldBook<E> {
    pub fn with_limits(per_agent_limit: usize, total_limit: usize) -> Self {
        HoldBook {
            next: 1,
            held: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            per_agent: HashMap::new(),
            per_agent_limit,
            total_limit,
            refused_full: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds `event` until a decision or `deadline_ns`; its number, or (past a bound) the
    /// event back with the refusal (the caller denies it and reports it).
    pub fn hold(
        &mut self,
        event: E,
        report: OpenReport,
        deadline_ns: u64,
    ) -> Result<u64, (E, OpenReport, Refusal)> {
        let agent_held = self.per_agent.get(&report.agent).copied().unwrap_or(0);
        if agent_held >= self.per_agent_limit {
            self.refused_full += 1;
            let why = Refusal::AgentFull {
                agent: report.agent.clone(),
                held: agent_held,
                refused: self.refused_full,
            };
            return Err((event, report, why));
        }
        if self.held.len() >= self.total_limit {
            self.refused_full += 1;
            let why = Refusal::Full {
                refused: self.refused_full,
            };
            return Err((event, report, why));
        }
        let id = self.next;
        self.next += 1;
        *self.per_agent.entry(report.agent.clone()).or_default() += 1;
        self.deadlines.insert((deadline_ns, id));
        self.held.insert(
            id,
            Held {
                event,
                report,
                deadline_ns,
            },
        );
        Ok(id)
    }

    /// The daemon's decision of `hold`: the event to answer (None: unknown, or ended already by
    /// a timeout or the daemon's going).
    pub fn decide(&mut self, hold: u64) -> Option<(E, OpenReport)> {
        let h = self.held.remove(&hold)?;
        self.deadlines.remove(&(h.deadline_ns, hold));
        if let Some(n) = self.per_agent.get_mut(&h.report.agent) {
            *n -= 1;
            if *n == 0 {
                self.per_agent.remove(&h.report.agent);
            }
        }
        Some((h.event, h.report))
    }

    /// The held opens whose deadline passed (to deny).
    pub fn expire(&mut self, now_ns: u64) -> Vec<(E, OpenReport)> {
        let due: Vec<u64> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ns)
            .map(|(_, id)| *id)
            .collect();
        due.into_iter().filter_map(|id| self.decide(id)).collect()
    }

    /// Every held open (the daemon went away: all are denied).
    pub fn drain(&mut self) -> Vec<(E, OpenReport)> {
        let ids: Vec<u64> = self.held.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.decide(id)).collect()
    }

    /// When the first held open times out.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }
}

/// The task approvals of opens in force, as the daemon last sent them (whole).
#[derive(Debug, Default)]
pub struct GrantSet {
    by_file: HashMap<FileId, Vec<FileGrant>>,
}

impl GrantSet {
    pub fn new(grants: Vec<FileGrant>) -> GrantSet {
        let mut by_file: HashMap<FileId, Vec<FileGrant>> = HashMap::new();
        for g in grants {
            by_file.entry(g.file).or_default().push(g);
        }
        GrantSet { by_file }
    }

    /// Whether `task` of `agent` may open `file` now. A selector agent's opener has no task the
    /// guard can read: no task approval covers it.
    pub fn covers(&self, agent: &str, task: Option<&str>, file: FileId, now_ns: u64) -> bool {
        let Some(task) = task else {
            return false;
        };
        self.by_file.get(&file).is_some_and(|gs| {
            gs.iter()
                .any(|g| g.agent == agent && g.task == task && g.until_ns > now_ns)
        })
    }
}

/// CLOCK_MONOTONIC in ns: system-wide, so the daemon's grant expiries mean the same here.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Verdict;

    fn report(agent: &str) -> OpenReport {
        OpenReport {
            time: std::time::UNIX_EPOCH,
            tid: 7,
            pid: 7,
            uid: 0,
            comm: "cat".into(),
            agent: agent.into(),
            task: Some("t1".into()),
            verdict: Verdict::Denied,
            rule: "files.deny \"/x\" (line 3)".into(),
            path: "/x".into(),
            open_flags: "O_RDONLY".into(),
            file: (1, 2),
            held: None,
        }
    }

    #[test]
    fn holds_are_bounded_per_agent_and_in_all_and_the_refusals_counted() {
        let mut b: HoldBook<u32> = HoldBook::with_limits(2, 3);
        assert_eq!(b.hold(1, report("a"), 100).ok(), Some(1));
        assert_eq!(b.hold(2, report("a"), 100).ok(), Some(2));
        let Err((event, _, why)) = b.hold(3, report("a"), 100) else {
            panic!("a third open of agent a was held")
        };
        assert_eq!(event, 3, "the refused event comes back to be answered");
        assert!(
            matches!(
                why,
                Refusal::AgentFull {
                    held: 2,
                    refused: 1,
                    ..
                }
            ),
            "{why:?}"
        );
        assert_eq!(
            b.hold(4, report("b"), 100).ok(),
            Some(3),
            "another agent still"
        );
        let Err((_, _, why)) = b.hold(5, report("c"), 100) else {
            panic!("past the total")
        };
        assert_eq!(why, Refusal::Full { refused: 2 });
        assert_eq!(b.refused_full, 2);
        // A decision frees a place of its agent.
        assert_eq!(b.decide(1).map(|(e, _)| e), Some(1));
        assert_eq!(b.hold(6, report("a"), 100).ok(), Some(4));
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn a_decision_of_an_unknown_or_ended_hold_changes_nothing() {
        let mut b: HoldBook<u32> = HoldBook::default();
        assert!(b.decide(42).is_none(), "never held");
        let id = b.hold(1, report("a"), 100).expect("held");
        assert_eq!(b.expire(100).len(), 1);
        assert!(b.decide(id).is_none(), "timed out already");
        assert_eq!(b.len(), 0);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn holds_time_out_in_deadline_order_and_the_rest_wait() {
        let mut b: HoldBook<u32> = HoldBook::default();
        b.hold(1, report("a"), 300).expect("held");
        b.hold(2, report("a"), 100).expect("held");
        b.hold(3, report("b"), 200).expect("held");
        assert_eq!(b.next_deadline(), Some(100));
        assert!(b.expire(99).is_empty());
        let due: Vec<u32> = b.expire(200).into_iter().map(|(e, _)| e).collect();
        assert_eq!(due, [2, 3]);
        assert_eq!(b.next_deadline(), Some(300));
        let rest: Vec<u32> = b.drain().into_iter().map(|(e, _)| e).collect();
        assert_eq!(rest, [1], "the daemon went: every held open is denied");
        assert_eq!(b.len(), 0);
        let last = b.next - 1;
        assert!(
            b.hold(4, report("a"), 1).expect("held") > last,
            "numbers are never reused"
        );
        let other: HoldBook<u32> = HoldBook::default();
        assert!(
            other.next > last,
            "a later guard numbers past an earlier one"
        );
    }

    #[test]
    fn a_task_approval_covers_its_task_and_file_until_it_expires() {
        let g = GrantSet::new(vec![FileGrant {
            agent: "coder".into(),
            task: "t1".into(),
            file: (1, 2),
            until_ns: 1_000,
        }]);
        assert!(g.covers("coder", Some("t1"), (1, 2), 999));
        assert!(!g.covers("coder", Some("t1"), (1, 2), 1_000), "expired");
        assert!(!g.covers("coder", Some("t2"), (1, 2), 0), "another task");
        assert!(!g.covers("other", Some("t1"), (1, 2), 0), "another agent");
        assert!(!g.covers("coder", Some("t1"), (1, 3), 0), "another file");
        assert!(
            !g.covers("coder", None, (1, 2), 0),
            "a selector agent's opener"
        );
    }

    #[test]
    fn held_opens_survive_the_wire_whole() {
        let h = HeldOpen {
            hold: 9,
            open: report("coder"),
        };
        let text = serde_json::to_string(&super::super::FileReport::Hold(h.clone())).unwrap();
        let back: super::super::FileReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, super::super::FileReport::Hold(h));
    }
}
