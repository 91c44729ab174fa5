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

mod arguments;
mod ask_channel;
mod ask_supervisor;
#[cfg(test)]
mod ask_tests;
mod caught_channel;
mod decide;
mod filter;
mod held;
mod holds;
mod listener;
mod local_allowlist;
mod supervisor;
#[cfg(test)]
mod tests;
mod unix_ask;
mod unix_connect;
mod unix_connector;
mod unix_judge;
mod unix_message;
mod unix_send;

pub use ask_channel::AskChannel;
pub use ask_supervisor::supervise_asking;
pub use caught_channel::CaughtReporter;
pub use filter::unix_alert_filter;
pub use filter::{ask_filter, filter, unix_filter};
pub use listener::{install, receive_listener};
pub use supervisor::supervise;
pub use unix_connect::arm_for_mode as arm_unix_for_mode;
pub use unix_connect::{armed as unix_armed, unix_section, unix_sock_type};
pub use unix_connector::UnixConnector;

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
