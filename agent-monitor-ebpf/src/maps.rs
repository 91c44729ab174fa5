//! Maps shared with the daemon. The daemon fills the identity and allowlist maps from the compiled
//! policy; the kernel only reads them.

use agent_monitor_common::{
    ActionRecord, AgentSlot, COUNTERS, DnsOrig, DnsProxy, ExecFileKey, ExecKey, Learned,
    MAX_AGENT_CGROUPS, MAX_DNS_LEARNED, MAX_DNS_SOCKETS, MAX_EXEC_ENTRIES, MAX_NET_ENTRIES,
    NetAllow, NetKey, VERDICT_ALERT, VERDICT_DENIED,
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};

/// Agent identity: cgroup v2 id of an agent's (agent, task) cgroup → which agent, which mode.
#[map]
pub static AGENT_CGROUPS: HashMap<u64, AgentSlot> = HashMap::with_max_entries(MAX_AGENT_CGROUPS, 0);

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

/// Agent actions and agent lifecycle, kernel → daemon. 8 MiB holds ~24k records.
#[map]
pub static ACTIONS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Per-CPU loss and anomaly counters, indexed by `COUNTER_*`.
#[map]
pub static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

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

/// The agent the current task belongs to, if any: the one lookup every process on the host pays.
#[inline(always)]
pub fn current_agent() -> Option<(u64, AgentSlot)> {
    // SAFETY: helper with no arguments.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out before any other map operation.
    let slot = unsafe { AGENT_CGROUPS.get(&cgroup_id) }?;
    Some((cgroup_id, *slot))
}

/// Reserve a record and fill the fields every record has. `None` when the ring buffer is full; the
/// loss is counted.
#[inline(always)]
pub fn start_record(
    kind: u32,
    verdict: u32,
    cgroup_id: u64,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<ActionRecord>> {
    let Some(mut entry) = ACTIONS.reserve::<ActionRecord>(0) else {
        count(agent_monitor_common::COUNTER_RECORDS_LOST);
        return None;
    };
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let uid_gid = aya_ebpf::helpers::bpf_get_current_uid_gid();
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at a reserved, writable record; fields are written, never read.
    unsafe {
        (*rec).kind = kind;
        (*rec).verdict = verdict;
        (*rec).cgroup_id = cgroup_id;
        (*rec).ktime_ns = aya_ebpf::helpers::generated::bpf_ktime_get_ns();
        (*rec).pid = (pid_tgid >> 32) as u32;
        (*rec).tid = pid_tgid as u32;
        (*rec).uid = uid_gid as u32;
        (*rec).other_pid = 0;
        (*rec).comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]);
        (*rec).family = 0;
        (*rec).port = 0;
        (*rec).sock_type = 0;
        (*rec).addr = [0; 16];
        (*rec).flags = 0;
        (*rec).path_len = 0;
        (*rec).file_dev = 0;
        (*rec).detail = 0;
        (*rec).file_ino = 0;
        (*rec).interp_len = 0;
        (*rec)._pad = 0;
    }
    Some(entry)
}

/// Unread bytes in [`ACTIONS`] at which a record wakes the daemon (about 750 records).
const WAKEUP_BYTES: u64 = 256 * 1024;
/// Bytes one record takes in the ring buffer: the record and the kernel's 8-byte header.
const RECORD_BYTES: u64 = (core::mem::size_of::<ActionRecord>() as u64 + 8 + 7) & !7;

/// Queues a reserved record. A denial or an alert wakes the daemon at once (it goes to journald
/// now); other records (allowed actions, fork, exit) wake it only when the unread data crosses
/// [`WAKEUP_BYTES`], and otherwise wait for the daemon's drain timer (50 ms). A wake-up per
/// record made every allowed connect of an agent ~20 µs slower (docs/benchmarks.md); so does a
/// wake-up per record above the mark, hence "crosses".
#[inline(always)]
pub fn submit(entry: aya_ebpf::maps::ring_buf::RingBufEntry<ActionRecord>, verdict: u32) {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    let urgent = verdict == VERDICT_DENIED || verdict == VERDICT_ALERT;
    // Includes this record: the producer position moved when it was reserved.
    let unread = ACTIONS.query(BPF_RB_AVAIL_DATA as u64);
    let crossing = unread >= WAKEUP_BYTES && unread < WAKEUP_BYTES + RECORD_BYTES;
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

/// Where a network action went, as a record carries it.
#[derive(Clone, Copy)]
pub struct NetDest {
    pub family: u16,
    /// IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub sock_type: u32,
}

/// Reports a network action (connect, DNS redirect) with its destination and flags.
#[inline(always)]
pub fn report_net(kind: u32, verdict: u32, cgroup_id: u64, flags: u32, dest: NetDest) {
    if let Some(mut entry) = start_record(kind, verdict, cgroup_id) {
        let rec = entry.as_mut_ptr();
        // SAFETY: reserved record.
        unsafe {
            (*rec).family = dest.family;
            (*rec).port = dest.port;
            (*rec).sock_type = dest.sock_type;
            (*rec).addr = dest.addr;
            (*rec).flags = flags;
        }
        submit(entry, verdict);
    }
}
