//! Request rules, kernel half: an agent's TCP connect to an address it learned from DNS, on a port
//! of its `[[network.http]]`/`[[network.tls]]` rules, goes to the daemon's egress endpoint, which
//! judges the server name (and hands method/path rules to interception). The socket is bound to a
//! loopback source address of its own (the flow's token) so the endpoint can find the original
//! destination on accept; getpeername still shows the original destination. UDP to such a
//! destination (QUIC) is refused, so clients fall back to TCP. Nothing here parses TLS or HTTP.

use agent_monitor_common::{
    AF_INET, AgentSlot, EGRESS_IP4, EgressFlow, EgressPayload, FLAG_EGRESS_REFUSED, FLAG_LEARNED,
    NetPayload, RecordKind, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED, egress_source,
    egress_token, mode_refuses,
};
use aya_ebpf::programs::SockAddrContext;

use crate::dns::write_ip6;
use crate::maps::{
    EGRESS_ENDPOINT, EGRESS_FLOWS, EGRESS_PORTS, must_refuse, report_net, start_record, submit,
};

const PASS: i32 = 1;
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;

/// `::ffff:127.0.0.1`: the endpoint as an IPv6 socket reaches it (the DNS proxies' loopback).
const ENDPOINT_MAPPED: [u8; 16] = crate::dns::PROXY_IP4_MAPPED;
const _: () = assert!(
    EGRESS_IP4[0] == ENDPOINT_MAPPED[12]
        && EGRESS_IP4[1] == ENDPOINT_MAPPED[13]
        && EGRESS_IP4[2] == ENDPOINT_MAPPED[14]
        && EGRESS_IP4[3] == ENDPOINT_MAPPED[15]
);

/// `struct sockaddr_in` and `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

#[aya_ebpf::macros::map]
static EGRESS_FLOW_SCRATCH: aya_ebpf::maps::PerCpuArray<EgressFlow> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn endpoint_port() -> u16 {
    EGRESS_ENDPOINT.get(0).map_or(0, |p| *p as u16)
}

/// Whether `addr:port` (as judged: IPv4 as `::ffff:a.b.c.d`) is the egress endpoint. Only the
/// kernel's redirect may reach it: an agent connecting there itself could pose as another flow.
#[inline(always)]
pub fn is_endpoint(addr: &[u8; 16], port: u16) -> bool {
    let w = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let loopback4 = w(0) == 0 && w(4) == 0 && w(8) == 0x0000_ffff && addr[12] == 127;
    loopback4 && port != 0 && port == endpoint_port()
}

/// Called for a connect or datagram the agent's learned addresses allow: `None` when the port
/// has no request rules (judge it as usual), else the program's verdict after redirecting the
/// connect to the endpoint or refusing what cannot go there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn redirect(
    ctx: &SockAddrContext,
    kind: RecordKind,
    cgroup_id: u64,
    slot: AgentSlot,
    family: u16,
    addr: [u8; 16],
    port: u16,
    sock_type: u32,
) -> Option<i32> {
    // SAFETY: copied out at once.
    let ports = unsafe { EGRESS_PORTS.get(&slot.agent) }.copied()?;
    if !crate::net::ports_allow(&ports, port) {
        return None;
    }
    // SAFETY: the helper takes the program's sock_addr context.
    let cookie =
        unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Only server-name rules for this address: judged on the socket's own first bytes.
    if kind == RecordKind::Connect
        && crate::server_name::register(cookie, cgroup_id, &slot, family, &addr, port, sock_type)
    {
        return None;
    }
    let dest = NetPayload {
        family,
        addr,
        port,
        sock_type,
    };
    let target = endpoint_port();
    if kind != RecordKind::Connect || sock_type != SOCK_STREAM || target == 0 {
        return Some(refuse(kind, cgroup_id, slot, dest));
    }
    let token = egress_token(cookie);
    let source = egress_source(token);
    let via_v4 = family == AF_INET;
    // Port 0: the kernel picks the source port at connect, as for an unbound socket.
    let bound = if via_v4 {
        let mut sa = SockaddrIn {
            family: AF_INET,
            port: 0,
            addr: source,
            zero: [0; 8],
        };
        // SAFETY: bpf_bind is allowed in connect4/6; `sa` is a valid sockaddr_in on our stack.
        unsafe {
            aya_ebpf::helpers::generated::bpf_bind(
                ctx.sock_addr,
                (&raw mut sa).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            )
        }
    } else {
        let mut sa = SockaddrIn6 {
            family: agent_monitor_common::AF_INET6,
            port: 0,
            flowinfo: 0,
            #[rustfmt::skip]
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, source[0], source[1], source[2], source[3]],
            scope_id: 0,
        };
        // SAFETY: as above, a sockaddr_in6 (IPv4-mapped: the socket takes the IPv4 path).
        unsafe {
            aya_ebpf::helpers::generated::bpf_bind(
                ctx.sock_addr,
                (&raw mut sa).cast(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            )
        }
    };
    if bound != 0 {
        // Already bound by the caller (or an IPv6-only socket): the endpoint could not tell
        // this flow from another.
        return Some(refuse(kind, cgroup_id, slot, dest));
    }
    // Built in per-CPU scratch: the connect hooks' frame is near the verifier's stack limit.
    let Some(flow) = EGRESS_FLOW_SCRATCH.get_ptr_mut(0) else {
        return Some(refuse(kind, cgroup_id, slot, dest));
    };
    // SAFETY: the per-CPU scratch value, ours while this program runs.
    let flow: &mut EgressFlow = unsafe { &mut *flow };
    flow.cookie = cookie;
    flow.addr = addr;
    flow.port = port;
    flow.family = family;
    flow._pad = 0;
    if EGRESS_FLOWS.insert(&token, &*flow, 0).is_err() {
        return Some(refuse(kind, cgroup_id, slot, dest));
    }
    // SAFETY: valid, writable bpf_sock_addr; `family` decides which fields are touched.
    unsafe {
        let sa = ctx.sock_addr;
        if via_v4 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(EGRESS_IP4));
        } else {
            write_ip6(sa, &ENDPOINT_MAPPED);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(target.to_be()));
    }
    // The endpoint gives the verdict; this record names the process behind the flow.
    if let Some(mut entry) = start_record::<EgressPayload>(
        RecordKind::EgressRedirect,
        VERDICT_ALLOWED,
        cgroup_id,
        &slot,
        FLAG_LEARNED,
    ) {
        // SAFETY: reserved record; field by field (see `start_record`).
        unsafe {
            let p = &raw mut (*entry.as_mut_ptr()).payload;
            (*p).dest = dest;
            (*p).token = token;
            (*p)._pad = 0;
        }
        submit(entry, VERDICT_ALLOWED);
    }
    Some(PASS)
}

/// A connect or datagram to a destination with request rules that cannot go through the
/// endpoint: refused in enforce mode, reported either way.
#[inline(always)]
fn refuse(kind: RecordKind, cgroup_id: u64, slot: AgentSlot, dest: NetPayload) -> i32 {
    let verdict = if mode_refuses(slot.mode) {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    let recorded = report_net(
        kind,
        verdict,
        cgroup_id,
        &slot,
        FLAG_EGRESS_REFUSED | FLAG_LEARNED,
        dest,
    );
    if must_refuse(verdict, recorded) {
        REJECT
    } else {
        PASS
    }
}

/// getpeername4/6: when the peer is the egress endpoint and the socket is a redirected flow, show
/// the original destination. Everyone else pays one array lookup and a compare. Inlined, so `v6`
/// is a constant in each program and only its own field is read (the verifier refuses a load
/// from a socket at a computed offset).
#[inline(always)]
pub fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    let target = endpoint_port();
    // SAFETY: valid bpf_sock_addr; user_port is readable in getpeername hooks.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    if target == 0 || port != target {
        return PASS;
    }
    // The socket's own (local) address holds the token: 127.t.t.t.
    // SAFETY: `sk` of a sock_addr context is a full socket; src_ip4/src_ip6 are readable.
    let src = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if v6 {
            core::ptr::read_volatile(&raw const (*sk).src_ip6[3])
        } else {
            core::ptr::read_volatile(&raw const (*sk).src_ip4)
        }
    };
    let Some(token) = agent_monitor_common::egress_token_of(src.to_ne_bytes()) else {
        return PASS;
    };
    // SAFETY: copied out at once.
    let Some(flow) = (unsafe { EGRESS_FLOWS.get(&token) }).copied() else {
        return PASS;
    };
    // SAFETY: the helper takes the program's sock_addr context.
    let cookie =
        unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if flow.cookie != cookie {
        return PASS;
    }
    // SAFETY: valid bpf_sock_addr; user_ip4/ip6 and user_port are writable in getpeername hooks.
    unsafe {
        let sa = ctx.sock_addr;
        if v6 {
            write_ip6(sa, &flow.addr);
        } else {
            let a = flow.addr;
            core::ptr::write_volatile(
                &raw mut (*sa).user_ip4,
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            );
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(flow.port.to_be()));
    }
    PASS
}
