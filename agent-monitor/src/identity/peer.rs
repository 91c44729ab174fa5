//! Who is calling on the control socket: the kernel's SO_PEERCRED (pid, uid, gid), the caller's
//! supplementary groups and cgroup from /proc. Never what the request claims.

/// A control-socket peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`Groups:` of /proc/PID/status).
    pub groups: Vec<u32>,
    /// cgroup v2 path (the `0::` line of /proc/PID/cgroup), e.g. `/agent-monitor/coder/t1`.
    pub cgroup: Option<String>,
}

impl Peer {
    /// Completes SO_PEERCRED with /proc. A peer whose /proc vanished keeps no groups and no cgroup.
    pub fn from_cred(pid: u32, uid: u32, gid: u32) -> Peer {
        use crate::identity::procfs;
        Peer {
            pid,
            uid,
            gid,
            groups: procfs::credentials(pid)
                .map(|c| c.groups)
                .unwrap_or_default(),
            cgroup: procfs::cgroup_v2(pid),
        }
    }

    /// Root, or a member of `admin_gid` (primary or supplementary).
    pub fn is_admin(&self, admin_gid: Option<u32>) -> bool {
        self.uid == 0 || admin_gid.is_some_and(|g| self.gid == g || self.groups.contains(&g))
    }
}

/// A pidfd of the process at the other end of control connection `socket` (SO_PEERPIDFD, Linux
/// 6.5): it names the process that connected, never a later process that reuses its pid.
pub fn peer_pidfd(socket: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let r = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if r < 0 || fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` still runs (not exited, not a zombie): only then is what
/// /proc said about its pid, read before this check, about that process. A caller that connects
/// and exits, leaving the connection to a descendant, would otherwise be read as a pid without
/// /proc, i.e. no agent's.
pub fn still_running(pidfd: &std::os::fd::OwnedFd, pid: u32) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: signal 0 on a pidfd we own: a permission and existence check, nothing sent.
    let alive = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    } == 0;
    // A zombie still takes signal 0 and keeps its pid, but its cgroup is no longer its own.
    alive && crate::identity::procfs::running(pid)
}

pub fn parse_cgroup_v2(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// `(agent, task)` when `cgroup` is one of agent-monitor's own (agent, task) cgroups.
pub fn run_cgroup_identity(cgroup: &str) -> Option<(&str, &str)> {
    let rest = cgroup.strip_prefix(crate::policy::selectors::RESERVED_CGROUP)?;
    let mut parts = rest.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(t), None) if !a.is_empty() && !t.is_empty() => Some((a, t)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        assert_eq!(
            parse_cgroup_v2("9:name=systemd:/\n0::/agent-monitor/coder/t1\n").as_deref(),
            Some("/agent-monitor/coder/t1")
        );
        assert_eq!(
            run_cgroup_identity("/agent-monitor/coder/t1"),
            Some(("coder", "t1"))
        );
        assert_eq!(run_cgroup_identity("/agent-monitor/coder"), None);
        assert_eq!(run_cgroup_identity("/agent-monitorx/a/b"), None);
        assert_eq!(run_cgroup_identity("/system.slice/x"), None);
    }

    #[test]
    fn admin_is_root_or_group_member() {
        let p = |uid, gid, groups: Vec<u32>| Peer {
            pid: 1,
            uid,
            gid,
            groups,
            cgroup: None,
        };
        assert!(p(0, 0, vec![]).is_admin(None));
        assert!(!p(1000, 1000, vec![]).is_admin(None));
        assert!(p(1000, 1000, vec![50]).is_admin(Some(50)));
        assert!(p(1000, 50, vec![]).is_admin(Some(50)));
        assert!(!p(1000, 1000, vec![51]).is_admin(Some(50)));
    }
}
