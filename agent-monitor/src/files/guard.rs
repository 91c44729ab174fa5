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
use super::holds::{FileGrant, GUARD_MARGIN, GrantSet, HeldOpen, HoldBook, Refusal, monotonic_ns};
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
    /// The daemon's decision of a held open.
    Decide {
        hold: u64,
        allow: bool,
    },
    /// Some(ask timeout): a daemon takes held opens; None: it went away (deny every held open).
    Asking(Option<std::time::Duration>),
    /// The task approvals of opens in force.
    Grants(Vec<FileGrant>),
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

/// Ask mode's state in the guard thread: the held opens, whether a daemon takes them (and its
/// timeout), and the task approvals it gave.
#[derive(Default)]
struct Asking {
    book: HoldBook<OpenEvent>,
    timeout: Option<std::time::Duration>,
    grants: GrantSet,
}

impl Asking {
    /// An ask-mode agent's open of a denied file: allowed by a task approval, held for the
    /// daemon, or refused at once (no daemon, too many held).
    fn take(
        &mut self,
        kernel: &Kernel,
        open: OpenEvent,
        mut report: OpenReport,
        reports: &Reports,
    ) {
        let now = monotonic_ns();
        if self
            .grants
            .covers(&report.agent, report.task.as_deref(), report.file, now)
        {
            report.verdict = Verdict::Allowed;
            report.held = Some("allowed by a task approval of this file (ask mode)".into());
            answer(kernel, &open, true, reports);
            reports.send(FileReport::Open(report));
            return;
        }
        let Some(timeout) = self.timeout else {
            return refuse(kernel, &open, report, &Refusal::NoDaemon, reports);
        };
        let deadline = now.saturating_add((timeout + GUARD_MARGIN).as_nanos() as u64);
        match self.book.hold(open, report.clone(), deadline) {
            Ok(hold) => {
                // Not delivered (the service's queue is full): refused now, not left to time out.
                if reports
                    .tx
                    .try_send(FileReport::Hold(HeldOpen { hold, open: report }))
                    .is_err()
                    && let Some((open, report)) = self.book.decide(hold)
                {
                    reports.lost.fetch_add(1, Ordering::Relaxed);
                    refuse(kernel, &open, report, &Refusal::QueueFull, reports);
                }
            }
            Err((open, report, why)) => refuse(kernel, &open, report, &why, reports),
        }
    }

    fn command(&mut self, kernel: &Kernel, command: Command, reports: &Reports) {
        match command {
            Command::Decide { hold, allow } => match self.book.decide(hold) {
                // The daemon reports its decision itself.
                Some((open, _)) => answer(kernel, &open, allow, reports),
                None => tracing::debug!(hold, "a decision of an open no longer held"),
            },
            Command::Asking(Some(timeout)) => self.timeout = Some(timeout),
            Command::Asking(None) => {
                self.timeout = None;
                for (open, report) in self.book.drain() {
                    refuse(kernel, &open, report, &Refusal::DaemonGone, reports);
                }
            }
            Command::Grants(grants) => self.grants = GrantSet::new(grants),
            _ => {}
        }
    }

    fn expire(&mut self, kernel: &Kernel, reports: &Reports) {
        for (open, report) in self.book.expire(monotonic_ns()) {
            refuse(kernel, &open, report, &Refusal::Timeout, reports);
        }
    }

    /// How long poll may sleep: until the first held open times out.
    fn poll_timeout_ms(&self) -> libc::c_int {
        match self.book.next_deadline() {
            None => -1,
            Some(d) => {
                let ms = d.saturating_sub(monotonic_ns()).div_ceil(1_000_000);
                ms.min(libc::c_int::MAX as u64) as libc::c_int
            }
        }
    }
}

fn answer(kernel: &Kernel, open: &OpenEvent, allow: bool, reports: &Reports) {
    if let Err(e) = kernel.answer(open, allow) {
        reports.send(FileReport::Problem(format!(
            "file guard: answering an open: {e}"
        )));
    }
}

/// Refuses a held (or to be held) open without a decision of the daemon, and reports why.
fn refuse(
    kernel: &Kernel,
    open: &OpenEvent,
    mut report: OpenReport,
    why: &Refusal,
    reports: &Reports,
) {
    answer(kernel, open, false, reports);
    report.verdict = Verdict::Denied;
    report.held = Some(why.to_string());
    reports.send(FileReport::Open(report));
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
    let mut asking = Asking::default();
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
        let timeout = asking.poll_timeout_ms();
        // SAFETY: three valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
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
            answer_opens(
                &kernel,
                &book,
                &roster,
                tags.as_ref(),
                &reports,
                &mut asking,
            );
        }
        asking.expire(&kernel, &reports);
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
                    Ok(c @ (Command::Decide { .. } | Command::Asking(_) | Command::Grants(_))) => {
                        asking.command(&kernel, c, &reports);
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
    asking: &mut Asking,
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
            let (allow, report) = match judge_open(&open, book, roster, tags) {
                Judged::Ask(report) => {
                    asking.take(kernel, open, report, reports);
                    continue;
                }
                Judged::Answer(allow, report) => (allow, report),
            };
            answer(kernel, &open, allow, reports);
            if let Some(r) = report {
                reports.send(FileReport::Open(r));
            }
        }
    }
}

/// What to do with an open: answer it now (allowed or not, and what to report), or hand it to
/// ask mode.
enum Judged {
    Answer(bool, Option<OpenReport>),
    Ask(OpenReport),
}

fn judge_open(
    open: &OpenEvent,
    book: &Book<nix::sys::inotify::WatchDescriptor>,
    roster: &Roster,
    tags: Option<&ThreadTags>,
) -> Judged {
    let tid = open.tid();
    // The daemon's own threads (the walker listing a denied directory): at once.
    if Path::new(&format!("/proc/self/task/{tid}")).exists() {
        return Judged::Answer(true, None);
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
        return Judged::Answer(true, None);
    };
    let Some((file, path)) = open.fd().and_then(identify_fd) else {
        return Judged::Answer(true, None);
    };
    let ruling = book
        .judge()
        .judge(Some(&opener.agent), file, || ancestors(&path));
    let (verdict, agent, rule, ask) = match ruling {
        Ruling::Allow => return Judged::Answer(true, None),
        Ruling::Deny { agent, rule } => (Verdict::Denied, agent, rule, false),
        Ruling::Alert { agent, rule } => (Verdict::Alert, agent, rule, false),
        // Denied unless the daemon approves it.
        Ruling::Ask { agent, rule } => (Verdict::Denied, agent, rule, true),
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
        held: None,
    };
    if ask {
        return Judged::Ask(report);
    }
    Judged::Answer(verdict != Verdict::Denied, Some(report))
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
