//! A unix connect judged again on the socket the kernel resolved: the name its listener bound,
//! which the agent does not control. The cgroup hook (`unix.rs`) judges the name the caller gave
//! before the kernel looks it up; a symlink, a relative name, `/proc/self/root/…`, `//…`, a hard
//! link or a bind mount can make an allowed name lead to another socket. For each connect it
//! allowed, the hook remembers the connecting socket under the thread's id; when the syscall
//! returns successfully, `syscalls/sys_exit_connect` reads `unix_sk(sk)->peer->addr` (for a
//! stream: the new server-side socket, whose address the kernel copied from the listener; for a
//! datagram connect: the bound socket itself) and judges that name with the same rules. The
//! connect has happened by then, so a refused one ends the process with SIGKILL before the call
//! returns to user space (docs/unix-sockets.md: "Judging the listener's bound name").

use agent_monitor_common::{
    RecordKind, SOCK_ADDR_KERN_SK, UNIX_PATH_LEN, UnixKey, UnixPeerLayout, UnixPeerPayload,
    UnixPending, VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel, bpf_send_signal},
    programs::{SockAddrContext, TracePointContext},
};

use crate::maps::{
    UNIX_PEER_LAYOUT, UNIX_PEER_PENDING, UNIX_PENDING_SCRATCH, current_agent, must_refuse,
    start_record, submit,
};
use crate::unix::{agent_default, canonicalize, judge_name};

const SIGKILL: u32 = 9;
/// Offset of `ret` in the `syscalls/sys_exit_connect` record (checked against tracefs by the
/// daemon with the other syscall records).
const EXIT_RET: usize = 16;

/// In the cgroup hook, for an agent's connect (`send` = 0) or named datagram send (1) it
/// allowed: remember the socket (and the name judged) under the thread's id for
/// [`on_exit_connect`] or [`on_data_ready`]. Nothing when the daemon found no layout in the
/// kernel's BTF (then the call stays judged by name only).
#[inline(never)]
pub fn remember(ctx: &SockAddrContext, given: &UnixKey, sock_type: u32, rule: u32, send: u32) {
    let Some(layout) = UNIX_PEER_LAYOUT.get(0) else {
        return;
    };
    if layout.enabled == 0 || (send != 0 && layout.data_ready == 0) {
        return;
    }
    let mut sk: u64 = 0;
    // SAFETY: bpf_probe_read_kernel tolerates any address; the context is the kernel's
    // `bpf_sock_addr_kern`, whose `sk` is the connecting socket.
    let r = unsafe {
        bpf_probe_read_kernel(
            (&raw mut sk).cast(),
            8,
            (ctx.sock_addr as *const u8).wrapping_add(SOCK_ADDR_KERN_SK as usize)
                as *const core::ffi::c_void,
        )
    };
    if r != 0 || sk == 0 {
        return;
    }
    let Some(p) = UNIX_PENDING_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, ours until the program returns; copied into the map below.
    let p = unsafe { &mut *p };
    p.sk = sk;
    p.given = *given;
    p.sock_type = sock_type;
    p.rule = rule;
    p.send = send;
    p._pad = 0;
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // An LRU map: a thread that never returned through `connect()` (io_uring) leaves an entry
    // the next one of that thread replaces or that ages out.
    let _ = UNIX_PEER_PENDING.insert(&tid, p, 0);
}

/// tracepoint syscalls/sys_exit_connect: every connect() on the host while attached. A thread
/// with no connect the hook remembered (every process outside agents, and agents' inet
/// connects) pays one helper call and one hash lookup.
#[inline(always)]
pub fn on_exit_connect(ctx: &TracePointContext) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if let Some(pending) = UNIX_PEER_PENDING.get_ptr_mut(&tid) {
        // SAFETY: the entry of this thread; read before it goes.
        if unsafe { (*pending).send } == 0 {
            judge_connected(ctx, pending, true);
        }
        let _ = UNIX_PEER_PENDING.remove(&tid);
    }
}

/// tracepoint syscalls/sys_exit_io_uring_enter: a connect io_uring made in the caller's own
/// thread (issued inline) returns through here, not through `connect()`; its listener's bound
/// name is judged now (whether it succeeded is read from the socket: a peer is set). What a
/// worker thread makes is refused by the hook (`AGENT_IO_THREADS`).
#[inline(always)]
pub fn on_exit_uring(ctx: &TracePointContext) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if let Some(pending) = UNIX_PEER_PENDING.get_ptr_mut(&tid) {
        // SAFETY: the entry of this thread; read before it goes.
        if unsafe { (*pending).send } == 0 {
            judge_connected(ctx, pending, false);
        }
        let _ = UNIX_PEER_PENDING.remove(&tid);
    }
}

/// `AF_UNIX` in the `sock/sk_data_ready` record's `family`.
const AF_UNIX: u16 = 1;
/// Offsets of `skaddr` and `family` in the `sock/sk_data_ready` record (checked against tracefs
/// by the daemon: `UnixPeerLayout::data_ready`).
const DATA_READY_SK: usize = 8;
const DATA_READY_FAMILY: usize = 16;

/// tracepoint sock/sk_data_ready: every socket that got data, on the host, while attached; for a
/// unix socket in the sender's task (`unix_dgram_sendmsg` wakes the receiver before it returns).
/// A delivery to a socket of another family returns after one read of the record; a unix one
/// with no datagram send the hook remembered for the thread pays one helper call and one hash
/// lookup.
#[inline(always)]
pub fn on_data_ready(ctx: &TracePointContext) {
    // SAFETY: within the tracepoint record.
    let family: u16 = unsafe { ctx.read_at(DATA_READY_FAMILY) }.unwrap_or(0);
    if family != AF_UNIX {
        return;
    }
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if let Some(pending) = UNIX_PEER_PENDING.get_ptr_mut(&tid) {
        // SAFETY: the entry of this thread. A connect's entry waits for `sys_exit_connect`
        // (its listener wakes up here too, before the connect returns).
        if unsafe { (*pending).send } != 0 {
            judge_delivery(ctx, pending);
            let _ = UNIX_PEER_PENDING.remove(&tid);
        }
    }
}

/// A named datagram send the hook allowed reached a receiver: its bound name is judged. The
/// datagram is queued already: a refusal kills the sender (no further sends) and reports.
#[inline(never)]
fn judge_delivery(ctx: &TracePointContext, pending: *mut UnixPending) {
    // SAFETY: as in `judge_peer`.
    let pending = unsafe { &mut *pending };
    // SAFETY: within the tracepoint record.
    let receiver: u64 = unsafe { ctx.read_at(DATA_READY_SK) }.unwrap_or(0);
    let Some(layout) = UNIX_PEER_LAYOUT.get(0).copied() else {
        return;
    };
    if layout.enabled == 0 || layout.data_ready == 0 || receiver == 0 {
        return;
    }
    let Some((cgroup_id, slot)) = current_agent() else {
        return;
    };
    let Some(default) = agent_default(&mut pending.bound, &slot) else {
        return;
    };
    if !read_name_of(receiver, &layout, &mut pending.bound) {
        return;
    }
    settle(cgroup_id, &slot, default, pending);
}

/// `connect_ret`: the record is `sys_exit_connect`'s, whose `ret` says whether it succeeded;
/// otherwise (io_uring_enter) a socket without a peer is one that did not connect.
#[inline(never)]
fn judge_connected(ctx: &TracePointContext, pending: *mut UnixPending, connect_ret: bool) {
    // SAFETY: the entry of this thread (only it writes it), valid until removed by the caller.
    let pending = unsafe { &mut *pending };
    // SAFETY: `ret` lies within the tracepoint record.
    if connect_ret && unsafe { ctx.read_at::<i64>(EXIT_RET) }.unwrap_or(-1) != 0 {
        return; // failed: nothing to judge
    }
    let Some(layout) = UNIX_PEER_LAYOUT.get(0).copied() else {
        return;
    };
    if layout.enabled == 0 {
        return;
    }
    let Some((cgroup_id, slot)) = current_agent() else {
        return;
    };
    let bound = &mut pending.bound;
    let Some(default) = agent_default(bound, &slot) else {
        return; // the policy lost its [unix] section meanwhile
    };
    let peer = read_u64(pending.sk + layout.unix_sock_peer as u64);
    if peer == 0 || !read_name_of(peer, &layout, bound) {
        return; // no peer or an unbound one: no name to judge (counted nowhere: rare, benign)
    }
    settle(cgroup_id, &slot, default, pending);
}

/// Judges `pending.bound` (filled) for the agent `slot` and acts: nothing when it is the name
/// the hook judged or it is allowed; else SIGKILL (enforce) and a report.
#[inline(always)]
fn settle(
    cgroup_id: u64,
    slot: &agent_monitor_common::AgentSlot,
    default: u32,
    pending: &UnixPending,
) {
    let bound = &pending.bound;
    if same_name(bound, &pending.given) {
        return; // the hook judged this very name
    }
    let (verdict, bound_rule) = judge_name(bound, true, default, slot);
    if verdict == VERDICT_ALLOWED {
        return;
    }
    if verdict == VERDICT_DENIED {
        // First: the process must not return to user space with the socket, whatever happens
        // to the report.
        // SAFETY: helper on the current task.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    let recorded = report(verdict, cgroup_id, slot, pending, bound_rule);
    if verdict != VERDICT_DENIED && must_refuse(verdict, recorded) {
        // SAFETY: as above.
        unsafe { bpf_send_signal(SIGKILL) };
    }
}

/// Fills `key.path`/`name_len` with the name unix socket `sock` is bound to (`key.agent` is
/// kept). False when it has no bound address, or a read failed.
#[inline(always)]
fn read_name_of(sock: u64, layout: &UnixPeerLayout, key: &mut UnixKey) -> bool {
    let addr = read_u64(sock + layout.unix_sock_addr as u64);
    if addr == 0 {
        return false;
    }
    let mut len: i32 = 0;
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    let r = unsafe {
        bpf_probe_read_kernel(
            (&raw mut len).cast(),
            4,
            (addr + layout.unix_address_len as u64) as *const core::ffi::c_void,
        )
    };
    // A bound name has a family and at least one byte.
    if r != 0 || len < 3 || len > 2 + UNIX_PATH_LEN as i32 {
        return false;
    }
    // `name` is a `sockaddr_un`: sun_path follows the 2-byte family.
    // SAFETY: as above; bytes past `len` are zeroed by `canonicalize`.
    let r = unsafe {
        bpf_probe_read_kernel(
            key.path.as_mut_ptr().cast(),
            UNIX_PATH_LEN as u32,
            (addr + layout.unix_address_name as u64 + 2) as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        return false;
    }
    canonicalize(key, (len - 2) as usize);
    true
}

#[inline(always)]
fn read_u64(at: u64) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: bpf_probe_read_kernel tolerates any address; 0 on failure.
    let r =
        unsafe { bpf_probe_read_kernel((&raw mut v).cast(), 8, at as *const core::ffi::c_void) };
    if r != 0 { 0 } else { v }
}

#[inline(always)]
fn same_name(a: &UnixKey, b: &UnixKey) -> bool {
    if a.name_len != b.name_len {
        return false;
    }
    let mut i = 0;
    while i < UNIX_PATH_LEN {
        if a.path[i] != b.path[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn report(
    verdict: u32,
    cgroup_id: u64,
    slot: &agent_monitor_common::AgentSlot,
    pending: &UnixPending,
    bound_rule: u32,
) -> bool {
    let Some(mut entry) =
        start_record::<UnixPeerPayload>(RecordKind::UnixPeer, verdict, cgroup_id, slot, 0)
    else {
        return false;
    };
    // SAFETY: reserved record; field by field (see `start_record`); paths copied by the helper.
    unsafe {
        let p = &raw mut (*entry.as_mut_ptr()).payload;
        let g = &raw mut (*p).given;
        (*g).sock_type = pending.sock_type;
        (*g).name_len = pending.given.name_len;
        (*g).send = pending.send;
        (*g).rule = pending.rule;
        (*g)._pad = 0;
        if bpf_probe_read_kernel(
            (&raw mut (*g).path).cast(),
            UNIX_PATH_LEN as u32,
            pending.given.path.as_ptr().cast(),
        ) != 0
        {
            (*g).name_len = 0;
        }
        (*p).bound_len = pending.bound.name_len;
        (*p).bound_rule = bound_rule;
        (*p)._pad = 0;
        if bpf_probe_read_kernel(
            (&raw mut (*p).bound).cast(),
            UNIX_PATH_LEN as u32,
            pending.bound.path.as_ptr().cast(),
        ) != 0
        {
            (*p).bound_len = 0;
        }
    }
    submit(entry, verdict);
    true
}
