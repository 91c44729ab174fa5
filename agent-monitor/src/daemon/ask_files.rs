//! Ask mode for opens of denied files: the file guard holds an ask-mode agent's open and asks
//! (`FileReport::Hold`); here it becomes a request on the ask desk, and a decision goes back to
//! the guard, which answers the held open. `once` allows that open; `task` is a grant of the
//! file (device, inode) to the task, which the guard consults before it holds again; `always`
//! is refused: the policy cannot say "this file despite `files.deny`" (see docs/ask.md).

use super::ask::Waiter;
use super::ask_desk::NewRequest;
use super::*;
use crate::control::{Decision, HeldAction, PendingRequest, Scope};
use crate::files::{FileId, HeldOpen};

/// Why `decision` cannot apply to `r` (it stays held); None: it can.
pub(super) fn scope_refusal(r: &PendingRequest, decision: &Decision) -> Option<String> {
    if !matches!(r.action, HeldAction::Open { .. }) {
        return None;
    }
    match decision {
        Decision::Allow {
            scope: Scope::Always,
            ..
        } => Some(
            "`always` cannot approve an open: the policy has no way to allow a file that \
             `files.deny` names (an exception list would be a new policy feature); approve it \
             --once or --task, or take the entry out of the agent's files.deny and reload"
                .into(),
        ),
        Decision::Allow {
            scope: Scope::Task, ..
        } if r.task.is_none() => Some(format!(
            "a task approval of an open names the task the file guard reads from the opener's \
             cgroup, and agent {} is known by a selector, not started by `agent-monitor run`: \
             approve it --once, or deny it",
            r.agent
        )),
        _ => None,
    }
}

impl Monitor {
    /// An open the file guard holds for an ask-mode agent.
    pub(super) fn on_file_hold(&mut self, h: HeldOpen) {
        let Some(guard) = self.files.decider() else {
            return;
        };
        let o = h.open;
        let mode = self.generations.live().get(&o.agent).map(|p| p.mode());
        if mode != Some(crate::policy::model::Mode::Ask) {
            // The policy changed while the guard held it: judged as the agent is now (denied:
            // the guard refuses what it cannot be told to allow).
            tracing::warn!(
                agent = o.agent,
                path = o.path,
                "a held open of an agent no longer in ask mode: denied"
            );
            guard.decide(h.hold, false);
            return;
        }
        // The chain is the process's; a thread is reported as its process.
        let pid = if o.pid != 0 { o.pid } else { o.tid };
        let chain = self.ident.chain(pid, &o.comm);
        let action = HeldAction::Open {
            path: o.path,
            open_flags: o.open_flags,
            rule: o.rule,
            device: o.file.0,
            inode: o.file.1,
        };
        // The task as the guard read it while the opener waited (None: a selector agent).
        let request = self.pending_request(&o.agent, o.task, Some(o.uid), pid, chain, action);
        self.hold(
            NewRequest { request, key: None },
            Waiter::Open {
                guard,
                hold: h.hold,
            },
        );
    }

    /// What an approval of a held open writes before the guard is told to allow it.
    pub(super) fn approve_open(
        &mut self,
        r: &PendingRequest,
        scope: Scope,
        ttl_ms: Option<u64>,
        file: FileId,
        now: u64,
    ) -> anyhow::Result<()> {
        match scope {
            // The guard allows the held open, that one only.
            Scope::Once => Ok(()),
            Scope::Task => {
                let Some(task) = r.task.as_deref() else {
                    bail!(
                        "{}",
                        scope_refusal(
                            r,
                            &Decision::Allow {
                                scope: Scope::Task,
                                ttl_ms
                            }
                        )
                        .unwrap_or_default()
                    );
                };
                super::grant_book::GrantBook::check_start(task, ttl_ms)?;
                // Known to the grant book, so that the sweep tells a live task from an ended one.
                self.grants.number(&r.agent, task);
                let until = ttl_ms.map_or(u64::MAX, |ms| {
                    now.saturating_add(ms.saturating_mul(1_000_000))
                });
                self.ask.file_grants.grant(&r.agent, task, file, until);
                // Sent before the decision, on the same line: the guard has the grant first.
                self.push_file_grants();
                Ok(())
            }
            Scope::Always => bail!(
                "{}",
                scope_refusal(
                    r,
                    &Decision::Allow {
                        scope: Scope::Always,
                        ttl_ms
                    }
                )
                .unwrap_or_default()
            ),
        }
    }

    fn push_file_grants(&self) {
        self.files.set_grants(self.ask.file_grants.to_wire());
    }

    /// The task ended: its approvals of opens end too; how many there were.
    pub(super) fn ask_files_task_ended(&mut self, agent: &str, task: &str) -> usize {
        let n = self.ask.file_grants.end_task(agent, task);
        if n > 0 {
            self.push_file_grants();
        }
        n
    }

    /// Approvals that ran out, and those of tasks that are gone, leave the guard's set (it
    /// checks expiries itself; this keeps the set small).
    pub(super) fn ask_files_sweep(&mut self, now: u64) {
        let grants = &self.grants;
        if self
            .ask
            .file_grants
            .expire(now, |agent, task| grants.find(agent, task).is_none())
        {
            self.push_file_grants();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_request(task: Option<&str>) -> PendingRequest {
        PendingRequest {
            id: 1,
            agent: "coder".into(),
            spiffe_id: None,
            task: task.map(str::to_string),
            uid: Some(0),
            pid: 7,
            chain: vec![],
            action: HeldAction::Open {
                path: "/root/.aws/credentials".into(),
                open_flags: "O_RDONLY".into(),
                rule: "files.deny \"/root/.aws\" (line 4)".into(),
                device: 1,
                inode: 2,
            },
            held_ms: 0,
            expires_in_ms: 0,
        }
    }

    fn allow(scope: Scope) -> Decision {
        Decision::Allow {
            scope,
            ttl_ms: None,
        }
    }

    #[test]
    fn always_is_refused_for_opens_and_task_needs_a_run_task() {
        let r = open_request(Some("t1"));
        let why = scope_refusal(&r, &allow(Scope::Always)).expect("refused");
        assert!(why.contains("`always` cannot approve an open"), "{why}");
        assert_eq!(scope_refusal(&r, &allow(Scope::Once)), None);
        assert_eq!(scope_refusal(&r, &allow(Scope::Task)), None);
        assert_eq!(scope_refusal(&r, &Decision::Deny { reason: None }), None);
        let selected = open_request(None);
        let why = scope_refusal(&selected, &allow(Scope::Task)).expect("refused");
        assert!(why.contains("known by a selector"), "{why}");
        assert_eq!(scope_refusal(&selected, &allow(Scope::Once)), None);
        // Other kinds are not this module's business.
        let mut exec = open_request(Some("t1"));
        exec.action = HeldAction::Dns {
            name: "pypi.org".into(),
            qtype: "A".into(),
        };
        assert_eq!(scope_refusal(&exec, &allow(Scope::Always)), None);
    }
}
