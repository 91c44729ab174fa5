//! Exec verdicts: the file name the kernel resolved for this exec, looked up in the agent's allowlist
//! (then in the task's grants); and exec-time tagging by executable selectors.

use agent_monitor_common::{
    AgentSlot, COUNTER_GRANTS_EXPIRED, COUNTER_PATH_NOT_NORMAL, COUNTER_PATH_TRUNCATED,
    COUNTER_PATH_UNREADABLE, COUNTER_SELECTOR_CONFLICTS, EXEC_KEY_AGENT_BITS, EXEC_PATH_LEN,
    FLAG_GRANTED, FLAG_KILLED, FLAG_PATH_NOT_NORMAL, FLAG_PATH_TRUNCATED, FLAG_PATH_UNREADABLE,
    FLAG_RETAGGED, KIND_EXEC, KIND_TAGGED, MODE_ENFORCE, RECORD_PATH_LEN, SELECT_EXECUTABLES,
    SELECT_TAGS, SOURCE_EXECUTABLE, SOURCE_UID, TASK_NONE, VERDICT_ALERT, VERDICT_ALLOWED,
    VERDICT_DENIED, VERDICT_NONE, exec_path_is_normal, source_rank,
};
use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

use crate::identity::{config, current_agent, tag};
use crate::maps::{
    EXEC_ALLOW, EXEC_KEY_SCRATCH, EXEC_SELECTORS, PROCESS_AGENTS, TASK_EXEC_GRANTS, count,
    start_record,
};

/// Offsets in the `sched_process_exec` record (stable since 3.x; the daemon checks them against
/// tracefs before it loads us).
const FILENAME_LOC: usize = 8;
const OLD_PID: usize = 16;
const SIGKILL: u32 = 9;

pub fn on_exec(ctx: &TracePointContext) -> Result<(), i32> {
    let prior = current_agent();
    let selectors = config().map_or(0, |c| c.selectors);
    let exec_selectors = selectors & SELECT_EXECUTABLES != 0;
    if prior.is_none() && !exec_selectors {
        return Ok(());
    }
    // SAFETY: offsets come from the tracepoint format (checked by the daemon at start).
    let loc: u32 = unsafe { ctx.read_at(FILENAME_LOC)? };
    let old_pid: u32 = unsafe { ctx.read_at(OLD_PID)? };
    let name_ptr = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
    // `len` counts the NUL.
    let len = (loc >> 16) as usize;
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;

    let key = EXEC_KEY_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let mut flags = 0;
    // SAFETY: per-CPU scratch slot owned by this program run.
    let readable = unsafe {
        (*key).prefix_len = EXEC_KEY_AGENT_BITS + (EXEC_PATH_LEN as u32) * 8;
        if len > EXEC_PATH_LEN {
            // Too long to hold with its NUL: judged as not on the allowlist.
            flags |= FLAG_PATH_TRUNCATED;
            false
        } else if aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
            name_ptr,
            &mut (*key).data.path,
        )
        .is_err()
        {
            flags |= FLAG_PATH_UNREADABLE;
            false
        } else if !exec_path_is_normal(&(*key).data.path) {
            flags |= FLAG_PATH_NOT_NORMAL;
            false
        } else {
            true
        }
    };

    // A thread other than the leader exec'd: it now has the leader's id; its tag follows it.
    if selectors & SELECT_TAGS != 0 && old_pid != tid {
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { PROCESS_AGENTS.get(&old_pid) }.copied() {
            tag(tid, &slot);
            let _ = PROCESS_AGENTS.remove(&old_pid);
        }
    }

    // The exec is the act of whoever the process was when it asked for it.
    if let Some((cgroup_id, slot)) = prior {
        if flags & FLAG_PATH_TRUNCATED != 0 {
            count(COUNTER_PATH_TRUNCATED);
        } else if flags & FLAG_PATH_UNREADABLE != 0 {
            count(COUNTER_PATH_UNREADABLE);
        } else if flags & FLAG_PATH_NOT_NORMAL != 0 {
            count(COUNTER_PATH_NOT_NORMAL);
        }
        let killed = judge(key, readable, cgroup_id, &slot, flags, old_pid, name_ptr);
        if killed {
            return Ok(());
        }
    }

    // Then what it becomes: an executable selector takes it unless a higher-ranked identity holds it.
    if exec_selectors && readable {
        // SAFETY: per-CPU scratch; the selector trie keys paths under agent 0.
        let selected = unsafe {
            (*key).data.agent = 0;
            EXEC_SELECTORS.get(&*key).copied()
        };
        if let Some(mut new) = selected {
            new.source = SOURCE_EXECUTABLE;
            let mut record_flags = 0;
            let mut prior_agent = 0;
            let take = match prior {
                None => true,
                Some((_, p)) if p.agent == new.agent => {
                    // Already this agent: keep its task (a task switch or `run` placement stands).
                    false
                }
                Some((_, p)) if source_rank(SOURCE_EXECUTABLE) > source_rank(p.source) => {
                    record_flags |= FLAG_RETAGGED;
                    prior_agent = p.agent;
                    true
                }
                Some((cgroup_id, p)) => {
                    // A higher-ranked identity keeps the process: report the refused claim.
                    count(COUNTER_SELECTOR_CONFLICTS);
                    report_tagged(
                        &p,
                        cgroup_id,
                        VERDICT_DENIED,
                        0,
                        new.agent,
                        old_pid,
                        name_ptr,
                    );
                    false
                }
            };
            if take && tag(tid, &new) {
                let cgroup_id = prior.map_or(0, |(c, _)| c);
                report_tagged(
                    &new,
                    cgroup_id,
                    VERDICT_NONE,
                    record_flags,
                    prior_agent,
                    old_pid,
                    name_ptr,
                );
                return Ok(());
            }
        }
    }
    // A uid-selected process is tagged at exec so it stays the agent if it later changes uid.
    if let Some((_, slot)) = prior
        && slot.source == SOURCE_UID
    {
        tag(tid, &slot);
    }
    Ok(())
}

/// Judges the exec for `slot` (static allowlist, then the task's grants), kills in enforce mode,
/// reports. Returns whether the process was killed.
#[inline(always)]
fn judge(
    key: *mut aya_ebpf::maps::lpm_trie::Key<agent_monitor_common::ExecKey>,
    readable: bool,
    cgroup_id: u64,
    slot: &AgentSlot,
    mut flags: u32,
    old_pid: u32,
    name_ptr: *const u8,
) -> bool {
    // SAFETY: per-CPU scratch slot owned by this program run.
    let allowed = readable
        && unsafe {
            (*key).data.agent = slot.agent;
            if EXEC_ALLOW.get(&*key).is_some() {
                true
            } else if granted(key, slot.task) {
                flags |= FLAG_GRANTED;
                true
            } else {
                false
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
    if let Some(mut entry) = start_record(KIND_EXEC, verdict, cgroup_id, slot) {
        let rec = entry.as_mut_ptr();
        // SAFETY: reserved record; the path is read again straight into it.
        unsafe {
            (*rec).other_pid = old_pid;
            (*rec).flags = flags;
            (*rec).path_len = read_path(name_ptr, &mut (*rec).path);
        }
        entry.submit(0);
    }
    verdict == VERDICT_DENIED
}

/// Whether task `task` holds a live exec grant for the path in `key`.
#[inline(always)]
unsafe fn granted(
    key: *mut aya_ebpf::maps::lpm_trie::Key<agent_monitor_common::ExecKey>,
    task: u32,
) -> bool {
    if task == TASK_NONE {
        return false;
    }
    // SAFETY: caller's scratch key.
    unsafe { (*key).data.agent = task };
    match TASK_EXEC_GRANTS.get(unsafe { &*key }) {
        Some(expiry) => {
            // SAFETY: helper with no arguments.
            let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
            if expiry.is_live(now) {
                true
            } else {
                count(COUNTER_GRANTS_EXPIRED);
                false
            }
        }
        None => false,
    }
}

/// `KIND_TAGGED`: `verdict` `VERDICT_NONE` — the process became `slot`'s agent (with
/// `FLAG_RETAGGED`: leaving `prior_agent`); `VERDICT_DENIED` — it stays `slot` and the executable
/// selector of agent `prior_agent` was refused by precedence.
#[inline(always)]
fn report_tagged(
    slot: &AgentSlot,
    cgroup_id: u64,
    verdict: u32,
    flags: u32,
    prior_agent: u32,
    old_pid: u32,
    name_ptr: *const u8,
) {
    if let Some(mut entry) = start_record(KIND_TAGGED, verdict, cgroup_id, slot) {
        let rec = entry.as_mut_ptr();
        // SAFETY: reserved record.
        unsafe {
            (*rec).other_pid = old_pid;
            (*rec).flags = flags;
            (*rec).prior_agent = prior_agent;
            (*rec).path_len = read_path(name_ptr, &mut (*rec).path);
        }
        entry.submit(0);
    }
}

#[inline(always)]
fn read_path(name_ptr: *const u8, dst: &mut [u8; RECORD_PATH_LEN]) -> u32 {
    // SAFETY: kernel string read into a bounded buffer.
    match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(name_ptr, dst) } {
        Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
        Err(_) => 0,
    }
}
