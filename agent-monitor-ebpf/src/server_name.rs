//! Server names judged in the kernel (see `agent_monitor_common::server_name`). The connect hook
//! registers the flow (`register`); the egress hook sees every packet of the socket and judges
//! the first that carries data (`on_packet`): its ClientHello's server name must be in
//! `SNI_NAMES` for (agent, address, port). Until then, and for ever once refused, packets
//! carrying data are dropped; a passed flow is forgotten, and its packets cost one lookup.
//!
//! The egress hook sees a socket only below where it is attached: a flow is registered only for
//! a socket an agent created there (`AGENT_SCOPED_SOCKETS`, written by `sock_create`, attached at
//! the same place). Any other connect goes to the egress endpoint as before.

use agent_monitor_common::{
    AgentSlot, NetKey, RecordKind, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
    client_hello::{HELLO_BUF, HelloScan, lowercase_words, scan},
    mode_refuses,
    server_name::{
        MAX_SNI_FLOWS, MAX_SNI_NAMES, PLAIN_HTTP_PORT, SNI_MAX_PARTIAL, SNI_NAME_LEN,
        SNI_OUTCOME_ENCRYPTED, SNI_OUTCOME_MALFORMED, SNI_OUTCOME_NAME, SNI_OUTCOME_NO_NAME,
        SNI_OUTCOME_NOT_TLS, SNI_OUTCOME_SPLIT, SNI_OUTCOME_TOO_LARGE, SNI_PENDING, SNI_REFUSED,
        SniFlow, SniNameKey, SniPayload,
    },
};
use aya_ebpf::{
    helpers::generated as h,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};

use crate::maps::{DNS_LEARNED, must_refuse, start_record, submit};
use crate::route::load;

const PASS: i32 = 1;
const DROP: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u8 = 6;

/// `[0]`: nonzero while the daemon judges server names here (it writes `SNI_NAMES`); zero, every
/// connect with request rules goes to the endpoint.
#[map]
pub static SNI_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Flows whose first data packet is still to be judged, or that were refused (socket cookie →
/// flow). Not LRU: an evicted pending flow would pass unjudged. Full: the endpoint takes the
/// connect.
#[map]
pub static SNI_FLOWS: HashMap<u64, SniFlow> = HashMap::with_max_entries(MAX_SNI_FLOWS, 0);

/// (agent, address, port, name) an agent may present → until when. Written by the daemon.
#[map]
pub static SNI_NAMES: HashMap<SniNameKey, u64> = HashMap::with_max_entries(MAX_SNI_NAMES, 0);

/// Sockets agents created where the egress hook is attached (cookie → 1). LRU: an evicted socket
/// only loses the kernel path (its connects go to the endpoint).
#[map]
pub static AGENT_SCOPED_SOCKETS: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(MAX_SNI_FLOWS * 4, 0);

#[map]
static SNI_HELLO: PerCpuArray<[u8; HELLO_BUF]> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SNI_COOKIE_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SNI_NET_KEY_SCRATCH: PerCpuArray<NetKey> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SNI_FLOW_SCRATCH: PerCpuArray<SniFlow> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SNI_KEY_SCRATCH: PerCpuArray<SniNameKey> = PerCpuArray::with_max_entries(1, 0);

/// sock_create of an agent's socket: the egress hook will see its packets.
#[inline(always)]
pub fn scoped(cookie: u64) {
    let _ = AGENT_SCOPED_SOCKETS.insert(&cookie, &1, 0);
}

/// A TCP connect of an agent to a learned address on a port of its request rules: true when its
/// server name will be judged here (the flow is registered; the connect goes straight on). The
/// flow is written into per-CPU scratch here, in the caller's frame without stack, and judged in
/// a frame of its own: the connect hooks use most of the 512 bytes of stack the verifier allows
/// for both.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn register(
    cookie: u64,
    cgroup_id: u64,
    slot: &AgentSlot,
    family: u16,
    addr: &[u8; 16],
    port: u16,
    sock_type: u32,
) -> bool {
    if sock_type != SOCK_STREAM || port == PLAIN_HTTP_PORT {
        return false;
    }
    let Some(flow) = SNI_FLOW_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the per-CPU scratch value, ours while this program runs.
    unsafe {
        (*flow).slot = *slot;
        (*flow).cgroup_id = cgroup_id;
        (*flow).dest.family = family;
        (*flow).dest.port = port;
        (*flow).dest.sock_type = sock_type;
        (*flow).dest.addr = *addr;
        (*flow).state = SNI_PENDING;
        (*flow).partial = 0;
        (*flow).start_seq = 0;
        (*flow).start_known = 0;
    }
    let Some(c) = SNI_COOKIE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as above.
    unsafe { *c = cookie };
    register_staged()
}

/// Inlined, and keeps its values in per-CPU scratch: the connect hook's frame is near the
/// verifier's 512 bytes (a frame of its own would add to it).
#[inline(always)]
fn register_staged() -> bool {
    if SNI_CONFIG.get(0).is_none_or(|on| *on == 0) {
        return false;
    }
    let (Some(flow), Some(key)) = (
        SNI_FLOW_SCRATCH.get_ptr_mut(0),
        SNI_NET_KEY_SCRATCH.get_ptr_mut(0),
    ) else {
        return false;
    };
    // SAFETY: the per-CPU scratch values, ours while this program runs.
    let (flow, key) = unsafe { (&*flow, &mut *key) };
    key.agent = flow.slot.agent;
    key.addr = flow.dest.addr;
    // SAFETY: read in place.
    if unsafe { DNS_LEARNED.get(&*key) }.is_none_or(|l| l.kernel_sni == 0) {
        return false;
    }
    let Some(cookie) = SNI_COOKIE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: read in place.
    let cookie = unsafe { &*cookie };
    // SAFETY: a plain value read.
    if unsafe { AGENT_SCOPED_SOCKETS.get(cookie) }.is_none() {
        return false;
    }
    SNI_FLOWS.insert(cookie, flow, 0).is_ok()
}

/// The verdict on a packet of a registered flow; `None` for every other socket's packet.
#[inline(always)]
pub fn on_packet(ctx: &SkBuffContext) -> Option<i32> {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { h::bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let flow = SNI_FLOWS.get_ptr_mut(&cookie)?;
    Some(judge_packet(ctx, cookie, flow))
}

/// The packet's TCP data. None: not a TCP packet this can read (an IPv6 extension header).
#[inline(always)]
fn tcp_payload(ctx: &SkBuffContext) -> Option<Payload> {
    let [b0] = load::<1>(ctx, 0)?;
    let (tcp_off, source) = match b0 >> 4 {
        4 => {
            let ip = load::<20>(ctx, 0)?;
            if ip[9] != IPPROTO_TCP {
                return None;
            }
            let mut source = [0u8; 16];
            source[10] = 0xff;
            source[11] = 0xff;
            source[12] = ip[12];
            source[13] = ip[13];
            source[14] = ip[14];
            source[15] = ip[15];
            (u32::from(b0 & 0xf) * 4, source)
        }
        6 => {
            let ip = load::<24>(ctx, 0)?;
            if ip[6] != IPPROTO_TCP {
                return None;
            }
            let mut source = [0u8; 16];
            let mut i = 0;
            while i < 16 {
                source[i] = ip[8 + i];
                i += 1;
            }
            (40, source)
        }
        _ => return None,
    };
    let tcp = load::<14>(ctx, tcp_off)?;
    let payload_off = tcp_off + u32::from(tcp[12] >> 4) * 4;
    let len = ctx.len();
    let source_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    // A SYN's data (TCP Fast Open) starts one past its sequence number.
    let syn = u32::from(tcp[13] & 0x02 != 0);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(syn);
    Some(Payload {
        off: payload_off,
        len: len.saturating_sub(payload_off),
        seq,
        source,
        source_port,
    })
}

/// The data of a TCP packet: where it starts in the packet, how long, the sequence number of its
/// first byte; the packet's source address (IPv4 as `::ffff:a.b.c.d`) and port.
struct Payload {
    off: u32,
    len: u32,
    seq: u32,
    source: [u8; 16],
    source_port: u16,
}

#[inline(never)]
fn judge_packet(ctx: &SkBuffContext, cookie: u64, flow: *mut SniFlow) -> i32 {
    let Some(Payload {
        off,
        len,
        seq,
        source,
        source_port,
    }) = tcp_payload(ctx)
    else {
        // Fail closed: nothing this cannot read leaves before the name is judged.
        return DROP;
    };
    if len == 0 {
        return PASS; // SYN, ACK, FIN, RST: no data
    }
    // SAFETY: `flow` points at this socket's map value.
    let f = unsafe { *flow };
    if f.state == SNI_REFUSED {
        return DROP;
    }
    // The first data packet seen starts the stream (nothing left before it: the flow was
    // registered at connect). A later packet of a stream whose start was dropped waits for the
    // start's retransmission, which may carry the whole ClientHello.
    if f.start_known == 0 {
        // SAFETY: this socket's map value.
        unsafe {
            (*flow).start_seq = seq;
            (*flow).start_known = 1;
        }
    } else if seq != f.start_seq {
        return DROP;
    }
    let Some(buf) = SNI_HELLO.get_ptr_mut(0) else {
        return DROP;
    };
    // 1..=HELLO_BUF in a form the verifier follows (len is at least 1 here): what the helper
    // may copy into the buffer.
    let last = if len > HELLO_BUF as u32 {
        HELLO_BUF as u32 - 1
    } else {
        len - 1
    };
    // SAFETY: a volatile read of a local, so the mask stays.
    let n = (unsafe { core::ptr::read_volatile(&last) } & (HELLO_BUF as u32 - 1)) + 1;
    // SAFETY: at most HELLO_BUF bytes into the per-CPU buffer; fails on a short packet.
    let loaded = unsafe { h::bpf_skb_load_bytes(ctx.skb.skb as *const _, off, buf.cast(), n) } == 0;
    if !loaded {
        return DROP;
    }
    // SAFETY: the per-CPU buffer, ours while this program runs.
    let buf = unsafe { &*buf };
    let outcome = match scan(buf, n) {
        HelloScan::ServerName { offset, len } => {
            return name_verdict(cookie, flow, &f, buf, offset, len, source, source_port);
        }
        HelloScan::Incomplete { .. } => {
            if f.partial + 1 < SNI_MAX_PARTIAL {
                // SAFETY: this socket's map value.
                unsafe { (*flow).partial = f.partial + 1 };
                return DROP;
            }
            SNI_OUTCOME_SPLIT
        }
        HelloScan::NoServerName => SNI_OUTCOME_NO_NAME,
        HelloScan::Encrypted => SNI_OUTCOME_ENCRYPTED,
        HelloScan::NotTls => SNI_OUTCOME_NOT_TLS,
        HelloScan::Malformed => SNI_OUTCOME_MALFORMED,
        HelloScan::TooLarge => SNI_OUTCOME_TOO_LARGE,
    };
    refuse(cookie, flow, &f, outcome, None, source, source_port)
}

/// A ClientHello with a server name: passed when `SNI_NAMES` holds it for this flow.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn name_verdict(
    cookie: u64,
    flow: *mut SniFlow,
    f: &SniFlow,
    buf: &[u8; HELLO_BUF],
    offset: u32,
    len: u32,
    source: [u8; 16],
    source_port: u16,
) -> i32 {
    let Some(key) = SNI_KEY_SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    // SAFETY: the per-CPU scratch key, ours while this program runs.
    let key: &mut SniNameKey = unsafe { &mut *key };
    key.agent = f.slot.agent;
    key.port = f.dest.port;
    key.addr = f.dest.addr;
    // The name as the daemon keys it: zeros, the bytes (one helper call), no trailing dot, lower
    // case by words (few steps for the verifier to walk).
    let words = key.name.as_mut_ptr().cast::<u64>();
    let mut w = 0;
    while w < SNI_NAME_LEN / 8 {
        // SAFETY: inside the key's name.
        unsafe { words.add(w).write_unaligned(0) };
        w += 1;
    }
    let mut len = len & 0xff;
    // SAFETY: at most 255 bytes into the 256-byte name; the source is the per-CPU buffer (its
    // offset masked into it), read by the helper.
    let copied = unsafe {
        h::bpf_probe_read_kernel(
            key.name.as_mut_ptr().cast(),
            len,
            buf.as_ptr().add((offset as usize) & (HELLO_BUF - 1)).cast(),
        )
    };
    if copied != 0 {
        len = 0; // refused below
    }
    let last = ((len.wrapping_sub(1)) & 0xff) as usize;
    if len > 0 && key.name[last] == b'.' {
        key.name[last] = 0;
        len -= 1;
    }
    lowercase_words(&mut key.name);
    key.len = len as u16;
    // SAFETY: helper without arguments.
    let now = unsafe { h::bpf_ktime_get_ns() };
    // SAFETY: copied out at once.
    let known = unsafe { SNI_NAMES.get(&*key) }.is_some_and(|until| *until > now);
    if known && len > 0 && (len as usize) < SNI_NAME_LEN {
        let _ = SNI_FLOWS.remove(&cookie);
        report(
            VERDICT_ALLOWED,
            cookie,
            f,
            SNI_OUTCOME_NAME,
            Some(key),
            source,
            source_port,
        );
        return PASS;
    }
    refuse(
        cookie,
        flow,
        f,
        SNI_OUTCOME_NAME,
        Some(key),
        source,
        source_port,
    )
}

/// Refused (enforce, or alert mode unrecorded): the flow stays, dropping its data packets until
/// the daemon closes the socket. Alert mode, recorded: the flow is forgotten and the packet goes.
#[inline(always)]
fn refuse(
    cookie: u64,
    flow: *mut SniFlow,
    f: &SniFlow,
    outcome: u32,
    key: Option<&SniNameKey>,
    source: [u8; 16],
    source_port: u16,
) -> i32 {
    let verdict = if mode_refuses(f.slot.mode) {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    let recorded = report(verdict, cookie, f, outcome, key, source, source_port);
    if must_refuse(verdict, recorded) {
        // SAFETY: this socket's map value.
        unsafe { (*flow).state = SNI_REFUSED };
        return DROP;
    }
    let _ = SNI_FLOWS.remove(&cookie);
    PASS
}

#[inline(always)]
fn report(
    verdict: u32,
    cookie: u64,
    f: &SniFlow,
    outcome: u32,
    key: Option<&SniNameKey>,
    source: [u8; 16],
    source_port: u16,
) -> bool {
    let Some(mut entry) =
        start_record::<SniPayload>(RecordKind::ServerName, verdict, f.cgroup_id, &f.slot, 0)
    else {
        return false;
    };
    // SAFETY: reserved record; field by field (see `start_record`).
    unsafe {
        let p = &raw mut (*entry.as_mut_ptr()).payload;
        (*p).dest = f.dest;
        (*p).source = source;
        (*p).source_port = source_port;
        (*p)._pad = 0;
        (*p).outcome = outcome;
        (*p)._pad2 = 0;
        (*p).cookie = cookie;
        match key {
            Some(k) => {
                (*p).name_len = u32::from(k.len);
                let _ =
                    aya_ebpf::helpers::bpf_probe_read_kernel_buf(k.name.as_ptr(), &mut (*p).name);
            }
            None => {
                (*p).name_len = 0;
                let words = (&raw mut (*p).name).cast::<u64>();
                let mut i = 0;
                while i < SNI_NAME_LEN / 8 {
                    words.add(i).write_unaligned(0);
                    i += 1;
                }
            }
        }
    }
    submit(entry, verdict);
    true
}

const _: () = assert!(MAX_SNI_NAMES > 0);
