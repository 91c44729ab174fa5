//! Ask mode for unix connects in `run`'s supervisor: the connects held while the daemon decides
//! (each with the socket its name led to, resolved once), and the grants approvals leave in this
//! `run` (by socket identity: `task` until the approval's `--ttl`, `always` until the `run` ends,
//! as the reloaded `[unix] allow` list reaches only agents started after it). Pure bookkeeping;
//! the supervisor does the I/O (unix_connect.rs connects, ask_supervisor.rs asks).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::unix_connect::HeldConnect;
use super::unix_judge::SocketIdentity;
use crate::control::{HeldAction, Outcome, Scope};

/// One grant: a socket this `run` connects without asking, until `until` (None: until it ends).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    socket: SocketIdentity,
    until: Option<Instant>,
    /// The report's reason for the connects it allows.
    why: String,
}

/// The held unix connects and the grants of one `run`.
pub struct UnixAsk<H = HeldConnect> {
    /// Notification id → the held connect.
    held: HashMap<u64, H>,
    grants: Vec<Grant>,
}

impl<H> Default for UnixAsk<H> {
    fn default() -> Self {
        UnixAsk {
            held: HashMap::new(),
            grants: Vec::new(),
        }
    }
}

impl<H> UnixAsk<H> {
    /// Holds `connect` (notification `id`) until the daemon answers.
    pub fn hold(&mut self, id: u64, connect: H) {
        self.held.insert(id, connect);
    }

    /// The held connect of notification `id`, if it is one (the answer then connects it).
    pub fn take(&mut self, id: u64) -> Option<H> {
        self.held.remove(&id)
    }

    /// Forgets held connects no longer held (refused when the channel broke, or their caller
    /// went away).
    pub fn retain_held(&mut self, still_held: impl Fn(u64) -> bool) {
        self.held.retain(|&id, _| still_held(id));
    }

    #[cfg(test)]
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Why `socket` may be connected without asking, if a grant in force says so.
    pub fn granted(&self, socket: SocketIdentity, now: Instant) -> Option<String> {
        self.grants
            .iter()
            .find(|g| g.socket == socket && g.until.is_none_or(|t| now < t))
            .map(|g| g.why.clone())
    }

    /// The daemon approved held connect of `socket` with `outcome` (`grant_ms`: a `task`
    /// approval's ttl); records the grant it leaves and returns the released connect's reason.
    pub fn approved(
        &mut self,
        socket: SocketIdentity,
        outcome: Option<&Outcome>,
        grant_ms: Option<u64>,
        now: Instant,
    ) -> String {
        let Some(o) = outcome else {
            // Allowed without asking (the daemon found a grant): this call only.
            return "allowed by the daemon without asking (ask mode)".into();
        };
        let until = match o.scope {
            Some(Scope::Task) => grant_ms.map(|ms| now + Duration::from_millis(ms)),
            Some(Scope::Always) => None,
            Some(Scope::Once) | None => {
                return format!("approved once (request {}, by {})", o.id, o.approver);
            }
        };
        let scope = if o.scope == Some(Scope::Task) {
            "for the task"
        } else {
            "always"
        };
        let why = format!(
            "the socket it resolves to was approved {scope} (request {}, by {})",
            o.id, o.approver
        );
        self.grants.retain(|g| g.socket != socket);
        self.grants.push(Grant {
            socket,
            until,
            why: why.clone(),
        });
        format!("approved {scope} (request {}, by {})", o.id, o.approver)
    }

    /// Drops grants that ran out.
    pub fn expire(&mut self, now: Instant) {
        self.grants.retain(|g| g.until.is_none_or(|t| now < t));
    }
}

/// What `run` asks the daemon about a held unix connect.
pub fn action(h: &HeldConnect) -> HeldAction {
    HeldAction::Unix {
        path: h.path.clone(),
        resolved: h.resolved.clone(),
        device: h.identity.device,
        inode: h.identity.inode,
        sock_type: h.sock_type().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: SocketIdentity = SocketIdentity {
        device: 22,
        inode: 900,
    };
    const OTHER: SocketIdentity = SocketIdentity {
        device: 22,
        inode: 901,
    };

    fn outcome(scope: Scope) -> Outcome {
        Outcome {
            id: 7,
            verdict: "approved".into(),
            scope: Some(scope),
            approver: "uid 0 (root)".into(),
            reason: None,
        }
    }

    #[test]
    fn a_once_approval_leaves_no_grant() {
        let mut a: UnixAsk<()> = UnixAsk::default();
        let now = Instant::now();
        let why = a.approved(ENGINE, Some(&outcome(Scope::Once)), None, now);
        assert!(why.contains("once") && why.contains("request 7"), "{why}");
        assert_eq!(a.granted(ENGINE, now), None);
    }

    #[test]
    fn a_task_approval_grants_that_socket_until_its_ttl() {
        let mut a: UnixAsk<()> = UnixAsk::default();
        let now = Instant::now();
        a.approved(ENGINE, Some(&outcome(Scope::Task)), Some(60_000), now);
        assert!(a.granted(ENGINE, now).is_some());
        assert!(a.granted(ENGINE, now + Duration::from_secs(59)).is_some());
        // Another socket (a name now leading elsewhere) is not covered.
        assert_eq!(a.granted(OTHER, now), None);
        assert_eq!(a.granted(ENGINE, now + Duration::from_secs(60)), None);
        a.expire(now + Duration::from_secs(61));
        assert_eq!(a.grants.len(), 0);
    }

    #[test]
    fn a_task_approval_without_ttl_and_always_last_as_long_as_the_run() {
        let mut a: UnixAsk<()> = UnixAsk::default();
        let now = Instant::now();
        a.approved(ENGINE, Some(&outcome(Scope::Task)), None, now);
        a.approved(OTHER, Some(&outcome(Scope::Always)), None, now);
        let later = now + Duration::from_secs(86_400);
        a.expire(later);
        assert!(a.granted(ENGINE, later).unwrap().contains("for the task"));
        assert!(a.granted(OTHER, later).unwrap().contains("always"));
    }

    #[test]
    fn an_allow_without_outcome_is_for_that_call_only() {
        let mut a: UnixAsk<()> = UnixAsk::default();
        let now = Instant::now();
        a.approved(ENGINE, None, Some(60_000), now);
        assert_eq!(a.granted(ENGINE, now), None);
    }

    #[test]
    fn held_connects_are_answered_once_and_forgotten_with_their_hold() {
        let mut a: UnixAsk<&str> = UnixAsk::default();
        a.hold(1, "first");
        a.hold(2, "second");
        assert_eq!(a.take(1), Some("first"));
        assert_eq!(a.take(1), None);
        a.retain_held(|id| id != 2);
        assert_eq!((a.take(2), a.held_count()), (None, 0));
    }
}
