//! Server names judged in the kernel. A TLS connect of an agent to an address it learned for
//! names with only server-name rules (`[[network.tls]]`) is not redirected to the egress endpoint:
//! it goes straight to the server, and the first bytes the socket sends (its ClientHello) are
//! judged where every packet of an agent's socket passes (cgroup_skb/egress). The name must be one
//! the daemon wrote for (agent, address, port) in `SNI_NAMES`: a name a server-name rule covers
//! on that port AND one the agent resolved that address from. Until then nothing the socket sends
//! carrying data leaves; a refused connection's data never does.

use crate::{AgentSlot, NetPayload};

/// Connections whose first bytes are still to be judged (or were refused and are not yet closed
/// by the daemon), all agents together. A connect that finds the map full goes to the egress
/// endpoint instead.
pub const MAX_SNI_FLOWS: u32 = 16_384;
/// (agent, address, port, name) entries: every learned address of every agent may carry a few.
pub const MAX_SNI_NAMES: u32 = 65_536;
/// Longest name held: a DNS name is at most 253 characters.
pub const SNI_NAME_LEN: usize = 256;
/// Port 80 is plain HTTP: its `Host` header is judged by the endpoint, never here.
pub const PLAIN_HTTP_PORT: u16 = 80;
/// First data packets a flow may send without a whole ClientHello before it is refused: each is
/// dropped and comes back as a retransmission, which may carry the whole record.
pub const SNI_MAX_PARTIAL: u32 = 3;

/// Key of `SNI_NAMES`: agent `agent` may present server name `name` (lower case, no trailing dot,
/// zero-filled) to `addr` (IPv4 as `::ffff:a.b.c.d`) on `port`. Value: until when
/// (CLOCK_MONOTONIC ns), the expiry of the DNS answer that gave the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniNameKey {
    pub agent: u32,
    pub port: u16,
    pub len: u16,
    pub addr: [u8; 16],
    pub name: [u8; SNI_NAME_LEN],
}

/// Flow states (`SniFlow::state`).
pub const SNI_PENDING: u32 = 0;
/// Refused: its data packets are dropped until the daemon closes the socket.
pub const SNI_REFUSED: u32 = 1;

/// Value of `SNI_FLOWS`, by socket cookie: whose connection, to where, and how far judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniFlow {
    /// As judged at connect (the allowlist index in force then).
    pub slot: AgentSlot,
    pub cgroup_id: u64,
    pub dest: NetPayload,
    pub state: u32,
    /// Data packets from the stream's start dropped because they held only part of the
    /// ClientHello.
    pub partial: u32,
    /// The sequence number of the stream's first byte, once a data packet showed it
    /// (`start_known`): only a packet from there is judged, a later one is dropped unjudged.
    pub start_seq: u32,
    pub start_known: u32,
}

/// What the first bytes were (`SniPayload::outcome`).
pub const SNI_OUTCOME_NAME: u32 = 1;
pub const SNI_OUTCOME_NO_NAME: u32 = 2;
pub const SNI_OUTCOME_ENCRYPTED: u32 = 3;
pub const SNI_OUTCOME_NOT_TLS: u32 = 4;
pub const SNI_OUTCOME_MALFORMED: u32 = 5;
pub const SNI_OUTCOME_TOO_LARGE: u32 = 6;
/// `SNI_MAX_PARTIAL` data packets in a row held only part of the ClientHello.
pub const SNI_OUTCOME_SPLIT: u32 = 7;

/// Payload of `RecordKind::ServerName`: the verdict on a connection's first bytes. The header's
/// task fields are whoever sent the packet (normally the agent's process writing its
/// ClientHello), the slot fields the connecting agent's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SniPayload {
    pub dest: NetPayload,
    /// The connection's own address and port, with `dest` what the daemon needs to close it.
    pub source: [u8; 16],
    pub source_port: u16,
    pub _pad: u16,
    pub outcome: u32,
    pub name_len: u32,
    pub _pad2: u32,
    pub cookie: u64,
    pub name: [u8; SNI_NAME_LEN],
}

const _: () = assert!(core::mem::size_of::<SniNameKey>() == 24 + SNI_NAME_LEN);
const _: () = assert!(core::mem::size_of::<SniFlow>() == 64);
const _: () = assert!(core::mem::size_of::<SniPayload>() == 64 + SNI_NAME_LEN);

/// `name` as `SNI_NAMES` keys it: lower case, one trailing dot dropped; None when empty or
/// longer than a key holds.
pub fn key_name(name: &[u8]) -> Option<([u8; SNI_NAME_LEN], u16)> {
    let name = match name.split_last() {
        Some((b'.', rest)) => rest,
        _ => name,
    };
    if name.is_empty() || name.len() >= SNI_NAME_LEN {
        return None;
    }
    let mut out = [0u8; SNI_NAME_LEN];
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some((out, name.len() as u16))
}
