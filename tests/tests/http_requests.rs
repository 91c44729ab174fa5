//! Method and path rules (`[[network.http]]`) end to end with real clients through the kernel's
//! redirect: the agent's connect goes to the egress endpoint, which hands the connection to
//! interception; each request is judged and reported. Alert mode forwarding, git over HTTPS
//! (clone allowed, push refused), curl's keep-alive and HTTP/2 judged per request. Servers are
//! python3 (`http.server`, `git http-backend`) with a test CA made by openssl; names come from a
//! real dnsmasq. Run one at a time (`--test-threads=1`).

mod egress_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use egress_support::*;
use serde_json::Value;

const CURL: &str = "/usr/bin/curl";

/// An agent allowed to run `exec`, with these request rules and nothing else on the network.
fn http_policy(agent: &str, mode: &str, exec: &[&str], rules: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = []\n[exec]\nallow = {exec:?}\n\
             [dns]\nprivate_answers = [\"*.test\"]\n{rules}"
        ),
    )
}

/// curl as `agent` (trusting the bundle `run` hands it): each URL after the first follows a
/// `--next` with the same options; `-w` prints `|STATUS CONNECTS VERSION` after each body.
fn agent_curl(d: &Daemon, agent: &str, options: &[&str], urls: &[String]) -> Output {
    let mut cmd = vec![CURL];
    for (i, url) in urls.iter().enumerate() {
        if i > 0 {
            cmd.push("--next");
        }
        cmd.extend(["-sS", "--max-time", "10"]);
        cmd.extend(["-w", "|%{http_code} %{num_connects} %{http_version}\n"]);
        cmd.extend(options);
        cmd.push(url);
    }
    let out = d.run(agent, Some("curl"), &cmd);
    eprintln!(
        "{agent}: curl {options:?} {urls:?}\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Asserts that `want` occur in `got` in this order.
fn assert_in_order(got: &str, want: &[&str]) {
    let mut at = 0;
    for w in want {
        let found = got[at..].find(w);
        assert!(found.is_some(), "{w:?} after byte {at} in {got}");
        at += found.unwrap_or(0) + w.len();
    }
}

fn audit_http(d: &Daemon, agent: &str, verdict: &str, method: &str, path: &str) -> Value {
    d.wait_audit(&format!("{verdict} {method} {path}"), |v| {
        is(v, "agent_id", agent)
            && is(v, "action", "http")
            && is(v, "verdict", verdict)
            && is(v, "http_method", method)
            && is(v, "url_path", path)
    })
}

fn journal_http(agent: &str, verdict: &str, method: &str, path: &str) -> Value {
    wait_journal(agent, &format!("{verdict} {method} {path}"), |e| {
        is(e, "ACTION", "http")
            && is(e, "VERDICT", verdict)
            && is(e, "HTTP_METHOD", method)
            && is(e, "URL_PATH", path)
    })
}

#[test]
fn alert_mode_forwards_requests_off_the_rules_and_reports_them() {
    if !require_root("alert_mode_forwards_requests_off_the_rules_and_reports_them") {
        return;
    }
    let site = HelloSite::start("httpalert", |agent, rules| {
        http_policy(agent, "alert", &[CURL], rules)
    });
    let (d, agent, port) = (&site.d, site.agent.as_str(), site.port);
    let base = format!("https://ok.test:{port}");
    // A POST (method not listed) and a GET of an unlisted path, each its own connection.
    let post = agent_curl(&d, &agent, &["-d", "x"], &[format!("{base}/allowed/x")]);
    let get = agent_curl(&d, &agent, &[], &[format!("{base}/other")]);
    let hello = format!("hello ok.test:{port}");
    for out in [&post, &get] {
        assert!(
            out.status.success(),
            "alert mode lets it through: {}\ndaemon log:\n{}",
            text(&out.stderr),
            d.log()
        );
        assert_in_order(&text(&out.stdout), &[&hello, "|200 1 "]);
    }

    let posted = audit_http(&d, &agent, "alert", "POST", "/allowed/x");
    assert_eq!(posted["http_status"], 200, "the server's answer: {posted}");
    assert_eq!(field(&posted, "tls_sni"), "ok.test");
    assert_eq!(field(&posted, "http_host"), format!("ok.test:{port}"));
    assert_eq!(field(&posted, "dest_addr"), "127.0.0.3");
    assert_eq!(field(&posted, "task_id"), "curl");
    assert_eq!(posted["bytes_out"], 1, "{posted}");
    assert_eq!(posted["bytes_in"], hello.len(), "{posted}");
    assert!(posted["duration_ms"].is_u64(), "{posted}");
    assert_eq!(
        field(&posted, "enforcement"),
        "",
        "nothing was refused: {posted}"
    );
    let reason = field(&posted, "reason");
    assert!(
        reason.contains("method POST not listed") && reason.contains("alert mode: forwarded"),
        "{posted}"
    );
    let other = audit_http(&d, &agent, "alert", "GET", "/other");
    assert_eq!(other["http_status"], 200, "{other}");
    assert!(field(&other, "reason").contains("/other"), "{other}");

    let j = journal_http(&agent, "alert", "POST", "/allowed/x");
    assert_eq!(field(&j, "HTTP_STATUS"), "200");
    assert_eq!(field(&j, "TLS_SNI"), "ok.test");
    assert_eq!(field(&j, "BYTES_OUT"), "1");
    let j = journal_http(&agent, "alert", "GET", "/other");
    assert_eq!(field(&j, "HTTP_STATUS"), "200");
    assert_eq!(field(&j, "HTTP_HOST"), format!("ok.test:{port}"));
    drop(site);
}

/// git, preferring the one first on PATH, and the directory of its helper programs.
fn git_install() -> (PathBuf, String) {
    let bin = ["/usr/local/bin/git", "/usr/bin/git"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("git is installed");
    let out = Command::new(&bin).arg("--exec-path").output().unwrap();
    (bin, text(&out.stdout).trim().to_string())
}

/// git outside agents, as the test's own user.
fn git_outside(git: &Path, dir: &Path, args: &[&str]) -> Output {
    git_outside_with(git, dir, args, &[])
}

fn git_outside_with(git: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(git)
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} outside agents: {}",
        text(&out.stderr)
    );
    out
}

#[test]
fn git_clone_is_allowed_and_push_refused_through_the_kernel_redirect() {
    if !require_root("git_clone_is_allowed_and_push_refused_through_the_kernel_redirect") {
        return;
    }
    let (git, exec_path) = git_install();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A bare repository with one commit, served over TLS by git http-backend.
    git_outside(&git, w, &["init", "-q", "-b", "main", "--bare", "repo.git"]);
    git_outside(&git, w, &["init", "-q", "-b", "main", "src"]);
    std::fs::write(w.join("src/README"), "hello").unwrap();
    git_outside(&git, &w.join("src"), &["add", "README"]);
    git_outside(&git, &w.join("src"), &["commit", "-qm", "one"]);
    git_outside(
        &git,
        &w.join("src"),
        &["push", "-q", "../repo.git", "HEAD:refs/heads/main"],
    );
    let pki = Pki::new();
    let server = Server::git("127.0.0.3", &pki, w);
    let port = server.port;
    let up = Dnsmasq::start(&["--address=/ok.test/127.0.0.3"]);
    let agent = unique_agent("httpgit");
    let ca_dir = tempfile::tempdir().unwrap();
    // Clone and fetch: the refs and upload-pack; not receive-pack (push).
    let rules = http_rule(
        "ok.test",
        port,
        &["GET", "POST"],
        &["/repo.git/info/refs", "/repo.git/git-upload-pack"],
    );
    let helpers = format!("{exec_path}/*");
    let git_s = git.display().to_string();
    let d = intercepting_daemon(
        &[http_policy(
            &agent,
            "enforce",
            &[&git_s, &helpers, "/usr/bin/env"],
            &rules,
        )],
        &up,
        &pki,
        ca_dir.path(),
    );
    let url = format!("https://ok.test:{port}/repo.git");
    let clone = w.join("clone");
    let clone_s = clone.display().to_string();
    let out = d.run(
        &agent,
        Some("git"),
        &[&git_s, "clone", "-q", &url, &clone_s],
    );
    assert!(
        out.status.success(),
        "clone through interception: {}\ndaemon log:\n{}",
        text(&out.stderr),
        d.log()
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello"
    );
    std::fs::write(clone.join("README"), "changed").unwrap();
    git_outside(&git, &clone, &["commit", "-qam", "two"]);

    // The push: its refs are read, its pack (POST git-receive-pack) gets the 403. git does not
    // print an error's body; its curl trace does.
    let out = d.run(
        &agent,
        Some("git"),
        &[
            "/usr/bin/env",
            "GIT_TRACE_CURL=1",
            "GIT_TERMINAL_PROMPT=0",
            &git_s,
            "-C",
            &clone_s,
            "push",
            "origin",
            "HEAD:main",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "push through interception passed");
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    // The trace shows received bytes in slices of one line each.
    let received: String = stderr
        .lines()
        .filter_map(|l| l.split_once("<= Recv data: ").map(|(_, data)| data))
        .collect();
    assert!(
        received.contains(&format!(
            "agent-monitor denied this request for agent {agent}: no [[network.http]] rule \
             allows POST /repo.git/git-receive-pack"
        )),
        "the 403 names agent-monitor, the agent and the request: {stderr}"
    );

    let fetched = audit_http(&d, &agent, "allowed", "POST", "/repo.git/git-upload-pack");
    assert_eq!(fetched["http_status"], 200, "{fetched}");
    assert!(fetched["bytes_in"].as_u64().unwrap_or(0) > 0, "{fetched}");
    let pushed = audit_http(&d, &agent, "denied", "POST", "/repo.git/git-receive-pack");
    assert_eq!(pushed["http_status"], 403, "{pushed}");
    assert_eq!(field(&pushed, "enforcement"), "http 403");
    assert_eq!(field(&pushed, "task_id"), "git");
    let j = journal_http(&agent, "denied", "POST", "/repo.git/git-receive-pack");
    assert_eq!(field(&j, "HTTP_STATUS"), "403");

    // Control: the same push outside agents, straight to the server, goes through.
    let resolve = format!("http.curloptResolve=ok.test:{port}:127.0.0.3");
    git_outside_with(
        &git,
        &clone,
        &["-c", &resolve, "push", "-q", "origin", "HEAD:main"],
        &[("GIT_SSL_CAINFO", &ca(&pki))],
    );
    let head = git_outside(
        &git,
        &w.join("repo.git"),
        &["log", "-1", "--format=%s", "main"],
    );
    assert_eq!(text(&head.stdout).trim(), "two");
    drop(server);
}

#[test]
fn curl_keep_alive_and_http2_are_judged_per_request_through_the_kernel_redirect() {
    if !require_root("curl_keep_alive_and_http2_are_judged_per_request_through_the_kernel_redirect")
    {
        return;
    }
    let site = HelloSite::start("httpkeep", |agent, rules| {
        http_policy(agent, "enforce", &[CURL], rules)
    });
    let (d, agent, port) = (&site.d, site.agent.as_str(), site.port);
    let allowed = format!("https://ok.test:{port}/allowed/x");
    let denied = format!("https://ok.test:{port}/other");
    let hello = format!("hello ok.test:{port}");
    let refusal = format!("agent-monitor denied this request for agent {agent}");
    for (proto, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        // Two URLs on one connection (curl reuses it: no new connect for the second), the
        // second refused, then the first again.
        let out = agent_curl(
            &d,
            &agent,
            &[proto],
            &[allowed.clone(), denied.clone(), allowed.clone()],
        );
        assert!(
            out.status.success(),
            "curl {proto}: {}\ndaemon log:\n{}",
            text(&out.stderr),
            d.log()
        );
        assert_in_order(
            &text(&out.stdout),
            &[
                &hello,
                &format!("|200 1 {version}\n"),
                &refusal,
                "/other",
                &format!("|403 0 {version}\n"),
                &hello,
                &format!("|200 0 {version}\n"),
            ],
        );
    }

    let count = |verdict: &str, path: &str| {
        d.audit()
            .iter()
            .filter(|v| {
                is(v, "agent_id", &agent)
                    && is(v, "action", "http")
                    && is(v, "verdict", verdict)
                    && is(v, "url_path", path)
            })
            .count()
    };
    let refused = audit_http(&d, &agent, "denied", "GET", "/other");
    assert_eq!(refused["http_status"], 403, "{refused}");
    assert_eq!(field(&refused, "tls_sni"), "ok.test");
    // Each request is its own action: four allowed, two refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("allowed", "/allowed/x") != 4 || count("denied", "/other") != 2 {
        assert!(
            Instant::now() < deadline,
            "not every request was reported:\n{:#?}",
            d.audit()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let j = journal_http(&agent, "denied", "GET", "/other");
    assert_eq!(field(&j, "HTTP_STATUS"), "403");

    // Control: the refused URL outside agents reaches the server.
    site.assert_reached_outside_agents(&[], "/other");
    drop(site);
}

/// Ask mode does not hold an HTTP request for an operator: a request off the rules gets the 403
/// at once, as in enforce mode, and nothing is pending.
#[test]
fn ask_mode_refuses_requests_off_the_rules_without_holding_them() {
    if !require_root("ask_mode_refuses_requests_off_the_rules_without_holding_them") {
        return;
    }
    let site = HelloSite::start("httpask", |agent, rules| {
        http_policy(agent, "ask", &[CURL], rules)
    });
    let (d, agent, port) = (&site.d, site.agent.as_str(), site.port);
    let allowed = format!("https://ok.test:{port}/allowed/x");
    let out = agent_curl(d, agent, &["-d", "x"], &[allowed.clone()]);
    assert!(
        out.status.success(),
        "{}\ndaemon log:\n{}",
        text(&out.stderr),
        d.log()
    );
    assert_in_order(
        &text(&out.stdout),
        &[
            &format!("agent-monitor denied this request for agent {agent}"),
            "method POST not listed",
            "|403 1 ",
        ],
    );
    let refused = audit_http(d, agent, "denied", "POST", "/allowed/x");
    assert_eq!(field(&refused, "enforcement"), "http 403");
    let pending = d.cli(&["pending", "--json"]);
    assert!(pending.status.success(), "{}", text(&pending.stderr));
    assert!(
        !text(&pending.stdout).contains("ok.test"),
        "nothing is held: {}",
        text(&pending.stdout)
    );
    // Control: the allowed request of the same agent passes.
    let out = agent_curl(d, agent, &[], &[allowed]);
    assert_in_order(
        &text(&out.stdout),
        &[&format!("hello ok.test:{port}"), "|200 1 "],
    );
    // Control: the refused POST outside agents reaches the server.
    site.assert_reached_outside_agents(&["-d", "x"], "/allowed/x");
    drop(site);
}
