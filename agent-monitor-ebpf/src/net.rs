//! Network verdicts on the cgroup hooks: the kernel's own copy of the destination (sock_addr
//! connect and sendmsg), and the kinds of socket an agent may create at all (sock_create).

use agent_monitor_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_FAMILIES, AgentSlot, COUNTER_GRANTS_EXPIRED,
    COUNTER_SOCKET_REFUSED, FLAG_ADDR_UNSPECIFIED, FLAG_CONNECTED_PEER, FLAG_DNS_REFUSED,
    FLAG_GRANTED, FLAG_LEARNED, MAX_PORT_RANGES, NET_KEY_AGENT_BITS, NetAllow, NetKey, NetPayload,
    RecordKind, SocketPayload, TASK_NONE, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
    mode_refuses, net_judged_addr, socket_allowed, source_is_tag,
};
use aya_ebpf::{
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockContext, TracePointContext},
};

use crate::identity::{current_identity, in_force};
use crate::maps::{
    AGENT_SOCKETS, NET_ALLOW, TASK_NET_GRANTS, count, current_agent, must_refuse, report_net,
    start_record, submit,
};

/// Return values of cgroup sock and sock_addr programs.
const PASS: i32 = 1;
const REJECT: i32 = 0;

/// connect4 and sendmsg4: an IPv4 destination, judged as `::ffff:a.b.c.d`. An agent's DNS
/// traffic (port 53) is redirected to its proxy instead of judged.
///
/// These hooks sit at the cgroup root, so the identity lookup is the whole cost for every other
/// process on the host: it is inlined into the program, and only agents pay a subprogram call
/// (a call and its return measurably cost more than the lookup where return-stack mitigations
/// make every `ret` expensive, docs/benchmarks.md).
#[inline(always)]
pub fn on_addr4(ctx: &SockAddrContext, kind: RecordKind) -> i32 {
    match current_agent() {
        Some((cgroup_id, slot)) => agent_addr4(ctx, kind, cgroup_id, &slot),
        None => PASS,
    }
}

#[inline(never)]
fn agent_addr4(ctx: &SockAddrContext, kind: RecordKind, cgroup_id: u64, slot: &AgentSlot) -> i32 {
    let slot = *slot;
    let (addr, port, sock_type) = dest4(ctx);
    if kind == RecordKind::Sendmsg && port == 0 {
        let (peer, peer_port) = peer4(ctx);
        return judge_connected_send(ctx, cgroup_id, slot, AF_INET, peer, peer_port, sock_type);
    }
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET, addr, port, sock_type) {
        return v;
    }
    judge(
        ctx, kind, cgroup_id, slot, AF_INET, addr, port, sock_type, 0,
    )
}

/// connect6 and sendmsg6: an IPv6 destination; `::ffff:a.b.c.d` is the IPv4 address it maps.
/// Split like [`on_addr4`].
#[inline(always)]
pub fn on_addr6(ctx: &SockAddrContext, kind: RecordKind) -> i32 {
    match current_agent() {
        Some((cgroup_id, slot)) => agent_addr6(ctx, kind, cgroup_id, &slot),
        None => PASS,
    }
}

#[inline(never)]
fn agent_addr6(ctx: &SockAddrContext, kind: RecordKind, cgroup_id: u64, slot: &AgentSlot) -> i32 {
    let slot = *slot;
    let (addr, port, sock_type) = dest6(ctx);
    if kind == RecordKind::Sendmsg && port == 0 {
        let (peer, peer_port) = peer6(ctx);
        return judge_connected_send(ctx, cgroup_id, slot, AF_INET6, peer, peer_port, sock_type);
    }
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET6, addr, port, sock_type) {
        return v;
    }
    judge(
        ctx, kind, cgroup_id, slot, AF_INET6, addr, port, sock_type, 0,
    )
}

/// A datagram that names no address on a connected socket. The kernel runs sendmsg4/6 for a
/// connected send only when something about the send is not the socket's cached route (control
/// messages such as `IP_TOS`/`IP_TTL`/`IPV6_TCLASS`, which QUIC stacks send with every datagram;
/// `MSG_DONTROUTE`; IP options), and then with an empty address (port 0, which a send naming an
/// address can never carry: the kernel refuses it first). The datagram goes to the socket's
/// peer, so that is what is judged. A peer that is the agent's own DNS proxy endpoint is the
/// kernel's own redirect of a connect already reported: it passes.
#[inline(always)]
fn judge_connected_send(
    ctx: &SockAddrContext,
    cgroup_id: u64,
    slot: AgentSlot,
    family: u16,
    peer: [u8; 16],
    port: u16,
    sock_type: u32,
) -> i32 {
    if crate::dns::proxy_owner(&peer, port, sock_type) == Some(slot.agent) {
        return PASS;
    }
    judge(
        ctx,
        RecordKind::Sendmsg,
        cgroup_id,
        slot,
        family,
        peer,
        port,
        sock_type,
        FLAG_CONNECTED_PEER,
    )
}

/// The connected peer of the socket behind an AF_INET sock_addr hook, as `::ffff:a.b.c.d` and a
/// host-order port. An AF_INET6 socket connected to an IPv4-mapped address sends through the
/// IPv4 path, and its IPv4 peer is kept in the same place.
#[inline(always)]
fn peer4(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: `sk` of a sock_addr context is a valid, full socket; dst_ip4 and dst_port are
    // readable fields of bpf_sock (the kernel rewrites the loads).
    let (ip, port) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        ((*sk).dst_ip4, (*sk).dst_port)
    };
    let b = ip.to_ne_bytes(); // network order in memory
    let addr = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ];
    (addr, u16::from_be(port))
}

/// The connected peer of the AF_INET6 socket behind a sock_addr hook.
#[inline(always)]
fn peer6(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    // SAFETY: as in `peer4`; dst_ip6 is a readable field of bpf_sock.
    let (w, port) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (
            [
                (*sk).dst_ip6[0],
                (*sk).dst_ip6[1],
                (*sk).dst_ip6[2],
                (*sk).dst_ip6[3],
            ],
            (*sk).dst_port,
        )
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    (addr, u16::from_be(port))
}

/// Destination of an AF_INET sock_addr hook: address as `::ffff:a.b.c.d`, port in host order,
/// socket type.
#[inline(always)]
fn dest4(ctx: &SockAddrContext) -> ([u8; 16], u16, u32) {
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable at connect4 and
    // sendmsg4. They are the kernel's copy of the sockaddr, not the caller's memory.
    let (ip, port, sock_type) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.type_)
    };
    let b = ip.to_ne_bytes(); // network order in memory
    let addr = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ];
    (addr, u16::from_be(port as u16), sock_type)
}

/// Destination of an AF_INET6 sock_addr hook (IPv4-mapped addresses as they are).
#[inline(always)]
fn dest6(ctx: &SockAddrContext) -> ([u8; 16], u16, u32) {
    // SAFETY: as above; user_ip6 is readable at connect6 and sendmsg6.
    let (w, port, sock_type) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.user_port,
            sa.type_,
        )
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    (addr, u16::from_be(port as u16), sock_type)
}

/// How a connect or send was allowed, if it was.
enum NetAllowed {
    No,
    /// By the agent's static allowlist.
    Policy,
    /// By an address the agent resolved through its DNS proxy, until that answer's expiry.
    Learned,
    /// By a live grant of the agent's current task.
    Grant,
}

/// The network judgement, in one place: the agent's static allowlist, then what it learned
/// through DNS, then its task's grants. Learned addresses and grants each carry an `Expiry` the
/// kernel compares with its own clock.
#[inline(always)]
fn allowed(slot: &AgentSlot, addr: [u8; 16], port: u16) -> NetAllowed {
    let key = Key::new(
        NET_KEY_AGENT_BITS + 128,
        NetKey {
            agent: slot.agent,
            addr,
        },
    );
    if NET_ALLOW.get(&key).is_some_and(|a| ports_allow(a, port)) {
        return NetAllowed::Policy;
    }
    if crate::dns::learned_allows(slot.agent, addr, port) {
        return NetAllowed::Learned;
    }
    if slot.task == TASK_NONE {
        return NetAllowed::No;
    }
    let key = Key::new(
        NET_KEY_AGENT_BITS + 128,
        NetKey {
            agent: slot.task,
            addr,
        },
    );
    match TASK_NET_GRANTS.get(&key) {
        Some(grant) if ports_allow(&grant.allow, port) => {
            // SAFETY: helper with no arguments.
            let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
            if grant.expiry.is_live(now) {
                NetAllowed::Grant
            } else {
                count(COUNTER_GRANTS_EXPIRED);
                NetAllowed::No
            }
        }
        _ => NetAllowed::No,
    }
}

#[inline(always)]
pub(crate) fn ports_allow(allow: &NetAllow, port: u16) -> bool {
    let n = allow.count as usize;
    let mut i = 0;
    while i < MAX_PORT_RANGES && i < n {
        let r = allow.ranges[i];
        if r.lo <= port && port <= r.hi {
            return true;
        }
        i += 1;
    }
    false
}

/// `flags`: what the record carries beyond the judgement (`FLAG_CONNECTED_PEER`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn judge(
    ctx: &SockAddrContext,
    kind: RecordKind,
    cgroup_id: u64,
    slot: AgentSlot,
    family: u16,
    addr: [u8; 16],
    port: u16,
    sock_type: u32,
    mut flags: u32,
) -> i32 {
    // 0.0.0.0 and :: go to loopback: judge where the bytes go, report what was asked.
    let (judged, unspecified) = net_judged_addr(addr);
    // Never the egress endpoint: only the kernel's redirect goes there. (Computed before the
    // DNS proxy check: the other order kept that check's half-defined Option across this map
    // lookup, a stack spill the verifier refuses.)
    let endpoint = crate::egress::is_endpoint(&judged, port);
    // Nor another agent's DNS proxy endpoint, whatever the rules say.
    let foreign = crate::dns::foreign_proxy(slot.agent, &judged, port, sock_type);
    let how = if foreign || endpoint {
        NetAllowed::No
    } else {
        allowed(&slot, judged, port)
    };
    // Learned addresses on a port of the agent's request rules go to the egress endpoint.
    if matches!(how, NetAllowed::Learned)
        && let Some(v) =
            crate::egress::redirect(ctx, kind, cgroup_id, slot, family, addr, port, sock_type)
    {
        return v;
    }
    if endpoint {
        flags |= agent_monitor_common::FLAG_EGRESS_REFUSED;
    }
    let verdict = verdict_of(!matches!(how, NetAllowed::No), slot);
    if unspecified {
        flags |= FLAG_ADDR_UNSPECIFIED;
    }
    if foreign {
        flags |= FLAG_DNS_REFUSED;
    }
    match how {
        NetAllowed::Learned => flags |= FLAG_LEARNED,
        NetAllowed::Grant => flags |= FLAG_GRANTED,
        NetAllowed::No | NetAllowed::Policy => {}
    }
    let dest = NetPayload {
        family,
        addr,
        port,
        sock_type,
    };
    let recorded = report_net(kind, verdict, cgroup_id, &slot, flags, dest);
    if must_refuse(verdict, recorded) {
        REJECT
    } else {
        PASS
    }
}

/// sock_create: an agent creates TCP and UDP sockets only. Allowed creations are not recorded
/// (every connect and send on them is); refused ones are.
pub fn on_sock_create(ctx: &SockContext) -> i32 {
    let Some((cgroup_id, raw)) = current_identity() else {
        return PASS;
    };
    // A tag names this agent only while its task runs: the socket remembers it for the egress
    // program (`route.rs`), which may run from a timer.
    if source_is_tag(raw.source) {
        // SAFETY: the helper takes the program's socket context.
        let cookie =
            unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.sock.cast()) };
        let _ = AGENT_SOCKETS.insert(&cookie, &raw, 0);
    }
    // The egress hook, attached where this one is, sees this socket's packets.
    // SAFETY: the helper takes the program's socket context.
    crate::server_name::scoped(unsafe {
        aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.sock.cast())
    });
    let slot = in_force(&raw);
    // SAFETY: the kernel passes a valid bpf_sock; family, type and protocol are readable here.
    let (family, sock_type, protocol) = unsafe {
        let sk = &*ctx.sock;
        (sk.family, sk.type_, sk.protocol)
    };
    if socket_allowed(sock_type, protocol) {
        return PASS;
    }
    let verdict = verdict_of(false, slot);
    let recorded = report_socket(
        verdict,
        cgroup_id,
        &slot,
        family as u16,
        sock_type,
        protocol,
    );
    if must_refuse(verdict, recorded) {
        REJECT
    } else {
        PASS
    }
}

/// Offsets in the `syscalls/sys_enter_socket` record (checked against tracefs by the daemon).
const SYSCALL_FAMILY: usize = 16;
const SYSCALL_TYPE: usize = 24;
const SYSCALL_PROTOCOL: usize = 32;

/// sys_enter_socket: an agent creating a socket family `run`'s seccomp filter would refuse
/// (AF_VSOCK, AF_PACKET…), which the cgroup hooks never see. Seccomp filters run before this
/// tracepoint, so reaching here means no filter stopped it (an agent placed without `run`): an
/// alert whatever the mode, because it will be created.
pub fn on_socket_syscall(ctx: &TracePointContext) -> Result<(), i32> {
    let Some((cgroup_id, slot)) = current_agent() else {
        return Ok(());
    };
    // SAFETY: offsets from the tracepoint format (checked by the daemon).
    let (family, sock_type, protocol) = unsafe {
        (
            ctx.read_at::<u64>(SYSCALL_FAMILY)? as u32,
            ctx.read_at::<u64>(SYSCALL_TYPE)? as u32,
            ctx.read_at::<u64>(SYSCALL_PROTOCOL)? as u32,
        )
    };
    let mut i = 0;
    while i < AGENT_SOCKET_FAMILIES.len() {
        if AGENT_SOCKET_FAMILIES[i] == family {
            return Ok(());
        }
        i += 1;
    }
    // We only run when no seccomp filter refused the call (filters run first): it will happen.
    let recorded = report_socket(
        VERDICT_ALERT,
        cgroup_id,
        &slot,
        family as u16,
        sock_type,
        protocol,
    );
    // Unrecordable (ring buffer full): a tracepoint cannot refuse the call, so the process is
    // killed before it returns to use the socket — it must not have it unrecorded.
    if must_refuse(VERDICT_ALERT, recorded) {
        // SAFETY: helper call on the current task.
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
    }
    Ok(())
}

const SIGKILL: u32 = 9;

/// Counts and records a socket an agent may not have. Returns whether the record was queued.
#[inline(always)]
fn report_socket(
    verdict: u32,
    cgroup_id: u64,
    slot: &AgentSlot,
    family: u16,
    sock_type: u32,
    protocol: u32,
) -> bool {
    count(COUNTER_SOCKET_REFUSED);
    if let Some(mut entry) =
        start_record::<SocketPayload>(RecordKind::Socket, verdict, cgroup_id, slot, 0)
    {
        // SAFETY: reserved record.
        unsafe {
            (*entry.as_mut_ptr()).payload = SocketPayload {
                family,
                _pad: 0,
                sock_type,
                protocol,
                _pad2: 0,
            }
        };
        submit(entry, verdict);
        return true;
    }
    false
}

#[inline(always)]
fn verdict_of(allowed: bool, slot: AgentSlot) -> u32 {
    if allowed {
        VERDICT_ALLOWED
    } else if mode_refuses(slot.mode) {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    }
}
