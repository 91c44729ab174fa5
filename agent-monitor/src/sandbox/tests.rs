use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;

use agent_monitor_common::AGENT_SOCKET_FAMILIES;

use super::decide::{Answer, Reach, TargetRef, decide, outside};
use super::filter::{Families, PERF_FLAG_PID_CGROUP, PTRACE_SEIZE, caught_families};
use super::supervisor::{fdinfo_pid, pidfd_target};
use super::{filter, install, receive_listener, supervise};
use crate::control::{CaughtCall, CaughtReport, CaughtTarget};

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
    let (code, seen) = supervise_child(&ours, pid, 1);
    assert_eq!(code, 3, "self ok, supervisor EPERM");
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
    let (code, seen) = supervise_child(&ours, pid, 2);
    assert_eq!(code, 7, "unix ok, vsock and io_uring EPERM");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|c| c.refused && c.pid == pid as u32));
    assert!(matches!(
        seen[0].call,
        CaughtCall::Socket { family: 40, .. }
    ));
    assert_eq!(seen[1].call, CaughtCall::IoUringSetup);
}

/// Supervises the filtered child `pid` (its listener arrives on `ours`) until it exits; returns
/// its exit code and the calls reported, waiting up to 1 s for `want` of them (reports follow the
/// answers).
fn supervise_child(ours: &UnixStream, pid: libc::pid_t, want: usize) -> (i32, Vec<CaughtReport>) {
    let listener = receive_listener(ours).unwrap();
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
    for _ in 0..100 {
        if seen.lock().unwrap().len() >= want {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let seen = seen.lock().unwrap().clone();
    (libc::WEXITSTATUS(status), seen)
}
