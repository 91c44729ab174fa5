//! Unix connects of ask- and alert-mode agents started by `agent-monitor run`, judged on the
//! socket the name resolves to (docs/unix-sockets.md, docs/ask.md): in ask mode a connect to a
//! socket off the agent's `[unix]` list is held until `approve`/`deny` or the ask timeout, and an
//! approval connects the very socket the name led to when it was held; in alert mode it goes
//! through and is reported once, with where the name led. Real programs: python3 and curl
//! `--unix-socket` against an HTTP server on a unix socket standing in for a container engine's
//! API. Every refusal has a control from outside every agent. Run one at a time
//! (`--test-threads=1`).

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

const CURL: &str = "/usr/bin/curl";

/// One HTTP answer per connection on a unix socket (argv[1]) naming the server (argv[2]).
const SERVER: &str = r#"import os, socket, sys, threading
path, name = sys.argv[1], sys.argv[2]
if os.path.lexists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o666)
listener.listen(64)
def answer(conn):
    with conn:
        body = ('{"server":"%s"}' % name).encode()
        try:
            if conn.recv(65536):
                conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
        except OSError:
            pass
print('ready', flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
"#;

/// `req(name, path)`: one HTTP request over a unix socket; prints `name ok SERVER` or
/// `name errno N` (PermissionError is errno 1).
const PY_REQ: &str = r#"import json, os, socket, sys, time
def get(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b'GET / HTTP/1.0\r\n\r\n')
        data = b''
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    return json.loads(data.split(b'\r\n\r\n', 1)[1])['server']
def req(name, path):
    try:
        print(name, 'ok', get(path), flush=True)
    except PermissionError as e:
        print(name, 'errno', e.errno, 'PermissionError', flush=True)
    except OSError as e:
        print(name, 'errno', e.errno, flush=True)
"#;

fn serve(path: &Path, name: &str) -> ChildGuard {
    python_ready(SERVER, &[utf8(path), name])
}

/// A listed socket in a directory the agent may write (`dir`) and an unlisted "engine" in
/// another, both served; the engine answers from outside every agent (the control).
struct Sockets {
    dir: tempfile::TempDir,
    _outside: tempfile::TempDir,
    listed: std::path::PathBuf,
    engine: std::path::PathBuf,
    _servers: [ChildGuard; 2],
}

fn sockets() -> Sockets {
    let dir = world_writable_dir();
    let outside = world_writable_dir();
    let listed = dir.path().join("listed.sock");
    let engine = outside.path().join("engine.sock");
    let servers = [serve(&listed, "listed"), serve(&engine, "engine")];
    assert_eq!(curl_outside(utf8(&engine)), "engine");
    Sockets {
        dir,
        _outside: outside,
        listed,
        engine,
        _servers: servers,
    }
}

/// A symlink `name` in the agent's directory leading to `to`.
fn link_in(sockets: &Sockets, name: &str, to: &Path) -> std::path::PathBuf {
    let link = sockets.dir.path().join(name);
    std::os::unix::fs::symlink(to, &link).unwrap();
    link
}

/// A policy for `agent` in `mode` that may run python3 and curl and use the unix sockets `allow`.
fn policy(agent: &str, mode: &str, allow: &[&str]) -> (String, String) {
    let (name, text) = mode_policy(agent, mode, &[], &["/usr/bin/python3*", CURL]);
    let list: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    (
        name,
        format!("{text}[unix]\nallow = [{}]\n", list.join(", ")),
    )
}

/// curl of the HTTP API on unix socket `sock` from outside every agent: the control.
fn curl_outside(sock: &str) -> String {
    let out = Command::new(CURL)
        .args(curl_args(sock))
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "control: curl outside every agent failed: {}",
        text(&out.stderr)
    );
    server_of(&out)
}

fn curl_args(sock: &str) -> Vec<&str> {
    vec![
        CURL,
        "-sS",
        "--max-time",
        "30",
        "--unix-socket",
        sock,
        "http://engine/",
    ]
}

fn server_of(out: &Output) -> String {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not the server's JSON ({e}): {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    v["server"].as_str().unwrap_or("").to_string()
}

/// Waits (up to 10 s) for a held unix connect of `agent` to `path`, other than `seen`; returns
/// the request.
fn wait_held(d: &Daemon, agent: &str, path: &str, seen: &[u64]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = pending_requests(d);
        if let Some(r) = all.iter().find(|r| {
            r["agent"] == agent
                && r["action"]["kind"] == "unix"
                && r["action"]["path"] == path
                && !seen.contains(&r["id"].as_u64().unwrap_or(0))
        }) {
            return r.clone();
        }
        if Instant::now() > deadline {
            panic!(
                "no held unix connect to {path} within 10 s; pending: {all:#?}\ndaemon log:\n{}",
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's stdout lines as they come (the agent still runs).
fn read_lines(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("piped stdout");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn wait_line(lines: &std::sync::Mutex<Vec<String>>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines.lock().unwrap().iter().any(|l| l == want) {
        assert!(
            Instant::now() < deadline,
            "no line {want:?} within 10 s: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn id_of(r: &Value) -> u64 {
    r["id"].as_u64().expect("a request id")
}

fn decide(d: &Daemon, args: &[&str]) {
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\ndaemon log:\n{}",
        text(&out.stderr),
        d.log()
    );
}

/// The ask records of request `id` in the JSON trail with `verdict`: `ACTION=ask`,
/// `HELD_ACTION=connect`, `DEST_TRANSPORT=unix`, `DEST_PATH`, as the other held kinds.
fn assert_ask_reported(d: &Daemon, agent: &str, id: u64, verdict: &str, path: &str) -> Value {
    let r = d.wait_audit(&format!("request {id} {verdict}"), |v| {
        field(v, "action") == "ask"
            && v["request_id"].as_u64() == Some(id)
            && field(v, "verdict") == verdict
    });
    assert_eq!(field(&r, "agent_id"), agent);
    assert_eq!(field(&r, "held_action"), "connect", "{r}");
    assert_eq!(field(&r, "dest_transport"), "unix", "{r}");
    assert_eq!(field(&r, "dest_path"), path, "{r}");
    wait_journal(agent, &format!("request {id} {verdict}"), |v| {
        field(v, "REQUEST_ID") == id.to_string()
            && field(v, "VERDICT") == verdict
            && field(v, "DEST_TRANSPORT") == "unix"
            && field(v, "DEST_PATH") == path
    });
    r
}

#[test]
fn held_unix_connect_is_approved_once_then_held_again_and_a_task_approval_covers_later_connects() {
    if !require_root(
        "held_unix_connect_is_approved_once_then_held_again_and_a_task_approval_covers_later_connects",
    ) {
        return;
    }
    let sk = sockets();
    let (listed, engine) = (&sk.listed, &sk.engine);

    let agent = unique_agent("ask-unix");
    // Long enough that a call held by mistake fails the test by waiting, not by timing out.
    let d = Daemon::start_with(
        &[policy(&agent, "ask", &[utf8(&listed)])],
        &["--ask-timeout", "20s"],
    );
    // The first connect runs in a thread: while it is held, the main thread's connect to the
    // listed socket goes through.
    let script = format!(
        "{PY_REQ}import threading\nreq('listed', {l:?})\n\
         t = threading.Thread(target=req, args=('first', {e:?})); t.start()\n\
         time.sleep(0.5)\nreq('meanwhile', {l:?})\nt.join()\n\
         req('second', {e:?})\nreq('third', {e:?})\nreq('fourth', {e:?})\n",
        l = utf8(&listed),
        e = utf8(&engine),
    );
    let started = Instant::now();
    let mut child = d.spawn_run(&agent, "t1", &[], &[PYTHON, "-c", &script]);
    let lines = read_lines(&mut child);

    // The first connect to the engine is held; `pending` shows the name and where it led.
    let first = wait_held(&d, &agent, utf8(&engine), &[]);
    assert_eq!(first["action"]["resolved"], utf8(&engine), "{first}");
    assert!(
        first["action"]["inode"].as_u64().unwrap_or(0) > 0,
        "{first}"
    );
    assert_eq!(first["task"], "t1");
    let shown = d.cli(&["pending"]);
    assert!(
        text(&shown.stdout).contains(utf8(&engine)),
        "`pending` names the socket: {}",
        text(&shown.stdout)
    );
    still_held(&mut child);
    wait_line(&lines, "meanwhile ok listed");
    assert!(
        !lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("first ")),
        "the first connect was not held: {lines:?}"
    );
    decide(&d, &["approve", &id_of(&first).to_string(), "--once"]);

    // Once was for that call only: the next connect is held again, then approved for the task.
    let second = wait_held(&d, &agent, utf8(&engine), &[id_of(&first)]);
    still_held(&mut child);
    decide(&d, &["approve", &id_of(&second).to_string(), "--task"]);

    // The task approval covers the later connects of this run: nothing more is held.
    let out = wait_released(child);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a later connect waited for the ask timeout: {:?}",
        started.elapsed()
    );
    let lines = lines.lock().unwrap().clone();
    for (call, server) in [
        ("listed", "listed"),
        ("meanwhile", "listed"),
        ("first", "engine"),
        ("second", "engine"),
        ("third", "engine"),
        ("fourth", "engine"),
    ] {
        assert!(
            lines.contains(&format!("{call} ok {server}")),
            "{call}: {lines:?}; stderr: {}",
            text(&out.stderr)
        );
    }
    let held: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|v| field(v, "action") == "ask" && field(v, "verdict") == "pending")
        .collect();
    assert_eq!(held.len(), 2, "only two connects were held: {held:#?}");

    assert_ask_reported(&d, &agent, id_of(&first), "pending", utf8(&engine));
    let once = assert_ask_reported(&d, &agent, id_of(&first), "approved", utf8(&engine));
    assert_eq!(field(&once, "decision_scope"), "once");
    let task = assert_ask_reported(&d, &agent, id_of(&second), "approved", utf8(&engine));
    assert_eq!(field(&task, "decision_scope"), "task");
    // The connects the grant let through are in the trail as allowed, saying why.
    let granted = d.wait_audit("a connect allowed by the task approval", |v| {
        field(v, "action") == "connect"
            && field(v, "dest_transport") == "unix"
            && field(v, "verdict") == "allowed"
            && field(v, "reason").contains("approved for the task")
    });
    assert_eq!(field(&granted, "dest_path"), utf8(&engine));
}

#[test]
fn denied_and_timed_out_unix_connects_fail_with_eperm() {
    if !require_root("denied_and_timed_out_unix_connects_fail_with_eperm") {
        return;
    }
    let sk = sockets();
    let (listed, engine) = (&sk.listed, &sk.engine);

    let agent = unique_agent("ask-unix-deny");
    let d = Daemon::start_with(
        &[policy(&agent, "ask", &[utf8(&listed)])],
        &["--ask-timeout", "3s"],
    );

    // Deny: curl cannot connect (exit 7) and the server answered nothing.
    let mut child = d.spawn_run(&agent, "t1", &[], &curl_args(utf8(&engine)));
    let req = wait_held(&d, &agent, utf8(&engine), &[]);
    still_held(&mut child);
    decide(
        &d,
        &["deny", &id_of(&req).to_string(), "--reason", "no engine"],
    );
    let out = wait_released(child);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl's connect was refused: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let denied = assert_ask_reported(&d, &agent, id_of(&req), "denied", utf8(&engine));
    assert_eq!(field(&denied, "reason"), "no engine");

    // Timeout: nobody decides; python's connect fails with PermissionError after the timeout.
    let started = Instant::now();
    let child = d.spawn_run(
        &agent,
        "t1",
        &[],
        &[
            PYTHON,
            "-c",
            &format!("{PY_REQ}req('engine', {:?})\n", utf8(&engine)),
        ],
    );
    let req = wait_held(&d, &agent, utf8(&engine), &[id_of(&req)]);
    let out = wait_released(child);
    assert_eq!(outcome(&out, "engine"), "errno 1 PermissionError");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_ask_reported(&d, &agent, id_of(&req), "timeout", utf8(&engine));

    // Controls: the same socket still answers from outside every agent, and the listed one
    // answers the agent without a question.
    assert_eq!(curl_outside(utf8(&engine)), "engine");
    let out = d.run(&agent, Some("t1"), &curl_args(utf8(&listed)));
    assert_eq!(server_of(&out), "listed");
}

#[test]
fn a_listed_name_planted_as_a_symlink_is_held_as_where_it_led_and_a_swap_while_held_changes_nothing()
 {
    if !require_root(
        "a_listed_name_planted_as_a_symlink_is_held_as_where_it_led_and_a_swap_while_held_changes_nothing",
    ) {
        return;
    }
    let dir = world_writable_dir();
    let outside = world_writable_dir();
    let engine = outside.path().join("engine.sock");
    let other = outside.path().join("other.sock");
    let _engine_server = serve(&engine, "engine");
    let _other_server = serve(&other, "other");
    // Listed, not there yet: the agent plants it as a symlink to the engine before asking.
    let planted = dir.path().join("planted.sock");

    let agent = unique_agent("ask-unix-link");
    let d = Daemon::start_with(
        &[policy(&agent, "ask", &[utf8(&planted)])],
        &["--ask-timeout", "20s"],
    );
    let script = format!(
        "{PY_REQ}os.symlink({e:?}, {p:?})\nreq('planted', {p:?})\n",
        e = utf8(&engine),
        p = utf8(&planted),
    );
    let mut child = d.spawn_run(&agent, "t1", &[], &[PYTHON, "-c", &script]);
    // The listed name does not pass: it is held, and the request shows where it led.
    let req = wait_held(&d, &agent, utf8(&planted), &[]);
    assert_eq!(req["action"]["resolved"], utf8(&engine), "{req}");
    // While it is held, the name is re-pointed at another socket.
    std::fs::remove_file(&planted).unwrap();
    std::os::unix::fs::symlink(&other, &planted).unwrap();
    still_held(&mut child);
    decide(&d, &["approve", &id_of(&req).to_string(), "--once"]);
    let out = wait_released(child);
    // The approval connected the socket the name led to when it was held, not the name.
    assert_eq!(outcome(&out, "planted"), "ok engine");
    // Control: the name now leads to the other socket, from outside every agent.
    assert_eq!(curl_outside(utf8(&planted)), "other");
    let approved = assert_ask_reported(&d, &agent, id_of(&req), "approved", utf8(&planted));
    assert_eq!(
        field(&approved, "dest_resolved_path"),
        utf8(&engine),
        "{approved}"
    );
}

#[test]
fn alert_mode_lets_an_off_list_connect_through_and_reports_it_once_with_where_it_led() {
    if !require_root(
        "alert_mode_lets_an_off_list_connect_through_and_reports_it_once_with_where_it_led",
    ) {
        return;
    }
    let sk = sockets();
    let (listed, engine) = (&sk.listed, &sk.engine);
    // A name the agent may write, leading to the engine.
    let link = link_in(&sk, "link.sock", engine);
    // Control: both answer from outside every agent.
    assert_eq!(curl_outside(utf8(&link)), "engine");
    assert_eq!(curl_outside(utf8(&listed)), "listed");

    let agent = unique_agent("alert-unix");
    let d = Daemon::start(&[policy(&agent, "alert", &[utf8(&listed)])]);
    let out = d.run(&agent, Some("t1"), &curl_args(utf8(&link)));
    assert_eq!(server_of(&out), "engine", "alert mode lets it through");
    let out = d.run(&agent, Some("t1"), &curl_args(utf8(&listed)));
    assert_eq!(server_of(&out), "listed");

    let alert = d.wait_audit("the alert", |v| {
        field(v, "action") == "connect"
            && field(v, "dest_transport") == "unix"
            && field(v, "dest_path") == utf8(&link)
            && field(v, "verdict") == "alert"
    });
    assert_eq!(field(&alert, "agent_id"), agent);
    assert!(
        field(&alert, "reason").contains(utf8(&engine)),
        "the report names where the name led: {alert}"
    );
    wait_journal(&agent, "the alert", |v| {
        field(v, "DEST_PATH") == utf8(&link) && field(v, "VERDICT") == "alert"
    });
    // Once: the supervisor reports it; the connector's connect runs no kernel hook. Give a
    // second report time to arrive before counting.
    std::thread::sleep(Duration::from_secs(2));
    let reports: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|v| field(v, "dest_transport") == "unix" && field(v, "dest_path") == utf8(&link))
        .collect();
    assert_eq!(reports.len(), 1, "one report per connect: {reports:#?}");
    let journaled = journal(&agent)
        .into_iter()
        .filter(|v| field(v, "DEST_PATH") == utf8(&link) && field(v, "ACTION") == "connect")
        .count();
    assert_eq!(journaled, 1, "one journald entry per connect");
    // The listed socket is no alert.
    assert!(
        !d.audit()
            .iter()
            .any(|v| field(v, "dest_path") == utf8(&listed) && field(v, "verdict") == "alert"),
        "the listed socket was reported as an alert"
    );
}

#[test]
fn an_always_approval_writes_the_resolved_socket_into_the_approved_file_and_later_runs_use_it() {
    if !require_root(
        "an_always_approval_writes_the_resolved_socket_into_the_approved_file_and_later_runs_use_it",
    ) {
        return;
    }
    let sk = sockets();
    let (listed, engine) = (&sk.listed, &sk.engine);
    // The agent asks by a symlink's name; the approval names the socket it led to.
    let link = link_in(&sk, "link.sock", engine);
    assert_eq!(curl_outside(utf8(&link)), "engine");

    let agent = unique_agent("ask-unix-always");
    let d = Daemon::start_with(
        &[policy(&agent, "ask", &[utf8(&listed)])],
        &["--ask-timeout", "20s"],
    );
    let script = format!(
        "{PY_REQ}req('first', {l:?})\nreq('again', {l:?})\n",
        l = utf8(&link)
    );
    let mut child = d.spawn_run(&agent, "t1", &[], &[PYTHON, "-c", &script]);
    let req = wait_held(&d, &agent, utf8(&link), &[]);
    still_held(&mut child);
    decide(&d, &["approve", &id_of(&req).to_string(), "--always"]);
    let out = wait_released(child);
    // The running `run` keeps the approval: its second connect is not held.
    assert_eq!(outcome(&out, "first"), "ok engine");
    assert_eq!(outcome(&out, "again"), "ok engine");
    let approved = std::fs::read_to_string(d.policies.join(format!("{agent}.approved.toml")))
        .expect("the approved file");
    assert!(
        approved.contains("[unix]") && approved.contains(&format!("{:?}", utf8(&engine))),
        "the socket's own path joins [unix] allow: {approved}"
    );
    assert!(
        !approved.contains(&format!("{:?},", utf8(&link))),
        "not the symlink's name: {approved}"
    );
    let always = assert_ask_reported(&d, &agent, id_of(&req), "approved", utf8(&link));
    assert_eq!(field(&always, "decision_scope"), "always");
    // A new run gets the reloaded list at placement: the engine answers without a question
    // (a held connect would time out only after 20 s; curl gives up after 30).
    let started = Instant::now();
    let out = d.run(&agent, Some("t2"), &curl_args(utf8(&engine)));
    assert_eq!(server_of(&out), "engine");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        pending_requests(&d).is_empty(),
        "nothing was held for the new run"
    );
}
