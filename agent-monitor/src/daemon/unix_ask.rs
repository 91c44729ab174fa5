//! Ask mode for unix sockets, the daemon's part: what a held unix connect's request says in
//! journald and the trail, how long `run` keeps a `task` approval, and when `always` can be
//! written. `run`'s supervisor holds the call and connects the socket it resolved
//! (sandbox/unix_ask.rs); nothing of an approval goes into the kernel.

use crate::control::{Decision, HeldAction, Outcome, Scope};
use crate::output::notice::Notice;
use crate::policy::Policy;

/// Why an `always` approval of a unix socket cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum AlwaysError {
    #[error("agent {0:?} has no policy in force")]
    NoPolicy(String),
    #[error(
        "agent {0:?} has no `[unix] allow` list (only unix.deny_known_daemons): `always` adds to \
         that list, and an allow list would refuse every other socket; approve --once or --task, \
         or edit the agent's policy"
    )]
    NoAllowList(String),
}

/// An `always` approval adds the socket to `[unix] allow`: only an agent that has that list.
pub(super) fn check_always(agent: &str, policy: Option<&Policy>) -> Result<(), AlwaysError> {
    let Some(policy) = policy else {
        return Err(AlwaysError::NoPolicy(agent.to_string()));
    };
    match policy.unix().and_then(|u| u.allow()) {
        Some(_) => Ok(()),
        None => Err(AlwaysError::NoAllowList(policy.agent().to_string())),
    }
}

/// How long `run` keeps the grant of an approved unix connect, sent as `AskAnswer::grant_ms`:
/// the `--ttl` of a `task` approval (absent: until the `run` ends). Nothing for other actions
/// or scopes, or when the approval did not stand (an approval that failed became a denial).
pub(super) fn grant_ms(action: &HeldAction, decision: &Decision, outcome: &Outcome) -> Option<u64> {
    match (action, decision) {
        (
            HeldAction::Unix { .. },
            Decision::Allow {
                scope: Scope::Task,
                ttl_ms,
            },
        ) if outcome.scope == Some(Scope::Task) => *ttl_ms,
        _ => None,
    }
}

/// The journald fields of a held unix connect: `DEST_TRANSPORT=unix`, `DEST_PATH` (the name the
/// agent gave) and where it led (`DEST_RESOLVED_PATH`, `DEST_SOCKET` as device:inode).
pub(super) fn notice_fields(mut n: Notice, action: &HeldAction) -> Notice {
    if let HeldAction::Unix {
        path,
        resolved,
        device,
        inode,
        sock_type,
    } = action
    {
        n = n
            .field("DEST_TRANSPORT", "unix")
            .field("DEST_PATH", path)
            .field("DEST_SOCKET", format!("{device}:{inode}"));
        if let Some(r) = resolved {
            n = n.field("DEST_RESOLVED_PATH", r);
        }
        if !sock_type.is_empty() {
            n = n.field("SOCK_TYPE", sock_type);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix() -> HeldAction {
        HeldAction::Unix {
            path: "/tmp/x/listed.sock".into(),
            resolved: Some("/run/engine.sock".into()),
            device: 22,
            inode: 900,
            sock_type: "stream".into(),
        }
    }

    fn outcome(scope: Option<Scope>) -> Outcome {
        Outcome {
            id: 7,
            verdict: if scope.is_some() {
                "approved"
            } else {
                "denied"
            }
            .into(),
            scope,
            approver: "uid 0 (root)".into(),
            reason: None,
        }
    }

    #[test]
    fn only_a_task_approval_of_a_unix_connect_carries_its_ttl() {
        let task = |ttl_ms| Decision::Allow {
            scope: Scope::Task,
            ttl_ms,
        };
        let approved = outcome(Some(Scope::Task));
        assert_eq!(
            grant_ms(&unix(), &task(Some(60_000)), &approved),
            Some(60_000)
        );
        assert_eq!(grant_ms(&unix(), &task(None), &approved), None);
        let once = Decision::Allow {
            scope: Scope::Once,
            ttl_ms: Some(5),
        };
        assert_eq!(grant_ms(&unix(), &once, &outcome(Some(Scope::Once))), None);
        // The approval could not be put in force: it became a denial, nothing to keep.
        assert_eq!(grant_ms(&unix(), &task(Some(60_000)), &outcome(None)), None);
        let exec = HeldAction::Exec {
            path: "/usr/bin/make".into(),
            sha256: None,
            argv: vec![],
            device: None,
            inode: None,
        };
        assert_eq!(grant_ms(&exec, &task(Some(60_000)), &approved), None);
    }

    #[test]
    fn always_needs_an_allow_list() {
        let policy = |text: &str| {
            crate::policy::Policy::parse(text, std::path::Path::new("p.toml")).unwrap()
        };
        let listed =
            policy("agent = \"coder\"\nmode = \"ask\"\n[unix]\nallow = [\"/run/a.sock\"]\n");
        assert_eq!(check_always("coder", Some(&listed)), Ok(()));
        let known =
            policy("agent = \"coder\"\nmode = \"ask\"\n[unix]\ndeny_known_daemons = true\n");
        assert_eq!(
            check_always("coder", Some(&known)),
            Err(AlwaysError::NoAllowList("coder".into()))
        );
        assert!(check_always("coder", None).is_err());
    }

    #[test]
    fn a_held_unix_connect_names_the_socket_and_where_it_led() {
        let n = notice_fields(
            Notice::new("id", crate::output::notice::Level::Notice, "m"),
            &unix(),
        );
        let get = |k: &str| {
            n.fields
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("DEST_TRANSPORT").as_deref(), Some("unix"));
        assert_eq!(get("DEST_PATH").as_deref(), Some("/tmp/x/listed.sock"));
        assert_eq!(
            get("DEST_RESOLVED_PATH").as_deref(),
            Some("/run/engine.sock")
        );
        assert_eq!(get("DEST_SOCKET").as_deref(), Some("22:900"));
    }
}
