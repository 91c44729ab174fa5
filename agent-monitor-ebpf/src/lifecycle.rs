//! Agent process lifecycle, so the daemon can name the process chain of every action.

use agent_monitor_common::{ExitPayload, ForkPayload, RecordKind, SELECT_TAGS, VERDICT_NONE};
use aya_ebpf::programs::TracePointContext;

use crate::identity::{config, current_identity, forget, in_force, inherit};
use crate::maps::{AGENT_IO_THREADS, current_agent, start_record, submit};

/// Offset of `child_pid` in the `sched_process_fork` record. It moved when the comms became
/// `__data_loc` strings (6.x), so the daemon reads it from tracefs and sets it before load.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

pub fn on_fork(ctx: &TracePointContext) -> Result<(), i32> {
    // The child's tag copies the parent's identity as stored (stable agent id), never the
    // translated allowlist index, which a reload moves.
    let Some((cgroup_id, raw)) = current_identity() else {
        return Ok(());
    };
    // SAFETY: global set by the loader; volatile so the compiler keeps the load.
    let off = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) };
    // SAFETY: the offset is inside the record (checked against tracefs by the daemon).
    let child: u32 = unsafe { ctx.read_at((off & 0xff) as usize)? };
    // Fires for threads too: every thread of a tagged process carries the tag.
    inherit(child, &raw);
    let slot = in_force(&raw);
    if let Some(mut entry) =
        start_record::<ForkPayload>(RecordKind::Fork, VERDICT_NONE, cgroup_id, &slot, 0)
    {
        // SAFETY: reserved record.
        unsafe { (*entry.as_mut_ptr()).payload = ForkPayload { child, _pad: 0 } };
        submit(entry, VERDICT_NONE);
    }
    Ok(())
}

/// `clone_flags` bit that every io_uring worker and SQPOLL thread is made with.
const CLONE_IO: u64 = 0x8000_0000;

/// A new task made with `CLONE_IO`: io_uring's worker and SQPOLL threads (`create_io_thread`)
/// run the ring's calls (connect, sendmsg, openat) for their process but never pass
/// `sched_process_fork`, so without a tag of their own an agent known by a tag would make those
/// calls as the host. They inherit the tag here; the record stays `on_fork`'s (a thread is not
/// part of the chain). Offsets: `pid` at 8 and `clone_flags` at 32, checked against tracefs by
/// the daemon before load.
pub fn on_newtask(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets inside the record (checked by the daemon).
    let flags: u64 = unsafe { ctx.read_at(32)? };
    if flags & CLONE_IO == 0 {
        return Ok(());
    }
    let Some((_, raw)) = current_identity() else {
        return Ok(());
    };
    // SAFETY: as above.
    let child: u32 = unsafe { ctx.read_at(8)? };
    inherit(child, &raw);
    let _ = AGENT_IO_THREADS.insert(&child, &1, 0);
    Ok(())
}

pub fn on_exit(_ctx: &TracePointContext) -> Result<(), i32> {
    let Some((cgroup_id, slot)) = current_agent() else {
        return Ok(());
    };
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let _ = AGENT_IO_THREADS.remove(&(pid_tgid as u32));
    // Any tag of this thread goes, even when a cgroup identity outranks it now (a tagged process
    // that later entered a `run` cgroup): a stale tag would hand the identity to the next
    // process that gets this thread id.
    if config().is_some_and(|c| c.selectors & SELECT_TAGS != 0) {
        forget(pid_tgid as u32);
    }
    // Only whole processes matter for the chain; threads exiting are not reported.
    if (pid_tgid >> 32) as u32 != pid_tgid as u32 {
        return Ok(());
    }
    if let Some(entry) =
        start_record::<ExitPayload>(RecordKind::Exit, VERDICT_NONE, cgroup_id, &slot, 0)
    {
        submit(entry, VERDICT_NONE);
    }
    Ok(())
}
