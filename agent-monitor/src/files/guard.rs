//! The guard thread: answers every open of a marked file from its own snapshot (the judge and the
//! roster), so a host process never waits on the daemon's event loop; and the walker thread,
//! which lists directories. The guard thread itself never opens a marked directory: its own
//! open would wait for its own answer. The daemon's own threads are answered at once.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use super::book::{Applied, Book};
use super::judge::{Denial, FileId, Ruling};
use super::kernel::{Kernel, OpenEvent, identify_fd};
use super::plan::{AgentFiles, Mark, Plan};
use super::roster::Roster;
use super::{FileReport, OpenReport, flags};
use crate::action::Verdict;
use crate::bpf::ThreadTags;
use crate::identity::procfs::LiveProcs;

/// What the guard thread is asked to do.
pub(super) enum Command {
    Apply(Plan),
    Found {
        marks: Vec<Mark>,
        denials: Vec<Denial>,
    },
    Roster(Roster),
    Tags(Option<ThreadTags>),
    Stop,
}

/// What the walker thread is asked to list.
pub(super) enum WalkJob {
    Policies(Vec<AgentFiles>),
    NewDir { path: PathBuf, denials: Vec<Denial> },
    Stop,
}

/// Wakes the guard thread's poll (an eventfd).
pub(super) struct Wake(OwnedFd);

impl Wake {
    pub(super) fn new() -> std::io::Result<Wake> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(Wake(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    pub(super) fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes from a live buffer to our eventfd. A full counter (never, in practice)
        // still leaves it readable, which is all a ring means.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn reset(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: 8 bytes into a live buffer.
        unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }
}

/// Where the guard's reports go: the daemon's loop, through a bounded channel; what does not
/// fit is counted.
#[derive(Clone)]
pub(super) struct Reports {
    pub(super) tx: tokio::sync::mpsc::Sender<FileReport>,
    pub(super) lost: Arc<AtomicU64>,
}

impl Reports {
    fn send(&self, report: FileReport) {
        if self.tx.try_send(report).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The guard thread's loop; returns on `Command::Stop` (or when the daemon is gone).
pub(super) fn run(
    mut kernel: Kernel,
    commands: Receiver<Command>,
    wake: Arc<Wake>,
    walker: Sender<WalkJob>,
    reports: Reports,
    mut tags: Option<ThreadTags>,
) {
    let mut book: Book<nix::sys::inotify::WatchDescriptor> = Book::default();
    let mut roster = Roster::default();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: kernel.group_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kernel.inotify_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.0.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: three valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            reports.send(FileReport::Problem(format!(
                "file guard: poll failed, stopping: {e}"
            )));
            return;
        }
        // Opens first: a host process is waiting.
        if fds[0].revents != 0 {
            answer_opens(&kernel, &book, &roster, tags.as_ref(), &reports);
        }
        if fds[2].revents != 0 {
            wake.reset();
            loop {
                match commands.try_recv() {
                    Ok(Command::Apply(plan)) => {
                        let applied: Applied = book.apply(&mut kernel, plan);
                        reports.send(FileReport::Applied(applied));
                    }
                    Ok(Command::Found { marks, denials }) => {
                        for p in book.add_found(&mut kernel, &marks, &denials) {
                            reports.send(FileReport::Problem(p));
                        }
                    }
                    Ok(Command::Roster(r)) => roster = r,
                    Ok(Command::Tags(t)) => tags = t,
                    Ok(Command::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        return;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
        }
        if fds[1].revents != 0 {
            match kernel.read_created() {
                Ok((created, overflow)) => {
                    if overflow {
                        reports.send(FileReport::Problem(
                            "file guard: the directory watch queue overflowed; entries created \
                             then in denied directories are judged through their directory only \
                             until the next reload"
                                .into(),
                        ));
                    }
                    for (wd, name) in created {
                        match book.on_created(&mut kernel, wd, &name) {
                            Ok(Some((path, denials))) => {
                                let _ = walker.send(WalkJob::NewDir { path, denials });
                            }
                            Ok(None) => {}
                            Err(p) => reports.send(FileReport::Problem(p)),
                        }
                    }
                }
                Err(e) => reports.send(FileReport::Problem(format!(
                    "file guard: reading the directory watch: {e}"
                ))),
            }
        }
    }
}

/// Answers every waiting open. Every permission event gets an answer, whatever fails on the way:
/// allowed when the opener or the file cannot be told.
fn answer_opens(
    kernel: &Kernel,
    book: &Book<nix::sys::inotify::WatchDescriptor>,
    roster: &Roster,
    tags: Option<&ThreadTags>,
    reports: &Reports,
) {
    loop {
        let opens = match kernel.read_opens() {
            Ok(o) if o.is_empty() => return,
            Ok(o) => o,
            Err(e) => {
                reports.send(FileReport::Problem(format!(
                    "file guard: reading open events: {e}"
                )));
                return;
            }
        };
        for open in opens {
            if !open.needs_answer() {
                continue;
            }
            let (allow, report) = judge_open(&open, book, roster, tags);
            if let Err(e) = kernel.answer(&open, allow) {
                reports.send(FileReport::Problem(format!(
                    "file guard: answering an open: {e}"
                )));
            }
            if let Some(r) = report {
                reports.send(FileReport::Open(r));
            }
        }
    }
}

fn judge_open(
    open: &OpenEvent,
    book: &Book<nix::sys::inotify::WatchDescriptor>,
    roster: &Roster,
    tags: Option<&ThreadTags>,
) -> (bool, Option<OpenReport>) {
    let tid = open.tid();
    // The daemon's own threads (the walker listing a denied directory): at once.
    if Path::new(&format!("/proc/self/task/{tid}")).exists() {
        return (true, None);
    }
    // A thread the kernel made for the process without a fork (an io_uring worker opening for
    // it) carries no tag of its own: it acts for its process, whose main thread has the tag.
    let tag = |tid| {
        let t = tags?;
        t.agent_id(tid).or_else(|| {
            let pid = tgid(tid)?;
            (pid != tid).then(|| t.agent_id(pid)).flatten()
        })
    };
    let Some(opener) = roster.opener(&LiveProcs, tag, tid) else {
        return (true, None);
    };
    let Some((file, path)) = open.fd().and_then(identify_fd) else {
        return (true, None);
    };
    let ruling = book
        .judge()
        .judge(Some(&opener.agent), file, || ancestors(&path));
    let (verdict, agent, rule) = match ruling {
        Ruling::Allow => return (true, None),
        Ruling::Deny { agent, rule } => (Verdict::Denied, agent, rule),
        Ruling::Alert { agent, rule } => (Verdict::Alert, agent, rule),
    };
    // Read while the opener still waits in its system call.
    let open_flags = flags::of_thread(tid);
    let (pid, uid, comm) = whose(tid);
    let report = OpenReport {
        time: std::time::SystemTime::now(),
        tid,
        pid,
        uid,
        comm,
        agent: agent.to_string(),
        task: opener.task,
        verdict,
        rule: rule.to_string(),
        path,
        open_flags,
        file,
    };
    (verdict != Verdict::Denied, Some(report))
}

/// The directories `path` lies in, nearest first (lstat: no open).
fn ancestors(path: &str) -> Vec<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    Path::new(path)
        .ancestors()
        .skip(1)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// The process thread `tid` belongs to.
fn tgid(tid: u32) -> Option<u32> {
    procfs::process::Process::new(tid as i32)
        .and_then(|p| p.status())
        .ok()
        .map(|s| s.tgid as u32)
}

/// Process id, uid and command name of thread `tid` (0, 0, "?" when it is gone).
fn whose(tid: u32) -> (u32, u32, String) {
    procfs::process::Process::new(tid as i32)
        .and_then(|p| p.status())
        .map(|s| (s.tgid as u32, s.ruid, s.name))
        .unwrap_or((0, 0, "?".into()))
}

/// The walker thread's loop: lists directories for the guard thread.
pub(super) fn walk(
    jobs: Receiver<WalkJob>,
    commands: Sender<Command>,
    wake: Arc<Wake>,
    reports: Reports,
) {
    for job in jobs {
        let command = match job {
            WalkJob::Policies(agents) => {
                let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_else(|e| {
                    reports.send(FileReport::Problem(format!(
                        "file guard: /etc/passwd unreadable ({e}): `~/` entries cover /root only"
                    )));
                    String::new()
                });
                let homes = crate::policy::files::homes_from_passwd(&passwd);
                Command::Apply(super::plan::plan(&agents, &homes))
            }
            WalkJob::NewDir { path, denials } => {
                let (marks, problems) = super::plan::tree(&path);
                for p in problems {
                    reports.send(FileReport::Problem(p));
                }
                Command::Found { marks, denials }
            }
            WalkJob::Stop => return,
        };
        if commands.send(command).is_err() {
            return;
        }
        wake.ring();
    }
}
