//! Production operation on the real kernel: enforcement that survives the daemon (kill -9 and
//! adoption), hot reload, metrics, loss accounting, fork floods. Run one at a time
//! (`--test-threads=1`): the programs attach at the cgroup root. Every daemon here pins into a
//! private bpffs directory that the harness removes afterwards.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

const MSG_ADOPTED: &str = "0474ba54449a47e08c96ff618b9ecec3";
const MSG_RELOAD_FAILED: &str = "b0a0e56e4b794526a45c061afb6ed4c5";

fn policy(agent: &str, mode: &str, net: &[String], exec: &[&str]) -> (String, String) {
    let net: Vec<&str> = net.iter().map(String::as_str).collect();
    mode_policy(agent, mode, &net, exec)
}

/// A python agent (via `agent-monitor run`) that tries to connect to each port in `ports` every
/// `every_ms` for `secs` seconds and prints one line per try: `<port> ok` or `<port> errno <n>`.
fn start_connect_loop(
    d: &Daemon,
    agent: &str,
    task: &str,
    ports: &[u16],
    every_ms: u64,
    secs: f64,
) -> std::process::Child {
    let script = format!(
        "import socket,time,sys\n\
         end=time.time()+{secs}\n\
         while time.time()<end:\n\
         \x20 for p in {ports:?}:\n\
         \x20   s=socket.socket()\n\
         \x20   try:\n\
         \x20     s.connect(('127.0.0.1',p)); print(p,'ok',flush=True)\n\
         \x20   except OSError as e:\n\
         \x20     print(p,'errno',e.errno,flush=True)\n\
         \x20   s.close()\n\
         \x20 time.sleep({})\n",
        every_ms as f64 / 1000.0
    );
    Command::new(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args([
            "--agent", agent, "--task", task, "--", PYTHON, "-c", &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent")
}

/// (port, outcome) for every try the loop printed.
fn outcomes(child: std::process::Child) -> Vec<(u16, String)> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "agent loop failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (p, rest) = l.split_once(' ')?;
            Some((p.parse().ok()?, rest.to_string()))
        })
        .collect()
}

fn link_program_ids(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = status["mechanisms"]["links"]
        .as_array()
        .expect("status lists the pinned links")
        .iter()
        .map(|l| l["program_id"].as_u64().unwrap())
        .collect();
    ids.sort();
    ids
}

#[test]
fn kill9_and_restart_keep_denying_and_adopt_without_second_programs() {
    if !require_root("kill9_and_restart_keep_denying_and_adopt_without_second_programs") {
        return;
    }
    let agent = unique_agent("kill9");
    let allowed = listener_v4();
    let forbidden = listener_v4();
    let mut d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
    )]);
    let before = d.status();
    let programs = link_program_ids(&before);
    assert!(programs.len() >= 3, "links: {before:#}");
    let links_before = kernel_links_of(&programs);
    assert_eq!(
        links_before.len(),
        programs.len(),
        "one link per program before the kill: {links_before:?}"
    );

    // The agent keeps trying through the kill, the time without a daemon and the restart.
    let agent_loop = start_connect_loop(&d, &agent, "k9", &[forbidden, allowed], 100, 6.0);
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    d.spawn();
    let tries = outcomes(agent_loop);

    let denied: Vec<_> = tries.iter().filter(|(p, _)| *p == forbidden).collect();
    assert!(denied.len() >= 30, "too few tries: {tries:?}");
    assert!(
        denied.iter().all(|(_, o)| o == "errno 1"),
        "a forbidden connect was not denied with EPERM at some point: {denied:?}"
    );
    assert!(
        tries
            .iter()
            .filter(|(p, _)| *p == allowed)
            .all(|(_, o)| o == "ok"),
        "an allowed connect failed: {tries:?}"
    );

    let after = d.status();
    assert_eq!(after["origin"]["kind"], "adopted", "{after:#}");
    assert_eq!(after["origin"]["replaced_build"], false);
    let away = after["origin"]["away_seconds"].as_f64().unwrap();
    assert!((1.5..10.0).contains(&away), "away {away} s");
    assert_eq!(
        link_program_ids(&after),
        programs,
        "the restarted daemon must adopt the same programs, not load new ones"
    );
    assert_eq!(
        kernel_links_of(&programs),
        links_before,
        "the kernel's links to our programs changed across the restart"
    );
    // The recovered task keeps its name: actions after the restart are attributed to it.
    let recs = d.audit();
    assert!(
        recs.iter().any(|r| r["agent_id"] == agent.as_str()
            && r["task_id"] == "k9"
            && r["dest_port"] == forbidden
            && r["verdict"] == "denied"),
        "no attributed denial in the audit trail"
    );
    // journald says how long the daemon was away and what was lost meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    let adopted = loop {
        let hits = journal_matching(&[
            format!("MESSAGE_ID={MSG_ADOPTED}"),
            format!("PIN_DIR={}", d.pin_dir.display()),
        ]);
        if let Some(e) = hits.into_iter().next() {
            break e;
        }
        assert!(Instant::now() < deadline, "no adoption entry in journald");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(field(&adopted, "LOST_RECORDS"), "0", "{adopted:#}");
    assert_eq!(field(&adopted, "RECOVERED_TASKS"), "1", "{adopted:#}");
    assert!(!field(&adopted, "AWAY_SECONDS").is_empty());

    // Removing enforcement is explicit, and refused while the daemon runs.
    let refused = d.uninstall();
    assert!(
        !refused.status.success(),
        "uninstall under a running daemon"
    );
    d.stop();
    let out = d.uninstall();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        kernel_links_of(&programs).is_empty(),
        "links remain after uninstall"
    );
    assert!(!d.pin_dir.exists());
}

#[test]
fn reload_to_wider_and_narrower_policy_applies_to_running_agents() {
    if !require_root("reload_to_wider_and_narrower_policy_applies_to_running_agents") {
        return;
    }
    let agent = unique_agent("reload");
    let stays = listener_v4();
    let changes = listener_v4();
    let narrow = policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{stays}")],
        &[PYTHON],
    );
    let wide = policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{stays}"), format!("127.0.0.1:{changes}")],
        &[PYTHON],
    );
    let d = Daemon::start(std::slice::from_ref(&narrow));
    // Tries both ports every 20 ms while the policy flips under it.
    let agent_loop = start_connect_loop(&d, &agent, "rl", &[stays, changes], 20, 8.0);
    std::thread::sleep(Duration::from_millis(1000));
    let mut flips = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let (name, text_) = if flips % 2 == 0 { &wide } else { &narrow };
        d.write_policy(name, text_);
        let out = d.reload();
        assert!(out.status.success(), "reload: {}", text(&out.stderr));
        flips += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    let tries = outcomes(agent_loop);
    // The port allowed by every version never saw a deny-all moment.
    let stays_tries: Vec<_> = tries.iter().filter(|(p, _)| *p == stays).collect();
    assert!(stays_tries.len() > 100, "{}", stays_tries.len());
    assert!(
        stays_tries.iter().all(|(_, o)| o == "ok"),
        "the always-allowed port was refused during a reload: {stays_tries:?}"
    );
    // The other port followed the flips: both outcomes occurred, and only these two.
    let changes_tries: Vec<&String> = tries
        .iter()
        .filter(|(p, _)| *p == changes)
        .map(|(_, o)| o)
        .collect();
    assert!(
        changes_tries.iter().any(|o| *o == "ok"),
        "wider never applied"
    );
    assert!(
        changes_tries.iter().any(|o| *o == "errno 1"),
        "narrower never applied"
    );
    assert!(changes_tries.iter().all(|o| *o == "ok" || *o == "errno 1"));
    // After the last (narrow or wide) reload, a fresh try matches that policy.
    let last_wide = flips % 2 == 1;
    let out = d.run(
        &agent,
        Some("rl2"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", changes)],
    );
    assert_eq!(out.status.success(), last_wide, "{}", text(&out.stdout));
    let st = d.status();
    assert_eq!(st["counters"]["reloads"], flips);
    assert_eq!(st["counters"]["reload_failures"], 0);
    assert_eq!(st["counters"]["verdict_disagreements"], 0, "{st:#}");
}

#[test]
fn invalid_reload_changes_nothing_and_reports_file_and_line() {
    if !require_root("invalid_reload_changes_nothing_and_reports_file_and_line") {
        return;
    }
    let agent = unique_agent("badreload");
    let allowed = listener_v4();
    let forbidden = listener_v4();
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
    )]);
    // A valid wider file for our agent plus a broken one: all or nothing, so neither applies.
    d.write_policy(
        &format!("{agent}.toml"),
        &policy(
            &agent,
            "enforce",
            &[
                format!("127.0.0.1:{allowed}"),
                format!("127.0.0.1:{forbidden}"),
            ],
            &[PYTHON],
        )
        .1,
    );
    d.write_policy(
        "broken.toml",
        "agent = \"broken\"\nmode = \"enforce\"\n[network]\nallow = [\"300.1.2.3:80\"]\n",
    );
    let out = d.reload();
    assert!(!out.status.success(), "an invalid reload succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("broken.toml:4:"), "no file:line in {err}");
    assert!(err.contains("300.1.2.3"), "no reason in {err}");

    // Old policy still in force, daemon still serving.
    let denied = d.run(
        &agent,
        Some("t"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", forbidden)],
    );
    assert_eq!(denied.status.code(), Some(11), "{}", text(&denied.stdout));
    let ok = d.run(
        &agent,
        Some("t"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", allowed)],
    );
    assert!(ok.status.success());
    let st = d.status();
    assert_eq!(st["counters"]["reload_failures"], 1);

    // journald: priority err, with the file, line and reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits: Vec<Value> = journal_matching(&[
            format!("MESSAGE_ID={MSG_RELOAD_FAILED}"),
            format!("POLICY_DIR={}", d.policies.display()),
        ]);
        if let Some(e) = hits.first() {
            assert_eq!(field(e, "PRIORITY"), "3");
            assert!(field(e, "MESSAGE").contains("broken.toml:4:"), "{e:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no RELOAD_FAILED entry in journald"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_known_actions() {
    if !require_root("metrics_count_known_actions") {
        return;
    }
    let agent = unique_agent("metrics");
    let allowed = listener_v4();
    let forbidden = listener_v4();
    let port = free_port();
    let d = Daemon::start_with(
        &[policy(
            &agent,
            "enforce",
            &[format!("127.0.0.1:{allowed}")],
            &[PYTHON],
        )],
        &["--metrics", &format!("127.0.0.1:{port}")],
    );
    let script = format!(
        "import socket\nfor p in [{allowed},{allowed},{forbidden},{forbidden},{forbidden}]:\n  s=socket.socket()\n  try: s.connect(('127.0.0.1',p))\n  except OSError: pass\n  s.close()\n"
    );
    let out = d.run(&agent, Some("m"), &[PYTHON, "-c", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    d.wait_audit("the last denial", |v| {
        d.audit()
            .iter()
            .filter(|r| r["agent_id"] == agent.as_str() && r["verdict"] == "denied")
            .count()
            == 3
            && v["verdict"] == "denied"
    });
    let (status, body) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    for want in [
        format!(
            "agent_monitor_actions_total{{agent=\"{agent}\",action=\"connect\",verdict=\"denied\"}} 3"
        ),
        format!(
            "agent_monitor_actions_total{{agent=\"{agent}\",action=\"connect\",verdict=\"allowed\"}} 2"
        ),
        format!(
            "agent_monitor_actions_total{{agent=\"{agent}\",action=\"exec\",verdict=\"allowed\"}} 1"
        ),
        "agent_monitor_kernel_records_lost_total 0".to_string(),
        "agent_monitor_map_capacity{map=\"AGENT_CGROUPS\"} 16384".to_string(),
        "agent_monitor_reload_failures_total 0".to_string(),
        "agent_monitor_sink_write_failures_total{sink=\"json\"} 0".to_string(),
        "agent_monitor_agents 1".to_string(),
    ] {
        assert!(body.contains(&want), "missing {want:?} in\n{body}");
    }
    let (status, _) = http_get(port, "/other");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn fork_flood_does_not_open_enforcement() {
    if !require_root("fork_flood_does_not_open_enforcement") {
        return;
    }
    let agent = unique_agent("forkflood");
    let forbidden = listener_v4();
    let d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    // 20 000 processes (more than the identity map's 16 384 entries if identity were per
    // process), each gone at once, then a forbidden connect and a forbidden exec from the last.
    let script = format!(
        "import os,socket,subprocess,sys\n\
         for i in range(20000):\n\
         \x20 pid=os.fork()\n\
         \x20 if pid==0: os._exit(0)\n\
         \x20 os.waitpid(pid,0)\n\
         s=socket.socket()\n\
         try:\n\
         \x20 s.connect(('127.0.0.1',{forbidden})); print('connected')\n\
         except OSError as e: print('errno',e.errno)\n\
         print('exec',subprocess.run(['/usr/bin/id']).returncode)\n"
    );
    let out = d.run(&agent, Some("ff"), &[PYTHON, "-c", &script]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("errno 1"),
        "forbidden connect after the flood: {stdout}"
    );
    assert!(
        stdout.contains("exec -9"),
        "forbidden exec after the flood: {stdout}"
    );
    let st = d.status();
    let occ = st["occupancy"].as_array().unwrap();
    let ids = occ.iter().find(|o| o["map"] == "AGENT_CGROUPS").unwrap();
    assert!(
        ids["used"].as_u64().unwrap() <= 2,
        "identity is per cgroup, not per process: {ids}"
    );
}

#[test]
fn ring_buffer_flood_loss_is_counted_exactly() {
    if !require_root("ring_buffer_flood_loss_is_counted_exactly") {
        return;
    }
    let agent = unique_agent("flood");
    let forbidden = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let daemon_pid = d.pid();
    // The agent waits for the go file, then makes N denied connects as fast as it can. The
    // daemon is stopped (SIGSTOP) meanwhile, so the 8 MiB ring buffer (~80k connect records,
    // 104 bytes each in the ring) must overflow: the loss is certain, and it must be counted to
    // the record.
    let go = d.dir.path().join("go");
    const N: usize = 160_000;
    let script = format!(
        "import os,socket,time\n\
         while not os.path.exists({go:?}): time.sleep(0.05)\n\
         n=0\n\
         for i in range({N}):\n\
         \x20 s=socket.socket()\n\
         \x20 try: s.connect(('127.0.0.1',{forbidden}))\n\
         \x20 except OSError as e:\n\
         \x20   if e.errno==1: n+=1\n\
         \x20 s.close()\n\
         print('denied',n)\n",
        go = go.display().to_string()
    );
    let child = Command::new(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args([
            "--agent", &agent, "--task", "fl", "--", PYTHON, "-c", &script,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The python exec is reported before the flood.
    d.wait_audit("the agent's exec", |v| {
        v["agent_id"] == agent.as_str() && v["action"] == "exec"
    });
    // SAFETY: signals to the daemon we started.
    unsafe { libc::kill(daemon_pid, libc::SIGSTOP) };
    std::fs::write(&go, "").unwrap();
    let out = child.wait_with_output().unwrap();
    unsafe { libc::kill(daemon_pid, libc::SIGCONT) };
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("denied {N}")),
        "every flood connect must be denied: {stdout}"
    );

    // Wait until the daemon has drained the ring buffer (its count stops moving).
    let seen = |d: &Daemon| {
        d.audit()
            .iter()
            .filter(|r| r["agent_id"] == agent.as_str())
            .count()
    };
    let mut last = usize::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = seen(&d);
        if now == last {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never caught up");
        last = now;
    }
    let st = d.status();
    let lost = st["counters"]["actions_lost"].as_u64().unwrap() as usize;
    let done = N + 1; // the flood plus python's own exec
    assert!(lost > 0, "the ring buffer did not overflow; status: {st:#}");
    assert_eq!(
        last + lost,
        done,
        "actions seen ({last}) + actions lost ({lost}) != actions done ({done})"
    );
    assert!(st["counters"]["lost_records"].as_u64().unwrap() as usize >= lost);
    d.stop();
}

#[test]
fn pinned_programs_of_another_build_are_replaced_without_a_gap() {
    if !require_root("pinned_programs_of_another_build_are_replaced_without_a_gap") {
        return;
    }
    let agent = unique_agent("upgrade");
    let forbidden = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let old_programs = link_program_ids(&d.status());
    let agent_loop = start_connect_loop(&d, &agent, "up", &[forbidden], 50, 5.0);
    std::thread::sleep(Duration::from_millis(1000));
    d.restart_as_another_build();
    let tries = outcomes(agent_loop);
    assert!(tries.len() >= 40, "{tries:?}");
    assert!(
        tries.iter().all(|(_, o)| o == "errno 1"),
        "a forbidden connect got through the upgrade: {tries:?}"
    );
    let st = d.status();
    assert_eq!(st["origin"]["replaced_build"], true, "{st:#}");
    let new_programs = link_program_ids(&st);
    assert!(
        new_programs.iter().all(|p| !old_programs.contains(p)),
        "old {old_programs:?} new {new_programs:?}"
    );
    assert!(
        kernel_links_of(&old_programs).is_empty(),
        "the old build's links are still attached"
    );
    assert_eq!(kernel_links_of(&new_programs).len(), new_programs.len());
    // The task survived the upgrade and is still governed and named.
    let task = &st["agents"][0]["tasks"];
    assert!(
        task.as_array()
            .is_some_and(|t| t.iter().any(|t| t["task"] == "up"))
            || d.audit().iter().any(|r| r["task_id"] == "up"),
        "{st:#}"
    );
}

#[test]
fn repeated_denials_are_aggregated_in_journald_but_not_in_the_trail() {
    if !require_root("repeated_denials_are_aggregated_in_journald_but_not_in_the_trail") {
        return;
    }
    let agent = unique_agent("storm");
    let forbidden = listener_v4();
    let d = Daemon::start_with(
        &[policy(&agent, "enforce", &[], &[PYTHON])],
        &["--storm-window", "2"],
    );
    let script = format!(
        "import socket\nfor i in range(50):\n  s=socket.socket()\n  try: s.connect(('127.0.0.1',{forbidden}))\n  except OSError: pass\n  s.close()\n"
    );
    let out = d.run(&agent, Some("st"), &[PYTHON, "-c", &script]);
    assert!(out.status.success());
    let summary = wait_journal(&agent, "a repeat summary", |e| {
        field(e, "MESSAGE_ID") == "3108a85902c74570b117651be139bfc7"
    });
    assert_eq!(field(&summary, "REPEAT_COUNT"), "49", "{summary:#}");
    assert_eq!(field(&summary, "VERDICT"), "denied");
    assert_eq!(field(&summary, "DEST_PORT"), forbidden.to_string());
    assert!(!field(&summary, "REPEAT_FIRST").is_empty());
    let singles = journal(&agent)
        .into_iter()
        .filter(|e| {
            field(e, "MESSAGE_ID") == "5d59276407424888bc69e2683d35856b"
                && field(e, "DEST_PORT") == forbidden.to_string()
        })
        .count();
    assert_eq!(
        singles, 1,
        "one entry for the first denial, then the summary"
    );
    let trail = d
        .audit()
        .into_iter()
        .filter(|r| r["agent_id"] == agent.as_str() && r["dest_port"] == forbidden)
        .count();
    assert_eq!(trail, 50, "the JSON trail keeps every denial");
    assert_eq!(d.status()["counters"]["journald_aggregated"], 49);
}

#[test]
fn events_shows_history_and_follows_new_actions() {
    if !require_root("events_shows_history_and_follows_new_actions") {
        return;
    }
    use std::io::BufRead as _;
    let agent = unique_agent("events");
    let other = unique_agent("evother");
    let forbidden = listener_v4();
    let d = Daemon::start(&[
        policy(&agent, "enforce", &[], &[PYTHON]),
        policy(&other, "enforce", &[], &[PYTHON]),
    ]);
    let first = d.run(
        &agent,
        Some("e1"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", forbidden)],
    );
    assert_eq!(first.status.code(), Some(11));
    d.wait_audit("the first denial", |v| {
        v["task_id"] == "e1" && v["action"] == "connect"
    });

    let history = cli(&[
        "events",
        "--json",
        "--agent",
        &agent,
        "--control-socket",
        d.socket.to_str().unwrap(),
    ]);
    assert!(history.status.success(), "{}", text(&history.stderr));
    let lines: Vec<Value> = text(&history.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|v| v["task_id"] == "e1"
            && v["verdict"] == "denied"
            && v["dest_port"] == forbidden),
        "{lines:?}"
    );

    let mut follower = Command::new(binary())
        .args([
            "events",
            "--follow",
            "--json",
            "--agent",
            &agent,
            "--control-socket",
        ])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Another agent's action is filtered out; ours arrives live.
    d.run(
        &other,
        Some("x"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", forbidden)],
    );
    d.run(
        &agent,
        Some("e2"),
        &[PYTHON, "-c", &py_connect("127.0.0.1", forbidden)],
    );
    let reader = std::io::BufReader::new(follower.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&l).unwrap();
            assert_eq!(v["agent_id"], agent.as_str(), "another agent's action: {v}");
            let live = v["task_id"] == "e2" && v["action"] == "connect";
            seen.push(v);
            if live {
                break;
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        seen.iter().any(|v| v["task_id"] == "e1"),
        "history first: {seen:?}"
    );
    assert!(
        seen.iter().any(|v| v["task_id"] == "e2"),
        "the live action never arrived: {seen:?}"
    );
}

#[test]
fn removing_a_running_agents_policy_fails_closed() {
    if !require_root("removing_a_running_agents_policy_fails_closed") {
        return;
    }
    let agent = unique_agent("removed");
    let keep = unique_agent("kept");
    let allowed = listener_v4();
    let d = Daemon::start(&[
        policy(
            &agent,
            "enforce",
            &[format!("127.0.0.1:{allowed}")],
            &[PYTHON],
        ),
        policy(&keep, "alert", &[], &[PYTHON]),
    ]);
    let agent_loop = start_connect_loop(&d, &agent, "rm", &[allowed], 50, 3.0);
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::remove_file(d.policies.join(format!("{agent}.toml"))).unwrap();
    let out = d.reload();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st = d.status();
    let tries = outcomes(agent_loop);
    // Allowed while the policy existed, denied once it was gone: never an open door.
    let first_denied = tries.iter().position(|(_, o)| o == "errno 1");
    let first_denied = first_denied.unwrap_or_else(|| panic!("never denied: {tries:?}"));
    assert!(first_denied > 0, "{tries:?}");
    assert!(
        tries[first_denied..].iter().all(|(_, o)| o == "errno 1"),
        "allowed again after the policy was removed: {tries:?}"
    );
    let entry = st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent.as_str())
        .unwrap_or_else(|| panic!("the orphaned agent is not in status: {st:#}"));
    assert_eq!(entry["mode"], "no policy (denied everything)");
}

#[test]
fn systemd_notifications_ready_watchdog_stopping() {
    if !require_root("systemd_notifications_ready_watchdog_stopping") {
        return;
    }
    // systemd is not PID 1 here: play its part with a datagram socket at NOTIFY_SOCKET.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let agent = unique_agent("notify");
    let mut d = Daemon::start_with_env(
        &[policy(&agent, "enforce", &[], &[PYTHON])],
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            // 1 s watchdog: pings every 0.5 s.
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        got.first().is_some_and(|m| m.contains("READY=1")),
        "READY=1 must come first: {got:?}"
    );
    assert!(
        got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "watchdog pings: {got:?}"
    );
    d.stop();
    let mut stopping = false;
    for _ in 0..20 {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

#[test]
fn reload_keeps_dns_proxies_and_learned_addresses() {
    if !require_root("reload_keeps_dns_proxies_and_learned_addresses") {
        return;
    }
    // "zz-…" sorts after the agent added by the reload, so its kernel position changes too.
    let agent = format!("zz-{}", unique_agent("dnsreload"));
    let port = listener_on("127.0.0.3");
    let up = Dnsmasq::start(&["--address=/ok.example.com/127.0.0.3"]);
    let up_addr = up.addr.to_string();
    let rule = format!("ok.example.com:{port}");
    let mk = |name: &str| {
        (
            format!("{name}.toml"),
            format!(
                "agent = {name:?}\nmode = \"enforce\"\n[network]\nallow = [{rule:?}]\n[exec]\nallow = [\"/usr/bin/python3*\"]\n[dns]\nprivate_answers = [\"*.example.com\"]\n"
            ),
        )
    };
    let d = Daemon::start_with(&[mk(&agent)], &["--dns-upstream", &up_addr]);
    let ops = |ops: &str| dns_client(&d, &agent, "dr", ops);
    let p = port.to_string();
    let r = ops(&format!("gai ok.example.com c 127.0.0.3 {p}"));
    assert_eq!(r[1]["ok"], true, "before the reload: {r:?}");

    // A new agent that sorts first: every kernel index moves to the other bank and position.
    let first = format!("aa-{}", unique_agent("dnsfirst"));
    let (name, text_) = mk(&first);
    d.write_policy(&name, &text_);
    let out = d.reload();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The address learned before the reload is still allowed, and resolving still works.
    let r = ops(&format!(
        "c 127.0.0.3 {p} gai ok.example.com c 127.0.0.3 {p}"
    ));
    assert_eq!(
        r[0]["ok"], true,
        "learned address lost in the reload: {r:?}"
    );
    assert_eq!(r[1]["addrs"][0], "127.0.0.3", "DNS after the reload: {r:?}");
    assert_eq!(r[2]["ok"], true, "{r:?}");
    assert_eq!(d.status()["counters"]["verdict_disagreements"], 0);
}

/// Runs `PY_DNS_CLIENT` with `ops` as `agent`, task `task`: one JSON result per operation.
fn dns_client(d: &Daemon, agent: &str, task: &str, ops: &str) -> Vec<Value> {
    let mut cmd = vec![PYTHON, "-c", PY_DNS_CLIENT];
    cmd.extend(ops.split_whitespace());
    let out = d.run(agent, Some(task), &cmd);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Hot reload reaches the DNS proxies too: a host rule the reload adds is answered at once (it
/// was refused before), and an agent the reload adds gets its own proxy, so its names resolve
/// without a restart.
#[test]
fn reload_puts_new_host_rules_in_force_in_the_dns_proxies() {
    if !require_root("reload_puts_new_host_rules_in_force_in_the_dns_proxies") {
        return;
    }
    let agent = unique_agent("dnsrules");
    let added = unique_agent("dnsadded");
    let (old_port, new_port) = (listener_on("127.0.0.3"), listener_on("127.0.0.4"));
    let up = Dnsmasq::start(&[
        "--address=/old.example.com/127.0.0.3",
        "--address=/new.example.com/127.0.0.4",
    ]);
    let up_addr = up.addr.to_string();
    let mk = |name: &str, rules: &[String]| {
        let list = rules
            .iter()
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        (
            format!("{name}.toml"),
            format!(
                "agent = {name:?}\nmode = \"enforce\"\n[network]\nallow = [{list}]\n[exec]\nallow = [\"/usr/bin/python3*\"]\n[dns]\nprivate_answers = [\"*.example.com\"]\n"
            ),
        )
    };
    let old_rule = format!("old.example.com:{old_port}");
    let new_rule = format!("new.example.com:{new_port}");
    let d = Daemon::start_with(
        &[mk(&agent, std::slice::from_ref(&old_rule))],
        &["--dns-upstream", &up_addr],
    );
    let ops = |who: &str, ops: &str| dns_client(&d, who, "rules", ops);
    let ask = "q 127.0.0.1 new.example.com 1 udp";
    let r = ops(&agent, ask);
    assert_eq!(r[0]["rcode"], 5, "a name off the list is REFUSED: {r:?}");
    assert!(!up.was_asked("new.example.com"), "{}", up.log());

    let (name, body) = mk(&agent, &[old_rule.clone(), new_rule.clone()]);
    d.write_policy(&name, &body);
    let (name, body) = mk(&added, std::slice::from_ref(&new_rule));
    d.write_policy(&name, &body);
    let out = d.reload();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let np = new_port.to_string();
    for who in [&agent, &added] {
        let r = ops(who, &format!("{ask} c 127.0.0.4 {np}"));
        assert_eq!(
            r[0]["rcode"], 0,
            "{who}: the reloaded rule is not in force in its proxy: {r:?}"
        );
        assert_eq!(r[0]["addrs"][0], "127.0.0.4", "{who}: {r:?}");
        assert_eq!(
            r[1]["ok"], true,
            "{who}: the resolved address is not reachable: {r:?}"
        );
    }
    assert!(up.was_asked("new.example.com"));
    let status = d.status();
    let proxy_of = |a: &str| {
        status["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["agent"] == a)
            .map(|x| x["dns_proxy"].clone())
            .unwrap()
    };
    assert!(proxy_of(&added)["udp4"].as_u64().unwrap() > 0, "{status}");
    assert_ne!(
        proxy_of(&added),
        proxy_of(&agent),
        "the added agent has a proxy of its own"
    );
}

/// Issue 6 item 2 with issue 4's selectors: a process that already runs a selected executable
/// when the daemon starts (and the child it started before) is found through procfs and tagged
/// before enforcement is reported; the tags live in a pinned map, so a kill -9 and restart keeps
/// them governed.
#[test]
fn processes_running_a_selected_executable_before_start_are_governed_across_restart() {
    if !require_root(
        "processes_running_a_selected_executable_before_start_are_governed_across_restart",
    ) {
        return;
    }
    let agent = unique_agent("pre");
    let dir = tempfile::tempdir().unwrap();
    let bot = dir.path().join("bot");
    std::fs::copy("/bin/bash", &bot).unwrap();
    let digest = sha256_hex(&bot);
    let forbidden = listener_v4();
    // Python has a port of its own: journald aggregates repeats of one denial per agent and
    // destination, so a shared port let the bot's denial stand for python's.
    let forbidden_py = listener_v4();
    let go = |n: u32| dir.path().join(format!("GO{n}"));
    let py = format!(
        "import socket,os,time\n\
         for g in ({:?},{:?}):\n\
         \x20 while not os.path.exists(g): time.sleep(0.05)\n\
         \x20 s=socket.socket()\n\
         \x20 try:\n\
         \x20   s.connect(('127.0.0.1',{forbidden_py})); print('py connected',flush=True)\n\
         \x20 except OSError as e:\n\
         \x20   print('py errno',e.errno,flush=True)\n",
        go(1).display().to_string(),
        go(2).display().to_string()
    );
    let script = format!(
        "{PYTHON} -c \"$PY\" &\n\
         for g in {} {}; do\n\
         \x20 while [ ! -e $g ]; do sleep 0.05; done\n\
         \x20 ( exec 3<>/dev/tcp/127.0.0.1/{forbidden} ) 2>/dev/null && echo bot connected || echo bot refused\n\
         done\n\
         wait\n",
        go(1).display(),
        go(2).display()
    );
    // Started before any daemon: nothing governs it yet.
    let child = Command::new(&bot)
        .args(["-c", &script])
        .env("PY", &py)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let _group = GroupGuard(child.id());
    std::thread::sleep(Duration::from_millis(500));

    let mut d = Daemon::start(&[identity_policy(
        &agent,
        &[],
        &["/usr/bin/sleep", "/bin/sleep", PYTHON],
        &format!(
            "executables = [{{ path = {:?}, sha256 = {digest:?} }}]",
            bot.display().to_string()
        ),
    )]);
    assert!(
        d.log()
            .contains("running processes of selected executables (and their descendants)"),
        "{}",
        d.log()
    );
    std::fs::write(go(1), "").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    d.kill9();
    d.spawn();
    std::fs::write(go(2), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(
        lines,
        ["bot refused", "bot refused", "py errno 1", "py errno 1"],
        "stderr: {}",
        text(&out.stderr)
    );
    let rec = wait_journal(&agent, "denied connect of the pre-existing python", |e| {
        e["ACTION"] == "connect" && e["VERDICT"] == "denied" && e["COMM"] == "python3"
    });
    assert_eq!(rec["TASK_ID"], "default", "{rec:#}");
    assert!(
        d.log().contains("process tag(s) recovered"),
        "the restarted daemon reports the tags it found: {}",
        d.log()
    );
    // Selector agents have no `run` filter: the socket() watch (issue 8b) is on, and its pinned
    // link is still attached in the restarted daemon.
    let s = d.status();
    assert!(
        s["mechanisms"]["socket_syscall_watch"]
            .as_str()
            .unwrap_or("")
            .starts_with("on"),
        "{s:#}"
    );
    assert!(
        s["mechanisms"]["attached"]
            .to_string()
            .contains("tracepoint syscalls/sys_enter_socket"),
        "{s:#}"
    );
    assert!(d.pin_dir.join("links/agent_socket_syscall").exists());
}

/// An agent process (through `agent-monitor run`) in one task that connects to 127.0.0.1:PORT
/// each time it is asked, so one process lives through kills and restarts of the daemon.
struct Prober {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Prober {
    fn start(d: &Daemon, agent: &str, task: &str, port: u16) -> Prober {
        let script = format!(
            "import socket,sys\n\
             for line in sys.stdin:\n\
             \x20 s=socket.socket()\n\
             \x20 try:\n\
             \x20   s.connect(('127.0.0.1',{port})); r='ok'\n\
             \x20 except OSError as e:\n\
             \x20   r='errno%d'%e.errno\n\
             \x20 s.close(); print(r,flush=True)\n"
        );
        let mut child = Command::new(binary())
            .args(["run", "--control-socket"])
            .arg(&d.socket)
            .args([
                "--agent", agent, "--task", task, "--", PYTHON, "-c", &script,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the prober");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Prober {
            child,
            stdin,
            stdout,
        }
    }

    /// One connect: `ok` or `errno<N>`.
    fn connect(&mut self) -> String {
        use std::io::{BufRead as _, Write as _};
        self.stdin.write_all(b"go\n").expect("asking the prober");
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("prober answer");
        line.trim().to_string()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grant(d: &Daemon, agent: &str, task: &str, port: u16, ttl: &str) {
    let out = d.cli(&[
        "task",
        "start",
        "--agent",
        agent,
        "--task",
        task,
        "--allow-connect",
        &format!("127.0.0.1:{port}"),
        "--ttl",
        ttl,
    ]);
    assert!(out.status.success(), "task start: {}", text(&out.stderr));
}

/// The `status --json` entry of `task` of `agent`.
fn task_status(d: &Daemon, agent: &str, task: &str) -> Value {
    let s = d.status();
    s["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent)
        .and_then(|a| {
            a["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["task"] == task)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no task {task} of {agent} in status: {s:#}"))
}

/// The latest adoption entry in journald for this daemon's pin directory, after `since` of them.
fn adoption_entry(d: &Daemon, since: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits = journal_matching(&[
            format!("MESSAGE_ID={MSG_ADOPTED}"),
            format!("PIN_DIR={}", d.pin_dir.display()),
        ]);
        if hits.len() > since {
            return hits.last().unwrap().clone();
        }
        assert!(
            Instant::now() < deadline,
            "no adoption entry #{} in journald",
            since + 1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 6 "state (agents, tasks, grants) recovered": a `task start` grant lives through a
/// kill -9 (the kernel keeps it) and a restart (the daemon takes it over from its state file:
/// `status` shows it with its time left, `task narrow` and `task end` still revoke it).
#[test]
fn task_grants_survive_kill9_and_restart_and_can_still_be_revoked() {
    if !require_root("task_grants_survive_kill9_and_restart_and_can_still_be_revoked") {
        return;
    }
    let agent = unique_agent("grants");
    let port = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let mut p = Prober::start(&d, &agent, "g1", port);
    assert_eq!(p.connect(), "errno1", "not granted yet");
    grant(&d, &agent, "g1", port, "10m");
    assert_eq!(p.connect(), "ok", "granted");
    let state = std::fs::read_to_string(&d.state_file).expect("the state file is written");
    assert!(state.contains(&format!("127.0.0.1:{port}")), "{state}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&d.state_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the state file is private");

    d.kill9();
    assert_eq!(p.connect(), "ok", "the pinned grant holds without a daemon");
    d.spawn();
    assert_eq!(p.connect(), "ok", "the restarted daemon kept the grant");
    let t = task_status(&d, &agent, "g1");
    assert_eq!(
        t["grants"],
        serde_json::json!([format!("connect 127.0.0.1:{port}")]),
        "{t:#}"
    );
    let left = t["grants_expire_in_ms"].as_u64().expect("time left");
    assert!(
        (500_000..600_000).contains(&left),
        "time left {left} ms of a 10 min grant"
    );
    let adopted = adoption_entry(&d, 0);
    assert_eq!(field(&adopted, "GRANTS_RECOVERED"), "1", "{adopted:#}");
    assert_eq!(field(&adopted, "GRANTS_REVOKED"), "0", "{adopted:#}");
    assert_eq!(field(&adopted, "GRANTS_EXPIRED"), "0", "{adopted:#}");
    assert!(
        d.log().contains("task grants: 1 recovered in 1 task(s)"),
        "{}",
        d.log()
    );

    // Narrowing to nothing after the restart revokes it in the kernel.
    let out = d.cli(&["task", "narrow", "--agent", &agent, "--task", "g1"]);
    assert!(out.status.success(), "task narrow: {}", text(&out.stderr));
    assert_eq!(p.connect(), "errno1", "narrowed away after the restart");

    // A second grant, a second restart, then `task end`.
    grant(&d, &agent, "g1", port, "10m");
    assert_eq!(p.connect(), "ok");
    d.kill9();
    d.spawn();
    assert_eq!(p.connect(), "ok", "recovered again");
    let adopted = adoption_entry(&d, 1);
    assert_eq!(field(&adopted, "GRANTS_RECOVERED"), "1", "{adopted:#}");
    let out = d.cli(&["task", "end", "--agent", &agent, "--task", "g1"]);
    assert!(out.status.success(), "task end: {}", text(&out.stderr));
    assert_eq!(p.connect(), "errno1", "ended after the restart");
    assert_eq!(
        task_status(&d, &agent, "g1")["grants"],
        serde_json::json!([])
    );
    d.wait_audit("denied connect after task end", |v| {
        v["agent_id"] == agent.as_str() && v["task_id"] == "g1" && v["verdict"] == "denied"
    });

    // --uninstall takes the state file of its pin directory with the maps.
    drop(p);
    d.stop();
    assert!(d.state_file.exists());
    let out = d.uninstall();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !d.state_file.exists(),
        "uninstall left the grant state file"
    );
}

/// A grant whose TTL ends while no daemon runs is refused by the kernel at its TTL and is not
/// taken over by the restarted daemon; a fresh install removes a leftover state file.
#[test]
fn grant_that_expired_while_the_daemon_was_away_is_not_recovered() {
    if !require_root("grant_that_expired_while_the_daemon_was_away_is_not_recovered") {
        return;
    }
    let agent = unique_agent("gexp");
    let port = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let mut p = Prober::start(&d, &agent, "g2", port);
    grant(&d, &agent, "g2", port, "3s");
    assert_eq!(p.connect(), "ok", "granted");
    d.kill9();
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        p.connect(),
        "errno1",
        "the kernel ends the grant at its TTL"
    );
    d.spawn();
    assert_eq!(p.connect(), "errno1");
    let t = task_status(&d, &agent, "g2");
    assert_eq!(t["grants"], serde_json::json!([]), "{t:#}");
    assert!(t["grants_expire_in_ms"].is_null(), "{t:#}");
    let adopted = adoption_entry(&d, 0);
    assert_eq!(field(&adopted, "GRANTS_EXPIRED"), "1", "{adopted:#}");
    assert_eq!(field(&adopted, "GRANTS_RECOVERED"), "0", "{adopted:#}");
    assert_eq!(field(&adopted, "GRANTS_REVOKED"), "0", "{adopted:#}");
    let state = std::fs::read_to_string(&d.state_file).unwrap();
    assert!(state.contains("\"tasks\": []"), "rewritten empty: {state}");

    // After an uninstall, a file left for this pin directory describes nothing: a fresh start
    // removes it.
    let leftover = state.clone();
    drop(p);
    d.stop();
    let out = d.uninstall();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&d.state_file, leftover).unwrap();
    d.spawn();
    assert_eq!(d.status()["origin"]["kind"], "installed");
    assert!(
        !d.state_file.exists(),
        "a fresh start kept a leftover state file"
    );
}

/// An unreadable state file costs the grants (revoked: fail closed), never the daemon, and the
/// log and journald say why.
#[test]
fn corrupt_grant_state_file_revokes_grants_and_says_why() {
    if !require_root("corrupt_grant_state_file_revokes_grants_and_says_why") {
        return;
    }
    let agent = unique_agent("gbad");
    let port = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let mut p = Prober::start(&d, &agent, "g3", port);
    grant(&d, &agent, "g3", port, "10m");
    assert_eq!(p.connect(), "ok", "granted");
    d.kill9();
    std::fs::write(&d.state_file, "{ \"version\": 1, \"boot_id\": ").unwrap();
    d.spawn();
    assert_eq!(
        p.connect(),
        "errno1",
        "revoked: the file could not be trusted"
    );
    let t = task_status(&d, &agent, "g3");
    assert_eq!(t["grants"], serde_json::json!([]), "{t:#}");
    let adopted = adoption_entry(&d, 0);
    assert_eq!(field(&adopted, "GRANTS_RECOVERED"), "0", "{adopted:#}");
    assert_eq!(field(&adopted, "GRANTS_REVOKED"), "1", "{adopted:#}");
    let why = field(&adopted, "GRANTS_NOT_RECOVERED_WHY");
    assert!(
        why.starts_with(&format!(
            "{}: not a grant state file",
            d.state_file.display()
        )),
        "{adopted:#}"
    );
    assert!(
        d.log().contains("task grants not recovered") && d.log().contains("not a grant state file"),
        "{}",
        d.log()
    );
    // Granting works again after the restart, and the file is whole again.
    grant(&d, &agent, "g3", port, "10m");
    assert_eq!(p.connect(), "ok");
    let state = std::fs::read_to_string(&d.state_file).unwrap();
    assert!(state.contains(&format!("127.0.0.1:{port}")), "{state}");
}

/// An upgrade (pins of another build) carries the task grants into the new build's maps, and the
/// new daemon takes them over from the state file.
#[test]
fn task_grants_survive_an_upgrade_to_another_build() {
    if !require_root("task_grants_survive_an_upgrade_to_another_build") {
        return;
    }
    let agent = unique_agent("gup");
    let port = listener_v4();
    let mut d = Daemon::start(&[policy(&agent, "enforce", &[], &[PYTHON])]);
    let mut p = Prober::start(&d, &agent, "gu", port);
    grant(&d, &agent, "gu", port, "10m");
    assert_eq!(p.connect(), "ok", "granted");
    d.restart_as_another_build();
    assert_eq!(d.status()["origin"]["replaced_build"], true);
    assert_eq!(p.connect(), "ok", "the grant is in the new build's maps");
    let t = task_status(&d, &agent, "gu");
    assert_eq!(
        t["grants"],
        serde_json::json!([format!("connect 127.0.0.1:{port}")]),
        "{t:#}"
    );
    assert_eq!(field(&adoption_entry(&d, 0), "GRANTS_RECOVERED"), "1");
    let out = d.cli(&["task", "end", "--agent", &agent, "--task", "gu"]);
    assert!(out.status.success(), "task end: {}", text(&out.stderr));
    assert_eq!(p.connect(), "errno1", "ended in the new build's maps");
}
