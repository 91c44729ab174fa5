//! Held requests of ask-mode agents, on the wire: what `pending`, `approve`, `deny`, `top` and the
//! decision service (`--approver-url`) see. One shape for all of them, so a request looks the
//! same wherever an operator or a service meets it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One held action, waiting for a decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PendingRequest {
    /// The daemon's number for it, unique for the daemon's lifetime (`approve ID`, `deny ID`).
    pub id: u64,
    pub agent: String,
    /// The agent's workload identity, when the daemon has one.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    /// The process whose call is held.
    pub pid: u32,
    /// From the held process up to the agent's first process.
    #[serde(default)]
    pub chain: Vec<ChainProcess>,
    pub action: HeldAction,
    /// How long the call has been held, when this was sent.
    pub held_ms: u64,
    /// Time left before `--ask-timeout` denies it.
    pub expires_in_ms: u64,
}

/// One process of a held request's chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainProcess {
    pub pid: u32,
    pub exe: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// What the agent asked to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeldAction {
    /// A DNS query for a name off the agent's list.
    Dns { name: String, qtype: String },
    /// A TCP connect or a UDP datagram to an address off the list.
    Connect {
        /// "tcp" or "udp".
        transport: String,
        address: IpAddr,
        port: u16,
        /// The name the address was learned from for this agent, if any.
        #[serde(default)]
        host: Option<String>,
    },
    /// An exec of a file off the list.
    Exec {
        path: String,
        #[serde(default)]
        sha256: Option<String>,
        #[serde(default)]
        argv: Vec<String>,
        /// The file `run` resolved in the agent's view of the file system: the grant an approval
        /// makes names this device and inode, so a file swapped in after approval is denied.
        #[serde(default)]
        device: Option<u64>,
        #[serde(default)]
        inode: Option<u64>,
    },
    /// A connect to a pathname unix socket off the agent's `[unix]` list (`run`'s supervisor
    /// resolved the name once, in the agent's view; an approval connects to that very socket).
    Unix {
        /// The name the agent gave (`DEST_PATH`), relative names as given.
        path: String,
        /// Where it led, as the host names that socket (a symlink's target, not the link).
        #[serde(default)]
        resolved: Option<String>,
        /// The resolved socket's identity: what an approval grants.
        device: u64,
        inode: u64,
        /// "stream", "seqpacket" or "dgram" (a datagram socket's connect).
        #[serde(default)]
        sock_type: String,
    },
    /// An open of a file the agent's `[files]` denies, held by the file guard (the opener waits
    /// in its open call). Judged by the file, not the name: a task approval names this device
    /// and inode.
    Open {
        /// The file's path as the kernel names the opened file.
        path: String,
        /// What the opener asked for (`O_RDONLY`, `O_WRONLY|O_CREAT`, …).
        open_flags: String,
        /// The `[files]` rule that denies it.
        rule: String,
        device: u64,
        inode: u64,
    },
}

/// From `run` to the daemon on its ask channel (after `ask_channel`): a call of its agent that
/// `run`'s seccomp filter caught and holds. `call` is `run`'s own number for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AskCall {
    pub call: u64,
    pub pid: u32,
    pub action: HeldAction,
}

/// The daemon's answer on the ask channel, one line per call, in any order. `allow`: let the
/// call continue (the kernel judges it again, now with the approval's entry in place); otherwise
/// `run` fails it with EPERM. `outcome` is absent when the action was allowed without asking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AskAnswer {
    pub call: u64,
    pub allow: bool,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// A `task` approval of a unix socket: how long `run` keeps the grant, in ms (absent: until
    /// the `run` ends). `run` connects unix sockets itself, so it keeps these grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_ms: Option<u64>,
}

/// How far an approval reaches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This call only.
    Once,
    /// A grant of the request's task (as `task start` makes), for `ttl_ms` or until the task ends.
    Task,
    /// Added to the agent's allowlist (`<agent>.approved.toml`), applied by reload.
    Always,
}

/// An answer to a held request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum Decision {
    Allow {
        scope: Scope,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    Deny {
        #[serde(default)]
        reason: Option<String>,
    },
}

/// A line of `pending --follow` after the first response: a request was held, or decided
/// (approved, denied, timed out, or withdrawn because the agent's process went away).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PendingEvent {
    Held(PendingRequest),
    Decided(Outcome),
}

/// How a held request ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub id: u64,
    /// "approved", "denied", "timeout" or "withdrawn".
    pub verdict: String,
    #[serde(default)]
    pub scope: Option<Scope>,
    /// Who decided: "uid 0 (root)", "approver-url", "timeout".
    pub approver: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_read_as_documented() {
        let d: Decision =
            serde_json::from_str(r#"{"decision":"allow","scope":"task","ttl_ms":600000}"#).unwrap();
        assert_eq!(
            d,
            Decision::Allow {
                scope: Scope::Task,
                ttl_ms: Some(600_000)
            }
        );
        let d: Decision = serde_json::from_str(r#"{"decision":"deny"}"#).unwrap();
        assert_eq!(d, Decision::Deny { reason: None });
        assert!(serde_json::from_str::<Decision>(r#"{"decision":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<Decision>(r#"{"decision":"allow"}"#).is_err());
    }

    #[test]
    fn held_actions_name_their_kind() {
        let a = HeldAction::Connect {
            transport: "tcp".into(),
            address: "192.0.2.1".parse().unwrap(),
            port: 443,
            host: Some("pypi.org".into()),
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["kind"], "connect");
        assert_eq!(serde_json::from_value::<HeldAction>(v).unwrap(), a);
    }

    #[test]
    fn only_admins_outside_every_agent_see_and_decide_held_requests() {
        use crate::control::authorize::Refusal;
        use crate::control::{Request, authorize};
        let decide = Request::Decide {
            id: 1,
            decision: Decision::Allow {
                scope: Scope::Always,
                ttl_ms: None,
            },
        };
        let pending = Request::Pending { follow: true };
        for r in [&decide, &pending] {
            assert_eq!(authorize(r, true, None), Ok(()));
            assert_eq!(authorize(r, false, None), Err(Refusal::NotAdmin));
            // From inside an agent, even as root (admin): refused, its own task's requests too.
            assert!(matches!(
                authorize(r, true, Some(("coder", "t1"))),
                Err(Refusal::OutsideOwnTask { .. })
            ));
        }
        // The ask channel is judged by the daemon (the `run` it placed), not here.
        let channel = Request::AskChannel {
            agent: "coder".into(),
            task: "t1".into(),
        };
        assert_eq!(authorize(&channel, false, Some(("coder", "t1"))), Ok(()));
    }
}

/// The agent's own allowlist as `run` judges a held call against it before asking: its address
/// rules (`network.allow` entries with an address, as written) and its exec rules. The daemon
/// sends it on the ask channel, as `{"allowlist": {…}}`, right after the channel opens and again
/// whenever the policy in force changes. A call it allows continues at once (the kernel judges
/// it anyway); everything else is asked as before.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AskAllowlist {
    #[serde(default)]
    pub connect: Vec<String>,
    #[serde(default)]
    pub exec: Vec<String>,
}

/// The daemon's ask-channel line that carries an [`AskAllowlist`] (every other line is an
/// [`AskAnswer`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AskAllowlistLine {
    pub allowlist: AskAllowlist,
}
