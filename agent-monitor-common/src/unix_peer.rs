//! Judging a unix connect by the listener's bound name (`syscalls/sys_exit_connect`): the cgroup
//! hook remembers the connecting socket of a connect it allowed, and after the kernel completed
//! the connect the tracepoint reads the name the peer was bound to (`unix_sk(sk)->peer->addr`),
//! which the agent does not control, and judges it with the same rules.

use crate::{UNIX_PATH_LEN, UnixKey, UnixPayload};

/// Member offsets the tracepoint follows, read by the daemon from the kernel's BTF and written
/// into `UNIX_PEER_LAYOUT` (one entry). `enabled` = 0 (BTF lacked a member, or no daemon wrote
/// it yet): the hook remembers nothing and connects are judged by name only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixPeerLayout {
    pub enabled: u32,
    /// `struct unix_sock`: `peer` (`struct sock *`) and `addr` (`struct unix_address *`).
    pub unix_sock_peer: u32,
    pub unix_sock_addr: u32,
    /// `struct unix_address`: `len` (bytes of `name` in use) and `name` (`struct sockaddr_un`).
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// 1: `sock/sk_data_ready` has the record layout `unix_peer.rs` reads, so named datagram
    /// sends are judged (after delivery) on the receiver's bound name too.
    pub data_ready: u32,
}

/// `UNIX_PEER_PENDING` value, by thread id: a connect the cgroup hook allowed and has not seen
/// return yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPending {
    /// The connecting `struct sock *` (from `bpf_sock_addr_kern.sk`).
    pub sk: u64,
    /// The name the caller gave, as the hook judged it.
    pub given: UnixKey,
    /// The tracepoint's workspace for the listener's bound name: this entry is the thread's
    /// own, where a per-CPU scratch could be shared with a program that preempted it.
    pub bound: UnixKey,
    pub sock_type: u32,
    /// The entry that named the given name, as in [`UnixPayload::rule`].
    pub rule: u32,
    /// 1: a datagram send naming its socket (judged at delivery, `sock/sk_data_ready`); 0: a
    /// connect (judged as it returns, `syscalls/sys_exit_connect`).
    pub send: u32,
    pub _pad: u32,
}

/// Record payload of `RecordKind::UnixPeer`: the connect or datagram send as the hook saw it
/// (`given`) and the bound name of the socket it reached (a connect's listener, a datagram's
/// receiver), which the tracepoint refused (`VERDICT_DENIED`: the process was sent SIGKILL) or
/// let through in alert mode (`VERDICT_ALERT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPeerPayload {
    pub given: UnixPayload,
    /// As `UnixKey::name_len`, for `bound`.
    pub bound_len: u32,
    /// The entry that named the bound name (`UNIX_ALLOW`, `UNIX_DENY`), or 0: the default.
    pub bound_rule: u32,
    pub bound: [u8; UNIX_PATH_LEN],
    pub _pad: u32,
}

/// Offset of `sk` in `struct bpf_sock_addr_kern` (checked against BTF with `uaddr`).
pub const SOCK_ADDR_KERN_SK: u32 = 0;
/// Threads with a connect in flight the tracepoint will judge (`UNIX_PEER_PENDING`, LRU).
pub const MAX_UNIX_PENDING: u32 = 16_384;

/// io_uring worker and SQPOLL threads of agents (`AGENT_IO_THREADS`), at most.
pub const MAX_AGENT_IO_THREADS: u32 = 16_384;

/// The `rule` of a unix connect the hook refused because an io_uring thread of the agent made
/// it: such a call never returns through `connect()`, so the listener's bound name could not be
/// judged after it (docs/unix-sockets.md).
pub const UNIX_RULE_IO_THREAD: u32 = u32::MAX;

const _: () = assert!(core::mem::size_of::<UnixPeerLayout>() == 24);
const _: () = assert!(core::mem::size_of::<UnixPending>() == 8 + 2 * 116 + 16);
const _: () = assert!(core::mem::size_of::<UnixPeerPayload>() == 128 + 8 + UNIX_PATH_LEN + 4);
