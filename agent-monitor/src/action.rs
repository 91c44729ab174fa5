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
    /// An open of a file the agent's `[files]` denies (the file guard, docs/files.md).
    Open,
    /// A plain-HTTP connection through the egress endpoint, judged on its `Host`.
    Http,
    /// A TLS connection through the egress endpoint, judged on its server name (SNI).
    Tls,
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
            ActionKind::Open => "open",
            ActionKind::Http => "http",
            ActionKind::Tls => "tls",
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

/// Where a connect or a datagram went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetTarget {
    pub destination: Destination,
    /// The host name the agent resolved to this address through the DNS proxy.
    pub host: Option<String>,
}

/// The file an exec ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecFile {
    /// The file name the kernel executed, as given to exec.
    pub path: String,
    /// A script's `#!` interpreter (the program that runs).
    pub interpreter: Option<String>,
}

/// A DNS query the proxy judged (or DNS traffic the kernel refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsQuery {
    /// The name asked, normalised (lower case, no trailing dot); none when the message could not
    /// be read or never reached the proxy.
    pub name: Option<String>,
    /// The server the agent asked, when the kernel's redirect record named it.
    pub server: Option<Destination>,
}

/// A file an agent opened (or tried to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOpen {
    /// The file's path as the kernel names it (a hard link or bind mount shows its own name).
    pub path: String,
    /// What the opener asked for (`O_RDONLY|O_CLOEXEC`), or why that is unknown.
    pub open_flags: String,
}

/// What an action was aimed at. Its variant is the action's [`ActionKind`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Connect(NetTarget),
    Sendmsg(NetTarget),
    /// The socket asked for, e.g. `inet dgram icmp (1)`.
    Socket(String),
    Exec(ExecFile),
    /// A refused control request; the reason says which.
    Control,
    /// A change of identity; the reason says which.
    Identity,
    Dns(DnsQuery),
    /// The call `run`'s seccomp filter caught.
    IoUring(String),
    Seccomp(String),
    Ptrace(ProcessTarget),
    Signal(ProcessTarget),
    /// A source-routed packet: the first hop it would have gone to, and its transport.
    SourceRoute {
        first_hop: IpAddr,
        transport: &'static str,
    },
    Open(FileOpen),
    /// An AF_UNIX connect (or, `send`, a datagram sent to a named socket).
    Unix(UnixTarget),
    /// A connection the kernel redirected to the egress endpoint (`tls` or `http` by what it
    /// carried).
    Egress(EgressConnection),
}

/// The unix socket a connect or send named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixTarget {
    /// As the caller named it; an abstract socket as `@name`.
    pub path: String,
    /// A datagram send naming the socket (`ACTION=sendmsg`), not a connect.
    pub send: bool,
    /// "stream", "dgram", "seqpacket".
    pub sock_type: &'static str,
}

impl Object {
    pub fn kind(&self) -> ActionKind {
        match self {
            Object::Connect(_) => ActionKind::Connect,
            Object::Sendmsg(_) => ActionKind::Sendmsg,
            Object::Socket(_) => ActionKind::Socket,
            Object::Exec(_) => ActionKind::Exec,
            Object::Control => ActionKind::Control,
            Object::Identity => ActionKind::Identity,
            Object::Dns(_) => ActionKind::Dns,
            Object::IoUring(_) => ActionKind::IoUring,
            Object::Seccomp(_) => ActionKind::Seccomp,
            Object::Ptrace(_) => ActionKind::Ptrace,
            Object::Signal(_) => ActionKind::Signal,
            Object::SourceRoute { .. } => ActionKind::SourceRoute,
            Object::Open(_) => ActionKind::Open,
            Object::Unix(t) if t.send => ActionKind::Sendmsg,
            Object::Unix(_) => ActionKind::Connect,
            Object::Egress(c) if c.tls => ActionKind::Tls,
            Object::Egress(_) => ActionKind::Http,
        }
    }

    /// Where the action went, for the `DEST_*` fields: connect, sendmsg, a DNS query's server, a
    /// source-routed packet's first hop (port 0).
    pub fn destination(&self) -> Option<Destination> {
        match self {
            Object::Connect(t) | Object::Sendmsg(t) => Some(t.destination),
            Object::Dns(q) => q.server,
            Object::Egress(c) => Some(c.destination),
            Object::SourceRoute {
                first_hop,
                transport,
            } => Some(Destination {
                addr: *first_hop,
                port: 0,
                transport,
            }),
            Object::Socket(_)
            | Object::Exec(_)
            | Object::Control
            | Object::Identity
            | Object::IoUring(_)
            | Object::Seccomp(_)
            | Object::Ptrace(_)
            | Object::Signal(_)
            | Object::Open(_) => None,
            Object::Unix(_) => None,
        }
    }

    /// What was asked for, for the `SOCKET` field: the socket, or the call `run` caught.
    pub fn call(&self) -> Option<&str> {
        match self {
            Object::Socket(s) | Object::IoUring(s) | Object::Seccomp(s) => Some(s),
            _ => None,
        }
    }

    /// The unix socket a connect or send named, for `DEST_PATH` (`DEST_TRANSPORT=unix`).
    pub fn unix_path(&self) -> Option<&str> {
        match self {
            Object::Unix(t) => Some(&t.path),
            _ => None,
        }
    }

    /// The process aimed at, for the `TARGET_*` fields.
    pub fn target(&self) -> Option<&ProcessTarget> {
        match self {
            Object::Ptrace(t) | Object::Signal(t) => Some(t),
            _ => None,
        }
    }
}

/// One judged action of an agent, enriched with identity and process context.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub time: SystemTime,
    pub agent: String,
    /// The agent's workload identity, `spiffe://<trust-domain>/agent/<name>`.
    pub spiffe_id: String,
    pub task: String,
    pub verdict: Verdict,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    /// The acting process's executable, when known. An exec reports the file it ran instead.
    pub exe: Option<String>,
    /// What the action was aimed at; its variant is the action's kind.
    pub object: Object,
    /// Root of the agent first, acting process last.
    pub chain: Vec<ChainLink>,
    /// How a denial was carried out ("eperm", "sigkill"), if it was.
    pub enforcement: Option<&'static str>,
    /// Why this verdict, in words (which rule, or that none matched).
    pub reason: String,
}

impl Action {
    pub fn kind(&self) -> ActionKind {
        self.object.kind()
    }

    /// The `EXE` field: for an exec the file being executed, otherwise the acting process's
    /// executable.
    pub fn reported_exe(&self) -> Option<&str> {
        match &self.object {
            Object::Exec(f) => Some(&f.path),
            _ => self.exe.as_deref(),
        }
    }

    /// A one-line summary a person reads first.
    pub fn message(&self) -> String {
        let object = match &self.object {
            Object::Connect(t) | Object::Sendmsg(t) => {
                let d = &t.destination;
                let to = match d.addr {
                    IpAddr::V6(a) => format!("{} [{}]:{}", d.transport, a, d.port),
                    IpAddr::V4(a) => format!("{} {}:{}", d.transport, a, d.port),
                };
                match &t.host {
                    Some(host) => format!("{to} ({host})"),
                    None => to,
                }
            }
            Object::SourceRoute {
                first_hop,
                transport,
            } => format!("source-routed {transport} packet to first hop {first_hop}"),
            Object::Exec(f) => match &f.interpreter {
                Some(i) => format!("{} (script for {i})", f.path),
                None => f.path.clone(),
            },
            Object::Socket(s) | Object::IoUring(s) | Object::Seccomp(s) => s.clone(),
            Object::Control | Object::Identity => self.reason.clone(),
            Object::Ptrace(t) | Object::Signal(t) => format!(
                "{}{} of pid {} ({}, {})",
                t.syscall,
                t.signal.map_or(String::new(), |s| format!(" signal {s}")),
                t.pid,
                t.comm,
                match (&t.agent, &t.task) {
                    (Some(a), Some(task)) => format!("agent {a} task {task}"),
                    (Some(a), None) => format!("agent {a}"),
                    (None, _) => "outside every agent".to_string(),
                }
            ),
            Object::Dns(q) => format!(
                "query {}",
                q.name.as_deref().unwrap_or("(unreadable message)")
            ),
            Object::Open(f) => format!("{} ({})", f.path, f.open_flags),
            Object::Unix(t) => format!("unix {} {}", t.sock_type, t.path),
            Object::Egress(c) => c.summary(),
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
            self.kind().as_str(),
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

/// A connection through the egress endpoint: where the agent connected, what it named, and what
/// went through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressConnection {
    /// The original destination.
    pub destination: Destination,
    /// TLS (else plain HTTP, or bytes that were neither: `tls` false, both names none).
    pub tls: bool,
    /// The server name of the ClientHello.
    pub sni: Option<String>,
    /// The `Host` of a plain-HTTP request.
    pub http_host: Option<String>,
    /// Agent to server, and server to agent.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
    /// One request of an intercepted connection (`[[network.http]]`), judged on its own.
    pub request: Option<HttpRequest>,
}

/// A request that interception judged: `ACTION=http` with its method, path and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// Upper case.
    pub method: String,
    /// Normalised, as judged and sent upstream.
    pub path: String,
    /// What the agent got: the upstream status, 403 for a denial, 502 when upstream failed.
    pub status: u16,
}

impl EgressConnection {
    fn summary(&self) -> String {
        let d = &self.destination;
        let to = match d.addr {
            IpAddr::V6(a) => format!("[{a}]:{}", d.port),
            IpAddr::V4(a) => format!("{a}:{}", d.port),
        };
        let name = match (&self.sni, &self.http_host) {
            (Some(s), _) => format!("server name {s}"),
            (None, Some(h)) => format!("Host {h}"),
            (None, None) if self.tls => "no server name".to_string(),
            (None, None) => "no TLS or HTTP".to_string(),
        };
        format!("{to} ({name})")
    }
}
