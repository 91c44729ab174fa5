//! The seccomp filter `run` puts on every agent command, for the routes the cgroup hooks cannot
//! see, and the supervisor in `run` that answers and reports what the filter catches.
//!
//! Caught: sockets of families other than unix, inet, inet6 and netlink (AF_VSOCK reaches the
//! hypervisor host, and cgroup sock_create only runs for inet); io_uring_setup (io_uring's socket
//! operation creates sockets without the socket system call); i386's socketcall multiplexer (its
//! arguments are in user memory, out of a filter's reach); and seccomp(2) asking for a new
//! notification listener (see below). The filter is inherited by every descendant and no process
//! can remove it.
//!
//! Why SECCOMP_RET_USER_NOTIF: a filter runs before every tracepoint, so a plain
//! SECCOMP_RET_ERRNO refusal is invisible to our kernel programs and reaches only the kernel
//! audit log (printk rate-limited, or auditd's). With USER_NOTIF the calling thread waits while
//! `run` (the agent's parent, root, outside the agent's reach) reads the call from the listener:
//! the pid and the registers come from the kernel, not from the agent. `run` answers EPERM
//! (enforce) or lets the call continue (alert), then sends the daemon a report, which the daemon
//! accepts only from the `run` process it placed. If `run` is gone, the kernel fails every caught
//! call with ENOSYS: closed, not open. A `sys_exit_socket` tracepoint was the other candidate:
//! it does fire for refused calls, but with nothing but `ret = -EPERM` (the family is gone, an
//! EPERM from elsewhere looks the same) and it could not turn a refusal into an alert.
//!
//! Filters stack and the strictest answer wins; between two USER_NOTIF answers the newest filter
//! wins. An agent that installed its own listener filter could therefore answer our calls
//! itself (CONTINUE): so seccomp(SECCOMP_SET_MODE_FILTER) with SECCOMP_FILTER_FLAG_NEW_LISTENER
//! is always refused. Also refused in both modes: ioctl TIOCSTI and TIOCLINUX, which type into
//! the terminal the agent shares with whoever started `run` (after `run` exits, that shell reads
//! the typed command as its own). A filter of the agent's without a listener answers ENOSYS; ERRNO, TRAP and
//! KILL are stricter than ours and refuse too: no stacking lets a caught call through.
//!
//! Also caught, in both modes: the calls that reach another process, i.e. everything the kernel
//! gates with a ptrace access check that takes a pid or a pidfd (ptrace attach and seize,
//! process_vm_readv/writev, pidfd_getfd, kcmp, process_madvise, perf_event_open, move_pages,
//! migrate_pages, get_robust_list) and the signal calls (kill, tkill, tgkill, rt_sigqueueinfo,
//! rt_tgsigqueueinfo, pidfd_send_signal), plus prlimit64 setting another process's limits and
//! the scheduling calls on another process (setpriority, ioprio_set, sched_setaffinity,
//! sched_setscheduler, sched_setparam, sched_setattr: a same-uid check only, no ptrace check
//! and no Landlock scope; their process-group and user forms are refused outright). The supervisor reads the target's
//! cgroup from /proc while the caller waits: a target in the caller's own task cgroup gets
//! CONTINUE (the Landlock domain `run` put the command in, confine.rs, still decides in the
//! kernel); a target outside it, or `run` itself, is refused with EPERM and reported as a denial,
//! in alert mode too (this is confinement, not an allowlist question). Left to Landlock alone,
//! unreported: pid <= 0 (kill's process groups and -1, which signal only what the caller may
//! signal), callers in a pid namespace of their own (their pids name their own descendants),
//! targets that vanish or whose pid is reused between our read and the kernel's, and the
//! /proc/PID files gated by the same check (mem, environ, fd/…; an open's path is out of a
//! filter's reach). Other ptrace requests need a tracer relation that only attach, seize or
//! PTRACE_TRACEME (towards the parent, `run` or a process of the agent) make.
//!
//! The filter is compiled by libseccomp (ABIs, x32 numbering, argument comparisons) in `run`
//! before the fork; the child only makes the one seccomp(2) call, which is async-signal-safe.
//! seccompiler (rust-vmm, pure Rust) was the first choice, but its 0.5 has no USER_NOTIF action
//! and builds one ABI per filter (kills i386 callers outright, and leaves x32 numbers to us).

use std::io::{Read as _, Seek as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use agent_monitor_common::AGENT_SOCKET_FAMILIES;
use libseccomp::{
    ScmpAction, ScmpArch, ScmpFilterContext, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags,
    ScmpSyscall, notify_id_valid, scmp_cmp,
};

use crate::control::{CaughtCall, CaughtReport as Caught, CaughtTarget};

/// Why the filter could not be built or put in place.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("building the seccomp filter ({what}): {source}")]
    Build {
        what: &'static str,
        source: libseccomp::error::SeccompError,
    },
    #[error("exporting the seccomp filter: {0}")]
    Export(std::io::Error),
    #[error("receiving the seccomp listener from the child: {0}")]
    Handshake(std::io::Error),
}

/// `seccomp(2)` operation and flag the filter looks at (linux/seccomp.h).
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 8;

/// ptrace(2) requests that make a new tracer relation (linux/ptrace.h); every other request acts
/// on a tracee the caller already has.
const PTRACE_ATTACH: u64 = 16;
const PTRACE_SEIZE: u64 = 0x4206;
/// The sign bit of a 32-bit pid argument: kill(2) with a negative pid signals a process group
/// (-1: everything the caller may signal), which the kernel and Landlock judge (module doc).
const PID_SIGN: u64 = 0x8000_0000;
/// perf_event_open(2) flag: the pid argument is a cgroup fd (needs CAP_PERFMON or a permissive
/// perf_event_paranoid: the kernel decides).
const PERF_FLAG_PID_CGROUP: u64 = 1 << 2;

/// setpriority(2)'s and ioprio_set(2)'s `which` for one process (linux/resource.h,
/// linux/ioprio.h); the other values name a process group or every process of a user.
const PRIO_PROCESS: u64 = 0;
const IOPRIO_WHO_PROCESS: u64 = 1;

/// ioctl(2) requests that put bytes into a terminal's input (asm-generic/ioctls.h): TIOCSTI,
/// TIOCLINUX.
const TERMINAL_INPUT_IOCTLS: [u64; 2] = [0x5412, 0x541C];
/// The half of a register the kernel reads for an `int` or `unsigned int` argument.
const INT_ARG: u64 = 0xffff_ffff;

/// Families above the highest one agents keep: all caught (future families included).
const FIRST_FAMILY_ABOVE: u64 = 17;

/// The filter program: in enforce mode foreign socket families, io_uring_setup, socketcall and
/// new listeners go to the listener; in alert mode foreign families pass the filter (the kernel
/// program on `sys_enter_socket` then reports them as alerts, like any agent's). `root_agent`:
/// the rules of a root agent's confinement are added (privileges.rs: clone3, bpf).
pub fn filter(enforce: bool, root_agent: bool) -> Result<Vec<libc::sock_filter>, SandboxError> {
    let build = |what| move |source| SandboxError::Build { what, source };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(build("context"))?;
    // Every ABI this machine runs (libseccomp knows their numbers); other ABIs: nothing to say.
    #[cfg(target_arch = "x86_64")]
    for arch in [ScmpArch::X86, ScmpArch::X32] {
        ctx.add_arch(arch).map_err(build("adding an ABI"))?;
    }
    #[cfg(target_arch = "aarch64")]
    ctx.add_arch(ScmpArch::Arm)
        .map_err(build("adding an ABI"))?;
    ctx.set_act_badarch(ScmpAction::Allow)
        .map_err(build("unknown ABIs"))?;
    let notify = ScmpAction::Notify;
    let syscall = |name| ScmpSyscall::from_name(name).map_err(build("syscall name"));
    if enforce {
        // libseccomp takes one comparison per argument and rule, and no rule may repeat the
        // default action: so the caught families are spelled as the complement of the kept ones
        // (64-bit compares: a value with high bits set is caught and judged by its low half).
        let socket = syscall("socket")?;
        for family in caught_families() {
            let cmp = match family {
                Families::One(f) => scmp_cmp!($arg0 == f),
                Families::From(f) => scmp_cmp!($arg0 >= f),
            };
            ctx.add_rule_conditional(notify, socket, &[cmp])
                .map_err(build("socket rule"))?;
        }
    }
    for name in ["io_uring_setup", "socketcall"] {
        ctx.add_rule(notify, syscall(name)?)
            .map_err(build("refused syscall rule"))?;
    }
    // Reaching another process, both modes (module doc). kill(2) only with a positive pid (or
    // 0, passed at once); ptrace(2) only when it makes a new tracer relation.
    for name in [
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "kcmp",
        "process_madvise",
        "tkill",
        "tgkill",
        "rt_sigqueueinfo",
        "rt_tgsigqueueinfo",
        "pidfd_send_signal",
    ] {
        ctx.add_rule(notify, syscall(name)?)
            .map_err(build("process reach rule"))?;
    }
    for request in [PTRACE_ATTACH, PTRACE_SEIZE] {
        ctx.add_rule_conditional(notify, syscall("ptrace")?, &[scmp_cmp!($arg0 == request)])
            .map_err(build("ptrace rule"))?;
    }
    ctx.add_rule_conditional(
        notify,
        syscall("kill")?,
        &[scmp_cmp!($arg0 & PID_SIGN == 0)],
    )
    .map_err(build("kill rule"))?;
    for (name, pid_arg) in [
        ("perf_event_open", 1),
        ("move_pages", 0),
        ("migrate_pages", 0),
        ("get_robust_list", 0),
    ] {
        let cmp = if pid_arg == 0 {
            scmp_cmp!($arg0 & PID_SIGN == 0)
        } else {
            scmp_cmp!($arg1 & PID_SIGN == 0)
        };
        ctx.add_rule_conditional(notify, syscall(name)?, &[cmp])
            .map_err(build("process reach rule"))?;
    }
    // Reading another process's limits is harmless; setting them (RLIMIT_NOFILE 0…) is not.
    ctx.add_rule_conditional(
        notify,
        syscall("prlimit64")?,
        &[scmp_cmp!($arg0 & PID_SIGN == 0), scmp_cmp!($arg2 != 0)],
    )
    .map_err(build("prlimit64 rule"))?;
    // Scheduling another process (nice, policy, CPUs, I/O class): like prlimit64, a same-uid
    // check (plus, in commoncap, no capabilities the caller lacks) and no Landlock scope, so an
    // agent could starve another agent's processes or its own uid's outside its task. Passed at
    // once for the caller itself (pid 0); group and user forms are judged by the supervisor.
    for name in [
        "sched_setaffinity",
        "sched_setscheduler",
        "sched_setparam",
        "sched_setattr",
    ] {
        ctx.add_rule_conditional(notify, syscall(name)?, &[scmp_cmp!($arg0 != 0)])
            .map_err(build("scheduling rule"))?;
    }
    for (name, own_process) in [
        ("setpriority", PRIO_PROCESS),
        ("ioprio_set", IOPRIO_WHO_PROCESS),
    ] {
        for cmp in [scmp_cmp!($arg0 != own_process), scmp_cmp!($arg1 != 0)] {
            ctx.add_rule_conditional(notify, syscall(name)?, &[cmp])
                .map_err(build("scheduling rule"))?;
        }
    }
    // Typing into the terminal: TIOCSTI pushes bytes into the input of the agent's controlling
    // terminal (where `run`'s caller, often a root shell, reads its next command once `run`
    // exits; dev.tty.legacy_tiocsti lets any process do it to its own terminal) and TIOCLINUX
    // pastes a virtual console's selection there. Refused in both modes. ioctl's command is an
    // unsigned int: the kernel reads the low half, so the compare does too.
    for request in TERMINAL_INPUT_IOCTLS {
        ctx.add_rule_conditional(
            notify,
            syscall("ioctl")?,
            &[scmp_cmp!($arg1 & INT_ARG == request)],
        )
        .map_err(build("terminal input rule"))?;
    }
    ctx.add_rule_conditional(
        notify,
        syscall("seccomp")?,
        &[
            scmp_cmp!($arg0 == SECCOMP_SET_MODE_FILTER),
            scmp_cmp!($arg1 & SECCOMP_FILTER_FLAG_NEW_LISTENER == SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ],
    )
    .map_err(build("seccomp listener rule"))?;
    if root_agent {
        crate::privileges::add_seccomp_rules(&mut ctx).map_err(build("root agent rules"))?;
    }
    export(&ctx)
}

/// Family values the enforce filter catches: one value, or every value from here on.
enum Families {
    One(u64),
    From(u64),
}

/// Every family value not in AGENT_SOCKET_FAMILIES, as single values and one open range.
fn caught_families() -> Vec<Families> {
    let kept = |f: u64| AGENT_SOCKET_FAMILIES.iter().any(|&k| u64::from(k) == f);
    let mut out: Vec<Families> = (0..FIRST_FAMILY_ABOVE)
        .filter(|&f| !kept(f))
        .map(Families::One)
        .collect();
    out.push(Families::From(FIRST_FAMILY_ABOVE));
    out
}

/// The compiled program, through a memfd (`seccomp_export_bpf_mem` needs libseccomp 2.6).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>, SandboxError> {
    // SAFETY: plain memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"agent-monitor-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(SandboxError::Export(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is ours.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    ctx.export_bpf(&file)
        .map_err(|e| SandboxError::Export(std::io::Error::other(e)))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(SandboxError::Export)?;
    let size = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 {
        return Err(SandboxError::Export(std::io::Error::other(format!(
            "libseccomp exported {} bytes, not a whole number of {size}-byte instructions",
            bytes.len()
        ))));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// Installs `program` on the calling thread with a new listener and sends the listener over
/// `to_parent` (SCM_RIGHTS), then closes it here: the agent never holds it. Async-signal-safe
/// (three system calls), so `run` calls it between fork and exec. Needs CAP_SYS_ADMIN (`run` is
/// root) or no_new_privs.
pub fn install(program: &[libc::sock_filter], to_parent: RawFd) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prog points at a live filter for the duration of the call; the kernel copies it.
    let listener = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if listener < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let listener = listener as RawFd;
    let sent = send_fd(to_parent, listener);
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(listener) };
    sent
}

/// A message of one data byte with room for one fd: the handshake's whole protocol. On the
/// stack, no allocation (the child sends between fork and exec). u64 words keep the control
/// buffer aligned for cmsghdr.
struct OneFdMessage {
    byte: [u8; 1],
    control: [u64; 4],
}

impl OneFdMessage {
    fn new() -> OneFdMessage {
        OneFdMessage {
            byte: [0],
            control: [0; 4],
        }
    }

    /// Runs `f` on a msghdr over our buffers, with `control_len` bytes of control room.
    fn with_header<R>(&mut self, control_len: usize, f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
        let mut iov = libc::iovec {
            iov_base: self.byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; all-zero is its empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = control_len.min(std::mem::size_of_val(&self.control));
        f(&mut msg)
    }
}

/// One fd over a unix socket (sendmsg with SCM_RIGHTS).
fn send_fd(sock: RawFd, fd: RawFd) -> std::io::Result<()> {
    // SAFETY: CMSG_SPACE/LEN of one int; constant arithmetic.
    let (space, len) = unsafe {
        let n = std::mem::size_of::<RawFd>() as u32;
        (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
    };
    OneFdMessage::new().with_header(space, |msg| {
        // SAFETY: the first cmsghdr and its data lie inside the control buffer (space bytes).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            if libc::sendmsg(sock, msg, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// The listener the child sent with [`install`]; call after the child exec'd.
pub fn receive_listener(sock: &UnixStream) -> Result<OwnedFd, SandboxError> {
    OneFdMessage::new().with_header(usize::MAX, |msg| {
        // SAFETY: the kernel fills at most msg_controllen bytes of our buffers; the cmsghdr is
        // checked before its data is read.
        unsafe {
            let n = libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                return Err(SandboxError::Handshake(std::io::Error::last_os_error()));
            }
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if n != 1
                || cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return Err(SandboxError::Handshake(std::io::Error::other(
                    "expected one byte carrying one fd (SCM_RIGHTS)",
                )));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            Ok(OwnedFd::from_raw_fd(fd))
        }
    })
}

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

/// Serves the listener until it fails for good: answers each caught call at once and hands it
/// to `report` (which may be slow: the agent is no longer waiting). `busy` is set from the moment
/// a call is taken until its report is handed over, so `run` can wait for the last report before
/// it exits (the agent may exit the instant it has its answer). Returns the reason it stopped.
pub fn supervise(
    listener: OwnedFd,
    enforce: bool,
    busy: &std::sync::atomic::AtomicBool,
    mut report: impl FnMut(Caught),
) -> String {
    use std::sync::atomic::Ordering;
    let fd = listener.as_raw_fd();
    let own = Supervisor::this_process();
    sync_wake_up(fd);
    loop {
        busy.store(false, Ordering::SeqCst);
        let req = match ScmpNotifReq::receive(fd) {
            Ok(r) => {
                busy.store(true, Ordering::SeqCst);
                r
            }
            Err(e) => {
                // libseccomp 2.5 reports every ioctl failure as ECANCELED; the ioctl's own errno
                // is still in errno. A signal to `run` (EINTR) or a caller that died while we
                // took its notification (ENOENT): next one.
                let os = std::io::Error::last_os_error();
                if matches!(os.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) {
                    continue;
                }
                return format!("reading the seccomp listener: {e} ({os})");
            }
        };
        let name = req
            .data
            .syscall
            .get_name_by_arch(req.data.arch)
            .unwrap_or_else(|_| format!("syscall {}", i32::from(req.data.syscall)));
        let answer = match decide(&name, &req.data.args, enforce) {
            Answer::Judge(reach) => judge(&own, req.pid, reach),
            other => other,
        };
        if answer == Answer::Pass {
            // Nothing to report: answer at once (a kill inside the agent waits only this long).
            let _ = ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()).respond(fd);
            continue;
        }
        // Read who called while it still waits in the kernel, then check it still does: the
        // pid was not reused under us.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", req.pid))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "?".into());
        let exe = std::fs::read_link(format!("/proc/{}/exe", req.pid))
            .ok()
            .map(|p| p.display().to_string());
        let uid = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(format!("/proc/{}", req.pid)).map_or(u32::MAX, |m| m.uid())
        };
        let alive = notify_id_valid(fd, req.id).is_ok();
        let (resp, caught) = match answer {
            Answer::Refuse(call) => (
                ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty()),
                Some((call, true)),
            ),
            Answer::Alert(call) => (
                ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()),
                Some((call, false)),
            ),
            Answer::Pass | Answer::Judge(_) => (
                ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()),
                None,
            ),
        };
        // A caller that died meanwhile cannot be answered (ENOENT); its call is still reported.
        let _ = resp.respond(fd);
        if let Some((call, refused)) = caught {
            report(Caught {
                pid: req.pid,
                call,
                refused,
                comm: if alive { comm } else { "?".into() },
                exe: exe.filter(|_| alive),
                uid: if alive { uid } else { u32::MAX },
            });
        }
    }
}

/// Asks the kernel to hand the CPU straight from a caller to this supervisor and back
/// (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6): a caught call that is let through (a signal
/// inside the agent) then costs a task switch, not two scheduler wake-ups. Older kernels refuse
/// the ioctl (EINVAL); the listener works the same, only slower.
fn sync_wake_up(listener: RawFd) {
    // SECCOMP_IOCTL_NOTIF_SET_FLAGS = _IOW('!', 4, __u64); libc 0.2 does not name it.
    const SECCOMP_IOCTL_NOTIF_SET_FLAGS: libc::c_ulong = 0x4008_2104;
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: an ioctl on our own listener fd with a plain integer argument.
    unsafe {
        libc::ioctl(
            listener,
            SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
}

/// What the supervisor knows about itself, for judging targets.
struct Supervisor {
    pid: u32,
    /// Our pid namespace (`pid:[inode]`): a caller in another one names pids in its own.
    pid_ns: Option<std::path::PathBuf>,
}

impl Supervisor {
    fn this_process() -> Supervisor {
        Supervisor {
            pid: std::process::id(),
            pid_ns: std::fs::read_link("/proc/self/ns/pid").ok(),
        }
    }

    /// `pid` is this process or one of its threads.
    fn is(&self, pid: u32) -> bool {
        pid == self.pid || std::path::Path::new(&format!("/proc/{}/task/{pid}", self.pid)).exists()
    }
}

/// Refuses `reach` if one of its targets is outside the caller's task (see [`outside`]), else
/// lets it run. Reads /proc while the caller waits; the caller is `caller` in our namespace.
fn judge(own: &Supervisor, caller: u32, reach: Reach) -> Answer {
    let caller_cgroup = read_cgroup(caller);
    let mut foreign_ns = None;
    for target in &reach.targets {
        let pid = match *target {
            TargetRef::Pid(p) if p <= 0 => continue,
            TargetRef::Pid(p) => {
                let other_ns = *foreign_ns.get_or_insert_with(|| {
                    std::fs::read_link(format!("/proc/{caller}/ns/pid")).ok() != own.pid_ns
                });
                if other_ns {
                    continue;
                }
                p as u32
            }
            TargetRef::Fd(f) => match pidfd_target(caller, f) {
                Some(p) => p,
                None => continue,
            },
        };
        // The fast path (a signal inside the agent) reads one cgroup file and, as `run` sits
        // in the task's cgroup, checks that the target is not `run`; the rest only to report.
        let cgroup = read_cgroup(pid);
        let supervisor = cgroup.is_some() && cgroup == caller_cgroup && own.is(pid);
        let target = CaughtTarget {
            pid,
            comm: String::new(),
            cgroup,
            uid: None,
            supervisor,
        };
        if outside(caller_cgroup.as_deref(), &target) {
            let target = CaughtTarget {
                comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_else(|_| "?".into()),
                uid: read_uid(pid),
                ..target
            };
            let syscall = reach.syscall;
            return Answer::Refuse(match reach.signal {
                Some(signal) => CaughtCall::Signal {
                    syscall,
                    signal,
                    target,
                },
                None => CaughtCall::ProcessAccess { syscall, target },
            });
        }
    }
    Answer::Pass
}

/// The cgroup v2 path of `pid` (`0::/path`).
fn read_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    crate::identity::peer::parse_cgroup_v2(&text)
}

/// The real uid of `pid`.
fn read_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The process behind fd `fd` of `caller`: a pidfd's `Pid:` in its fdinfo (in our namespace),
/// or a /proc/PID directory (pidfd_send_signal takes those too). None: not a process (the
/// kernel fails the call) or a process that is gone (-1).
fn pidfd_target(caller: u32, fd: i32) -> Option<u32> {
    if fd < 0 {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/{caller}/fdinfo/{fd}")).ok()?;
    if let Some(pid) = fdinfo_pid(&info) {
        return u32::try_from(pid).ok().filter(|&p| p > 0);
    }
    let link = std::fs::read_link(format!("/proc/{caller}/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("/proc/")?
        .parse::<u32>()
        .ok()
        .filter(|&p| p > 0)
}

/// The `Pid:` line of a pidfd's fdinfo (-1: the process is gone; 0: not in our namespace).
fn fdinfo_pid(info: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_families_are_the_libc_ones() {
        let libc_families = [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ];
        assert_eq!(AGENT_SOCKET_FAMILIES, libc_families.map(|f| f as u32));
    }

    #[test]
    fn caught_families_are_the_complement_of_the_kept_ones() {
        let caught = caught_families();
        for f in 0u64..200 {
            let hit = caught.iter().any(|c| match *c {
                Families::One(v) => v == f,
                Families::From(v) => f >= v,
            });
            let kept = AGENT_SOCKET_FAMILIES.contains(&(f as u32));
            assert_eq!(hit, !kept, "family {f}");
        }
    }

    #[test]
    fn filters_build_for_both_modes() {
        let enforce = filter(true, false).unwrap();
        let alert = filter(false, false).unwrap();
        // The enforce filter has the socket family rules on top.
        assert!(
            enforce.len() > alert.len(),
            "{} {}",
            enforce.len(),
            alert.len()
        );
    }

    #[test]
    fn decisions_follow_the_mode_and_never_pass_a_listener() {
        let vsock = [libc::AF_VSOCK as u64, 1, 0, 0, 0, 0];
        let want = CaughtCall::Socket {
            family: libc::AF_VSOCK as u32,
            sock_type: 1,
            protocol: 0,
        };
        assert_eq!(decide("socket", &vsock, true), Answer::Refuse(want.clone()));
        assert_eq!(decide("socket", &vsock, false), Answer::Alert(want));
        // High half set, unix in the low half: the kernel makes a unix socket.
        let junk = [(1u64 << 32) | 1, 1, 0, 0, 0, 0];
        assert_eq!(decide("socket", &junk, true), Answer::Pass);
        let uring = [4, 0, 0, 0, 0, 0];
        assert_eq!(
            decide("io_uring_setup", &uring, true),
            Answer::Refuse(CaughtCall::IoUringSetup)
        );
        assert_eq!(
            decide("io_uring_setup", &uring, false),
            Answer::Alert(CaughtCall::IoUringSetup)
        );
        for enforce in [true, false] {
            assert_eq!(
                decide("ioctl", &[0, (1u64 << 32) | 0x5412, 0, 0, 0, 0], enforce),
                Answer::Refuse(CaughtCall::Other {
                    name: "ioctl TIOCSTI".into()
                })
            );
            assert!(matches!(
                decide("setpriority", &[2, 0, 19, 0, 0, 0], enforce),
                Answer::Refuse(CaughtCall::Other { .. })
            ));
            assert_eq!(
                decide("setpriority", &[0, 77, 19, 0, 0, 0], enforce),
                Answer::Judge(Reach {
                    syscall: "setpriority".into(),
                    signal: None,
                    targets: vec![TargetRef::Pid(77)]
                })
            );
            assert_eq!(
                decide("sched_setaffinity", &[77, 8, 0, 0, 0, 0], enforce),
                Answer::Judge(Reach {
                    syscall: "sched_setaffinity".into(),
                    signal: None,
                    targets: vec![TargetRef::Pid(77)]
                })
            );
            assert_eq!(
                decide("seccomp", &[1, 8, 0, 0, 0, 0], enforce),
                Answer::Refuse(CaughtCall::SeccompListener)
            );
        }
    }

    #[test]
    fn process_reaching_calls_are_judged_in_both_modes() {
        for enforce in [true, false] {
            let kill = decide("kill", &[1234, 15, 0, 0, 0, 0], enforce);
            assert_eq!(
                kill,
                Answer::Judge(Reach {
                    syscall: "kill".into(),
                    signal: Some(15),
                    targets: vec![TargetRef::Pid(1234)],
                })
            );
        }
        let tgkill = decide("tgkill", &[10, 11, 9, 0, 0, 0], true);
        assert!(
            matches!(tgkill, Answer::Judge(Reach { signal: Some(9), ref targets, .. }) if *targets == [TargetRef::Pid(11)])
        );
        let ptrace = decide("ptrace", &[PTRACE_SEIZE, 77, 0, 0, 0, 0], true);
        assert!(
            matches!(ptrace, Answer::Judge(Reach { signal: None, ref targets, .. }) if *targets == [TargetRef::Pid(77)])
        );
        let getfd = decide("pidfd_getfd", &[5, 3, 0, 0, 0, 0], true);
        assert!(
            matches!(getfd, Answer::Judge(Reach { ref targets, .. }) if *targets == [TargetRef::Fd(5)])
        );
        let kcmp = decide("kcmp", &[1, 2, 0, 0, 0, 0], true);
        assert!(
            matches!(kcmp, Answer::Judge(Reach { ref targets, .. }) if *targets == [TargetRef::Pid(1), TargetRef::Pid(2)])
        );
        // A pid register with junk in the high half: the kernel reads the low half.
        let junk = decide("kill", &[(7u64 << 32) | 42, 0, 0, 0, 0, 0], true);
        assert!(
            matches!(junk, Answer::Judge(Reach { ref targets, .. }) if *targets == [TargetRef::Pid(42)])
        );
        // perf_event_open on a cgroup fd is the kernel's to judge.
        let cgroup = [0, 5, u64::MAX, u64::MAX, PERF_FLAG_PID_CGROUP, 0];
        assert_eq!(decide("perf_event_open", &cgroup, true), Answer::Pass);
    }

    #[test]
    fn only_targets_outside_the_callers_cgroup_are_outside() {
        let target = |cgroup: Option<&str>, supervisor| CaughtTarget {
            pid: 9,
            comm: "x".into(),
            cgroup: cgroup.map(str::to_string),
            uid: Some(65534),
            supervisor,
        };
        let own = Some("/agent-monitor/a/t");
        assert!(!outside(own, &target(own, false)));
        assert!(outside(own, &target(Some("/agent-monitor/b/t"), false)));
        assert!(outside(own, &target(Some("/agent-monitor/a/t2"), false)));
        assert!(outside(own, &target(Some("/user.slice"), false)));
        // `run` sits in the task's cgroup but outside the command's Landlock domain.
        assert!(outside(own, &target(own, true)));
        // Gone or unreadable: the kernel (and Landlock) decide.
        assert!(!outside(own, &target(None, false)));
        assert!(!outside(None, &target(Some("/user.slice"), false)));
    }

    #[test]
    fn pidfd_fdinfo_names_the_process() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(fdinfo_pid(info), Some(4242));
        assert_eq!(fdinfo_pid("pos:\t0\nPid:\t-1\n"), Some(-1));
        assert_eq!(fdinfo_pid("pos:\t0\nflags:\t0100000\n"), None);
        // A real pidfd of ours, through /proc.
        // SAFETY: plain pidfd_open of our own pid.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) } as i32;
        assert!(fd >= 0);
        assert_eq!(
            pidfd_target(std::process::id(), fd),
            Some(std::process::id())
        );
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
    }

    /// The real kernel, no root needed: a child under the filter may signal itself (passed at
    /// once) but not its supervisor (this test process: refused and reported as a signal).
    #[test]
    fn signals_to_the_supervisor_are_refused_and_reported() {
        let program = filter(true, false).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the child makes raw system calls only, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if install(&program, theirs.as_raw_fd()).is_err() {
                    libc::_exit(90);
                }
                let mut code = 0;
                if libc::kill(libc::getpid(), 0) == 0 {
                    code |= 1;
                }
                if libc::kill(parent, 0) < 0 && *libc::__errno_location() == libc::EPERM {
                    code |= 2;
                }
                libc::_exit(code);
            }
        }
        drop(theirs);
        let listener = receive_listener(&ours).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            supervise(listener, true, &Default::default(), |c| {
                seen2.lock().unwrap().push(c)
            })
        });
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 3, "self ok, supervisor EPERM");
        for _ in 0..100 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        match &seen[0].call {
            CaughtCall::Signal {
                syscall,
                signal,
                target,
            } => {
                assert_eq!((syscall.as_str(), *signal), ("kill", 0));
                assert_eq!(target.pid, parent as u32);
                assert!(target.supervisor);
            }
            other => panic!("{other:?}"),
        }
        assert!(seen[0].refused);
    }

    /// The real kernel, no root needed: a forked child takes the filter (no_new_privs), sends
    /// the listener, and tries each route while this process supervises.
    #[test]
    fn kernel_refuses_through_the_listener() {
        let program = filter(true, false).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        // SAFETY: the child makes raw system calls only, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if install(&program, theirs.as_raw_fd()).is_err() {
                    libc::_exit(90);
                }
                // Exit code: bit 0 unix ok, bit 1 vsock EPERM, bit 2 io_uring EPERM.
                let mut code = 0;
                let u = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if u >= 0 {
                    code |= 1;
                }
                let v = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0);
                if v < 0 && *libc::__errno_location() == libc::EPERM {
                    code |= 2;
                }
                let mut params = [0u8; 120];
                let r = libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr());
                if r < 0 && *libc::__errno_location() == libc::EPERM {
                    code |= 4;
                }
                libc::_exit(code);
            }
        }
        drop(theirs);
        let listener = receive_listener(&ours).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            supervise(listener, true, &Default::default(), |c| {
                seen2.lock().unwrap().push(c)
            })
        });
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(
            libc::WEXITSTATUS(status),
            7,
            "unix ok, vsock and io_uring EPERM"
        );
        // Reports follow the answers: give the last one a moment.
        for _ in 0..100 {
            if seen.lock().unwrap().len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().all(|c| c.refused && c.pid == pid as u32));
        assert!(matches!(
            seen[0].call,
            CaughtCall::Socket { family: 40, .. }
        ));
        assert_eq!(seen[1].call, CaughtCall::IoUringSetup);
    }
}
