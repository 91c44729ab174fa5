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

use agent_monitor_common::{
    COUNTER_EXEC_UNREADABLE, COUNTER_PATH_NOT_NORMAL, COUNTER_PATH_TRUNCATED,
    COUNTER_PATH_UNREADABLE, EXEC_BASIS_FILE, EXEC_BASIS_INTERPRETER, EXEC_BASIS_NAME,
    EXEC_BASIS_NO_MATCH, EXEC_BASIS_SCRIPT, EXEC_BASIS_UNREADABLE, EXEC_BASIS_USER_NS,
    EXEC_KEY_AGENT_BITS, EXEC_PATH_LEN, ExecFileKey, FLAG_KILLED, FLAG_PATH_NOT_NORMAL,
    FLAG_PATH_TRUNCATED, FLAG_PATH_UNREADABLE, FLAG_USER_NS, KIND_EXEC, KernelOffsets,
    MODE_ENFORCE, RECORD_PATH_LEN, VERDICT_ALERT, VERDICT_ALLOWED, VERDICT_DENIED,
    exec_path_is_normal,
};
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::RawTracePointContext};

use crate::maps::{
    EXEC_ALLOW, EXEC_FILES, EXEC_KEY_SCRATCH, count, current_agent, start_record, submit,
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

/// Whether `name` matches one of the agent's rules by name. Sets the flags that explain a refusal.
#[inline(always)]
fn name_allowed(agent: u32, name: *const u8, flags: &mut u32) -> bool {
    let Some(key) = EXEC_KEY_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch slot owned by this program run; kernel strings read by helper.
    unsafe {
        (*key).prefix_len = EXEC_KEY_AGENT_BITS + (EXEC_PATH_LEN as u32) * 8;
        (*key).data.agent = agent;
        let len =
            match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(name, &mut (*key).data.path) {
                Ok(s) => s.len(),
                Err(_) => {
                    *flags |= FLAG_PATH_UNREADABLE;
                    count(COUNTER_PATH_UNREADABLE);
                    return false;
                }
            };
        // The buffer holds EXEC_PATH_LEN - 1 bytes and a NUL: a name that filled it may go on.
        if len >= EXEC_PATH_LEN - 1 {
            let next: u8 = bpf_probe_read_kernel(name.add(EXEC_PATH_LEN - 1)).unwrap_or(1);
            if next != 0 {
                *flags |= FLAG_PATH_TRUNCATED;
                count(COUNTER_PATH_TRUNCATED);
                return false;
            }
        }
        if !exec_path_is_normal(&(*key).data.path) {
            *flags |= FLAG_PATH_NOT_NORMAL;
            count(COUNTER_PATH_NOT_NORMAL);
            return false;
        }
        EXEC_ALLOW.get(&*key).is_some()
    }
}

/// raw tracepoint sched_process_exec(task, old_pid, bprm): after a successful exec, in the new
/// image's task, before its first instruction.
pub fn on_exec(ctx: &RawTracePointContext) -> Result<(), i32> {
    let Some((cgroup_id, slot)) = current_agent() else {
        return Ok(());
    };
    // SAFETY: global set by the loader; volatile so the compiler keeps the load.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    let task: *const u8 = ctx.arg(0);
    let old_pid: u64 = ctx.arg(1);
    let bprm: *const u8 = ctx.arg(2);

    let mut flags = 0;
    let facts = if off.valid == 1 {
        read_facts(task, bprm, &off).ok()
    } else {
        None
    };
    let (allowed, basis) = match &facts {
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
                } else {
                    (false, EXEC_BASIS_USER_NS)
                }
            } else if !file_ok && !name_allowed(slot.agent, f.interp, &mut flags) {
                let why = if script {
                    EXEC_BASIS_INTERPRETER
                } else {
                    EXEC_BASIS_NO_MATCH
                };
                (false, why)
            } else if script && !name_allowed(slot.agent, f.filename, &mut flags) {
                (false, EXEC_BASIS_SCRIPT)
            } else if file_ok {
                (true, EXEC_BASIS_FILE)
            } else {
                (true, EXEC_BASIS_NAME)
            }
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
    // SAFETY: reserved record; the names are read again straight into it.
    unsafe {
        (*rec).other_pid = old_pid as u32;
        (*rec).flags = flags;
        (*rec).detail = basis;
        if let Some(f) = &facts {
            (*rec).file_dev = f.dev;
            (*rec).file_ino = f.ino;
            (*rec).path_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
                f.filename,
                &mut (*rec).path,
            ) {
                Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                Err(_) => 0,
            };
            if f.interp != f.filename {
                (*rec).interp_len = match aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(
                    f.interp,
                    &mut (*rec).interp,
                ) {
                    Ok(s) => s.len().min(RECORD_PATH_LEN) as u32,
                    Err(_) => 0,
                };
            }
        }
    }
    submit(entry, verdict);
    Ok(())
}
