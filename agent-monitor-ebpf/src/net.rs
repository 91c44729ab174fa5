//! Network verdicts on the cgroup sock_addr hooks: the kernel's own copy of the destination.

use agent_monitor_common::{
    AF_INET, AF_INET6, FLAG_DNS_REFUSED, FLAG_LEARNED, KIND_CONNECT, MAX_PORT_RANGES, MODE_ENFORCE,
    NET_KEY_AGENT_BITS, NetKey, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};

use crate::maps::{NET_ALLOW, NetDest, current_agent, report_net};

/// Return values of a sock_addr program.
const PASS: i32 = 1;
const REJECT: i32 = 0;

pub fn on_connect4(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    let (addr, port, sock_type) = dest4(ctx);
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET, addr, port, sock_type) {
        return v;
    }
    judge(cgroup_id, slot, AF_INET, addr, port, sock_type)
}

pub fn on_connect6(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    let (addr, port, sock_type) = dest6(ctx);
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET6, addr, port, sock_type) {
        return v;
    }
    judge(cgroup_id, slot, AF_INET6, addr, port, sock_type)
}

/// Unconnected UDP sends: agents' DNS datagrams go to the proxy, datagrams to another agent's
/// proxy endpoint are judged like a connect; other datagrams pass here (judging them is the
/// no-bypass work).
pub fn on_sendmsg4(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    let (addr, port, sock_type) = dest4(ctx);
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET, addr, port, sock_type) {
        return v;
    }
    if crate::dns::foreign_proxy(slot.agent, &addr, port, sock_type) {
        return judge(cgroup_id, slot, AF_INET, addr, port, sock_type);
    }
    PASS
}

pub fn on_sendmsg6(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    let (addr, port, sock_type) = dest6(ctx);
    if let Some(v) = crate::dns::redirect(ctx, cgroup_id, slot, AF_INET6, addr, port, sock_type) {
        return v;
    }
    if crate::dns::foreign_proxy(slot.agent, &addr, port, sock_type) {
        return judge(cgroup_id, slot, AF_INET6, addr, port, sock_type);
    }
    PASS
}

/// Destination of an AF_INET sock_addr hook: address as `::ffff:a.b.c.d`, port in host order,
/// socket type.
#[inline(always)]
fn dest4(ctx: &SockAddrContext) -> ([u8; 16], u16, u32) {
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable at connect4 and
    // sendmsg4.
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

#[inline(always)]
fn judge(
    cgroup_id: u64,
    slot: agent_monitor_common::AgentSlot,
    family: u16,
    addr: [u8; 16],
    port: u16,
    sock_type: u32,
) -> i32 {
    let key = Key::new(
        NET_KEY_AGENT_BITS + 128,
        NetKey {
            agent: slot.agent,
            addr,
        },
    );
    let allowed = match NET_ALLOW.get(&key) {
        Some(allow) => {
            let mut ok = false;
            let n = allow.count as usize;
            let mut i = 0;
            while i < MAX_PORT_RANGES && i < n {
                let r = allow.ranges[i];
                if r.lo <= port && port <= r.hi {
                    ok = true;
                    break;
                }
                i += 1;
            }
            ok
        }
        None => false,
    };
    // Static allowlist first, then addresses the agent resolved through the DNS proxy; never
    // another agent's DNS proxy endpoint, whatever the static rules say.
    let foreign = crate::dns::foreign_proxy(slot.agent, &addr, port, sock_type);
    let learned = !foreign && !allowed && crate::dns::learned_allows(slot.agent, addr, port);
    let allowed = !foreign && (allowed || learned);
    let verdict = if allowed {
        VERDICT_ALLOWED
    } else if slot.mode == MODE_ENFORCE {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    let dest = NetDest {
        family,
        addr,
        port,
        sock_type,
    };
    let flags = if foreign {
        FLAG_DNS_REFUSED
    } else if learned {
        FLAG_LEARNED
    } else {
        0
    };
    report_net(KIND_CONNECT, verdict, cgroup_id, flags, dest);
    if verdict == VERDICT_DENIED {
        REJECT
    } else {
        PASS
    }
}
