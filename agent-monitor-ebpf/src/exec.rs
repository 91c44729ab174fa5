//! Exec verdicts from the kernel's facts about the exec: the file that runs (device and inode), the
//! name it was asked for, the interpreter a script named, and the task's user namespace.
//!
//! Rule (the userspace evaluator states the same, `Policy::check_exec`):
//! - the program that runs is allowed if its file is one an exact rule names (any name: a
//!   symlink, `/proc/self/fd/N`, `fexecve`), or — in the initial user namespace only — if the name
//!   it was opened by (`bprm->interp`: the exec'd path, or a script's `#!` interpreter) matches a
//!   rule;
//! - a script also needs its own name to match a rule (initial user namespace only);
//! - in any other user namespace an unprivileged process can remap names (bind mounts, chroot), so
//!   only file identity counts there.
//!
//! What the static allowlist refuses, a live grant of the process's task may allow (by name, in
//! the initial user namespace, like a name rule). And exec is where executable selectors make a
//! process an agent: by the file that runs (device, inode), whatever name it was exec'd by.

use agent_monitor_common::{
    AgentSlot, COUNTER_EXEC_UNREADABLE, COUNTER_GRANTS_EXPIRED, COUNTER_PATH_NOT_NORMAL,
    COUNTER_PATH_TRUNCATED, COUNTER_PATH_UNREADABLE, COUNTER_SELECTOR_CONFLICTS, EXEC_BASIS_FILE,
    EXEC_BASIS_INTERPRETER, EXEC_BASIS_NAME, EXEC_BASIS_NO_MATCH, EXEC_BASIS_SCRIPT,
    EXEC_BASIS_UNREADABLE, EXEC_BASIS_USER_NS, EXEC_KEY_AGENT_BITS, EXEC_PATH_LEN, ExecFileKey,
    ExecPayload, FILE_GRANT_ONCE, FLAG_GRANTED, FLAG_KILLED, FLAG_PATH_NOT_NORMAL,
    FLAG_PATH_TRUNCATED, FLAG_PATH_UNREADABLE, FLAG_RETAGGED, FLAG_USER_NS, KernelOffsets,
    MODE_ENFORCE, NO_ALLOWLIST, RECORD_PATH_LEN, RecordKind, SCRIPT_NAME_GRANT, SELECT_EXECUTABLES,
    SELECT_TAGS, SOURCE_EXECUTABLE, SOURCE_UID, TASK_NONE, TaggedPayload, VERDICT_ALERT,
    VERDICT_ALLOWED, VERDICT_DENIED, VERDICT_NONE, exec_path_is_normal, mode_refuses, source_rank,
};
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::RawTracePointContext};

use crate::identity::{config, current_identity, tag};
use crate::maps::{
    AGENT_TABLES, EXEC_ALLOW, EXEC_FILES, EXEC_KEY_SCRATCH, EXEC_SELECTORS, PROCESS_AGENTS,
    TASK_EXEC_FILE_GRANTS, TASK_EXEC_GRANTS, count, must_refuse, start_record, submit,
};

/// Member offsets of this kernel's structures, read by the daemon from /sys/kernel/btf/vmlinux and
/// set before load. All zero (`valid == 0`) means not set: nothing is allowed.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    bprm_file: 0,
    bprm_filename: 0,
    bprm_interp: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_cred: 0,
    cred_user_ns: 0,
    user_ns_inum: 0,
    init_user_ns: 0,
    valid: 0,
};

const SIGKILL: u32 = 9;

/// What the kernel knows about this exec.
struct Facts {
    filename: *const u8,
    interp: *const u8,
    dev: u32,
    ino: u64,
    user_ns: u32,
}

/// Reads a pointer-sized or integer member at `base + off`.
#[inline(always)]
unsafe fn member<T>(base: *const u8, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.add((off & 0xffff) as usize).cast::<T>()) }
}

#[inline(always)]
fn read_facts(task: *const u8, bprm: *const u8, off: &KernelOffsets) -> Result<Facts, i32> {
    // SAFETY: each read goes through bpf_probe_read_kernel with offsets from the kernel's BTF.
    unsafe {
        let file: *const u8 = member(bprm, off.bprm_file)?;
        let inode: *const u8 = member(file, off.file_inode)?;
        let sb: *const u8 = member(inode, off.inode_sb)?;
        let cred: *const u8 = member(task, off.task_cred)?;
        let ns: *const u8 = member(cred, off.cred_user_ns)?;
        Ok(Facts {
            filename: member(bprm, off.bprm_filename)?,
            interp: member(bprm, off.bprm_interp)?,
            ino: member(inode, off.inode_ino)?,
            dev: member(sb, off.sb_dev)?,
            user_ns: member(ns, off.user_ns_inum)?,
        })
    }
}

/// How a name matched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NameMatch {
    No,
    /// A rule of the agent's allowlist.
    Policy,
    /// A live exec grant of the task (a name rule of the task until its expiry, compared here
    /// with the kernel clock).
    Grant,
}

/// Whether `name` matches one of the agent's rules by name, or else a live grant of its task
/// (`script`: the name of a script, which a script-only grant, `SCRIPT_NAME_GRANT`, allows too).
/// The name is read and checked once for all. Sets the flags that explain a refusal.
#[inline(always)]
fn name_match(slot: &AgentSlot, name: *const u8, script: bool, flags: &mut u32) -> NameMatch {
    let Some(key) = EXEC_KEY_SCRATCH.get_ptr_mut(0) else {
        return NameMatch::No;
    };
    // SAFETY: per-CPU scratch slot owned by this program run; kernel strings read by helper.
    unsafe {
        (*key).prefix_len = EXEC_KEY_AGENT_BITS + (EXEC_PATH_LEN as u32) * 8;
        (*key).data.agent = slot.agent;
        let len =
            match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(name, &mut (*key).data.path) {
                Ok(s) => s.len(),
                Err(_) => {
                    *flags |= FLAG_PATH_UNREADABLE;
                    count(COUNTER_PATH_UNREADABLE);
                    return NameMatch::No;
                }
            };
        // The buffer holds EXEC_PATH_LEN - 1 bytes and a NUL: a name that filled it may go on.
        if len >= EXEC_PATH_LEN - 1 {
            let next: u8 = bpf_probe_read_kernel(name.add(EXEC_PATH_LEN - 1)).unwrap_or(1);
            if next != 0 {
                *flags |= FLAG_PATH_TRUNCATED;
                count(COUNTER_PATH_TRUNCATED);
                return NameMatch::No;
            }
        }
        if !exec_path_is_normal(&(*key).data.path) {
            *flags |= FLAG_PATH_NOT_NORMAL;
            count(COUNTER_PATH_NOT_NORMAL);
            return NameMatch::No;
        }
        if EXEC_ALLOW.get(&*key).is_some() {
            return NameMatch::Policy;
        }
        if slot.task == TASK_NONE {
            return NameMatch::No;
        }
        (*key).data.agent = slot.task;
        let mut grant = TASK_EXEC_GRANTS.get(&*key).copied();
        if grant.is_none() && script {
            (*key).data.agent = slot.task | SCRIPT_NAME_GRANT;
            grant = TASK_EXEC_GRANTS.get(&*key).copied();
        }
        match grant {
            Some(expiry) => {
                let now = aya_ebpf::helpers::generated::bpf_ktime_get_ns();
                if expiry.is_live(now) {
                    NameMatch::Grant
                } else {
                    count(COUNTER_GRANTS_EXPIRED);
                    NameMatch::No
                }
            }
            None => NameMatch::No,
        }
    }
}

/// Whether a live grant of `slot`'s task names the file that runs (device, inode). A grant for
/// one exec is removed here; of two execs racing for it only one removes it, and only that one
/// is allowed. Looked up only where the task's name grants are, after everything else refused.
#[inline(always)]
fn file_grant(slot: &AgentSlot, f: &Facts) -> bool {
    if slot.task == TASK_NONE {
        return false;
    }
    let key = ExecFileKey {
        agent: slot.task,
        dev: f.dev,
        ino: f.ino,
    };
    // SAFETY: copied out at once.
    let Some(grant) = (unsafe { TASK_EXEC_FILE_GRANTS.get(&key) }).copied() else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    if !grant.expiry.is_live(now) {
        count(COUNTER_GRANTS_EXPIRED);
        return false;
    }
    if grant.uses == FILE_GRANT_ONCE {
        return TASK_EXEC_FILE_GRANTS.remove(&key).is_ok();
    }
    true
}

/// raw tracepoint sched_process_exec(task, old_pid, bprm): after a successful exec, in the new
/// image's task, before its first instruction.
pub fn on_exec(ctx: &RawTracePointContext) -> Result<(), i32> {
    // Stored identity (stable agent id): what tags copy and selectors compare with.
    let prior = current_identity();
    let selectors = config().map_or(0, |c| c.selectors);
    if prior.is_none() && selectors & SELECT_EXECUTABLES == 0 {
        return Ok(());
    }
    // SAFETY: global set by the loader; volatile so the compiler keeps the load.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    let task: *const u8 = ctx.arg(0);
    let old_pid: u64 = ctx.arg(1);
    let bprm: *const u8 = ctx.arg(2);
    let facts = if off.valid == 1 {
        read_facts(task, bprm, &off).ok()
    } else {
        None
    };
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;

    // A thread other than the leader exec'd: it now has the leader's id; its tag follows it.
    if selectors & SELECT_TAGS != 0 && old_pid as u32 != tid {
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { PROCESS_AGENTS.get(&(old_pid as u32)) }.copied() {
            tag(tid, &slot);
            let _ = PROCESS_AGENTS.remove(&(old_pid as u32));
        }
    }

    // The exec is the act of whoever the process was when it asked for it.
    if let Some((cgroup_id, raw)) = prior {
        // Translated here rather than by `in_force`: an agent without a table entry (its policy
        // was removed) takes the short path below instead of a second pass through `judge`,
        // which pushed this program past the verifier's limit (E2BIG).
        // SAFETY: copied out at once.
        match unsafe { AGENT_TABLES.get(&raw.agent) }.copied() {
            Some(t) => {
                let slot = AgentSlot {
                    agent: t.agent,
                    mode: t.mode,
                    task: raw.task,
                    source: raw.source,
                };
                if judge(cgroup_id, &slot, &facts, &off, old_pid) {
                    return Ok(()); // killed
                }
            }
            None => {
                deny_without_policy(cgroup_id, &raw, &facts, old_pid);
                return Ok(());
            }
        }
    }

    // Then what it becomes: an executable selector (by the file that runs) takes it unless a
    // higher-ranked identity holds it.
    if selectors & SELECT_EXECUTABLES != 0
        && let Some(f) = &facts
    {
        let key = ExecFileKey {
            agent: 0,
            dev: f.dev,
            ino: f.ino,
        };
        // SAFETY: copied out at once.
        if let Some(mut new) = unsafe { EXEC_SELECTORS.get(&key) }.copied() {
            new.source = SOURCE_EXECUTABLE;
            match prior {
                None => {
                    if tag(tid, &new) {
                        report_tagged(&new, 0, VERDICT_NONE, 0, 0, old_pid, f.filename);
                    }
                    return Ok(());
                }
                // Already this agent: its task (a task switch, a `run` placement) stands.
                Some((_, p)) if p.agent == new.agent => {}
                Some((cgroup_id, p)) if source_rank(SOURCE_EXECUTABLE) > source_rank(p.source) => {
                    if tag(tid, &new) {
                        report_tagged(
                            &new,
                            cgroup_id,
                            VERDICT_NONE,
                            FLAG_RETAGGED,
                            p.agent,
                            old_pid,
                            f.filename,
                        );
                    }
                    return Ok(());
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
                        f.filename,
                    );
                }
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

/// Judges the exec for `slot` — the static allowlist by file and name, then the task's grants by
/// name — kills in enforce mode, reports. Returns whether the process was killed.
#[inline(always)]
fn judge(
    cgroup_id: u64,
    slot: &AgentSlot,
    facts: &Option<Facts>,
    off: &KernelOffsets,
    old_pid: u64,
) -> bool {
    let mut flags = 0;
    let (allowed, basis) = match facts {
        None => {
            count(COUNTER_EXEC_UNREADABLE);
            flags |= FLAG_PATH_UNREADABLE;
            (false, EXEC_BASIS_UNREADABLE)
        }
        Some(f) => {
            let key = ExecFileKey {
                agent: slot.agent,
                dev: f.dev,
                ino: f.ino,
            };
            // SAFETY: value not kept.
            let file_ok = unsafe { EXEC_FILES.get(&key) }.is_some();
            // bprm->interp is bprm->filename until a binfmt (script, misc) names an interpreter.
            let script = f.interp != f.filename;
            if f.user_ns != off.init_user_ns {
                flags |= FLAG_USER_NS;
                if file_ok && !script {
                    (true, EXEC_BASIS_FILE)
                } else if !script && file_grant(slot, f) {
                    flags |= FLAG_GRANTED;
                    (true, EXEC_BASIS_FILE)
                } else {
                    (false, EXEC_BASIS_USER_NS)
                }
            } else {
                // The program: its file, or else its name (a rule, or a grant of the task).
                let program = if file_ok {
                    NameMatch::Policy
                } else {
                    match name_match(slot, f.interp, false, &mut flags) {
                        // Last: a grant of this very file (an ask-mode approval).
                        NameMatch::No if file_grant(slot, f) => NameMatch::Grant,
                        m => m,
                    }
                };
                // A script also needs its own name allowed.
                let script_name = if program != NameMatch::No && script {
                    name_match(slot, f.filename, true, &mut flags)
                } else {
                    NameMatch::Policy
                };
                if program == NameMatch::Grant || script_name == NameMatch::Grant {
                    flags |= FLAG_GRANTED;
                }
                match (program, script_name) {
                    (NameMatch::No, _) if script => (false, EXEC_BASIS_INTERPRETER),
                    (NameMatch::No, _) => (false, EXEC_BASIS_NO_MATCH),
                    (_, NameMatch::No) => (false, EXEC_BASIS_SCRIPT),
                    _ if file_ok => (true, EXEC_BASIS_FILE),
                    _ => (true, EXEC_BASIS_NAME),
                }
            }
        }
    };
    if !allowed {
        flags &= !FLAG_GRANTED;
    }

    let verdict = if allowed {
        VERDICT_ALLOWED
    } else if mode_refuses(slot.mode) {
        // We run in the new image's task after the point of no return: the signal is delivered
        // before its first instruction.
        // SAFETY: helper call on the current task.
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
        flags |= FLAG_KILLED;
        VERDICT_DENIED
    } else {
        VERDICT_ALERT
    };

    let Some(mut entry) =
        start_record::<ExecPayload>(RecordKind::Exec, verdict, cgroup_id, slot, flags)
    else {
        // An alert that cannot be recorded is refused as enforce mode would (`must_refuse`).
        if verdict == VERDICT_ALERT && must_refuse(verdict, false) {
            // SAFETY: as above.
            unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
            return true;
        }
        return verdict == VERDICT_DENIED;
    };
    // SAFETY: reserved record; the names are read again straight into it.
    unsafe {
        let p = &raw mut (*entry.as_mut_ptr()).payload;
        start_exec_payload(p, old_pid, basis, facts);
        if let Some(f) = facts {
            (*p).path_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
                f.filename,
                &mut (*p).path,
            ) {
                Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                Err(_) => 0,
            };
            if f.interp != f.filename {
                (*p).interp_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
                    f.interp,
                    &mut (*p).interp,
                ) {
                    Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                    Err(_) => 0,
                };
            }
        }
    }
    submit(entry, verdict);
    verdict == VERDICT_DENIED
}

/// An agent process whose agent has no policy in force execs: denied (fail closed), killed,
/// reported with the file that was to run.
#[inline(always)]
fn deny_without_policy(cgroup_id: u64, raw: &AgentSlot, facts: &Option<Facts>, old_pid: u64) {
    // SAFETY: helper call on the current task (after the point of no return, as in `judge`).
    unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
    let slot = AgentSlot {
        agent: NO_ALLOWLIST,
        mode: MODE_ENFORCE,
        task: raw.task,
        source: raw.source,
    };
    let Some(mut entry) = start_record::<ExecPayload>(
        RecordKind::Exec,
        VERDICT_DENIED,
        cgroup_id,
        &slot,
        FLAG_KILLED,
    ) else {
        return;
    };
    // SAFETY: reserved record; the name is read straight into it.
    unsafe {
        let p = &raw mut (*entry.as_mut_ptr()).payload;
        start_exec_payload(p, old_pid, EXEC_BASIS_NO_MATCH, facts);
        if let Some(f) = facts {
            (*p).path_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
                f.filename,
                &mut (*p).path,
            ) {
                Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                Err(_) => 0,
            };
        }
    }
    submit(entry, VERDICT_DENIED);
}

/// Writes an exec record's fixed fields (the names are read in by the caller; until then they
/// are empty).
///
/// # Safety
/// `p` points into a reserved record.
#[inline(always)]
unsafe fn start_exec_payload(p: *mut ExecPayload, old_pid: u64, basis: u32, facts: &Option<Facts>) {
    let (file_dev, file_ino) = match facts {
        Some(f) => (f.dev, f.ino),
        None => (0, 0),
    };
    // SAFETY: the caller's pointer into a reserved record; fields are written, never read.
    unsafe {
        (*p).old_pid = old_pid as u32;
        (*p).basis = basis;
        (*p).file_dev = file_dev;
        (*p).path_len = 0;
        (*p).file_ino = file_ino;
        (*p).interp_len = 0;
        (*p)._pad = 0;
    }
}

/// `RecordKind::Tagged`: `verdict` `VERDICT_NONE` — the process became `slot`'s agent (with
/// `FLAG_RETAGGED`: leaving `prior_agent`); `VERDICT_DENIED` — it stays `slot` and the executable
/// selector of agent `prior_agent` was refused by precedence.
#[inline(always)]
fn report_tagged(
    slot: &AgentSlot,
    cgroup_id: u64,
    verdict: u32,
    flags: u32,
    prior_agent: u32,
    old_pid: u64,
    name: *const u8,
) {
    // Unlike other records, these carry stable agent ids (identities as stored): translating
    // here pushed the exec program past the verifier's size limit (E2BIG).
    if let Some(mut entry) =
        start_record::<TaggedPayload>(RecordKind::Tagged, verdict, cgroup_id, slot, flags)
    {
        // SAFETY: reserved record; kernel string read into a bounded buffer.
        unsafe {
            let p = &raw mut (*entry.as_mut_ptr()).payload;
            (*p).old_pid = old_pid as u32;
            (*p).prior_agent = prior_agent;
            (*p)._pad = 0;
            (*p).path_len =
                match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(name, &mut (*p).path) {
                    Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                    Err(_) => 0,
                };
        }
        submit(entry, verdict);
    }
}
