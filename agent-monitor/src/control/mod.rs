//! The control socket protocol: one JSON request line, one JSON response line. Shared by the daemon
//! (server) and the `run` and `status` clients. The daemon identifies the caller with SO_PEERCRED,
//! never by what the request says.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/agent-monitor/control.sock";

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

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

/// A caught call as `run` answered it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaughtReport {
    pub pid: u32,
    pub call: CaughtCall,
    /// Failed with EPERM; else it ran (alert mode).
    pub refused: bool,
    pub comm: String,
    pub exe: Option<String>,
    /// Effective uid (owner of /proc/PID).
    pub uid: u32,
}

/// A system call the `run` filter caught (see sandbox.rs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "call", rename_all = "snake_case", deny_unknown_fields)]
pub enum CaughtCall {
    /// socket(2) of a family agents may not have.
    Socket {
        family: u32,
        sock_type: u32,
        protocol: u32,
    },
    /// i386 socketcall(2), operation `op`.
    Socketcall {
        op: u32,
    },
    IoUringSetup,
    /// seccomp(2) asking for a notification listener.
    SeccompListener,
    /// A call that reaches into another process (ptrace attach or seize, process_vm_readv or
    /// writev, pidfd_getfd, kcmp, process_madvise, perf_event_open, move_pages, migrate_pages,
    /// get_robust_list, prlimit64 setting limits, setpriority, ioprio_set, sched_setaffinity,
    /// sched_setscheduler, sched_setparam, sched_setattr), aimed outside the caller's task.
    /// Always refused.
    ProcessAccess {
        syscall: String,
        target: CaughtTarget,
    },
    /// A signal (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal)
    /// aimed outside the caller's task. Always refused.
    Signal {
        syscall: String,
        signal: u32,
        target: CaughtTarget,
    },
    /// bpf(2) from a root agent (pinned maps open by file permission alone).
    Bpf,
    /// Anything else the filter sends (should not happen).
    Other {
        name: String,
    },
}

/// The process a caught call aimed at, as `run` read it while the call waited. The daemon
/// names the agent it belongs to (if any) from these, not from the pid alone, which may be
/// reused by the time the report arrives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaughtTarget {
    /// In `run`'s (the host's) pid namespace; 0 if it could not be named.
    pub pid: u32,
    pub comm: String,
    /// Its cgroup v2 path (`/agent-monitor/coder/t1`), if it could be read.
    pub cgroup: Option<String>,
    /// Its real uid, if it could be read.
    pub uid: Option<u32>,
    /// It is this `agent-monitor run` itself (the agent's seccomp supervisor).
    #[serde(default)]
    pub supervisor: bool,
}

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

/// Why a client call failed, worded for the person who ran the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent-monitor daemon is not running (no control socket at {path}); start it with `agent-monitor daemon`"
    )]
    NotRunning { path: String },
    #[error(
        "permission denied on the control socket {path}: it is for root and the daemon's --admin-group"
    )]
    PermissionDenied { path: String },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    call_then(socket, req, |_| true)
}

/// Sends one request, reads the response, then hands every further line to `more` until the
/// daemon closes the connection or `more` returns false (streaming requests: `events --follow`).
pub fn call_then(
    socket: &Path,
    req: &Request,
    mut more: impl FnMut(&str) -> bool,
) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path: path.clone() }
        }
        std::io::ErrorKind::PermissionDenied => {
            ClientError::PermissionDenied { path: path.clone() }
        }
        _ => ClientError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(&stream);
    reader.read_line(&mut answer).map_err(io)?;
    let resp: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    let resp = match resp {
        Response::Error { message } => return Err(ClientError::Refused(message)),
        other => other,
    };
    if matches!(req, Request::Events { follow: true, .. }) {
        // A follower waits as long as it takes for the next action.
        stream.set_read_timeout(None).map_err(io)?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 || !more(line.trim_end()) {
                break;
            }
        }
    }
    Ok(resp)
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
        }
    }

    /// The (agent, task) the request acts on, if any.
    pub fn target(&self) -> Option<(&str, &str)> {
        match self {
            Request::Place { agent, task, .. }
            | Request::TaskStart { agent, task, .. }
            | Request::TaskEnd { agent, task }
            | Request::TaskNarrow { agent, task, .. } => Some((agent, task)),
            Request::Status {}
            | Request::Reload {}
            | Request::Events { .. }
            | Request::Caught(_) => None,
        }
    }
}

/// Who may do what on the control socket. `admin`: root or a member of the admin group.
/// `inside`: the (agent, task) the calling process itself belongs to, if it is an agent process.
///
/// A process inside an agent may only end or narrow its own task (or `run` again into exactly its
/// own task, which changes nothing) — even as root: otherwise an agent could start a task with wider
/// grants, switch to another agent's allowlist, or end another agent's work.
pub fn authorize(
    request: &Request,
    admin: bool,
    inside: Option<(&str, &str)>,
) -> Result<(), String> {
    // `run` reports from inside its agent; the daemon accepts a report only from a `run` it
    // placed (see `Monitor::on_caught`), whatever the caller's rights.
    if let Request::Caught(_) = request {
        return Ok(());
    }
    if let Some((agent, task)) = inside {
        let own = request.target() == Some((agent, task));
        if let Request::Place {
            user: Some(uid), ..
        } = request
        {
            return Err(format!(
                "the caller is itself a process of agent {agent} (task {task}); from inside an agent `run --user` cannot bind uid {uid}: binding a uid makes every process of it on the host an agent"
            ));
        }
        return match request {
            Request::TaskEnd { .. } | Request::TaskNarrow { .. } | Request::Place { .. } if own => {
                Ok(())
            }
            _ => Err(format!(
                "the caller is itself a process of agent {agent} (task {task}); from inside an agent only `task end` or `task narrow` of --agent {agent} --task {task} is allowed, never widening a task or touching another agent"
            )),
        };
    }
    if admin {
        Ok(())
    } else {
        Err("the control socket is for root and members of the daemon's --admin-group".into())
    }
}

/// Parses a request line; the error says what was wrong, for the caller.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| {
        format!("bad request: {e}; expected {{\"op\":\"place\",\"agent\":…,\"task\":…}}, {{\"op\":\"status\"}}, {{\"op\":\"reload\"}}, {{\"op\":\"events\",\"follow\":…,\"agent\":…}}, {{\"op\":\"task_start\",…}}, {{\"op\":\"task_end\",\"agent\":…,\"task\":…}} or {{\"op\":\"caught\",…}} (from `run` only)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Place {
                agent: "a".into(),
                task: "t".into(),
                user: Some(1001),
                unscoped: None,
                privileges: None,
            },
            Request::Place {
                agent: "a".into(),
                task: "t".into(),
                user: None,
                unscoped: None,
                privileges: Some(Privileges {
                    uid: 0,
                    capabilities: vec!["cap_chown".into()],
                    no_new_privs: true,
                    landlock_fs: true,
                    kept_all: false,
                }),
            },
            Request::Place {
                agent: "a".into(),
                task: "t".into(),
                user: None,
                unscoped: Some("this kernel has Landlock ABI 5".into()),
                privileges: None,
            },
            Request::Caught(CaughtReport {
                pid: 7,
                call: CaughtCall::Signal {
                    syscall: "kill".into(),
                    signal: 15,
                    target: CaughtTarget {
                        pid: 8,
                        comm: "sleep".into(),
                        cgroup: Some("/agent-monitor/b/t".into()),
                        uid: Some(65534),
                        supervisor: false,
                    },
                },
                refused: true,
                comm: "sh".into(),
                exe: None,
                uid: 65534,
            }),
            Request::Caught(CaughtReport {
                pid: 7,
                call: CaughtCall::ProcessAccess {
                    syscall: "pidfd_getfd".into(),
                    target: CaughtTarget {
                        pid: 1,
                        comm: "systemd".into(),
                        cgroup: Some("/init.scope".into()),
                        uid: Some(0),
                        supervisor: false,
                    },
                },
                refused: true,
                comm: "python3".into(),
                exe: Some("/usr/bin/python3".into()),
                uid: 65534,
            }),
            Request::Status {},
            Request::Reload {},
            Request::Events {
                follow: true,
                agent: Some("a".into()),
            },
            Request::TaskStart {
                agent: "a".into(),
                task: "t".into(),
                allow_connect: vec!["127.0.0.1:80".into()],
                allow_exec: vec![],
                ttl_ms: Some(1000),
                pid: None,
            },
            Request::TaskEnd {
                agent: "a".into(),
                task: "t".into(),
            },
            Request::Caught(CaughtReport {
                pid: 7,
                call: CaughtCall::Socket {
                    family: 40,
                    sock_type: 1,
                    protocol: 0,
                },
                refused: true,
                comm: "python3".into(),
                exe: None,
                uid: 65534,
            }),
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&s).unwrap(), r);
        }
    }

    fn start(agent: &str, task: &str) -> Request {
        Request::TaskStart {
            agent: agent.into(),
            task: task.into(),
            allow_connect: vec!["10.0.0.1:443".into()],
            allow_exec: vec![],
            ttl_ms: None,
            pid: None,
        }
    }

    fn end(agent: &str, task: &str) -> Request {
        Request::TaskEnd {
            agent: agent.into(),
            task: task.into(),
        }
    }

    #[test]
    fn admins_outside_agents_may_do_everything() {
        for r in [start("a", "t"), end("a", "t"), Request::Status {}] {
            assert!(authorize(&r, true, None).is_ok());
            assert!(
                authorize(&r, false, None)
                    .unwrap_err()
                    .contains("--admin-group")
            );
        }
    }

    #[test]
    fn inside_an_agent_only_its_own_task_may_be_ended_even_by_root() {
        let me = Some(("a", "t"));
        assert!(authorize(&end("a", "t"), true, me).is_ok());
        assert!(authorize(&end("a", "t"), false, me).is_ok());
        let narrow = |task: &str| Request::TaskNarrow {
            agent: "a".into(),
            task: task.into(),
            keep_connect: vec![],
            keep_exec: vec![],
            ttl_ms: Some(1),
        };
        assert!(authorize(&narrow("t"), false, me).is_ok());
        assert!(authorize(&narrow("other"), true, me).is_err());
        for r in [
            start("a", "t"),
            start("a", "other"),
            start("b", "t"),
            end("a", "other"),
            end("b", "t"),
            Request::Place {
                agent: "b".into(),
                task: "t".into(),
                user: None,
                unscoped: None,
                privileges: None,
            },
            Request::Place {
                agent: "a".into(),
                task: "t".into(),
                user: Some(1001),
                unscoped: None,
                privileges: None,
            },
            Request::Status {},
        ] {
            let e = authorize(&r, true, me).unwrap_err();
            assert!(e.contains("from inside an agent"), "{r:?}: {e}");
        }
        let same = Request::Place {
            agent: "a".into(),
            task: "t".into(),
            user: None,
            unscoped: None,
            privileges: None,
        };
        assert!(authorize(&same, true, me).is_ok());
    }

    /// `run` reports from inside its agent; who may report is decided against the placements.
    #[test]
    fn caught_reports_pass_authorization_from_inside_an_agent() {
        let caught = Request::Caught(CaughtReport {
            pid: 7,
            call: CaughtCall::IoUringSetup,
            refused: true,
            comm: "sh".into(),
            exe: None,
            uid: 0,
        });
        assert_eq!(authorize(&caught, false, Some(("a", "t"))), Ok(()));
        let widen = Request::TaskStart {
            agent: "a".into(),
            task: "t".into(),
            allow_connect: vec![],
            allow_exec: vec![],
            ttl_ms: None,
            pid: None,
        };
        assert!(authorize(&widen, true, Some(("a", "t"))).is_err());
    }

    #[test]
    fn bad_requests_say_what_is_expected() {
        for bad in [
            "",
            "{}",
            "{\"op\":\"nuke\"}",
            "{\"op\":\"place\",\"agent\":\"a\"}",
            "{\"op\":\"status\",\"pid\":1}",
            "not json",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("bad request:"), "{e}");
            assert!(e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn missing_socket_means_daemon_not_running() {
        let e = call(
            Path::new("/nonexistent/agent-monitor.sock"),
            &Request::Status {},
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }));
        assert!(e.to_string().contains("daemon is not running"));
    }
}
