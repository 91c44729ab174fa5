//! The kernel side of the file guard, behind [`MarkTable`] and [`Kernel`]: one fanotify group of
//! class `FAN_CLASS_CONTENT` with inode marks for `FAN_OPEN_PERM` (the opener waits for our
//! answer), and one inotify instance watching the denied directories for new entries. The only
//! module that makes fanotify and inotify calls.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags as InotifyInit, Inotify, WatchDescriptor};

use super::judge::FileId;

/// Marks and watches, as the guard's bookkeeping needs them (a fake in unit tests).
pub trait MarkTable {
    /// What a watch is known by in its events.
    type Watch;
    /// Marks the inode `path` names now; returns its (device, inode).
    fn mark(&mut self, path: &Path, dir: bool) -> io::Result<FileId>;
    /// Removes the mark of the inode `path` names, if that is still `id` (false: the name now
    /// names another file or none; the old inode's mark stays until it is freed, and its events
    /// are judged against a judge that no longer lists it: allowed).
    fn unmark(&mut self, path: &Path, dir: bool, id: FileId) -> io::Result<bool>;
    /// Watches directory `path` for entries created or moved in.
    fn watch(&mut self, path: &Path) -> io::Result<Self::Watch>;
    fn unwatch(&mut self, wd: Self::Watch);
}

/// What an open of a marked file looks like to the guard.
pub struct OpenEvent {
    event: FanotifyEvent,
}

impl OpenEvent {
    /// The opening thread (the group reports thread ids).
    pub fn tid(&self) -> u32 {
        self.event.pid().max(0) as u32
    }

    /// The file the opener is opening, opened read-only for us by the kernel (no event).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.event.fd()
    }

    /// Whether this is a permission event (the opener waits for an answer).
    pub fn needs_answer(&self) -> bool {
        self.event.mask().contains(MaskFlags::FAN_OPEN_PERM)
    }
}

/// (device, inode) and the path of an event's file.
pub fn identify_fd(fd: BorrowedFd<'_>) -> Option<(FileId, String)> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let meta = std::fs::metadata(&link).ok()?;
    let path = std::fs::read_link(&link)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".into());
    Some(((meta.dev(), meta.ino()), path))
}

/// The fanotify group and the inotify instance.
pub struct Kernel {
    group: Fanotify,
    inotify: Inotify,
}

const FILE_MASK: MaskFlags = MaskFlags::FAN_OPEN_PERM;

fn dir_mask() -> MaskFlags {
    MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD | MaskFlags::FAN_ONDIR
}

impl Kernel {
    pub fn new() -> io::Result<Kernel> {
        let group = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::FAN_REPORT_TID,
            EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC | EventFFlags::O_LARGEFILE,
        )
        .map_err(io::Error::from)?;
        let inotify = Inotify::init(InotifyInit::IN_CLOEXEC | InotifyInit::IN_NONBLOCK)
            .map_err(io::Error::from)?;
        Ok(Kernel { group, inotify })
    }

    pub fn group_fd(&self) -> RawFd {
        self.group.as_fd().as_raw_fd()
    }

    pub fn inotify_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// The open events waiting (none: EAGAIN).
    pub fn read_opens(&self) -> io::Result<Vec<OpenEvent>> {
        match self.group.read_events() {
            Ok(events) => Ok(events
                .into_iter()
                .map(|event| OpenEvent { event })
                .collect()),
            Err(nix::errno::Errno::EAGAIN) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Answers an open: allowed, or refused (the opener's call fails with EPERM).
    pub fn answer(&self, open: &OpenEvent, allow: bool) -> io::Result<()> {
        let Some(fd) = open.fd() else {
            return Ok(());
        };
        let response = if allow {
            Response::FAN_ALLOW
        } else {
            Response::FAN_DENY
        };
        self.group
            .write_response(FanotifyResponse::new(fd, response))
            .map_err(io::Error::from)
    }

    /// New entries in watched directories: (watch, name); empty when none wait.
    pub fn read_created(&self) -> io::Result<(Vec<(WatchDescriptor, std::ffi::OsString)>, bool)> {
        match self.inotify.read_events() {
            Ok(events) => {
                let overflow = events
                    .iter()
                    .any(|e| e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW));
                let created = events
                    .into_iter()
                    .filter(|e| {
                        e.mask
                            .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                    })
                    .filter_map(|e| e.name.map(|n| (e.wd, n)))
                    .collect();
                Ok((created, overflow))
            }
            Err(nix::errno::Errno::EAGAIN) => Ok((Vec::new(), false)),
            Err(e) => Err(e.into()),
        }
    }
}

/// An `O_PATH` descriptor of `path` (following a final symlink, like the plan's roots): opening
/// with `O_PATH` raises no open event, so the guard thread may do it on a marked file.
fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

use std::os::unix::fs::OpenOptionsExt as _;

fn fd_link(fd: &OwnedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn fd_id(fd: &OwnedFd) -> io::Result<FileId> {
    let meta = std::fs::metadata(fd_link(fd))?;
    Ok((meta.dev(), meta.ino()))
}

impl MarkTable for Kernel {
    type Watch = WatchDescriptor;

    fn mark(&mut self, path: &Path, dir: bool) -> io::Result<FileId> {
        let fd = open_path(path)?;
        let mask = if dir { dir_mask() } else { FILE_MASK };
        // The magic link names exactly the inode we hold (fanotify_mark takes no O_PATH dirfd).
        self.group
            .mark(MarkFlags::FAN_MARK_ADD, mask, None, Some(&fd_link(&fd)))
            .map_err(io::Error::from)?;
        fd_id(&fd)
    }

    fn unmark(&mut self, path: &Path, dir: bool, id: FileId) -> io::Result<bool> {
        let fd = match open_path(path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if fd_id(&fd)? != id {
            return Ok(false);
        }
        let mask = if dir { dir_mask() } else { FILE_MASK };
        match self
            .group
            .mark(MarkFlags::FAN_MARK_REMOVE, mask, None, Some(&fd_link(&fd)))
        {
            Ok(()) => Ok(true),
            // Not marked (any more): nothing to remove.
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn watch(&mut self, path: &Path) -> io::Result<WatchDescriptor> {
        self.inotify
            .add_watch(
                path,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
            )
            .map_err(io::Error::from)
    }

    fn unwatch(&mut self, wd: WatchDescriptor) {
        // Fails only when the directory is gone, which removed the watch already.
        let _ = self.inotify.rm_watch(wd);
    }
}
