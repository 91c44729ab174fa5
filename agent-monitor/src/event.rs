//! Decoding of the kernel's ring-buffer records into typed events. Pure: bytes in, values out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_monitor_common as common;
use agent_monitor_common::{RecordHeader, RecordKind};

use crate::action::Verdict;

/// A record from the kernel, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Exec(ExecEvent),
    /// A connect, or (`send`) a datagram sent to an address named with the send.
    Connect(ConnectEvent),
    Socket(SocketEvent),
    /// A packet of an agent's socket carried a source route and was dropped (or, alert mode,
    /// reported).
    SourceRoute(SourceRouteEvent),
    /// An agent's DNS traffic went to its proxy (or was refused: no proxy). Not an action of its
    /// own: it names the process behind the query the proxy then reports.
    DnsRedirect(ConnectEvent),
    Fork {
        subject: Subject,
        child: u32,
    },
    Exit {
        subject: Subject,
    },
    /// The process became an agent at exec by an executable selector (`retagged_from`: the
    /// agent index it had before, when a higher-ranked selector took it from another agent).
    Tagged {
        subject: Subject,
        path: String,
        retagged_from: Option<u32>,
    },
    /// The executable selector of agent index `claimed_by` matched, but the identity in
    /// `subject` outranks it: the process stays what it was.
    ClaimRefused {
        subject: Subject,
        path: String,
        claimed_by: u32,
    },
    /// An AF_UNIX connect or datagram send of an agent with a `[unix]` section.
    Unix(UnixEvent),
    /// An agent's connect to a destination with request rules went to the egress endpoint, as
    /// flow `token`. Not an action of its own: the endpoint reports the connection.
    EgressRedirect {
        connect: ConnectEvent,
        token: u32,
    },
    /// A unix connect (or named datagram send) allowed by its name reached a socket whose bound
    /// name the agent may not reach: the process was killed (`Denied`) or, in alert mode, let
    /// through (`Alert`).
    UnixPeer(UnixPeerEvent),
    /// The kernel judged the first bytes of an agent's connection to an address with
    /// server-name rules only.
    ServerName(ServerNameEvent),
}

/// What the kernel saw of a connection's first bytes, and its verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerNameEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    /// Where the connection goes, and from where (to close it).
    pub dest: std::net::SocketAddr,
    pub source: std::net::SocketAddr,
    /// `SNI_OUTCOME_*`.
    pub outcome: u32,
    /// The server name (lower case), when the ClientHello had one.
    pub name: Option<String>,
    /// The socket's cookie: its `SNI_FLOWS` entry.
    pub cookie: u64,
}

/// A unix connect judged again on the name its listener bound (`syscalls/sys_exit_connect`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixPeerEvent {
    /// The connect or send as the hook allowed it (the name given); `verdict` is the verdict on
    /// the bound name.
    pub connect: UnixEvent,
    /// The name the listener (a datagram's receiver) bound, as `UnixEvent::name`.
    pub bound: String,
    /// The entry that named the bound name, 0 for the agent's default.
    pub bound_rule: u32,
}

/// A unix connect or send as the kernel judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    /// The socket's name as the caller gave it; an abstract name as `@name`. Empty when the
    /// kernel could not read it.
    pub name: String,
    /// A datagram send naming the socket, not a connect.
    pub send: bool,
    pub sock_type: u32,
    /// The entry that named it (`UNIX_ALLOW`, `UNIX_DENY`), 0 for the agent's default.
    pub rule: u32,
}

/// Who acted: the task and the agent identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: String,
    /// The identity the kernel judged with: agent index, task number, `SOURCE_*`.
    pub agent: u32,
    pub task: u32,
    pub source: u32,
}

impl Subject {
    /// For reports with no kernel record behind them (a DNS query before any redirect was seen).
    pub fn unknown() -> Subject {
        Subject {
            cgroup_id: 0,
            ktime_ns: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            comm: "?".into(),
            agent: u32::MAX,
            task: common::TASK_NONE,
            source: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    /// The file name the kernel executed, as given to exec.
    pub path: String,
    /// The path did not fit the kernel's buffer; `path` is its beginning.
    pub truncated: bool,
    pub unreadable: bool,
    /// The path was not in normal form; judged as not allowed.
    pub not_normal: bool,
    /// The kernel sent SIGKILL before the program's first instruction.
    pub killed: bool,
    /// Allowed by a task grant rather than the static allowlist.
    pub granted: bool,
    /// A script's `#!` interpreter (the program that runs), when there is one.
    pub interpreter: Option<String>,
    /// Device (kernel encoding) and inode of the file that runs.
    pub file_dev: u32,
    pub file_ino: u64,
    /// The task was outside the initial user namespace: only file identity counted.
    pub user_ns: bool,
    /// Which fact decided, `EXEC_BASIS_*`.
    pub basis: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    pub family: u16,
    pub sock_type: u32,
    pub protocol: u32,
}

/// `subject`'s task fields are whoever ran when the packet left (a timer may send it); its agent
/// slot and cgroup are the socket's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRouteEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    /// Where the packet was addressed: its first hop.
    pub first_hop: IpAddr,
    /// IPv4: the IP protocol (6 TCP, 17 UDP). IPv6: 0.
    pub protocol: u32,
    /// IPv4: the first option's type (0x83 LSRR, 0x89 SSRR). IPv6: the routing header's type.
    pub detail: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    pub subject: Subject,
    pub verdict: Verdict,
    pub addr: IpAddr,
    pub port: u16,
    /// Socket type: 1 stream, 2 datagram, 3 raw…
    pub sock_type: u32,
    /// Allowed by a task grant rather than the static allowlist.
    pub granted: bool,
    /// A send naming its destination (sendmsg hook), not a connect.
    pub send: bool,
    /// The caller gave the unspecified address; it was judged as loopback.
    pub unspecified: bool,
    /// A send that named no address (connected socket with control messages): judged as the
    /// socket's connected peer, which `addr`/`port` hold.
    pub connected_peer: bool,
    /// Connect/send: allowed because the agent resolved the address through the DNS proxy.
    pub learned: bool,
    /// DNS redirect: the agent had no proxy endpoint, so nothing was redirected. Connect/send: the
    /// destination was another agent's DNS proxy endpoint.
    pub dns_refused: bool,
    /// The destination has request rules and the connect or datagram could not go through the
    /// egress endpoint (UDP, a pre-bound socket, no endpoint), or it was the endpoint itself.
    pub egress_refused: bool,
}

/// Why a record could not be decoded. Each is counted by the daemon, never ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {got} bytes, expected at least {want}")]
    Short { got: usize, want: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown verdict {verdict} in a {kind} record")]
    UnknownVerdict { kind: &'static str, verdict: u32 },
    #[error("unknown address family {0} in a connect record")]
    UnknownFamily(u16),
}

impl From<common::UnknownKind> for DecodeError {
    fn from(common::UnknownKind(kind): common::UnknownKind) -> Self {
        DecodeError::UnknownKind(kind)
    }
}

/// Record parts as the kernel writes them: `#[repr(C)]` integers and arrays of them, for which
/// every bit pattern is a valid value.
///
/// # Safety
/// Only for such types.
unsafe trait Wire: Copy {}
// SAFETY: all are repr(C) structs of integers and integer arrays (agent-monitor-common).
unsafe impl Wire for common::RecordHeader {}
unsafe impl Wire for common::NetPayload {}
unsafe impl Wire for common::ExecPayload {}
unsafe impl Wire for common::SocketPayload {}
unsafe impl Wire for common::SourceRoutePayload {}
unsafe impl Wire for common::ForkPayload {}
unsafe impl Wire for common::TaggedPayload {}
unsafe impl Wire for common::UnixPayload {}
unsafe impl Wire for common::EgressPayload {}
unsafe impl Wire for common::UnixPeerPayload {}
unsafe impl Wire for common::server_name::SniPayload {}

/// The record's `T` at `offset`, or `Short` when the record ends before it does.
fn read<T: Wire>(bytes: &[u8], offset: usize, want: usize) -> Result<T, DecodeError> {
    let end = offset + size_of::<T>();
    if bytes.len() < end.max(want) {
        return Err(DecodeError::Short {
            got: bytes.len(),
            want: end.max(want),
        });
    }
    // SAFETY: `offset + size_of::<T>()` bytes are there; `T: Wire` takes any bit pattern, and
    // the read is unaligned-safe.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().add(offset).cast()) })
}

/// Decodes one record as written by the kernel programs: the header, then the payload of its
/// kind.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let header: RecordHeader = read(bytes, 0, size_of::<RecordHeader>())?;
    let kind = RecordKind::try_from(header.kind)?;
    let want = kind.record_size();
    let payload = size_of::<RecordHeader>();
    let subject = Subject {
        cgroup_id: header.cgroup_id,
        ktime_ns: header.ktime_ns,
        pid: header.pid,
        tid: header.tid,
        uid: header.uid,
        comm: c_string(&header.comm),
        agent: header.agent,
        task: header.task,
        source: header.source,
    };
    let flag = |f: u32| header.flags & f != 0;
    match kind {
        RecordKind::Exec => {
            let p: common::ExecPayload = read(bytes, payload, want)?;
            let interp_len = (p.interp_len as usize).min(p.interp.len());
            Ok(KernelEvent::Exec(ExecEvent {
                granted: flag(common::FLAG_GRANTED),
                interpreter: (interp_len > 0)
                    .then(|| String::from_utf8_lossy(&p.interp[..interp_len]).into_owned()),
                file_dev: p.file_dev,
                file_ino: p.file_ino,
                user_ns: flag(common::FLAG_USER_NS),
                basis: p.basis,
                verdict: verdict(header.verdict, "exec")?,
                path: lossy(&p.path, p.path_len),
                truncated: flag(common::FLAG_PATH_TRUNCATED),
                unreadable: flag(common::FLAG_PATH_UNREADABLE),
                not_normal: flag(common::FLAG_PATH_NOT_NORMAL),
                killed: flag(common::FLAG_KILLED),
                subject,
            }))
        }
        RecordKind::Connect | RecordKind::Sendmsg | RecordKind::DnsRedirect => {
            let p: common::NetPayload = read(bytes, payload, want)?;
            let v6 = Ipv6Addr::from(p.addr);
            let addr = match p.family {
                common::AF_INET => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                // An IPv4-mapped address on an IPv6 socket is an IPv4 destination.
                common::AF_INET6 => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                },
                other => return Err(DecodeError::UnknownFamily(other)),
            };
            let event = ConnectEvent {
                verdict: verdict(header.verdict, "connect")?,
                send: kind == RecordKind::Sendmsg,
                unspecified: flag(common::FLAG_ADDR_UNSPECIFIED),
                connected_peer: flag(common::FLAG_CONNECTED_PEER),
                addr,
                port: p.port,
                sock_type: p.sock_type,
                granted: flag(common::FLAG_GRANTED),
                learned: flag(common::FLAG_LEARNED),
                dns_refused: flag(common::FLAG_DNS_REFUSED),
                egress_refused: flag(common::FLAG_EGRESS_REFUSED),
                subject,
            };
            Ok(if kind == RecordKind::DnsRedirect {
                KernelEvent::DnsRedirect(event)
            } else {
                KernelEvent::Connect(event)
            })
        }
        RecordKind::ServerName => {
            let p: common::server_name::SniPayload = read(bytes, payload, want)?;
            let ip = |a: [u8; 16]| {
                let v6 = Ipv6Addr::from(a);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            };
            let len = (p.name_len as usize).min(p.name.len());
            Ok(KernelEvent::ServerName(ServerNameEvent {
                verdict: verdict(header.verdict, "server name")?,
                dest: std::net::SocketAddr::new(ip(p.dest.addr), p.dest.port),
                source: std::net::SocketAddr::new(ip(p.source), p.source_port),
                outcome: p.outcome,
                name: (len > 0).then(|| String::from_utf8_lossy(&p.name[..len]).into_owned()),
                cookie: p.cookie,
                subject,
            }))
        }
        RecordKind::EgressRedirect => {
            let p: common::EgressPayload = read(bytes, payload, want)?;
            let v6 = Ipv6Addr::from(p.dest.addr);
            let addr = match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None if p.dest.family == common::AF_INET6 => IpAddr::V6(v6),
                None => return Err(DecodeError::UnknownFamily(p.dest.family)),
            };
            Ok(KernelEvent::EgressRedirect {
                connect: ConnectEvent {
                    verdict: verdict(header.verdict, "connect")?,
                    send: false,
                    unspecified: false,
                    connected_peer: false,
                    addr,
                    port: p.dest.port,
                    sock_type: p.dest.sock_type,
                    granted: false,
                    learned: flag(common::FLAG_LEARNED),
                    dns_refused: false,
                    egress_refused: false,
                    subject,
                },
                token: p.token,
            })
        }
        RecordKind::SourceRoute => {
            let p: common::SourceRoutePayload = read(bytes, payload, want)?;
            let v6 = Ipv6Addr::from(p.first_hop);
            let first_hop = match p.family {
                common::AF_INET => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                common::AF_INET6 => IpAddr::V6(v6),
                other => return Err(DecodeError::UnknownFamily(other)),
            };
            Ok(KernelEvent::SourceRoute(SourceRouteEvent {
                verdict: verdict(header.verdict, "source route")?,
                first_hop,
                protocol: p.protocol,
                detail: p.detail,
                subject,
            }))
        }
        RecordKind::Socket => {
            let p: common::SocketPayload = read(bytes, payload, want)?;
            Ok(KernelEvent::Socket(SocketEvent {
                verdict: verdict(header.verdict, "socket")?,
                family: p.family,
                sock_type: p.sock_type,
                protocol: p.protocol,
                subject,
            }))
        }
        RecordKind::Tagged => {
            let p: common::TaggedPayload = read(bytes, payload, want)?;
            let path = lossy(&p.path, p.path_len);
            Ok(if header.verdict == common::VERDICT_DENIED {
                KernelEvent::ClaimRefused {
                    path,
                    claimed_by: p.prior_agent,
                    subject,
                }
            } else {
                KernelEvent::Tagged {
                    path,
                    retagged_from: flag(common::FLAG_RETAGGED).then_some(p.prior_agent),
                    subject,
                }
            })
        }
        RecordKind::Fork => {
            let p: common::ForkPayload = read(bytes, payload, want)?;
            Ok(KernelEvent::Fork {
                child: p.child,
                subject,
            })
        }
        RecordKind::Exit => Ok(KernelEvent::Exit { subject }),
        RecordKind::UnixConnect => {
            let p: common::UnixPayload = read(bytes, payload, want)?;
            Ok(KernelEvent::Unix(UnixEvent {
                verdict: verdict(header.verdict, "unix connect")?,
                name: crate::policy::unix_name_display(&p.path, p.name_len),
                send: p.send != 0,
                sock_type: p.sock_type,
                rule: p.rule,
                subject,
            }))
        }
        RecordKind::UnixPeer => {
            let p: common::UnixPeerPayload = read(bytes, payload, want)?;
            Ok(KernelEvent::UnixPeer(UnixPeerEvent {
                connect: UnixEvent {
                    verdict: verdict(header.verdict, "unix peer")?,
                    name: crate::policy::unix_name_display(&p.given.path, p.given.name_len),
                    send: p.given.send != 0,
                    sock_type: p.given.sock_type,
                    rule: p.given.rule,
                    subject,
                },
                bound: crate::policy::unix_name_display(&p.bound, p.bound_len),
                bound_rule: p.bound_rule,
            }))
        }
    }
}

/// The first `len` bytes of a path buffer (clamped to it), as text.
fn lossy(buf: &[u8], len: u32) -> String {
    let len = (len as usize).min(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn verdict(v: u32, kind: &'static str) -> Result<Verdict, DecodeError> {
    match v {
        common::VERDICT_ALLOWED => Ok(Verdict::Allowed),
        common::VERDICT_DENIED => Ok(Verdict::Denied),
        common::VERDICT_ALERT => Ok(Verdict::Alert),
        verdict => Err(DecodeError::UnknownVerdict { kind, verdict }),
    }
}

/// Text up to the first NUL.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Name of a socket type for reports.
pub fn transport(sock_type: u32) -> &'static str {
    // Low bits only: SOCK_NONBLOCK / SOCK_CLOEXEC are flags.
    match sock_type & 0xf {
        1 => "tcp",
        2 => "udp",
        3 => "raw",
        5 => "seqpacket",
        _ => "other",
    }
}

/// A socket as a person reads it: `inet6 dgram icmpv6 (58)`.
pub fn socket_description(family: u16, sock_type: u32, protocol: u32) -> String {
    let family = match family {
        common::AF_INET => "inet".to_string(),
        common::AF_INET6 => "inet6".to_string(),
        17 => "packet".to_string(),
        40 => "vsock".to_string(),
        f => format!("family {f}"),
    };
    let kind = match sock_type & 0xf {
        1 => "stream",
        2 => "dgram",
        3 => "raw",
        5 => "seqpacket",
        10 => "packet",
        _ => "other",
    };
    let proto = match protocol {
        0 => "ip",
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        132 => "sctp",
        136 => "udplite",
        255 => "raw",
        262 => "mptcp",
        _ => "protocol",
    };
    format!("{family} {kind} {proto} ({protocol})")
}

#[cfg(test)]
#[path = "event/tests.rs"]
mod tests;
