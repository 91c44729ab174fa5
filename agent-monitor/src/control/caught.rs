//! Reports `run` sends about the system calls its seccomp supervisor caught.

use serde::{Deserialize, Serialize};

/// A caught call as `run` answered it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaughtReport {
    pub pid: u32,
    pub call: CaughtCall,
    /// Failed with EPERM; else it ran (alert mode).
    pub refused: bool,
    pub comm: String,
    pub exe: Option<String>,
    /// Effective uid (owner of /proc/PID).
    pub uid: u32,
}

/// A system call the `run` filter caught (see sandbox.rs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "call", rename_all = "snake_case", deny_unknown_fields)]
pub enum CaughtCall {
    /// socket(2) of a family agents may not have.
    Socket {
        family: u32,
        sock_type: u32,
        protocol: u32,
    },
    /// i386 socketcall(2), operation `op`.
    Socketcall {
        op: u32,
    },
    IoUringSetup,
    /// seccomp(2) asking for a notification listener.
    SeccompListener,
    /// A call that reaches into another process (ptrace attach or seize, process_vm_readv or
    /// writev, pidfd_getfd, kcmp, process_madvise, perf_event_open, move_pages, migrate_pages,
    /// get_robust_list, prlimit64 setting limits, setpriority, ioprio_set, sched_setaffinity,
    /// sched_setscheduler, sched_setparam, sched_setattr), aimed outside the caller's task.
    /// Always refused.
    ProcessAccess {
        syscall: String,
        target: CaughtTarget,
    },
    /// A signal (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo, pidfd_send_signal)
    /// aimed outside the caller's task. Always refused.
    Signal {
        syscall: String,
        signal: u32,
        target: CaughtTarget,
    },
    /// bpf(2) from a root agent (pinned maps open by file permission alone).
    Bpf,
    /// Anything else the filter sends (should not happen).
    Other {
        name: String,
    },
    /// A connect to a pathname unix socket, judged by the supervisor on the socket the name
    /// resolves to in the caller's view (sandbox/unix_connect.rs). `path`: the name the caller
    /// gave; `resolved`: where it led (the host's name of that socket, when known).
    UnixConnect {
        path: String,
        resolved: Option<String>,
        sock_type: String,
        reason: String,
        /// Allowed by the rules (reported as `allowed`, like the kernel hook's allowed
        /// connects); else refused.
        #[serde(default)]
        allowed: bool,
        /// A datagram sent to the named socket (sendto/sendmsg, `ACTION=sendmsg`), not a
        /// connect (sandbox/unix_send.rs).
        #[serde(default)]
        send: bool,
    },
}

/// The process a caught call aimed at, as `run` read it while the call waited. The daemon
/// names the agent it belongs to (if any) from these, not from the pid alone, which may be
/// reused by the time the report arrives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaughtTarget {
    /// In `run`'s (the host's) pid namespace; 0 if it could not be named.
    pub pid: u32,
    pub comm: String,
    /// Its cgroup v2 path (`/agent-monitor/coder/t1`), if it could be read.
    pub cgroup: Option<String>,
    /// Its real uid, if it could be read.
    pub uid: Option<u32>,
    /// It is this `agent-monitor run` itself (the agent's seccomp supervisor).
    #[serde(default)]
    pub supervisor: bool,
}

/// An agent's `[unix]` section as the daemon tells `run` at placement, so its supervisor can
/// judge connects on the socket a name resolves to (docs/unix-sockets.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnixSection {
    /// `allow = [...]` (pathnames and `@abstract` names); None: no allow list.
    pub allow: Option<Vec<String>>,
    pub deny_known_daemons: bool,
}
