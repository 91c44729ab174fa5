//! DNS-aware allowlists, kernel half: agents' DNS traffic (port 53, UDP and TCP, any address) is
//! rewritten to the daemon's per-agent DNS proxy on loopback, replies are made to look as if they
//! came from the server the agent asked, and addresses the proxy learned from answers allow
//! connects until they expire. The proxy (userspace) judges names; nothing here parses DNS.

use agent_monitor_common::{
    AF_INET, AF_INET6, AgentSlot, COUNTER_DNS_NO_PROXY, COUNTER_DNS_ORIG_MISSING, DNS_PORT,
    DNS_PROXY_IP4, DNS_PROXY_IP6, DnsOrig, FLAG_DNS_REFUSED, MAX_PORT_RANGES, NetKey, NetPayload,
    RecordKind, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED, mode_refuses,
};
use aya_ebpf::programs::SockAddrContext;

use crate::maps::{
    DNS_LEARNED, DNS_ORIG, DNS_PROXY, DNS_PROXY_PORTS, count, current_agent, must_refuse,
    report_net,
};

const PASS: i32 = 1;
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// `::ffff:127.0.0.1`, the IPv4 proxy address as an IPv6 socket writes it.
#[rustfmt::skip]
pub(crate) const PROXY_IP4_MAPPED: [u8; 16] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
    DNS_PROXY_IP4[0], DNS_PROXY_IP4[1], DNS_PROXY_IP4[2], DNS_PROXY_IP4[3],
];

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let w = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    w(0) == 0 && w(4) == 0 && w(8) == 0x0000_ffff
}

fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie takes the sock_addr context in these programs.
    unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// connect4/6, sendmsg4/6: if this is an agent's DNS traffic, rewrite the destination to the
/// agent's proxy and return the program's verdict; `None` when it is not DNS (judge it as usual).
/// `addr` is the destination as the caller wrote it (IPv4 as `::ffff:a.b.c.d`), `port` host order.
#[inline(always)]
pub fn redirect(
    ctx: &SockAddrContext,
    cgroup_id: u64,
    slot: AgentSlot,
    family: u16,
    addr: [u8; 16],
    port: u16,
    sock_type: u32,
) -> Option<i32> {
    if port != DNS_PORT {
        return None;
    }
    // An IPv6 socket sending to an IPv4-mapped address takes the IPv4 path: it needs the IPv4
    // proxy, written as a mapped address.
    let via_v4 = family == AF_INET || is_v4_mapped(&addr);
    let dest = NetPayload {
        family,
        addr,
        port,
        sock_type,
    };
    // SAFETY: the value is copied out at once.
    let proxy = unsafe { DNS_PROXY.get(&slot.agent) }.copied();
    let target = match (proxy, sock_type, via_v4) {
        (Some(p), SOCK_DGRAM, true) => p.udp4,
        (Some(p), SOCK_STREAM, true) => p.tcp4,
        (Some(p), SOCK_DGRAM, false) => p.udp6,
        (Some(p), SOCK_STREAM, false) => p.tcp6,
        _ => 0,
    };
    if target == 0 {
        // No proxy to send it to: refused in enforce mode, so DNS never leaves unjudged.
        count(COUNTER_DNS_NO_PROXY);
        let verdict = if mode_refuses(slot.mode) {
            VERDICT_DENIED
        } else {
            VERDICT_ALERT
        };
        let recorded = report(cgroup_id, &slot, verdict, FLAG_DNS_REFUSED, dest);
        return Some(if must_refuse(verdict, recorded) {
            REJECT
        } else {
            PASS
        });
    }
    let orig = DnsOrig { addr, port, family };
    // An LRU map: insertion only fails on a kernel error; the reply then keeps the proxy's
    // address as its source (counted when it arrives).
    let _ = DNS_ORIG.insert(&cookie(ctx), &orig, 0);
    // SAFETY: the kernel passes a valid, writable bpf_sock_addr to these hooks; `family` is a
    // constant in each caller, so only the fields of that family are touched.
    unsafe {
        let sa = ctx.sock_addr;
        if family == AF_INET {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(DNS_PROXY_IP4));
        } else {
            let ip = if via_v4 {
                PROXY_IP4_MAPPED
            } else {
                DNS_PROXY_IP6
            };
            write_ip6(sa, &ip);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(target.to_be()));
    }
    report(cgroup_id, &slot, VERDICT_ALLOWED, 0, dest);
    Some(PASS)
}

/// recvmsg4 and getpeername4: when the peer is this agent's proxy and the socket was redirected,
/// show the server the agent asked instead. Always lets the call proceed.
pub fn restore_peer4(ctx: &SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(ctx, AF_INET) {
        let a = orig.addr;
        // SAFETY: valid bpf_sock_addr; user_ip4 and user_port are writable in these hooks. Volatile
        // keeps each store at its constant context offset, as the verifier requires.
        unsafe {
            let sa = ctx.sock_addr;
            core::ptr::write_volatile(
                &raw mut (*sa).user_ip4,
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            );
            core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(orig.port.to_be()));
        }
    }
    PASS
}

/// recvmsg6 and getpeername6: as `restore_peer4`, for AF_INET6 sockets.
pub fn restore_peer6(ctx: &SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(ctx, AF_INET6) {
        // SAFETY: as above, with user_ip6.
        unsafe {
            write_ip6(ctx.sock_addr, &orig.addr);
            core::ptr::write_volatile(
                &raw mut (*ctx.sock_addr).user_port,
                u32::from(orig.port.to_be()),
            );
        }
    }
    PASS
}

/// The server an agent's redirected socket meant to talk to, when the peer in `ctx` is the
/// agent's proxy.
#[inline(always)]
fn original_peer(ctx: &SockAddrContext, family: u16) -> Option<DnsOrig> {
    let (_, slot) = current_agent()?;
    // SAFETY: the value is copied out at once.
    let proxy = unsafe { DNS_PROXY.get(&slot.agent) }.copied()?;
    // SAFETY: valid bpf_sock_addr; user_ip4/ip6 and user_port are readable in these hooks.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 {
        return None;
    }
    let from_proxy = if family == AF_INET {
        sa.user_ip4 == u32::from_ne_bytes(DNS_PROXY_IP4)
            && (port == proxy.udp4 || port == proxy.tcp4)
    } else {
        let ip = read_ip6(sa);
        (ip == DNS_PROXY_IP6 && (port == proxy.udp6 || port == proxy.tcp6))
            || (ip == PROXY_IP4_MAPPED && (port == proxy.udp4 || port == proxy.tcp4))
    };
    if !from_proxy {
        return None;
    }
    // SAFETY: copied out at once.
    let orig = unsafe { DNS_ORIG.get(&cookie(ctx)) }.copied();
    if orig.is_none() {
        count(COUNTER_DNS_ORIG_MISSING);
    }
    orig
}

/// Whether `addr:port` is another agent's proxy endpoint. Only the kernel's redirect reaches an
/// endpoint legitimately; an agent allowed to reach loopback must still not use another agent's
/// endpoint (it would resolve that agent's names and fill that agent's learned addresses).
#[inline(always)]
pub fn foreign_proxy(agent: u32, addr: &[u8; 16], port: u16, sock_type: u32) -> bool {
    proxy_owner(addr, port, sock_type).is_some_and(|owner| owner != agent)
}

/// The agent whose DNS proxy endpoint `addr:port` is, if it is one.
#[inline(always)]
pub fn proxy_owner(addr: &[u8; 16], port: u16, sock_type: u32) -> Option<u32> {
    let v4 = is_v4_mapped(addr);
    // The endpoints listen on 127.0.0.1 and ::1; the unspecified address reaches them too.
    // Whole words are compared: byte-slice comparisons become memcmp, which BPF has not.
    let w = |i: usize| u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let local = if v4 {
        addr[12] == 127 || w(12) == 0
    } else {
        w(0) == 0 && w(4) == 0 && w(8) == 0 && w(12) <= 1
    };
    if !local {
        return None;
    }
    let key = agent_monitor_common::dns_proxy_port_key(port, !v4, sock_type == SOCK_STREAM);
    // SAFETY: copied out at once.
    unsafe { DNS_PROXY_PORTS.get(&key) }.copied()
}

/// Whether `addr:port` is allowed because the agent resolved it through the proxy and the answer
/// has not expired.
#[inline(always)]
pub fn learned_allows(agent: u32, addr: [u8; 16], port: u16) -> bool {
    let key = NetKey { agent, addr };
    // SAFETY: copied out at once.
    let Some(l) = (unsafe { DNS_LEARNED.get(&key) }).copied() else {
        return false;
    };
    // SAFETY: helper without arguments.
    if l.expires_ns <= unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() } {
        return false;
    }
    let n = l.ports.count as usize;
    let mut i = 0;
    while i < MAX_PORT_RANGES && i < n {
        let r = l.ports.ranges[i];
        if r.lo <= port && port <= r.hi {
            return true;
        }
        i += 1;
    }
    false
}

/// Writes `user_ip6` word by word at constant offsets (the verifier refuses computed context
/// offsets).
///
/// # Safety
/// `sa` is the program's bpf_sock_addr context in a hook where `user_ip6` is writable.
#[inline(always)]
pub(crate) unsafe fn write_ip6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, ip: &[u8; 16]) {
    // SAFETY: per the function contract.
    unsafe {
        let w = &raw mut (*sa).user_ip6;
        core::ptr::write_volatile(
            &raw mut (*w)[0],
            u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]),
        );
        core::ptr::write_volatile(
            &raw mut (*w)[1],
            u32::from_ne_bytes([ip[4], ip[5], ip[6], ip[7]]),
        );
        core::ptr::write_volatile(
            &raw mut (*w)[2],
            u32::from_ne_bytes([ip[8], ip[9], ip[10], ip[11]]),
        );
        core::ptr::write_volatile(
            &raw mut (*w)[3],
            u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        );
    }
}

#[inline(always)]
fn read_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = sa.user_ip6[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Tells the daemon which process sent DNS traffic where, so the query the proxy judges can be
/// attributed to it.
#[inline(always)]
fn report(cgroup_id: u64, slot: &AgentSlot, verdict: u32, flags: u32, dest: NetPayload) -> bool {
    report_net(
        RecordKind::DnsRedirect,
        verdict,
        cgroup_id,
        slot,
        flags,
        dest,
    )
}
