//! `agent-monitor top`, the real binary driven inside tmux (send-keys, capture-pane).
//!
//! - Against a fake control server (a unix socket speaking the JSON-lines protocol, written
//!   here): needs no root, only tmux. It checks what the console shows (agents, tasks, process
//!   trees, a burst of 10,000 actions in a second, a held request), that a key sends the right
//!   `decide` request, and that `q` and SIGTERM give the terminal back.
//! - Against the real daemon (root): an ask-mode agent's held DNS query appears in top, `o`
//!   approves it, and the agent's query completes.
//!
//! Run one at a time (`--test-threads=1`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::{Value, json};

/// True when tmux can be used; without it a loud skip, or a failure under CI (`cargo xtask setup`
/// installs it).
fn require_tmux(test: &str) -> bool {
    if Command::new("tmux").arg("-V").output().is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: tmux is missing and CI is set: refusing to skip");
    }
    eprintln!("\n!!! SKIPPED {test}: needs tmux (set CI=1 to make this a failure) !!!\n");
    false
}

/// A tmux server of this test alone (its own socket), one session running a plain `sh` in a
/// window of fixed size. Killed, with everything in it, when dropped.
struct Tmux {
    server: String,
}

const COLS: u16 = 180;
const ROWS: u16 = 50;

impl Tmux {
    fn start(label: &str) -> Tmux {
        let t = Tmux {
            server: format!("am-{label}-{}", std::process::id()),
        };
        // dash, not bash: no readline that would hide the terminal mode top leaves behind.
        let out = t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &COLS.to_string(),
            "-y",
            &ROWS.to_string(),
            "env PS1='shell$ ' /bin/sh",
        ]);
        assert!(out.status.success(), "tmux: {}", text(&out.stderr));
        t.wait_for("the shell's prompt", |s| s.contains("shell$"));
        t
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .expect("running tmux")
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        assert!(
            self.tmux(&["send-keys", "-t", "top", "-l", text])
                .status
                .success()
        );
    }

    /// Sends keys by name (`Enter`, `Up`).
    fn key(&self, key: &str) {
        assert!(self.tmux(&["send-keys", "-t", "top", key]).status.success());
    }

    fn run_line(&self, line: &str) {
        self.type_text(line);
        self.key("Enter");
    }

    fn screen(&self) -> String {
        text(&self.tmux(&["capture-pane", "-p", "-t", "top"]).stdout)
    }

    fn format(&self, format: &str) -> String {
        text(
            &self
                .tmux(&["display-message", "-p", "-t", "top", format])
                .stdout,
        )
        .trim()
        .to_string()
    }

    /// Waits (up to 15 s) for the screen to satisfy `pred`; returns that screen.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("{what}: not on screen within 15 s; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the program the pane's shell runs now (its only child), once there is one.
    fn foreground_pid(&self) -> u32 {
        let shell = self.format("#{pane_pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().expect("a pid");
            }
            assert!(Instant::now() < deadline, "the shell started nothing");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The terminal as the shell has it after top: main screen, cursor shown, not in raw mode
    /// (checked with stty: a raw terminal would not even echo this line).
    fn assert_given_back(&self, after: &str) {
        let s = self.wait_for("the shell's prompt after top", |s| {
            s.lines()
                .last_nonempty()
                .is_some_and(|l| l.trim() == "shell$")
        });
        assert_eq!(
            self.format("#{alternate_on}"),
            "0",
            "{after}: still on the alternate screen"
        );
        assert_eq!(self.format("#{cursor_flag}"), "1", "{after}: cursor hidden");
        assert!(
            !s.contains("pending requests") && !s.contains("o approve once"),
            "{after}: the console's screen is left over:\n{s}"
        );
        self.run_line("stty -a | grep -q -- ' -icanon' && echo TTY=RAW || echo TTY=COOKED");
        let s = self.wait_for("stty's answer", |s| {
            s.lines().any(|l| l.starts_with("TTY="))
        });
        assert!(
            s.lines().any(|l| l.trim() == "TTY=COOKED"),
            "{after}: the terminal is left in raw mode:\n{s}"
        );
        self.run_line("clear");
        self.wait_for("a clear screen", |s| s.trim() == "shell$");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

trait LastNonEmpty<'a> {
    fn last_nonempty(self) -> Option<&'a str>;
}

impl<'a, I: DoubleEndedIterator<Item = &'a str>> LastNonEmpty<'a> for I {
    fn last_nonempty(mut self) -> Option<&'a str> {
        self.rfind(|l| !l.trim().is_empty())
    }
}

fn top_command(socket: &Path) -> String {
    format!(
        "{} top --control-socket {}",
        binary().display(),
        socket.display()
    )
}

// ---------------------------------------------------------------------------------------------
// The fake control server.

/// What the fake daemon says and what it was asked.
struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    /// Every `decide` request, as received.
    decides: mpsc::Receiver<Value>,
}

const FAKE_AGENT: &str = "fake-coder";
const BURST: usize = 10_000;
const HELD_ID: u64 = 42;

/// A held DNS query of the fake agent, as the daemon would send it.
fn held_request() -> Value {
    json!({
        "id": HELD_ID, "agent": FAKE_AGENT, "task": "t1", "uid": 1000, "pid": 4242,
        "chain": [{"pid": 4242, "exe": "/usr/bin/python3", "args": ["tool.py"]}],
        "action": {"kind": "dns", "name": "pypi.org", "qtype": "A"},
        "held_ms": 1500, "expires_in_ms": 58500
    })
}

/// The status of the fake daemon: one ask-mode agent, one task whose processes are this test
/// and `child` (so the console's process tree, read from /proc, has a parent and a child).
fn fake_status(child: u32) -> Value {
    json!({
        "result": "status", "started_unix": 1, "policies": "/fake/policies", "mechanisms": {},
        "agents": [{
            "agent": FAKE_AGENT, "mode": "ask",
            "tasks": [{
                "task": "t1", "cgroup": "/agent-monitor/fake-coder/t1",
                "processes": [std::process::id(), child],
                "grants": ["connect 192.0.2.7:443"], "grants_expire_in_ms": 600_000
            }],
            "actions": 123_456, "allowed": 123_000, "denied": 400, "alerts": 56
        }],
        "counters": {
            "actions": 123_456, "denied": 400, "alerts": 56, "lost_records": 7,
            "undecodable_records": 0, "exec_paths_too_long": 0, "exec_paths_unreadable": 0,
            "exec_paths_not_normal": 0, "tracked_processes": 2, "verdict_disagreements": 0,
            "actions_lost": 3
        },
        "sinks": []
    })
}

fn action_line(n: usize) -> String {
    let verdict = ["allowed", "denied", "alert"][n % 3];
    json!({
        "agent_id": FAKE_AGENT, "task_id": "t1", "action": "connect", "verdict": verdict,
        "time": "2026-12-06T05:10:00.25Z",
        "message": format!("agent {FAKE_AGENT} task t1: connect tcp 10.0.0.1:443 by pid 4242 (curl): burst-{n}")
    })
    .to_string()
}

impl FakeDaemon {
    /// Serves until the test ends: `status` (the process tree's child is `child`), `events`
    /// (follow: 10,000 actions within one second, then quiet), `pending` (follow: the empty list,
    /// then one held request, then the outcome once decided) and `decide`.
    fn start(child: u32) -> FakeDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("control.sock");
        let listener = UnixListener::bind(&socket).expect("binding the fake control socket");
        let (decide_tx, decides) = mpsc::channel();
        // The pending follower learns of the decision from the decide handler.
        let (decided_tx, decided_rx) = mpsc::channel::<Value>();
        let decided_rx = std::sync::Arc::new(std::sync::Mutex::new(decided_rx));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let decide_tx = decide_tx.clone();
                let decided_tx = decided_tx.clone();
                let decided_rx = std::sync::Arc::clone(&decided_rx);
                std::thread::spawn(move || {
                    let _ = serve(stream, child, &decide_tx, &decided_tx, &decided_rx);
                });
            }
        });
        FakeDaemon {
            _dir: dir,
            socket,
            decides,
        }
    }
}

fn serve(
    stream: UnixStream,
    child: u32,
    decide_tx: &mpsc::Sender<Value>,
    decided_tx: &mpsc::Sender<Value>,
    decided_rx: &std::sync::Mutex<mpsc::Receiver<Value>>,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let request: Value = serde_json::from_str(&line).expect("the console sends JSON");
    let mut out = std::io::BufWriter::new(&stream);
    let mut send = |v: &str| -> std::io::Result<()> {
        out.write_all(v.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    };
    match request["op"].as_str().unwrap_or("") {
        "status" => send(&fake_status(child).to_string()),
        "events" => {
            assert_eq!(request["follow"], true, "{request}");
            send(r#"{"result":"events","history":[]}"#)?;
            // 10,000 actions in one second, in ten slices, and one `lagged` note.
            let start = Instant::now();
            for slice in 0..10 {
                for n in slice * BURST / 10..(slice + 1) * BURST / 10 {
                    send(&action_line(n))?;
                }
                let due = start + Duration::from_millis(100 * (slice as u64 + 1));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            send(r#"{"lagged":5}"#)?;
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        }
        "pending" => {
            assert_eq!(request["follow"], true, "{request}");
            send(r#"{"result":"pending","requests":[]}"#)?;
            std::thread::sleep(Duration::from_millis(300));
            send(&json!({ "held": held_request() }).to_string())?;
            let decided = decided_rx.lock().unwrap().recv().expect("a decision");
            send(&json!({ "decided": decided }).to_string())?;
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        }
        "decide" => {
            decide_tx.send(request.clone()).unwrap();
            let outcome = json!({
                "id": request["id"], "verdict": "approved", "scope": "once",
                "approver": "uid 0 (root)"
            });
            let mut answer = outcome.clone();
            answer["result"] = json!("decided");
            send(&answer.to_string())?;
            let _ = decided_tx.send(outcome);
            Ok(())
        }
        other => send(
            &json!({"result": "error", "message": format!("fake daemon: no {other}")}).to_string(),
        ),
    }
}

/// A control socket that refuses everything as the real daemon refuses a caller who is neither
/// root nor in its --admin-group.
fn refusing_server(dir: &Path) -> PathBuf {
    let socket = dir.join("refusing.sock");
    let listener = UnixListener::bind(&socket).expect("binding");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = (&stream).write_all(
                b"{\"result\":\"error\",\"message\":\"the control socket is for root and members of the daemon's --admin-group\"}\n",
            );
        }
    });
    socket
}

#[test]
fn top_shows_agents_feed_and_held_request_and_a_key_approves_it_fake_daemon() {
    let test = "top_shows_agents_feed_and_held_request_and_a_key_approves_it_fake_daemon";
    if !require_tmux(test) {
        return;
    }
    let mut child = Command::new("sleep").arg("120").spawn().expect("sleep");
    let fake = FakeDaemon::start(child.id());
    let tmux = Tmux::start("fake");
    tmux.run_line(&top_command(&fake.socket));

    // Agents, tasks with grants and time left, the process tree, counters with losses.
    let screen = tmux.wait_for("the agent and its task", |s| {
        s.contains(&format!("{FAKE_AGENT} ask")) && s.contains(&format!("└ {} sleep", child.id()))
    });
    for want in [
        format!("{FAKE_AGENT}/t1"),
        "+ connect 192.0.2.7:443".into(),
        "left".into(),
        format!("{} ", std::process::id()),
        "actions 123456".into(),
        "lost records 7 · actions lost 3".into(),
    ] {
        assert!(screen.contains(&want), "{want:?} not on screen:\n{screen}");
    }
    // The held request, with what it asks and its time left. It arrives while the burst below
    // (10,000 actions in a second) is streaming: the key that approves it is handled at once.
    let screen = tmux.wait_for("the held request", |s| {
        s.contains(&format!(
            "#{HELD_ID} {FAKE_AGENT}/t1 pid 4242 dns pypi.org A"
        ))
    });
    assert!(screen.contains("pending requests (1)"), "{screen}");
    assert!(
        screen.contains("python3[4242] tool.py"),
        "who asks:\n{screen}"
    );
    assert!(
        fake.decides.try_recv().is_err(),
        "nothing decided before a key"
    );

    // `o`: approve once.
    tmux.type_text("o");
    let pressed = Instant::now();
    let decide = fake
        .decides
        .recv_timeout(Duration::from_secs(10))
        .expect("the console sent a decide request");
    assert!(
        pressed.elapsed() < Duration::from_secs(2),
        "the key took {:?} to become a request",
        pressed.elapsed()
    );
    assert_eq!(
        decide,
        json!({"op": "decide", "id": HELD_ID, "decision": {"decision": "allow", "scope": "once", "ttl_ms": null}}),
    );
    let screen = tmux.wait_for("the outcome", |s| {
        s.contains(&format!(
            "request #{HELD_ID} approved (once) by uid 0 (root)"
        ))
    });
    assert!(screen.contains("pending requests (0)"), "{screen}");

    // The burst: the newest action shows, all were received, most were not shown (and counted,
    // with the 5 the daemon could not send).
    let screen = tmux.wait_for("the end of the burst", |s| {
        s.contains(&format!("burst-{}", BURST - 1))
            && s.contains(&format!("{BURST} received"))
            && s.contains("5 lagged at the daemon")
    });
    let not_shown: u64 = screen
        .split(" not shown")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'not shown' count:\n{screen}"));
    assert!(
        not_shown > 5 && not_shown < BURST as u64,
        "not shown: {not_shown}\n{screen}"
    );
    assert!(
        screen.contains("DENIED") && screen.contains("ALERT"),
        "{screen}"
    );

    // `q` quits and gives the terminal back.
    tmux.type_text("q");
    tmux.assert_given_back("q");

    // SIGTERM gives it back too.
    tmux.run_line(&top_command(&fake.socket));
    tmux.wait_for("top again", |s| s.contains("pending requests"));
    let top = tmux.foreground_pid();
    // SAFETY: kill has no memory preconditions; `top` is the console this test started.
    assert_eq!(unsafe { libc::kill(top as i32, libc::SIGTERM) }, 0);
    tmux.assert_given_back("SIGTERM");

    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn top_says_plainly_when_the_daemon_is_missing_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            dir.path().join("none.sock"),
            "the agent-monitor daemon is not running (no control socket at",
        ),
        (
            refusing_server(dir.path()),
            "the control socket is for root and members of the daemon's --admin-group",
        ),
    ];
    for (socket, message) in cases {
        let out = cli(&["top", "--control-socket", socket.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{message}");
        let err = text(&out.stderr);
        assert!(err.contains(message), "{err}");
        // It did not take the terminal: nothing but the message.
        assert!(!err.contains('\x1b'), "{err:?}");
        assert!(out.stdout.is_empty(), "{:?}", text(&out.stdout));
    }
}

// ---------------------------------------------------------------------------------------------
// The real daemon.

/// The issue's end-to-end case: an ask-mode agent resolves a name off its list; the DNS proxy
/// holds the query; top shows the held request; `o` approves it once; the agent's query completes
/// with the upstream's answer. Needs ask mode in the daemon (the DNS hold and `pending`/`decide`).
#[test]
fn an_ask_mode_agents_held_query_is_approved_from_top() {
    let test = "an_ask_mode_agents_held_query_is_approved_from_top";
    if !require_root(test) || !require_tmux(test) {
        return;
    }
    let agent = unique_agent("top");
    let up = Dnsmasq::start(&[
        "--address=/ok.test/127.0.0.3",
        "--address=/asked.test/127.0.0.9",
    ]);
    let policy = format!(
        "agent = {agent:?}\nmode = \"ask\"\n[network]\nallow = [\"ok.test:80\"]\n[exec]\nallow = [\"/usr/bin/python3*\"]\n[dns]\nprivate_answers = [\"*.test\"]\n"
    );
    let upstream = up.addr.to_string();
    let d = Daemon::start_with(
        &[(format!("{agent}.toml"), policy)],
        &["--dns-upstream", &upstream],
    );
    let tmux = Tmux::start("real");
    tmux.run_line(&top_command(&d.socket));
    tmux.wait_for("the agent in ask mode", |s| {
        s.contains(&format!("{agent} ask"))
    });

    // The agent asks the DNS proxy for a name off its list; the query is held (30 s of patience:
    // the decision is a person's).
    let client = PY_DNS_CLIENT.replace("s.settimeout(5)", "s.settimeout(30)");
    let mut agent_run = d.spawn_run(
        &agent,
        "t1",
        &[],
        &[
            PYTHON,
            "-c",
            &client,
            "q",
            "192.0.2.1",
            "asked.test",
            "1",
            "udp",
        ],
    );
    let screen = tmux.wait_for("the held query", |s| s.contains("dns asked.test"));
    assert!(
        screen.contains(&format!("{agent}/t1")),
        "the request names agent and task:\n{screen}"
    );
    // Control: held, not answered, while no one has decided.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        agent_run.try_wait().unwrap().is_none(),
        "the query completed without a decision:\n{}",
        d.log()
    );

    tmux.type_text("o");
    tmux.wait_for("the approval", |s| s.contains("approved (once)"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent_run.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = agent_run.kill();
            panic!("the approved query did not complete:\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = agent_run.wait_with_output().unwrap();
    let answer: Value = serde_json::from_str(text(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(answer["rcode"], 0, "{answer}");
    assert_eq!(answer["addrs"], json!(["127.0.0.9"]), "{answer}");
    d.wait_audit("the approval in the trail", |v| {
        v["agent_id"] == agent.as_str() && v["verdict"] == "approved"
    });

    tmux.type_text("q");
    tmux.assert_given_back("q");
}
