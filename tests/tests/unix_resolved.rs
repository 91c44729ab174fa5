//! Local sockets judged on the socket a name resolves to (docs/unix-sockets.md, "Judging the
//! resolved socket"): for an agent started by `agent-monitor run` whose policy has `[unix]`, a
//! connect to a pathname unix socket is resolved by `run`'s supervisor in the agent's view and
//! judged by the socket's device and inode, so a listed name that leads elsewhere, a symlink, a
//! relative name, `/proc/self/root/…` or a hard link changes nothing. Real programs: python3 for
//! the routes around a name, curl `--unix-socket` against an HTTP server standing in for a
//! container engine's API. Every denial has a control: the same connect outside every agent
//! works. Run one at a time (`--test-threads=1`).

use std::path::Path;
use std::process::{Command, Output};

use agent_monitor_tests::*;
use serde_json::Value;

const CURL: &str = "/usr/bin/curl";

/// A known daemon's socket (`KNOWN_DAEMONS`) the test can serve when the host has no podman.
const PODMAN_DIR: &str = "/run/podman";
const PODMAN_SOCK: &str = "/run/podman/podman.sock";

/// A one-answer-per-connection HTTP responder on a unix socket (argv[1]) named argv[2]: every
/// request gets `{"server":…,"peer_pid":…,"peer_uid":…,"peer_gid":…}`, from SO_PEERCRED (what
/// a container engine would trust).
const SERVER: &str = r#"import os, socket, struct, sys, threading
path, name = sys.argv[1], sys.argv[2]
if os.path.lexists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o666)
listener.listen(64)
def answer(conn):
    with conn:
        pid, uid, gid = struct.unpack('3i', conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        body = ('{"server":"%s","peer_pid":%d,"peer_uid":%d,"peer_gid":%d}' % (name, pid, uid, gid)).encode()
        try:
            if conn.recv(65536):
                conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
        except OSError:
            pass  # a probe that only connected and closed
print('ready', flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
"#;

/// Connects a stream socket to a unix socket name, after [`PY_ATTEMPT`].
const PY_CONNECT: &str =
    "\ndef connect(path):\n    with socket.socket(socket.AF_UNIX) as s:\n        s.connect(path)\n";

const REFUSED: &str = "errno 1";

/// Serves [`SERVER`] named `name` on `path`.
fn serve(path: &Path, name: &str) -> ChildGuard {
    python_ready(SERVER, &[s(path), name])
}

/// A policy whose agent may run python3 and curl and use the unix sockets `unix`.
fn policy(agent: &str, unix: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [\"/usr/bin/python3*\", {CURL:?}]\n[unix]\n{unix}\n"
        ),
    )
}

/// The probe `script` (after [`PY_ATTEMPT`] and [`PY_CONNECT`]) as agent `agent` of `d`, or
/// outside every agent.
fn py(as_agent: Option<(&Daemon, &str)>, script: &str) -> Output {
    let probe = format!("{PY_ATTEMPT}{PY_CONNECT}{script}");
    match as_agent {
        Some((d, agent)) => d.run(agent, None, &[PYTHON, "-c", &probe]),
        None => Command::new(PYTHON)
            .args(["-c", &probe])
            .output()
            .expect("running python3"),
    }
}

fn curl_args(sock: &str) -> Vec<&str> {
    vec![
        CURL,
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        sock,
        "http://engine/",
    ]
}

/// A refusal as journald and the JSON trail record it: `ACTION=connect DEST_TRANSPORT=unix
/// DEST_PATH=<the name the agent gave> VERDICT=denied`.
fn assert_reported(d: &Daemon, agent: &str, path: &str) {
    let trail = d.wait_audit(&format!("connect denied {path}"), |v| {
        field(v, "action") == "connect"
            && field(v, "dest_transport") == "unix"
            && field(v, "dest_path") == path
            && field(v, "verdict") == "denied"
    });
    assert_eq!(field(&trail, "agent_id"), agent);
    wait_journal(agent, &format!("connect denied {path}"), |v| {
        field(v, "ACTION") == "connect"
            && field(v, "DEST_TRANSPORT") == "unix"
            && field(v, "DEST_PATH") == path
            && field(v, "VERDICT") == "denied"
    });
}

fn socket_dir() -> tempfile::TempDir {
    world_writable_dir()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn json_body(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "curl failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("curl's answer is not JSON ({e}): {}", text(&out.stdout)))
}

#[test]
fn a_listed_name_that_leads_elsewhere_is_refused_and_the_listed_socket_still_works() {
    if !require_root(
        "a_listed_name_that_leads_elsewhere_is_refused_and_the_listed_socket_still_works",
    ) {
        return;
    }
    // The listed names live in a directory the agent can write: the case the name-only hook
    // could not defend.
    let dir = socket_dir();
    let listed = dir.path().join("listed.sock");
    let _listed_server = serve(&listed, "listed");
    let outside_dir = socket_dir();
    let engine = outside_dir.path().join("engine.sock");
    let _engine_server = serve(&engine, "engine");
    // Listed, but not there yet: the agent makes it a symlink to the unlisted engine.
    let planted = dir.path().join("planted.sock");
    // Listed, and the agent swaps the listed path itself for a symlink.
    let swapped = dir.path().join("swapped.sock");
    let _swapped_server = serve(&swapped, "swapped");

    let agent = unique_agent("unix-resolved");
    let allow = format!(
        "allow = [{:?}, {:?}, {:?}]",
        s(&listed),
        s(&planted),
        s(&swapped)
    );
    let d = Daemon::start(&[policy(&agent, &allow)]);

    let script = format!(
        "os.symlink({engine:?}, {planted:?})\n\
         attempt('planted', lambda: connect({planted:?}))\n\
         os.unlink({swapped:?}); os.symlink({engine:?}, {swapped:?})\n\
         attempt('swapped', lambda: connect({swapped:?}))\n\
         attempt('engine', lambda: connect({engine:?}))\n\
         os.chdir({dir:?})\n\
         attempt('listed_relative', lambda: connect('listed.sock'))\n\
         attempt('listed', lambda: connect({listed:?}))\n",
        engine = s(&engine),
        planted = s(&planted),
        swapped = s(&swapped),
        dir = s(dir.path()),
        listed = s(&listed),
    );
    let out = py(Some((&d, &agent)), &script);
    for route in ["planted", "swapped", "engine"] {
        assert_eq!(outcome(&out, route), REFUSED, "{route} as the agent");
    }
    // The listed socket under another spelling is the same socket: allowed.
    assert_eq!(outcome(&out, "listed_relative"), "ok");
    assert_eq!(outcome(&out, "listed"), "ok");
    assert_reported(&d, &agent, s(&planted));
    assert_reported(&d, &agent, s(&swapped));
    assert_reported(&d, &agent, s(&engine));
    let refusal = d.wait_audit("the planted name's refusal", |v| {
        field(v, "dest_path") == s(&planted) && field(v, "verdict") == "denied"
    });
    assert!(
        field(&refusal, "reason").contains(s(&engine)),
        "the reason names where the planted name led: {refusal}"
    );

    // Controls: the same names (symlinks, left in place) reach the engine from outside.
    let outside = py(
        None,
        &format!(
            "attempt('planted', lambda: connect({:?}))\nattempt('swapped', lambda: connect({:?}))\n",
            s(&planted),
            s(&swapped)
        ),
    );
    assert_eq!(outcome(&outside, "planted"), "ok");
    assert_eq!(outcome(&outside, "swapped"), "ok");

    // curl, as an unprivileged agent, gets the listed server's answer; the server sees the
    // agent's uid (the connection is made by `run`'s connector on the agent's behalf).
    let nobody_uid = 65534;
    let out = d.run_with(&agent, &["--user", "nobody"], &curl_args(s(&listed)));
    let body = json_body(&out);
    assert_eq!(body["server"], "listed");
    assert_eq!(body["peer_uid"], nobody_uid, "peer credentials: {body}");
    // And through the planted name it gets nothing.
    let out = d.run_with(&agent, &["--user", "nobody"], &curl_args(s(&planted)));
    assert!(
        !out.status.success(),
        "curl through the planted name: {}",
        text(&out.stdout)
    );
    assert!(!text(&out.stdout).contains("engine"));
    let outside = Command::new(CURL)
        .args(&curl_args(s(&planted))[1..])
        .output()
        .expect("curl");
    assert_eq!(json_body(&outside)["server"], "engine");
}

/// Serves a socket at podman's well-known path for the test (the host has none), and removes
/// it and the directory it made afterwards.
struct KnownDaemon {
    _server: ChildGuard,
    made_dir: bool,
}

impl KnownDaemon {
    fn start() -> Option<KnownDaemon> {
        if Path::new(PODMAN_SOCK).exists() {
            return None;
        }
        let made_dir = !Path::new(PODMAN_DIR).exists();
        std::fs::create_dir_all(PODMAN_DIR).expect("creating /run/podman");
        let server = serve(Path::new(PODMAN_SOCK), "podman");
        Some(KnownDaemon {
            _server: server,
            made_dir,
        })
    }
}

impl Drop for KnownDaemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(PODMAN_SOCK);
        if self.made_dir {
            let _ = std::fs::remove_dir(PODMAN_DIR);
        }
    }
}

#[test]
fn deny_known_daemons_holds_through_symlinks_relative_names_proc_root_and_hard_links() {
    if !require_root(
        "deny_known_daemons_holds_through_symlinks_relative_names_proc_root_and_hard_links",
    ) {
        return;
    }
    let Some(_podman) = KnownDaemon::start() else {
        eprintln!("SKIPPED: {PODMAN_SOCK} exists on this host (a real podman): not touching it");
        return;
    };
    let dir = socket_dir();
    let link = dir.path().join("innocent.sock");
    std::os::unix::fs::symlink(PODMAN_SOCK, &link).expect("symlink");
    let hard = dir.path().join("hard.sock");
    std::fs::hard_link(PODMAN_SOCK, &hard).expect("hard link to the socket");
    let unrelated = dir.path().join("unrelated.sock");
    let _unrelated_server = serve(&unrelated, "unrelated");

    let agent = unique_agent("unix-known");
    let d = Daemon::start(&[policy(&agent, "deny_known_daemons = true")]);
    let routes = [
        ("direct", PODMAN_SOCK.to_string()),
        ("symlink", s(&link).to_string()),
        ("proc_root", format!("/proc/self/root{PODMAN_SOCK}")),
        ("double_slash", format!("/{PODMAN_SOCK}")),
        ("hard_link", s(&hard).to_string()),
    ];
    let mut script = String::new();
    for (route, path) in &routes {
        script.push_str(&format!("attempt({route:?}, lambda: connect({path:?}))\n"));
    }
    script.push_str(&format!(
        "attempt('unrelated', lambda: connect({:?}))\n\
         os.chdir({PODMAN_DIR:?})\n\
         attempt('relative', lambda: connect('podman.sock'))\n",
        s(&unrelated)
    ));
    let outside = py(None, &script);
    for route in routes.iter().map(|r| r.0).chain(["unrelated", "relative"]) {
        assert_eq!(outcome(&outside, route), "ok", "{route} outside agents");
    }
    let out = py(Some((&d, &agent)), &script);
    for route in routes.iter().map(|r| r.0).chain(["relative"]) {
        assert_eq!(outcome(&out, route), REFUSED, "{route} as the agent");
    }
    assert_eq!(outcome(&out, "unrelated"), "ok");
    for (_, path) in &routes {
        assert_reported(&d, &agent, path);
    }
    assert_reported(&d, &agent, "podman.sock");

    // curl, the program an agent would use on a container engine's API.
    let out = d.run(&agent, None, &curl_args(s(&link)));
    assert!(
        !out.status.success(),
        "curl as the agent: {}",
        text(&out.stdout)
    );
    let outside = Command::new(CURL)
        .args(&curl_args(s(&link))[1..])
        .output()
        .expect("curl");
    assert_eq!(json_body(&outside)["server"], "podman");
    let out = d.run(&agent, None, &curl_args(s(&unrelated)));
    assert_eq!(json_body(&out)["server"], "unrelated");
}
