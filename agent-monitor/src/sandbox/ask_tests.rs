//! The ask-mode supervisor against the real kernel, without root and without the daemon: a
//! child under the ask filter (no_new_privs) runs python3, and a fake daemon on the other end
//! of a socketpair answers the ask channel.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::ask_channel::{AskChannel, ChannelError};
use super::{ask_filter, install, receive_listener, supervise_asking};
use crate::control::{AskAnswer, AskCall, HeldAction};

const PYTHON: &str = "/usr/bin/python3";

/// What the fake daemon answers a call: allow or deny, after a delay.
type Policy = dyn Fn(&AskCall) -> Option<(bool, Duration)> + Send + Sync;

/// Runs `python3 -c script` under the ask filter, with the fake daemon answering by `policy`
/// (None: no answer yet; `batch`: answer nothing until this many calls are held, then all).
/// Returns the child's stdout and every call asked.
fn run_python(
    script: &str,
    policy: std::sync::Arc<Policy>,
    batch: usize,
    close_after: Option<usize>,
) -> (String, Vec<AskCall>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let program = ask_filter(false, theirs.as_raw_fd()).unwrap();
    let (channel, daemon) = UnixStream::pair().unwrap();
    channel.set_nonblocking(true).unwrap();
    let to_parent = theirs.as_raw_fd();
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", script]).stdout(Stdio::piped());
    // SAFETY: prctl and the three system calls of install(): async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            install(&program, to_parent)
        });
    }
    // As in run: the supervisor serves before spawn(), which waits for the held exec.
    let supervisor = std::thread::spawn(move || {
        let listener = receive_listener(&ours).map_err(|e| e.to_string())?;
        let busy = AtomicBool::new(false);
        supervise_asking(
            listener,
            AskChannel::new(channel),
            || Err(ChannelError::Closed),
            &busy,
            |c| panic!("nothing else is caught here: {c:?}"),
        )
        .map_err(|e| e.to_string())
    });
    let fake = std::thread::spawn(move || fake_daemon(daemon, &*policy, batch, close_after));
    let child = cmd.spawn().unwrap();
    drop(theirs);
    // A test that fails by holding a call forever must not hang the suite.
    let pid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > until {
                    // SAFETY: kill(2) of our own child, not yet reaped (done is unset).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        !watchdog.join().unwrap(),
        "the agent was still held after 60 s"
    );
    let result = supervisor.join().unwrap();
    assert_eq!(
        result,
        Ok(()),
        "the supervisor stops when the agent is gone"
    );
    let asked = fake.join().unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), asked)
}

/// Reads calls, answers each per `policy` on a timer of its own (answers go out of order), until
/// the channel closes (the supervisor ended) or `close_after` calls came (then it hangs up).
fn fake_daemon(
    daemon: UnixStream,
    policy: &Policy,
    batch: usize,
    close_after: Option<usize>,
) -> Vec<AskCall> {
    let writer = std::sync::Arc::new(std::sync::Mutex::new(daemon.try_clone().unwrap()));
    let mut asked = Vec::new();
    let mut queued = Vec::new();
    for line in BufReader::new(&daemon).lines() {
        let Ok(line) = line else { break };
        let call: AskCall = serde_json::from_str(&line).unwrap();
        asked.push(call.clone());
        if close_after == Some(asked.len()) {
            daemon.shutdown(std::net::Shutdown::Both).unwrap();
            break;
        }
        let answer = move |writer: &std::sync::Mutex<UnixStream>, call, allow| {
            let mut line = serde_json::to_string(&AskAnswer {
                call,
                allow,
                outcome: None,
                grant_ms: None,
            })
            .unwrap();
            line.push('\n');
            let _ = writer.lock().unwrap().write_all(line.as_bytes());
        };
        match policy(&call) {
            // The agent's own start is answered at once, whatever the batch.
            Some((allow, _)) if is_python(&call) => answer(&writer, call.call, allow),
            Some((allow, delay)) => queued.push((call.call, allow, delay)),
            None => {}
        }
        if queued.len() >= batch {
            for (call, allow, delay) in queued.drain(..) {
                if delay.is_zero() {
                    answer(&writer, call, allow);
                    continue;
                }
                let writer = writer.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    answer(&writer, call, allow);
                });
            }
        }
    }
    asked
}

fn is_python(call: &AskCall) -> bool {
    matches!(&call.action, HeldAction::Exec { path, .. } if path == PYTHON)
}

fn port_of(call: &AskCall) -> Option<(String, u16)> {
    match &call.action {
        HeldAction::Connect {
            transport, port, ..
        } => Some((transport.clone(), *port)),
        _ => None,
    }
}

#[test]
fn held_connects_and_execs_wait_for_the_answer() {
    if !std::path::Path::new(PYTHON).exists() {
        eprintln!("SKIPPED: {PYTHON} is not installed");
        return;
    }
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (a, d, u) = (
        allowed.local_addr().unwrap().port(),
        denied.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let script = format!(
        r#"
import socket, subprocess, time
def tcp(port):
    s = socket.socket()
    t = time.monotonic()
    try:
        s.connect(("127.0.0.1", port)); r = "ok"
    except OSError as e:
        r = "errno%d" % e.errno
    return "%s %.3f" % (r, time.monotonic() - t)
print("tcp-allowed", tcp({a}))
print("tcp-denied", tcp({d}))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("udp", u.sendto(b"hi", ("127.0.0.1", {u})))
u.connect(("127.0.0.1", {u}))
print("udp-connected-send", u.send(b"again"))
unix = socket.socket(socket.AF_UNIX)
try:
    unix.connect("/nonexistent/socket")
except OSError as e:
    print("unix", e.errno)
print("true", subprocess.call(["/bin/true"]))
try:
    subprocess.call(["/bin/false"])
except PermissionError as e:
    print("false", e.errno)
"#
    );
    let policy: std::sync::Arc<Policy> = std::sync::Arc::new(move |call: &AskCall| {
        if is_python(call) {
            return Some((true, Duration::ZERO));
        }
        match (&call.action, port_of(call)) {
            (_, Some((t, p))) if t == "tcp" && p == a => Some((true, Duration::from_millis(300))),
            (_, Some((t, p))) if t == "tcp" && p == d => Some((false, Duration::ZERO)),
            (_, Some((t, p))) if t == "udp" && p == u => Some((true, Duration::ZERO)),
            (HeldAction::Exec { path, .. }, _) => Some((path == "/bin/true", Duration::ZERO)),
            _ => Some((false, Duration::ZERO)),
        }
    });
    let (out, asked) = run_python(&script, policy, 1, None);
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} line in {out:?}; asked {asked:#?}"))
            .to_string()
    };
    // Held until the (late) allow, then connected.
    let allowed_line = line("tcp-allowed");
    let (verdict, secs) = allowed_line.split_once(' ').unwrap();
    assert_eq!(verdict, "ok", "{out}");
    assert!(
        secs.parse::<f64>().unwrap() >= 0.29,
        "held while undecided: {out}"
    );
    assert!(
        line("tcp-denied").starts_with("errno1 "),
        "deny is EPERM: {out}"
    );
    assert_eq!(line("udp"), "2");
    assert_eq!(line("udp-connected-send"), "5");
    // ENOENT from the kernel: a unix connect goes through unasked.
    assert_eq!(line("unix"), "2");
    assert_eq!(line("true"), "0");
    assert_eq!(line("false"), "13", "a denied exec is EACCES");
    // What was asked: the exec of python itself first, with its argv and file.
    let python = std::fs::metadata(PYTHON).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    match &asked[0].action {
        HeldAction::Exec {
            path,
            argv,
            device,
            inode,
            ..
        } => {
            assert_eq!(path, PYTHON);
            assert_eq!(argv[..2], [PYTHON.to_string(), "-c".to_string()]);
            assert_eq!((*device, *inode), (Some(python.dev()), Some(python.ino())));
        }
        other => panic!("{other:?}"),
    }
    let net: Vec<_> = asked.iter().filter_map(port_of).collect();
    assert_eq!(
        net,
        vec![
            ("tcp".into(), a),
            ("tcp".into(), d),
            ("udp".into(), u),
            ("udp".into(), u)
        ],
        "sendto and connect of the UDP socket asked; its connected send and the unix connect not"
    );
    let mut numbers: Vec<u64> = asked.iter().map(|c| c.call).collect();
    numbers.dedup();
    assert_eq!(numbers.len(), asked.len(), "call numbers are unique");
}

#[test]
fn a_thousand_calls_are_held_at_once() {
    if !std::path::Path::new(PYTHON).exists() {
        eprintln!("SKIPPED: {PYTHON} is not installed");
        return;
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    // 1,000 threads connect a UDP socket each; nothing is answered until all 1,000 are held.
    let script = format!(
        r#"
import socket, threading
threading.stack_size(64 * 1024)
ok = []
def one():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", {port}))
    ok.append(1)
ts = [threading.Thread(target=one) for _ in range(1000)]
for t in ts: t.start()
for t in ts: t.join()
print("connected", len(ok))
"#
    );
    let policy: std::sync::Arc<Policy> = std::sync::Arc::new(|call: &AskCall| {
        if is_python(call) {
            return Some((true, Duration::ZERO));
        }
        Some((port_of(call).is_some(), Duration::ZERO))
    });
    // The fake daemon answers none of the connects before it has all 1,000: python finishes
    // only if all of them were held at the same time by the one supervisor thread.
    let (out, asked) = run_python(&script, policy, 1000, None);
    assert_eq!(out.trim(), "connected 1000");
    let connects = asked.iter().filter(|c| port_of(c).is_some()).count();
    assert_eq!(connects, 1000);
}

#[test]
fn a_broken_channel_refuses_held_and_later_calls() {
    if !std::path::Path::new(PYTHON).exists() {
        eprintln!("SKIPPED: {PYTHON} is not installed");
        return;
    }
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let script = format!(
        r#"
import socket
for i in range(2):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", {port})); print("ok")
    except OSError as e:
        print("errno%d" % e.errno)
"#
    );
    // The daemon never answers the connect; it hangs up when the first one is held (a daemon
    // that died): the held connect is refused, and so is the next (no channel to ask on).
    let policy: std::sync::Arc<Policy> =
        std::sync::Arc::new(|call: &AskCall| is_python(call).then_some((true, Duration::ZERO)));
    let (out, asked) = run_python(&script, policy, 1, Some(2));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["errno1", "errno1"],
        "{asked:?}"
    );
    // Control: the same connect with an answering daemon connects.
    let policy: std::sync::Arc<Policy> =
        std::sync::Arc::new(|_: &AskCall| Some((true, Duration::ZERO)));
    let (out, _) = run_python(&script, policy, 1, None);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["ok", "ok"]);
}

/// Not a check: what a held-and-allowed call costs on `run`'s side (the fake daemon answers at
/// once, so the real daemon's own decision time is not in it). Prints medians; run with
/// `cargo test --release -p agent-monitor ask_round_trip_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn ask_round_trip_cost() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let script = format!(
        r#"
import os, socket, statistics, time
def med(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
    return statistics.median(ts)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("connect_ns", med(lambda: s.connect(("127.0.0.1", {port})), 3000))
def spawn():
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {{}})
    os.waitpid(pid, 0)
print("exec_ns", med(spawn, 300))
"#
    );
    let value = |out: &str, key: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} in {out:?}"))
            .parse()
            .unwrap()
    };
    let plain = Command::new(PYTHON).args(["-c", &script]).output().unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    let policy: std::sync::Arc<Policy> =
        std::sync::Arc::new(|_: &AskCall| Some((true, Duration::ZERO)));
    let (held, asked) = run_python(&script, policy, 1, None);
    for key in ["connect_ns", "exec_ns"] {
        let (a, b) = (value(&plain, key), value(&held, key));
        println!(
            "{key}: no filter {:.1} µs, ask mode (allowed at once) {:.1} µs, added {:.1} µs",
            a / 1000.0,
            b / 1000.0,
            (b - a) / 1000.0
        );
    }
    println!("{} calls asked", asked.len());
}
