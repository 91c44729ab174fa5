//! Maps shared with the daemon. The daemon fills the identity and allowlist maps from the compiled
//! policy; the kernel only reads them.

use agent_monitor_common::{
    ACTIONS_RING_BYTES, AGENT_CGROUP_FILTER_WORDS, AgentSlot, COUNTERS, DAEMON_STATE_LEN, DnsOrig,
    DnsProxy, ExecFileKey, ExecKey, Expiry, IdentityConfig, Learned, MAX_AGENT_CGROUPS,
    MAX_AGENT_SOCKETS, MAX_AGENTS, MAX_DNS_LEARNED, MAX_DNS_SOCKETS, MAX_EXEC_ENTRIES,
    MAX_EXEC_SELECTORS, MAX_GRANT_ENTRIES, MAX_NET_ENTRIES, MAX_TAGGED_TASKS, MAX_UID_SELECTORS,
    NetAllow, NetGrant, NetKey, NetPayload, Record, RecordKind, VERDICT_ALERT, VERDICT_DENIED,
    ring_bytes,
};
use aya_ebpf::{
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key,
        ring_buf::RingBufEntry,
    },
};

/// Stable agent id → the agent's allowlist index in force and its mode. Identities (cgroup slots,
/// selectors, tags the kernel copies at fork) hold the stable id; a reload writes the new
/// allowlists under fresh indices, then switches each agent here in one update, so identities
/// never go stale (`identity::in_force` translates).
#[map]
pub static AGENT_TABLES: HashMap<u32, AgentSlot> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Hooks ask "which agent is this?" through here (the lookup order lives in `identity.rs`).
pub use crate::identity::current_agent;

/// Agent identity by cgroup: the (agent, task) cgroups of `run` (looked up for the current cgroup)
/// and the cgroups of cgroup/unit selectors (looked up for the ancestors at selector levels).
#[map]
pub static AGENT_CGROUPS: HashMap<u64, AgentSlot> = HashMap::with_max_entries(MAX_AGENT_CGROUPS, 0);

/// Pre-filter of `AGENT_CGROUPS` (see `agent_cgroup_filter_slot`): an array lookup, which the
/// verifier inlines, where the hash lookup is a helper call.
#[map]
pub static AGENT_CGROUP_FILTER: Array<u64> = Array::with_max_entries(AGENT_CGROUP_FILTER_WORDS, 0);

/// Which selector kinds are armed (one entry). All zero: nothing beyond `AGENT_CGROUPS` is looked at.
#[map]
pub static IDENTITY_CONFIG: Array<IdentityConfig> = Array::with_max_entries(1, 0);

/// Agent identity by thread id, for processes tagged by an executable or uid selector or a task
/// switch. Written by the kernel at fork (child inherits) and exec, removed at exit.
#[map]
// Not preallocated, and sized by the loader to at least the kernel's pid_max: keyed by tid, so
// it can hold every live thread and never fills (a fork that cannot be tagged would run
// ungoverned); memory is only taken for entries in use.
pub static PROCESS_AGENTS: HashMap<u32, AgentSlot> =
    HashMap::with_max_entries(MAX_TAGGED_TASKS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// uid selectors: a process running with this uid is the agent.
#[map]
pub static UID_SELECTORS: HashMap<u32, AgentSlot> = HashMap::with_max_entries(MAX_UID_SELECTORS, 0);

/// Executable selectors: the file (device and inode as the kernel holds them, `ExecFileKey::agent`
/// = 0) → the agent a process becomes when it execs that file, under any name. Written by the
/// daemon after the file's sha256 was checked (a mismatch gets the grantless `unverified` task).
#[map]
pub static EXEC_SELECTORS: HashMap<ExecFileKey, AgentSlot> =
    HashMap::with_max_entries(MAX_EXEC_SELECTORS, 0);

/// Per-task network grants: (task number in `NetKey::agent`, address prefix) → ports until expiry.
#[map]
pub static TASK_NET_GRANTS: LpmTrie<NetKey, NetGrant> =
    LpmTrie::with_max_entries(MAX_GRANT_ENTRIES, 0);

/// Per-task exec grants: (task number in `ExecKey::agent`, path or prefix) → until when.
#[map]
pub static TASK_EXEC_GRANTS: LpmTrie<ExecKey, Expiry> =
    LpmTrie::with_max_entries(MAX_GRANT_ENTRIES, 0);

/// Network allowlist: (agent, address prefix) → allowed port ranges.
#[map]
pub static NET_ALLOW: LpmTrie<NetKey, NetAllow> = LpmTrie::with_max_entries(MAX_NET_ENTRIES, 0);

/// Exec allowlist: (agent, path or path prefix) → rule index.
#[map]
pub static EXEC_ALLOW: LpmTrie<ExecKey, u32> = LpmTrie::with_max_entries(MAX_EXEC_ENTRIES, 0);

/// Exec allowlist by file identity: (agent, device, inode) of each file an exact rule names, as the
/// daemon resolved it → rule index. Lets the kernel judge the file that runs, whatever its name.
#[map]
pub static EXEC_FILES: HashMap<ExecFileKey, u32> = HashMap::with_max_entries(MAX_EXEC_ENTRIES, 0);

/// Agent actions and agent lifecycle, kernel → daemon. Each record takes its kind's size
/// (`RecordKind::record_size`, plus 8): 8 MiB holds ~80k connect records or ~13k exec records.
#[map]
pub static ACTIONS: RingBuf = RingBuf::with_byte_size(ACTIONS_RING_BYTES, 0);

/// Per-CPU loss and anomaly counters, indexed by `COUNTER_*`.
#[map]
pub static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// Written and read by the daemon only (heartbeat, object hash, live bank — `STATE_*`); here so it is
/// pinned with the other maps and outlives a daemon.
#[map]
pub static DAEMON_STATE: Array<u64> = Array::with_max_entries(DAEMON_STATE_LEN, 0);

/// Sockets created by agents known only by a tag (executable selectors, task switches), by socket
/// cookie → the creator's identity as stored: the egress program (`route.rs`) must name a
/// socket's agent when a packet leaves from a timer. LRU: closed sockets need no cleanup; cookies
/// are never reused.
#[map]
pub static AGENT_SOCKETS: LruHashMap<u64, AgentSlot> =
    LruHashMap::with_max_entries(MAX_AGENT_SOCKETS, 0);

/// Scratch space for the exec lookup key (260 bytes would crowd the 512-byte BPF stack).
#[map]
pub static EXEC_KEY_SCRATCH: PerCpuArray<Key<ExecKey>> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS_MAP.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

/// Reserve a record of `kind` with payload `P` (exactly its size in the ring buffer) and fill the
/// header. The caller writes every payload field. `None` when the ring buffer is full; the loss
/// is counted.
#[inline(always)]
pub fn start_record<P: 'static>(
    kind: RecordKind,
    verdict: u32,
    cgroup_id: u64,
    slot: &AgentSlot,
    flags: u32,
) -> Option<RingBufEntry<Record<P>>> {
    let Some(mut entry) = ACTIONS.reserve::<Record<P>>(0) else {
        count(agent_monitor_common::COUNTER_RECORDS_LOST);
        if verdict != agent_monitor_common::VERDICT_NONE {
            count(agent_monitor_common::COUNTER_ACTIONS_LOST);
        }
        return None;
    };
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let uid_gid = aya_ebpf::helpers::bpf_get_current_uid_gid();
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at a reserved, writable record; the header is written, never read.
    // Field by field: a struct literal would be built on the 512-byte stack first.
    unsafe {
        let h = &raw mut (*rec).header;
        (*h).kind = kind as u32;
        (*h).verdict = verdict;
        (*h).cgroup_id = cgroup_id;
        (*h).ktime_ns = aya_ebpf::helpers::generated::bpf_ktime_get_ns();
        (*h).pid = (pid_tgid >> 32) as u32;
        (*h).tid = pid_tgid as u32;
        (*h).uid = uid_gid as u32;
        (*h).flags = flags;
        (*h).comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]);
        (*h).agent = slot.agent;
        (*h).task = slot.task;
        (*h).source = slot.source;
        (*h)._pad = 0;
    }
    Some(entry)
}

/// Unread bytes in [`ACTIONS`] at which a record wakes the daemon (about 2,500 connect records).
const WAKEUP_BYTES: u64 = 256 * 1024;

/// Queues a reserved record. A denial or an alert wakes the daemon at once (it goes to journald
/// now); other records (allowed actions, fork, exit) wake it only when the unread data crosses
/// [`WAKEUP_BYTES`], and otherwise wait for the daemon's drain timer (50 ms). A wake-up per
/// record made every allowed connect of an agent ~20 µs slower (docs/benchmarks.md); so does a
/// wake-up per record above the mark, hence "crosses".
#[inline(always)]
pub fn submit<P: 'static>(entry: RingBufEntry<Record<P>>, verdict: u32) {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    // Bytes this record takes in the ring buffer: the unread data crossed the mark with it when
    // it lies within this many bytes above the mark.
    let record_bytes = ring_bytes(core::mem::size_of::<Record<P>>()) as u64;
    let urgent = verdict == VERDICT_DENIED || verdict == VERDICT_ALERT;
    // Includes this record: the producer position moved when it was reserved.
    let unread = ACTIONS.query(BPF_RB_AVAIL_DATA as u64);
    let crossing = unread >= WAKEUP_BYTES && unread < WAKEUP_BYTES + record_bytes;
    let flags = if urgent || crossing {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// DNS proxy endpoint of each agent: agent index → its proxy's ports. Written by the daemon at start.
#[map]
pub static DNS_PROXY: HashMap<u32, DnsProxy> = HashMap::with_max_entries(MAX_AGENT_CGROUPS, 0);

/// Every proxy endpoint, by port (`dns_proxy_port_key`) → the agent it belongs to, so no agent can
/// reach another agent's endpoint directly.
#[map]
pub static DNS_PROXY_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(4 * MAX_AGENT_CGROUPS, 0);

/// Original DNS destination of a redirected socket, by socket cookie, so replies can show it as
/// their source. LRU: a socket that closed needs no cleanup; an eviction is counted when a reply
/// then finds no entry.
#[map]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(MAX_DNS_SOCKETS, 0);

/// Addresses an agent resolved through the proxy: (agent, address) → ports and expiry. Written by
/// the daemon before the DNS answer reaches the agent; expired entries are ignored here and
/// removed by the daemon.
#[map]
pub static DNS_LEARNED: HashMap<NetKey, Learned> = HashMap::with_max_entries(MAX_DNS_LEARNED, 0);

/// Whether a hook must refuse an action judged `verdict` whose record was queued (`recorded`) or
/// not. A denial always is. An alert is when its record could not be queued: an action outside
/// the allowlist must never happen unrecorded, so alert mode fails closed under a ring-buffer
/// flood, counted in `COUNTER_ALERTS_REFUSED_UNRECORDABLE`. Allowed actions proceed either way
/// (their loss is counted by `start_record`).
#[inline(always)]
pub fn must_refuse(verdict: u32, recorded: bool) -> bool {
    if verdict == VERDICT_DENIED {
        return true;
    }
    if verdict == VERDICT_ALERT && !recorded {
        count(agent_monitor_common::COUNTER_ALERTS_REFUSED_UNRECORDABLE);
        return true;
    }
    false
}

/// Reports a network action (connect, sendmsg, DNS redirect) with its destination and flags.
/// Returns whether the record was queued.
#[inline(always)]
pub fn report_net(
    kind: RecordKind,
    verdict: u32,
    cgroup_id: u64,
    slot: &AgentSlot,
    flags: u32,
    dest: NetPayload,
) -> bool {
    if let Some(mut entry) = start_record::<NetPayload>(kind, verdict, cgroup_id, slot, flags) {
        // SAFETY: reserved record; field by field (see `start_record`).
        unsafe {
            let p = &raw mut (*entry.as_mut_ptr()).payload;
            (*p).family = dest.family;
            (*p).port = dest.port;
            (*p).sock_type = dest.sock_type;
            (*p).addr = dest.addr;
        }
        submit(entry, verdict);
        return true;
    }
    false
}

/// AF_UNIX rules (`unix.rs`): (allowlist index, socket name) → `UNIX_ALLOW` / `UNIX_DENY`, plus
/// each agent's default entry (`UNIX_DEFAULT_ENTRY`), present only for agents with a `[unix]`
/// section.
#[map]
pub static UNIX_RULES: HashMap<agent_monitor_common::UnixKey, u32> =
    HashMap::with_max_entries(agent_monitor_common::MAX_UNIX_ENTRIES, 0);

/// Scratch space for the unix lookup key (116 bytes, kept off the 512-byte BPF stack).
#[map]
pub static UNIX_KEY_SCRATCH: PerCpuArray<agent_monitor_common::UnixKey> =
    PerCpuArray::with_max_entries(1, 0);
/// The egress endpoint's port (host order; 0 while the daemon has none), one entry.
#[map]
pub static EGRESS_ENDPOINT: Array<u32> = Array::with_max_entries(1, 0);

/// Agent index → the ports of its request rules: a connect to an address it learned from DNS on
/// one of these ports goes to the egress endpoint.
#[map]
pub static EGRESS_PORTS: HashMap<u32, agent_monitor_common::NetAllow> =
    HashMap::with_max_entries(agent_monitor_common::MAX_AGENT_CGROUPS, 0);

/// Redirected connects by token (the host part of the socket's 127/8 source address): the
/// original destination, for the endpoint and for getpeername. LRU: finished flows need no
/// cleanup.
#[map]
pub static EGRESS_FLOWS: LruHashMap<u32, agent_monitor_common::EgressFlow> =
    LruHashMap::with_max_entries(agent_monitor_common::MAX_EGRESS_FLOWS, 0);

/// Per-task exec grants by file: (task number in `ExecFileKey::agent`, device, inode) → until
/// when, and whether one exec uses it up. Written by the daemon for an ask-mode approval of an
/// exec, so the kernel allows the file that was approved, not whatever later bears its name.
#[map]
pub static TASK_EXEC_FILE_GRANTS: HashMap<ExecFileKey, agent_monitor_common::FileGrant> =
    HashMap::with_max_entries(MAX_GRANT_ENTRIES, 0);

/// Member offsets `unix_peer.rs` follows (one entry), written by the daemon from the kernel's
/// BTF; `enabled` = 0 leaves unix connects judged by name only.
#[map]
pub static UNIX_PEER_LAYOUT: Array<agent_monitor_common::UnixPeerLayout> =
    Array::with_max_entries(1, 0);

/// Connects the unix hook allowed, by thread id, until `sys_exit_connect` judges the listener's
/// bound name (`unix_peer.rs`). LRU: an entry left by a connect that never returned through the
/// syscall (io_uring) ages out.
#[map]
pub static UNIX_PEER_PENDING: LruHashMap<u32, agent_monitor_common::UnixPending> =
    LruHashMap::with_max_entries(agent_monitor_common::MAX_UNIX_PENDING, 0);

/// Where the hook builds a `UnixPending` before inserting it (256 bytes, off the BPF stack).
#[map]
pub static UNIX_PENDING_SCRATCH: PerCpuArray<agent_monitor_common::UnixPending> =
    PerCpuArray::with_max_entries(1, 0);

/// io_uring worker and SQPOLL threads of agents (thread id → 1), from `task_newtask` to their
/// exit: their unix connects never return through `connect()` (`unix.rs`). LRU: bounded.
#[map]
pub static AGENT_IO_THREADS: LruHashMap<u32, u8> =
    LruHashMap::with_max_entries(agent_monitor_common::MAX_AGENT_IO_THREADS, 0);
