//! The seccomp filter program, compiled by libseccomp for every ABI the host runs.

use std::io::{Read as _, Seek as _};
use std::os::fd::FromRawFd as _;

use agent_monitor_common::AGENT_SOCKET_FAMILIES;
use libseccomp::{ScmpAction, ScmpArch, ScmpFilterContext, ScmpSyscall, scmp_cmp};

use super::SandboxError;

/// `seccomp(2)` operation and flag the filter looks at (linux/seccomp.h).
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 8;

/// ptrace(2) requests that make a new tracer relation (linux/ptrace.h); every other request acts
/// on a tracee the caller already has.
const PTRACE_ATTACH: u64 = 16;
pub(super) const PTRACE_SEIZE: u64 = 0x4206;
/// The sign bit of a 32-bit pid argument: kill(2) with a negative pid signals a process group
/// (-1: everything the caller may signal), which the kernel and Landlock judge (module doc).
const PID_SIGN: u64 = 0x8000_0000;
/// perf_event_open(2) flag: the pid argument is a cgroup fd (needs CAP_PERFMON or a permissive
/// perf_event_paranoid: the kernel decides).
pub(super) const PERF_FLAG_PID_CGROUP: u64 = 1 << 2;

/// setpriority(2)'s and ioprio_set(2)'s `which` for one process (linux/resource.h,
/// linux/ioprio.h); the other values name a process group or every process of a user.
pub(super) const PRIO_PROCESS: u64 = 0;
pub(super) const IOPRIO_WHO_PROCESS: u64 = 1;

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
    program(enforce, root_agent, None)
}

/// The filter program of an ask-mode agent: the enforce filter, plus the calls `run` holds
/// while the daemon decides (held.rs): connect, sendto with an address, sendmsg, sendmmsg,
/// execve and execveat. Only ask-mode agents pay for these rules.
/// `handshake` is the child's end of the socket the listener is sent over ([`super::install`]'s
/// `to_parent`): its sendmsg is not held (nobody could answer it yet). The fd is close-on-exec;
/// an agent socket that later gets the same number sends unasked, and the kernel's sendmsg hook
/// judges it (off the list: refused, as in enforce mode).
pub fn ask_filter(
    root_agent: bool,
    handshake: std::os::fd::RawFd,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
    program(true, root_agent, Some(handshake as u64))
}

/// The enforce filter of an agent whose policy has `[unix]`: connect() goes to the listener too,
/// where the supervisor judges a pathname unix connect on the socket it resolves to
/// (unix_connect.rs). Only these agents pay for the rule.
/// `handshake`: as for [`ask_filter`]; named datagram sends go to the listener too
/// (unix_send.rs).
pub fn unix_filter(
    root_agent: bool,
    handshake: std::os::fd::RawFd,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
    program_with(true, root_agent, None, true, Some(handshake as u64))
}

/// [`unix_filter`] for an agent in alert mode: the alert filter, plus connect() to the listener,
/// where the supervisor judges a pathname unix connect on the socket it resolves to, connects
/// it whatever the verdict and reports one off the list (unix_connect.rs).
pub fn unix_alert_filter(root_agent: bool) -> Result<Vec<libc::sock_filter>, SandboxError> {
    program_with(false, root_agent, None, true, None)
}

fn program(
    enforce: bool,
    root_agent: bool,
    ask: Option<u64>,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
    program_with(enforce, root_agent, ask, false, None)
}

fn program_with(
    enforce: bool,
    root_agent: bool,
    ask: Option<u64>,
    trap_connect: bool,
    unix_sends: Option<u64>,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
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
    if let Some(handshake) = ask {
        // The address of connect, sendmsg and sendmmsg is in user memory, out of the filter's
        // reach: every call goes to the listener, which lets a unix socket's or a connected
        // socket's send continue at once. sendto names its address in a register: without one
        // (a connected socket's send, the common case) it stays off the listener.
        for name in ["connect", "sendmmsg", "execve", "execveat"] {
            ctx.add_rule(notify, syscall(name)?)
                .map_err(build("held call rule"))?;
        }
        ctx.add_rule_conditional(
            notify,
            syscall("sendmsg")?,
            &[scmp_cmp!($arg0 != handshake)],
        )
        .map_err(build("held sendmsg rule"))?;
        ctx.add_rule_conditional(notify, syscall("sendto")?, &[scmp_cmp!($arg4 != 0)])
            .map_err(build("held sendto rule"))?;
    } else if trap_connect {
        ctx.add_rule(notify, syscall("connect")?)
            .map_err(build("unix connect rule"))?;
        if let Some(handshake) = unix_sends {
            super::unix_send::add_send_rules(&mut ctx, handshake)
                .map_err(build("unix send rule"))?;
        }
    }
    export(&ctx)
}

/// Family values the enforce filter catches: one value, or every value from here on.
pub(super) enum Families {
    One(u64),
    From(u64),
}

/// Every family value not in AGENT_SOCKET_FAMILIES, as single values and one open range.
pub(super) fn caught_families() -> Vec<Families> {
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
