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
//! is always refused. A filter of the agent's without a listener answers ENOSYS; ERRNO, TRAP and
//! KILL are stricter than ours and refuse too: no stacking lets a caught call through.
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

use crate::control::{CaughtCall, CaughtReport as Caught};

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
}

/// The decision for system call `name` with `args`, for an agent in enforce mode or not.
/// Pure: the supervisor's whole policy.
pub fn decide(name: &str, args: &[u64; 6], enforce: bool) -> Answer {
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
        // Our own integrity: see the module doc. Refused in both modes.
        "seccomp" => return Answer::Refuse(CaughtCall::SeccompListener),
        // Only root agents' filters catch it (privileges.rs); refused in both modes.
        "bpf" => return Answer::Refuse(CaughtCall::Bpf),
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
/// to `report` (which may be slow: the agent is no longer waiting). Returns the reason it stopped.
pub fn supervise(listener: OwnedFd, enforce: bool, mut report: impl FnMut(Caught)) -> String {
    let fd = listener.as_raw_fd();
    loop {
        let req = match ScmpNotifReq::receive(fd) {
            Ok(r) => r,
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
        let answer = decide(&name, &req.data.args, enforce);
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
            Answer::Pass => (
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
                decide("seccomp", &[1, 8, 0, 0, 0, 0], enforce),
                Answer::Refuse(CaughtCall::SeccompListener)
            );
        }
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
        std::thread::spawn(move || supervise(listener, true, |c| seen2.lock().unwrap().push(c)));
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
