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
    Place { agent: String, task: String },
    /// Agents, tasks, processes and counters. (A struct variant, so unknown fields are refused.)
    Status {},
    /// A call `run`'s seccomp filter caught in one of its agent's processes, already answered.
    /// Accepted only from the `run` process the daemon placed, for that task; it can only add a
    /// denied or alert record.
    Caught(CaughtReport),
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
    /// Anything else the filter sends (should not happen).
    Other {
        name: String,
    },
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
    },
    /// A `caught` report was recorded.
    Recorded {},
    Status(Status),
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
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub agent: String,
    pub mode: String,
    pub tasks: Vec<TaskStatus>,
    pub actions: u64,
    pub allowed: u64,
    pub denied: u64,
    pub alerts: u64,
    /// The agent's DNS proxy endpoint (ports on 127.0.0.1 and ::1; 0 = none).
    #[serde(default)]
    pub dns_proxy: Option<DnsEndpoint>,
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
    #[error("permission denied on the control socket {path}: it is root-only")]
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
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let resp: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    match resp {
        Response::Error { message } => Err(ClientError::Refused(message)),
        other => Ok(other),
    }
}

/// Parses a request line; the error says what was wrong, for the caller.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| {
        format!("bad request: {e}; expected {{\"op\":\"place\",\"agent\":…,\"task\":…}}, {{\"op\":\"status\"}} or {{\"op\":\"caught\",…}} (from `run` only)")
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
            },
            Request::Status {},
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
