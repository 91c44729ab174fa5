//! The ring-buffer records: a common [`RecordHeader`] (who acted, as which agent, with which
//! verdict) followed by one payload per [`RecordKind`]. The kernel reserves exactly
//! `size_of::<Record<P>>()` for the kind it writes, so a connect record is 96 bytes and only an
//! exec carries the two path buffers.

use crate::COMM_LEN;

/// Bytes of path carried by a record (the exec file name as the kernel saw it).
pub const RECORD_PATH_LEN: usize = 256;

/// What a record reports; `RecordHeader::kind` holds it as a `u32`. The numbers are the record
/// format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A judged exec ([`ExecPayload`]).
    Exec = 1,
    /// A judged connect ([`NetPayload`]).
    Connect = 2,
    /// An agent task forked ([`ForkPayload`]).
    Fork = 3,
    /// An agent process exited (no payload).
    Exit = 4,
    /// A datagram sent to an address given with the send (unconnected UDP, or a connected UDP
    /// socket sending elsewhere), or a connected socket's datagram the kernel hands to the hook
    /// without an address (`FLAG_CONNECTED_PEER`): cgroup sendmsg4/sendmsg6 ([`NetPayload`]).
    Sendmsg = 10,
    /// An inet socket an agent may not create (raw, ICMP "ping", SCTP, MPTCP, …): cgroup
    /// sock_create or the socket() tracepoint. Only refused or alerted creations are recorded
    /// ([`SocketPayload`]).
    Socket = 11,
    /// A packet of an agent's socket carried a source route: it would go to its first hop rather
    /// than the destination the connect/sendmsg hooks judged. Refused (dropped) in enforce mode.
    /// The header's task fields are whoever ran when the packet left (a TCP retransmission leaves
    /// from a timer): the agent is the socket's, in the slot fields and `cgroup_id` (the socket's
    /// cgroup) ([`SourceRoutePayload`]).
    SourceRoute = 12,
    /// An executable selector claimed a process at exec. `verdict` `VERDICT_NONE`: it became that
    /// agent (the header's slot fields; with `FLAG_RETAGGED`, `prior_agent` is the agent it left
    /// by precedence). `VERDICT_DENIED`: a higher-ranked identity (the slot fields) keeps it and
    /// the claim of agent `prior_agent` was refused. Its `agent` and `prior_agent` are stable
    /// agent ids (identities as stored), not the allowlist indices other records carry
    /// ([`TaggedPayload`]).
    Tagged = 20,
    /// An agent socket's DNS traffic (port 53) was redirected to the proxy (`VERDICT_ALLOWED`), or
    /// refused because the agent has no proxy endpoint (`FLAG_DNS_REFUSED`); the payload is the
    /// original destination. Names the process behind a query; not an action of its own
    /// ([`NetPayload`]).
    DnsRedirect = 30,
    /// An AF_UNIX connect, or a datagram send naming its socket, of an agent with a `[unix]`
    /// section: cgroup connect_unix / sendmsg_unix ([`crate::UnixPayload`]).
    UnixConnect = 50,
    /// An agent's connect to a destination with request rules went to the egress endpoint.
    EgressRedirect = 40,
    /// A unix connect the hook allowed by name led to a listener whose bound name the agent may
    /// not reach (`syscalls/sys_exit_connect`, [`crate::UnixPeerPayload`]).
    UnixPeer = 51,
    /// The first bytes of an agent's connection whose server name is judged in the kernel
    /// ([`crate::server_name::SniPayload`]).
    ServerName = 41,
}

/// A `RecordHeader::kind` no [`RecordKind`] has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for RecordKind {
    type Error = UnknownKind;

    fn try_from(kind: u32) -> Result<Self, UnknownKind> {
        Ok(match kind {
            1 => RecordKind::Exec,
            2 => RecordKind::Connect,
            3 => RecordKind::Fork,
            4 => RecordKind::Exit,
            10 => RecordKind::Sendmsg,
            11 => RecordKind::Socket,
            12 => RecordKind::SourceRoute,
            20 => RecordKind::Tagged,
            30 => RecordKind::DnsRedirect,
            50 => RecordKind::UnixConnect,
            40 => RecordKind::EgressRedirect,
            51 => RecordKind::UnixPeer,
            41 => RecordKind::ServerName,
            other => return Err(UnknownKind(other)),
        })
    }
}

impl RecordKind {
    /// Every kind, for tables and tests.
    pub const ALL: [RecordKind; 13] = [
        RecordKind::Exec,
        RecordKind::Connect,
        RecordKind::Fork,
        RecordKind::Exit,
        RecordKind::Sendmsg,
        RecordKind::Socket,
        RecordKind::SourceRoute,
        RecordKind::Tagged,
        RecordKind::DnsRedirect,
        RecordKind::UnixConnect,
        RecordKind::EgressRedirect,
        RecordKind::UnixPeer,
        RecordKind::ServerName,
    ];

    /// Bytes the kernel writes for a record of this kind (header and payload).
    pub const fn record_size(self) -> usize {
        match self {
            RecordKind::Exec => core::mem::size_of::<Record<ExecPayload>>(),
            RecordKind::Connect | RecordKind::Sendmsg | RecordKind::DnsRedirect => {
                core::mem::size_of::<Record<NetPayload>>()
            }
            RecordKind::Fork => core::mem::size_of::<Record<ForkPayload>>(),
            RecordKind::Exit => core::mem::size_of::<Record<ExitPayload>>(),
            RecordKind::Socket => core::mem::size_of::<Record<SocketPayload>>(),
            RecordKind::SourceRoute => core::mem::size_of::<Record<SourceRoutePayload>>(),
            RecordKind::Tagged => core::mem::size_of::<Record<TaggedPayload>>(),
            RecordKind::UnixConnect => core::mem::size_of::<Record<crate::UnixPayload>>(),
            RecordKind::EgressRedirect => core::mem::size_of::<Record<EgressPayload>>(),
            RecordKind::UnixPeer => core::mem::size_of::<Record<crate::UnixPeerPayload>>(),
            RecordKind::ServerName => {
                core::mem::size_of::<Record<crate::server_name::SniPayload>>()
            }
        }
    }
}

/// Size of the ring buffer the records go through (`ACTIONS`): what it holds while the daemon
/// does not read is `ACTIONS_RING_BYTES / ring_bytes(kind.record_size())` records of a kind.
pub const ACTIONS_RING_BYTES: u32 = 8 * 1024 * 1024;

/// Bytes a record of `record_size` bytes takes in a ring buffer: the kernel's 8-byte sample
/// header, then the record, rounded up to 8.
pub const fn ring_bytes(record_size: usize) -> usize {
    (record_size + 8 + 7) & !7
}

/// Verdicts taken by the kernel.
pub const VERDICT_NONE: u32 = 0;
pub const VERDICT_ALLOWED: u32 = 1;
pub const VERDICT_DENIED: u32 = 2;
pub const VERDICT_ALERT: u32 = 3;

/// Record flags (`RecordHeader::flags`).
/// The exec path did not fit (`RECORD_PATH_LEN`); the exec was judged as not allowed.
pub const FLAG_PATH_TRUNCATED: u32 = 1;
/// The exec path could not be read at all.
pub const FLAG_PATH_UNREADABLE: u32 = 2;
/// A denied exec was stopped by SIGKILL from the exec tracepoint.
pub const FLAG_KILLED: u32 = 4;
/// The exec path was not in normal form (`//`, `/./`, `/../`); judged as not allowed, because
/// `/opt/tools/../../bin/sh` would otherwise match the glob `/opt/tools/*`.
pub const FLAG_PATH_NOT_NORMAL: u32 = 8;
/// A connect was allowed because the agent resolved the address through the DNS proxy.
pub const FLAG_LEARNED: u32 = 256;
/// Refused because of the DNS proxy: on a DNS redirect record, the agent has no proxy endpoint (its
/// DNS is not redirected); on a connect record, the destination is another agent's proxy
/// endpoint, which only the kernel's redirect of that agent may use.
pub const FLAG_DNS_REFUSED: u32 = 512;
/// Connect/sendmsg: the destination was the unspecified address (`0.0.0.0`, `::`), which Linux
/// sends to loopback; it was judged as `127.0.0.1` / `::1`. `addr` holds what the caller gave.
pub const FLAG_ADDR_UNSPECIFIED: u32 = 16;
/// Sendmsg: the send named no address (a connected UDP socket sending with control messages such
/// as `IP_TOS`, with `MSG_DONTROUTE` or with IP options, for which the kernel runs the hook with
/// an empty address); it was judged as the socket's connected peer, which `addr`/`port` hold.
pub const FLAG_CONNECTED_PEER: u32 = 1024;
/// Exec: the task was not in the initial user namespace, where an unprivileged process can
/// remap names (mount namespaces, chroot); only file identity was trusted.
pub const FLAG_USER_NS: u32 = 32;
/// Allowed by a task grant (not by the agent's static allowlist).
pub const FLAG_GRANTED: u32 = 64;
/// The process was another agent before this exec; the higher-ranked selector took it.
pub const FLAG_RETAGGED: u32 = 128;
/// A connect or datagram to a destination with request rules that could not go through the egress
/// endpoint (UDP — QUIC falls back to TCP —, no endpoint, a socket bound before its connect), or
/// an agent's own connect to the endpoint: refused (alert mode: reported).
pub const FLAG_EGRESS_REFUSED: u32 = 2048;

/// What every record starts with: what it is, the verdict, and who acted as which agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// A [`RecordKind`].
    pub kind: u32,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// cgroup v2 id of the acting task: the agent identity key.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the hook.
    pub ktime_ns: u64,
    /// Process id (tgid) and thread id of the acting task.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// `FLAG_*`.
    pub flags: u32,
    pub comm: [u8; COMM_LEN],
    /// The acting process's identity as the kernel judged it (`AgentSlot` fields).
    pub agent: u32,
    pub task: u32,
    pub source: u32,
    pub _pad: u32,
}

/// A record as the kernel writes it: the header, then the payload of its kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<P> {
    pub header: RecordHeader,
    pub payload: P,
}

/// Connect, sendmsg, DNS redirect: where the action went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetPayload {
    /// `AF_INET` or `AF_INET6` as the caller used it.
    pub family: u16,
    /// Host order.
    pub port: u16,
    /// `SOCK_STREAM`, `SOCK_DGRAM`…
    pub sock_type: u32,
    /// IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

/// Exec: the file that ran and how the verdict was reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecPayload {
    /// The thread id before exec (`old_pid`).
    pub old_pid: u32,
    /// How the verdict was reached, `EXEC_BASIS_*`.
    pub basis: u32,
    /// The file that runs (for a script: its interpreter), as the kernel holds it: `i_sb->s_dev`
    /// (kernel encoding, major << 20 | minor) and `i_ino`.
    pub file_dev: u32,
    /// Bytes of `path` that are valid (without the NUL).
    pub path_len: u32,
    pub file_ino: u64,
    /// Bytes of `interp` that are valid; 0 when the file name is the program (no script).
    pub interp_len: u32,
    pub _pad: u32,
    /// The file name given to exec.
    pub path: [u8; RECORD_PATH_LEN],
    /// The interpreter a script named on its `#!` line (`bprm->interp`).
    pub interp: [u8; RECORD_PATH_LEN],
}

/// Socket: what an agent asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPayload {
    pub family: u16,
    pub _pad: u16,
    pub sock_type: u32,
    /// `IPPROTO_*`.
    pub protocol: u32,
    pub _pad2: u32,
}

/// Source route: where the packet would have gone instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRoutePayload {
    pub family: u16,
    pub _pad: u16,
    /// IPv4: the IP protocol. IPv6: 0.
    pub protocol: u32,
    /// IPv4: the first option's type (0x83 LSRR, 0x89 SSRR). IPv6: the routing header's type.
    pub detail: u32,
    pub _pad2: u32,
    /// The first hop (IPv4 as `::ffff:a.b.c.d`).
    pub first_hop: [u8; 16],
}

/// Fork: the new task.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkPayload {
    pub child: u32,
    pub _pad: u32,
}

/// Exit carries nothing beyond the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitPayload {}

/// Tagged: the executable the selector matched and the other agent involved.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaggedPayload {
    /// The thread id before exec (`old_pid`).
    pub old_pid: u32,
    /// With `FLAG_RETAGGED`: the agent (stable id) the process had before. `VERDICT_DENIED`: the
    /// agent whose claim was refused.
    pub prior_agent: u32,
    /// Bytes of `path` that are valid (without the NUL).
    pub path_len: u32,
    pub _pad: u32,
    pub path: [u8; RECORD_PATH_LEN],
}

/// How an exec verdict was reached (`ExecPayload::basis`), so the report can say which fact
/// decided. Allowed: `FILE` (the file is one an exact rule names) or `NAME` (the name matched a
/// rule). Not allowed: which fact failed.
/// Payload of `RecordKind::EgressRedirect`: the original destination and the flow's token (the
/// key of `EGRESS_FLOWS`, the host part of the socket's loopback source address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPayload {
    pub dest: NetPayload,
    pub token: u32,
    pub _pad: u32,
}

pub const EXEC_BASIS_FILE: u32 = 1;
pub const EXEC_BASIS_NAME: u32 = 2;
/// Not allowed: neither the file nor its name is on the allowlist.
pub const EXEC_BASIS_NO_MATCH: u32 = 3;
/// Not allowed: a script whose interpreter (`#!`) is not on the allowlist.
pub const EXEC_BASIS_INTERPRETER: u32 = 4;
/// Not allowed: a script whose own name is not on the allowlist.
pub const EXEC_BASIS_SCRIPT: u32 = 5;
/// Not allowed: in a user namespace names are not trusted and the file is no exact rule's file.
pub const EXEC_BASIS_USER_NS: u32 = 6;
/// Not allowed: the kernel could not read the exec's facts.
pub const EXEC_BASIS_UNREADABLE: u32 = 7;

// The kernel and the daemon must agree on these sizes; a change here is a format change. Every
// payload is 8-aligned at offset 72, with no implicit padding.
const _: () = assert!(core::mem::size_of::<RecordHeader>() == 72);
const _: () = assert!(core::mem::size_of::<NetPayload>() == 24);
const _: () = assert!(core::mem::size_of::<ExecPayload>() == 32 + 2 * RECORD_PATH_LEN);
const _: () = assert!(core::mem::size_of::<SocketPayload>() == 16);
const _: () = assert!(core::mem::size_of::<SourceRoutePayload>() == 32);
const _: () = assert!(core::mem::size_of::<ForkPayload>() == 8);
const _: () = assert!(core::mem::size_of::<ExitPayload>() == 0);
const _: () = assert!(core::mem::size_of::<TaggedPayload>() == 16 + RECORD_PATH_LEN);
const _: () = assert!(RecordKind::Connect.record_size() == 96);
const _: () = assert!(core::mem::size_of::<EgressPayload>() == 32);
const _: () = assert!(RecordKind::Exec.record_size() == 616);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_converts_back_from_its_number() {
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::try_from(kind as u32), Ok(kind));
        }
        for n in [0, 5, 13, 21, 31, u32::MAX] {
            assert_eq!(RecordKind::try_from(n), Err(UnknownKind(n)));
        }
    }

    #[test]
    fn only_exec_records_carry_the_path_buffers() {
        for kind in RecordKind::ALL {
            let size = kind.record_size();
            assert_eq!(size % 8, 0, "{kind:?}");
            match kind {
                RecordKind::Exec => assert!(size > 2 * RECORD_PATH_LEN),
                RecordKind::Tagged => assert!(size > RECORD_PATH_LEN && size < 2 * RECORD_PATH_LEN),
                RecordKind::UnixConnect => assert_eq!(size, 200),
                RecordKind::UnixPeer => assert_eq!(size, 320),
                // One per agent TLS connection whose name the kernel judges, with the name.
                RecordKind::ServerName => assert_eq!(size, 392),
                _ => assert!(size <= 104, "{kind:?}: {size} bytes"),
            }
        }
        assert_eq!(ring_bytes(RecordKind::Connect.record_size()), 104);
        assert_eq!(ring_bytes(RecordKind::Exec.record_size()), 624);
    }
}
