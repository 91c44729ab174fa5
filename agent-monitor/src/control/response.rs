//! What the daemon answers: one JSON object per response line; `status` in detail.

use serde::{Deserialize, Serialize};

use super::Privileges;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Placed {
        agent: String,
        task: String,
        cgroup: String,
        /// The agent's mode ("enforce" or "alert"), so `run` shapes its filter to match.
        #[serde(default)]
        mode: Option<String>,
        /// What `run` should tell its user (e.g. the bound uid also runs processes outside the
        /// agent, which are the agent from now on).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
        /// The daemon's own files (policy directory, control socket, state file, JSON trail,
        /// executable) that `run` makes read-only for a root agent.
        #[serde(default)]
        read_only: Vec<String>,
        /// The CA bundle (system roots + the daemon's local CA) `run` exports to the command
        /// (SSL_CERT_FILE and the like) when the daemon intercepts HTTPS.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_bundle: Option<String>,
        /// The agent's `[unix]` section, for `run`'s supervisor (sandbox/unix_connect.rs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unix: Option<super::UnixSection>,
    },
    /// A `caught` report was recorded.
    Recorded {},
    Status(Status),
    Reloaded {
        agents: Vec<String>,
        message: String,
    },
    /// Followed, if asked, by one action (audit-trail JSON) per line; a line `{"lagged": N}` says
    /// N actions went by too fast for this connection (they are in the JSON trail).
    Events {
        history: Vec<serde_json::Value>,
    },
    TaskStarted {
        agent: String,
        task: String,
        /// Grants in force now, as given.
        grants: Vec<String>,
        /// Milliseconds until they expire (none: until `task end`).
        expires_in_ms: Option<u64>,
        /// The process moved into the task, if one was named.
        moved: Option<u32>,
    },
    TaskEnded {
        agent: String,
        task: String,
        /// Grants removed.
        revoked: usize,
    },
    TaskNarrowed {
        agent: String,
        task: String,
        /// Grants left.
        grants: Vec<String>,
        /// Milliseconds until they expire (none: until `task end`).
        expires_in_ms: Option<u64>,
    },
    /// Held requests, oldest first (then, with `follow`, one `PendingEvent` per line).
    Pending {
        requests: Vec<super::PendingRequest>,
    },
    /// A decision was taken; the held call is released (approved) or refused (denied).
    Decided(super::Outcome),
    /// The ask channel is open: `AskCall` lines may follow.
    AskChannelOpen {},
    Error {
        message: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub started_unix: u64,
    pub policies: String,
    pub mechanisms: serde_json::Value,
    pub agents: Vec<AgentStatus>,
    pub counters: Counters,
    pub sinks: Vec<SinkStatus>,
    /// Installed now, or adopted from pins (with how long the previous daemon was away).
    #[serde(default)]
    pub origin: serde_json::Value,
    /// Kernel map entries in use against capacity.
    #[serde(default)]
    pub occupancy: serde_json::Value,
    /// When the policy in force was loaded (start or last reload), Unix seconds.
    #[serde(default)]
    pub policies_loaded_unix: u64,
    /// The `journalctl` command that selects only the entries this daemon wrote (trusted fields:
    /// its uid, executable and systemd service), to which a query adds `AGENT_ID=…` and the like.
    #[serde(default)]
    pub journal_query: String,
    /// Held requests of ask-mode agents, oldest first.
    #[serde(default)]
    pub pending: Vec<super::PendingRequest>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub agent: String,
    pub mode: String,
    pub tasks: Vec<TaskStatus>,
    /// Workload selectors and their state (armed, waiting, UNVERIFIED).
    #[serde(default)]
    pub selectors: Vec<String>,
    pub actions: u64,
    pub allowed: u64,
    pub denied: u64,
    pub alerts: u64,
    /// The agent's DNS proxy endpoint (ports on 127.0.0.1 and ::1; 0 = none).
    #[serde(default)]
    pub dns_proxy: Option<DnsEndpoint>,
    /// Addresses the agent holds learned from DNS answers, and how many it may hold.
    #[serde(default)]
    pub dns_learned: u32,
    #[serde(default)]
    pub dns_learned_limit: u32,
    /// Addresses of its allowed answers it was not given: non-public ones (no
    /// `dns.private_answers` entry for the name) and those over its limit.
    #[serde(default)]
    pub dns_withheld_non_public: u64,
    #[serde(default)]
    pub dns_withheld_limit: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DnsEndpoint {
    pub udp4: u16,
    pub tcp4: u16,
    pub udp6: u16,
    pub tcp6: u16,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: String,
    pub cgroup: String,
    pub processes: Vec<u32>,
    /// Grants in force (`connect ADDR`, `exec PATH`).
    #[serde(default)]
    pub grants: Vec<String>,
    /// Milliseconds until they expire; none: until `task end` (or no grants).
    #[serde(default)]
    pub grants_expire_in_ms: Option<u64>,
    /// `run`s of this task whose command is NOT scoped to its own processes (no Landlock ABI 6
    /// here), each as `run PID: reason`. Empty: every `run` scoped it.
    #[serde(default)]
    pub unscoped: Vec<String>,
    /// The `run` processes placed in this task and what their commands hold.
    #[serde(default)]
    pub placements: Vec<Placement>,
}

/// One `run` (or other control client) placed in a task.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Placement {
    /// The placed process (`run`; its command is its child).
    pub pid: u32,
    /// As `run` reported it; none: placed by a client that did not say (not `agent-monitor run`).
    pub privileges: Option<Privileges>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub actions: u64,
    pub denied: u64,
    pub alerts: u64,
    /// Records the kernel could not hand over (ring buffer full); their verdicts still applied.
    pub lost_records: u64,
    pub undecodable_records: u64,
    pub exec_paths_too_long: u64,
    pub exec_paths_unreadable: u64,
    /// Exec paths with `//`, `/./` or `/../`, judged not allowed.
    pub exec_paths_not_normal: u64,
    /// Sockets of a kind agents may not have (raw, ping, SCTP, MPTCP…), refused or alerted.
    #[serde(default)]
    pub sockets_refused: u64,
    /// Calls `run`'s seccomp filter caught and `run` reported (refused or, alert mode, let run).
    #[serde(default)]
    pub seccomp_caught: u64,
    /// Execs inside a user namespace, where only exact rules' files are allowed.
    #[serde(default)]
    pub execs_in_user_namespaces: u64,
    /// Files exact exec rules name, as resolved at the last sweep.
    #[serde(default)]
    pub exec_rule_files: u64,
    /// Agent processes in the daemon's process table (live, and exited within the last minute).
    pub tracked_processes: u64,
    /// Actions whose kernel verdict the userspace evaluator did not reproduce (should stay 0).
    pub verdict_disagreements: u64,
    /// Agent actions among the lost records.
    #[serde(default)]
    pub actions_lost: u64,
    /// Off-list actions of alert-mode agents the kernel refused (EPERM, or SIGKILL for an exec)
    /// because their record could not be queued (ring buffer full): alert mode fails closed
    /// rather than let an off-list action happen unrecorded. Counted among `actions_lost`.
    #[serde(default)]
    pub alerts_refused_unrecordable: u64,
    /// Packets of agents' sockets that carried a source route (IPv4 options, an IPv6 routing
    /// header): dropped (enforce) or reported (alert) by the kernel.
    #[serde(default)]
    pub source_routed_packets: u64,
    #[serde(default)]
    pub reloads: u64,
    #[serde(default)]
    pub reload_failures: u64,
    /// Identical denials/alerts folded into journald repeat summaries (all are in the JSON trail).
    #[serde(default)]
    pub journald_aggregated: u64,
    /// Connects/execs the kernel refused because the matching task grant had expired (before
    /// the daemon removed it).
    #[serde(default)]
    pub grants_expired_in_kernel: u64,
    /// Processes that could not be tagged (tag map full): they did not become the agent.
    #[serde(default)]
    pub tags_full: u64,
    /// Execs of one agent's selected executable by a process a higher-ranked selector of
    /// another agent holds (it stayed with that agent).
    #[serde(default)]
    pub selector_conflicts: u64,
    /// Connections the kernel refused on their server name that the daemon could not close
    /// (their data stays dropped).
    #[serde(default)]
    pub sni_close_failures: u64,
    /// DNS queries the agents' proxy judged.
    #[serde(default)]
    pub dns_queries: u64,
    /// Queries for names off the allowlist, answered REFUSED (enforce mode).
    #[serde(default)]
    pub dns_refused: u64,
    /// Queries answered SERVFAIL because the upstream failed or timed out.
    #[serde(default)]
    pub dns_upstream_failures: u64,
    /// Answers whose addresses could not be written to the kernel (learned map full): SERVFAIL.
    #[serde(default)]
    pub dns_install_failures: u64,
    /// Unreadable or unsupported DNS messages, not forwarded.
    #[serde(default)]
    pub dns_malformed: u64,
    /// Queries answered SERVFAIL because too many of the agent's queries were in flight.
    #[serde(default)]
    pub dns_overloaded: u64,
    /// DNS traffic of an agent without a proxy endpoint (kernel counter).
    #[serde(default)]
    pub dns_no_proxy: u64,
    /// Replies whose original server the kernel no longer remembered (kernel counter).
    #[serde(default)]
    pub dns_orig_missing: u64,
    /// (agent, address) pairs currently learned from DNS answers.
    #[serde(default)]
    pub dns_learned: u64,
    /// Addresses of allowed answers not learned because they are non-public (loopback,
    /// link-local, private, …) and no `dns.private_answers` entry covers the name.
    #[serde(default)]
    pub dns_withheld_non_public: u64,
    /// Addresses of allowed answers not learned because the agent held its `dns.max_learned`.
    #[serde(default)]
    pub dns_withheld_limit: u64,
    /// Answers that found their agent at its learned-address limit.
    #[serde(default)]
    pub dns_limit_reached: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SinkStatus {
    pub sink: String,
    pub written: u64,
    pub failed: u64,
}
