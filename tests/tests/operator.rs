//! What the operator reads and does, end to end: journald entries that only the daemon could have
//! written, warnings about exec rules in world-writable places, the JSON trail on a full disk,
//! grant TTLs, `daemon --uninstall` and its cgroups, and CLI output into a closed pipe.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

fn policy(agent: &str, net: &[&str], exec: &[&str]) -> (String, String) {
    mode_policy(agent, "enforce", net, exec)
}

/// Python that writes one journald entry over the native protocol with agent-monitor's field
/// names: a denial of `agent` to `addr` that never happened.
fn forge_script(agent: &str, addr: &str) -> String {
    format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         s.sendto(b'SYSLOG_IDENTIFIER=agent-monitor\\nMESSAGE_ID=5d59276407424888bc69e2683d35856b\\n\
         PRIORITY=4\\nAGENT_ID={agent}\\nTASK_ID=default\\nACTION=connect\\nVERDICT=denied\\n\
         DEST_ADDR={addr}\\nDEST_PORT=443\\nMESSAGE=agent {agent}: connect {addr}:443 DENIED\\n', \
         '/run/systemd/journal/socket')\n\
         print('forged', flush=True)\n"
    )
}

/// Entries of `agent` as the old, untrusted query found them (SYSLOG_IDENTIFIER and AGENT_ID
/// only): what a forger counts on.
fn untrusted_journal(agent: &str) -> Vec<Value> {
    let out = Command::new("journalctl")
        .args(["-o", "json", "--no-pager", "-t", "agent-monitor"])
        .arg(format!("AGENT_ID={agent}"))
        .output()
        .expect("running journalctl");
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Forged entries (by a root agent, an agent running as nobody, and a root process outside any
/// agent with `logger --journald`) reach journald, but the documented query — and the exact one
/// `status` prints — show only the daemon's own entries: the real denial, no forgery.
#[test]
fn forged_journald_entries_are_not_in_the_documented_query() {
    if !require_root("forged_journald_entries_are_not_in_the_documented_query") {
        return;
    }
    let agent = unique_agent("forgery");
    let port = listener_v4();
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    // A root agent forges, then makes a real denied connect.
    let script = forge_script(&agent, "203.0.113.7") + &py_connect("127.0.0.1", port);
    let out = d.run(&agent, None, &[PYTHON, "-c", &script]);
    assert!(text(&out.stdout).contains("forged"), "{out:?}");
    assert!(
        text(&out.stdout).contains("errno 1"),
        "real connect not denied: {out:?}"
    );
    // An agent running as nobody forges.
    let out = Command::new(binary())
        .arg("run")
        .arg("--control-socket")
        .arg(&d.socket)
        .args(["--agent", &agent, "--user", "nobody", "--", PYTHON, "-c"])
        .arg(forge_script(&agent, "203.0.113.8"))
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("forged"), "{out:?}");
    // A root process outside any agent forges with logger.
    let mut logger = Command::new("logger")
        .arg("--journald")
        .stdin(Stdio::piped())
        .spawn()
        .expect("logger --journald");
    std::io::Write::write_all(
        logger.stdin.as_mut().unwrap(),
        format!(
            "SYSLOG_IDENTIFIER=agent-monitor\nPRIORITY=4\nAGENT_ID={agent}\nTASK_ID=default\n\
             ACTION=connect\nVERDICT=denied\nDEST_ADDR=203.0.113.9\nDEST_PORT=443\nMESSAGE=forged\n"
        )
        .as_bytes(),
    )
    .unwrap();
    drop(logger.stdin.take());
    assert!(logger.wait().unwrap().success());

    // The real denial is in the documented (trusted) query.
    let real = wait_journal(&agent, "real denial", |v| {
        field(v, "VERDICT") == "denied" && field(v, "DEST_ADDR") == "127.0.0.1"
    });
    assert_eq!(field(&real, "_UID"), "0");
    // Control: the forgeries did reach journald, and the untrusted query shows them as denials.
    let forged = ["203.0.113.7", "203.0.113.8", "203.0.113.9"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = untrusted_journal(&agent);
        if forged
            .iter()
            .all(|a| seen.iter().any(|v| field(v, "DEST_ADDR") == *a))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forged entries never reached journald: {seen:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let trusted = journal(&agent);
    for v in &trusted {
        assert!(
            !forged.contains(&field(v, "DEST_ADDR")),
            "a forged entry passed the documented query: {v:#}"
        );
    }
    // The query `status` prints for this daemon answers the same.
    let status = d.status();
    let query = status["journal_query"].as_str().unwrap_or_default();
    let exe = std::fs::canonicalize(binary()).unwrap();
    assert!(
        query.starts_with(&format!("journalctl _UID=0 _EXE={}", exe.display())),
        "{status:#}"
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{query} AGENT_ID={agent} -o json --no-pager"))
        .output()
        .unwrap();
    let entries: Vec<Value> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        entries.iter().any(|v| field(v, "DEST_ADDR") == "127.0.0.1"),
        "{query}: {entries:#?}"
    );
    assert!(
        entries
            .iter()
            .all(|v| !forged.contains(&field(v, "DEST_ADDR"))),
        "{query}: {entries:#?}"
    );
    let human = d.cli(&["status"]);
    assert!(
        text(&human.stdout).contains(&format!("journald: {query}")),
        "{}",
        text(&human.stdout)
    );
}

/// Exec rules under /tmp, /var/tmp and /dev/shm (sticky, world-writable), for a file that does not
/// exist yet, and a glob over a directory holding a symlink into /tmp are warned about by
/// `policy check` and by the daemon; the route the warning names is real (an agent runs its own
/// program under such a rule), while a name no rule allows is still killed.
#[test]
fn exec_rules_in_world_writable_places_are_warned_about() {
    if !require_root("exec_rules_in_world_writable_places_are_warned_about") {
        return;
    }
    let agent = unique_agent("tmpexec");
    let own = format!("/tmp/{agent}-own");
    let other = format!("/tmp/{agent}-other");
    let tools = tempfile::Builder::new()
        .prefix("am-tools")
        .tempdir_in("/opt")
        .or_else(|_| tempfile::tempdir_in("/var/lib"))
        .unwrap();
    std::fs::set_permissions(
        tools.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let link_target = format!("/tmp/{agent}-linked");
    std::os::unix::fs::symlink(&link_target, tools.path().join("run")).unwrap();
    let glob = format!("{}/*", tools.path().display());
    let shm_glob = "/dev/shm/*".to_string();
    let (name, text_) = policy(
        &agent,
        &[],
        &[PYTHON, SH, &own, &glob, "/var/tmp/*", &shm_glob],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(&name), &text_).unwrap();
    let check = cli(&["policy", "check", &dir.path().display().to_string()]);
    assert!(check.status.success(), "{check:?}");
    let warnings = text(&check.stdout) + &text(&check.stderr);
    let expected = [
        format!("{own} does not exist, and /tmp is a sticky directory anyone can write"),
        format!(
            "{}/run is a symlink to {link_target}, and {link_target} does not exist, and /tmp is a sticky directory",
            tools.path().display()
        ),
        "/var/tmp is a sticky directory anyone can write (like /tmp): anyone can create a new file there".to_string(),
        "/dev/shm is a sticky directory anyone can write (like /tmp): anyone can create a new file there".to_string(),
    ];
    for e in &expected {
        assert!(
            warnings.contains(e),
            "policy check lacks {e:?}:\n{warnings}"
        );
    }
    let d = Daemon::start(&[(name, text_)]);
    let log = d.log();
    for e in &expected {
        assert!(log.contains(e), "daemon log lacks {e:?}:\n{log}");
    }
    // The route the warning is about: the agent writes its own program under the rule's name
    // and runs it; the same program under a name no rule allows is killed.
    let script = format!(
        "import os, subprocess\n\
         for p in ['{own}', '{other}']:\n\
         \x20   open(p, 'w').write('#!/bin/sh\\necho own program ran\\n')\n\
         \x20   os.chmod(p, 0o755)\n\
         \x20   r = subprocess.run([p], capture_output=True, text=True)\n\
         \x20   print(p, r.returncode, r.stdout.strip(), flush=True)\n"
    );
    let out = d.run(&agent, None, &[PYTHON, "-c", &script]);
    let stdout = text(&out.stdout);
    let _ = std::fs::remove_file(&own);
    let _ = std::fs::remove_file(&other);
    assert!(
        stdout.contains(&format!("{own} 0 own program ran")),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains(&format!("{other} -9")), "{stdout}");
}

/// A JSON trail on a full file system: writes that do not fit are cut back to the last whole line
/// and counted as sink failures; the trail never holds a torn line, and once there is room again
/// the next record is a whole line. Readers report a cut-short last line instead of tripping.
#[test]
fn full_disk_never_leaves_a_torn_line_in_the_trail() {
    if !require_root("full_disk_never_leaves_a_torn_line_in_the_trail") {
        return;
    }
    let agent = unique_agent("fulldisk");
    let port = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let small = d.dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mount.success(), "mounting a small tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&small);
    d.stop();
    d.json_log = small.join("audit.jsonl");
    d.spawn();
    let connects = |n: usize| {
        let script = format!(
            "import socket\nfor i in range({n}):\n  s = socket.socket()\n  try:\n    s.connect(('127.0.0.1', {port}))\n  except OSError as e:\n    pass\n"
        );
        d.run(&agent, None, &[PYTHON, "-c", &script])
    };
    connects(1);
    d.wait_audit("first denial", |v| field(v, "agent_id") == agent);
    // Fill the rest of the file system; the trail's last page keeps some room, so the next
    // writes are cut short, not refused outright.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4096"])
        .arg(format!("of={}", small.join("filler").display()))
        .stderr(Stdio::null())
        .status();
    connects(30);
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let status = d.status();
        let failed = status["sinks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["sink"] == "json")
            .map_or(0, |s| s["failed"].as_u64().unwrap_or(0));
        if failed > 0 || Instant::now() > deadline {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(failed > 0, "no json sink failure counted:\n{}", d.log());
    let trail = std::fs::read(&d.json_log).unwrap();
    assert_eq!(trail.last(), Some(&b'\n'), "the trail ends in a torn line");
    let before = d.audit().len(); // panics on a line that is not JSON
    // Room again: the next record is a whole line after the others.
    std::fs::remove_file(small.join("filler")).unwrap();
    connects(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.audit().len() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.audit().len() > before,
        "nothing written after space came back"
    );
    let trail = d.json_log.display().to_string();
    let suggest = cli(&["policy", "suggest", "--agent", &agent, "--events", &trail]);
    assert!(suggest.status.success(), "{suggest:?}");
    // A trail that does end mid-line (a crash while writing) is reported, not tripped on.
    let torn = d.dir.path().join("torn.jsonl");
    let mut bytes = std::fs::read(&d.json_log).unwrap();
    bytes.extend_from_slice(b"{\"agent_id\":\"");
    std::fs::write(&torn, &bytes).unwrap();
    let torn_path = torn.display().to_string();
    let suggest = cli(&[
        "policy", "suggest", "--agent", &agent, "--events", &torn_path,
    ]);
    let lines = bytes.iter().filter(|b| **b == b'\n').count() + 1;
    assert!(
        text(&suggest.stderr).contains(&format!("{}:{lines}: last line cut short", torn.display())),
        "{suggest:?}"
    );
    assert!(text(&suggest.stdout).contains("INCOMPLETE"), "{suggest:?}");
    assert_eq!(suggest.status.code(), Some(1), "{suggest:?}");
    d.stop();
}

/// A grant TTL beyond the limit is refused with the limit named, also when a client sends
/// `u64::MAX` milliseconds straight to the control socket (it used to become a grant without end,
/// reported as an 18-quintillion-millisecond expiry); a sane TTL is reported as given.
#[test]
fn absurd_grant_ttls_are_refused() {
    if !require_root("absurd_grant_ttls_are_refused") {
        return;
    }
    let agent = unique_agent("ttl");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let raw = format!(
        "import json, socket\n\
         c = socket.socket(socket.AF_UNIX)\n\
         c.connect('{}')\n\
         c.sendall((json.dumps({{'op': 'task_start', 'agent': '{agent}', 'task': 't1', \
         'allow_connect': ['127.0.0.1:9'], 'ttl_ms': 18446744073709551615}}) + '\\n').encode())\n\
         print(c.makefile().readline(), flush=True)\n",
        d.socket.display()
    );
    let out = Command::new(PYTHON).args(["-c", &raw]).output().unwrap();
    let answer = text(&out.stdout);
    assert!(
        answer.contains("\"error\"")
            && answer.contains("ttl_ms 18446744073709551615: at most 604800000 (7days"),
        "{answer}"
    );
    let status = d.status();
    assert!(
        !status.to_string().contains("18446744073709"),
        "an absurd expiry is reported: {status:#}"
    );
    let cli_refused = d.cli(&[
        "task",
        "start",
        "--agent",
        &agent,
        "--task",
        "t1",
        "--allow-connect",
        "127.0.0.1:9",
        "--ttl",
        "8d",
    ]);
    assert!(!cli_refused.status.success());
    assert!(
        text(&cli_refused.stderr).contains("at most 7days"),
        "{cli_refused:?}"
    );
    let ok = d.cli(&[
        "task",
        "start",
        "--agent",
        &agent,
        "--task",
        "t1",
        "--allow-connect",
        "127.0.0.1:9",
        "--ttl",
        "7d",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(text(&ok.stdout).contains("for 7days"), "{ok:?}");
}

/// `daemon --uninstall` removes agent and task cgroups that no process is in, leaves one with a
/// running agent in place and says which and why.
#[test]
fn uninstall_removes_empty_agent_cgroups_only() {
    if !require_root("uninstall_removes_empty_agent_cgroups_only") {
        return;
    }
    let agent = unique_agent("uncg");
    let mut d = Daemon::start(&[policy(&agent, &[], &["/bin/sleep", "/usr/bin/sleep"])]);
    let base = cgroup2_root().join("agent-monitor").join(&agent);
    let mut busy = d.spawn_run(&agent, "busy", &[], &["/bin/sleep", "60"]);
    let mut short = d.spawn_run(&agent, "short", &[], &["/bin/sleep", "1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(base.join("busy").exists() && base.join("short").exists()) {
        assert!(Instant::now() < deadline, "task cgroups never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // With the daemon gone, nobody removes the task cgroup its agent leaves empty.
    d.kill9();
    assert!(short.wait().unwrap().success());
    assert!(base.join("short").exists());
    let out = d.uninstall();
    let stdout = text(&out.stdout);
    // `run` and its sleep are in it; cgroup.kill ends both.
    std::fs::write(base.join("busy/cgroup.kill"), "1").unwrap();
    let _ = busy.wait();
    assert!(out.status.success(), "{out:?}");
    assert!(!base.join("short").exists(), "{stdout}");
    assert!(stdout.contains("empty agent cgroup(s) below"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "left cgroup {}: 2 process(es) still in it",
            base.join("busy").display()
        )),
        "{stdout}"
    );
    // The populated one stayed; once empty, a second uninstall takes it.
    assert!(base.join("busy").exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(base.join("busy/cgroup.procs"))
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "sleep still in its cgroup");
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = d.uninstall();
    assert!(again.status.success(), "{again:?}");
    assert!(!base.exists(), "{}", text(&again.stdout));
}

/// Output into a closed pipe (`agent-monitor status | head -1`) ends the command by SIGPIPE, as
/// it ends other Unix tools: no panic, no exit 101, nothing on stderr.
#[test]
fn closed_output_pipe_ends_the_cli_quietly() {
    if !require_root("closed_output_pipe_ends_the_cli_quietly") {
        return;
    }
    let agent = unique_agent("epipe");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    // A denial, so that `events` has something to print.
    let port = listener_v4();
    d.run(
        &agent,
        None,
        &[PYTHON, "-c", &py_connect("127.0.0.1", port)],
    );
    d.wait_audit("a denial", |v| field(v, "agent_id") == agent);
    let closed_pipe = || {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two descriptors; the read end is closed at once.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is ours alone.
        Stdio::from(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1])
        })
    };
    let socket = d.socket.display().to_string();
    let json_log = d.json_log.display().to_string();
    for args in [
        vec!["status", "--control-socket", &socket],
        vec!["events", "--control-socket", &socket],
        vec![
            "policy", "suggest", "--agent", &agent, "--events", &json_log,
        ],
    ] {
        let out = Command::new(binary())
            .args(&args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {out:?}"
        );
        assert_eq!(text(&out.stderr), "", "{args:?}");
    }
    let help = Command::new(binary())
        .arg("--help")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert!(
        help.status.success() && !text(&help.stderr).contains("panicked"),
        "{help:?}"
    );
}
