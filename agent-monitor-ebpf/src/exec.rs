//! Exec verdicts: the file name the kernel resolved for this exec, looked up in the agent's allowlist.

use agent_monitor_common::{
    COUNTER_PATH_NOT_NORMAL, COUNTER_PATH_TRUNCATED, COUNTER_PATH_UNREADABLE, EXEC_KEY_AGENT_BITS,
    EXEC_PATH_LEN, FLAG_KILLED, FLAG_PATH_NOT_NORMAL, FLAG_PATH_TRUNCATED, FLAG_PATH_UNREADABLE,
    KIND_EXEC, MODE_ENFORCE, RECORD_PATH_LEN, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
    exec_path_is_normal,
};
use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

use crate::maps::{EXEC_ALLOW, EXEC_KEY_SCRATCH, count, current_agent, start_record, submit};

/// Offsets in the `sched_process_exec` record (stable since 3.x; the daemon checks them against
/// tracefs before it loads us).
const FILENAME_LOC: usize = 8;
const OLD_PID: usize = 16;
const SIGKILL: u32 = 9;

pub fn on_exec(ctx: &TracePointContext) -> Result<(), i32> {
    let Some((cgroup_id, slot)) = current_agent() else {
        return Ok(());
    };
    // SAFETY: offsets come from the tracepoint format (checked by the daemon at start).
    let loc: u32 = unsafe { ctx.read_at(FILENAME_LOC)? };
    let old_pid: u32 = unsafe { ctx.read_at(OLD_PID)? };
    let name_ptr = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
    // `len` counts the NUL.
    let len = (loc >> 16) as usize;

    let key = EXEC_KEY_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let mut flags = 0;
    // SAFETY: per-CPU scratch slot owned by this program run.
    let allowed = unsafe {
        (*key).prefix_len = EXEC_KEY_AGENT_BITS + (EXEC_PATH_LEN as u32) * 8;
        (*key).data.agent = slot.agent;
        if len > EXEC_PATH_LEN {
            // Too long to hold with its NUL: judged as not on the allowlist.
            flags |= FLAG_PATH_TRUNCATED;
            count(COUNTER_PATH_TRUNCATED);
            false
        } else if aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
            name_ptr,
            &mut (*key).data.path,
        )
        .is_err()
        {
            flags |= FLAG_PATH_UNREADABLE;
            count(COUNTER_PATH_UNREADABLE);
            false
        } else if !exec_path_is_normal(&(*key).data.path) {
            flags |= FLAG_PATH_NOT_NORMAL;
            count(COUNTER_PATH_NOT_NORMAL);
            false
        } else {
            EXEC_ALLOW.get(&*key).is_some()
        }
    };

    let verdict = if allowed {
        VERDICT_ALLOWED
    } else if slot.mode == MODE_ENFORCE {
        // We run in the new image's task after the point of no return: the signal is delivered
        // before its first instruction.
        // SAFETY: helper call on the current task.
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
        flags |= FLAG_KILLED;
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };

    let Some(mut entry) = start_record(KIND_EXEC, verdict, cgroup_id) else {
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: reserved record; the path is read again straight into it.
    unsafe {
        (*rec).other_pid = old_pid;
        (*rec).flags = flags;
        let dst = &mut (*rec).path;
        (*rec).path_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(name_ptr, dst) {
            Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
            Err(_) => 0,
        };
    }
    submit(entry, verdict);
    Ok(())
}
