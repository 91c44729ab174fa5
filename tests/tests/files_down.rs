//! `[files]` while the daemon is down, and io_uring opens, on the real kernel: the file-guard
//! process holds the marks after the daemon is SIGKILLed, so agents (a `run` agent and one known
//! by its executable selector) are still refused a denied file while the host's own `cat` of it
//! is answered at once; a new daemon adopts the guard and receives the refusals made meanwhile.
//! An agent's io_uring open of a denied file (inline and through an io_uring worker thread) is
//! refused too; the same program outside every agent reads it. Run one at a time
//! (`--test-threads=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

const CAT: &str = "/usr/bin/cat";

/// A policy denying `secret` to `agent`, whose executable selector is `selected` (a program
/// that is the agent wherever it runs), and which `run` may start cat and python3 as.
fn policy(agent: &str, secret: &Path, selected: &Path) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[exec]\nallow = [{CAT:?}, {PYTHON:?}]\n\
             [files]\ndeny = [{:?}]\n[identity]\nexecutables = [{{ path = {:?}, sha256 = {:?} }}]\n",
            secret.display().to_string(),
            selected.display().to_string(),
            sha256_hex(selected)
        ),
    )
}

/// Waits until this start of the daemon has put `[files]` in force and armed the selector.
fn wait_in_force(d: &Daemon) {
    wait_until(
        Duration::from_secs(15),
        || {
            d.log().contains("[files] in force")
                && d.status()["agents"][0]["selectors"]
                    .to_string()
                    .contains("sha256 verified")
        },
        || {
            format!(
                "[files] or the selector not in force after 15 s:\n{}",
                d.log()
            )
        },
    );
}

/// A new agent, a directory holding the file denied to it (`credentials`, "TOPSECRET") and a
/// copy of bash there (`bot`) that its executable selector can name: (agent, dir, secret, bot).
fn scene(label: &str) -> (String, tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("credentials");
    std::fs::write(&secret, "TOPSECRET\n").expect("write");
    let bot = dir.path().join("bot");
    std::fs::copy("/bin/bash", &bot).expect("copy bash");
    (unique_agent(label), dir, secret, bot)
}

/// A daemon denying `secret` to `agent`, selected by `selected`, once in force.
fn daemon_in_force(agent: &str, secret: &Path, selected: &Path) -> Daemon {
    let d = Daemon::start(&[policy(agent, secret, selected)]);
    wait_in_force(&d);
    d
}

fn assert_refused(d: &Daemon, out: &Output, what: &str) {
    assert!(
        !out.status.success() && text(&out.stderr).contains("Operation not permitted"),
        "{what}: expected EPERM; status {:?}, stdout {:?}, stderr {:?}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        logs(d)
    );
}

/// The daemon's log of this start, and that of the first start (where the guard it started
/// writes).
fn logs(d: &Daemon) -> String {
    let first = std::fs::read_to_string(d.dir.path().join("daemon.log")).unwrap_or_default();
    format!(
        "daemon log:\n{}\nfirst start's log (the guard's):\n{first}",
        d.log()
    )
}

/// `read line < FILE` in the selected shell (a builtin: the selected program itself opens).
fn selected_read(bot: &Path, file: &Path) -> Output {
    let script = format!(
        "read line < {:?} && echo \"read $line\"",
        file.display().to_string()
    );
    Command::new(bot)
        .args(["-c", &script])
        .output()
        .expect("selected shell")
}

fn denied_opens(d: &Daemon, file: &Path) -> Vec<Value> {
    let path = file.display().to_string();
    d.audit()
        .into_iter()
        .filter(|v| field(v, "action") == "open" && field(v, "file_path") == path)
        .collect()
}

/// Process ids of running `agent-monitor file-guard` processes serving `pin_dir`.
fn guards_of(pin_dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "file-guard") && args.iter().any(|a| Path::new(a) == pin_dir) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn with_the_daemon_gone_agents_are_refused_the_host_is_answered_and_a_new_daemon_adopts() {
    if !require_root(
        "with_the_daemon_gone_agents_are_refused_the_host_is_answered_and_a_new_daemon_adopts",
    ) {
        return;
    }
    let (agent, dir, secret, bot) = scene("filesdown");
    let notes = dir.path().join("notes");
    std::fs::write(&notes, "PLAIN\n").expect("write");
    let mut d = daemon_in_force(&agent, &secret, &bot);
    assert_eq!(guards_of(&d.pin_dir).len(), 1, "one guard:\n{}", d.log());

    // A `run` agent that outlives the daemon: it reads both files once told to.
    let go = dir.path().join("go");
    let script = format!(
        "import os,time\nwhile not os.path.exists({go:?}): time.sleep(0.02)\n\
         for f in ({s:?}, {n:?}):\n  try:\n    open(f).read(); print(f, 'read ok', flush=True)\n\
         \x20 except OSError as e:\n    print(f, 'errno', e.errno, flush=True)\n",
        go = go.display().to_string(),
        s = secret.display().to_string(),
        n = notes.display().to_string(),
    );
    let agent_proc = d.spawn_run(&agent, "t1", &[], &[PYTHON, "-c", &script]);
    std::thread::sleep(Duration::from_millis(300));

    d.kill9();
    // The host: answered by the guard at once, never waiting on the dead daemon.
    for _ in 0..3 {
        let t0 = Instant::now();
        let host = Command::new(CAT).arg(&secret).output().expect("cat");
        let took = t0.elapsed();
        assert!(
            host.status.success() && text(&host.stdout) == "TOPSECRET\n",
            "host cat with the daemon gone: {}",
            text(&host.stderr)
        );
        assert!(
            took < Duration::from_secs(1),
            "the host waited {took:?} with the daemon gone"
        );
    }
    // The agent known by its executable selector (tagged by the pinned programs).
    assert_refused(
        &d,
        &selected_read(&bot, &secret),
        "selected agent, daemon gone",
    );
    let plain = selected_read(&bot, &notes);
    assert_eq!(
        text(&plain.stdout),
        "read PLAIN\n",
        "a file not denied, selected agent: {}",
        text(&plain.stderr)
    );
    // The `run` agent.
    std::fs::write(&go, "").expect("go");
    let out = agent_proc.wait_with_output().expect("agent");
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("{} errno 1", secret.display())),
        "run agent read the denied file with the daemon gone: {said} {}\n{}",
        text(&out.stderr),
        logs(&d)
    );
    assert!(
        said.contains(&format!("{} read ok", notes.display())),
        "run agent, a file not denied: {said} {}",
        text(&out.stderr)
    );
    // Control: outside every agent, the same shell reads the file.
    let control = Command::new("/bin/bash")
        .args([
            "-c",
            &format!(
                "read line < {:?} && echo \"read $line\"",
                secret.display().to_string()
            ),
        ])
        .output()
        .expect("bash");
    assert_eq!(text(&control.stdout), "read TOPSECRET\n");
    assert!(
        denied_opens(&d, &secret).is_empty(),
        "no daemon ran: nothing can be in the trail yet"
    );

    // A new daemon adopts the guard and receives the refusals it kept.
    d.spawn();
    wait_in_force(&d);
    assert!(d.log().contains("adopted"), "not adopted:\n{}", d.log());
    assert_eq!(guards_of(&d.pin_dir).len(), 1, "still one guard");
    let deadline = Instant::now() + Duration::from_secs(10);
    let kept = loop {
        let kept = denied_opens(&d, &secret);
        if kept.len() >= 2 || Instant::now() > deadline {
            break kept;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        kept.len() >= 2
            && kept
                .iter()
                .all(|v| field(v, "verdict") == "denied" && field(v, "agent_id") == agent),
        "the refusals made while the daemon was down, in the new daemon's trail: {kept:#?}\n{}",
        d.log()
    );
    // And the denial goes on.
    assert_refused(
        &d,
        &d.run(&agent, Some("t1"), &[CAT, &secret.display().to_string()]),
        "run agent after the restart",
    );
    let host = Command::new(CAT).arg(&secret).output().expect("cat");
    assert!(host.status.success(), "host cat after the restart");

    // Uninstall ends the guard, and with it the denial.
    d.stop();
    let out = d.uninstall();
    assert!(
        text(&out.stdout).contains("stopped the file guard"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        guards_of(&d.pin_dir).is_empty(),
        "a guard outlived uninstall"
    );
}

/// Opens argv[1] with IORING_OP_OPENAT (argv[2] = "async": IOSQE_ASYNC, so an io_uring worker
/// thread opens it) and prints what it read, or the errno. The ring is the harness's
/// `URING_RING_C`.
const URING_CAT_MAIN: &str = r#"
#include <fcntl.h>
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    async_worker = argc > 2 && strcmp(argv[2], "async") == 0;
    setup_ring();
    struct io_uring_sqe sqe;
    memset(&sqe, 0, sizeof sqe);
    sqe.opcode = IORING_OP_OPENAT;
    sqe.fd = AT_FDCWD;
    sqe.addr = (unsigned long)argv[1];
    sqe.open_flags = O_RDONLY;
    if (async_worker) sqe.flags = IOSQE_ASYNC;
    int res = submit(&sqe);
    if (res < 0) { printf("open errno %d\n", -res); return 1; }
    char buf[256];
    ssize_t n = read(res, buf, sizeof buf - 1);
    if (n < 0) { printf("read errno %d\n", errno); return 1; }
    buf[n] = 0;
    printf("read %s", buf);
    return 0;
}
"#;

#[test]
fn an_io_uring_open_of_a_denied_file_fails_for_an_agent_and_works_outside() {
    if !require_root("an_io_uring_open_of_a_denied_file_fails_for_an_agent_and_works_outside") {
        return;
    }
    let (agent, dir, secret, _) = scene("filesuring");
    // `run` refuses io_uring to its agents (seccomp): the agent is the selected program.
    let agent_bin = compile_c(
        dir.path(),
        "uring_cat",
        &format!("{URING_RING_C}{URING_CAT_MAIN}"),
    );
    let outside = dir.path().join("uring_cat_outside");
    std::fs::copy(&agent_bin, &outside).expect("copy");
    let d = daemon_in_force(&agent, &secret, &agent_bin);
    let s = secret.display().to_string();
    for mode in ["inline", "async"] {
        let out = Command::new(&agent_bin)
            .args([s.as_str(), mode])
            .output()
            .expect("uring_cat");
        assert!(
            !out.status.success() && text(&out.stdout).contains("open errno 1"),
            "agent io_uring open ({mode}) of the denied file: {} {}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            logs(&d)
        );
        let control = Command::new(&outside)
            .args([s.as_str(), mode])
            .output()
            .expect("uring_cat outside");
        assert_eq!(
            text(&control.stdout),
            "read TOPSECRET\n",
            "the same io_uring open ({mode}) outside every agent: {}",
            text(&control.stderr)
        );
    }
    let rec = d.wait_audit("an io_uring open of the secret", |v| {
        field(v, "action") == "open" && field(v, "file_path") == s
    });
    assert_eq!(field(&rec, "agent_id"), agent);
    assert_eq!(field(&rec, "verdict"), "denied");
}

#[test]
fn a_killed_guard_is_reported_and_the_running_daemon_starts_a_new_one() {
    if !require_root("a_killed_guard_is_reported_and_the_running_daemon_starts_a_new_one") {
        return;
    }
    let (agent, _dir, secret, bot) = scene("filesguard");
    let d = daemon_in_force(&agent, &secret, &bot);
    let s = secret.display().to_string();
    assert_refused(&d, &d.run(&agent, Some("t1"), &[CAT, &s]), "before");
    let old = guards_of(&d.pin_dir);
    assert_eq!(old.len(), 1, "one guard:\n{}", logs(&d));
    // SAFETY: kill(2) of the guard this test's daemon started.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    // The documented residue: the group went with the guard (fail open) until the daemon has
    // started a new one and it has marked. The daemon says so, then puts [files] in force again.
    wait_until(
        Duration::from_secs(20),
        || {
            d.log()
                .contains(&format!("file guard (pid {}) is gone", old[0]))
                && d.log().matches("[files] in force").count() >= 2
        },
        || format!("no new guard within 20 s:\n{}", logs(&d)),
    );
    let new = guards_of(&d.pin_dir);
    assert!(
        new.len() == 1 && new != old,
        "guards {old:?} -> {new:?}:\n{}",
        logs(&d)
    );
    assert_refused(&d, &d.run(&agent, Some("t1"), &[CAT, &s]), "after");
    let host = Command::new(CAT).arg(&secret).output().expect("cat");
    assert!(host.status.success(), "host cat with the new guard");
}

#[test]
fn a_guard_of_another_build_is_replaced_once_the_new_one_has_marked() {
    if !require_root("a_guard_of_another_build_is_replaced_once_the_new_one_has_marked") {
        return;
    }
    let (agent, dir, secret, bot) = scene("filesbuild");
    let mut d = daemon_in_force(&agent, &secret, &bot);
    let old = guards_of(&d.pin_dir);
    assert_eq!(old.len(), 1, "one guard:\n{}", logs(&d));
    d.stop();
    // A copy of the binary is another build to the guard (its executable's time differs).
    let first = binary();
    let next = dir.path().join("agent-monitor-next");
    std::fs::copy(&first, &next).expect("copy the binary");
    // SAFETY: the tests of this file run one at a time (--test-threads=1) and no other thread
    // of this test reads the environment.
    unsafe { std::env::set_var("AGENT_MONITOR_BIN", &next) };
    d.spawn();
    // SAFETY: as above.
    unsafe { std::env::set_var("AGENT_MONITOR_BIN", &first) };
    wait_in_force(&d);
    wait_until(
        Duration::from_secs(10),
        || d.log().contains("of the previous build told to exit") && guards_of(&d.pin_dir) != old,
        || format!("the old guard was not replaced:\n{}", logs(&d)),
    );
    assert!(d.log().contains("is of another build"), "{}", logs(&d));
    wait_until(
        Duration::from_secs(5),
        || guards_of(&d.pin_dir).len() == 1,
        || format!("guards {:?}:\n{}", guards_of(&d.pin_dir), logs(&d)),
    );
    let s = secret.display().to_string();
    assert_refused(
        &d,
        &d.run(&agent, Some("t1"), &[CAT, &s]),
        "after the replacement",
    );
    assert_refused(
        &d,
        &selected_read(&bot, &secret),
        "selected, after the replacement",
    );
    let host = Command::new(CAT).arg(&secret).output().expect("cat");
    assert!(host.status.success(), "host cat after the replacement");
}
