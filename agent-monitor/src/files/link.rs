//! The daemon's end of the file guard: finds the guard of its pin directory (adopting one that
//! outlived a previous daemon, replacing one of another build, starting one when there is none),
//! pushes it the agents' `[files]` and the selectors, and hands its reports to the event loop. If
//! the guard dies, the link says so and starts a new one, to which it pushes the last plan again.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::wire::{self, FromGuard, GuardPaths, ToGuard, WireAgentFiles};
use super::{AgentFiles, FileReport, REPORT_QUEUE, Roster};

/// How long a starting guard may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guard may take to greet or to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's handle on the file-guard process. Dropping it closes the connection only: the
/// guard, its marks and its refusals stay (see docs/files.md, "When the daemon is down").
pub struct GuardLink {
    commands: mpsc::UnboundedSender<ToGuard>,
    lost: Arc<AtomicU64>,
}

impl GuardLink {
    /// Connects to (or starts) the guard of `pin_dir`; reports arrive on the returned receiver.
    pub async fn start(pin_dir: &Path) -> anyhow::Result<(GuardLink, mpsc::Receiver<FileReport>)> {
        let paths = GuardPaths::for_pin_dir(pin_dir);
        let conn = Conn::establish(&paths, pin_dir).await?;
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let lost = Arc::new(AtomicU64::new(0));
        let task = LinkTask {
            paths,
            pin_dir: pin_dir.to_path_buf(),
            reports: tx,
            lost: lost.clone(),
            last_apply: None,
            last_roster: None,
            last_asking: None,
            last_grants: None,
        };
        tokio::spawn(task.run(conn, command_rx));
        Ok((GuardLink { commands, lost }, rx))
    }

    /// Puts the agents' `[files]` in force (the guard lists and marks; the outcome arrives as
    /// [`FileReport::Applied`]). Until then the previous marks stay.
    pub fn apply(&self, agents: Vec<AgentFiles>) {
        let agents = agents.iter().map(WireAgentFiles::from).collect();
        let _ = self.commands.send(ToGuard::Apply { agents });
    }

    /// The selectors in force changed.
    pub fn set_roster(&self, roster: Roster) {
        let _ = self.commands.send(ToGuard::Roster { roster });
    }

    /// This daemon takes held opens of ask-mode agents and decides them within `timeout`
    /// (told to every guard it connects to from now on).
    pub fn set_asking(&self, timeout: Duration) {
        let timeout_ms = timeout.as_millis().min(u128::from(u64::MAX)) as u64;
        let _ = self.commands.send(ToGuard::Asking { timeout_ms });
    }

    /// The task approvals of opens in force (the whole set).
    pub fn set_grants(&self, grants: Vec<super::FileGrant>) {
        let _ = self.commands.send(ToGuard::Grants { grants });
    }

    /// A handle that answers held opens (kept by the ask desk with each held open).
    pub fn decider(&self) -> GuardDecider {
        GuardDecider(self.commands.clone())
    }

    /// Reports lost on the way: the guard's queue while no daemon was connected, and this
    /// daemon's loop not taking them in time.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Answers the guard's held opens. A decision for an open the guard no longer holds (timed out,
/// or held by a guard since replaced: its numbers are never reused) changes nothing.
#[derive(Clone, Debug)]
pub struct GuardDecider(mpsc::UnboundedSender<ToGuard>);

impl GuardDecider {
    pub fn decide(&self, hold: u64, allow: bool) {
        let _ = self.0.send(ToGuard::Decide { hold, allow });
    }
}

/// A connection to a guard that greeted us.
struct Conn {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    out: OwnedWriteHalf,
    pid: u32,
    /// Reports the guard kept for us; they are the next lines.
    queued: usize,
    /// A guard of another build, retired: it holds its marks until the new guard has marked.
    retiring: Option<Box<Conn>>,
    /// Reports the retired guard sent before it retired, for the trail.
    early: Vec<FileReport>,
}

impl Conn {
    async fn open(paths: &GuardPaths) -> std::io::Result<(Conn, u32, String)> {
        let stream = UnixStream::connect(&paths.socket).await?;
        let peer = stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0) as u32;
        let (r, out) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let first = tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| std::io::Error::other("the guard did not greet within 5 s"))??
            .unwrap_or_default();
        let (pid, queued, build) = match serde_json::from_str::<FromGuard>(&first) {
            Ok(FromGuard::Hello {
                pid, queued, build, ..
            }) => (pid, queued, build),
            // A guard whose greeting this build cannot read: another build, to be replaced.
            _ => (peer, 0, format!("unreadable greeting {first:?}")),
        };
        Ok((
            Conn {
                lines,
                out,
                pid,
                queued,
                retiring: None,
                early: Vec::new(),
            },
            peer,
            build,
        ))
    }

    /// The guard of `paths`: the running one if it is of this build (adopted), else a new one
    /// (a running guard of another build is retired first and told to exit once the new one has
    /// marked).
    async fn establish(paths: &GuardPaths, pin_dir: &Path) -> anyhow::Result<Conn> {
        let mut retiring = None;
        if let Ok((mut conn, peer, build)) = Conn::open(paths).await {
            if build == wire::this_build() {
                tracing::info!(
                    "file guard (pid {}) adopted: its marks held while no daemon ran; {} \
                     report(s) it kept follow",
                    conn.pid,
                    conn.queued
                );
                return Ok(conn);
            }
            tracing::warn!(
                "file guard (pid {}) is of another build ({build}); starting one of this build \
                 ({}), the old one keeps its marks until the new one has marked",
                conn.pid,
                wire::this_build()
            );
            if let Some(early) = conn.retire().await {
                retiring = Some((Box::new(conn), early));
            } else {
                // It cannot be retired in order: end it (its marks go with it until ours are in).
                tracing::warn!(
                    "file guard (pid {peer}) did not retire; ending it: until the new guard has \
                     marked, opens of denied files are not judged"
                );
                // SAFETY: kill(2) of the peer the kernel named for the socket.
                if peer != 0 {
                    unsafe { libc::kill(peer as i32, libc::SIGTERM) };
                }
                wait_gone(paths).await;
            }
        }
        let ended = spawn(pin_dir)?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            // A guard that could not start (no fanotify here, a container's system call filter)
            // has said why on stderr; waiting out the timeout would only delay enforcement.
            if let Some(status) = ended.get() {
                bail!("the file guard exited at start ({status}); its error is logged above");
            }
            match Conn::open(paths).await {
                Ok((mut conn, _, _)) => {
                    tracing::info!("file guard (pid {}) started", conn.pid);
                    if let Some((old, early)) = retiring {
                        conn.retiring = Some(old);
                        conn.early = early;
                    }
                    return Ok(conn);
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "the file guard did not serve {} within {} s: {e}",
                        paths.socket.display(),
                        START_TIMEOUT.as_secs()
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn send(&mut self, message: &ToGuard) -> bool {
        matches!(
            tokio::time::timeout(ANSWER_TIMEOUT, self.out.write_all(&wire::line(message))).await,
            Ok(Ok(()))
        )
    }

    /// Asks the guard to give up its socket and lock (keeping its marks); once it has, the
    /// reports it sent before its answer (those it kept while no daemon ran).
    async fn retire(&mut self) -> Option<Vec<FileReport>> {
        if !self.send(&ToGuard::Retire).await {
            return None;
        }
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let Ok(Ok(Some(l))) = tokio::time::timeout_at(deadline, self.lines.next_line()).await
            else {
                return None;
            };
            match serde_json::from_str::<FromGuard>(&l) {
                Ok(FromGuard::Retired) => return Some(early),
                Ok(FromGuard::Report { report }) => early.push(report),
                Ok(FromGuard::Lost { count }) => early.push(lost_notice(count)),
                // Another build's lines this one cannot read: named, not dropped.
                _ => early.push(FileReport::Problem(format!(
                    "file guard (pid {}) of another build sent a line this build cannot read: \
                     {l:?}",
                    self.pid
                ))),
            }
        }
    }
}

/// Waits (up to the start timeout) until no guard holds the lock of `paths`.
async fn wait_gone(paths: &GuardPaths) {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while super::service::lock_held(&paths.lock) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `agent-monitor file-guard` in a session of its own, so that neither the daemon's death
/// nor a signal to the daemon's process group or terminal reaches it. Its stderr is the
/// daemon's (journald under systemd). Reaped by a thread while the daemon lives; after that by
/// whoever adopts it. The returned cell is set when the child ends while this daemon lives.
fn spawn(pin_dir: &Path) -> anyhow::Result<std::sync::Arc<std::sync::OnceLock<String>>> {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("agent-monitor")
        .arg("file-guard")
        .arg("--pin-dir")
        .arg(pin_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting `agent-monitor file-guard`")?;
    let ended = std::sync::Arc::new(std::sync::OnceLock::new());
    let seen = ended.clone();
    std::thread::Builder::new()
        .name("file-guard-reaper".into())
        .spawn(move || {
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            let _ = seen.set(status);
        })
        .context("starting the file guard's reaper thread")?;
    Ok(ended)
}

fn lost_notice(count: u64) -> FileReport {
    FileReport::Problem(format!(
        "file guard: {count} report(s) of judged opens lost (its queue of {} was full while no \
         daemon took them); the verdicts applied",
        super::service::KEPT_REPORTS
    ))
}

/// The task that owns the connection.
struct LinkTask {
    paths: GuardPaths,
    pin_dir: PathBuf,
    reports: mpsc::Sender<FileReport>,
    lost: Arc<AtomicU64>,
    last_apply: Option<ToGuard>,
    last_roster: Option<ToGuard>,
    /// Told to every new guard again (held opens and decisions are not: they went with the old).
    last_asking: Option<ToGuard>,
    last_grants: Option<ToGuard>,
}

impl LinkTask {
    fn forward(&self, report: FileReport) {
        if self.reports.try_send(report).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn run(mut self, mut conn: Conn, mut commands: mpsc::UnboundedReceiver<ToGuard>) {
        loop {
            for r in std::mem::take(&mut conn.early) {
                self.forward(r);
            }
            let broken = tokio::select! {
                command = commands.recv() => match command {
                    // The daemon is stopping: the guard stays.
                    None => return,
                    Some(c) => {
                        match &c {
                            ToGuard::Apply { .. } => self.last_apply = Some(c.clone()),
                            ToGuard::Roster { .. } => self.last_roster = Some(c.clone()),
                            ToGuard::Asking { .. } => self.last_asking = Some(c.clone()),
                            ToGuard::Grants { .. } => self.last_grants = Some(c.clone()),
                            _ => {}
                        }
                        !conn.send(&c).await
                    }
                },
                line = conn.lines.next_line() => match line {
                    Ok(Some(l)) => {
                        self.on_line(&mut conn, &l).await;
                        false
                    }
                    Ok(None) | Err(_) => true,
                },
            };
            if broken {
                conn = self.replace(conn.pid).await;
            }
        }
    }

    async fn on_line(&mut self, conn: &mut Conn, line: &str) {
        match serde_json::from_str::<FromGuard>(line) {
            Ok(FromGuard::Report { report }) => {
                if matches!(report, FileReport::Applied(_))
                    && let Some(mut old) = conn.retiring.take()
                {
                    // The new guard has marked: the old one's marks may go.
                    let _ = old.send(&ToGuard::Exit).await;
                    tracing::info!(
                        "file guard (pid {}) of the previous build told to exit",
                        old.pid
                    );
                }
                if let FileReport::Hold(h) = &report {
                    // The daemon's loop cannot take it: refused now rather than at the timeout.
                    let hold = h.hold;
                    if self.reports.try_send(report).is_err() {
                        self.lost.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.send(&ToGuard::Decide { hold, allow: false }).await;
                    }
                    return;
                }
                self.forward(report);
            }
            Ok(FromGuard::Lost { count }) => {
                self.lost.fetch_add(count, Ordering::Relaxed);
                self.forward(lost_notice(count));
            }
            Ok(FromGuard::Hello { .. } | FromGuard::Retired) => {}
            Err(e) => self.forward(FileReport::Problem(format!(
                "file guard: a line the daemon cannot read ({e}): {line:?}"
            ))),
        }
    }

    /// The guard is gone (or stopped answering): a new one, with the last plan and roster.
    async fn replace(&mut self, pid: u32) -> Conn {
        self.forward(FileReport::Problem(format!(
            "file guard (pid {pid}) is gone: the kernel released its marks, so opens of denied \
             files are not judged (they succeed) until a new guard has marked them; starting one"
        )));
        loop {
            match Conn::establish(&self.paths, &self.pin_dir).await {
                Ok(mut conn) => {
                    let mut ok = true;
                    let told = [
                        &self.last_roster,
                        &self.last_apply,
                        &self.last_grants,
                        &self.last_asking,
                    ];
                    for c in told.into_iter().flatten() {
                        ok = ok && conn.send(c).await;
                    }
                    if ok {
                        return conn;
                    }
                }
                Err(e) => self.forward(FileReport::Problem(format!(
                    "file guard: cannot start a new one ({e:#}); retrying in 1 s"
                ))),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
