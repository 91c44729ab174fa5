//! The supervisor loop in `run`: reads caught calls from the listener, answers them, reports them.

use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};

use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags, notify_id_valid};

use super::decide::{Answer, Reach, TargetRef, decide, outside};
use crate::control::{CaughtCall, CaughtReport as Caught, CaughtTarget};

/// Why the supervisor loop stopped: reading the listener failed for good. libseccomp's error and
/// the ioctl's own errno are both part of the message.
#[derive(Debug, thiserror::Error)]
#[error("reading the seccomp listener: {reason} ({errno})")]
pub struct ListenerFailed {
    pub(super) reason: libseccomp::error::SeccompError,
    pub(super) errno: std::io::Error,
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
) -> ListenerFailed {
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
                return ListenerFailed {
                    reason: e,
                    errno: os,
                };
            }
        };
        answer_caught(fd, &own, req, enforce, &mut report);
    }
}

/// Answers one caught call that is not held (the enforce and alert rules) and reports it.
pub(super) fn answer_caught(
    fd: RawFd,
    own: &Supervisor,
    req: ScmpNotifReq,
    enforce: bool,
    report: &mut impl FnMut(Caught),
) {
    let name = req
        .data
        .syscall
        .get_name_by_arch(req.data.arch)
        .unwrap_or_else(|_| format!("syscall {}", i32::from(req.data.syscall)));
    // Trapped only for agents with `[unix]`: a pathname unix connect is judged and answered
    // there; every other connect runs (the kernel's hooks judge it).
    if name == "connect" {
        if !super::unix_connect::take(fd, &req, report) {
            let _ = ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()).respond(fd);
        }
        return;
    }
    // Trapped only for agents with `[unix]` (unix_send.rs): a named datagram send to a pathname
    // unix socket is judged there; every other send continues.
    if matches!(name.as_str(), "sendto" | "sendmsg" | "sendmmsg") {
        if !super::unix_send::take(fd, &req, report) {
            let _ = ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()).respond(fd);
        }
        return;
    }
    let answer = match decide(&name, &req.data.args, enforce) {
        Answer::Judge(reach) => judge(own, req.pid, reach),
        other => other,
    };
    if answer == Answer::Pass {
        // Nothing to report: answer at once (a kill inside the agent waits only this long).
        let _ = ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty()).respond(fd);
        return;
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

/// Asks the kernel to hand the CPU straight from a caller to this supervisor and back
/// (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6): a caught call that is let through (a signal
/// inside the agent) then costs a task switch, not two scheduler wake-ups. Older kernels refuse
/// the ioctl (EINVAL); the listener works the same, only slower.
pub(super) fn sync_wake_up(listener: RawFd) {
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
pub(super) struct Supervisor {
    pid: u32,
    /// Our pid namespace (`pid:[inode]`): a caller in another one names pids in its own.
    pid_ns: Option<std::path::PathBuf>,
}

impl Supervisor {
    pub(super) fn this_process() -> Supervisor {
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
pub(super) fn pidfd_target(caller: u32, fd: i32) -> Option<u32> {
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
pub(super) fn fdinfo_pid(info: &str) -> Option<i64> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()
}
