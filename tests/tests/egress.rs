//! Request rules end to end (`[[network.tls]]`): the kernel redirects an agent's connects to
//! addresses learned for such names to the daemon's egress endpoint, which checks the TLS server
//! name or the HTTP `Host` against the rules and the name the address was learned from. Real
//! clients (curl, python3), real servers (python3 `http.server`, TLS with a test CA made by
//! openssl), names from a real dnsmasq. Run one at a time (`--test-threads=1`).

mod egress_support;

use agent_monitor_tests::*;
use egress_support::*;

#[test]
fn server_name_rules_pass_unchanged_and_domain_fronting_is_refused() {
    if !require_root("server_name_rules_pass_unchanged_and_domain_fronting_is_refused") {
        return;
    }
    let pki = Pki::new();
    assert_path_exists(&pki.file("srv.pem"));
    let server = Server::start("127.0.0.3", Some(&pki));
    let port = server.port;
    let up = Dnsmasq::start(&[
        "--address=/ok.test/127.0.0.3",
        "--address=/other.test/127.0.0.4",
    ]);
    let agent = unique_agent("egress");
    let d = daemon(
        &[policy(
            &agent,
            "enforce",
            &[("ok.test", port), ("other.test", port)],
            &[],
        )],
        &up,
    );
    let ca = ca(&pki);
    let url = format!("https://ok.test:{port}/");
    let front = format!("other.test:{port}:127.0.0.3");
    let r = agent_ops(
        &d,
        &agent,
        &ops(&format!(
            "pyhttps ok.test {port} {ca} peer ok.test {port} curl {url} {ca} - - \
             curl https://other.test:{port}/ {ca} {front} -"
        )),
    );
    // The real server's certificate, verified against the test CA: no interception.
    assert_eq!(r[0]["status"], 200, "{}", r[0]);
    assert_eq!(r[0]["body"], format!("hello ok.test:{port}"));
    assert_eq!(r[0]["cn"], serde_json::json!(["egress-test-server"]));
    // getpeername shows the server; the socket's own address is the flow's loopback source.
    assert_eq!(
        r[1]["peer"],
        serde_json::json!(["127.0.0.3", port]),
        "{}\ndaemon log:\n{}",
        r[1],
        d.log()
    );
    let local = r[1]["local"][0].as_str().unwrap_or("");
    assert!(
        local.starts_with("127.") && local != "127.0.0.1",
        "{}",
        r[1]
    );
    // curl, too.
    assert_eq!(r[2]["rc"], 0, "{}", r[2]);
    assert_eq!(r[2]["body"], format!("hello ok.test:{port}"));
    // Domain fronting: ok.test's address, other.test in the handshake (both have rules, but the
    // address was learned from ok.test): refused.
    assert_ne!(r[3]["rc"], 0, "fronting passed: {}", r[3]);

    let allowed = d.wait_audit("allowed tls connection", |v| {
        is(v, "action", "tls") && is(v, "verdict", "allowed") && is(v, "agent_id", &agent)
    });
    assert_eq!(field(&allowed, "tls_sni"), "ok.test");
    assert_eq!(field(&allowed, "dest_addr"), "127.0.0.3");
    assert_eq!(allowed["dest_port"], port);
    assert_eq!(field(&allowed, "task_id"), "egress");
    assert!(allowed["bytes_in"].as_u64().unwrap_or(0) > 0, "{allowed}");
    assert!(allowed["bytes_out"].as_u64().unwrap_or(0) > 0, "{allowed}");
    assert!(
        field(&allowed, "reason").contains("tls ok.test"),
        "{allowed}"
    );
    let denied = d.wait_audit("refused fronting", |v| {
        is(v, "action", "tls") && is(v, "verdict", "denied") && is(v, "tls_sni", "other.test")
    });
    assert!(
        field(&denied, "reason").contains("domain fronting"),
        "{denied}"
    );
    assert_eq!(field(&denied, "enforcement"), "closed");
    assert_eq!(field(&denied, "dest_addr"), "127.0.0.3");
    let j = wait_journal(&agent, "refused fronting in journald", |e| {
        is(e, "ACTION", "tls") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&j, "TLS_SNI"), "other.test");

    // Control: the same fronting request outside agents works.
    let out = curl_outside(&[
        "--cacert",
        &ca,
        "--resolve",
        &front,
        &format!("https://other.test:{port}/"),
    ]);
    assert!(
        out.status.success(),
        "outside agents: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), format!("hello other.test:{port}"));
    drop(server);
}

#[test]
fn plain_http_host_udp_and_other_protocols_on_a_redirected_port_are_refused() {
    if !require_root("plain_http_host_udp_and_other_protocols_on_a_redirected_port_are_refused") {
        return;
    }
    let server = Server::start("127.0.0.3", None);
    let port = server.port;
    // Control: a host rule without request rules.
    let plain = listener_on("127.0.0.5");
    let up = Dnsmasq::start(&[
        "--address=/ok.test/127.0.0.3",
        "--address=/plain.test/127.0.0.5",
    ]);
    let agent = unique_agent("egresshttp");
    let d = daemon(
        &[policy(
            &agent,
            "enforce",
            &[("ok.test", port)],
            &[format!("plain.test:{plain}")],
        )],
        &up,
    );
    let url = format!("http://ok.test:{port}/");
    let r = agent_ops(
        &d,
        &agent,
        &ops(&format!(
            "curl {url} - - - curl {url} - - evil.test raw ok.test {port} udp ok.test {port} \
             raw plain.test {plain}"
        )),
    );
    assert_eq!(r[0]["rc"], 0, "{}", r[0]);
    assert_eq!(r[0]["body"], format!("hello ok.test:{port}"));
    assert_ne!(r[1]["rc"], 0, "Host evil.test passed: {}", r[1]);
    // Not HTTP: the endpoint closes (or resets) without a byte of the server's.
    assert!(
        r[2]["got"] == 0 || r[2]["error"].as_str().is_some_and(|e| e.contains("reset")),
        "{}",
        r[2]
    );
    // UDP to a destination with request rules (QUIC): refused, so clients use TCP.
    assert_eq!(r[3]["errno"], libc::EPERM, "{}", r[3]);
    // A host rule without request rules is not redirected.
    assert_eq!(r[4]["connected"], true, "{}", r[4]);

    let ok = d.wait_audit("allowed http connection", |v| {
        is(v, "action", "http") && is(v, "verdict", "allowed")
    });
    assert_eq!(field(&ok, "http_host"), "ok.test");
    let host = d.wait_audit("refused Host", |v| {
        is(v, "action", "http") && is(v, "verdict", "denied") && is(v, "http_host", "evil.test")
    });
    assert!(field(&host, "reason").contains("Host evil.test"), "{host}");
    let other = d.wait_audit("refused protocol", |v| {
        is(v, "action", "http")
            && is(v, "verdict", "denied")
            && field(v, "reason").contains("neither TLS nor HTTP")
    });
    assert_eq!(other["dest_port"], port);
    let udp = d.wait_audit("refused datagram", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "denied") && v["dest_port"] == port
    });
    assert!(field(&udp, "reason").contains("QUIC"), "{udp}");
    let control = d.wait_audit("plain host connect", |v| {
        is(v, "action", "connect") && is(v, "verdict", "allowed") && v["dest_port"] == plain
    });
    assert_eq!(field(&control, "dest_host"), "plain.test");
    assert!(
        !d.audit()
            .iter()
            .any(|v| v["dest_port"] == plain && is(v, "action", "http")),
        "the control went through the endpoint"
    );

    // Control: the same bytes outside agents reach the server.
    let out = curl_outside(&[
        "-H",
        "Host: evil.test",
        &format!("http://127.0.0.3:{port}/"),
    ]);
    assert!(
        out.status.success(),
        "outside agents: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "hello evil.test");
}

#[test]
fn alert_mode_reports_fronting_and_lets_it_through() {
    if !require_root("alert_mode_reports_fronting_and_lets_it_through") {
        return;
    }
    let pki = Pki::new();
    let server = Server::start("127.0.0.3", Some(&pki));
    let port = server.port;
    let up = Dnsmasq::start(&[
        "--address=/ok.test/127.0.0.3",
        "--address=/other.test/127.0.0.4",
    ]);
    let agent = unique_agent("egressalert");
    let d = daemon(
        &[policy(
            &agent,
            "alert",
            &[("ok.test", port), ("other.test", port)],
            &[],
        )],
        &up,
    );
    let ca = ca(&pki);
    let front = format!("other.test:{port}:127.0.0.3");
    let r = agent_ops(
        &d,
        &agent,
        &ops(&format!(
            "peer ok.test {port} curl https://other.test:{port}/ {ca} {front} -"
        )),
    );
    assert_eq!(r[1]["rc"], 0, "alert mode lets it through: {}", r[1]);
    assert_eq!(r[1]["body"], format!("hello other.test:{port}"));
    let alert = d.wait_audit("alert for fronting", |v| {
        is(v, "action", "tls") && is(v, "verdict", "alert") && is(v, "tls_sni", "other.test")
    });
    assert!(
        field(&alert, "reason").contains("alert mode: passed unchanged"),
        "{alert}"
    );
    assert!(alert["bytes_in"].as_u64().unwrap_or(0) > 0, "{alert}");
}

#[test]
fn method_and_path_rules_are_judged_per_request_through_interception() {
    if !require_root("method_and_path_rules_are_judged_per_request_through_interception") {
        return;
    }
    let site = HelloSite::start("http", |agent, rules| {
        let (name, text) = policy(agent, "enforce", &[], &[]);
        (name, text + rules)
    });
    let (d, agent, port) = (&site.d, site.agent.as_str(), site.port);
    // One connection: an allowed GET, a POST (method not allowed), a GET outside the paths, and
    // an allowed GET again on the same connection.
    let r = agent_ops(
        &d,
        &agent,
        &ops(&format!(
            "reqs ok.test {port} GET:/allowed/x POST:/allowed/x GET:/other GET:/allowed/y end"
        )),
    );
    let got = r[0]["got"].as_array().cloned().unwrap_or_default();
    let status = |i: usize| got.get(i).and_then(|g| g[0].as_u64()).unwrap_or(0);
    let body = |i: usize| {
        got.get(i)
            .and_then(|g| g[1].as_str())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(status(0), 200, "{r:?}\ndaemon log:\n{}", d.log());
    assert_eq!(body(0), format!("hello ok.test:{port}"));
    assert_eq!(status(1), 403, "{r:?}");
    assert!(
        body(1).contains("agent-monitor") && body(1).contains(&agent),
        "{r:?}"
    );
    assert_eq!(status(2), 403, "{r:?}");
    assert_eq!(status(3), 200, "{r:?}");
    let allowed = d.wait_audit("allowed request", |v| {
        is(v, "action", "http") && is(v, "verdict", "allowed") && is(v, "url_path", "/allowed/x")
    });
    assert_eq!(field(&allowed, "http_method"), "GET");
    assert_eq!(allowed["http_status"], 200);
    assert_eq!(field(&allowed, "tls_sni"), "ok.test");
    assert_eq!(field(&allowed, "task_id"), "egress");
    let denied = d.wait_audit("denied POST", |v| {
        is(v, "action", "http") && is(v, "verdict", "denied") && is(v, "http_method", "POST")
    });
    assert_eq!(denied["http_status"], 403);
    assert_eq!(field(&denied, "url_path"), "/allowed/x");
    let j = wait_journal(&agent, "denied request in journald", |e| {
        is(e, "ACTION", "http") && is(e, "VERDICT", "denied") && is(e, "URL_PATH", "/other")
    });
    assert_eq!(field(&j, "HTTP_STATUS"), "403");
    // Control: the same POST outside agents reaches the server.
    site.assert_reached_outside_agents(&["-d", "x"], "/allowed/x");
    drop(site);
}

/// Learning request rules on real interception: record requests under a catch-all
/// `[[network.http]]` rule, `policy suggest --merge` them (with `--widen paths`) into the policy
/// without it, and enforce the result: what was recorded (and the widened reads) passes, a write
/// that was not recorded gets a 403.
#[test]
fn recorded_requests_become_suggested_rules_that_interception_enforces() {
    if !require_root("recorded_requests_become_suggested_rules_that_interception_enforces") {
        return;
    }
    let pki = Pki::new();
    let server = Server::start("127.0.0.3", Some(&pki));
    let port = server.port;
    let up = Dnsmasq::start(&["--address=/ok.test/127.0.0.3"]);
    let agent = unique_agent("learnhttp");
    let (name, base) = policy(&agent, "enforce", &[], &[]);
    let recording = format!(
        "{base}[[network.http]]\nhost = \"ok.test\"\nport = {port}\nmethods = [\"*\"]\npaths = [\"/*\"]\n"
    );
    let ca_dir = tempfile::tempdir().unwrap();
    let upstream_ca = ca(&pki);
    let addr = up.addr.to_string();
    let ca_dir_arg = ca_dir.path().display().to_string();
    let args = [
        "--dns-upstream",
        addr.as_str(),
        "--ca-dir",
        ca_dir_arg.as_str(),
        "--upstream-ca-bundle",
        upstream_ca.as_str(),
    ];
    let work = tempfile::tempdir().unwrap();
    let trail = work.path().join("recorded.jsonl");
    {
        let mut d = Daemon::start_with(&[(name.clone(), recording)], &args);
        let r = agent_ops(
            &d,
            &agent,
            &ops(&format!(
                "reqs ok.test {port} GET:/items/1 GET:/items/2 POST:/items GET:/about end"
            )),
        );
        let got = r[0]["got"].as_array().cloned().unwrap_or_default();
        let statuses: Vec<u64> = got.iter().map(|g| g[0].as_u64().unwrap_or(0)).collect();
        assert_eq!(statuses, [200, 200, 200, 200], "{r:?}\n{}", d.log());
        d.wait_audit("the last request", |v| {
            is(v, "action", "http") && is(v, "url_path", "/about")
        });
        d.stop();
        std::fs::copy(&d.json_log, &trail).unwrap();
    }

    let base_file = work.path().join(&name);
    std::fs::write(&base_file, &base).unwrap();
    let out = cli(&[
        "policy",
        "suggest",
        "--agent",
        &agent,
        "--events",
        trail.to_str().unwrap(),
        "--widen",
        "paths",
        "--merge",
        base_file.to_str().unwrap(),
    ]);
    let merged = text(&out.stdout);
    eprintln!("suggest --merge said:\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for wanted in [
        "methods = [\"GET\"]\npaths = [\"/about\", \"/items/*\"]\n",
        "methods = [\"POST\"]\npaths = [\"/items\"]\n",
    ] {
        assert!(merged.contains(wanted), "lacks {wanted:?}:\n{merged}");
    }
    let merged_file = work.path().join("merged.toml");
    std::fs::write(&merged_file, &merged).unwrap();
    let replay = cli(&[
        "policy",
        "test",
        merged_file.to_str().unwrap(),
        "--events",
        trail.to_str().unwrap(),
    ]);
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        outcome(&replay, "test")
    );

    let d = Daemon::start_with(&[(name, merged.clone())], &args);
    let r = agent_ops(
        &d,
        &agent,
        &ops(&format!(
            "reqs ok.test {port} GET:/items/3 POST:/items POST:/items/1 DELETE:/items/1 end"
        )),
    );
    let got = r[0]["got"].as_array().cloned().unwrap_or_default();
    let statuses: Vec<u64> = got.iter().map(|g| g[0].as_u64().unwrap_or(0)).collect();
    assert_eq!(
        statuses,
        [200, 200, 403, 403],
        "{r:?}\n{merged}\n{}",
        d.log()
    );
    drop(server);
}
