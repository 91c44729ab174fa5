//! Unix connects judged on the listener's bound name (docs/unix-sockets.md, "Judging the
//! listener's bound name"): for agents the kernel hook judges (identified by `[identity]`
//! selectors, alert mode), a connect allowed by the name given is judged again as connect()
//! returns, on the name the listening server bound, which the agent does not control. A refused
//! one ends the process with SIGKILL before it can use the socket. Real programs: python3
//! clients against a python3 HTTP-ish server on a unix socket standing in for a container
//! engine's API, placed in a cgroup a selector makes an agent. Every denial has a control: the
//! same client outside every agent reaches the server. Run one at a time (`--test-threads=1`).

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agent_monitor_tests::*;
use serde_json::Value;

/// A known daemon's socket (`KNOWN_DAEMONS`) the test can serve when the host has no podman.
const PODMAN_DIR: &str = "/run/podman";
const PODMAN_SOCK: &str = "/run/podman/podman.sock";

/// A server on the unix socket argv[1] named argv[2] that appends, for every connection, the
/// bytes it received (`<name> got <n>`) to the file argv[3] and answers `{"server": name}` when
/// it received a request.
const SERVER: &str = r#"import os, socket, sys, threading
path, name, log = sys.argv[1], sys.argv[2], sys.argv[3]
if os.path.lexists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o666)
listener.listen(64)
lock = threading.Lock()
def answer(conn):
    with conn:
        try:
            got = conn.recv(65536)
        except OSError:
            got = b''
        with lock, open(log, 'a') as f:
            f.write('%s got %d\n' % (name, len(got)))
        if got:
            body = ('{"server":"%s"}' % name).encode()
            conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
print('ready', flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
"#;

/// A datagram receiver bound to the unix socket argv[1] named argv[2] that appends
/// `<name> got <n>` to the file argv[3] for every datagram.
const DGRAM_SERVER: &str = r#"import os, socket, sys
path, name, log = sys.argv[1], sys.argv[2], sys.argv[3]
if os.path.lexists(path):
    os.unlink(path)
r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
r.bind(path)
os.chmod(path, 0o666)
print('ready', flush=True)
while True:
    got = r.recv(65536)
    with open(log, 'a') as f:
        f.write('%s got %d\n' % (name, len(got)))
"#;

/// A datagram client: `sendto` argv[1] twice (argv[2] = "send"), or `connect` then `send`
/// (argv[2] = "connect"), saying after each step what it did.
const DGRAM_CLIENT: &str = r#"import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
if sys.argv[2] == 'connect':
    s.connect(sys.argv[1])
    print('connected', flush=True)
    s.send(b'one')
else:
    s.sendto(b'one', sys.argv[1])
print('sent', flush=True)
s.sendto(b'two', sys.argv[1]) if sys.argv[2] != 'connect' else s.send(b'two')
print('sent twice', flush=True)
"#;

/// A client: (optionally chdir to argv[2], then) connect a stream socket to argv[1], say
/// `connected`, send a request and print the answer. EPERM from connect prints `errno 1`.
const CLIENT: &str = r#"import os, socket, sys
if len(sys.argv) > 2:
    os.chdir(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print('errno %d' % e.errno, flush=True)
    sys.exit(0)
print('connected', flush=True)
s.sendall(b'GET / HTTP/1.0\r\n\r\n')
print(s.recv(4096).decode(errors='replace'), flush=True)
"#;

/// Serves [`SERVER`] named `name` on `path`, logging to `log`.
fn serve(path: &Path, name: &str, log: &Path) -> ChildGuard {
    python_ready(SERVER, &[utf8(path), name, utf8(log)])
}

/// [`CLIENT`] on `path` (after `chdir(cwd)`), in cgroup `cg` (a selected agent) or in the
/// test's own cgroup (outside every agent).
fn client(cg: Option<&TestCgroup>, path: &str, cwd: Option<&str>) -> Output {
    let mut args = vec![path.to_string()];
    args.extend(cwd.map(str::to_string));
    let mut cmd = Command::new(SH);
    match cg {
        Some(cg) => cmd.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec {PYTHON} -c \"$0\" \"$@\"",
            cg.path.display()
        )),
        None => cmd.arg("-c").arg(format!("exec {PYTHON} -c \"$0\" \"$@\"")),
    };
    cmd.arg(CLIENT)
        .args(&args)
        .output()
        .expect("running the python3 client")
}

fn killed(out: &Output) -> bool {
    out.status.signal() == Some(9)
}

fn answered_by(out: &Output, server: &str) -> bool {
    text(&out.stdout).contains(&format!("{{\"server\":\"{server}\"}}"))
}

/// What the servers logged: one `<name> got <n>` line per connection.
fn server_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A cgroup-selected agent's policy (python3 and sh may run) with `unix` as its `[unix]`
/// section, in `mode`.
fn selector_policy(agent: &str, cg: &TestCgroup, mode: &str, unix: &str) -> (String, String) {
    let (name, body) = identity_policy(
        agent,
        &[],
        &[PYTHON, "/usr/bin/python3*", SH],
        &format!("cgroups = [{:?}]", cg.rel),
    );
    let body = body.replace("mode = \"enforce\"", &format!("mode = {mode:?}"));
    (name, format!("{body}[unix]\n{unix}\n"))
}

/// An agent identified by a cgroup selector (the kernel hook judges it: no `run` supervisor),
/// its cgroup, and the daemon in force.
struct SelectorAgent {
    agent: String,
    cg: TestCgroup,
    d: Daemon,
}

impl SelectorAgent {
    fn start(label: &str, mode: &str, unix: &str) -> SelectorAgent {
        let agent = unique_agent(label);
        let cg = TestCgroup::new(&format!("am-test-{agent}"), "worker");
        let d = Daemon::start(&[selector_policy(&agent, &cg, mode, unix)]);
        SelectorAgent { agent, cg, d }
    }
}

/// Waits for the trail's and journald's report of a connect to `given` that led to `bound`,
/// with `verdict`; returns the trail's record.
fn assert_led_to(d: &Daemon, agent: &str, given: &str, bound: &str, verdict: &str) -> Value {
    let what = format!("connect {verdict} {given} led to {bound}");
    let led = |reason: &str| reason.contains(&format!("{given} led to {bound}"));
    let trail = d.wait_audit(&what, |v| {
        field(v, "action") == "connect"
            && field(v, "dest_transport") == "unix"
            && field(v, "dest_path") == given
            && field(v, "verdict") == verdict
            && led(field(v, "reason"))
    });
    assert_eq!(field(&trail, "agent_id"), agent);
    wait_journal(agent, &what, |v| {
        field(v, "ACTION") == "connect"
            && field(v, "DEST_PATH") == given
            && field(v, "VERDICT") == verdict
            && led(field(v, "REASON"))
    });
    trail
}

/// Serves a socket at podman's well-known path for the test (the host has none), and removes
/// it and the directory it made afterwards.
struct KnownDaemon {
    _server: ChildGuard,
    made_dir: bool,
}

impl KnownDaemon {
    /// `server`: [`SERVER`] or [`DGRAM_SERVER`].
    fn start(server: &str, log: &Path) -> Option<KnownDaemon> {
        if Path::new(PODMAN_SOCK).exists() {
            return None;
        }
        let made_dir = !Path::new(PODMAN_DIR).exists();
        std::fs::create_dir_all(PODMAN_DIR).expect("creating /run/podman");
        let server = python_ready(server, &[PODMAN_SOCK, "podman", utf8(log)]);
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

/// podman's socket served for the test, its server's log, and a symlink to it in a directory
/// every uid may write. `None` (the test skips, saying so) on a host with a real podman.
struct Podman {
    link: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
    _server: KnownDaemon,
    _logs: tempfile::TempDir,
}

impl Podman {
    fn start() -> Option<Podman> {
        Podman::serving(SERVER)
    }

    fn serving(script: &str) -> Option<Podman> {
        let logs = tempfile::tempdir().expect("tempdir");
        let log = logs.path().join("served.log");
        let Some(server) = KnownDaemon::start(script, &log) else {
            eprintln!(
                "SKIPPED: {PODMAN_SOCK} exists on this host (a real podman): not touching it"
            );
            return None;
        };
        let dir = world_writable_dir();
        let link = dir.path().join("innocent.sock");
        std::os::unix::fs::symlink(PODMAN_SOCK, &link).expect("symlink");
        Some(Podman {
            link,
            log,
            dir,
            _server: server,
            _logs: logs,
        })
    }
}

/// The records of connects to `path` judged other than allowed, after giving a late one time
/// to arrive.
fn judged_records(d: &Daemon, path: &str) -> Vec<Value> {
    std::thread::sleep(std::time::Duration::from_millis(500));
    d.audit()
        .into_iter()
        .filter(|v| field(v, "dest_path") == path && field(v, "verdict") != "allowed")
        .collect()
}

/// Asserts that the client got `server`'s answer.
fn assert_answered(out: &Output, server: &str, what: &str) {
    assert!(
        answered_by(out, server),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_selector_agent_reaching_a_known_daemon_by_another_name_is_killed_before_it_writes() {
    if !require_root(
        "a_selector_agent_reaching_a_known_daemon_by_another_name_is_killed_before_it_writes",
    ) {
        return;
    }
    let Some(podman) = Podman::start() else {
        return;
    };
    let (dir, link, log) = (&podman.dir, &podman.link, &podman.log);
    let hard = dir.path().join("hard.sock");
    std::fs::hard_link(PODMAN_SOCK, &hard).expect("hard link to the socket");
    let unrelated = dir.path().join("unrelated.sock");
    let _unrelated_server = serve(&unrelated, "unrelated", log);

    let SelectorAgent { agent, cg, d } =
        SelectorAgent::start("upeer", "enforce", "deny_known_daemons = true");
    // A [unix] policy and an armed selector: the bound-name tracepoints are attached.
    let status = d.status();
    assert_eq!(
        attached_at(&status, "agent_unix_peer").as_deref(),
        Some("tracepoint syscalls/sys_exit_connect"),
        "{status}"
    );

    // (route, name given, cwd)
    let routes: Vec<(&str, String, Option<&str>)> = vec![
        ("symlink", utf8(link).to_string(), None),
        ("relative", "podman.sock".to_string(), Some(PODMAN_DIR)),
        ("proc_root", format!("/proc/self/root{PODMAN_SOCK}"), None),
        ("double_slash", format!("/{PODMAN_SOCK}"), None),
        ("hard_link", utf8(&hard).to_string(), None),
    ];
    for (route, path, cwd) in &routes {
        let out = client(Some(&cg), path, *cwd);
        assert!(
            killed(&out),
            "{route}: the agent was not killed ({:?}); stdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        assert!(
            !text(&out.stdout).contains("connected"),
            "{route}: connect() returned to the agent: {}",
            text(&out.stdout)
        );
        assert_led_to(&d, &agent, path, PODMAN_SOCK, "denied");
    }
    // The name itself: refused by the hook with EPERM, as before (not killed).
    let out = client(Some(&cg), PODMAN_SOCK, None);
    assert_eq!(text(&out.stdout).trim(), "errno 1", "{:?}", out.status);
    // The server accepted the killed agents' connections and read nothing from any of them.
    let served = server_log(&log);
    assert!(
        !served
            .lines()
            .any(|l| l.starts_with("podman got ") && l != "podman got 0"),
        "the server received request bytes from a killed agent:\n{served}"
    );
    // The same agent's unrelated socket still works.
    let out = client(Some(&cg), utf8(&unrelated), None);
    assert_answered(&out, "unrelated", "unrelated socket as the agent");

    // Controls: every route reaches the server from outside every agent.
    for (route, path, cwd) in &routes {
        let out = client(None, path, *cwd);
        assert_answered(&out, "podman", &format!("{route} outside agents"));
    }
}

#[test]
fn a_listed_name_planted_as_a_symlink_kills_a_selector_agent_and_the_listed_socket_works() {
    if !require_root(
        "a_listed_name_planted_as_a_symlink_kills_a_selector_agent_and_the_listed_socket_works",
    ) {
        return;
    }
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("served.log");
    let dir = world_writable_dir();
    let listed = dir.path().join("listed.sock");
    let _listed_server = serve(&listed, "listed", &log);
    let outside_dir = world_writable_dir();
    let engine = outside_dir.path().join("engine.sock");
    let _engine_server = serve(&engine, "engine", &log);
    // Listed, but a symlink the agent (or anyone who may write the directory) planted.
    let planted: PathBuf = dir.path().join("planted.sock");
    std::os::unix::fs::symlink(&engine, &planted).expect("symlink");

    let allow = format!("allow = [{:?}, {:?}]", utf8(&listed), utf8(&planted));
    let SelectorAgent { agent, cg, d } = SelectorAgent::start("upeerallow", "enforce", &allow);

    let out = client(Some(&cg), utf8(&planted), None);
    assert!(
        killed(&out) && !text(&out.stdout).contains("connected"),
        "planted name as the agent: {:?} {}\ndaemon log:\n{}",
        out.status,
        text(&out.stdout),
        d.log()
    );
    let record = assert_led_to(&d, &agent, utf8(&planted), utf8(&engine), "denied");
    assert_eq!(field(&record, "enforcement"), "sigkill", "{record}");
    let served = server_log(&log);
    assert!(
        !served
            .lines()
            .any(|l| l.starts_with("engine got ") && l != "engine got 0"),
        "the engine received request bytes from the killed agent:\n{served}"
    );
    // The listed socket by its listed name works.
    assert_answered(
        &client(Some(&cg), utf8(&listed), None),
        "listed",
        "listed as the agent",
    );
    // Under another name it is still refused by the hook, by the name given (EPERM, as before).
    let out = client(Some(&cg), "listed.sock", Some(utf8(dir.path())));
    assert_eq!(
        text(&out.stdout).trim(),
        "errno 1",
        "listed, relative: {:?}",
        out.status
    );
    // Control: outside every agent the planted name reaches the engine.
    assert_answered(
        &client(None, utf8(&planted), None),
        "engine",
        "outside agents",
    );
}

#[test]
fn an_alert_mode_agent_goes_through_and_is_reported_once_with_where_it_led() {
    if !require_root("an_alert_mode_agent_goes_through_and_is_reported_once_with_where_it_led") {
        return;
    }
    let Some(podman) = Podman::start() else {
        return;
    };
    let link = utf8(&podman.link);
    let SelectorAgent { agent, cg, d } =
        SelectorAgent::start("upeeralert", "alert", "deny_known_daemons = true");
    let out = client(Some(&cg), link, None);
    assert_answered(&out, "podman", "alert mode lets it through");
    assert_led_to(&d, &agent, link, PODMAN_SOCK, "alert");
    // Once: no second alert or denial for the same connect.
    let judged = judged_records(&d, link);
    assert_eq!(judged.len(), 1, "{judged:#?}");
    // Control: the same client outside every agent.
    assert_answered(&client(None, link, None), "podman", "outside agents");
}

#[test]
fn a_run_agent_is_judged_once_by_its_supervisor_not_killed() {
    if !require_root("a_run_agent_is_judged_once_by_its_supervisor_not_killed") {
        return;
    }
    let Some(podman) = Podman::start() else {
        return;
    };
    let link = utf8(&podman.link);
    let agent = unique_agent("upeerrun");
    let policy = (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [\"/usr/bin/python3*\"]\n[unix]\ndeny_known_daemons = true\n"
        ),
    );
    let d = Daemon::start(&[policy]);
    // No selector: every agent is `run`'s, so the tracepoints that would cost every process on
    // the host are not attached (the unix hooks are, below the agents' cgroup).
    let status = d.status();
    assert!(
        attached_at(&status, "agent_connect_unix").is_some(),
        "{status}"
    );
    for program in ["agent_unix_peer", "agent_unix_datagram"] {
        assert_eq!(attached_at(&status, program), None, "{program}: {status}");
    }
    let out = d.run(&agent, None, &[PYTHON, "-c", CLIENT, link]);
    // `run`'s supervisor refuses it with EPERM (the connector, outside every agent, would have
    // made the connect): the peer tracepoint has nothing to judge, nothing is killed.
    assert_eq!(
        text(&out.stdout).trim(),
        "errno 1",
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    d.wait_audit("the supervisor's refusal", |v| {
        field(v, "dest_path") == link && field(v, "verdict") == "denied"
    });
    let judged = judged_records(&d, link);
    assert_eq!(judged.len(), 1, "reported once: {judged:#?}");
    assert_ne!(
        field(&judged[0], "enforcement"),
        "sigkill",
        "{:#?}",
        judged[0]
    );
    // Control: outside every agent.
    assert_answered(&client(None, link, None), "podman", "outside agents");
}

/// [`DGRAM_CLIENT`] in `how` ("send" or "connect") to `path`, in cgroup `cg` or outside agents.
fn dgram_client(cg: Option<&TestCgroup>, path: &str, how: &str) -> Output {
    let enter = cg
        .map(|cg| format!("echo $$ > {}/cgroup.procs && ", cg.path.display()))
        .unwrap_or_default();
    Command::new(SH)
        .arg("-c")
        .arg(format!("{enter}exec {PYTHON} -c \"$0\" \"$@\""))
        .args([DGRAM_CLIENT, path, how])
        .output()
        .expect("running the python3 datagram client")
}

#[test]
fn a_named_datagram_to_a_known_daemon_by_another_name_kills_the_sender_after_delivery() {
    if !require_root(
        "a_named_datagram_to_a_known_daemon_by_another_name_kills_the_sender_after_delivery",
    ) {
        return;
    }
    let Some(podman) = Podman::serving(DGRAM_SERVER) else {
        return;
    };
    let (link, log) = (utf8(&podman.link), &podman.log);
    let SelectorAgent { agent, cg, d } =
        SelectorAgent::start("upeerdgram", "enforce", "deny_known_daemons = true");
    let delivered = || server_log(log).lines().count();

    // A datagram connect() through the symlink: killed as connect returns, nothing delivered.
    let out = dgram_client(Some(&cg), link, "connect");
    assert!(
        killed(&out) && !text(&out.stdout).contains("connected"),
        "datagram connect as the agent: {:?} {}\ndaemon log:\n{}",
        out.status,
        text(&out.stdout),
        d.log()
    );
    assert_led_to(&d, &agent, link, PODMAN_SOCK, "denied");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(delivered(), 0, "{}", server_log(log));

    // sendto() through the symlink: the first datagram is delivered before it can be judged
    // (the residual the docs name); the sender dies before its call returns, so no second one.
    let out = dgram_client(Some(&cg), link, "send");
    assert!(
        killed(&out) && !text(&out.stdout).contains("sent"),
        "sendto as the agent: {:?} {}\ndaemon log:\n{}",
        out.status,
        text(&out.stdout),
        d.log()
    );
    let record = d.wait_audit("the datagram send's refusal", |v| {
        field(v, "action") == "sendmsg"
            && field(v, "dest_path") == link
            && field(v, "verdict") == "denied"
            && field(v, "reason").contains(&format!("{link} led to {PODMAN_SOCK}"))
    });
    assert_eq!(field(&record, "enforcement"), "sigkill", "{record}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        delivered(),
        1,
        "one datagram, then the sender died: {}",
        server_log(log)
    );

    // Controls: outside every agent both routes deliver both datagrams.
    for how in ["connect", "send"] {
        let out = dgram_client(None, link, how);
        assert!(
            text(&out.stdout).contains("sent twice"),
            "{how} outside agents: {:?} {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(delivered(), 5, "{}", server_log(log));
}

/// A unix stream connect to `argv[1]` through io_uring (`IORING_OP_CONNECT`), inline in the
/// caller or, with `URING_ASYNC`, in an io_uring worker thread; prints `connect <res>` and, when
/// connected, writes a request and prints `connected`.
const UNIX_URING_MAIN_C: &str = r#"
#include <sys/un.h>
int main(int argc, char **argv) {
    async_worker = getenv("URING_ASYNC") != NULL;
    setup_ring();
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_CONNECT;
    if (async_worker) e.flags = IOSQE_ASYNC;
    e.fd = socket(AF_UNIX, SOCK_STREAM, 0);
    e.addr = (unsigned long)&a;
    e.off = sizeof a;
    int res = submit(&e);
    printf("connect %d\n", res);
    fflush(stdout);
    if (res == 0) {
        const char req[] = "GET / HTTP/1.0\r\n\r\n";
        if (write(e.fd, req, sizeof req - 1) > 0) printf("connected\n");
    }
    return 0;
}
"#;

/// The io_uring client in cgroup `cg` (or outside every agent), `async_worker`: `URING_ASYNC`.
fn uring_client(bin: &Path, cg: Option<&TestCgroup>, path: &str, async_worker: bool) -> Output {
    let enter = cg.map_or(String::new(), |cg| {
        format!("echo $$ > {}/cgroup.procs && ", cg.path.display())
    });
    let mut cmd = Command::new(SH);
    cmd.arg("-c")
        .arg(format!("{enter}exec \"$0\" \"$@\""))
        .arg(bin)
        .arg(path);
    if async_worker {
        cmd.env("URING_ASYNC", "1");
    }
    cmd.output().expect("running the io_uring client")
}

#[test]
fn io_uring_connects_are_judged_inline_and_refused_from_worker_threads() {
    if !require_root("io_uring_connects_are_judged_inline_and_refused_from_worker_threads") {
        return;
    }
    let Some(podman) = Podman::start() else {
        return;
    };
    let (dir, link, log) = (&podman.dir, utf8(&podman.link), &podman.log);
    let bin = compile_c(
        dir.path(),
        "uring_unix",
        &format!("{URING_RING_C}{UNIX_URING_MAIN_C}"),
    );
    let agent = unique_agent("upeeruring");
    let cg = TestCgroup::new(&format!("am-test-{agent}"), "worker");
    let (name, body) = selector_policy(&agent, &cg, "enforce", "deny_known_daemons = true");
    // The policy lets the agent run the io_uring client too.
    let body = body.replacen(&format!("{SH:?}"), &format!("{SH:?}, {:?}", utf8(&bin)), 1);
    let d = Daemon::start(&[(name, body)]);
    assert_eq!(
        attached_at(&d.status(), "agent_unix_uring").as_deref(),
        Some("tracepoint syscalls/sys_exit_io_uring_enter"),
    );
    // Inline: the connect completes in io_uring_enter, judged as that call returns.
    let out = uring_client(&bin, Some(&cg), link, false);
    assert!(
        killed(&out) && !text(&out.stdout).contains("connected"),
        "inline io_uring connect through the symlink: {:?}\n{}\n{}",
        out.status,
        text(&out.stdout),
        d.log()
    );
    assert_led_to(&d, &agent, link, PODMAN_SOCK, "denied");
    // A worker thread: refused by the hook (EPERM in the completion), reported.
    let out = uring_client(&bin, Some(&cg), link, true);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("connect -{}", libc::EPERM),
        "worker io_uring connect: {:?}",
        out.status
    );
    let rec = d.wait_audit("the worker's refused connect", |v| {
        field(v, "dest_path") == link
            && field(v, "verdict") == "denied"
            && field(v, "reason").contains("io_uring worker thread")
    });
    assert_eq!(field(&rec, "agent_id"), agent);
    // The server read nothing from either.
    let served = server_log(log);
    assert!(
        !served
            .lines()
            .any(|l| l.starts_with("podman got ") && l != "podman got 0"),
        "the server received request bytes from the agent:\n{served}"
    );
    // Control: the same program outside every agent, inline and in a worker, connects.
    for async_worker in [false, true] {
        let out = uring_client(&bin, None, link, async_worker);
        assert!(
            text(&out.stdout).contains("connect 0\nconnected"),
            "outside agents (async {async_worker}): {:?} {}",
            out.status,
            text(&out.stdout)
        );
    }
}
