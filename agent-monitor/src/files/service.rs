//! The file-guard process (`agent-monitor file-guard`, hidden; the daemon starts it): owns the
//! fanotify group, so that the marks, and the refusals of agents' opens, outlive the daemon. A
//! daemon connects on the guard's socket, pushes the agents' `[files]` and the selectors, and
//! takes the reports; while no daemon is connected the guard keeps answering from what it was
//! last told (host processes at once, agents by the last plan) and keeps its reports in a bounded
//! queue, counting what does not fit. It ends on `Exit` (`daemon --uninstall`), when its pin
//! directory is gone, or by a signal (then the kernel releases the group: see docs/files.md).

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::wire::{self, FromGuard, GuardPaths, ToGuard};
use super::{FileGuard, FileReport};

/// Reports kept while no daemon is connected, at most; more are counted.
pub const KEPT_REPORTS: usize = 4096;
/// A daemon that does not take a line within this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct FileGuardArgs {
    /// The pin directory of the daemon this guard serves: the guard's socket and lock are named
    /// after it, and the guard ends when it is removed (`daemon --uninstall`).
    #[arg(long, value_name = "DIR", default_value = crate::bpf::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub fn main(args: FileGuardArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-monitor file-guard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(&args.pin_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("file guard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reports waiting for a daemon, and the count of those that did not fit.
#[derive(Debug, Default)]
pub struct Kept {
    reports: VecDeque<FileReport>,
    pub lost: u64,
}

impl Kept {
    pub fn push(&mut self, r: FileReport) {
        if self.reports.len() >= KEPT_REPORTS {
            self.lost += 1;
        } else {
            self.reports.push_back(r);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    fn take(&mut self) -> (Vec<FileReport>, u64) {
        (
            self.reports.drain(..).collect(),
            std::mem::take(&mut self.lost),
        )
    }
}

/// The single-instance lock (flock on a file in the runtime directory), held while serving.
struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    fn take(path: &Path) -> anyhow::Result<Lock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "{}: another file guard serves this pin directory ({e})",
                path.display()
            );
        }
        Ok(Lock(file))
    }
}

/// Whether a guard holds the lock at `path` now.
pub fn lock_held(path: &Path) -> bool {
    path.exists() && Lock::take(path).is_err()
}

struct Daemon {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    out: OwnedWriteHalf,
}

impl Daemon {
    async fn send(&mut self, message: &FromGuard) -> bool {
        matches!(
            tokio::time::timeout(WRITE_TIMEOUT, self.out.write_all(&wire::line(message))).await,
            Ok(Ok(()))
        )
    }
}

fn open_tags(pin_dir: &Path) -> Option<crate::bpf::ThreadTags> {
    crate::bpf::ThreadTags::open(pin_dir)
        .map_err(|e| {
            tracing::warn!(
                "file guard: executable-selector tags unreadable ({e:#}); processes that are \
                 agents only by an executable selector are judged as outside every agent"
            )
        })
        .ok()
}

async fn serve(pin_dir: &Path) -> anyhow::Result<()> {
    let paths = GuardPaths::for_pin_dir(pin_dir);
    if let Some(dir) = paths.socket.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut lock = Some(Lock::take(&paths.lock)?);
    // Holding the lock: a socket file left there is a dead guard's.
    let _ = std::fs::remove_file(&paths.socket);
    let mut listener = Some(
        UnixListener::bind(&paths.socket)
            .with_context(|| format!("binding {}", paths.socket.display()))?,
    );
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))?;
    let (guard, mut reports) = FileGuard::start(open_tags(pin_dir))?;
    let pid = std::process::id();
    tracing::info!(
        "file guard (pid {pid}) serves {} on {}",
        pin_dir.display(),
        paths.socket.display()
    );
    let build = wire::this_build();
    let mut kept = Kept::default();
    let mut daemon: Option<Daemon> = None;
    let mut retired = false;
    let mut lost_seen = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            accepted = accept(listener.as_ref()) => {
                let stream: UnixStream = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("file guard: accepting a connection: {e}");
                        continue;
                    }
                };
                // The newest daemon wins: only one runs per pin directory.
                let (r, w) = stream.into_split();
                let mut d = Daemon { lines: BufReader::new(r).lines(), out: w };
                let (queued, lost) = kept.take();
                let hello = FromGuard::Hello {
                    protocol: wire::PROTOCOL,
                    build: build.clone(),
                    pid,
                    queued: queued.len(),
                };
                let mut ok = d.send(&hello).await;
                for report in queued {
                    if ok {
                        ok = d.send(&FromGuard::Report { report }).await;
                    } else {
                        kept.push(report);
                    }
                }
                if lost > 0 {
                    if ok {
                        ok = d.send(&FromGuard::Lost { count: lost }).await;
                    } else {
                        kept.lost += lost;
                    }
                }
                // The newest daemon wins: the opens held for the one before are denied (the new
                // one never heard of them), and none is held until it says it takes them.
                guard.daemon_gone();
                if ok {
                    tracing::info!("file guard: a daemon connected");
                    daemon = Some(d);
                }
            }
            line = next_line(daemon.as_mut()) => {
                let line = match line {
                    Ok(Some(l)) => l,
                    Ok(None) | Err(_) => {
                        daemon = None;
                        // Fail closed: every held open is denied now (reported with the others).
                        guard.daemon_gone();
                        if retired {
                            tracing::info!("file guard (pid {pid}): retired and its daemon is gone; exiting");
                            break Ok(());
                        }
                        tracing::warn!(
                            "file guard (pid {pid}): the daemon is gone; the marks stay and \
                             agents' opens of denied files are still refused"
                        );
                        continue;
                    }
                };
                match serde_json::from_str::<ToGuard>(&line) {
                    Ok(ToGuard::Apply { agents }) => {
                        guard.set_tags(open_tags(pin_dir));
                        guard.apply(agents.into_iter().map(wire::WireAgentFiles::into_agent_files).collect());
                    }
                    Ok(ToGuard::Roster { roster }) => guard.set_roster(roster),
                    Ok(ToGuard::Retire) => {
                        listener = None;
                        let _ = std::fs::remove_file(&paths.socket);
                        drop(lock.take());
                        retired = true;
                        // The new guard asks the daemon from now on: this one holds nothing more.
                        guard.daemon_gone();
                        tracing::info!("file guard (pid {pid}): retiring; marks held until told to exit");
                        if let Some(d) = daemon.as_mut()
                            && !d.send(&FromGuard::Retired).await
                        {
                            daemon = None;
                        }
                    }
                    Ok(ToGuard::Asking { timeout_ms }) if !retired => {
                        guard.set_asking(Duration::from_millis(timeout_ms));
                    }
                    Ok(ToGuard::Asking { .. }) => {}
                    Ok(ToGuard::Decide { hold, allow }) => guard.decide(hold, allow),
                    Ok(ToGuard::Grants { grants }) => guard.set_grants(grants),
                    Ok(ToGuard::Exit) => {
                        tracing::info!("file guard (pid {pid}): told to exit; the marks go");
                        break Ok(());
                    }
                    Err(e) => tracing::warn!("file guard: a line it cannot read ({e}): {line:?}"),
                }
            }
            report = reports.recv() => {
                // The guard thread is gone (and with it the group): exit, so that a daemon
                // starts a guard that answers.
                let Some(report) = report else {
                    break Err(anyhow::anyhow!("the guard thread stopped; exiting"));
                };
                let delivered = match daemon.as_mut() {
                    Some(d) => d.send(&FromGuard::Report { report: report.clone() }).await,
                    None => false,
                };
                if !delivered {
                    if daemon.take().is_some() {
                        tracing::warn!("file guard: the daemon does not take reports; keeping them");
                    }
                    // No daemon to decide: every held open is denied now (and reported so by
                    // the guard thread). A held open goes to a daemon only, never to the kept
                    // reports.
                    guard.daemon_gone();
                    if !matches!(report, FileReport::Hold(_)) {
                        kept.push(report);
                    }
                }
            }
            _ = tick.tick() => {
                if !pin_dir.exists() {
                    tracing::info!(
                        "file guard (pid {pid}): {} is gone (uninstalled); exiting",
                        pin_dir.display()
                    );
                    break Ok(());
                }
                let lost = guard.lost();
                if lost > lost_seen {
                    let count = lost - lost_seen;
                    lost_seen = lost;
                    let sent = match daemon.as_mut() {
                        Some(d) => d.send(&FromGuard::Lost { count }).await,
                        None => false,
                    };
                    if !sent {
                        kept.lost += count;
                    }
                }
            }
        }
    };
    // A retired guard's socket and lock are its successor's now.
    if !retired {
        let _ = std::fs::remove_file(&paths.socket);
        let _ = std::fs::remove_file(&paths.lock);
    }
    outcome
}

async fn accept(listener: Option<&UnixListener>) -> std::io::Result<UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn next_line(daemon: Option<&mut Daemon>) -> std::io::Result<Option<String>> {
    match daemon {
        Some(d) => d.lines.next_line().await,
        None => std::future::pending().await,
    }
}

/// `daemon --uninstall`: tells the guard of `pin_dir` to exit and waits (up to 3 s) until it
/// has. Returns its pid, or None when no guard served the directory.
pub fn stop(pin_dir: &Path) -> anyhow::Result<Option<u32>> {
    use std::io::{BufRead as _, Write as _};
    let paths = GuardPaths::for_pin_dir(pin_dir);
    let stream = match std::os::unix::net::UnixStream::connect(&paths.socket) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = std::io::BufReader::new(&stream);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .context("reading the file guard's greeting")?;
    let pid = match serde_json::from_str::<FromGuard>(&first) {
        Ok(FromGuard::Hello { pid, .. }) => Some(pid),
        _ => None,
    };
    // The guard's process, not its lock: the guard drops the lock (and removes its file) before
    // its fanotify group is closed, and the denials end only with the group, i.e. with the
    // process.
    let process = crate::identity::peer::peer_pidfd(std::os::fd::AsRawFd::as_raw_fd(&stream))
        .context("naming the file guard's process (SO_PEERPIDFD)")?;
    (&stream)
        .write_all(&wire::line(&ToGuard::Exit))
        .context("telling the file guard to exit")?;
    if !exited_within(&process, Duration::from_secs(3))? {
        bail!(
            "the file guard (pid {}) did not exit within 3 s",
            pid.map_or("?".into(), |p| p.to_string())
        );
    }
    let _ = std::fs::remove_file(&paths.lock);
    Ok(pid.or(Some(0)))
}

/// Whether the process behind `pidfd` exits within `timeout` (a pidfd polls readable once the
/// process has exited, zombie or reaped: its descriptors are closed by then).
fn exited_within(pidfd: &std::os::fd::OwnedFd, timeout: Duration) -> anyhow::Result<bool> {
    use std::os::fd::AsRawFd as _;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow::Error::new(e).context("waiting for the file guard to exit"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_has_exited_when_its_process_has_not_when_it_lives() {
        use std::os::fd::FromRawFd as _;
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .expect("sleep");
        // SAFETY: pidfd_open of our own child; the kernel returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptor was just returned to us.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        assert!(
            !exited_within(&pidfd, Duration::from_millis(50)).unwrap(),
            "still sleeping"
        );
        assert!(
            exited_within(&pidfd, Duration::from_secs(5)).unwrap(),
            "sleep 0.3 ended"
        );
        child.wait().expect("reaped");
        assert!(
            exited_within(&pidfd, Duration::ZERO).unwrap(),
            "reaped: still exited"
        );
    }

    #[test]
    fn kept_reports_are_bounded_and_the_rest_counted() {
        let mut k = Kept::default();
        for i in 0..KEPT_REPORTS + 3 {
            k.push(FileReport::Problem(format!("p{i}")));
        }
        assert_eq!(k.len(), KEPT_REPORTS);
        let (reports, lost) = k.take();
        assert_eq!(reports.len(), KEPT_REPORTS);
        assert_eq!(reports[0], FileReport::Problem("p0".into()), "oldest first");
        assert_eq!(lost, 3);
        assert_eq!(k.len(), 0);
        assert_eq!(k.lost, 0, "taken with the reports");
    }

    #[test]
    fn a_second_guard_of_the_same_pins_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("g.lock");
        let first = Lock::take(&path).expect("first");
        let second = Lock::take(&path);
        assert!(second.is_err(), "a second guard took the lock");
        assert!(lock_held(&path));
        drop(first);
        assert!(!lock_held(&path));
    }
}
