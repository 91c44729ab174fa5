//! Named datagram sends judged on the socket a name resolves to (docs/unix-sockets.md, "Named
//! datagram sends"): for an agent started by `agent-monitor run` whose policy has `[unix]`, a
//! `sendto`/`sendmsg` naming a pathname unix socket is resolved by `run`'s supervisor in the
//! agent's view, judged by the socket's device and inode, and made for the agent on its own
//! socket; so a symlink planted at a listed name, a relative name, `/proc/self/root/…` or `//…`
//! changes nothing. Real programs: python3 (sendto, sendmsg with iovecs and SCM_RIGHTS) and
//! util-linux `logger -u`. Every denial has a control: the same send outside every agent works.
//! Run one at a time (`--test-threads=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agent_monitor_tests::*;
use serde_json::Value;

const LOGGER: &str = "/usr/bin/logger";
const REFUSED: &str = "errno 1";

/// A datagram receiver on argv[1] that appends one JSON line per datagram to argv[2]: the data,
/// the sender's address, the credentials the kernel attached (SO_PASSCRED) and the first bytes
/// read from each descriptor passed with SCM_RIGHTS.
const RECEIVER: &str = r#"import json, os, socket, struct, sys
path, out = sys.argv[1], sys.argv[2]
if os.path.lexists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
print('ready', flush=True)
while True:
    data, anc, flags, addr = s.recvmsg(65536, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 16))
    if isinstance(addr, bytes):
        addr = addr.decode(errors='replace')
    rec = {'data': data.decode(errors='replace'), 'from': addr or None}
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            rec['pid'], rec['uid'], rec['gid'] = struct.unpack('3i', payload[:12])
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = struct.unpack('%di' % (len(payload) // 4), payload[:len(payload) // 4 * 4])
            rec['passed'] = [os.read(fd, 100).decode(errors='replace') for fd in fds]
            for fd in fds:
                os.close(fd)
    with open(out, 'a') as f:
        f.write(json.dumps(rec) + '\n')
"#;

/// Sends from a bound datagram socket (so the receiver sees a sender address), after
/// [`PY_ATTEMPT`]: `send(path, data)` with sendto, `send_parts(path, *parts)` with sendmsg and
/// one iovec a part, `send_fd(path, data, fd)` with SCM_RIGHTS, `send_creds(path, data)` with
/// SCM_CREDENTIALS naming the sender itself.
const PY_SEND: &str = r#"
me = sys.argv[1] if len(sys.argv) > 1 else None
d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
if me:
    if os.path.lexists(me):
        os.unlink(me)
    d.bind(me)
def send(path, data):
    n = d.sendto(data, path)
    assert n == len(data), n
def send_parts(path, *parts):
    n = d.sendmsg(list(parts), [], 0, path)
    assert n == sum(len(p) for p in parts), n
def send_fd(path, data, fd):
    d.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack('i', fd))], 0, path)
def send_creds(path, data):
    creds = struct.pack('3i', os.getpid(), os.getuid(), os.getgid())
    d.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)], 0, path)
"#;

/// A receiver of [`RECEIVER`] on `path`, recording into `path` + `.log`.
struct Receiver {
    _server: ChildGuard,
    log: PathBuf,
}

impl Receiver {
    fn start(path: &Path) -> Receiver {
        let log = PathBuf::from(format!("{}.log", utf8(path)));
        let server = python_ready(RECEIVER, &[utf8(path), utf8(&log)]);
        Receiver {
            _server: server,
            log,
        }
    }

    /// What arrived so far (after a moment for the receiver to write it).
    fn received(&self) -> Vec<Value> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver line"))
            .collect()
    }

    fn data(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r["data"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

fn policy(agent: &str, unix: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [\"/usr/bin/python3*\", {LOGGER:?}]\n[unix]\n{unix}\n"
        ),
    )
}

/// The probe `script` (after [`PY_ATTEMPT`] and [`PY_SEND`], sending from `me`) as agent
/// `agent` of `d` with `run` options `options`, or outside every agent.
fn py(as_agent: Option<(&Daemon, &str, &[&str])>, me: &str, script: &str) -> Output {
    let probe = format!("{PY_ATTEMPT}{PY_SEND}{script}");
    match as_agent {
        Some((d, agent, options)) => d.run_with(agent, options, &[PYTHON, "-c", &probe, me]),
        None => Command::new(PYTHON)
            .args(["-c", &probe, me])
            .output()
            .expect("running python3"),
    }
}

/// A directory the agent may write, with a receiver on `listed.sock` in it.
fn listed_receiver() -> (tempfile::TempDir, PathBuf, Receiver) {
    let dir = world_writable_dir();
    let listed = dir.path().join("listed.sock");
    let rx = Receiver::start(&listed);
    (dir, listed, rx)
}

/// A listed receiver and a listed name not there yet (`planted.sock`) in a directory the agent
/// may write, and an unlisted receiver (`engine.sock`) elsewhere.
struct Scene {
    dir: tempfile::TempDir,
    listed: PathBuf,
    listed_rx: Receiver,
    planted: PathBuf,
    outside_dir: tempfile::TempDir,
    engine: PathBuf,
    engine_rx: Receiver,
}

impl Scene {
    fn new() -> Scene {
        let (dir, listed, listed_rx) = listed_receiver();
        let planted = dir.path().join("planted.sock");
        let outside_dir = world_writable_dir();
        let engine = outside_dir.path().join("engine.sock");
        let engine_rx = Receiver::start(&engine);
        Scene {
            dir,
            listed,
            listed_rx,
            planted,
            outside_dir,
            engine,
            engine_rx,
        }
    }
}

/// A refused send as journald and the JSON trail record it; returns the trail's record.
fn assert_reported(d: &Daemon, agent: &str, path: &str) -> Value {
    let trail = d.wait_audit(&format!("sendmsg denied {path}"), |v| {
        field(v, "action") == "sendmsg"
            && field(v, "dest_transport") == "unix"
            && field(v, "dest_path") == path
            && field(v, "verdict") == "denied"
    });
    assert_eq!(field(&trail, "agent_id"), agent);
    wait_journal(agent, &format!("sendmsg denied {path}"), |v| {
        field(v, "ACTION") == "sendmsg"
            && field(v, "DEST_TRANSPORT") == "unix"
            && field(v, "DEST_PATH") == path
            && field(v, "VERDICT") == "denied"
    });
    trail
}

#[test]
fn a_listed_socket_receives_and_names_that_lead_elsewhere_are_refused() {
    if !require_root("a_listed_socket_receives_and_names_that_lead_elsewhere_are_refused") {
        return;
    }
    // The listed names live in a directory the agent can write.
    let Scene {
        dir,
        listed,
        listed_rx,
        planted,
        outside_dir,
        engine,
        engine_rx,
    } = Scene::new();
    let me = dir.path().join("agent.sock");

    let agent = unique_agent("unix-dgram");
    let allow = format!("allow = [{:?}, {:?}]", utf8(&listed), utf8(&planted));
    let d = Daemon::start(&[policy(&agent, &allow)]);

    let script = |tag: &str| {
        format!(
            "if not os.path.lexists({planted:?}):\n    os.symlink({engine:?}, {planted:?})\n\
             attempt('listed', lambda: send({listed:?}, b'{tag} listed'))\n\
             attempt('parts', lambda: send_parts({listed:?}, b'{tag} ', b'in ', b'parts'))\n\
             attempt('planted', lambda: send({planted:?}, b'{tag} planted'))\n\
             attempt('engine', lambda: send({engine:?}, b'{tag} engine'))\n\
             attempt('proc_root', lambda: send('/proc/self/root' + {engine:?}, b'{tag} proc_root'))\n\
             attempt('double_slash', lambda: send('/' + {engine:?}, b'{tag} double_slash'))\n\
             attempt('planted_msg', lambda: send_parts({planted:?}, b'{tag} planted_msg'))\n\
             os.chdir({outside:?})\n\
             attempt('relative', lambda: send('engine.sock', b'{tag} relative'))\n\
             os.chdir({dir:?})\n\
             attempt('listed_relative', lambda: send('listed.sock', b'{tag} listed_relative'))\n",
            planted = utf8(&planted),
            engine = utf8(&engine),
            listed = utf8(&listed),
            outside = utf8(outside_dir.path()),
            dir = utf8(dir.path()),
        )
    };
    // As an unprivileged agent: the receiver is told its uid, not root's.
    let out = py(
        Some((&d, &agent, &["--user", "nobody"][..])),
        utf8(&me),
        &script("agent"),
    );
    // Every name that leads to the engine, and the listed socket under its names.
    let elsewhere = [
        "planted",
        "engine",
        "proc_root",
        "double_slash",
        "planted_msg",
        "relative",
    ];
    let listed_routes = ["listed", "parts", "listed_relative"];
    for route in elsewhere {
        assert_eq!(outcome(&out, route), REFUSED, "{route} as the agent");
    }
    for route in listed_routes {
        assert_eq!(outcome(&out, route), "ok", "{route} as the agent");
    }
    let got = listed_rx.received();
    let data: Vec<&str> = got.iter().map(|r| field(r, "data")).collect();
    assert_eq!(
        data,
        ["agent listed", "agent in parts", "agent listed_relative"]
    );
    for r in &got {
        assert_eq!(field(r, "from"), utf8(&me), "the sender's address: {r}");
        assert_eq!(r["uid"], 65534, "the credentials the receiver is told: {r}");
        assert_eq!(r["gid"], 65534, "the credentials the receiver is told: {r}");
    }
    assert!(
        engine_rx.data().is_empty(),
        "the unlisted socket got {:?}",
        engine_rx.data()
    );
    let refusal = assert_reported(&d, &agent, utf8(&planted));
    assert!(
        field(&refusal, "reason").contains(utf8(&engine)),
        "the reason names where the planted name led: {refusal}"
    );
    assert_reported(&d, &agent, utf8(&engine));
    assert_reported(&d, &agent, &format!("/proc/self/root{}", utf8(&engine)));
    assert_reported(&d, &agent, &format!("/{}", utf8(&engine)));
    assert_reported(&d, &agent, "engine.sock");
    d.wait_audit("an allowed named send in the trail", |v| {
        field(v, "action") == "sendmsg"
            && field(v, "dest_path") == utf8(&listed)
            && field(v, "verdict") == "allowed"
    });

    // Controls: every route reaches the engine from outside (the planted symlink stays).
    let out = py(
        None,
        utf8(&dir.path().join("outside.sock")),
        &script("outside"),
    );
    for route in listed_routes.iter().chain(&elsewhere) {
        assert_eq!(outcome(&out, route), "ok", "{route} outside agents");
    }
    assert_eq!(
        engine_rx.data(),
        [
            "outside planted",
            "outside engine",
            "outside proc_root",
            "outside double_slash",
            "outside planted_msg",
            "outside relative",
        ]
    );

    // logger -u: the listed socket gets the line; through the planted name it fails (logger
    // connects its datagram socket, judged on the resolved socket too), outside it works.
    let line = format!("{agent} from logger");
    let ok = d.run(
        &agent,
        None,
        &[LOGGER, "--socket-errors=on", "-u", utf8(&listed), &line],
    );
    assert!(ok.status.success(), "logger: {}", text(&ok.stderr));
    assert!(
        listed_rx.data().iter().any(|m| m.contains(&line)),
        "the listed socket got {:?}",
        listed_rx.data()
    );
    let bad = format!("{agent} through the planted name");
    let refused = d.run(
        &agent,
        None,
        &[LOGGER, "--socket-errors=on", "-u", utf8(&planted), &bad],
    );
    assert!(
        !refused.status.success(),
        "logger through the planted name succeeded"
    );
    assert!(!engine_rx.data().iter().any(|m| m.contains(&bad)));
    let outside = Command::new(LOGGER)
        .args(["--socket-errors=on", "-u", utf8(&planted), "outside logger"])
        .output()
        .expect("logger");
    assert!(
        outside.status.success(),
        "logger outside: {}",
        text(&outside.stderr)
    );
    assert!(
        engine_rx
            .data()
            .iter()
            .any(|m| m.contains("outside logger"))
    );
}

#[test]
fn descriptors_pass_to_a_listed_socket_and_forged_credentials_are_refused() {
    if !require_root("descriptors_pass_to_a_listed_socket_and_forged_credentials_are_refused") {
        return;
    }
    let (dir, listed, rx) = listed_receiver();
    let agent = unique_agent("unix-dgram-fd");
    let d = Daemon::start(&[policy(&agent, &format!("allow = [{:?}]", utf8(&listed)))]);
    let script = |tag: &str| {
        format!(
            "r, w = os.pipe()\nos.write(w, b'{tag} through the pipe')\nos.close(w)\n\
             attempt('fd', lambda: send_fd({listed:?}, b'{tag} with fd', r))\n\
             attempt('bad_fd', lambda: send_fd({listed:?}, b'{tag} bad fd', 999))\n\
             attempt('creds', lambda: send_creds({listed:?}, b'{tag} with creds'))\n",
            listed = utf8(&listed),
        )
    };
    let out = py(
        Some((&d, &agent, &[][..])),
        utf8(&dir.path().join("agent.sock")),
        &script("agent"),
    );
    assert_eq!(outcome(&out, "fd"), "ok");
    assert_eq!(outcome(&out, "bad_fd"), format!("errno {}", libc_ebadf()));
    assert_eq!(outcome(&out, "creds"), REFUSED);
    let got = rx.received();
    assert_eq!(got.len(), 1, "received: {got:?}");
    assert_eq!(field(&got[0], "data"), "agent with fd");
    assert_eq!(
        got[0]["passed"],
        serde_json::json!(["agent through the pipe"])
    );
    let refusal = assert_reported(&d, &agent, utf8(&listed));
    assert!(
        field(&refusal, "reason").contains("SCM_CREDENTIALS"),
        "the reason says what was refused: {refusal}"
    );
    // Control: the same three sends outside every agent (own credentials may be named).
    let out = py(
        None,
        utf8(&dir.path().join("outside.sock")),
        &script("outside"),
    );
    assert_eq!(outcome(&out, "fd"), "ok");
    assert_eq!(outcome(&out, "bad_fd"), format!("errno {}", libc_ebadf()));
    assert_eq!(outcome(&out, "creds"), "ok");
    let got = rx.received();
    assert_eq!(field(&got[1], "data"), "outside with fd");
    assert_eq!(
        got[1]["passed"],
        serde_json::json!(["outside through the pipe"])
    );
    assert_eq!(field(&got[2], "data"), "outside with creds");
}

fn libc_ebadf() -> i32 {
    9
}

/// systemd's notify socket is on the built-in list of daemons' sockets: the test serves one at
/// its path when the host has none (and removes it).
const NOTIFY_DIR: &str = "/run/systemd";
const NOTIFY: &str = "/run/systemd/notify";

#[test]
fn deny_known_daemons_holds_for_datagrams_through_every_route() {
    if !require_root("deny_known_daemons_holds_for_datagrams_through_every_route") {
        return;
    }
    if Path::new(NOTIFY).exists() {
        eprintln!("SKIPPED: {NOTIFY} exists on this host (a real systemd): not touching it");
        return;
    }
    let made_dir = !Path::new(NOTIFY_DIR).exists();
    std::fs::create_dir_all(NOTIFY_DIR).expect("creating /run/systemd");
    struct Cleanup(bool);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(NOTIFY);
            let _ = std::fs::remove_file(format!("{NOTIFY}.log"));
            if self.0 {
                let _ = std::fs::remove_dir(NOTIFY_DIR);
            }
        }
    }
    let _cleanup = Cleanup(made_dir);
    let notify_rx = Receiver::start(Path::new(NOTIFY));
    let dir = world_writable_dir();
    let link = dir.path().join("innocent.sock");
    std::os::unix::fs::symlink(NOTIFY, &link).expect("symlink");
    let unrelated = dir.path().join("unrelated.sock");
    let unrelated_rx = Receiver::start(&unrelated);

    let agent = unique_agent("unix-dgram-known");
    let d = Daemon::start(&[policy(&agent, "deny_known_daemons = true")]);
    let routes = [
        ("direct", NOTIFY.to_string()),
        ("symlink", utf8(&link).to_string()),
        ("proc_root", format!("/proc/self/root{NOTIFY}")),
        ("double_slash", format!("/{NOTIFY}")),
    ];
    let script = |tag: &str| {
        let mut script = String::new();
        for (route, path) in &routes {
            script.push_str(&format!(
                "attempt({route:?}, lambda: send({path:?}, b'{tag} {route}'))\n"
            ));
        }
        script.push_str(&format!(
            "attempt('unrelated', lambda: send({:?}, b'{tag} unrelated'))\n\
             os.chdir({NOTIFY_DIR:?})\n\
             attempt('relative', lambda: send('notify', b'{tag} relative'))\n",
            utf8(&unrelated)
        ));
        script
    };
    let out = py(Some((&d, &agent, &[][..])), "", &script("agent"));
    for route in routes.iter().map(|r| r.0).chain(["relative"]) {
        assert_eq!(outcome(&out, route), REFUSED, "{route} as the agent");
    }
    assert_eq!(outcome(&out, "unrelated"), "ok");
    assert!(
        notify_rx.data().is_empty(),
        "the daemon's socket got {:?}",
        notify_rx.data()
    );
    assert_eq!(unrelated_rx.data(), ["agent unrelated"]);
    for (_, path) in &routes {
        assert_reported(&d, &agent, path);
    }
    assert_reported(&d, &agent, "notify");
    // Controls: every route reaches it from outside every agent.
    let out = py(None, "", &script("outside"));
    for route in routes.iter().map(|r| r.0).chain(["relative", "unrelated"]) {
        assert_eq!(outcome(&out, route), "ok", "{route} outside agents");
    }
    assert_eq!(notify_rx.data().len(), routes.len() + 1);
}

/// A datagram socket on argv[1] that never reads: its queue fills.
const DEAF: &str = r#"import os, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
print('ready', flush=True)
time.sleep(3600)
"#;

#[test]
fn a_full_receiver_gets_eagain_without_stalling_the_agent() {
    if !require_root("a_full_receiver_gets_eagain_without_stalling_the_agent") {
        return;
    }
    let dir = world_writable_dir();
    let deaf = dir.path().join("deaf.sock");
    let _deaf = python_ready(DEAF, &[utf8(&deaf)]);
    let agent = unique_agent("unix-dgram-full");
    let d = Daemon::start(&[policy(&agent, &format!("allow = [{:?}]", utf8(&deaf)))]);
    // MSG_DONTWAIT until the queue is full, then one blocking send.
    let script = format!(
        "sent = 0\n\
         try:\n    while sent < 5000:\n        d.sendto(b'x', socket.MSG_DONTWAIT, {deaf:?}); sent += 1\n    print('dontwait', 'ok', flush=True)\n\
         except OSError as e:\n    print('dontwait', 'errno', e.errno, flush=True)\n\
         print('sent', sent, flush=True)\n\
         if len(sys.argv) > 2:\n    t = time.monotonic()\n    attempt('blocking', lambda: send({deaf:?}, b'y'))\n    print('waited', int(time.monotonic() - t), flush=True)\n",
        deaf = utf8(&deaf)
    );
    let probe = format!("{PY_ATTEMPT}{PY_SEND}{script}");
    let out = d.run(&agent, None, &[PYTHON, "-c", &probe, "", "blocking"]);
    let eagain = format!("errno {}", 11);
    assert_eq!(outcome(&out, "dontwait"), eagain, "{}", text(&out.stderr));
    let sent: u32 = outcome(&out, "sent").parse().expect("a count");
    assert!(sent > 0, "nothing was sent before the queue filled");
    // A blocking send to a receiver that stays full fails after the bound (about 2 s), where
    // the kernel would wait on.
    assert_eq!(outcome(&out, "blocking"), eagain);
    let waited: u32 = outcome(&out, "waited").parse().expect("seconds");
    assert!((1..10).contains(&waited), "waited {waited} s");
    // Control: outside every agent the full queue answers EAGAIN to MSG_DONTWAIT too.
    let out = Command::new(PYTHON)
        .args(["-c", &probe, ""])
        .output()
        .expect("python3");
    assert_eq!(outcome(&out, "dontwait"), eagain);
}

#[test]
fn an_ask_mode_agent_s_named_sends_are_judged_on_the_resolved_socket_too() {
    if !require_root("an_ask_mode_agent_s_named_sends_are_judged_on_the_resolved_socket_too") {
        return;
    }
    let Scene {
        listed,
        listed_rx,
        planted,
        engine,
        engine_rx,
        // Kept: the directories go when their TempDir does.
        dir: _dir,
        outside_dir: _outside_dir,
    } = Scene::new();
    std::os::unix::fs::symlink(&engine, &planted).expect("symlink");
    let agent = unique_agent("unix-dgram-ask");
    let ask_policy = |also: &str| {
        let (name, text) = policy(
            &agent,
            &format!("allow = [{:?}, {:?}{also}]", utf8(&listed), utf8(&planted)),
        );
        (name, text.replace("\"enforce\"", "\"ask\""))
    };
    let d = Daemon::start(&[ask_policy("")]);
    // `run` opens its ask channel to the control socket after it is placed, where the agent's
    // `[unix]` list judges its connect: the list must name the control socket (else `run`
    // refuses to start an ask-mode agent whose list does not).
    let (name, policy_text) = ask_policy(&format!(", {:?}", utf8(&d.socket)));
    d.write_policy(&name, &policy_text);
    let reloaded = d.reload();
    assert!(
        reloaded.status.success(),
        "reload: {}",
        text(&reloaded.stderr)
    );
    let script = format!(
        "attempt('listed', lambda: send({:?}, b'ask listed'))\n\
         attempt('planted', lambda: send_parts({:?}, b'ask planted'))\n",
        utf8(&listed),
        utf8(&planted)
    );
    let out = py(Some((&d, &agent, &[][..])), "", &script);
    assert_eq!(outcome(&out, "listed"), "ok");
    assert_eq!(outcome(&out, "planted"), REFUSED);
    assert_eq!(listed_rx.data(), ["ask listed"]);
    assert!(
        engine_rx.data().is_empty(),
        "the engine got {:?}",
        engine_rx.data()
    );
    assert_reported(&d, &agent, utf8(&planted));
    // Control: through the planted name from outside, the engine gets it.
    let out = py(None, "", &script);
    assert_eq!(outcome(&out, "planted"), "ok");
    assert_eq!(engine_rx.data(), ["ask planted"]);
}
