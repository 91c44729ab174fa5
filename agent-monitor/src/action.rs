//! What an agent did and what was decided: the one record every sink reports.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

/// How the `reason` of an exec starts when the kernel could not read the whole path: the recorded
/// path is then not the file that ran, so `policy suggest` never allows it and `policy test`
/// never judges it allowed.
pub const REASON_EXEC_PATH_TOO_LONG: &str = "exec path longer than";
/// The `reason` of an exec whose path the kernel could not read at all.
pub const REASON_EXEC_PATH_UNREADABLE: &str = "exec path unreadable in the kernel";

/// Kind of action an agent process took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Connect,
    /// A datagram sent to an address named with the send (no connect first).
    Sendmsg,
    /// Creating a socket of a kind agents may not have (raw, ping, SCTP, MPTCP…).
    Socket,
    Exec,
    /// A control-socket request (reported when refused).
    Control,
    /// A change of identity worth an operator's attention (a selector's digest mismatch).
    Identity,
    /// A DNS query, judged by the proxy on the name asked.
    Dns,
    /// io_uring_setup, caught by `run`'s seccomp filter (io_uring creates sockets without
    /// the socket system call).
    IoUring,
    /// seccomp(2) asking for a notification listener, which would let an agent answer the calls
    /// `run`'s filter catches: always refused.
    Seccomp,
    /// A ptrace-family call (ptrace attach, process_vm_readv, pidfd_getfd, kcmp, …) aimed at a
    /// process outside the agent's task: always refused (`run`'s seccomp filter and Landlock).
    Ptrace,
    /// A signal aimed at a process outside the agent's task: always refused.
    Signal,
    /// A packet of an agent's socket carrying a source route (IPv4 options, an IPv6 routing
    /// header), which would take it to its first hop instead of the destination judged.
    SourceRoute,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Connect => "connect",
            ActionKind::Sendmsg => "sendmsg",
            ActionKind::Socket => "socket",
            ActionKind::Exec => "exec",
            ActionKind::Control => "control",
            ActionKind::Identity => "identity",
            ActionKind::Dns => "dns",
            ActionKind::IoUring => "io_uring",
            ActionKind::Seccomp => "seccomp",
            ActionKind::Ptrace => "ptrace",
            ActionKind::Signal => "signal",
            ActionKind::SourceRoute => "source_route",
        }
    }
}

/// What happened to the action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// On the allowlist; it proceeded.
    Allowed,
    /// Not on the allowlist, enforce mode: the kernel stopped it.
    Denied,
    /// Not on the allowlist, alert mode: it proceeded and is reported.
    Alert,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Alert => "alert",
        }
    }
}

/// One process in the chain from the agent's root process to the acting process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainLink {
    pub pid: u32,
    /// Executable path as last exec'd, or the command name when no exec was seen.
    pub exe: String,
    /// The first arguments it was started with (argv[1..], shortened), when known: which tool
    /// call of the agent this was.
    pub args: Vec<String>,
}

/// Where a connect was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    /// "tcp", "udp" or "raw"/"other", from the socket type.
    pub transport: &'static str,
}

/// The process a ptrace-family call or a signal aimed at, and the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessTarget {
    /// The system call (`ptrace`, `process_vm_readv`, `kill`, …).
    pub syscall: String,
    /// Signals: the signal number.
    pub signal: Option<u32>,
    pub pid: u32,
    pub comm: String,
    /// The agent and task it belongs to; none: outside every agent.
    pub agent: Option<String>,
    pub task: Option<String>,
}

/// One judged action of an agent, enriched with identity and process context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Action {
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    pub agent: String,
    /// The agent's workload identity, `spiffe://<trust-domain>/agent/<name>`.
    pub spiffe_id: String,
    pub task: String,
    pub kind: ActionKind,
    pub verdict: Verdict,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    /// Connect: the acting process's executable. Exec: the file being executed.
    pub exe: Option<String>,
    /// Exec of a script: the interpreter its `#!` line names (the program that runs).
    pub interpreter: Option<String>,
    /// Connect, sendmsg and DNS: where it was going (for DNS, the server the agent asked).
    pub destination: Option<Destination>,
    /// Connect and sendmsg: the host name the agent resolved to this address through the DNS
    /// proxy.
    pub dest_host: Option<String>,
    /// DNS: the name asked, normalised (lower case, no trailing dot).
    pub dns_name: Option<String>,
    /// Socket: what was asked for, e.g. `inet dgram icmp (1)`. io_uring and seccomp: the call.
    pub socket: Option<String>,
    /// Ptrace-family calls and signals: the call and the process it aimed at.
    pub target: Option<ProcessTarget>,
    /// Root of the agent first, acting process last.
    pub chain: Vec<ChainLink>,
    /// How a denial was carried out ("eperm", "sigkill"), if it was.
    pub enforcement: Option<&'static str>,
    /// Why this verdict, in words (which rule, or that none matched).
    pub reason: String,
}

impl Action {
    /// A one-line summary a person reads first.
    pub fn message(&self) -> String {
        let object = match (self.kind, &self.destination, &self.exe) {
            (ActionKind::Connect | ActionKind::Sendmsg, Some(d), _) => match d.addr {
                IpAddr::V6(a) => format!("{} [{}]:{}", d.transport, a, d.port),
                IpAddr::V4(a) => format!("{} {}:{}", d.transport, a, d.port),
            },
            (ActionKind::SourceRoute, Some(d), _) => {
                format!(
                    "source-routed {} packet to first hop {}",
                    d.transport, d.addr
                )
            }
            (ActionKind::Exec, _, Some(exe)) => match &self.interpreter {
                Some(i) => format!("{exe} (script for {i})"),
                None => exe.clone(),
            },
            (ActionKind::Socket | ActionKind::IoUring | ActionKind::Seccomp, _, _) => {
                self.socket.clone().unwrap_or_else(|| "?".into())
            }
            (ActionKind::Control | ActionKind::Identity, _, _) => self.reason.clone(),
            (ActionKind::Ptrace | ActionKind::Signal, _, _) => match &self.target {
                Some(t) => format!(
                    "{}{} of pid {} ({}, {})",
                    t.syscall,
                    t.signal.map_or(String::new(), |s| format!(" signal {s}")),
                    t.pid,
                    t.comm,
                    match (&t.agent, &t.task) {
                        (Some(a), Some(task)) => format!("agent {a} task {task}"),
                        (Some(a), None) => format!("agent {a}"),
                        _ => "outside every agent".to_string(),
                    }
                ),
                None => "?".to_string(),
            },
            (ActionKind::Dns, _, _) => format!(
                "query {}",
                self.dns_name.as_deref().unwrap_or("(unreadable message)")
            ),
            _ => "?".to_string(),
        };
        let object = match (&self.dest_host, self.kind) {
            (Some(host), ActionKind::Connect | ActionKind::Sendmsg) => {
                format!("{object} ({host})")
            }
            _ => object,
        };
        let verdict = match self.verdict {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "DENIED",
            Verdict::Alert => "ALERT (not on allowlist, alert mode)",
        };
        format!(
            "agent {} task {}: {} {} by pid {} ({}): {}",
            self.agent,
            self.task,
            self.kind.as_str(),
            object,
            self.pid,
            self.comm,
            verdict
        )
    }

    /// The chain as one readable string: `pid:exe > pid:exe "arg arg" > …`.
    pub fn chain_string(&self) -> String {
        self.chain
            .iter()
            .map(|l| {
                if l.args.is_empty() {
                    format!("{}:{}", l.pid, l.exe)
                } else {
                    format!("{}:{} {:?}", l.pid, l.exe, l.args.join(" "))
                }
            })
            .collect::<Vec<_>>()
            .join(" > ")
    }
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let t = time::OffsetDateTime::from(*t);
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}
