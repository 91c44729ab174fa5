//! Task approvals of opens: `approve --task` of an open held by the file guard lets that task of
//! the agent open that file (by device and inode) until the approval's expiry or the task's end.
//! The file guard consults them before it holds an open again; this book is the daemon's copy,
//! sent to the guard whole whenever it changes (and to a new guard again). Pure.

use std::collections::BTreeMap;

use crate::files::{FileGrant, FileId};

#[derive(Debug, Default)]
pub(crate) struct FileGrants {
    /// (agent, task, file) → until (CLOCK_MONOTONIC ns; `u64::MAX`: until the task ends).
    until: BTreeMap<(String, String, FileId), u64>,
}

impl FileGrants {
    /// Grants `file` to `task` of `agent` until `until_ns` (a later expiry of the same grant
    /// wins).
    pub(crate) fn grant(&mut self, agent: &str, task: &str, file: FileId, until_ns: u64) {
        let e = self
            .until
            .entry((agent.to_string(), task.to_string(), file))
            .or_insert(0);
        *e = (*e).max(until_ns);
    }

    /// Ends the task's approvals; how many there were.
    pub(crate) fn end_task(&mut self, agent: &str, task: &str) -> usize {
        let before = self.until.len();
        self.until.retain(|(a, t, _), _| !(a == agent && t == task));
        before - self.until.len()
    }

    /// Forgets the approvals that ran out or whose task is gone; whether any went.
    pub(crate) fn expire(&mut self, now_ns: u64, task_gone: impl Fn(&str, &str) -> bool) -> bool {
        let before = self.until.len();
        self.until
            .retain(|(agent, task, _), until| *until > now_ns && !task_gone(agent, task));
        before != self.until.len()
    }

    /// The whole set, as the guard takes it.
    pub(crate) fn to_wire(&self) -> Vec<FileGrant> {
        self.until
            .iter()
            .map(|((agent, task, file), until)| FileGrant {
                agent: agent.clone(),
                task: task.clone(),
                file: *file,
                until_ns: *until,
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_end_with_their_time_or_their_task() {
        let mut g = FileGrants::default();
        g.grant("coder", "t1", (1, 2), 100);
        g.grant("coder", "t1", (1, 2), 50);
        g.grant("coder", "t2", (1, 2), u64::MAX);
        g.grant("other", "t1", (1, 3), u64::MAX);
        assert_eq!(g.len(), 3, "the same grant twice is one");
        assert_eq!(g.to_wire()[0].until_ns, 100, "the later expiry wins");
        assert!(!g.expire(99, |_, _| false));
        assert!(g.expire(100, |_, _| false), "t1's ran out");
        assert_eq!(g.len(), 2);
        assert!(g.expire(100, |a, t| a == "other" && t == "t1"), "task gone");
        assert_eq!(g.end_task("coder", "t2"), 1);
        assert_eq!(g.len(), 0);
        assert_eq!(g.end_task("coder", "t2"), 0);
    }
}
