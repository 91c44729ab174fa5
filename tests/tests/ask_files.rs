//! Ask mode for files on the real kernel: an ask-mode agent's open of a file its `[files]`
//! denies waits in the open call (the file guard holds the fanotify permission event) until
//! `agent-monitor approve`/`deny`, the ask timeout, or the daemon's death (denied at once:
//! fail closed); the host's own opens of the same file are never held. Run one at a time
//! (`--test-threads=1`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

const CAT: &str = "/usr/bin/cat";

/// An ask-mode agent that may run sh and cat and may not open `secret`.
fn ask_files_policy(agent: &str, secret: &Path, extra: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"ask\"\n[exec]\nallow = [{SH:?}, {CAT:?}]\n\
             [files]\ndeny = [{:?}]\n{extra}",
            secret.display().to_string()
        ),
    )
}

/// A directory with one secret file.
fn secrets() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("credentials");
    std::fs::write(&secret, "TOPSECRET\n").expect("write secret");
    (dir, secret)
}

fn wait_files_applied(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("[files] in force") {
        assert!(
            Instant::now() < deadline,
            "[files] not in force after 10 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon (with `extra` arguments) whose ask-mode agent may not open the secret.
fn guarded(label: &str, extra: &[&str]) -> (String, tempfile::TempDir, PathBuf, Daemon) {
    let agent = unique_agent(label);
    let (dir, secret) = secrets();
    let d = Daemon::start_with(&[ask_files_policy(&agent, &secret, "")], extra);
    wait_files_applied(&d);
    (agent, dir, secret, d)
}

/// The control: a process outside every agent reads `file`, at once (never held).
fn assert_host_reads_at_once(file: &Path) {
    let started = Instant::now();
    let host = Command::new(CAT).arg(file).output().expect("cat");
    assert!(
        host.status.success() && text(&host.stdout) == "TOPSECRET\n",
        "host cat of {}: {}",
        file.display(),
        text(&host.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the host's cat waited {:?}",
        started.elapsed()
    );
}

/// Waits (up to 10 s) for a held open of `file` by `agent` (and `task`, when given); the
/// request.
fn wait_held_open(d: &Daemon, agent: &str, task: Option<&str>, file: &Path) -> Value {
    let path = file.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = pending_requests(d);
        if let Some(r) = all.iter().find(|r| {
            r["agent"] == agent
                && r["action"]["kind"] == "open"
                && r["action"]["path"] == path.as_str()
                && task.is_none_or(|t| r["task"] == t)
        }) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no held open of {path} within 10 s; pending: {all:#?}\ndaemon log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn id_of(r: &Value) -> String {
    r["id"].as_u64().expect("a request id").to_string()
}

/// The agent is still waiting in its open: its `run` has not exited.

fn decide(d: &Daemon, args: &[&str]) -> Output {
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        text(&out.stderr)
    );
    out
}

/// The next line the agent printed.
fn next_line(lines: &mut impl BufRead) -> String {
    let mut line = String::new();
    lines
        .read_line(&mut line)
        .expect("reading the agent's output");
    line.trim_end().to_string()
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

/// The ask record of request `id` with `verdict` in the trail (waited for).
fn ask_record(d: &Daemon, id: &str, verdict: &str) -> Value {
    d.wait_audit(&format!("request {id} {verdict}"), |v| {
        is(v, "action", "ask") && v["request_id"].to_string() == id && is(v, "verdict", verdict)
    })
}

#[test]
fn a_held_open_waits_for_approve_once_and_the_next_open_is_asked_again() {
    if !require_root("a_held_open_waits_for_approve_once_and_the_next_open_is_asked_again") {
        return;
    }
    let (agent, _dir, secret, d) = guarded("askfiles-once", &[]);
    assert_host_reads_at_once(&secret);
    let s = secret.display().to_string();
    let script = format!("cat {s}; echo rc=$?; cat {s}; echo rc=$?");
    let mut child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &script]);

    let held = wait_held_open(&d, &agent, Some("t1"), &secret);
    let id = id_of(&held);
    assert!(
        held["action"]["open_flags"]
            .as_str()
            .is_some_and(|f| f.starts_with("O_RDONLY")),
        "{held:#}"
    );
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        held["action"]["inode"],
        std::fs::metadata(&secret).unwrap().ino()
    );
    assert!(
        held["action"]["rule"]
            .as_str()
            .unwrap_or("")
            .contains("files.deny"),
        "{held:#}"
    );
    still_held(&mut child);
    // The host is never held, not even for the file an agent's open waits on.
    assert_host_reads_at_once(&secret);
    let listed = text(&d.cli(&["pending"]).stdout);
    assert!(listed.contains(&format!("open {s}")), "pending: {listed}");

    // `always` cannot be expressed for files: refused precisely, and the open stays held.
    let out = d.cli(&["approve", &id, "--always"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success() && said.contains("`always` cannot approve an open"),
        "approve --always of an open: {said}"
    );
    still_held(&mut child);
    assert!(
        pending_requests(&d).iter().any(|r| id_of(r) == id),
        "no longer held"
    );

    decide(&d, &["approve", &id, "--once"]);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    assert_eq!(next_line(&mut stdout), "TOPSECRET");
    assert_eq!(next_line(&mut stdout), "rc=0");

    // Once: the second cat is held again; denied, it fails with EPERM.
    let again = wait_held_open(&d, &agent, Some("t1"), &secret);
    let id2 = id_of(&again);
    assert_ne!(id, id2);
    decide(&d, &["deny", &id2, "--reason", "not now"]);
    assert_eq!(next_line(&mut stdout), "rc=1");
    let out = wait_released(child);
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );

    // Reported: held, then approved once; held, then denied.
    let rec = ask_record(&d, &id, "pending");
    assert_eq!(field(&rec, "held_action"), "open");
    assert_eq!(field(&rec, "file_path"), s);
    assert_eq!(field(&rec, "task_id"), "t1");
    assert!(field(&rec, "open_flags").starts_with("O_RDONLY"), "{rec}");
    let rec = ask_record(&d, &id, "approved");
    assert_eq!(field(&rec, "decision_scope"), "once");
    assert!(field(&rec, "approver").starts_with("uid 0"), "{rec}");
    let rec = ask_record(&d, &id2, "denied");
    assert_eq!(field(&rec, "reason"), "not now");
    let e = wait_journal(&agent, "the approval in journald", |e| {
        is(e, "REQUEST_ID", &id) && is(e, "VERDICT", "approved")
    });
    assert_eq!(field(&e, "HELD_ACTION"), "open");
    assert_eq!(field(&e, "FILE_PATH"), s);
    assert_eq!(field(&e, "DECISION_SCOPE"), "once");
}

#[test]
fn a_task_approval_lets_that_task_open_the_file_and_no_other() {
    if !require_root("a_task_approval_lets_that_task_open_the_file_and_no_other") {
        return;
    }
    let (agent, _dir, secret, d) = guarded("askfiles-task", &[]);
    let s = secret.display().to_string();
    let script = format!("cat {s}; echo rc=$?; cat {s}; echo rc=$?; cat {s}; echo rc=$?");
    let child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &script]);
    let id = id_of(&wait_held_open(&d, &agent, Some("t1"), &secret));
    decide(&d, &["approve", &id, "--task"]);
    // The later cats of the task pass without asking (a question would hold them 60 s).
    let out = wait_released(child);
    assert_eq!(
        text(&out.stdout),
        "TOPSECRET\nrc=0\nTOPSECRET\nrc=0\nTOPSECRET\nrc=0\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        pending_requests(&d)
            .iter()
            .all(|r| r["agent"] != agent.as_str()),
        "asked again within the task"
    );
    let rec = d.wait_audit("an open allowed by the task approval", |v| {
        is(v, "action", "open") && is(v, "file_path", &s) && is(v, "verdict", "allowed")
    });
    assert_eq!(field(&rec, "task_id"), "t1");
    assert!(field(&rec, "reason").contains("task approval"), "{rec}");

    // Another task of the same agent is asked; denied, EPERM.
    let child = d.spawn_run(&agent, "t2", &[], &[CAT, &s]);
    let id2 = id_of(&wait_held_open(&d, &agent, Some("t2"), &secret));
    decide(&d, &["deny", &id2]);
    let out = wait_released(child);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    // The task's end takes the approval back (`task end`, or the sweep that ends a task with no
    // process left, whichever comes first): t1 is asked again.
    let _ = d.cli(&["task", "end", "--agent", &agent, "--task", "t1"]);
    let child = d.spawn_run(&agent, "t1", &[], &[CAT, &s]);
    let id3 = id_of(&wait_held_open(&d, &agent, Some("t1"), &secret));
    decide(&d, &["deny", &id3]);
    assert!(!wait_released(child).status.success());
}

#[test]
fn a_held_open_times_out_with_eperm() {
    if !require_root("a_held_open_times_out_with_eperm") {
        return;
    }
    let (agent, _dir, secret, d) = guarded("askfiles-timeout", &["--ask-timeout", "2s"]);
    let started = Instant::now();
    let child = d.spawn_run(&agent, "t1", &[], &[CAT, &secret.display().to_string()]);
    let id = id_of(&wait_held_open(&d, &agent, Some("t1"), &secret));
    let out = wait_released(child);
    let waited = started.elapsed();
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "the daemon's 2 s timeout answered after {waited:?}"
    );
    let rec = ask_record(&d, &id, "timeout");
    assert_eq!(field(&rec, "approver"), "timeout");
    // A late approval is refused precisely.
    let out = d.cli(&["approve", &id, "--once"]);
    assert!(!out.status.success(), "a late approval was taken");
    assert_host_reads_at_once(&secret);
}

#[test]
fn a_held_open_is_denied_at_once_when_the_daemon_dies_and_the_host_reads_throughout() {
    if !require_root(
        "a_held_open_is_denied_at_once_when_the_daemon_dies_and_the_host_reads_throughout",
    ) {
        return;
    }
    let (agent, _dir, secret, mut d) = guarded("askfiles-down", &[]);
    let s = secret.display().to_string();
    // The agent's shell outlives the daemon; its cat's open is held when the daemon dies.
    let script = format!("cat {s}; echo rc=$?");
    let mut child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &script]);
    wait_held_open(&d, &agent, Some("t1"), &secret);
    still_held(&mut child);
    assert_host_reads_at_once(&secret);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let killed = Instant::now();
    d.kill9();
    let line = next_line(&mut stdout);
    let bounded = killed.elapsed();
    eprintln!("held open refused {bounded:?} after the daemon's SIGKILL");
    assert_eq!(line, "rc=1", "the held open was not refused");
    assert!(
        bounded < Duration::from_secs(2),
        "the held open was refused only {bounded:?} after the daemon died"
    );
    let _ = wait_released(child);
    assert_host_reads_at_once(&secret);

    // While no daemon runs, an agent process's open is refused at once (nothing to ask): a
    // process that joins the task's cgroup without `run`.
    let cgroup = cgroup2_root().join(format!("agent-monitor/{agent}/t1"));
    let join_and_cat = format!(
        "echo $$ > {}/cgroup.procs && exec {CAT} {s}",
        cgroup.display()
    );
    let started = Instant::now();
    let out = Command::new(SH)
        .args(["-c", &join_and_cat])
        .output()
        .unwrap();
    assert!(
        cgroup.exists(),
        "the task's cgroup {} is gone",
        cgroup.display()
    );
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "an agent's open without a daemon: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "held without a daemon"
    );
    assert_host_reads_at_once(&secret);

    // The next daemon gets the guard's kept reports of both refusals.
    d.spawn();
    let rec = d.wait_audit("the held open refused when the daemon died", |v| {
        is(v, "action", "open")
            && is(v, "file_path", &s)
            && field(v, "reason").contains("went away before deciding")
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "task_id"), "t1");
    let rec = d.wait_audit("the open refused while no daemon ran", |v| {
        is(v, "action", "open")
            && is(v, "file_path", &s)
            && field(v, "reason").contains("no daemon is connected")
    });
    assert_eq!(field(&rec, "verdict"), "denied");
}

#[test]
fn an_ask_mode_agent_known_by_its_executable_is_held_too() {
    if !require_root("an_ask_mode_agent_known_by_its_executable_is_held_too") {
        return;
    }
    let agent = unique_agent("askfiles-exe");
    let (dir, secret) = secrets();
    let bot = dir.path().join("bot");
    std::fs::copy("/bin/bash", &bot).expect("copy bash");
    let identity = format!(
        "[identity]\nexecutables = [{{ path = {:?}, sha256 = {:?} }}]\n",
        bot.display().to_string(),
        sha256_hex(&bot)
    );
    let d = Daemon::start(&[ask_files_policy(&agent, &secret, &identity)]);
    wait_files_applied(&d);
    d.wait_selector_verified();
    // A shell builtin reads the file: the selected program itself opens it.
    let script = format!(
        "read line < {:?} && echo \"read $line\"",
        secret.display().to_string()
    );
    let child = Command::new(&bot)
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bot");
    let held = wait_held_open(&d, &agent, None, &secret);
    let id = id_of(&held);
    // The guard cannot tell a selected process's task: a task approval is refused precisely.
    let out = d.cli(&["approve", &id, "--task"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success() && said.contains("known by a selector"),
        "approve --task of a selector agent's open: {said}"
    );
    decide(&d, &["approve", &id, "--once"]);
    let out = wait_released(child);
    assert_eq!(
        text(&out.stdout),
        "read TOPSECRET\n",
        "{}",
        text(&out.stderr)
    );
    // Control: the same script in an unselected bash, never held.
    let started = Instant::now();
    let host = Command::new("/bin/bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(text(&host.stdout), "read TOPSECRET\n");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A decision service (python3 on a free loopback port) that logs each request's JSON and answers
/// every one with `answer`; killed on drop.
struct Approver {
    _server: ChildGuard,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Approver {
    fn start(answer: &str) -> Approver {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("asked.jsonl");
        let port = free_port();
        let script = format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_POST(self):\n\
             \x20       body = self.rfile.read(int(self.headers['Content-Length']))\n\
             \x20       open({log:?}, 'ab').write(body + b'\\n')\n\
             \x20       out = {answer:?}.encode()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Type', 'application/json')\n\
             \x20       self.send_header('Content-Length', str(len(out)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(out)\n\
             \x20   def log_message(self, *a): pass\n\
             http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n",
            log = log.display().to_string()
        );
        let server = ChildGuard(
            Command::new(PYTHON)
                .args(["-c", &script])
                .spawn()
                .expect("python3 decision service"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "decision service did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Approver {
            _server: server,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/decide", self.port)
    }

    fn asked(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[test]
fn a_decision_service_decides_held_opens_and_always_is_a_deny() {
    if !require_root("a_decision_service_decides_held_opens_and_always_is_a_deny") {
        return;
    }
    let once = Approver::start(r#"{"decision":"allow","scope":"once"}"#);
    let (agent, _dir, secret, d) = guarded("askfiles-svc", &["--approver-url", &once.url()]);
    let s = secret.display().to_string();
    let out = wait_released(d.spawn_run(&agent, "t1", &[], &[CAT, &s]));
    assert_eq!(text(&out.stdout), "TOPSECRET\n", "{}", text(&out.stderr));
    let asked = once.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["action"]["kind"], "open");
    assert_eq!(asked[0]["action"]["path"], s.as_str());
    assert!(
        asked[0]["action"]["open_flags"].is_string(),
        "{:?}",
        asked[0]
    );
    assert_eq!(asked[0]["task"], "t1");
    drop(d);
    drop(once);

    // A service that answers `always`: the open cannot be approved so, and is denied at once
    // (not left to the timeout), with the reason.
    let always = Approver::start(r#"{"decision":"allow","scope":"always"}"#);
    let (agent, _dir, secret, d) = guarded("askfiles-svc2", &["--approver-url", &always.url()]);
    let started = Instant::now();
    let out = wait_released(d.spawn_run(&agent, "t1", &[], &[CAT, &secret.display().to_string()]));
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "denied only after {:?}",
        started.elapsed()
    );
    let id = always.asked()[0]["id"].as_u64().expect("id").to_string();
    let rec = ask_record(&d, &id, "denied");
    assert!(
        field(&rec, "reason").contains("`always` cannot approve an open"),
        "{rec}"
    );
    assert_eq!(field(&rec, "approver"), "approver-url");
}
