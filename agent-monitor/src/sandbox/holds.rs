//! The calls `run` holds for an ask-mode agent while the daemon decides: call numbers (the
//! ask channel's `call`) matched to seccomp notification ids, and the answer each notification
//! gets. Pure bookkeeping; the supervisor does the I/O.
//!
//! The rule this module keeps: a notification is let through (CONTINUE) only when the daemon
//! allowed every call asked for it; one deny, a broken channel or a caller that went away ends
//! it with an error or forgets it. Nothing here ever answers CONTINUE on its own.

use std::collections::HashMap;

/// What kind of call is held: it decides the error a refusal returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldKind {
    /// connect, sendto, sendmsg, sendmmsg: EPERM, as the kernel's cgroup hooks refuse.
    Network,
    /// execve, execveat: EACCES, as execve(2) says a file may not be executed (shells print
    /// "Permission denied" and exit 126). The kernel's own exec refusal (sched_process_exec,
    /// after the point of no return) kills instead; a held exec can still fail cleanly.
    Exec,
}

impl HeldKind {
    /// The errno a refused call of this kind returns.
    pub fn refusal(self) -> i32 {
        match self {
            HeldKind::Network => libc::EPERM,
            HeldKind::Exec => libc::EACCES,
        }
    }
}

/// How to answer a held notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// SECCOMP_USER_NOTIF_FLAG_CONTINUE: the kernel runs the call and judges it again.
    Continue,
    /// Fail the call with this errno.
    Fail(i32),
}

/// What an answer from the daemon did.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// Answer notification `id` now.
    Release { id: u64, reply: Reply },
    /// Allowed, but other calls asked for the same notification still wait.
    StillWaiting,
    /// Not a call we asked (a daemon bug), or one already ended (denied on another of its
    /// calls, or its caller went away): nothing to do.
    Unknown,
}

/// One held notification.
#[derive(Debug)]
struct Waiting {
    kind: HeldKind,
    /// Its calls not yet allowed.
    calls: Vec<u64>,
    since: std::time::Instant,
}

/// The held notifications and their calls. Call numbers are never reused within a `run`.
#[derive(Debug, Default)]
pub struct HeldCalls {
    next_call: u64,
    /// call number → notification id
    calls: HashMap<u64, u64>,
    /// notification id → what waits on it
    notifications: HashMap<u64, Waiting>,
}

impl HeldCalls {
    /// Holds notification `id`, asking `questions` calls (at least one) for it; returns their
    /// numbers, to be sent in that order.
    pub fn hold(&mut self, id: u64, kind: HeldKind, questions: usize) -> Vec<u64> {
        let numbers: Vec<u64> = (0..questions.max(1))
            .map(|_| {
                self.next_call += 1;
                self.next_call
            })
            .collect();
        for &c in &numbers {
            self.calls.insert(c, id);
        }
        self.notifications.insert(
            id,
            Waiting {
                kind,
                calls: numbers.clone(),
                since: std::time::Instant::now(),
            },
        );
        numbers
    }

    /// The daemon's answer to call `call`.
    pub fn answer(&mut self, call: u64, allow: bool) -> Answered {
        let Some(id) = self.calls.remove(&call) else {
            return Answered::Unknown;
        };
        let Some(waiting) = self.notifications.get_mut(&id) else {
            return Answered::Unknown;
        };
        if !allow {
            let waiting = self.end(id);
            return Answered::Release {
                id,
                reply: Reply::Fail(waiting.map_or(libc::EPERM, |w| w.kind.refusal())),
            };
        }
        waiting.calls.retain(|&c| c != call);
        if waiting.calls.is_empty() {
            self.notifications.remove(&id);
            return Answered::Release {
                id,
                reply: Reply::Continue,
            };
        }
        Answered::StillWaiting
    }

    /// The channel broke (the daemon died or restarted): every held notification is refused.
    pub fn refuse_all(&mut self) -> Vec<(u64, Reply)> {
        self.calls.clear();
        self.notifications
            .drain()
            .map(|(id, w)| (id, Reply::Fail(w.kind.refusal())))
            .collect()
    }

    /// The caller of notification `id` went away (killed): forget it; a later answer to its
    /// calls is [`Answered::Unknown`].
    pub fn forget(&mut self, id: u64) {
        self.end(id);
    }

    fn end(&mut self, id: u64) -> Option<Waiting> {
        let waiting = self.notifications.remove(&id)?;
        for c in &waiting.calls {
            self.calls.remove(c);
        }
        Some(waiting)
    }

    /// Held notification ids, with how long each has waited.
    pub fn held(&self) -> impl Iterator<Item = (u64, std::time::Duration)> + '_ {
        self.notifications
            .iter()
            .map(|(&id, w)| (id, w.since.elapsed()))
    }

    /// How many notifications are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.notifications.len()
    }

    /// How many calls still wait for an answer.
    #[cfg(test)]
    pub fn calls_waiting(&self) -> usize {
        self.calls.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_allow_releases_a_single_call_with_continue() {
        let mut h = HeldCalls::default();
        let calls = h.hold(77, HeldKind::Network, 1);
        assert_eq!(calls, vec![1]);
        assert_eq!(
            h.answer(1, true),
            Answered::Release {
                id: 77,
                reply: Reply::Continue
            }
        );
        assert_eq!(h.len(), 0);
        // Answered twice (a daemon bug): nothing more happens.
        assert_eq!(h.answer(1, true), Answered::Unknown);
    }

    #[test]
    fn deny_fails_network_with_eperm_and_exec_with_eacces() {
        let mut h = HeldCalls::default();
        let net = h.hold(1, HeldKind::Network, 1)[0];
        let exec = h.hold(2, HeldKind::Exec, 1)[0];
        assert_eq!(
            h.answer(exec, false),
            Answered::Release {
                id: 2,
                reply: Reply::Fail(libc::EACCES)
            }
        );
        assert_eq!(
            h.answer(net, false),
            Answered::Release {
                id: 1,
                reply: Reply::Fail(libc::EPERM)
            }
        );
    }

    #[test]
    fn calls_are_numbered_uniquely_and_answered_in_any_order() {
        let mut h = HeldCalls::default();
        let ids: Vec<u64> = (0..1000).map(|i| 5000 + i).collect();
        let calls: Vec<u64> = ids
            .iter()
            .map(|&id| h.hold(id, HeldKind::Network, 1)[0])
            .collect();
        let unique: std::collections::HashSet<_> = calls.iter().collect();
        assert_eq!(unique.len(), 1000);
        assert_eq!(h.len(), 1000);
        for (i, &c) in calls.iter().enumerate().rev() {
            assert_eq!(
                h.answer(c, i % 2 == 0),
                Answered::Release {
                    id: ids[i],
                    reply: if i % 2 == 0 {
                        Reply::Continue
                    } else {
                        Reply::Fail(libc::EPERM)
                    }
                }
            );
        }
        assert_eq!((h.len(), h.calls_waiting()), (0, 0));
    }

    #[test]
    fn several_questions_need_every_allow_and_one_deny_ends_them() {
        let mut h = HeldCalls::default();
        let calls = h.hold(9, HeldKind::Network, 3);
        assert_eq!(h.answer(calls[1], true), Answered::StillWaiting);
        assert_eq!(h.answer(calls[0], true), Answered::StillWaiting);
        assert_eq!(
            h.answer(calls[2], true),
            Answered::Release {
                id: 9,
                reply: Reply::Continue
            }
        );
        let calls = h.hold(10, HeldKind::Network, 2);
        assert_eq!(
            h.answer(calls[0], false),
            Answered::Release {
                id: 10,
                reply: Reply::Fail(libc::EPERM)
            }
        );
        // The other call's allow comes too late: the notification was already refused.
        assert_eq!(h.answer(calls[1], true), Answered::Unknown);
        assert_eq!(h.calls_waiting(), 0);
    }

    #[test]
    fn a_broken_channel_refuses_everything_held_and_never_continues() {
        let mut h = HeldCalls::default();
        h.hold(1, HeldKind::Network, 1);
        h.hold(2, HeldKind::Exec, 2);
        let mut refused = h.refuse_all();
        refused.sort_by_key(|r| r.0);
        assert_eq!(
            refused,
            vec![
                (1, Reply::Fail(libc::EPERM)),
                (2, Reply::Fail(libc::EACCES))
            ]
        );
        assert_eq!((h.len(), h.calls_waiting()), (0, 0));
        // The restarted daemon cannot answer the old calls: they are gone.
        assert_eq!(h.answer(1, true), Answered::Unknown);
    }

    #[test]
    fn a_caller_that_went_away_is_forgotten() {
        let mut h = HeldCalls::default();
        let c = h.hold(4, HeldKind::Exec, 1)[0];
        h.forget(4);
        assert_eq!(h.answer(c, true), Answered::Unknown);
        assert_eq!(h.held().count(), 0);
    }
}
