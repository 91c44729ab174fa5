//! What a client asks the daemon: one JSON object per request line.

use serde::{Deserialize, Serialize};

use super::CaughtReport;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Make the calling process (the peer of this connection) a process of `agent`, task `task`.
    /// With `user` (what `run --user` is about to become), that uid is bound to the agent: every
    /// process of it on the host is the agent from then on, whoever starts it (refused when the
    /// uid is root's or belongs to another agent; see `Monitor::bind_uid`).
    /// `unscoped`: sent by a `run` that cannot put its command in a Landlock domain (confine.rs),
    /// saying why; `status` shows it on the task.
    /// `privileges`: what `run` gives the command it starts (capabilities kept, no_new_privs,
    /// Landlock), for `status`; absent from other clients.
    Place {
        agent: String,
        task: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unscoped: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privileges: Option<Privileges>,
    },
    /// Agents, tasks, processes and counters. (A struct variant, so unknown fields are refused.)
    Status {},
    /// Re-read the policy directory and apply it (all or nothing).
    Reload {},
    /// Recent actions (of `agent` if given); with `follow`, the connection then streams every new
    /// action as one JSON line until the client closes it.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        agent: Option<String>,
    },
    /// Start (or extend) task `task` of `agent`: grant it the given connects and execs for `ttl_ms`
    /// (none: until `task end`), and optionally move process `pid` into it. Admins only.
    TaskStart {
        agent: String,
        task: String,
        #[serde(default)]
        allow_connect: Vec<String>,
        #[serde(default)]
        allow_exec: Vec<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        pid: Option<u32>,
    },
    /// End task `task` of `agent`: its grants go at once. Admins, or a process of that very task.
    TaskEnd { agent: String, task: String },
    /// Narrow task `task` of `agent`: keep only the named grants (as written when granted), and
    /// end them no later than `ttl_ms` from now. Admins, or a process of that very task.
    TaskNarrow {
        agent: String,
        task: String,
        #[serde(default)]
        keep_connect: Vec<String>,
        #[serde(default)]
        keep_exec: Vec<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// A call `run`'s seccomp filter caught in one of its agent's processes, already answered.
    /// Accepted only from the `run` process the daemon placed, for that task; it can only add a
    /// denied or alert record.
    Caught(CaughtReport),
    /// Held requests of ask-mode agents, oldest first; with `follow`, the connection then streams
    /// one `PendingEvent` per line. Admins only.
    Pending {
        #[serde(default)]
        follow: bool,
    },
    /// Decide held request `id`. Admins only, never from inside an agent.
    Decide { id: u64, decision: super::Decision },
    /// From the `run` the daemon placed for (agent, task): open its ask channel. After the
    /// `ask_channel_open` response the connection stays open; `run` writes one `AskCall` per line
    /// and the daemon answers each with one `AskAnswer` line, in any order.
    AskChannel { agent: String, task: String },
    /// From `run`, opened before it is placed (its later connects may be judged by its agent's
    /// `[unix]` list): after the `recorded` response the connection stays open and carries one
    /// `CaughtReport` per line, each handled like a `caught` request from that `run`.
    CaughtChannel {},
}

/// What a command started by `run` holds of root's privileges (see privileges.rs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Privileges {
    /// The uid the command runs as (0 without `--user`).
    pub uid: u32,
    /// Capabilities it keeps in every set (`cap_chown`…; `all` with `--keep-capabilities`).
    pub capabilities: Vec<String>,
    /// prctl(PR_SET_NO_NEW_PRIVS): setuid and file capabilities are ignored by its execs.
    pub no_new_privs: bool,
    /// The Landlock filesystem ruleset of root agents (no writes beneath /proc, /sys, /dev).
    pub landlock_fs: bool,
    /// `run --keep-capabilities`: root's full power was kept, on purpose.
    pub kept_all: bool,
}

impl Request {
    /// Short name of the operation, for reports.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Place { .. } => "place",
            Request::Status {} => "status",
            Request::Reload {} => "reload",
            Request::Events { .. } => "events",
            Request::TaskStart { .. } => "task_start",
            Request::TaskEnd { .. } => "task_end",
            Request::TaskNarrow { .. } => "task_narrow",
            Request::Caught(_) => "caught",
            Request::Pending { .. } => "pending",
            Request::Decide { .. } => "decide",
            Request::AskChannel { .. } => "ask_channel",
            Request::CaughtChannel {} => "caught_channel",
        }
    }

    /// The (agent, task) the request acts on, if any.
    pub fn target(&self) -> Option<(&str, &str)> {
        match self {
            Request::Place { agent, task, .. }
            | Request::TaskStart { agent, task, .. }
            | Request::TaskEnd { agent, task }
            | Request::TaskNarrow { agent, task, .. }
            | Request::AskChannel { agent, task } => Some((agent, task)),
            Request::Status {}
            | Request::Reload {}
            | Request::Events { .. }
            | Request::Caught(_)
            | Request::Pending { .. }
            | Request::Decide { .. }
            | Request::CaughtChannel {} => None,
        }
    }
}

/// A request line that is not a request; the text says what was expected, for the caller.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad request: {0}; expected {{\"op\":\"place\",\"agent\":…,\"task\":…}}, {{\"op\":\"status\"}}, {{\"op\":\"reload\"}}, {{\"op\":\"events\",\"follow\":…,\"agent\":…}}, {{\"op\":\"task_start\",…}}, {{\"op\":\"task_end\",\"agent\":…,\"task\":…}} or {{\"op\":\"caught\",…}} (from `run` only)"
)]
pub struct BadRequest(#[source] serde_json::Error);

/// Parses a request line.
pub fn parse_request(line: &str) -> Result<Request, BadRequest> {
    serde_json::from_str(line.trim()).map_err(BadRequest)
}
