//! Source routes on agents' sockets: an IPv4 packet carrying options (LSRR/SSRR, set with
//! `IP_OPTIONS` or an `IP_RETOPTS` control message) or an IPv6 packet carrying a routing header
//! (`IPV6_RTHDR`, type 4 segment routing is accepted from unprivileged sockets) goes to its first
//! hop, not to the destination the connect and sendmsg hooks judged (`tcp_v4_connect` and
//! `udp_sendmsg` route to `opt.faddr`, `fl6_update_dst` to the header's next segment). TCP and
//! UDP sockets never need either, so such packets of an agent's socket are refused (enforce;
//! alert mode reports and lets them go, failing closed when the report cannot be queued).
//!
//! cgroup_skb/egress sees every packet a socket sends, whatever set the option; the identity comes
//! from the socket (its cgroup, its owner's uid, or the tag its creator had), because a packet may
//! leave from a timer (a TCP retransmission) where the current task is anyone.

use agent_monitor_common::{
    AF_INET, AF_INET6, AgentSlot, COUNTER_SOURCE_ROUTED, MAX_SELECTOR_LEVEL, RecordKind,
    SELECT_CGROUPS, SELECT_TAGS, SELECT_UIDS, SourceRoutePayload, VERDICT_ALERT, VERDICT_DENIED,
    mode_refuses,
};
use aya_ebpf::{helpers::generated as h, programs::SkBuffContext};

use crate::identity::{config, in_force, maybe_agent_cgroup};
use crate::maps::{
    AGENT_CGROUPS, AGENT_SOCKETS, UID_SELECTORS, count, must_refuse, start_record, submit,
};

/// Return values of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// IPv6 extension headers that may come before a routing header (hop-by-hop, destination
/// options), and the routing header.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_ROUTING: u8 = 43;

/// A packet whose path an option bends.
struct Bent {
    family: u16,
    /// Where the packet is addressed now: the first hop (IPv4 as `::ffff:a.b.c.d`).
    first_hop: [u8; 16],
    /// IPv4: the IP protocol (6, 17). IPv6: 0.
    protocol: u32,
    /// IPv4: the first option's type (0x83 LSRR, 0x89 SSRR…). IPv6: the routing header type.
    detail: u32,
}

/// `N` bytes of the packet at `offset` (from the network header), if it has them.
#[inline(always)]
pub(crate) fn load<const N: usize>(ctx: &SkBuffContext, offset: u32) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: the helper copies at most N bytes into `buf` and fails on a short packet.
    let r = unsafe {
        h::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
        )
    };
    (r == 0).then_some(buf)
}

/// The packet's path option, if it has one. Data starts at the network header here.
#[inline(always)]
fn bent(ctx: &SkBuffContext) -> Option<Bent> {
    let [b0] = load::<1>(ctx, 0)?;
    match b0 >> 4 {
        4 => {
            if b0 & 0xf <= 5 {
                return None; // no options: the common case, decided by one byte
            }
            let hdr = load::<21>(ctx, 0)?;
            let mut first_hop = [0u8; 16];
            first_hop[10] = 0xff;
            first_hop[11] = 0xff;
            first_hop[12] = hdr[16];
            first_hop[13] = hdr[17];
            first_hop[14] = hdr[18];
            first_hop[15] = hdr[19];
            Some(Bent {
                family: AF_INET,
                first_hop,
                protocol: u32::from(hdr[9]),
                detail: u32::from(hdr[20]),
            })
        }
        6 => {
            let [nh] = load::<1>(ctx, 6)?;
            let mut nh = nh;
            if nh != NEXTHDR_ROUTING && nh != NEXTHDR_HOP && nh != NEXTHDR_DEST {
                return None; // no extension header before the payload: the common case
            }
            let mut off: u32 = 40;
            let mut i = 0;
            while i < 3 {
                if nh == NEXTHDR_ROUTING {
                    let rh = load::<4>(ctx, off)?;
                    let first_hop = load::<16>(ctx, 24)?;
                    return Some(Bent {
                        family: AF_INET6,
                        first_hop,
                        protocol: 0,
                        detail: u32::from(rh[2]),
                    });
                }
                if nh != NEXTHDR_HOP && nh != NEXTHDR_DEST {
                    return None;
                }
                let ext = load::<2>(ctx, off)?;
                nh = ext[0];
                off += (u32::from(ext[1]) + 1) * 8;
                i += 1;
            }
            None
        }
        _ => None,
    }
}

/// The agent whose socket sent this packet, with the socket's cgroup id: by the socket's cgroup
/// (`run`'s cgroups, cgroup and unit selectors), the tag its creating task had (executable
/// selectors, task switches: `AGENT_SOCKETS`), or its owner's uid (uid selectors).
#[inline(always)]
fn socket_agent(ctx: &SkBuffContext) -> Option<(u64, AgentSlot)> {
    let skb = ctx.skb.skb;
    // SAFETY: helpers on the program's own skb.
    let cgroup_id = unsafe { h::bpf_skb_cgroup_id(skb) };
    if maybe_agent_cgroup(cgroup_id) {
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { AGENT_CGROUPS.get(&cgroup_id) } {
            return Some((cgroup_id, *slot));
        }
    }
    let config = config()?;
    if config.selectors & SELECT_TAGS != 0 {
        // SAFETY: as above.
        let cookie = unsafe { h::bpf_get_socket_cookie(skb.cast()) };
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { AGENT_SOCKETS.get(&cookie) } {
            return Some((cgroup_id, *slot));
        }
    }
    if config.selectors & SELECT_CGROUPS != 0 {
        let mut level = MAX_SELECTOR_LEVEL;
        while level > 0 {
            level -= 1;
            if config.ancestor_levels & (1 << level) != 0 {
                // SAFETY: as above; 0 above the socket cgroup's depth.
                let id = unsafe { h::bpf_skb_ancestor_cgroup_id(skb, level as i32) };
                if id != 0 {
                    // SAFETY: copied out at once.
                    if let Some(slot) = unsafe { AGENT_CGROUPS.get(&id) } {
                        return Some((cgroup_id, *slot));
                    }
                }
            }
        }
    }
    if config.selectors & SELECT_UIDS != 0 {
        // SAFETY: as above.
        let uid = unsafe { h::bpf_get_socket_uid(skb) };
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { UID_SELECTORS.get(&uid) } {
            return Some((cgroup_id, *slot));
        }
    }
    None
}

/// cgroup_skb/egress: pass every packet but an agent's source-routed one.
#[inline(always)]
pub fn on_egress(ctx: &SkBuffContext) -> i32 {
    // A connection whose server name is judged here: its first data packet decides.
    if let Some(v) = crate::server_name::on_packet(ctx) {
        return v;
    }
    let Some(b) = bent(ctx) else {
        return PASS;
    };
    match socket_agent(ctx) {
        Some((cgroup_id, raw)) => refuse_bent(cgroup_id, &raw, &b),
        None => PASS,
    }
}

/// Reports the agent's source-routed packet; whether it may leave.
#[inline(never)]
fn refuse_bent(cgroup_id: u64, raw: &AgentSlot, b: &Bent) -> i32 {
    let slot = in_force(raw);
    count(COUNTER_SOURCE_ROUTED);
    let verdict = if mode_refuses(slot.mode) {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    let mut recorded = false;
    if let Some(mut entry) =
        start_record::<SourceRoutePayload>(RecordKind::SourceRoute, verdict, cgroup_id, &slot, 0)
    {
        // SAFETY: reserved record. The task fields `start_record` filled are whoever runs now
        // (a timer may send): the daemon names the agent by the slot and the cgroup, not the pid.
        unsafe {
            (*entry.as_mut_ptr()).payload = SourceRoutePayload {
                family: b.family,
                _pad: 0,
                protocol: b.protocol,
                detail: b.detail,
                _pad2: 0,
                first_hop: b.first_hop,
            }
        };
        submit(entry, verdict);
        recorded = true;
    }
    if must_refuse(verdict, recorded) {
        DROP
    } else {
        PASS
    }
}
