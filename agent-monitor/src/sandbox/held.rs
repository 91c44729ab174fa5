//! What `run` asks the daemon about a call its ask-mode filter caught: the destination of a
//! connect or datagram, or the file an exec runs. Calls with nothing to ask (a unix socket, a
//! send on a connected socket, an exec of a file that does not exist) continue at once.

use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::arguments::{self, Destination, Memory, Width};
use super::holds::HeldKind;
use crate::control::HeldAction;

/// The calls the ask-mode filter sends to the listener.
pub const HELD_SYSCALLS: [&str; 6] = [
    "connect", "sendto", "sendmsg", "sendmmsg", "execve", "execveat",
];

/// Most distinct destinations of one sendmmsg asked about; the others are the kernel's to judge
/// (its sendmsg hook refuses off-list datagrams of an ask-mode agent).
const MMSG_DESTINATIONS: usize = 16;

/// MSG_FASTOPEN (linux/socket.h): a TCP send that connects.
const MSG_FASTOPEN: u64 = 0x2000_0000;
/// execveat(2) flags.
const AT_EMPTY_PATH: u64 = 0x1000;
const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
const AT_FDCWD: i32 = -100;

/// What to do with a caught call.
#[derive(Debug, PartialEq, Eq)]
pub enum Question {
    /// Nothing to ask: let the kernel run and judge it.
    Nothing,
    /// Ask the daemon these (one or more: a sendmmsg to several destinations); the call
    /// continues only if every one is allowed.
    Ask {
        kind: HeldKind,
        actions: Vec<HeldAction>,
    },
}

/// A socket of the caller's: its family and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub domain: i32,
    pub protocol: i32,
}

impl SocketInfo {
    /// "tcp" or "udp" (MPTCP is TCP to the cgroup hooks; UDP-Lite is UDP); None for other
    /// protocols (raw, ICMP echo, SCTP): not asked, the kernel judges them.
    fn transport(self) -> Option<&'static str> {
        match self.protocol {
            libc::IPPROTO_TCP | libc::IPPROTO_MPTCP => Some("tcp"),
            libc::IPPROTO_UDP | libc::IPPROTO_UDPLITE => Some("udp"),
            _ => None,
        }
    }
}

/// The file an exec names, as the caller's view of the file system resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecFile {
    /// The caller's spelling, made absolute.
    pub path: String,
    pub device: u64,
    pub inode: u64,
}

/// The process whose call is caught, as the question needs it.
pub trait Caller {
    fn memory(&self) -> &dyn Memory;
    /// The socket behind the caller's fd `fd`; None: not a socket, or gone.
    fn socket(&self, fd: i32) -> Option<SocketInfo>;
    /// The file an exec of `path` relative to `dirfd` (AT_FDCWD: the cwd) runs; `empty_path`:
    /// the fd itself (execveat AT_EMPTY_PATH). None: the kernel will fail it (ENOENT…).
    fn exec_file(
        &self,
        dirfd: i32,
        path: &[u8],
        empty_path: bool,
        nofollow: bool,
    ) -> Option<ExecFile>;
}

/// The question for call `name` with `args` of a caller with pointers of `width`.
pub fn question(name: &str, args: &[u64; 6], width: Width, caller: &dyn Caller) -> Question {
    let mem = caller.memory();
    let fd = args[0] as u32 as i32;
    match name {
        "connect" => network(caller, fd, &[(args[1], args[2] as u32)], None, false),
        "sendto" if args[4] != 0 => network(
            caller,
            fd,
            &[(args[4], args[5] as u32)],
            Some(args[3]),
            true,
        ),
        "sendmsg" => match arguments::msghdr_name(mem, args[1], width) {
            Ok((0, _)) | Err(_) => Question::Nothing,
            Ok(name) => network(caller, fd, &[name], Some(args[2]), true),
        },
        "sendmmsg" => match arguments::mmsghdr_names(mem, args[1], args[2] as u32, width) {
            Ok(names) => {
                let names: Vec<_> = names.into_iter().filter(|&(p, _)| p != 0).collect();
                network(caller, fd, &names, Some(args[3]), true)
            }
            Err(_) => Question::Nothing,
        },
        "execve" => exec(caller, AT_FDCWD, args[0], args[1], 0, width),
        "execveat" => exec(caller, fd, args[1], args[2], args[4], width),
        _ => Question::Nothing,
    }
}

/// Connect or send to the addresses `names` (pointer, length) through fd `fd`. `flags`: a
/// send's flags (None: connect). `send`: a datagram send (AF_UNSPEC reads as AF_INET on an
/// IPv4 UDP socket).
fn network(
    caller: &dyn Caller,
    fd: i32,
    names: &[(u64, u32)],
    flags: Option<u64>,
    send: bool,
) -> Question {
    let mem = caller.memory();
    let mut socket = None;
    let mut get_socket = || *socket.get_or_insert_with(|| caller.socket(fd));
    let mut actions: Vec<HeldAction> = Vec::new();
    for &(ptr, len) in names {
        let dest = match arguments::sockaddr(mem, ptr, len, false) {
            Ok(Destination::Unspec) if send => match get_socket() {
                Some(s) if s.domain == libc::AF_INET && s.transport() == Some("udp") => {
                    arguments::sockaddr(mem, ptr, len, true)
                }
                _ => continue,
            },
            other => other,
        };
        let Ok(Destination::Inet(address, port)) = dest else {
            continue;
        };
        let Some(info) = get_socket() else {
            return Question::Nothing;
        };
        let Some(transport) = info.transport() else {
            return Question::Nothing;
        };
        // A TCP send's address is ignored (connected) or refused (not connected) unless it is
        // a Fast Open send, which connects.
        if transport == "tcp" && send && flags.is_some_and(|f| f & MSG_FASTOPEN == 0) {
            return Question::Nothing;
        }
        let action = connect_action(transport, address, port);
        if !actions.contains(&action) {
            actions.push(action);
        }
        if actions.len() == MMSG_DESTINATIONS {
            break;
        }
    }
    if actions.is_empty() {
        return Question::Nothing;
    }
    Question::Ask {
        kind: HeldKind::Network,
        actions,
    }
}

fn connect_action(transport: &str, address: IpAddr, port: u16) -> HeldAction {
    HeldAction::Connect {
        transport: transport.to_string(),
        address,
        port,
        host: None,
    }
}

/// An exec of the path at `path_ptr` (relative to `dirfd`) with the argv at `argv_ptr`.
fn exec(
    caller: &dyn Caller,
    dirfd: i32,
    path_ptr: u64,
    argv_ptr: u64,
    flags: u64,
    width: Width,
) -> Question {
    let mem = caller.memory();
    let Ok(Some(path)) = arguments::c_string(mem, path_ptr, arguments::PATH_MAX - 1) else {
        return Question::Nothing;
    };
    let empty_path = path.is_empty() && flags & AT_EMPTY_PATH != 0;
    if path.is_empty() && !empty_path {
        return Question::Nothing;
    }
    let Some(file) = caller.exec_file(dirfd, &path, empty_path, flags & AT_SYMLINK_NOFOLLOW != 0)
    else {
        return Question::Nothing;
    };
    let argv = arguments::argv(mem, argv_ptr, width).unwrap_or_default();
    Question::Ask {
        kind: HeldKind::Exec,
        actions: vec![HeldAction::Exec {
            path: file.path,
            sha256: None,
            argv,
            device: Some(file.device),
            inode: Some(file.inode),
        }],
    }
}

/// A real caller, thread `pid` in our pid namespace, read through /proc and pidfds.
pub struct LiveCaller {
    memory: arguments::ProcessMemory,
}

impl LiveCaller {
    pub fn new(pid: u32) -> LiveCaller {
        LiveCaller {
            memory: arguments::ProcessMemory { pid },
        }
    }

    fn pid(&self) -> u32 {
        self.memory.pid
    }
}

impl Caller for LiveCaller {
    fn memory(&self) -> &dyn Memory {
        &self.memory
    }

    fn socket(&self, fd: i32) -> Option<SocketInfo> {
        // A copy of the caller's socket, only to read two options; closed at once.
        let sock = super::unix_connect::caller_socket(self.pid(), fd)?;
        Some(SocketInfo {
            domain: super::unix_connect::sock_option(&sock, libc::SO_DOMAIN)?,
            protocol: super::unix_connect::sock_option(&sock, libc::SO_PROTOCOL)?,
        })
    }

    fn exec_file(
        &self,
        dirfd: i32,
        path: &[u8],
        empty_path: bool,
        nofollow: bool,
    ) -> Option<ExecFile> {
        use std::os::unix::ffi::OsStrExt as _;
        let pid = self.pid();
        let path = Path::new(std::ffi::OsStr::from_bytes(path));
        let base = if dirfd == AT_FDCWD {
            PathBuf::from(format!("/proc/{pid}/cwd"))
        } else {
            PathBuf::from(format!("/proc/{pid}/fd/{dirfd}"))
        };
        let (opened, shown) = if empty_path {
            (open_path(&base, None, false, nofollow)?, read_link(&base))
        } else if path.is_absolute() {
            // Resolved inside the caller's root (its mount namespace and chroot).
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            (
                open_path(&root, Some(path), true, nofollow)?,
                path.display().to_string(),
            )
        } else {
            // Relative: from the caller's cwd or dirfd. Absolute symlinks met on the way are
            // read in our root, which is the caller's unless it chrooted.
            (
                open_path(&base, Some(path), false, nofollow)?,
                format!("{}/{}", read_link(&base), path.display()),
            )
        };
        let meta = opened.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        Some(ExecFile {
            path: shown,
            device: meta.dev(),
            inode: meta.ino(),
        })
    }
}

fn read_link(p: &Path) -> String {
    std::fs::read_link(p)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Opens `path` beneath the directory `base` (or `base` itself) with O_PATH, following the last
/// symlink as exec does unless `nofollow`; `in_root`: `base` is the caller's root and the path
/// resolves inside it (openat2 RESOLVE_IN_ROOT).
fn open_path(
    base: &Path,
    path: Option<&Path>,
    in_root: bool,
    nofollow: bool,
) -> Option<std::fs::File> {
    use std::os::unix::ffi::OsStrExt as _;
    let nofollow_flag = if nofollow { libc::O_NOFOLLOW } else { 0 };
    let Some(path) = path else {
        let c = std::ffi::CString::new(base.as_os_str().as_bytes()).ok()?;
        // SAFETY: open of a NUL-terminated path; the fd is owned at once.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        return (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) });
    };
    let c = std::ffi::CString::new(base.as_os_str().as_bytes()).ok()?;
    // SAFETY: as above.
    let dir = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return None;
    }
    // SAFETY: our own fd.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let rel = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: open_how is plain data, zero is its empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | nofollow_flag) as u64;
    how.resolve = if in_root { libc::RESOLVE_IN_ROOT } else { 0 };
    // SAFETY: openat2 with a NUL-terminated path and a live open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests;
