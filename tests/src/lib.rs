//! Harness for the privileged end-to-end tests: start the real daemon on policies written by the
//! test, run real programs as agents through `agent-monitor run`, read back journald and the JSON
//! audit trail.
//!
//! The daemon binary comes from `AGENT_MONITOR_BIN` (set by `cargo xtask test`), else
//! `target/release/agent-monitor`.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// True when the test may go on. Not root: under CI a failure, elsewhere a loud skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: privileged test needs root and CI is set: refusing to skip");
    }
    eprintln!("\n!!! SKIPPED {test}: needs root (set CI=1 to make this a failure) !!!\n");
    false
}

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENT_MONITOR_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/agent-monitor")
}

/// An agent name unique to this test run, so journald queries see only this run's entries.
pub fn unique_agent(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("e2e-{label}-{}-{nanos}", std::process::id())
}

/// A loopback TCP listener that accepts (and drops) connections in the background.
pub fn listener_v4() -> u16 {
    listen("127.0.0.1:0")
}

pub fn listener_v6() -> Option<u16> {
    TcpListener::bind("[::1]:0").ok().map(|l| {
        let port = l.local_addr().unwrap().port();
        spawn_acceptor(l);
        port
    })
}

fn listen(addr: &str) -> u16 {
    let l = TcpListener::bind(addr).expect("binding a loopback listener");
    let port = l.local_addr().unwrap().port();
    spawn_acceptor(l);
    port
}

fn spawn_acceptor(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
}

/// A running daemon with its own policy directory, control socket, JSON audit trail, grant state
/// file and bpffs pin directory (removed, with the enforcement it holds, when the `Daemon` is
/// dropped).
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub json_log: PathBuf,
    pub stderr_log: PathBuf,
    pub policies: PathBuf,
    pub pin_dir: PathBuf,
    /// `--state-file`: the task grants a restarted daemon takes over.
    pub state_file: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    starts: u32,
}

/// A bpffs directory of this test alone (never the default `/sys/fs/bpf/agent-monitor`).
pub fn private_pin_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    PathBuf::from(format!(
        "/sys/fs/bpf/agent-monitor-test-{}-{nanos}",
        std::process::id()
    ))
}

impl Daemon {
    /// Writes `policies` (file name, TOML text) and starts the daemon; waits until it serves.
    pub fn start(policies: &[(String, String)]) -> Daemon {
        Self::start_with(policies, &[])
    }

    /// Like `start`, with extra `agent-monitor daemon` arguments.
    pub fn start_with(policies: &[(String, String)], extra: &[&str]) -> Daemon {
        Self::start_with_env(policies, extra, &[])
    }

    /// Like `start_with`, with extra environment variables for the daemon.
    pub fn start_with_env(
        policies: &[(String, String)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let pdir = dir.path().join("policies");
        std::fs::create_dir(&pdir).unwrap();
        for (name, text) in policies {
            std::fs::write(pdir.join(name), text).unwrap();
        }
        let mut d = Daemon {
            child: None,
            socket: dir.path().join("control.sock"),
            json_log: dir.path().join("audit.jsonl"),
            stderr_log: dir.path().join("daemon.log"),
            policies: pdir,
            pin_dir: private_pin_dir(),
            state_file: dir.path().join("grants.json"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
            dir,
        };
        d.spawn();
        d
    }

    /// Starts the daemon process (again, after `kill9` or `stop`: same dirs, same pins).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        // Each start logs to its own file so a restart's log shows what it adopted.
        if self.starts > 1 {
            self.stderr_log = self.dir.path().join(format!("daemon.{}.log", self.starts));
        }
        let child = Command::new(binary())
            .args(["daemon", "--policies"])
            .arg(&self.policies)
            .arg("--json-log")
            .arg(&self.json_log)
            .arg("--control-socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-file")
            .arg(&self.state_file)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.stderr_log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// SIGKILL: the daemon gets no chance to clean anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Writes (or replaces) a policy file in the daemon's policy directory.
    pub fn write_policy(&self, name: &str, text: &str) {
        std::fs::write(self.policies.join(name), text).unwrap();
    }

    /// `agent-monitor reload`.
    pub fn reload(&self) -> Output {
        Command::new(binary())
            .args(["reload", "--control-socket"])
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// `agent-monitor daemon --uninstall` on this daemon's pin directory.
    pub fn uninstall(&self) -> Output {
        Command::new(binary())
            .args(["daemon", "--uninstall", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-file")
            .arg(&self.state_file)
            .output()
            .unwrap()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({status}):\n{}", self.log());
            }
            // The socket file may be a stale one of a killed predecessor: only an answer counts.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() && self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon not ready after 30 s:\n{}", self.log());
    }

    fn answers(&self) -> bool {
        Command::new(binary())
            .args(["status", "--json", "--control-socket"])
            .arg(&self.socket)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// `agent-monitor run --agent AGENT [--task TASK] -- CMD…`, waited for.
    pub fn run(&self, agent: &str, task: Option<&str>, cmd: &[&str]) -> Output {
        let mut c = Command::new(binary());
        c.arg("run")
            .arg("--control-socket")
            .arg(&self.socket)
            .args(["--agent", agent]);
        if let Some(t) = task {
            c.args(["--task", t]);
        }
        c.arg("--").args(cmd);
        c.output().expect("running agent-monitor run")
    }

    /// `agent-monitor status --json`.
    pub fn status(&self) -> Value {
        let out = Command::new(binary())
            .args(["status", "--json", "--control-socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "status failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Every line of the JSON audit trail so far.
    pub fn audit(&self) -> Vec<Value> {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.json_log) {
            f.read_to_string(&mut s).unwrap();
        }
        // Only whole lines: the daemon may be half-way through appending the last one (a reader
        // of a regular file can see a write in progress).
        s.split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits (up to 10 s) for an audit record matching `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.audit().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no audit record {what} within 10 s; audit trail:\n{:#?}\ndaemon log:\n{}",
                    self.audit(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // The pins would keep this test's programs attached forever.
        if self.pin_dir.exists() {
            let out = self.uninstall();
            if !out.status.success() {
                eprintln!(
                    "removing test pins {} failed: {}",
                    self.pin_dir.display(),
                    text(&out.stderr)
                );
            }
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The outcome a probe script printed as a `NAME OUTCOME` line (`ok`, `errno 1`, …); panics with
/// both streams when the line is missing.
pub fn outcome(out: &Output, name: &str) -> String {
    let stdout = text(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "no outcome for {name}; stdout:\n{stdout}\nstderr:\n{}",
                text(&out.stderr)
            )
        })
}

/// journald entries of agent-monitor for `agent`, as `journalctl -o json` gives them.
pub fn journal(agent: &str) -> Vec<Value> {
    journal_matching(&[format!("AGENT_ID={agent}")])
}

/// Waits (up to 10 s) for a journald entry of `agent` matching `pred`.
pub fn wait_journal(agent: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = journal(agent).into_iter().find(|v| pred(v)) {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "no journald entry {what} for {agent} within 10 s; entries:\n{:#?}",
                journal(agent)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A string field of a JSON object ("" when absent).
pub fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name).and_then(Value::as_str).unwrap_or("")
}

pub const PYTHON: &str = "/usr/bin/python3";
pub const SH: &str = "/bin/sh";

/// A python3 one-liner that connects to HOST:PORT and exits 0 on success, 10 + errno on error.
pub fn py_connect(host: &str, port: u16) -> String {
    let family = if host.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    format!(
        "import socket,sys\ns=socket.socket(socket.{family})\ntry:\n  s.connect(('{host}',{port}))\nexcept OSError as e:\n  print('errno',e.errno);sys.exit(10+e.errno)\nprint('connected')"
    )
}

/// The trusted journald matches docs/reports.md teaches (`_UID=0 _EXE=<the daemon's binary>`): only
/// entries the daemon under test wrote, never one another process forged with agent-monitor's
/// field names. journald reads `_EXE` from `/proc/PID/exe`, the canonical path.
pub fn daemon_entry_matches() -> Vec<String> {
    let exe = std::fs::canonicalize(binary()).expect("the agent-monitor binary");
    vec!["_UID=0".to_string(), format!("_EXE={}", exe.display())]
}

/// journald entries of agent-monitor matching every `FIELD=value` in `matches`, queried the way
/// users are told to (see [`daemon_entry_matches`]).
pub fn journal_matching(matches: &[String]) -> Vec<Value> {
    let out = Command::new("journalctl")
        .args(["-o", "json", "--no-pager", "-t", "agent-monitor"])
        .args(daemon_entry_matches())
        .args(matches)
        .output()
        .expect("running journalctl");
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.0 from 127.0.0.1:port: (status line, body).
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to metrics");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The kernel's bpf_links whose program is one of `program_ids` (aya reads them with
/// BPF_LINK_GET_NEXT_ID), as (link id, program id).
pub fn kernel_links_of(program_ids: &[u64]) -> Vec<(u32, u32)> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| program_ids.contains(&u64::from(l.program_id())))
        .map(|l| (l.id(), l.program_id()))
        .collect()
}

// ---- identity, tasks and grants (issue 4) ----

impl Daemon {
    /// `agent-monitor <args…> --control-socket <ours>`, waited for (task start/end, status…).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .expect("running agent-monitor")
    }

    /// `agent-monitor run --agent AGENT --task TASK [extra…] -- CMD…`, not waited for; stdout piped.
    /// `run` with options before the command (`--user nobody`, `--keep-capabilities`), waited for.
    pub fn run_with(&self, agent: &str, options: &[&str], cmd: &[&str]) -> Output {
        Command::new(binary())
            .arg("run")
            .arg("--control-socket")
            .arg(&self.socket)
            .args(["--agent", agent])
            .args(options)
            .arg("--")
            .args(cmd)
            .output()
            .expect("running agent-monitor run")
    }

    pub fn spawn_run(&self, agent: &str, task: &str, extra: &[&str], cmd: &[&str]) -> Child {
        Command::new(binary())
            .arg("run")
            .arg("--control-socket")
            .arg(&self.socket)
            .args(["--agent", agent, "--task", task])
            .args(extra)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning agent-monitor run")
    }
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's grant expiry (bpf_ktime_get_ns) and of
/// Python's `time.monotonic()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// sha256 of a file as 64 hex digits (sha256sum).
pub fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// The cgroup v2 mount (hybrid hosts: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// A cgroup made for one test, removed (after its processes are gone) on drop.
pub struct TestCgroup {
    /// Host path.
    pub path: PathBuf,
    /// Path below the cgroup v2 root, as a policy names it.
    pub rel: String,
    top: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2>/<top>/<inner…>`; `rel` names `<top>/<inner>`.
    pub fn new(top: &str, inner: &str) -> TestCgroup {
        let root = cgroup2_root();
        let rel = format!("/{top}/{inner}");
        let path = root.join(top).join(inner);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup {
            path,
            rel,
            top: root.join(top),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Deepest first; a cgroup with processes left cannot go (they are ours and exiting).
        for _ in 0..50 {
            let mut dirs: Vec<PathBuf> = walk_dirs(&self.top);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
            if !self.top.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A real DNS server for the DNS tests: dnsmasq on 127.0.0.1 at a free port, with only the
/// records the test gives (`--address`, `--host-record`, `--cname`, …), logging every query it
/// receives so a test can prove a refused name never reached it.
pub struct Dnsmasq {
    child: Option<Child>,
    pub addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    pub fn start(records: &[&str]) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_udp_port();
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--conf-file=/dev/null",
                "--log-queries",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-facility={}",
                dir.path().join("log").display()
            ))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting dnsmasq (cargo xtask setup installs it): {e}"));
        let d = Dnsmasq {
            child: Some(child),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        d.wait_ready();
        d
    }

    /// Until dnsmasq answers anything on its port.
    fn wait_ready(&self) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // A query for "ready." type A.
        let query =
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ready\x00\x00\x01\x00\x01";
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let _ = sock.send_to(query, self.addr);
            let mut buf = [0u8; 512];
            if sock.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!(
            "dnsmasq did not answer on {} within 10 s:\n{}",
            self.addr,
            self.log()
        );
    }

    /// dnsmasq's query log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Whether dnsmasq ever received a query for `name` (in any letter case).
    pub fn was_asked(&self, name: &str) -> bool {
        let needle = format!(" {} from", name.to_lowercase());
        self.log()
            .to_lowercase()
            .lines()
            .any(|l| l.contains("query[") && l.contains(&needle))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

/// A bash one-liner body that connects to 127.0.0.1:PORT through /dev/tcp: exit 0 connected,
/// 1 refused (bash prints the errno text, e.g. "Operation not permitted").
pub fn bash_connect(port: u16) -> String {
    format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")
}

/// A policy file (name, TOML) in enforce mode with the given allowlists and `[identity]` body.
pub fn identity_policy(
    agent: &str,
    net: &[String],
    exec: &[&str],
    identity: &str,
) -> (String, String) {
    let list = |v: &mut dyn Iterator<Item = String>| {
        v.map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
    };
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n[identity]\n{identity}\n",
            list(&mut net.iter().cloned()),
            list(&mut exec.iter().map(|s| s.to_string()))
        ),
    )
}

/// A UDP port free on 127.0.0.1 right now (the OS picks it; the socket is closed again).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP port");
    s.local_addr().unwrap().port()
}

/// A TCP listener on `ip` (any loopback address) that accepts and drops connections.
pub fn listener_on(ip: &str) -> u16 {
    let addr = if ip.contains(':') {
        format!("[{ip}]:0")
    } else {
        format!("{ip}:0")
    };
    listen(&addr)
}

/// An agent-side DNS client in python3: each argument is one operation, each prints one JSON line.
/// - `q SERVER NAME TYPE udp|tcp`: a hand-built query to SERVER:53 (A=1, AAAA=28, TXT=16); prints
///   the rcode, the A/AAAA addresses, and the peer the reply came from (recvfrom / getpeername).
/// - `qp SERVER PORT NAME TYPE udp|tcp`: the same to another port.
/// - `gai NAME`: `getaddrinfo` through the system resolver (the host's resolv.conf).
/// - `c IP PORT`: a TCP connect; prints `ok` or the errno.
/// - `u IP PORT`: one UDP datagram with `sendto` (no connect); prints `ok` or the errno.
///
/// Hand-built on purpose: the product parses DNS with a library, the test checks it against bytes
/// written independently.
pub const PY_DNS_CLIENT: &str = r#"
import json, random, socket, struct, sys
def build(name, qtype):
    q = struct.pack('>HHHHHH', random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
    for label in name.rstrip('.').split('.'):
        q += bytes([len(label)]) + label.encode()
    return q + b'\0' + struct.pack('>HH', qtype, 1)
def skip_name(r, i):
    while True:
        l = r[i]
        if l == 0: return i + 1
        if l & 0xc0 == 0xc0: return i + 2
        i += l + 1
def parse(r):
    _, flags, qd, an, _, _ = struct.unpack('>HHHHHH', r[:12])
    i = 12
    for _ in range(qd): i = skip_name(r, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(r, i)
        t, _, ttl, n = struct.unpack('>HHIH', r[i:i + 10]); i += 10
        if t == 1: addrs.append(socket.inet_ntop(socket.AF_INET, r[i:i + n]))
        if t == 28: addrs.append(socket.inet_ntop(socket.AF_INET6, r[i:i + n]))
        i += n
    return flags & 0xf, addrs
def recv_exact(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise OSError('closed')
        b += c
    return b
def query(server, name, qtype, transport, port=53):
    fam = socket.AF_INET6 if ':' in server else socket.AF_INET
    q = build(name, int(qtype))
    if transport == 'tcp':
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(5); s.connect((server, port))
        s.sendall(struct.pack('>H', len(q)) + q)
        r = recv_exact(s, struct.unpack('>H', recv_exact(s, 2))[0]); peer = s.getpeername()
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
        s.sendto(q, (server, port)); r, peer = s.recvfrom(65535)
    rcode, addrs = parse(r)
    return {'rcode': rcode, 'addrs': addrs, 'peer': peer[0], 'peer_port': peer[1]}
out = []
args = sys.argv[1:]
while args:
    op = args.pop(0)
    try:
        if op == 'q':
            server, name, qtype, transport = args[:4]; del args[:4]
            res = dict(op='q', name=name, **query(server, name, qtype, transport))
        elif op == 'qp':
            server, port, name, qtype, transport = args[:5]; del args[:5]
            res = dict(op='qp', name=name, **query(server, name, qtype, transport, int(port)))
        elif op == 'gai':
            name = args.pop(0)
            res = {'op': 'gai', 'name': name, 'addrs': sorted({a[4][0] for a in socket.getaddrinfo(name, 1, type=socket.SOCK_STREAM)})}
        elif op == 'c':
            ip, port = args[:2]; del args[:2]
            s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET); s.settimeout(5)
            s.connect((ip, int(port))); s.close()
            res = {'op': 'c', 'ip': ip, 'port': int(port), 'ok': True}
        elif op == 'u':
            ip, port = args[:2]; del args[:2]
            s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b'datagram', (ip, int(port))); s.close()
            res = {'op': 'u', 'ip': ip, 'port': int(port), 'ok': True}
    except OSError as e:
        res = {'op': op, 'error': str(e), 'errno': e.errno}
    print(json.dumps(res), flush=True)
"#;

/// A loopback UDP socket that counts the datagrams it receives (in the background).
pub struct UdpSink {
    pub port: u16,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl UdpSink {
    pub fn bind(addr: &str) -> UdpSink {
        let s = std::net::UdpSocket::bind(addr).expect("binding a loopback UDP socket");
        let port = s.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while s.recv_from(&mut buf).is_ok() {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        UdpSink { port, received }
    }

    /// Datagrams received so far (after a short wait for the ones in flight).
    pub fn received(&self) -> usize {
        std::thread::sleep(Duration::from_millis(200));
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A TCP listener on `addr` that counts accepted connections and answers each with a minimal
/// HTTP response (so curl succeeds against it).
pub struct CountingListener {
    pub port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingListener {
    pub fn bind(addr: &str) -> CountingListener {
        let l = TcpListener::bind(addr).expect("binding a loopback listener");
        let port = l.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = accepted.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 1024];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let _ = std::io::Write::write_all(
                    &mut s,
                    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                );
            }
        });
        CountingListener { port, accepted }
    }

    pub fn accepted(&self) -> usize {
        std::thread::sleep(Duration::from_millis(200));
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Compiles a C program with gcc into `dir`; returns its path.
pub fn compile_c(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let out = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("running gcc (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "gcc {name}.c failed: {}",
        text(&out.stderr)
    );
    bin
}

/// Runs CMD as the unprivileged user nobody (65534), no supplementary groups.
pub const AS_NOBODY: [&str; 5] = [
    "/usr/bin/setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// `agent-monitor ARGS…` (a client command such as `policy suggest`), waited for.
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary().display()))
}

/// Kills a test's process group when dropped, so a test that fails half-way (a daemon that did
/// not start, an assertion) leaves no shells or interpreters behind waiting for a go-ahead, holding
/// the privileged-test lock's children. Spawn the leader with `.process_group(0)`.
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group; ESRCH when it already ended.
        unsafe { libc::kill(-(self.0 as i32), libc::SIGKILL) };
    }
}

/// A policy file (name, text) for `agent` in `mode` with these network and exec entries.
pub fn mode_policy(agent: &str, mode: &str, net: &[&str], exec: &[&str]) -> (String, String) {
    let q = |v: &[&str]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
            q(net),
            q(exec)
        ),
    )
}
/// Python prelude for probe scripts: `attempt(name, fn)` prints `name ok` or `name errno N` (read
/// back with [`outcome`]). Imports what the probes of every test file use.
pub const PY_ATTEMPT: &str = r#"import errno, os, socket, struct, subprocess, sys, time
def attempt(name, f):
    try:
        f()
        print(name, 'ok', flush=True)
    except OSError as e:
        print(name, 'errno', e.errno, flush=True)
"#;

impl Daemon {
    /// `run` as `agent` (task `task`) of a probe that prints one JSON value a line, one per
    /// operation: asserts that it succeeded (else fails with its output and the daemon's log)
    /// and returns the values.
    pub fn run_json_lines(&self, agent: &str, task: Option<&str>, cmd: &[&str]) -> Vec<Value> {
        let out = self.run(agent, task, cmd);
        assert!(
            out.status.success(),
            "agent failed: {}\n{}\ndaemon log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        let results: Vec<Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect();
        // The command without its script (an argument of several lines).
        let shown: Vec<&&str> = cmd.iter().filter(|a| !a.contains('\n')).collect();
        eprintln!("{agent}: {shown:?} -> {results:#?}");
        results
    }
}

/// Where `program` is attached, as `status` lists it ("cgroup/… at <path>", without the
/// " (adopted)" mark); None when it is not attached.
pub fn attached_at(status: &Value, program: &str) -> Option<String> {
    status["mechanisms"]["attached"]
        .as_array()
        .expect("status lists what is attached")
        .iter()
        .filter_map(|a| a.as_str())
        .find_map(|a| a.strip_prefix(&format!("{program} → ")))
        .map(|a| a.trim_end_matches(" (adopted)").to_string())
}

/// A helper process a test started (a server), killed and reaped when the guard goes (also
/// when the test fails).
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `python3 -c script args…` and waits for its first line to be `ready`.
pub fn python_ready(script: &str, args: &[&str]) -> ChildGuard {
    use std::io::BufRead as _;
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting a python3 helper");
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the helper's ready line");
    assert_eq!(line.trim(), "ready", "python3 helper did not start");
    guard
}

/// Polls `done` every 50 ms until it holds; fails with `failure()` once `timeout` has passed
/// without it.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, failure: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", failure());
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Daemon {
    /// An upgrade: stops the daemon, makes its pins look like another build's (the object hash in
    /// the pinned state map differs) and starts it again on them.
    pub fn restart_as_another_build(&mut self) {
        self.stop();
        let data = aya::maps::MapData::from_pin(self.pin_dir.join("maps/DAEMON_STATE")).unwrap();
        let map = aya::maps::Map::from_map_data(data).unwrap();
        let mut state: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map).unwrap();
        state.set(1, 42, 0).unwrap();
        drop(state);
        self.spawn();
    }
}

/// Every held request `pending --json` lists (whatever wraps them: an array, `{"requests":…}`
/// or one per line).
pub fn pending_requests(d: &Daemon) -> Vec<Value> {
    let out = d.cli(&["pending", "--json"]);
    assert!(
        out.status.success(),
        "pending --json failed: {}",
        text(&out.stderr)
    );
    let mut found = Vec::new();
    fn walk(v: &Value, found: &mut Vec<Value>) {
        match v {
            Value::Object(m) if m.contains_key("action") && m.contains_key("id") => {
                found.push(v.clone())
            }
            Value::Object(m) => m.values().for_each(|v| walk(v, found)),
            Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let stdout = text(&out.stdout);
    match serde_json::from_str::<Value>(&stdout) {
        Ok(v) => walk(&v, &mut found),
        Err(_) => stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .for_each(|v| walk(&v, &mut found)),
    }
    found
}

/// A temporary directory every uid may write (for sockets an unprivileged agent makes or
/// replaces).
pub fn world_writable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    dir
}

/// A temporary path as text (the tests' paths are UTF-8).
pub fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// An io_uring ring without liburing, for the C attackers of the tests: `setup_ring()` maps it,
/// `submit(&sqe)` issues one request and returns its completion's `res`. `URING_ASYNC` in the
/// environment (read by the caller into `async_worker`) asks for `IOSQE_ASYNC`: an io_uring
/// worker thread, not the caller, makes the call.
pub const URING_RING_C: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
static int ring;
/* URING_ASYNC set: IOSQE_ASYNC, so an io_uring worker thread (not the caller) makes the call. */
static int async_worker;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;
static int submit(struct io_uring_sqe *e) {
    unsigned tail = *sq_tail, idx = tail & *sq_mask;
    sqes[idx] = *e;
    sq_array[idx] = idx;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        printf("enter errno %d\n", errno);
        exit(1);
    }
    unsigned head = __atomic_load_n(cq_head, __ATOMIC_ACQUIRE);
    int res = cqes[head & *cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}
/* The ring, mapped; exits with a message on failure. */
static void setup_ring(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    ring = syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) { printf("setup errno %d\n", errno); exit(1); }
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_sz > sq_sz) sq_sz = cq_sz;
    char *sq = mmap(0, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = (p.features & IORING_FEAT_SINGLE_MMAP) ? sq
        : mmap(0, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { printf("mmap failed\n"); exit(1); }
    sq_tail = (unsigned *)(sq + p.sq_off.tail);
    sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    sq_array = (unsigned *)(sq + p.sq_off.array);
    cq_head = (unsigned *)(cq + p.cq_off.head);
    cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}
"#;

/// Asserts that `child` (a held agent) is still waiting 300 ms on.
pub fn still_held(child: &mut std::process::Child) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the held call did not wait for a decision"
    );
}

/// The output of held agent `child` once released; kills it and fails if it still waits 20 s
/// after the decision.
pub fn wait_released(child: std::process::Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = child.id() as i32;
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // SAFETY: kill(2) of our own child (run forwards it to the agent).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the agent was still held 20 s after the decision");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap()
}

impl Daemon {
    /// Waits (up to 10 s) until the first agent's executable selector has verified its file.
    pub fn wait_selector_verified(&self) {
        wait_until(
            Duration::from_secs(10),
            || {
                self.status()["agents"][0]["selectors"]
                    .to_string()
                    .contains("sha256 verified")
            },
            || format!("selector not armed:\n{}", self.log()),
        );
    }
}
