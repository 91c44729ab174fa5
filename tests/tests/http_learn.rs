//! `policy suggest`, `policy check` and `policy test` on a trail of intercepted requests, through
//! the real binary and real files: the suggestion is a policy the CLI accepts, allows every
//! recorded request, and a later request it does not allow is named with its trail line. Needs
//! no root (nothing is loaded into the kernel).

use std::path::{Path, PathBuf};
use std::process::Output;

use agent_monitor_tests::*;

/// One intercepted request as the daemon's JSON trail writes it (`ACTION=http`).
fn request(line: usize, method: &str, path: &str, verdict: &str) -> String {
    let status = if verdict == "denied" { 403 } else { 200 };
    format!(
        r#"{{"agent_id":"learner","task_id":"t{line}","action":"http","verdict":"{verdict}","pid":10,"uid":0,"comm":"curl","exe":"/usr/bin/curl","dest_addr":"10.1.2.3","dest_port":443,"dest_transport":"tcp","process_chain":[{{"pid":10,"exe":"/usr/bin/curl"}}],"enforcement":null,"reason":"r","message":"m","time":"2026-12-06T08:00:0{line}Z","priority":6,"tls_sni":"api.example.com","http_host":"api.example.com","bytes_in":1,"bytes_out":0,"duration_ms":1,"http_method":"{method}","url_path":"{path}","http_status":{status}}}"#
    )
}

/// `agent-monitor policy test POLICY --events TRAIL`.
fn policy_test(policy: &Path, trail: &Path) -> Output {
    cli(&[
        "policy",
        "test",
        policy.to_str().unwrap(),
        "--events",
        trail.to_str().unwrap(),
    ])
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn suggested_http_rules_pass_check_and_replay_and_a_new_write_is_named() {
    let dir = Scratch(std::env::temp_dir().join(format!("am-http-learn-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let trail = dir.0.join("audit.jsonl");
    let lines = [
        request(1, "GET", "/v1/items/17", "allowed"),
        request(2, "GET", "/v1/items/18/", "allowed"),
        request(3, "POST", "/v1/items", "allowed"),
        request(4, "GET", "/user", "allowed"),
    ];
    std::fs::write(&trail, lines.join("\n") + "\n").unwrap();

    let out = cli(&[
        "policy",
        "suggest",
        "--agent",
        "learner",
        "--events",
        trail.to_str().unwrap(),
        "--widen",
        "paths",
    ]);
    let suggestion = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for wanted in [
        "methods = [\"GET\"]\npaths = [\"/user\", \"/v1/items/*\"]\n",
        "methods = [\"POST\"]\npaths = [\"/v1/items\"]\n",
        "# WIDENED by --widen paths: /v1/items/* (an identifier segment)",
    ] {
        assert!(
            suggestion.contains(wanted),
            "lacks {wanted:?}:\n{suggestion}"
        );
    }
    let policy = dir.0.join("learner.toml");
    std::fs::write(&policy, &suggestion).unwrap();

    let check = cli(&["policy", "check", policy.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", outcome(&check, "check"));

    let replay = policy_test(&policy, &trail);
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        outcome(&replay, "test")
    );

    // Later the agent deletes an item and posts elsewhere: both are named, with their lines.
    let later = dir.0.join("later.jsonl");
    let mut more = lines.to_vec();
    more.push(request(5, "DELETE", "/v1/items/17", "allowed"));
    more.push(request(6, "POST", "/v1/items/17", "allowed"));
    std::fs::write(&later, more.join("\n") + "\n").unwrap();
    let replay = policy_test(&policy, &later);
    assert_eq!(
        replay.status.code(),
        Some(1),
        "{}",
        outcome(&replay, "test")
    );
    let found = text(&replay.stdout);
    let named: Vec<&str> = found.lines().collect();
    assert_eq!(named.len(), 2, "{found}");
    assert!(
        named[0].contains(
            "later.jsonl:5: agent learner task t5: http api.example.com:443 DELETE /v1/items/17"
        ),
        "{found}"
    );
    assert!(named[0].contains("method DELETE not listed"), "{found}");
    assert!(
        named[1].contains(":6: agent learner task t6: http api.example.com:443 POST /v1/items/17"),
        "{found}"
    );
}

#[test]
fn suggest_help_lists_the_paths_widening() {
    let help = text(&cli(&["policy", "suggest", "--help"]).stdout);
    assert!(help.contains("paths"), "{help}");
    assert!(help.contains("Never `/*`"), "{help}");
}
