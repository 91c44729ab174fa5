//! Scoping `run`'s agent command to its own processes: a Landlock domain (ABI 6+) with
//! `scoped = LANDLOCK_SCOPE_SIGNAL | LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`.
//!
//! What the domain refuses, in the kernel, for every process of the command (the domain is
//! inherited by every descendant and cannot be left):
//! - every ptrace access check on a process outside the domain: ptrace attach/seize,
//!   process_vm_readv/writev, pidfd_getfd, kcmp, and the /proc/PID files that are gated by it
//!   (mem, environ, fd/, fdinfo/, maps, auxv, …). Any Landlock domain does this, scopes or not;
//! - signals to processes outside the domain (`LANDLOCK_SCOPE_SIGNAL`: kill, tkill, tgkill,
//!   rt_*sigqueueinfo, pidfd_send_signal, and SIGIO/SIGURG set up through fcntl(F_SETOWN));
//! - connecting to abstract unix sockets created outside the domain
//!   (`LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`: a service's abstract socket is one more way to hand
//!   work to a process outside the agent).
//!
//! `run` itself stays outside the domain: it is the seccomp supervisor (sandbox.rs), which the
//! agent therefore cannot trace or signal either.
//!
//! Landlock's refusals are silent (its audit records need the audit subsystem, which would put
//! every system call on the host on the slow path): the reports come from the seccomp filter,
//! whose supervisor refuses and reports calls aimed outside the agent before Landlock is asked.
//!
//! No filesystem or network access is handled here: this domain restricts only processes and
//! abstract sockets. `landlock_restrict_self` needs no_new_privs or CAP_SYS_ADMIN; `run` is root
//! when its child makes the call.

use landlock::{
    CompatLevel, Compatible as _, RulesetAttr as _, RulesetCreated, RulesetCreatedAttr as _, Scope,
};

/// A Landlock ruleset prepared in `run` before the fork, applied in the child.
pub struct ProcessScope(RulesetCreated);

/// Why the command could not be scoped, said once on `run`'s stderr and to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unscoped(pub String);

impl ProcessScope {
    /// Builds the ruleset (one landlock_create_ruleset call). Fails, with the reason in words,
    /// where the kernel lacks Landlock or its ABI 6 scopes.
    pub fn prepare() -> Result<ProcessScope, Unscoped> {
        let created = landlock::Ruleset::default()
            // All or nothing: a domain without the signal scope would look scoped and not be.
            .set_compatibility(CompatLevel::HardRequirement)
            .scope(Scope::Signal | Scope::AbstractUnixSocket)
            .and_then(|r| r.create())
            .map_err(|e| Unscoped(format!("{} ({e})", kernel_support())))?
            // no_new_privs is not ours to set here (root may make the call without it).
            .no_new_privs(false);
        Ok(ProcessScope(created))
    }

    /// Puts the calling process in the domain. Called between fork and exec in a
    /// single-threaded `run` (the supervisor threads start after the spawn): one
    /// landlock_restrict_self call on a ruleset fd made before the fork.
    pub fn enter(self) -> std::io::Result<()> {
        self.0
            .restrict_self()
            .map(|_| ())
            .map_err(std::io::Error::other)
    }
}

/// The kernel's Landlock support, in words, for the message that says why scoping is off.
fn kernel_support() -> String {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute pointer and creates nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi >= 0 {
        return format!(
            "this kernel has Landlock ABI {abi}; process scoping needs ABI 6 (Linux 6.12)"
        );
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            "Landlock is built into this kernel but not enabled (add it to the lsm= boot \
             parameter)"
                .to_string()
        }
        _ => "this kernel has no Landlock".to_string(),
    }
}

/// Agents that policy `[identity]` selects by unit, cgroup or executable: they start outside
/// `run`, so they get neither its Landlock domain nor its seccomp reports, and another process
/// of their uid is within their reach (no Yama here). A uid selector is the remedy (every
/// process of that uid is then the agent), or starting the program with `agent-monitor run`.
/// Pure: one warning per such policy, at its first such selector.
pub fn selector_warnings(set: &crate::policy::PolicySet) -> Vec<String> {
    let mut out = Vec::new();
    for policy in set {
        let s = policy.selectors();
        let first = s
            .systemd_units
            .iter()
            .map(|u| (&u.at, format!("systemd unit {:?}", u.value)))
            .chain(
                s.cgroups
                    .iter()
                    .map(|c| (&c.at, format!("cgroup {:?}", c.value))),
            )
            .chain(
                s.executables
                    .iter()
                    .map(|e| (&e.at, format!("executable {:?}", e.value.path))),
            )
            .min_by_key(|(at, _)| at.line_col);
        let Some((at, what)) = first else { continue };
        if !s.uids.is_empty() {
            continue;
        }
        out.push(format!(
            "{at}: warning: agent {} selected by {what} is not scoped to its own processes \
             (only `agent-monitor run` gives a Landlock domain): it can trace, read and signal \
             every process of its uid. Give it a dedicated uid and select that (`uids = [...]`), \
             or start it with `agent-monitor run --agent {} --user USER -- ...`",
            policy.agent(),
            policy.agent()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_agents_without_a_uid_selector_are_warned_about() {
        let sum = "0".repeat(64);
        let parse = |text: &str| {
            crate::policy::Policy::parse(text, std::path::Path::new("a.toml")).unwrap()
        };
        let unit = parse("agent = \"a\"\n[identity]\nsystemd_units = [\"a.service\"]\n");
        let exe = parse(&format!(
            "agent = \"b\"\n[identity]\nexecutables = [{{ path = \"/opt/b\", sha256 = \"{sum}\" }}]\n"
        ));
        let by_uid = parse("agent = \"c\"\n[identity]\nuids = [1001]\ncgroups = [\"/c\"]\n");
        let plain = parse("agent = \"d\"\n");
        let set = crate::policy::PolicySet::new(vec![unit, exe, by_uid, plain]).unwrap();
        let w = selector_warnings(&set);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("a.toml:3:"), "{}", w[0]);
        assert!(w[0].contains("agent a selected by systemd unit \"a.service\""));
        assert!(w[1].contains("agent b selected by executable \"/opt/b\""));
    }

    /// The real kernel (ABI 7 here), no root needed: a forked child that enters the scope
    /// (with no_new_privs, as an unprivileged caller must) can no longer signal its parent,
    /// but can still signal itself.
    #[test]
    fn scoped_child_cannot_signal_outside_its_domain() {
        let scope = match ProcessScope::prepare() {
            Ok(s) => s,
            Err(Unscoped(why)) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the child makes raw system calls only, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if scope.enter().is_err() {
                    libc::_exit(90);
                }
                // Signal 0: the permission check without a signal.
                let mut code = 0;
                if libc::kill(parent, 0) < 0 && *libc::__errno_location() == libc::EPERM {
                    code |= 1;
                }
                if libc::kill(libc::getpid(), 0) == 0 {
                    code |= 2;
                }
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(
            libc::WEXITSTATUS(status),
            3,
            "outside EPERM, own process allowed"
        );
    }
}
