//! End to end on the real kernel: a real daemon, real programs as agents, real verdicts.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use agent_monitor_tests::*;
use serde_json::Value;

fn policy(agent: &str, mode: &str, net: &[String], exec: &[&str]) -> (String, String) {
    let q = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let exec: Vec<String> = exec.iter().map(|s| s.to_string()).collect();
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
            q(net),
            q(&exec)
        ),
    )
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

#[test]
fn allowed_connect_succeeds_and_is_audited() {
    if !require_root("allowed_connect_succeeds_and_is_audited") {
        return;
    }
    let agent = unique_agent("allowconn");
    let port = listener_v4();
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{port}")],
        &[PYTHON],
    )]);
    let out = d.run(
        &agent,
        Some("t1"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", port)],
    );
    assert!(
        out.status.success(),
        "allowed connect failed: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let rec = d.wait_audit("allowed connect", |v| {
        is(v, "action", "connect") && is(v, "verdict", "allowed") && v["dest_port"] == port
    });
    assert_eq!(field(&rec, "agent_id"), agent);
    assert_eq!(field(&rec, "task_id"), "t1");
    assert_eq!(field(&rec, "dest_addr"), "127.0.0.1");
    assert_eq!(field(&rec, "exe"), PYTHON);
    // Allowed actions stay out of journald unless asked.
    assert!(
        journal(&agent).iter().all(|e| !is(e, "VERDICT", "allowed")),
        "allowed action reached journald without --journal-allowed"
    );
}

#[test]
fn denied_connect_gets_eperm_and_is_journaled() {
    if !require_root("denied_connect_gets_eperm_and_is_journaled") {
        return;
    }
    let agent = unique_agent("denyconn");
    let allowed = listener_v4();
    let forbidden = listener_v4();
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
    )]);
    let out = d.run(
        &agent,
        Some("t2"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", forbidden)],
    );
    assert_eq!(
        out.status.code(),
        Some(10 + libc::EPERM),
        "expected EPERM from connect: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let e = wait_journal(&agent, "denied connect", |e| {
        is(e, "ACTION", "connect") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "SYSLOG_IDENTIFIER"), "agent-monitor");
    assert_eq!(field(&e, "TASK_ID"), "t2");
    assert_eq!(field(&e, "DEST_ADDR"), "127.0.0.1");
    assert_eq!(field(&e, "DEST_PORT"), forbidden.to_string());
    assert_eq!(field(&e, "PRIORITY"), "4");
    assert_eq!(field(&e, "EXE"), PYTHON);
    assert_eq!(field(&e, "COMM"), "python3");
    assert_eq!(field(&e, "ENFORCEMENT"), "eperm");
    assert!(field(&e, "PID").parse::<u32>().is_ok(), "PID field: {e}");
    assert!(field(&e, "PROCESS_CHAIN").contains(PYTHON), "chain: {e}");
    assert!(field(&e, "MESSAGE").contains("DENIED"), "message: {e}");
    // The JSON trail has it too.
    d.wait_audit("denied connect", |v| {
        is(v, "verdict", "denied") && v["dest_port"] == forbidden
    });
}

#[test]
fn ipv6_connect_is_judged_like_ipv4() {
    if !require_root("ipv6_connect_is_judged_like_ipv4") {
        return;
    }
    let (Some(allowed), Some(forbidden)) = (listener_v6(), listener_v6()) else {
        panic!("no IPv6 loopback on this machine: cannot test connect6");
    };
    let agent = unique_agent("v6");
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("[::1]:{allowed}")],
        &[PYTHON],
    )]);
    let ok = d.run(&agent, None, &[PYTHON, "-c", &py_connect("::1", allowed)]);
    assert!(ok.status.success(), "allowed v6: {}", text(&ok.stdout));
    let no = d.run(&agent, None, &[PYTHON, "-c", &py_connect("::1", forbidden)]);
    assert_eq!(
        no.status.code(),
        Some(10 + libc::EPERM),
        "{}",
        text(&no.stdout)
    );
    let e = wait_journal(&agent, "denied v6 connect", |e| is(e, "VERDICT", "denied"));
    assert_eq!(field(&e, "DEST_ADDR"), "::1");
}

#[test]
fn denied_exec_never_runs() {
    if !require_root("denied_exec_never_runs") {
        return;
    }
    let agent = unique_agent("denyexec");
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[SH])]);
    let marker = d.dir.path().join("marker");
    let script = format!("/usr/bin/touch {}; echo status=$?", marker.display());
    let out = d.run(&agent, Some("t3"), &[SH, "-c", &script]);
    assert!(
        !marker.exists(),
        "the denied program ran: {} exists",
        marker.display()
    );
    // sh reports a child killed by SIGKILL as 128+9.
    assert!(
        text(&out.stdout).contains("status=137"),
        "stdout: {}",
        text(&out.stdout)
    );
    let e = wait_journal(&agent, "denied exec", |e| {
        is(e, "ACTION", "exec") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "EXE"), "/usr/bin/touch");
    assert_eq!(field(&e, "ENFORCEMENT"), "sigkill");
    assert_eq!(field(&e, "TASK_ID"), "t3");
    assert!(field(&e, "PROCESS_CHAIN").contains(SH), "chain: {e}");
}

#[test]
fn allowed_exec_runs() {
    if !require_root("allowed_exec_runs") {
        return;
    }
    let agent = unique_agent("allowexec");
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[SH, "/usr/bin/tou*"])]);
    let marker = d.dir.path().join("marker");
    let out = d.run(
        &agent,
        None,
        &[SH, "-c", &format!("/usr/bin/touch {}", marker.display())],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(marker.exists(), "allowed program did not run");
    let rec = d.wait_audit("allowed exec", |v| {
        is(v, "action", "exec") && is(v, "exe", "/usr/bin/touch")
    });
    assert_eq!(field(&rec, "verdict"), "allowed");
}

#[test]
fn alert_mode_lets_actions_through_and_reports_them() {
    if !require_root("alert_mode_lets_actions_through_and_reports_them") {
        return;
    }
    let agent = unique_agent("alert");
    let port = listener_v4();
    let d = Daemon::start(&[policy(&agent, "alert", &[], &[])]);
    let marker = d.dir.path().join("marker");
    let out = d.run(
        &agent,
        None,
        &[
            PYTHON,
            "-c",
            &format!(
                "{}\nimport subprocess\nsubprocess.run(['/usr/bin/touch', '{}'], check=True)",
                py_connect("127.0.0.1", port),
                marker.display()
            ),
        ],
    );
    assert!(
        out.status.success(),
        "alert mode blocked something: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(marker.exists());
    let c = wait_journal(&agent, "connect alert", |e| {
        is(e, "ACTION", "connect") && is(e, "VERDICT", "alert")
    });
    assert_eq!(field(&c, "PRIORITY"), "3");
    assert_eq!(field(&c, "DEST_PORT"), port.to_string());
    wait_journal(&agent, "exec alert", |e| {
        is(e, "ACTION", "exec") && is(e, "VERDICT", "alert") && is(e, "EXE", "/usr/bin/touch")
    });
}

#[test]
fn fork_setsid_fork_descendant_is_still_the_agent() {
    if !require_root("fork_setsid_fork_descendant_is_still_the_agent") {
        return;
    }
    let agent = unique_agent("daemonize");
    let port = listener_v4();
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let result = d.dir.path().join("grandchild");
    // Classic double-fork daemonisation: the grandchild has a new session and init as ancestor.
    let script = format!(
        "import os,socket,time\n\
         if os.fork()==0:\n  os.setsid()\n  if os.fork()==0:\n    s=socket.socket()\n    \
         try:\n      s.connect(('127.0.0.1',{port})); r='connected'\n    \
         except OSError as e: r='errno %d'%e.errno\n    \
         open('{res}','w').write('%d %s'%(os.getpid(),r)); os._exit(0)\n  os._exit(0)\n\
         os.wait(); time.sleep(0.5)",
        res = result.display()
    );
    let out = d.run(&agent, None, &[PYTHON, "-c", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !result.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got = std::fs::read_to_string(&result).expect("grandchild wrote its result");
    let (pid, r) = got.split_once(' ').unwrap();
    assert_eq!(
        r,
        format!("errno {}", libc::EPERM),
        "daemonised grandchild escaped the agent"
    );
    let e = wait_journal(&agent, "grandchild denial", |e| {
        is(e, "PID", pid) && is(e, "VERDICT", "denied")
    });
    // Chain: python (root) > python (child) > python (grandchild).
    assert!(
        field(&e, "PROCESS_CHAIN").matches(PYTHON).count() >= 3,
        "chain does not reach back to the agent's root: {}",
        field(&e, "PROCESS_CHAIN")
    );
}

#[test]
fn processes_outside_agents_are_untouched() {
    if !require_root("processes_outside_agents_are_untouched") {
        return;
    }
    let agent = unique_agent("outside");
    let port = listener_v4();
    // The agent may do nothing at all...
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[])]);
    let marker = d.dir.path().join("marker");
    // ...while a process that is not an agent connects and execs freely.
    let out = std::process::Command::new(PYTHON)
        .args([
            "-c",
            &format!(
                "{}\nimport subprocess\nsubprocess.run(['/usr/bin/touch', '{}'], check=True)",
                py_connect("127.0.0.1", port),
                marker.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "non-agent was blocked: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(marker.exists());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        d.audit().is_empty(),
        "non-agent actions were reported: {:#?}",
        d.audit()
    );
    // And the agent itself is denied its very first exec.
    let out = d.run(&agent, None, &["/bin/true"]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "agent exec of /bin/true was not killed"
    );
}

#[test]
fn run_propagates_exit_status_and_explains_failures() {
    if !require_root("run_propagates_exit_status_and_explains_failures") {
        return;
    }
    let agent = unique_agent("run");
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[SH])]);
    assert_eq!(
        d.run(&agent, None, &[SH, "-c", "exit 7"]).status.code(),
        Some(7)
    );
    assert_eq!(
        d.run(&agent, None, &[SH, "-c", "kill -TERM $$"])
            .status
            .code(),
        Some(128 + 15)
    );
    let out = d.run("no-such-agent", None, &[SH, "-c", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("no policy for agent \"no-such-agent\""),
        "{}",
        text(&out.stderr)
    );
    let out = d.run(&agent, Some("bad/task"), &[SH, "-c", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("invalid task id"),
        "{}",
        text(&out.stderr)
    );
    let missing = d.dir.path().join("absent.sock");
    let out = std::process::Command::new(binary())
        .args(["run", "--agent", &agent, "--control-socket"])
        .arg(&missing)
        .args(["--", SH, "-c", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("daemon is not running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn status_lists_agents_processes_and_counters() {
    if !require_root("status_lists_agents_processes_and_counters") {
        return;
    }
    let agent = unique_agent("status");
    let port = listener_v4();
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[],
        &[SH, "/usr/bin/sleep", PYTHON],
    )]);
    let denied = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &py_connect("127.0.0.1", port)],
    );
    assert_eq!(denied.status.code(), Some(10 + libc::EPERM));
    let mut bg = std::process::Command::new(binary())
        .args([
            "run",
            "--agent",
            &agent,
            "--task",
            "long",
            "--control-socket",
        ])
        .arg(&d.socket)
        .args(["--", "/usr/bin/sleep", "30"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, task) = loop {
        let s = d.status();
        let a = s["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent"] == agent.as_str())
            .cloned();
        let task = a.as_ref().and_then(|a| {
            a["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["task"] == "long")
                .cloned()
        });
        if let Some(t) = task.filter(|t| t["processes"].as_array().unwrap().len() >= 2) {
            break (s, t);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task 'long' never showed its processes: {s:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let pids: Vec<u64> = task["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(
        pids.contains(&(bg.id() as u64)),
        "run's own pid {} not listed: {pids:?}",
        bg.id()
    );
    let a = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent.as_str())
        .unwrap();
    assert!(a["denied"].as_u64().unwrap() >= 1, "{a:#}");
    assert!(status["counters"]["denied"].as_u64().unwrap() >= 1);
    assert_eq!(status["counters"]["lost_records"].as_u64(), Some(0));
    let _ = bg.kill();
    let _ = bg.wait();
    // The human form names the agent too.
    let out = std::process::Command::new(binary())
        .args(["status", "--control-socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains(&agent), "{}", text(&out.stdout));
}

#[test]
fn daemon_refuses_invalid_policies_and_policy_check_names_the_line() {
    if !require_root("daemon_refuses_invalid_policies_and_policy_check_names_the_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "agent = \"bad\"\nmode = \"enforce\"\n[network]\nallow = [\"10.0.0.0/33:443\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml:4"), "no file:line in {err}");
    assert!(err.contains("10.0.0.0/33:443"), "no value in {err}");
    let out = std::process::Command::new(binary())
        .args(["daemon", "--control-socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--policies")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "daemon started on an invalid policy");
    assert!(
        text(&out.stderr).contains("bad.toml:4"),
        "{}",
        text(&out.stderr)
    );
    // The repository's example policies are valid.
    let examples = std::env::var_os("AGENT_MONITOR_POLICIES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    let out = std::process::Command::new(binary())
        .args(["policy", "check"])
        .arg(&examples)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    if !require_root("a_second_daemon_on_the_same_socket_is_refused") {
        return;
    }
    let agent = unique_agent("twice");
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[SH])]);
    let out = std::process::Command::new(binary())
        .args(["daemon", "--control-socket"])
        .arg(&d.socket)
        .arg("--policies")
        .arg(d.dir.path().join("policies"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second daemon started");
    assert!(
        text(&out.stderr).contains("already serving"),
        "{}",
        text(&out.stderr)
    );
    // The first one still works.
    assert_eq!(
        d.run(&agent, None, &[SH, "-c", "exit 3"]).status.code(),
        Some(3)
    );
}

#[test]
fn dot_dot_in_an_exec_path_cannot_escape_a_glob() {
    if !require_root("dot_dot_in_an_exec_path_cannot_escape_a_glob") {
        return;
    }
    let agent = unique_agent("dotdot");
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[SH, "/usr/lib/*"])]);
    let marker = d.dir.path().join("marker");
    // Resolves to /usr/bin/touch, which is not under /usr/lib, though the text starts with it.
    let script = format!("/usr/lib/../bin/touch {}; echo status=$?", marker.display());
    let out = d.run(&agent, None, &[SH, "-c", &script]);
    assert!(!marker.exists(), "escaped the /usr/lib/* glob with ..");
    assert!(
        text(&out.stdout).contains("status=137"),
        "{}",
        text(&out.stdout)
    );
    let e = wait_journal(&agent, "denied dot-dot exec", |e| {
        is(e, "ACTION", "exec") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "EXE"), "/usr/lib/../bin/touch");
    assert!(field(&e, "REASON").contains("normal form"), "{e}");
    assert_eq!(d.status()["counters"]["exec_paths_not_normal"], 1);
}

#[test]
fn journal_allowed_sends_allowed_actions_to_journald_too() {
    if !require_root("journal_allowed_sends_allowed_actions_to_journald_too") {
        return;
    }
    let agent = unique_agent("journalallowed");
    let port = listener_v4();
    let d = Daemon::start_with(
        &[policy(
            &agent,
            "enforce",
            &[format!("127.0.0.1:{port}")],
            &[PYTHON],
        )],
        &["--journal-allowed"],
    );
    let out = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &py_connect("127.0.0.1", port)],
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    let e = wait_journal(&agent, "allowed connect", |e| {
        is(e, "ACTION", "connect") && is(e, "VERDICT", "allowed")
    });
    assert_eq!(field(&e, "PRIORITY"), "6");
    assert_eq!(field(&e, "DEST_PORT"), port.to_string());
    assert!(
        field(&e, "REASON").contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );
}
