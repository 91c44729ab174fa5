//! The connector: a process `run` forks before it is placed, so it is outside every agent, that
//! resolves a name in a caller's view and connects the caller's socket on its behalf
//! (unix_connect.rs says why and when). One job at a time over a SOCK_SEQPACKET pair: a JSON
//! [`Job`] with the caller's socket, root and cwd (SCM_RIGHTS), a JSON [`Reply`] back.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use super::unix_connect::open_dir;
use super::unix_judge::{AgentCredentials, IdentityRule, SocketIdentity};

/// `run`'s end of the connector process.
pub struct UnixConnector {
    /// SOCK_SEQPACKET: one job, one reply.
    channel: OwnedFd,
}

impl UnixConnector {
    /// Forks the connector. Call before `run` is placed (it must stay outside the agent), while
    /// `run` has one thread. It ends when `run` does (PR_SET_PDEATHSIG and the channel's EOF).
    pub fn spawn() -> std::io::Result<UnixConnector> {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fds, owned at once.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are ours.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: `run` has one thread here (before placement, before any supervisor thread),
        // so the child may run ordinary code.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                drop(ours);
                // SAFETY: prctl with integer arguments; getppid has none.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != parent {
                        libc::_exit(0);
                    }
                }
                serve(theirs);
                // SAFETY: leave without running `run`'s exit path (atexit, buffers) twice.
                unsafe { libc::_exit(0) }
            }
            _ => Ok(UnixConnector { channel: ours }),
        }
    }

    /// Sends one job with its descriptors and waits for the reply.
    pub(super) fn ask(&self, job: &Job, fds: &[RawFd]) -> std::io::Result<Reply> {
        self.ask_for_fds(job, fds).map(|(reply, _)| reply)
    }

    /// [`ask`](Self::ask), also returning the descriptors the reply carries (the resolved
    /// socket of an [`Outcome::Held`] reply).
    pub(super) fn ask_for_fds(
        &self,
        job: &Job,
        fds: &[RawFd],
    ) -> std::io::Result<(Reply, Vec<OwnedFd>)> {
        let bytes = serde_json::to_vec(job).map_err(std::io::Error::other)?;
        send_with_fds(self.channel.as_raw_fd(), &bytes, fds)?;
        let mut buf = vec![0u8; 4096];
        let (n, got) = recv_with_fds(self.channel.as_raw_fd(), &mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("the connector process is gone"));
        }
        let reply = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
        Ok((reply, got))
    }
}

/// What `run` asks of the connector: resolve `name` in the caller's view as `credentials`, judge
/// it by `rule`, connect on allow; a socket off the rule is handled as `off_list` says.
/// Descriptors: the caller's socket, root, cwd. With `connect_held`, the descriptors are the
/// caller's socket and the socket an earlier [`Outcome::Held`] reply handed back: connect to
/// that, no lookup (`name` and `rule` are unused).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Job {
    pub(super) name: Vec<u8>,
    pub(super) credentials: AgentCredentials,
    pub(super) rule: IdentityRule,
    #[serde(default)]
    pub(super) off_list: OffList,
    #[serde(default)]
    pub(super) connect_held: bool,
    /// A named datagram send to make instead of the connect (unix_send.rs).
    #[serde(default)]
    pub(super) send: Option<super::unix_send::SendJob>,
}

/// What the connector does with a resolved socket the rule does not permit, by the agent's mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum OffList {
    /// Enforce: refuse ([`Outcome::Refused`]).
    #[default]
    Refuse,
    /// Alert: connect anyway; the reply says it was off the list (`alerted`).
    Report,
    /// Ask: hand the resolved socket (an O_PATH descriptor) back with an [`Outcome::Held`]
    /// reply; `run` holds the call and, if approved, connects to that very descriptor.
    Hold,
}

/// What came of a job.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Reply {
    pub(super) outcome: Outcome,
    /// The resolved socket passed the rules (whatever the connect then returned).
    #[serde(default)]
    pub(super) allowed: bool,
    /// The socket the name led to, as the host names it (`/proc/self/fd/N`'s link).
    pub(super) resolved: Option<String>,
    /// The resolved socket was off the rule and connected anyway (alert mode).
    #[serde(default)]
    pub(super) alerted: bool,
    /// The resolved socket's identity, when the name led to a socket.
    #[serde(default)]
    pub(super) identity: Option<SocketIdentity>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum Outcome {
    /// Connected: the call returns 0.
    Connected,
    /// Sent this many bytes (a named datagram send): the call returns it.
    Sent(usize),
    /// The lookup or the connect failed with this errno, as the caller's own call would have.
    Failed(i32),
    /// The resolved socket is not allowed: EPERM, reported.
    Refused,
    /// The resolved socket is not allowed and the job said [`OffList::Hold`]: its O_PATH
    /// descriptor comes with the reply; nothing was connected.
    Held,
}

/// The connector's loop: one job at a time until `run` closes the channel.
fn serve(channel: OwnedFd) {
    let (Some(own_root), Some(own_cwd)) = (open_dir("/"), open_dir(".")) else {
        eprintln!("agent-monitor run: unix connector: cannot open its own root and cwd");
        return;
    };
    let own_groups = groups();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, fds) = match recv_with_fds(channel.as_raw_fd(), &mut buf) {
            Ok((0, _)) => return,
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut hand_back = None;
        let reply = match (serde_json::from_slice::<Job>(&buf[..n]), fds.as_slice()) {
            (Ok(job), [sock, target]) if job.connect_held => {
                let home = Home {
                    root: &own_root,
                    cwd: &own_cwd,
                    groups: &own_groups,
                };
                connect_held(&job, sock, target, &home)
            }
            (Ok(job), [sock, root, cwd, extra @ ..]) if !job.connect_held => {
                let home = Home {
                    root: &own_root,
                    cwd: &own_cwd,
                    groups: &own_groups,
                };
                let (reply, target) = run_job(&job, sock, root, cwd, extra, &home);
                hand_back = target;
                reply
            }
            // A job `run` did not send whole: fail it closed.
            _ => Reply {
                outcome: Outcome::Refused,
                allowed: false,
                resolved: None,
                alerted: false,
                identity: None,
            },
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        let fds: Vec<RawFd> = hand_back.iter().map(|f| f.as_raw_fd()).collect();
        if send_with_fds(channel.as_raw_fd(), &bytes, &fds).is_err() {
            return;
        }
    }
}

/// Where the connector returns to after each job.
struct Home<'a> {
    root: &'a OwnedFd,
    cwd: &'a OwnedFd,
    groups: &'a [libc::gid_t],
}

/// Resolves and judges one job; the descriptor to hand back with an [`Outcome::Held`] reply.
fn run_job(
    job: &Job,
    sock: &OwnedFd,
    root: &OwnedFd,
    cwd: &OwnedFd,
    extra: &[OwnedFd],
    home: &Home,
) -> (Reply, Option<OwnedFd>) {
    let failed = |errno| {
        (
            Reply {
                outcome: Outcome::Failed(errno),
                allowed: false,
                resolved: None,
                alerted: false,
                identity: None,
            },
            None,
        )
    };
    // Into the caller's view: its root (chroot, as its own lookups have it), its cwd.
    if let Err(e) = enter(root, cwd) {
        leave_or_die(home);
        return failed(e.raw_os_error().unwrap_or(libc::EPERM));
    }
    let opened = as_caller(&job.credentials, home, || open_path(&job.name));
    leave_or_die(home);
    let target = match opened {
        Ok(fd) => fd,
        Err(e) => return failed(e.raw_os_error().unwrap_or(libc::EPERM)),
    };
    // SAFETY: fstat into a zeroed stat of our own fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(target.as_raw_fd(), &mut st) } < 0 {
        return failed(libc::EPERM);
    }
    let link = format!("/proc/self/fd/{}", target.as_raw_fd());
    let resolved = std::fs::read_link(&link)
        .ok()
        .map(|p| p.display().to_string());
    // Not a socket: what the kernel's connect answers too.
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return failed(libc::ECONNREFUSED);
    }
    let identity = SocketIdentity {
        device: st.st_dev,
        inode: st.st_ino,
    };
    let permitted = job.rule.permits(identity);
    if !permitted {
        match job.off_list {
            OffList::Refuse => {
                return (
                    Reply {
                        outcome: Outcome::Refused,
                        allowed: false,
                        resolved,
                        alerted: false,
                        identity: Some(identity),
                    },
                    None,
                );
            }
            // The very descriptor the name led to goes back: an approval connects to it.
            OffList::Hold => {
                return (
                    Reply {
                        outcome: Outcome::Held,
                        allowed: false,
                        resolved,
                        alerted: false,
                        identity: Some(identity),
                    },
                    Some(target),
                );
            }
            OffList::Report => {}
        }
    }
    let failed = |e: std::io::Error| Outcome::Failed(e.raw_os_error().unwrap_or(libc::EPERM));
    let outcome = match &job.send {
        Some(send) => as_caller(&job.credentials, home, || {
            super::unix_send::send_in_connector(sock, &link, send, &job.credentials, extra)
        })
        .map_or_else(failed, Outcome::Sent),
        None => as_caller(&job.credentials, home, || connect_path(sock, &link))
            .map_or_else(failed, |()| Outcome::Connected),
    };
    (
        Reply {
            outcome,
            allowed: permitted,
            resolved,
            alerted: !permitted,
            identity: Some(identity),
        },
        None,
    )
}

/// Connects the caller's socket to `target`, the descriptor an [`Outcome::Held`] reply handed
/// back, with the caller's ids: the name is not looked up again.
fn connect_held(job: &Job, sock: &OwnedFd, target: &OwnedFd, home: &Home) -> Reply {
    let link = format!("/proc/self/fd/{}", target.as_raw_fd());
    let resolved = std::fs::read_link(&link)
        .ok()
        .map(|p| p.display().to_string());
    let connected = as_caller(&job.credentials, home, || connect_path(sock, &link));
    Reply {
        outcome: match connected {
            Ok(()) => Outcome::Connected,
            Err(e) => Outcome::Failed(e.raw_os_error().unwrap_or(libc::EPERM)),
        },
        allowed: true,
        resolved,
        alerted: false,
        identity: None,
    }
}

fn enter(root: &OwnedFd, cwd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fchdir/chroot on fds we hold and a static path.
    unsafe {
        if libc::fchdir(root.as_raw_fd()) < 0
            || libc::chroot(c".".as_ptr()) < 0
            || libc::fchdir(cwd.as_raw_fd()) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Back to the connector's own root and cwd; a connector that cannot get back must not serve
/// another job from the wrong place.
fn leave_or_die(home: &Home) {
    if enter(home.root, home.cwd).is_err() {
        eprintln!("agent-monitor run: unix connector cannot return to its own root: exiting");
        // SAFETY: immediate exit of the connector process.
        unsafe { libc::_exit(1) };
    }
}

/// Runs `f` with the caller's effective and file-system uid and gid and its groups; the real
/// and saved ids stay root, to come back (and because the kernel's uid selectors identify
/// agents by real uid: the connector must not become the agent it acts for). Raw system calls:
/// the libc wrappers would signal every thread (the connector has one, but must not depend on
/// it).
fn as_caller<T>(
    c: &AgentCredentials,
    home: &Home,
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    const KEEP: libc::c_long = -1;
    let sys = |r: libc::c_long| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let groups: Vec<libc::gid_t> = c.groups.clone();
    // SAFETY: credential system calls with integers and a live groups buffer.
    let became = unsafe {
        sys(libc::syscall(
            libc::SYS_setgroups,
            groups.len(),
            groups.as_ptr(),
        ))
        .and_then(|()| sys(libc::syscall(libc::SYS_setresgid, KEEP, c.gids[1], KEEP)))
        .and_then(|()| {
            libc::syscall(libc::SYS_setfsgid, c.gids[3]);
            sys(libc::syscall(libc::SYS_setresuid, KEEP, c.uids[1], KEEP))
        })
        .map(|()| {
            libc::syscall(libc::SYS_setfsuid, c.uids[3]);
        })
    };
    let result = became.and_then(|()| f());
    // SAFETY: as above; back to root with the connector's own groups.
    let back = unsafe {
        sys(libc::syscall(libc::SYS_setresuid, KEEP, 0, KEEP))
            .and_then(|()| sys(libc::syscall(libc::SYS_setresgid, KEEP, 0, KEEP)))
            .and_then(|()| {
                sys(libc::syscall(
                    libc::SYS_setgroups,
                    home.groups.len(),
                    home.groups.as_ptr(),
                ))
            })
    };
    if back.is_err() {
        eprintln!("agent-monitor run: unix connector cannot return to root: exiting");
        // SAFETY: immediate exit of the connector process.
        unsafe { libc::_exit(1) };
    }
    result
}

fn groups() -> Vec<libc::gid_t> {
    let mut g = vec![0 as libc::gid_t; 256];
    // SAFETY: getgroups fills at most g.len() entries.
    let n = unsafe { libc::getgroups(g.len() as libc::c_int, g.as_mut_ptr()) };
    g.truncate(n.max(0) as usize);
    g
}

/// The name, looked up from the cwd (or the root) as connect looks it up: last symlink followed.
fn open_path(name: &[u8]) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open of a NUL-terminated path; the fd is owned at once.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect_path(sock: &OwnedFd, path: &str) -> std::io::Result<()> {
    // SAFETY: sockaddr_un is plain data; zero is its empty value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + path.len() + 1) as libc::socklen_t;
    loop {
        // SAFETY: a live sockaddr_un of at least `len` bytes.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Most descriptors one message carries (SCM_MAX_FD: a send job's passed descriptors).
const MAX_FDS: usize = super::unix_message::SCM_MAX_FD;
/// Room for MAX_FDS descriptors in u64 words.
const CONTROL_WORDS: usize = (16 + 4 * MAX_FDS) / 8 + 2;

fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let n = (fds.len().min(MAX_FDS) * std::mem::size_of::<RawFd>()) as u32;
        // SAFETY: CMSG macros over our control buffer, large enough for MAX_FDS ints.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(n) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(n) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len().min(MAX_FDS),
            );
        }
    }
    // SAFETY: msg points at live buffers for the call.
    if unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: the kernel fills at most the buffers' sizes.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, each checked before reading.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(std::io::Error::other("a connector message was cut short"));
    }
    Ok((n as usize, fds))
}
