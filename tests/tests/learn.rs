//! The audit → learn → enforce loop on the real kernel: record a workload in alert mode with an
//! empty allowlist, suggest a policy from the JSON trail, enforce it, and check that the same
//! workload runs without a denial while a new action is denied. Run with `--test-threads=1`.

use std::path::Path;

use agent_monitor_tests::*;
use serde_json::Value;

/// The workload: sh starts python3, which connects to 127.0.0.1:PORT and runs PROGRAM.
/// Exit 0: both worked; 10 + errno: the connect failed; 50: PROGRAM did not exit 0 (killed: -9).
const WORKLOAD: &str = r#"
import socket, subprocess, sys
port, program = int(sys.argv[1]), sys.argv[2]
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    print("connected", port)
except OSError as e:
    print("connect errno", e.errno)
    sys.exit(10 + e.errno)
r = subprocess.run([program])
print("program", program, "returncode", r.returncode)
sys.exit(0 if r.returncode == 0 else 50)
"#;

fn workload(
    d: &Daemon,
    agent: &str,
    task: &str,
    script: &Path,
    port: u16,
    program: &str,
) -> (Option<i32>, String) {
    let line = format!("{PYTHON} {} {port} {program}", script.display());
    let out = d.run(agent, Some(task), &[SH, "-c", &line]);
    (
        out.status.code(),
        format!(
            "stdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        ),
    )
}

fn of_agent<'a>(audit: &'a [Value], agent: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    audit.iter().filter(move |v| field(v, "agent_id") == agent)
}

#[test]
fn record_suggest_enforce_then_a_new_action_is_denied() {
    if !require_root("record_suggest_enforce_then_a_new_action_is_denied") {
        return;
    }
    let agent = unique_agent("learn");
    let port = listener_v4();
    let other_port = listener_v4();
    let work = tempfile::tempdir().expect("tempdir");
    let script = work.path().join("workload.py");
    std::fs::write(&script, WORKLOAD).unwrap();

    // 1. Record: alert mode, empty allowlist. Everything happens and is reported.
    let recording = format!("agent = {agent:?}\nmode = \"alert\"\n");
    let mut d1 = Daemon::start(&[(format!("{agent}.toml"), recording)]);
    let (code, out) = workload(&d1, &agent, "rec", &script, port, "/bin/true");
    assert_eq!(code, Some(0), "recording run failed:\n{out}");
    d1.wait_audit("recorded connect", |v| {
        field(v, "agent_id") == agent && field(v, "action") == "connect" && v["dest_port"] == port
    });
    d1.wait_audit("recorded exec of /bin/true", |v| {
        field(v, "agent_id") == agent && field(v, "exe") == "/bin/true"
    });
    d1.stop();
    let recorded = d1.audit();
    assert!(
        of_agent(&recorded, &agent).all(|v| field(v, "verdict") == "alert"),
        "empty allowlist in alert mode: every action is an alert: {recorded:#?}"
    );

    // 2. Suggest from the trail; it parses and the recording replays clean against it.
    let trail = d1.json_log.clone();
    let out = cli(&[
        "policy",
        "suggest",
        "--agent",
        &agent,
        "--events",
        trail.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "suggest failed: {}",
        text(&out.stderr)
    );
    let suggestion = text(&out.stdout);
    for wanted in [
        format!("\"127.0.0.1:{port}\""),
        "\"/bin/true\"".to_string(),
        format!("\"{PYTHON}\""),
        format!("\"{SH}\""),
        "mode = \"enforce\"".to_string(),
        "# tasks: rec".to_string(),
        format!("{SH} > {PYTHON}\n"),
    ] {
        assert!(
            suggestion.contains(&wanted),
            "suggestion lacks {wanted}:\n{suggestion}"
        );
    }
    assert!(
        !suggestion.contains(&other_port.to_string()),
        "{suggestion}"
    );
    let policy_file = work.path().join(format!("{agent}.toml"));
    std::fs::write(&policy_file, &suggestion).unwrap();
    let check = cli(&["policy", "check", policy_file.to_str().unwrap()]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let replay = cli(&[
        "policy",
        "test",
        policy_file.to_str().unwrap(),
        "--events",
        trail.to_str().unwrap(),
    ]);
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}{}",
        text(&replay.stdout),
        text(&replay.stderr)
    );

    // 3. Enforce the suggestion: the same workload runs without a single denial.
    let d2 = Daemon::start(&[(format!("{agent}.toml"), suggestion.clone())]);
    let (code, out) = workload(&d2, &agent, "enforced", &script, port, "/bin/true");
    assert_eq!(
        code,
        Some(0),
        "the recorded workload failed under its own suggestion:\n{out}\n{suggestion}"
    );
    d2.wait_audit("allowed exec of /bin/true", |v| {
        field(v, "agent_id") == agent
            && field(v, "exe") == "/bin/true"
            && field(v, "verdict") == "allowed"
    });
    let denials: Vec<Value> = of_agent(&d2.audit(), &agent)
        .filter(|v| field(v, "verdict") != "allowed")
        .cloned()
        .collect();
    assert!(
        denials.is_empty(),
        "recorded actions not allowed by the suggestion: {denials:#?}\n{suggestion}"
    );

    // 4. Something new is denied: another port (EPERM), another program (killed).
    let (code, out) = workload(&d2, &agent, "new", &script, other_port, "/bin/true");
    assert_eq!(
        code,
        Some(10 + libc::EPERM),
        "a new port was not refused:\n{out}"
    );
    let (code, out) = workload(&d2, &agent, "new", &script, port, "/usr/bin/id");
    assert_eq!(code, Some(50), "a new program was not stopped:\n{out}");
    assert!(out.contains("returncode -9"), "{out}");
    d2.wait_audit("denied connect", |v| {
        field(v, "agent_id") == agent
            && field(v, "verdict") == "denied"
            && v["dest_port"] == other_port
    });
    d2.wait_audit("denied exec", |v| {
        field(v, "agent_id") == agent
            && field(v, "verdict") == "denied"
            && field(v, "exe") == "/usr/bin/id"
    });

    // 5. `policy test` on the enforced trail names exactly the two new actions, with their lines.
    let replay = cli(&[
        "policy",
        "test",
        policy_file.to_str().unwrap(),
        "--events",
        d2.json_log.to_str().unwrap(),
    ]);
    let listed = text(&replay.stdout);
    assert_eq!(
        replay.status.code(),
        Some(1),
        "{listed}{}",
        text(&replay.stderr)
    );
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].contains(&format!("connect 127.0.0.1:{other_port}")),
        "{listed}"
    );
    assert!(lines[1].contains("exec /usr/bin/id"), "{listed}");
    assert!(
        lines.iter().all(|l| l.contains("would be DENIED")),
        "{listed}"
    );
    assert!(
        lines[0].starts_with(&format!("{}:", d2.json_log.display())),
        "{listed}"
    );

    // 6. Merging the enforced trail into the suggestion adds those two and nothing else.
    let merged = cli(&[
        "policy",
        "suggest",
        "--agent",
        &agent,
        "--events",
        d2.json_log.to_str().unwrap(),
        "--merge",
        policy_file.to_str().unwrap(),
    ]);
    assert_eq!(merged.status.code(), Some(0), "{}", text(&merged.stderr));
    let diff = text(&merged.stderr);
    let added: Vec<&str> = diff.lines().filter(|l| l.starts_with("+ [")).collect();
    assert_eq!(
        added,
        [
            format!("+ [network] allow \"127.0.0.1:{other_port}\""),
            "+ [exec] allow \"/usr/bin/id\"".to_string()
        ],
        "{diff}"
    );
    assert!(text(&merged.stdout).starts_with(&suggestion[..suggestion.find("[network]").unwrap()]));
}
