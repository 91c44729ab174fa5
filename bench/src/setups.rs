//! The monitors compared: agent-monitor's daemon, auditd with connect/execve rules, and a bpftrace
//! one-liner on the same events. Each is a guard: dropping it (also on error or panic) stops what
//! it started and puts the kernel settings it changed back.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Polls `ready` every `step` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, step: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(step);
    }
    ready()
}

/// Sends `sig` to `child` and waits up to `grace` for it to exit, then kills it.
fn stop_child(child: &mut Child, sig: i32, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, sig) };
    let t = Instant::now();
    while t.elapsed() < grace {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where one daemon keeps its socket, audit trail and log.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub bin: PathBuf,
    pub policies: PathBuf,
    pub dir: PathBuf,
    /// More `agent-monitor daemon` arguments (e.g. `--dns-upstream`).
    pub extra: Vec<String>,
}

/// A running `agent-monitor daemon` with a private control socket and a fresh JSON trail.
pub struct Daemon {
    child: Child,
    bin: PathBuf,
    /// Its own bpffs pin directory: a stopped daemon's pins keep enforcing (fail closed), so
    /// each is uninstalled when dropped, before the next setup measures.
    pin_dir: PathBuf,
    /// Its own grant state file (`--state-file`), beside its other files.
    state_file: PathBuf,
    pub socket: PathBuf,
    pub json: PathBuf,
    pub log: PathBuf,
    /// From spawn to the control socket answering (it is bound after enforcement is active).
    pub startup: Duration,
}

impl Daemon {
    pub fn start(cfg: &DaemonConfig, name: &str) -> anyhow::Result<Daemon> {
        let socket = cfg.dir.join(format!("{name}.sock"));
        let json = cfg.dir.join(format!("{name}.jsonl"));
        let log = cfg.dir.join(format!("{name}.log"));
        let state_file = cfg.dir.join(format!("{name}.grants.json"));
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/agent-monitor-bench-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&json);
        let t = Instant::now();
        let child = Command::new(&cfg.bin)
            .arg("daemon")
            .arg("--policies")
            .arg(&cfg.policies)
            .arg("--json-log")
            .arg(&json)
            .arg("--control-socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-file")
            .arg(&state_file)
            .args(&cfg.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            // Own process group: a Ctrl-C at the terminal reaches us, and we stop it in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", cfg.bin.display()))?;
        let mut d = Daemon {
            child,
            bin: cfg.bin.clone(),
            pin_dir,
            state_file,
            socket,
            json,
            log,
            startup: Duration::ZERO,
        };
        let up = wait_for(Duration::from_secs(30), Duration::from_millis(1), || {
            UnixStream::connect(&d.socket).is_ok()
        });
        d.startup = t.elapsed();
        if !up || matches!(d.child.try_wait(), Ok(Some(_))) {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            bail!("the daemon did not come up within 30 s; its log:\n{log}");
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `agent-monitor status --json` of this daemon.
    pub fn status(&self, bin: &Path) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(bin)
            .args(["status", "--json", "--control-socket"])
            .arg(&self.socket)
            .output()
            .context("running agent-monitor status")?;
        if !out.status.success() {
            bail!(
                "agent-monitor status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
        if self.pin_dir.exists() {
            let out = Command::new(&self.bin)
                .args(["daemon", "--uninstall", "--pin-dir"])
                .arg(&self.pin_dir)
                .arg("--state-file")
                .arg(&self.state_file)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "bench: removing the pins in {} failed: {}",
                    self.pin_dir.display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("bench: running agent-monitor daemon --uninstall: {e}"),
            }
        }
    }
}

/// auditd in the foreground with syscall rules on connect and execve (what an audit-based shop
/// runs), the backlog raised to auditd's packaged default so the kernel never blocks on it.
pub struct Auditd {
    child: Child,
    enabled_before: String,
    backlog_before: String,
}

const AUDIT_KEY: &str = "agent-monitor-bench";

fn auditctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("auditctl")
        .args(args)
        .output()
        .context("running auditctl")?;
    if !out.status.success() {
        bail!(
            "auditctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn audit_status(field: &str) -> anyhow::Result<String> {
    let s = auditctl(&["-s"])?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(' ').map(str::to_string))
        .with_context(|| format!("`auditctl -s` has no {field}: {s}"))
}

impl Auditd {
    pub fn start(log_dir: &Path) -> anyhow::Result<Auditd> {
        let enabled_before = audit_status("enabled")?;
        let backlog_before = audit_status("backlog_limit")?;
        if audit_status("pid")? != "0" {
            bail!("an audit daemon is already running; refusing to run a second one");
        }
        let err = File::create(log_dir.join("auditd.log"))?;
        let child = Command::new("auditd")
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .context("starting auditd -n (package auditd)")?;
        let a = Auditd {
            child,
            enabled_before,
            backlog_before,
        };
        let ok = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            audit_status("pid").is_ok_and(|p| p == a.child.id().to_string())
        });
        if !ok {
            bail!("auditd did not register with the kernel within 10 s");
        }
        auditctl(&["-b", "8192"])?;
        for syscall in ["connect", "execve"] {
            auditctl(&[
                "-a",
                "always,exit",
                "-F",
                "arch=b64",
                "-S",
                syscall,
                "-k",
                AUDIT_KEY,
            ])?;
        }
        Ok(a)
    }
}

impl Drop for Auditd {
    fn drop(&mut self) {
        if let Err(e) = auditctl(&["-D", "-k", AUDIT_KEY]) {
            eprintln!("bench: removing the audit rules: {e:#}");
        }
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
        for (flag, value) in [("-b", &self.backlog_before), ("-e", &self.enabled_before)] {
            if let Err(e) = auditctl(&[flag, value]) {
                eprintln!("bench: restoring audit {flag} {value}: {e:#}");
            }
        }
    }
}

/// What an engineer would hack up: bpftrace printing a line per connect and per exec, system-wide.
pub const BPFTRACE_SCRIPT: &str = r#"tracepoint:syscalls:sys_enter_connect { printf("%d %s connect\n", pid, comm); }
tracepoint:sched:sched_process_exec { printf("%d %s exec %s\n", pid, comm, str(args->filename)); }"#;

pub struct Bpftrace {
    child: Child,
}

impl Bpftrace {
    pub fn start(dir: &Path) -> anyhow::Result<Bpftrace> {
        let out_path = dir.join("bpftrace.out");
        let child = Command::new("bpftrace")
            .arg("-e")
            .arg(BPFTRACE_SCRIPT)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(dir.join("bpftrace.err"))?)
            .process_group(0)
            .spawn()
            .context("starting bpftrace (package bpftrace)")?;
        let mut b = Bpftrace { child };
        // Attached once an exec of ours shows up in its output.
        let ok = wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
            let _ = Command::new("/bin/true").status();
            std::fs::read_to_string(&out_path).is_ok_and(|s| s.contains("exec /bin/true"))
        });
        if !ok || matches!(b.child.try_wait(), Ok(Some(_))) {
            let err = std::fs::read_to_string(dir.join("bpftrace.err")).unwrap_or_default();
            bail!("bpftrace did not attach within 60 s: {err}");
        }
        Ok(b)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGINT, Duration::from_secs(10));
    }
}

/// dnsmasq on a loopback port as the upstream resolver of the DNS measurement, answering
/// `RECORD`s (`--address=/name/addr`) itself; no other source of answers.
pub struct Dnsmasq {
    child: Child,
    pub port: u16,
}

impl Dnsmasq {
    pub fn start(dir: &Path, port: u16, records: &[String]) -> anyhow::Result<Dnsmasq> {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--conf-file=/dev/null",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("dnsmasq.err"))?)
            .process_group(0)
            .spawn()
            .context("starting dnsmasq (package dnsmasq-base)")?;
        let mut d = Dnsmasq { child, port };
        // Up once its port is taken.
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(10), || {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_err()
        });
        if !up || matches!(d.child.try_wait(), Ok(Some(_))) {
            let err = std::fs::read_to_string(dir.join("dnsmasq.err")).unwrap_or_default();
            bail!("dnsmasq did not come up on 127.0.0.1:{port}: {err}");
        }
        Ok(d)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}

/// `agent-monitor-bench load listen` on 127.0.0.1:PORT: the connect measurement's server.
pub struct Listener {
    child: Child,
}

impl Listener {
    pub fn start(bench: &Path, port: u16) -> anyhow::Result<Listener> {
        let mut child = Command::new(bench)
            .args(["load", "listen", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("starting the connect measurement's listener")?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let mut l = Listener { child };
        if line.trim() != "ready" {
            stop_child(&mut l.child, libc::SIGKILL, Duration::from_secs(1));
            bail!("the listener on 127.0.0.1:{port} did not start: {line:?}");
        }
        Ok(l)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}
