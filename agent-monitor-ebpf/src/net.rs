//! Network verdicts on the cgroup sock_addr hooks: the kernel's own copy of the destination.

use agent_monitor_common::{
    AF_INET, AF_INET6, AgentSlot, COUNTER_GRANTS_EXPIRED, FLAG_GRANTED, KIND_CONNECT,
    MAX_PORT_RANGES, MODE_ENFORCE, NET_KEY_AGENT_BITS, NetAllow, NetKey, TASK_NONE, VERDICT_ALERT,
    VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};

use crate::maps::{NET_ALLOW, TASK_NET_GRANTS, count, current_agent, start_record};

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

/// How a connect was allowed, if it was.
enum NetAllowed {
    No,
    /// By the agent's static allowlist.
    Policy,
    /// By a live grant of the agent's current task.
    Grant,
}

/// The network judgement: the agent's static allowlist, then its task's grants (each grant valid
/// until its `Expiry`, compared here with the kernel clock). Extensions that allow more (learned
/// addresses) slot in here, after the static allowlist.
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
fn ports_allow(allow: &NetAllow, port: u16) -> bool {
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

#[inline(always)]
fn judge(
    cgroup_id: u64,
    slot: AgentSlot,
    family: u16,
    addr: [u8; 16],
    port: u16,
    sock_type: u32,
) -> i32 {
    let how = allowed(&slot, addr, port);
    let verdict = if !matches!(how, NetAllowed::No) {
        VERDICT_ALLOWED
    } else if slot.mode == MODE_ENFORCE {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    if let Some(mut entry) = start_record(KIND_CONNECT, verdict, cgroup_id, &slot) {
        let rec = entry.as_mut_ptr();
        // SAFETY: reserved record.
        unsafe {
            (*rec).family = family;
            (*rec).port = port;
            (*rec).sock_type = sock_type;
            (*rec).addr = addr;
            if matches!(how, NetAllowed::Grant) {
                (*rec).flags = FLAG_GRANTED;
            }
        }
        entry.submit(0);
    }
    if verdict == VERDICT_DENIED {
        REJECT
    } else {
        PASS
    }
}
