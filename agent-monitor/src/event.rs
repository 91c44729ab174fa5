//! Decoding of the kernel's ring-buffer records into typed events. Pure: bytes in, values out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_monitor_common as common;
use agent_monitor_common::ActionRecord;

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

/// Decodes one record as written by the kernel programs.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let want = std::mem::size_of::<ActionRecord>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked; ActionRecord is plain integers (any bit pattern is valid) and the
    // read is unaligned-safe.
    let rec: ActionRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let subject = Subject {
        cgroup_id: rec.cgroup_id,
        ktime_ns: rec.ktime_ns,
        pid: rec.pid,
        tid: rec.tid,
        uid: rec.uid,
        comm: c_string(&rec.comm),
        agent: rec.agent,
        task: rec.task,
        source: rec.source,
    };
    let granted = rec.flags & common::FLAG_GRANTED != 0;
    let path = || {
        let len = (rec.path_len as usize).min(rec.path.len());
        String::from_utf8_lossy(&rec.path[..len]).into_owned()
    };
    match rec.kind {
        common::KIND_EXEC => {
            let len = (rec.path_len as usize).min(rec.path.len());
            let interp_len = (rec.interp_len as usize).min(rec.interp.len());
            Ok(KernelEvent::Exec(ExecEvent {
                granted,
                interpreter: (interp_len > 0)
                    .then(|| String::from_utf8_lossy(&rec.interp[..interp_len]).into_owned()),
                file_dev: rec.file_dev,
                file_ino: rec.file_ino,
                user_ns: rec.flags & common::FLAG_USER_NS != 0,
                basis: rec.detail,
                verdict: verdict(rec.verdict, "exec")?,
                path: String::from_utf8_lossy(&rec.path[..len]).into_owned(),
                truncated: rec.flags & common::FLAG_PATH_TRUNCATED != 0,
                unreadable: rec.flags & common::FLAG_PATH_UNREADABLE != 0,
                not_normal: rec.flags & common::FLAG_PATH_NOT_NORMAL != 0,
                killed: rec.flags & common::FLAG_KILLED != 0,
                subject,
            }))
        }
        common::KIND_CONNECT | common::KIND_SENDMSG | common::KIND_DNS_REDIRECT => {
            let v6 = Ipv6Addr::from(rec.addr);
            let addr = match rec.family {
                common::AF_INET => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                // An IPv4-mapped address on an IPv6 socket is an IPv4 destination.
                common::AF_INET6 => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                },
                other => return Err(DecodeError::UnknownFamily(other)),
            };
            let event = ConnectEvent {
                verdict: verdict(rec.verdict, "connect")?,
                send: rec.kind == common::KIND_SENDMSG,
                unspecified: rec.flags & common::FLAG_ADDR_UNSPECIFIED != 0,
                connected_peer: rec.flags & common::FLAG_CONNECTED_PEER != 0,
                addr,
                port: rec.port,
                sock_type: rec.sock_type,
                granted,
                learned: rec.flags & common::FLAG_LEARNED != 0,
                dns_refused: rec.flags & common::FLAG_DNS_REFUSED != 0,
                subject,
            };
            Ok(if rec.kind == common::KIND_DNS_REDIRECT {
                KernelEvent::DnsRedirect(event)
            } else {
                KernelEvent::Connect(event)
            })
        }
        common::KIND_SOURCE_ROUTE => {
            let v6 = Ipv6Addr::from(rec.addr);
            let first_hop = match rec.family {
                common::AF_INET => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                common::AF_INET6 => IpAddr::V6(v6),
                other => return Err(DecodeError::UnknownFamily(other)),
            };
            Ok(KernelEvent::SourceRoute(SourceRouteEvent {
                verdict: verdict(rec.verdict, "source route")?,
                first_hop,
                protocol: rec.sock_type,
                detail: rec.detail,
                subject,
            }))
        }
        common::KIND_SOCKET => Ok(KernelEvent::Socket(SocketEvent {
            verdict: verdict(rec.verdict, "socket")?,
            family: rec.family,
            sock_type: rec.sock_type,
            protocol: rec.detail,
            subject,
        })),
        common::KIND_TAGGED if rec.verdict == common::VERDICT_DENIED => {
            Ok(KernelEvent::ClaimRefused {
                path: path(),
                claimed_by: rec.prior_agent,
                subject,
            })
        }
        common::KIND_TAGGED => Ok(KernelEvent::Tagged {
            path: path(),
            retagged_from: (rec.flags & common::FLAG_RETAGGED != 0).then_some(rec.prior_agent),
            subject,
        }),
        common::KIND_FORK => Ok(KernelEvent::Fork {
            child: rec.other_pid,
            subject,
        }),
        common::KIND_EXIT => Ok(KernelEvent::Exit { subject }),
        other => Err(DecodeError::UnknownKind(other)),
    }
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
mod tests {
    use super::*;

    fn blank(kind: u32, verdict: u32) -> ActionRecord {
        ActionRecord {
            kind,
            verdict,
            cgroup_id: 77,
            ktime_ns: 5,
            pid: 100,
            tid: 101,
            uid: 1000,
            other_pid: 0,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
            family: 0,
            port: 0,
            sock_type: 0,
            addr: [0; 16],
            flags: 0,
            path_len: 0,
            agent: 3,
            task: 9,
            source: common::SOURCE_UID,
            prior_agent: 0,
            path: [0xAA; 256],
            file_dev: 0,
            detail: 0,
            file_ino: 0,
            interp_len: 0,
            _pad: 0,
            interp: [0xBB; 256],
        }
    }

    fn bytes(r: &ActionRecord) -> Vec<u8> {
        // SAFETY: viewing a repr(C) integer struct as bytes.
        unsafe {
            std::slice::from_raw_parts((r as *const ActionRecord).cast::<u8>(), size_of_val(r))
        }
        .to_vec()
    }

    #[test]
    fn exec_record_decodes_path_and_flags() {
        let mut r = blank(common::KIND_EXEC, common::VERDICT_DENIED);
        r.path[..9].copy_from_slice(b"/bin/true");
        r.path_len = 9;
        r.flags = common::FLAG_KILLED | common::FLAG_PATH_NOT_NORMAL;
        let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
            panic!("not an exec")
        };
        assert!(e.not_normal);
        assert_eq!(e.path, "/bin/true");
        assert_eq!(e.verdict, Verdict::Denied);
        assert!(e.killed && !e.truncated && !e.unreadable);
        assert_eq!(e.subject.comm, "python3");
        assert_eq!(
            (e.subject.pid, e.subject.tid, e.subject.uid),
            (100, 101, 1000)
        );
        assert_eq!(e.subject.cgroup_id, 77);
    }

    #[test]
    fn exec_path_len_beyond_buffer_is_clamped() {
        let mut r = blank(common::KIND_EXEC, common::VERDICT_ALLOWED);
        r.path_len = 10_000;
        r.flags = common::FLAG_PATH_TRUNCATED;
        let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(e.path.chars().count(), 256);
        assert!(e.truncated);
    }

    #[test]
    fn connect4_decodes_mapped_address_and_port() {
        let mut r = blank(common::KIND_CONNECT, common::VERDICT_ALLOWED);
        r.family = common::AF_INET;
        r.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        r.port = 8080;
        r.sock_type = 1;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(c.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 8080);
        assert_eq!(transport(c.sock_type), "tcp");
        assert!(!c.learned && !c.dns_refused);
    }

    #[test]
    fn learned_connect_and_dns_redirect_records() {
        let mut r = blank(common::KIND_CONNECT, common::VERDICT_ALLOWED);
        r.family = common::AF_INET;
        r.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7];
        r.flags = common::FLAG_LEARNED;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!("not a connect")
        };
        assert!(c.learned);
        r.kind = common::KIND_DNS_REDIRECT;
        r.verdict = common::VERDICT_DENIED;
        r.port = 53;
        r.flags = common::FLAG_DNS_REFUSED;
        let KernelEvent::DnsRedirect(d) = decode(&bytes(&r)).unwrap() else {
            panic!("not a DNS redirect")
        };
        assert!(d.dns_refused && !d.learned);
        assert_eq!((d.addr.to_string(), d.port), ("10.0.0.7".into(), 53));
        assert_eq!(d.verdict, Verdict::Denied);
    }

    #[test]
    fn connect6_keeps_v6_and_unmaps_v4_mapped() {
        let mut r = blank(common::KIND_CONNECT, common::VERDICT_ALERT);
        r.family = common::AF_INET6;
        r.addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(c.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.verdict, Verdict::Alert);
        r.addr = "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets();
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(c.addr, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn records_carry_the_kernel_identity_and_grant_flag() {
        let mut r = blank(common::KIND_CONNECT, common::VERDICT_ALLOWED);
        r.family = common::AF_INET;
        r.flags = common::FLAG_GRANTED;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert!(c.granted);
        assert_eq!(
            (c.subject.agent, c.subject.task, c.subject.source),
            (3, 9, common::SOURCE_UID)
        );
    }

    #[test]
    fn tagged_record_names_path_and_prior_agent() {
        let mut r = blank(common::KIND_TAGGED, common::VERDICT_NONE);
        r.path[..8].copy_from_slice(b"/opt/bot");
        r.path_len = 8;
        let KernelEvent::Tagged {
            path,
            retagged_from,
            ..
        } = decode(&bytes(&r)).unwrap()
        else {
            panic!()
        };
        assert_eq!((path.as_str(), retagged_from), ("/opt/bot", None));
        r.flags = common::FLAG_RETAGGED;
        r.prior_agent = 1;
        assert!(matches!(
            decode(&bytes(&r)),
            Ok(KernelEvent::Tagged {
                retagged_from: Some(1),
                ..
            })
        ));
        r.verdict = common::VERDICT_DENIED;
        r.prior_agent = 2;
        assert!(matches!(
            decode(&bytes(&r)),
            Ok(KernelEvent::ClaimRefused { claimed_by: 2, .. })
        ));
    }

    #[test]
    fn script_exec_carries_interpreter_and_file() {
        let mut r = blank(common::KIND_EXEC, common::VERDICT_DENIED);
        r.path[..9].copy_from_slice(b"/tmp/x.sh");
        r.path_len = 9;
        r.interp[..9].copy_from_slice(b"/bin/bash");
        r.interp_len = 9;
        r.file_dev = 254 << 20;
        r.file_ino = 1234;
        r.detail = common::EXEC_BASIS_INTERPRETER;
        r.flags = common::FLAG_KILLED | common::FLAG_USER_NS;
        let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(e.interpreter.as_deref(), Some("/bin/bash"));
        assert_eq!((e.file_dev, e.file_ino), (254 << 20, 1234));
        assert!(e.user_ns && e.killed);
        assert_eq!(e.basis, common::EXEC_BASIS_INTERPRETER);
        r.interp_len = 0;
        let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(e.interpreter, None);
    }

    #[test]
    fn sendmsg_and_unspecified_destinations() {
        let mut r = blank(common::KIND_SENDMSG, common::VERDICT_DENIED);
        r.family = common::AF_INET;
        r.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        r.flags = common::FLAG_ADDR_UNSPECIFIED;
        r.sock_type = 2;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert!(c.send && c.unspecified);
        assert_eq!(c.addr, "0.0.0.0".parse::<IpAddr>().unwrap());
        r.kind = common::KIND_CONNECT;
        r.flags = 0;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert!(!c.send && !c.unspecified && !c.connected_peer);
    }

    #[test]
    fn a_send_without_address_is_reported_as_its_connected_peer() {
        let mut r = blank(common::KIND_SENDMSG, common::VERDICT_ALLOWED);
        r.family = common::AF_INET6;
        r.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        r.port = 4433;
        r.flags = common::FLAG_CONNECTED_PEER;
        r.sock_type = 2;
        let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert!(c.send && c.connected_peer && !c.unspecified);
        assert_eq!((c.addr, c.port), ("127.0.0.1".parse().unwrap(), 4433));
    }

    #[test]
    fn socket_record() {
        let mut r = blank(common::KIND_SOCKET, common::VERDICT_DENIED);
        r.family = common::AF_INET6;
        r.sock_type = 2;
        r.detail = 58;
        let KernelEvent::Socket(s) = decode(&bytes(&r)).unwrap() else {
            panic!()
        };
        assert_eq!(
            socket_description(s.family, s.sock_type, s.protocol),
            "inet6 dgram icmpv6 (58)"
        );
        assert_eq!(s.verdict, Verdict::Denied);
    }

    #[test]
    fn lifecycle_records() {
        let mut r = blank(common::KIND_FORK, common::VERDICT_NONE);
        r.other_pid = 4242;
        assert!(matches!(
            decode(&bytes(&r)),
            Ok(KernelEvent::Fork { child: 4242, .. })
        ));
        let r = blank(common::KIND_EXIT, common::VERDICT_NONE);
        assert!(matches!(decode(&bytes(&r)), Ok(KernelEvent::Exit { .. })));
    }

    #[test]
    fn odd_records_are_errors_not_panics() {
        assert_eq!(
            decode(&[0u8; 10]),
            Err(DecodeError::Short {
                got: 10,
                want: size_of::<ActionRecord>()
            })
        );
        assert_eq!(
            decode(&bytes(&blank(99, 0))),
            Err(DecodeError::UnknownKind(99))
        );
        assert_eq!(
            decode(&bytes(&blank(common::KIND_EXEC, 9))),
            Err(DecodeError::UnknownVerdict {
                kind: "exec",
                verdict: 9
            })
        );
        let mut r = blank(common::KIND_CONNECT, common::VERDICT_ALLOWED);
        r.family = 1;
        assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownFamily(1)));
    }
}
