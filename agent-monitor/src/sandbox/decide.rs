//! What `run` answers for a caught call: pure, from the call's name and arguments.

use agent_monitor_common::AGENT_SOCKET_FAMILIES;

use super::filter::{IOPRIO_WHO_PROCESS, PERF_FLAG_PID_CGROUP, PRIO_PROCESS};
use crate::control::{CaughtCall, CaughtTarget};

/// What `run` does with a caught call.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Fail it with EPERM and report it denied.
    Refuse(CaughtCall),
    /// Let it run and report it as an alert (alert mode).
    Alert(CaughtCall),
    /// Let it run, nothing to report (a kept family with junk in the register's high half).
    Pass,
    /// A call that reaches another process: refused and reported if its target is outside the
    /// caller's task, else let run (Landlock decides). Both modes.
    Judge(Reach),
}

/// A caught call that reaches other processes, and where its targets are.
#[derive(Debug, PartialEq, Eq)]
pub struct Reach {
    pub syscall: String,
    /// The signal it sends; none: a ptrace-family access.
    pub signal: Option<u32>,
    pub targets: Vec<TargetRef>,
}

/// How a call names a process.
#[derive(Debug, PartialEq, Eq)]
pub enum TargetRef {
    /// A pid (or tid) in the caller's pid namespace; <= 0 are the kernel's to judge.
    Pid(i32),
    /// A pidfd (or, for pidfd_send_signal, a /proc/PID directory fd) of the caller's.
    Fd(i32),
}

/// The targets of a call that reaches another process, from its arguments; none if `name` is
/// not one of those calls (or, for perf_event_open, names a cgroup rather than a process).
fn reach(name: &str, args: &[u64; 6]) -> Option<Reach> {
    // pid_t and int arguments: the kernel reads the low half.
    let pid = |i: usize| TargetRef::Pid(args[i] as u32 as i32);
    let fd = |i: usize| TargetRef::Fd(args[i] as u32 as i32);
    let sig = |i: usize| Some(args[i] as u32);
    let (signal, targets) = match name {
        "ptrace" => (None, vec![pid(1)]),
        "process_vm_readv" | "process_vm_writev" | "move_pages" | "migrate_pages"
        | "get_robust_list" | "prlimit64" => (None, vec![pid(0)]),
        "kcmp" => (None, vec![pid(0), pid(1)]),
        "pidfd_getfd" | "process_madvise" => (None, vec![fd(0)]),
        "perf_event_open" if args[4] & PERF_FLAG_PID_CGROUP != 0 => return None,
        "perf_event_open" => (None, vec![pid(1)]),
        "sched_setaffinity" | "sched_setscheduler" | "sched_setparam" | "sched_setattr" => {
            (None, vec![pid(0)])
        }
        "setpriority" if args[0] as u32 as u64 == PRIO_PROCESS => (None, vec![pid(1)]),
        "ioprio_set" if args[0] as u32 as u64 == IOPRIO_WHO_PROCESS => (None, vec![pid(1)]),
        "kill" | "tkill" | "rt_sigqueueinfo" => (sig(1), vec![pid(0)]),
        "tgkill" | "rt_tgsigqueueinfo" => (sig(2), vec![pid(1)]),
        "pidfd_send_signal" => (sig(1), vec![fd(0)]),
        _ => return None,
    };
    Some(Reach {
        syscall: name.to_string(),
        signal,
        targets,
    })
}

/// Whether a target is outside the caller's task: `run` itself always is; otherwise the cgroup
/// decides (every process of a task shares its cgroup). Unknown cgroups (a caller or target
/// that is gone) are the kernel's to judge: the call then fails or reaches nothing, and the
/// Landlock domain still has the last word.
pub fn outside(caller_cgroup: Option<&str>, target: &CaughtTarget) -> bool {
    if target.supervisor {
        return true;
    }
    match (caller_cgroup, target.cgroup.as_deref()) {
        (Some(caller), Some(target)) => caller != target,
        _ => false,
    }
}

/// The decision for system call `name` with `args`, for an agent in enforce mode or not.
/// Pure: the supervisor's whole policy.
pub fn decide(name: &str, args: &[u64; 6], enforce: bool) -> Answer {
    if let Some(r) = reach(name, args) {
        return Answer::Judge(r);
    }
    let call = match name {
        "socket" => {
            // socket(2) takes an int: the kernel reads the low half.
            let family = args[0] as u32;
            if AGENT_SOCKET_FAMILIES.contains(&family) {
                return Answer::Pass;
            }
            CaughtCall::Socket {
                family,
                sock_type: args[1] as u32,
                protocol: args[2] as u32,
            }
        }
        "socketcall" => CaughtCall::Socketcall { op: args[0] as u32 },
        "io_uring_setup" => CaughtCall::IoUringSetup,
        // perf_event_open on a cgroup: the kernel's (and its privilege checks') to decide.
        "perf_event_open" => return Answer::Pass,
        // Our own integrity: see the module doc. Refused in both modes.
        "seccomp" => return Answer::Refuse(CaughtCall::SeccompListener),
        // Only root agents' filters catch it (privileges.rs); refused in both modes.
        "bpf" => return Answer::Refuse(CaughtCall::Bpf),
        // A process group's or a user's every process (reach() took the one-process form):
        // processes outside the task among them, and no Landlock scope. Refused in both modes.
        "setpriority" | "ioprio_set" => {
            return Answer::Refuse(CaughtCall::Other {
                name: format!("{name} of a process group or user ({})", args[0] as u32),
            });
        }
        // Typing into the terminal of `run`'s caller (filter rule): refused in both modes.
        "ioctl" => {
            return Answer::Refuse(CaughtCall::Other {
                name: match args[1] as u32 {
                    0x5412 => "ioctl TIOCSTI".to_string(),
                    other => format!("ioctl {other:#x} (TIOCLINUX)"),
                },
            });
        }
        other => CaughtCall::Other {
            name: other.to_string(),
        },
    };
    if enforce {
        Answer::Refuse(call)
    } else {
        Answer::Alert(call)
    }
}
