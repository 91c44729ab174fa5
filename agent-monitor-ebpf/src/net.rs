//! Network verdicts on the cgroup sock_addr hooks: the kernel's own copy of the destination.

use agent_monitor_common::{
    AF_INET, AF_INET6, KIND_CONNECT, MAX_PORT_RANGES, MODE_ENFORCE, NET_KEY_AGENT_BITS, NetKey,
    VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};

use crate::maps::{NET_ALLOW, current_agent, start_record, submit};

/// Return values of a sock_addr program.
const PASS: i32 = 1;
const REJECT: i32 = 0;

pub fn on_connect4(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    // SAFETY: the kernel passes a valid bpf_sock_addr; these fields are readable at connect4.
    let (ip, port, sock_type) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.type_)
    };
    let b = ip.to_ne_bytes(); // network order in memory
    let addr = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ];
    judge(
        cgroup_id,
        slot,
        AF_INET,
        addr,
        u16::from_be(port as u16),
        sock_type,
    )
}

pub fn on_connect6(ctx: &SockAddrContext) -> i32 {
    let Some((cgroup_id, slot)) = current_agent() else {
        return PASS;
    };
    // SAFETY: as above; user_ip6 is readable at connect6.
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
    judge(
        cgroup_id,
        slot,
        AF_INET6,
        addr,
        u16::from_be(port as u16),
        sock_type,
    )
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
    let verdict = if allowed {
        VERDICT_ALLOWED
    } else if slot.mode == MODE_ENFORCE {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    if let Some(mut entry) = start_record(KIND_CONNECT, verdict, cgroup_id) {
        let rec = entry.as_mut_ptr();
        // SAFETY: reserved record.
        unsafe {
            (*rec).family = family;
            (*rec).port = port;
            (*rec).sock_type = sock_type;
            (*rec).addr = addr;
        }
        submit(entry, verdict);
    }
    if verdict == VERDICT_DENIED {
        REJECT
    } else {
        PASS
    }
}
