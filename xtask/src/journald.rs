//! Make sure a journald listens on its native socket, starting one if needed (and leaving it
//! running: see the crate documentation for why).

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const SOCKET: &str = "/run/systemd/journal/socket";
const JOURNALD: &str = "/lib/systemd/systemd-journald";
/// journald's own stdout/stderr, for when it fails to come up.
const LOG: &str = "/run/agent-monitor-journald.log";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn ensure_running() -> Result<()> {
    if is_live(Path::new(SOCKET)) {
        println!("journald: ok ({SOCKET})");
        return Ok(());
    }
    crate::setup::require_root(&format!("start {JOURNALD} ({SOCKET} is absent)"))?;
    start(Path::new(JOURNALD), Path::new(SOCKET), Path::new(LOG))
}

fn is_socket(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.file_type().is_socket())
}

/// A journald answers on the socket. A socket file left by a journald that died is not enough:
/// sends to it fail with ECONNREFUSED.
fn is_live(path: &Path) -> bool {
    is_socket(path)
        && std::os::unix::net::UnixDatagram::unbound().is_ok_and(|s| s.connect(path).is_ok())
}

/// Starts `journald` detached (own process group, so a Ctrl-C aimed at us does not reach it;
/// not waited for) and waits until `socket` appears.
fn start(journald: &Path, socket: &Path, log: &Path) -> Result<()> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut child = Command::new(journald)
        .stdin(Stdio::null())
        .stdout(
            log_file
                .try_clone()
                .with_context(|| format!("opening {}", log.display()))?,
        )
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", journald.display()))?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    // journald offers no readiness notification without systemd, so look for the socket.
    while !is_live(socket) {
        if let Some(status) = child.try_wait().context("checking on journald")? {
            bail!(
                "{} exited ({status}) before creating {}; see {}",
                journald.display(),
                socket.display(),
                log.display()
            );
        }
        if Instant::now() >= deadline {
            // Half-started and of no use to anyone: stop the one we started.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} (pid {}) did not create {} within {} s; see {}",
                journald.display(),
                child.id(),
                socket.display(),
                STARTUP_TIMEOUT.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "journald: started {} (pid {}, left running; output in {})",
        journald.display(),
        child.id(),
        log.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_socket() {
        assert!(!is_socket(Path::new("/proc/self/status")));
        assert!(!is_socket(Path::new("/nonexistent/socket")));
    }

    #[test]
    fn a_socket_nobody_listens_on_is_not_live() {
        let path = std::env::temp_dir().join(format!("xtask-dead-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixDatagram::bind(&path).unwrap());
        assert!(is_socket(&path));
        // A test spawning a process at the same moment can hold a copy of the fd between its fork
        // and exec; once that passes, nobody listens.
        let deadline = Instant::now() + Duration::from_secs(2);
        while is_live(&path) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_live(&path));
        std::fs::remove_file(&path).unwrap();
    }

    /// Starts the machine's journald if none runs (root; it is left running, like `xtask test`).
    #[test]
    #[ignore = "needs root and may start the system journald"]
    fn the_real_journald_comes_up() {
        ensure_running().unwrap();
        assert!(is_socket(Path::new(SOCKET)));
        // A second call finds it.
        ensure_running().unwrap();
    }

    #[test]
    fn a_program_that_exits_is_reported() {
        let dir = std::env::temp_dir().join(format!("xtask-journald-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = start(
            Path::new("/bin/false"),
            &dir.join("socket"),
            &dir.join("log"),
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("exited"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
