//! AF_UNIX verdicts on the cgroup hooks `connect_unix` and `sendmsg_unix` (Linux 6.7): an agent
//! with a `[unix]` section may connect (or send datagrams) only to the sockets its list allows.
//!
//! The kernel runs these hooks in `unix_stream_connect`, `unix_dgram_connect` and
//! `unix_dgram_sendmsg` (when the send names an address) after it copied the caller's sockaddr
//! into kernel memory and before it looks the name up: the name judged is the one the kernel then
//! uses (no time-of-check/time-of-use on the caller's memory), but it is the name as written, not
//! the socket it resolves to (docs/unix-sockets.md says what that covers and what it does not).
//! The sock_addr context exposes no field for a unix address, so the program reads the kernel's
//! own `bpf_sock_addr_kern` (its real context) with `bpf_probe_read_kernel`, at offsets the
//! daemon checked against the kernel's BTF before attaching.

use agent_monitor_common::{
    AgentSlot, NO_ALLOWLIST, RecordKind, SOCK_ADDR_KERN_READ, SOCK_ADDR_KERN_UADDR,
    SOCK_ADDR_KERN_UADDRLEN, UNIX_ALLOW, UNIX_PATH_LEN, UNIX_RULE_IO_THREAD, UnixKey, UnixPayload,
    VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED, mode_refuses,
};
use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, programs::SockAddrContext};

use crate::maps::{
    AGENT_IO_THREADS, UNIX_KEY_SCRATCH, UNIX_RULES, current_agent, must_refuse, start_record,
    submit,
};

const PASS: i32 = 1;
const REJECT: i32 = 0;

/// Both hooks. They sit below the agents' cgroup, so a process outside every agent runs them only
/// on a socket an agent created, or (at the root while selectors exist) on every unix connect:
/// then the identity lookup, inlined as in `net.rs`, is all it pays before it returns (one
/// helper call and two array reads without selectors). Agents pay a subprogram call.
#[inline(always)]
pub fn on_unix(ctx: &SockAddrContext, send: u32) -> i32 {
    match current_agent() {
        Some((cgroup_id, slot)) => agent_unix(ctx, send, cgroup_id, &slot),
        None => PASS,
    }
}

#[inline(never)]
fn agent_unix(ctx: &SockAddrContext, send: u32, cgroup_id: u64, slot: &AgentSlot) -> i32 {
    let slot = *slot;
    let Some(key) = UNIX_KEY_SCRATCH.get_ptr_mut(0) else {
        return PASS;
    };
    // SAFETY: per-CPU scratch, ours until the program returns.
    let key = unsafe { &mut *key };
    let Some(default) = agent_default(key, &slot) else {
        return PASS;
    };
    let readable = read_name(ctx, key);
    let (mut verdict, mut rule) = judge_name(key, readable, default, &slot);
    // An io_uring worker or SQPOLL thread's connect never returns through `connect()`, where the
    // listener's bound name is judged (`unix_peer.rs`): a pathname connect by one is refused
    // (reported; alert mode lets it through). A caller's own io_uring_enter is judged on its
    // return instead (`on_exit_uring`).
    if verdict == VERDICT_ALLOWED
        && send == 0
        && key.path[0] != 0
        && AGENT_IO_THREADS
            .get_ptr(&(aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32))
            .is_some()
    {
        verdict = if mode_refuses(slot.mode) {
            VERDICT_DENIED
        } else {
            VERDICT_ALERT
        };
        rule = UNIX_RULE_IO_THREAD;
    }
    // SAFETY: `type` is a readable field of every sock_addr context.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if verdict == VERDICT_ALLOWED {
        // Judged again on the bound name of the socket reached once the kernel completed it.
        crate::unix_peer::remember(ctx, key, sock_type, rule, send);
    }
    let recorded = report(verdict, cgroup_id, &slot, send, rule, sock_type, key);
    if must_refuse(verdict, recorded) {
        REJECT
    } else {
        PASS
    }
}

/// Fills `key` with the name the caller gave, in the canonical form of `UnixKey`. False when the
/// kernel's copy could not be read (then nothing matches).
#[inline(always)]
fn read_name(ctx: &SockAddrContext, key: &mut UnixKey) -> bool {
    let mut kern = [0u8; SOCK_ADDR_KERN_READ];
    // SAFETY: bpf_probe_read_kernel tolerates any address; the context is the kernel's
    // `bpf_sock_addr_kern`, on its stack for the duration of the hook.
    let r = unsafe {
        bpf_probe_read_kernel(
            kern.as_mut_ptr().cast(),
            SOCK_ADDR_KERN_READ as u32,
            ctx.sock_addr as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        return false;
    }
    let at = SOCK_ADDR_KERN_UADDR as usize;
    let uaddr = u64::from_ne_bytes([
        kern[at],
        kern[at + 1],
        kern[at + 2],
        kern[at + 3],
        kern[at + 4],
        kern[at + 5],
        kern[at + 6],
        kern[at + 7],
    ]);
    let at = SOCK_ADDR_KERN_UADDRLEN as usize;
    let uaddrlen = u32::from_ne_bytes([kern[at], kern[at + 1], kern[at + 2], kern[at + 3]]);
    // sun_path follows the 2-byte family. The kernel copied the whole sockaddr into a
    // sockaddr_storage (128 bytes), so 108 bytes past the family are always its memory.
    // SAFETY: as above.
    let r = unsafe {
        bpf_probe_read_kernel(
            key.path.as_mut_ptr().cast(),
            UNIX_PATH_LEN as u32,
            (uaddr + 2) as *const core::ffi::c_void,
        )
    };
    if r != 0 || uaddrlen < 3 {
        key.name_len = 0;
        return false;
    }
    canonicalize(key, (uaddrlen - 2) as usize);
    true
}

/// Brings `key.path`, of which `len` bytes are a `sun_path` as given (to connect, or to bind),
/// to the canonical form of `UnixKey` and sets `name_len`: the hook and the peer tracepoint
/// (`unix_peer.rs`) judge names the same way.
#[inline(always)]
pub fn canonicalize(key: &mut UnixKey, len: usize) {
    let abstract_name = key.path[0] == 0;
    let mut end = UNIX_PATH_LEN;
    let mut i = 0;
    while i < UNIX_PATH_LEN {
        if end == UNIX_PATH_LEN && (i >= len || (!abstract_name && key.path[i] == 0)) {
            end = i;
        }
        if i >= end {
            key.path[i] = 0;
        }
        i += 1;
    }
    key.name_len = end as u32;
}

/// The agent's default for unix sockets (the value of its default entry), looked up with `key`
/// as workspace; `None` when its policy has no `[unix]` section: not judged, not reported. An
/// agent whose policy is gone (`NO_ALLOWLIST`) may do nothing, as everywhere else.
#[inline(always)]
pub fn agent_default(key: &mut UnixKey, slot: &AgentSlot) -> Option<u32> {
    key.agent = slot.agent;
    key.name_len = agent_monitor_common::UNIX_DEFAULT_ENTRY;
    key.path = [0; UNIX_PATH_LEN];
    // SAFETY: copied out at once.
    match unsafe { UNIX_RULES.get(&*key) } {
        Some(v) => Some(*v),
        None if slot.agent == NO_ALLOWLIST => Some(0),
        None => None,
    }
}

/// The verdict on the name in `key` (canonical, `key.agent` set) for an agent whose default is
/// `default`, and the entry that named it (0: none). A name that could not be read matches
/// nothing and is never allowed. Shared by the hook (the name given) and the peer tracepoint
/// (the listener's bound name).
#[inline(always)]
pub fn judge_name(key: &UnixKey, readable: bool, default: u32, slot: &AgentSlot) -> (u32, u32) {
    // SAFETY: copied out at once.
    let rule = match readable {
        true => unsafe { UNIX_RULES.get(key) }.copied().unwrap_or(0),
        false => 0,
    };
    let judged = if rule != 0 { rule } else { default };
    let verdict = if judged == UNIX_ALLOW && readable {
        VERDICT_ALLOWED
    } else if mode_refuses(slot.mode) {
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };
    (verdict, rule)
}

#[inline(always)]
fn report(
    verdict: u32,
    cgroup_id: u64,
    slot: &AgentSlot,
    send: u32,
    rule: u32,
    sock_type: u32,
    key: &UnixKey,
) -> bool {
    let Some(mut entry) =
        start_record::<UnixPayload>(RecordKind::UnixConnect, verdict, cgroup_id, slot, 0)
    else {
        return false;
    };
    // SAFETY: reserved record; field by field (see `start_record`); the path is copied by the
    // helper rather than through the 512-byte stack.
    unsafe {
        let p = &raw mut (*entry.as_mut_ptr()).payload;
        (*p).sock_type = sock_type;
        (*p).name_len = key.name_len;
        (*p).send = send;
        (*p).rule = rule;
        (*p)._pad = 0;
        if bpf_probe_read_kernel(
            (&raw mut (*p).path).cast(),
            UNIX_PATH_LEN as u32,
            key.path.as_ptr().cast(),
        ) != 0
        {
            (*p).name_len = 0;
        }
    }
    submit(entry, verdict);
    true
}
