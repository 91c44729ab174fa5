//! Local sockets: an agent with a `[unix]` section connects (or sends datagrams) only to the unix
//! sockets its list names; everything else fails with EPERM and is reported (`ACTION=connect` or
//! `sendmsg`, `DEST_TRANSPORT=unix`, `DEST_PATH`). Real programs: curl `--unix-socket` against an
//! HTTP server standing in for a container engine's API, ssh-add against a real ssh-agent,
//! python3 for the routes around a name (symlink, relative path, /proc/self/root, abstract
//! names, datagrams). Each denial has a control: the same call from outside every agent works.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use agent_monitor_tests::*;
use serde_json::Value;

const CURL: &str = "/usr/bin/curl";
const SSH_ADD: &str = "/usr/bin/ssh-add";
const SSH_AGENT: &str = "/usr/bin/ssh-agent";

/// A policy whose agent may run python3, sh, curl and ssh-add and use the unix sockets `unix`
/// (a `[unix]` section's body).
fn policy(agent: &str, mode: &str, unix: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = []\n[exec]\nallow = [\"/usr/bin/python3*\", {SH:?}, \"/usr/bin/sh\", {CURL:?}, {SSH_ADD:?}]\n[unix]\n{unix}\n"
        ),
    )
}

fn allow_list(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("allow = [{}]", names.join(", "))
}

/// Starts `python3 -c script args…` and waits for it to print `ready` (killed when dropped).
fn python_server(script: &str, args: &[&str]) -> ChildGuard {
    python_ready(script, args)
}

/// An HTTP server on a unix socket, standing in for a container engine's API (docker.sock):
/// `GET /version` answers `{"ApiVersion":"fake-engine"}`.
const ENGINE: &str = r#"import os, socketserver, sys
from http.server import BaseHTTPRequestHandler
class Api(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"ApiVersion":"fake-engine"}'
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
server = Server(path, Api)
os.chmod(path, 0o666)
print('ready', flush=True)
server.serve_forever()
"#;

/// A unix datagram socket that appends every datagram it receives, one per line, to argv[2].
const DGRAM_SINK: &str = r#"import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
print('ready', flush=True)
while True:
    data = s.recv(4096)
    with open(out, 'ab') as f:
        f.write(data + b'\n')
"#;

/// Opens a stream connection to a unix socket name (`\0…` abstract), after [`PY_ATTEMPT`].
const PY_CONNECT: &str = r#"
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.close()
"#;

/// What a probe prints for a call the kernel refused.
const REFUSED: &str = "errno 1";

/// The probe's text: the prelude, then `script`.
fn probe(script: &str) -> String {
    format!("{PY_ATTEMPT}{PY_CONNECT}{script}")
}

fn agent_py(d: &Daemon, agent: &str, script: &str) -> Output {
    d.run(agent, None, &[PYTHON, "-c", &probe(script)])
}

fn outside_py(script: &str) -> Output {
    Command::new(PYTHON)
        .arg("-c")
        .arg(probe(script))
        .output()
        .expect("running python3")
}

/// curl's arguments for `GET /version` of the engine on `sock`.
fn curl_args(sock: &Path) -> [&str; 7] {
    [
        CURL,
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        path_str(sock),
        "http://engine/version",
    ]
}

/// curl as agent `agent`.
fn agent_curl(d: &Daemon, agent: &str, sock: &Path) -> Output {
    d.run(agent, None, &curl_args(sock))
}

/// The JSON trail's record of a unix `action` (`connect`/`sendmsg`) to `path` with `verdict`.
fn trail_unix(d: &Daemon, action: &str, path: &str, verdict: &str) -> Value {
    d.wait_audit(&format!("{action} {verdict} {path}"), |v| {
        field(v, "action") == action
            && field(v, "dest_transport") == "unix"
            && field(v, "dest_path") == path
            && field(v, "verdict") == verdict
    })
}

/// journald's entry of the same.
fn journal_unix(agent: &str, action: &str, path: &str, verdict: &str) -> Value {
    wait_journal(agent, &format!("{action} {verdict} {path}"), |v| {
        field(v, "ACTION") == action
            && field(v, "DEST_TRANSPORT") == "unix"
            && field(v, "DEST_PATH") == path
            && field(v, "VERDICT") == verdict
    })
}

fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn curl_to_a_container_engine_socket_is_refused_for_agents_and_works_outside() {
    if !require_root("curl_to_a_container_engine_socket_is_refused_for_agents_and_works_outside") {
        return;
    }
    let dir = socket_dir();
    let engine = dir.path().join("docker.sock");
    let _server = python_server(ENGINE, &[path_str(&engine)]);
    let allowed = dir.path().join("allowed.sock");
    let _allowed_server = python_server(ENGINE, &[path_str(&allowed)]);

    let agent = unique_agent("unix-curl");
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &allow_list(&[path_str(&allowed)]),
    )]);

    // Control: outside every agent the engine answers.
    let out = Command::new(CURL)
        .args(&curl_args(&engine)[1..])
        .output()
        .expect("curl");
    assert!(
        out.status.success() && text(&out.stdout).contains("fake-engine"),
        "curl outside agents: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = agent_curl(&d, &agent, &engine);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl as the agent must fail to connect (exit 7); stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        !text(&out.stdout).contains("fake-engine"),
        "the engine must not answer the agent"
    );
    let rec = trail_unix(&d, "connect", path_str(&engine), "denied");
    assert_eq!(field(&rec, "enforcement"), "eperm");
    assert_eq!(field(&rec, "comm"), "curl");
    let j = journal_unix(&agent, "connect", path_str(&engine), "denied");
    assert_eq!(field(&j, "EXE"), CURL);

    // The socket the list names works for the agent.
    let out = agent_curl(&d, &agent, &allowed);
    assert!(
        out.status.success() && text(&out.stdout).contains("fake-engine"),
        "curl to the allowed socket as the agent: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    trail_unix(&d, "connect", path_str(&allowed), "allowed");
}

#[test]
fn ssh_add_cannot_reach_the_ssh_agent_from_an_agent() {
    if !require_root("ssh_add_cannot_reach_the_ssh_agent_from_an_agent") {
        return;
    }
    assert!(
        Path::new(SSH_AGENT).exists() && Path::new(SSH_ADD).exists(),
        "openssh-client is needed (cargo xtask setup installs it)"
    );
    let dir = socket_dir();
    let sock = dir.path().join("agent.sock");
    // -D: stays in the foreground, so the guard below can stop it.
    let ssh_agent = ChildGuard(
        Command::new(SSH_AGENT)
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting ssh-agent"),
    );
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(sock.exists(), "ssh-agent did not create {}", sock.display());

    let agent = unique_agent("unix-ssh");
    let d = Daemon::start(&[policy(&agent, "enforce", "allow = []")]);

    // Control: outside every agent ssh-add reaches the agent (exit 1: it holds no identities).
    let out = Command::new(SSH_ADD)
        .arg("-l")
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .expect("ssh-add");
    assert_eq!(
        out.status.code(),
        Some(1),
        "ssh-add -l outside agents should reach an empty agent: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("no identities"));

    let sock_env = format!("SSH_AUTH_SOCK={}", sock.display());
    let out = d.run(
        &agent,
        None,
        &[SH, "-c", &format!("{sock_env} exec {SSH_ADD} -l")],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "ssh-add -l as the agent must not reach ssh-agent (exit 2); stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Operation not permitted")
            || text(&out.stderr).contains("Error connecting to agent"),
        "ssh-add's error: {}",
        text(&out.stderr)
    );
    let rec = trail_unix(&d, "connect", path_str(&sock), "denied");
    assert_eq!(field(&rec, "comm"), "ssh-add");
    journal_unix(&agent, "connect", path_str(&sock), "denied");
    drop(ssh_agent);
}

#[test]
fn symlinks_relative_names_and_proc_root_do_not_reach_a_socket_off_the_list() {
    if !require_root("symlinks_relative_names_and_proc_root_do_not_reach_a_socket_off_the_list") {
        return;
    }
    let dir = socket_dir();
    let engine = dir.path().join("docker.sock");
    let _server = python_server(ENGINE, &[path_str(&engine)]);
    let link = dir.path().join("innocent.sock");
    std::os::unix::fs::symlink(&engine, &link).expect("symlink");
    let allowed = dir.path().join("allowed.sock");
    let _allowed_server = python_server(ENGINE, &[path_str(&allowed)]);

    let agent = unique_agent("unix-names");
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &allow_list(&[path_str(&allowed)]),
    )]);

    let script = format!(
        "attempt('direct', lambda: connect({engine:?}))\n\
         attempt('symlink', lambda: connect({link:?}))\n\
         attempt('proc_root', lambda: connect('/proc/self/root' + {engine:?}))\n\
         attempt('dotdot', lambda: connect({dotdot:?}))\n\
         os.chdir({dir:?})\n\
         attempt('relative', lambda: connect('docker.sock'))\n\
         attempt('relative_allowed', lambda: connect('allowed.sock'))\n\
         attempt('allowed', lambda: connect({allowed:?}))\n",
        engine = path_str(&engine),
        link = path_str(&link),
        dotdot = format!("{}/../{}/docker.sock", path_str(dir.path()), {
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
        }),
        dir = path_str(dir.path()),
        allowed = path_str(&allowed),
    );
    let outside = outside_py(&script);
    for route in [
        "direct",
        "symlink",
        "proc_root",
        "dotdot",
        "relative",
        "relative_allowed",
        "allowed",
    ] {
        assert_eq!(outcome(&outside, route), "ok", "{route} outside agents");
    }
    let out = agent_py(&d, &agent, &script);
    for route in ["direct", "symlink", "proc_root", "dotdot", "relative"] {
        assert_eq!(
            outcome(&out, route),
            REFUSED.to_string(),
            "{route} as the agent"
        );
    }
    // Under `run` the socket is judged, not the name (tests/tests/unix_resolved.rs): the allowed
    // socket under another spelling is the allowed socket.
    assert_eq!(outcome(&out, "relative_allowed"), "ok");
    assert_eq!(outcome(&out, "allowed"), "ok");
    trail_unix(&d, "connect", path_str(&link), "denied");
    trail_unix(&d, "connect", "docker.sock", "denied");
    trail_unix(
        &d,
        "connect",
        &format!("/proc/self/root{}", path_str(&engine)),
        "denied",
    );
}

#[test]
fn abstract_sockets_are_judged_by_name() {
    if !require_root("abstract_sockets_are_judged_by_name") {
        return;
    }
    let agent = unique_agent("unix-abs");
    let ok = format!("{agent}-ok");
    let other = format!("{agent}-other");
    let d = Daemon::start(&[policy(&agent, "enforce", &allow_list(&[&format!("@{ok}")]))]);
    // The agent serves both names itself: `run`'s Landlock scope already refuses abstract
    // sockets made outside the agent, so only this hook stands between it and its own.
    let script = format!(
        "servers = []\n\
         for n in ({ok:?}, {other:?}):\n    \
             s = socket.socket(socket.AF_UNIX); s.bind('\\0' + n); s.listen(4); servers.append(s)\n\
         attempt('abstract_ok', lambda: connect('\\0' + {ok:?}))\n\
         attempt('abstract_other', lambda: connect('\\0' + {other:?}))\n"
    );
    let outside = outside_py(&script);
    assert_eq!(outcome(&outside, "abstract_ok"), "ok");
    assert_eq!(outcome(&outside, "abstract_other"), "ok");
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "abstract_ok"), "ok");
    assert_eq!(outcome(&out, "abstract_other"), REFUSED.to_string());
    trail_unix(&d, "connect", &format!("@{other}"), "denied");
    journal_unix(&agent, "connect", &format!("@{other}"), "denied");
    trail_unix(&d, "connect", &format!("@{ok}"), "allowed");
}

#[test]
fn datagram_sends_to_a_socket_off_the_list_are_refused() {
    if !require_root("datagram_sends_to_a_socket_off_the_list_are_refused") {
        return;
    }
    let dir = socket_dir();
    let sink = dir.path().join("log.sock");
    let received = dir.path().join("received");
    let _sink = python_server(DGRAM_SINK, &[path_str(&sink), path_str(&received)]);
    let allowed = dir.path().join("allowed-log.sock");
    let allowed_received = dir.path().join("allowed-received");
    let _allowed_sink = python_server(
        DGRAM_SINK,
        &[path_str(&allowed), path_str(&allowed_received)],
    );
    let agent = unique_agent("unix-dgram");
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &allow_list(&[path_str(&allowed)]),
    )]);

    let script = |tag: &str| {
        format!(
            "d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             attempt('sendto', lambda: d.sendto(b'{tag}', {sink:?}))\n\
             attempt('sendto_allowed', lambda: d.sendto(b'{tag}', {allowed:?}))\n\
             c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             attempt('dgram_connect', lambda: c.connect({sink:?}))\n",
            sink = path_str(&sink),
            allowed = path_str(&allowed),
        )
    };
    let outside = outside_py(&script("outside"));
    for route in ["sendto", "sendto_allowed", "dgram_connect"] {
        assert_eq!(outcome(&outside, route), "ok", "{route} outside agents");
    }
    let out = agent_py(&d, &agent, &script("agent"));
    assert_eq!(outcome(&out, "sendto"), REFUSED.to_string());
    assert_eq!(outcome(&out, "dgram_connect"), REFUSED.to_string());
    assert_eq!(outcome(&out, "sendto_allowed"), "ok");
    let rec = trail_unix(&d, "sendmsg", path_str(&sink), "denied");
    assert!(field(&rec, "message").contains("unix dgram"));
    journal_unix(&agent, "sendmsg", path_str(&sink), "denied");
    trail_unix(&d, "connect", path_str(&sink), "denied");
    // What arrived: the outside datagram on both, the agent's only on the allowed socket.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let got = std::fs::read_to_string(&received).unwrap_or_default();
    assert_eq!(got, "outside\n", "the refused sink got: {got:?}");
    let got = std::fs::read_to_string(&allowed_received).unwrap_or_default();
    assert_eq!(got, "outside\nagent\n", "the allowed sink got: {got:?}");
}

#[test]
fn deny_known_daemons_refuses_the_listed_sockets_and_leaves_the_rest() {
    if !require_root("deny_known_daemons_refuses_the_listed_sockets_and_leaves_the_rest") {
        return;
    }
    // A socket the built-in list names, that this host does not have (the test creates it and
    // removes it again; a host daemon's real socket is never touched).
    let known: PathBuf = [
        "/run/docker.sock",
        "/run/podman/podman.sock",
        "/run/crio/crio.sock",
        "/run/buildkit/buildkitd.sock",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| {
        !p.exists()
            && p.parent()
                .is_some_and(|d| !d.exists() || d == Path::new("/run"))
    })
    .expect("one of the known daemon sockets is absent on this host");
    let made_dir = known
        .parent()
        .filter(|d| !d.exists())
        .map(Path::to_path_buf);
    if let Some(d) = &made_dir {
        std::fs::create_dir(d).expect("creating the daemon's directory");
    }
    struct Cleanup(PathBuf, Option<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            if let Some(d) = &self.1 {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    let _cleanup = Cleanup(known.clone(), made_dir);
    let _server = python_server(ENGINE, &[path_str(&known)]);
    let dir = socket_dir();
    let other = dir.path().join("session.sock");
    let _other_server = python_server(ENGINE, &[path_str(&other)]);

    let agent = unique_agent("unix-known");
    let d = Daemon::start(&[policy(&agent, "enforce", "deny_known_daemons = true")]);
    let script = format!(
        "attempt('known', lambda: connect({known:?}))\n\
         attempt('other', lambda: connect({other:?}))\n",
        known = path_str(&known),
        other = path_str(&other),
    );
    let outside = outside_py(&script);
    assert_eq!(outcome(&outside, "known"), "ok");
    assert_eq!(outcome(&outside, "other"), "ok");
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "known"), REFUSED.to_string());
    assert_eq!(outcome(&out, "other"), "ok");
    let rec = trail_unix(&d, "connect", path_str(&known), "denied");
    assert!(
        field(&rec, "reason").contains("deny_known_daemons"),
        "reason: {}",
        field(&rec, "reason")
    );
}

#[test]
fn alert_mode_reports_and_lets_the_connect_through() {
    if !require_root("alert_mode_reports_and_lets_the_connect_through") {
        return;
    }
    let dir = socket_dir();
    let engine = dir.path().join("docker.sock");
    let _server = python_server(ENGINE, &[path_str(&engine)]);
    let agent = unique_agent("unix-alert");
    let d = Daemon::start(&[policy(&agent, "alert", "allow = []")]);
    let out = agent_curl(&d, &agent, &engine);
    assert!(
        out.status.success() && text(&out.stdout).contains("fake-engine"),
        "alert mode lets curl through: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let rec = trail_unix(&d, "connect", path_str(&engine), "alert");
    assert_eq!(field(&rec, "enforcement"), "");
    journal_unix(&agent, "connect", path_str(&engine), "alert");
}

#[test]
fn an_agent_without_a_unix_section_is_not_judged() {
    if !require_root("an_agent_without_a_unix_section_is_not_judged") {
        return;
    }
    let dir = socket_dir();
    let engine = dir.path().join("docker.sock");
    let _server = python_server(ENGINE, &[path_str(&engine)]);
    let agent = unique_agent("unix-none");
    let text_policy =
        format!("agent = {agent:?}\nmode = \"enforce\"\n[exec]\nallow = [\"/usr/bin/python3*\"]\n");
    let d = Daemon::start(&[(format!("{agent}.toml"), text_policy)]);
    let script = format!(
        "attempt('connect', lambda: connect({:?}))\n",
        path_str(&engine)
    );
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "connect"), "ok");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !d.audit()
            .iter()
            .any(|v| field(v, "dest_transport") == "unix"),
        "no unix record for an agent without [unix]"
    );
}

#[test]
fn a_reload_puts_a_new_unix_list_in_force() {
    if !require_root("a_reload_puts_a_new_unix_list_in_force") {
        return;
    }
    let dir = socket_dir();
    let first = dir.path().join("first.sock");
    let second = dir.path().join("second.sock");
    let _first_server = python_server(ENGINE, &[path_str(&first)]);
    let _second_server = python_server(ENGINE, &[path_str(&second)]);
    let agent = unique_agent("unix-reload");
    let (file, text) = policy(&agent, "enforce", &allow_list(&[path_str(&first)]));
    let d = Daemon::start(&[(file.clone(), text)]);
    let script = format!(
        "attempt('first', lambda: connect({:?}))\nattempt('second', lambda: connect({:?}))\n",
        path_str(&first),
        path_str(&second)
    );
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "first"), "ok");
    assert_eq!(outcome(&out, "second"), REFUSED);

    let (_, text) = policy(&agent, "enforce", &allow_list(&[path_str(&second)]));
    d.write_policy(&file, &text);
    let r = d.reload();
    assert!(r.status.success(), "reload: {}", text_of(&r));
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "first"), REFUSED, "after the reload");
    assert_eq!(outcome(&out, "second"), "ok", "after the reload");

    // Without the section unix sockets are not judged again.
    let plain =
        format!("agent = {agent:?}\nmode = \"enforce\"\n[exec]\nallow = [\"/usr/bin/python3*\"]\n");
    d.write_policy(&file, &plain);
    let r = d.reload();
    assert!(r.status.success(), "reload: {}", text_of(&r));
    let out = agent_py(&d, &agent, &script);
    assert_eq!(outcome(&out, "first"), "ok", "without [unix]");
    assert_eq!(outcome(&out, "second"), "ok", "without [unix]");
}

fn text_of(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}
