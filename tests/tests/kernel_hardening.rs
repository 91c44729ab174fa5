//! Kernel-side hardening (issue 13): an alert-mode agent cannot make an off-list action happen
//! unrecorded by flooding the ring buffer first; a connected UDP socket's datagrams sent with
//! control messages (and no address) are judged as its connected peer.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

fn policy(agent: &str, mode: &str, net: &[String], exec: &[&str]) -> (String, String) {
    let q = |v: Vec<String>| v.join(", ");
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
            q(net.iter().map(|s| format!("{s:?}")).collect()),
            q(exec.iter().map(|s| format!("{s:?}")).collect())
        ),
    )
}

/// The outcome `name` printed by a PY_ATTEMPT script.
fn outcome(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no outcome for {name}; stdout:\n{stdout}"))
}

fn eperm() -> String {
    format!("errno {}", libc::EPERM)
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

/// The three kinds of off-list action an alert-mode agent might try after a flood: a connect to
/// a forbidden listener, a socket kind agents may not have (MPTCP), an exec of a program off the
/// list (`/bin/touch MARKER`, so that running it leaves a trace).
fn off_list_actions(forbidden: u16, marker: &str) -> String {
    format!(
        "attempt('connect_off_list', lambda: socket.create_connection(('127.0.0.1', {forbidden}), timeout=2))\n\
         attempt('socket_off_list', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))\n\
         r = subprocess.run(['/bin/touch', {marker:?}])\n\
         print('exec_off_list', r.returncode, flush=True)\n"
    )
}

/// An alert-mode agent floods the ring buffer with allowed datagrams while the daemon cannot
/// drain it (stopped), then tries an off-list connect, socket and exec. None may happen without a
/// record: with the buffer full each is refused as enforce mode would (EPERM, SIGKILL for the
/// exec) and counted in `alerts_refused_unrecordable`. The flood's allowed sends all proceed.
/// Control: the same off-list actions without a flood happen and are recorded as alerts.
#[test]
fn alert_mode_off_list_actions_are_refused_when_a_flood_leaves_no_room_to_record_them() {
    if !require_root(
        "alert_mode_off_list_actions_are_refused_when_a_flood_leaves_no_room_to_record_them",
    ) {
        return;
    }
    let agent = unique_agent("alertflood");
    let sink = UdpSink::bind("127.0.0.1:0");
    let forbidden = CountingListener::bind("127.0.0.1:0");
    let mut d = Daemon::start(&[policy(
        &agent,
        "alert",
        &[format!("127.0.0.1:{}", sink.port)],
        &[PYTHON],
    )]);
    let daemon_pid = d.pid();
    let go = d.dir.path().join("go");
    let marker = d.dir.path().join("ran-under-flood");
    // 250,000 datagram records (104 bytes each in the ring) are three times the 8 MiB ring
    // buffer (`RecordKind::record_size`).
    const N: usize = 250_000;
    let script = format!(
        "{PY_ATTEMPT}\
         while not os.path.exists({go:?}): time.sleep(0.05)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         ok = 0\n\
         for i in range({N}):\n\
         \x20   try:\n\
         \x20       s.sendto(b'x', ('127.0.0.1', {sink}))\n\
         \x20       ok += 1\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print('flood_sent', ok, flush=True)\n\
         {actions}",
        go = go.display().to_string(),
        sink = sink.port,
        actions = off_list_actions(forbidden.port, &marker.display().to_string()),
    );
    let child = Command::new(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args([
            "--agent", &agent, "--task", "fl", "--", PYTHON, "-c", &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
        stdout.contains(&format!("flood_sent {N}")),
        "allowed sends must proceed under a flood: {stdout} {}",
        text(&out.stderr)
    );
    assert_eq!(outcome(&stdout, "connect_off_list"), eperm(), "{stdout}");
    assert_eq!(outcome(&stdout, "socket_off_list"), eperm(), "{stdout}");
    assert_eq!(
        outcome(&stdout, "exec_off_list"),
        format!("-{}", libc::SIGKILL),
        "{stdout}"
    );
    assert_eq!(forbidden.accepted(), 0, "the off-list connect got through");
    assert!(!marker.exists(), "the off-list program ran");

    // Drained (the count of the agent's records stops moving), the trail holds no alert: none
    // of the refused actions happened, and none is claimed to have.
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
    let alerts: Vec<Value> = d
        .audit()
        .into_iter()
        .filter(|r| r["agent_id"] == agent.as_str() && r["verdict"] == "alert")
        .collect();
    assert!(alerts.is_empty(), "{alerts:#?}");
    let st = d.status();
    let c = &st["counters"];
    assert_eq!(c["alerts_refused_unrecordable"], 3, "{st:#}");
    assert!(c["actions_lost"].as_u64().unwrap() >= 3 + 1, "{st:#}");

    // Control: no flood, the same off-list actions happen and are recorded as alerts.
    let marker2 = d.dir.path().join("ran-without-flood");
    let out = d.run(
        &agent,
        None,
        &[
            PYTHON,
            "-c",
            &format!(
                "{PY_ATTEMPT}{}",
                off_list_actions(forbidden.port, &marker2.display().to_string())
            ),
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(outcome(&stdout, "connect_off_list"), "ok", "{stdout}");
    assert_eq!(outcome(&stdout, "socket_off_list"), "ok", "{stdout}");
    assert_eq!(outcome(&stdout, "exec_off_list"), "0", "{stdout}");
    assert_eq!(forbidden.accepted(), 1);
    assert!(marker2.exists());
    for (what, action) in [
        ("connect", "connect"),
        ("socket", "socket"),
        ("exec", "exec"),
    ] {
        d.wait_audit(&format!("alert for the off-list {what}"), |v| {
            v["agent_id"] == agent.as_str() && is(v, "action", action) && is(v, "verdict", "alert")
        });
    }
    assert_eq!(
        d.status()["counters"]["alerts_refused_unrecordable"],
        3,
        "nothing is refused when the records fit"
    );
    d.stop();
}

/// A connected UDP socket sending with a control message and no address (`IP_TOS`, `IP_TTL`,
/// `IPV6_TCLASS`, as QUIC stacks send every datagram): the kernel runs the sendmsg hook with an
/// empty address; the datagram goes to the connected peer and is judged as it. IPv4, IPv6 and an
/// IPv6 socket connected to an IPv4-mapped address. A peer the agent may not reach (a socket
/// connected outside the agent and handed in) is refused, and the record names that peer.
/// Control: outside agents the same sends arrive.
#[test]
fn connected_udp_send_with_control_messages_is_judged_as_its_peer() {
    if !require_root("connected_udp_send_with_control_messages_is_judged_as_its_peer") {
        return;
    }
    let agent = unique_agent("udpcmsg");
    let allowed = UdpSink::bind("127.0.0.1:0");
    let denied = UdpSink::bind("127.0.0.1:0");
    let allowed6 = std::net::UdpSocket::bind("[::1]:0")
        .ok()
        .map(|_| UdpSink::bind("[::1]:0"));
    let mut net = vec![format!("127.0.0.1:{}", allowed.port)];
    if let Some(a6) = &allowed6 {
        net.push(format!("[::1]:{}", a6.port));
    }
    let d = Daemon::start(&[policy(&agent, "enforce", &net, &[PYTHON])]);
    let v6 = match &allowed6 {
        Some(a6) => format!(
            "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             s6.connect(('::1', {p}))\n\
             attempt('v6_tclass', lambda: s6.sendmsg([b'tclass'], [(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, struct.pack('i', 0x10))]))\n",
            p = a6.port
        ),
        None => String::new(),
    };
    let sends = format!(
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('127.0.0.1', {a}))\n\
         attempt('v4_tos', lambda: s.sendmsg([b'tos'], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 0x10))]))\n\
         attempt('v4_ttl', lambda: s.sendmsg([b'ttl'], [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack('i', 9))]))\n\
         m = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         m.connect(('::ffff:127.0.0.1', {a}))\n\
         attempt('mapped_tos', lambda: m.sendmsg([b'mapped'], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 0x10))]))\n\
         {v6}",
        a = allowed.port
    );
    // Control: outside agents.
    let out = Command::new(PYTHON)
        .args(["-c", &format!("{PY_ATTEMPT}{sends}")])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    for name in ["v4_tos", "v4_ttl", "mapped_tos"] {
        assert_eq!(outcome(&stdout, name), "ok", "outside agents: {stdout}");
    }
    assert_eq!(allowed.received(), 3);
    // The agent: the same sends, to its allowed peers.
    let out = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &format!("{PY_ATTEMPT}{sends}")],
    );
    let stdout = text(&out.stdout);
    for name in ["v4_tos", "v4_ttl", "mapped_tos"] {
        assert_eq!(
            outcome(&stdout, name),
            "ok",
            "{stdout} {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        allowed.received(),
        6,
        "the agent's datagrams did not all arrive"
    );
    if let Some(a6) = &allowed6 {
        assert_eq!(outcome(&stdout, "v6_tclass"), "ok", "{stdout}");
        assert_eq!(a6.received(), 2);
    }
    let rec = d.wait_audit("allowed connected send", |v| {
        v["agent_id"] == agent.as_str()
            && is(v, "action", "sendmsg")
            && is(v, "verdict", "allowed")
            && v["dest_port"] == allowed.port
    });
    assert_eq!(field(&rec, "dest_addr"), "127.0.0.1");
    assert!(field(&rec, "reason").contains("connected peer"), "{rec:#}");

    // A socket connected to a forbidden peer outside the agent, handed to it: its send with a
    // control message is judged as that peer and refused. (The process outside sends first: the
    // control, which arrives.)
    let inner = format!(
        "{PY_ATTEMPT}t = socket.socket(fileno=int(sys.argv[1]))\n\
         attempt('handed_in_tos', lambda: t.sendmsg([b'leak'], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 0x10))]))\n"
    );
    let outer = format!(
        "{PY_ATTEMPT}s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('127.0.0.1', {dp}))\n\
         attempt('outside_tos', lambda: s.sendmsg([b'outside'], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 0x10))]))\n\
         r = subprocess.run([{bin:?}, 'run', '--control-socket', {sock:?}, '--agent', {agent:?}, '--', {py:?}, '-c', {inner:?}, str(s.fileno())], pass_fds=[s.fileno()], capture_output=True, text=True)\n\
         print(r.stdout, r.stderr, flush=True)\n",
        dp = denied.port,
        bin = binary().display().to_string(),
        sock = d.socket.display().to_string(),
        py = PYTHON,
    );
    let out: Output = Command::new(PYTHON).args(["-c", &outer]).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(outcome(&stdout, "outside_tos"), "ok", "{stdout}");
    assert_eq!(
        outcome(&stdout, "handed_in_tos"),
        eperm(),
        "{stdout} {}",
        text(&out.stderr)
    );
    assert_eq!(
        denied.received(),
        1,
        "only the send outside the agent arrives"
    );
    let rec = d.wait_audit("denied connected send", |v| {
        v["agent_id"] == agent.as_str() && is(v, "action", "sendmsg") && is(v, "verdict", "denied")
    });
    assert_eq!(rec["dest_port"], denied.port, "judged as the peer: {rec:#}");
    assert_eq!(field(&rec, "dest_addr"), "127.0.0.1");
}

/// Root sniffer outside agents (a packet socket, network headers first): prints `ready`, then for
/// each IPv4/IPv6 packet on any interface whose payload holds a `srr-` marker, `seen MARKER DST` (the address the packet was sent to).
const SNIFFER: &str = r#"import socket, sys, time, re
cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
cap.settimeout(0.2)
print('ready', flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        pkt, addr = cap.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_HOST and addr[0] != 'lo':
        continue
    ip = pkt
    if len(ip) > 40 and ip[0] >> 4 == 4:
        dst = socket.inet_ntoa(ip[16:20])
    elif len(ip) > 40 and ip[0] >> 4 == 6 and ip[6] != 58:
        dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        continue
    m = re.search(rb'srr-[a-z0-9]+', ip)
    if m:
        print('seen', m.group().decode(), dst, flush=True)
    # A TCP SYN (no payload to mark): `syn DST DPORT`.
    if ip[0] >> 4 == 4 and ip[9] == 6:
        t = ip[(ip[0] & 15) * 4:]
        if len(t) >= 14 and t[13] & 0x12 == 0x02:
            print('syn', dst, int.from_bytes(t[2:4], 'big'), flush=True)
"#;

/// Sends with a source route: an IPv4 UDP datagram with a loose source route via 127.0.0.2
/// (`IP_OPTIONS`, needs CAP_NET_RAW: a root agent) and an IPv6 datagram with a type-4 routing
/// header whose next segment is [`FIRST_HOP6`] (`IPV6_RTHDR`, open to every process), each to an
/// allowed destination. `@TAG@` marks the payloads.
fn source_route_sends(v4_port: u16, v6_port: Option<u16>) -> String {
    let mut s = format!(
        "{PY_ATTEMPT}s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         attempt('lsrr_set', lambda: s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([0x83, 7, 4, 127, 0, 0, 2, 0])))\n\
         attempt('lsrr_send', lambda: s.sendto(b'srr-v4@TAG@', ('127.0.0.1', {v4_port})))\n"
    );
    if let Some(p) = v6_port {
        s.push_str(&format!(
            "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '::1') + socket.inet_pton(socket.AF_INET6, {FIRST_HOP6:?})\n\
             attempt('srh_set', lambda: s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh))\n\
             attempt('srh_send', lambda: s6.sendto(b'srr-v6@TAG@', ('::1', {p})))\n"
        ));
    }
    s
}

/// The IPv6 first hop of the routing-header test: an address the test puts on `lo`, so that the
/// bent datagram stays on this host, where the sniffer sees it.
const FIRST_HOP6: &str = "fd00:a3e:5ec::1";

/// An address on `lo` for the life of the value.
struct LoopbackAddress(&'static str);

impl LoopbackAddress {
    fn add(addr: &'static str) -> LoopbackAddress {
        let _ = Command::new("ip")
            .args([
                "-6",
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "lo",
                "nodad",
            ])
            .status();
        LoopbackAddress(addr)
    }
}

impl Drop for LoopbackAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-6", "addr", "del", &format!("{}/128", self.0), "dev", "lo"])
            .status();
    }
}

/// A source route sends a packet to its first hop, not to the destination the sendmsg hook
/// judged. Outside agents the packets go to 127.0.0.2 and [`FIRST_HOP6`] (seen on loopback); an agent's
/// are dropped by the egress program (EPERM), reported as `source_route` denials and counted.
#[test]
fn source_routed_packets_of_agents_never_leave() {
    if !require_root("source_routed_packets_of_agents_never_leave") {
        return;
    }
    let agent = unique_agent("srcroute");
    let allowed = UdpSink::bind("127.0.0.1:0");
    let allowed6 = std::net::UdpSocket::bind("[::1]:0")
        .ok()
        .map(|_| UdpSink::bind("[::1]:0"));
    let mut net = vec![format!("127.0.0.1:{}", allowed.port)];
    if let Some(a6) = &allowed6 {
        net.push(format!("[::1]:{}", a6.port));
    }
    let d = Daemon::start(&[policy(&agent, "enforce", &net, &[PYTHON])]);
    let _hop = LoopbackAddress::add(FIRST_HOP6);
    let mut sniffer = Command::new(PYTHON)
        .args(["-c", SNIFFER, "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sniffed = std::io::BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sniffed, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let sends = source_route_sends(allowed.port, allowed6.as_ref().map(|a| a.port));
    // Control: outside agents.
    let out = Command::new(PYTHON)
        .args(["-c", &sends.replace("@TAG@", "outside")])
        .output()
        .unwrap();
    let outside = text(&out.stdout);
    assert_eq!(outcome(&outside, "lsrr_send"), "ok", "{outside}");
    // The agent: root with every capability (`--keep-capabilities`), since IP_OPTIONS source
    // routes need CAP_NET_RAW, which `run` otherwise drops; the egress program is what stops it.
    let agent_sends = sends.replace("@TAG@", "agent");
    let out = d.run_with(
        &agent,
        &["--keep-capabilities"],
        &[PYTHON, "-c", &agent_sends],
    );
    let inside = text(&out.stdout);
    let _ = sniffer.wait();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut sniffed, &mut seen).unwrap();

    assert!(
        seen.contains("seen srr-v4outside 127.0.0.2"),
        "outside agents the source route takes the datagram to its first hop: {seen}"
    );
    assert!(!seen.contains("srr-v4agent"), "{seen}");
    assert!(!seen.contains("srr-v6agent"), "{seen}");
    let mut refused = 0;
    assert_eq!(outcome(&inside, "lsrr_set"), "ok", "{inside}");
    {
        assert_eq!(outcome(&inside, "lsrr_send"), eperm(), "{inside}");
        let rec = d.wait_audit("dropped IPv4 source route", |v| {
            v["agent_id"] == agent.as_str()
                && is(v, "action", "source_route")
                && is(v, "dest_addr", "127.0.0.2")
        });
        assert_eq!(field(&rec, "verdict"), "denied");
        assert_eq!(field(&rec, "enforcement"), "dropped");
        assert!(field(&rec, "reason").contains("LSRR"), "{rec:#}");
        refused += 1;
    }
    if allowed6.is_some() && outcome(&outside, "srh_send") == "ok" {
        assert!(
            seen.contains(&format!("seen srr-v6outside {FIRST_HOP6}")),
            "outside agents the routing header takes the datagram to {FIRST_HOP6}: {seen}"
        );
        assert_eq!(outcome(&inside, "srh_set"), "ok", "{inside}");
        assert_eq!(outcome(&inside, "srh_send"), eperm(), "{inside}");
        let rec = d.wait_audit("dropped IPv6 routing header", |v| {
            v["agent_id"] == agent.as_str()
                && is(v, "action", "source_route")
                && is(v, "dest_addr", FIRST_HOP6)
        });
        assert_eq!(field(&rec, "verdict"), "denied");
        refused += 1;
    }
    assert!(refused > 0, "nothing was tried: {inside} {outside}");
    eprintln!("source routes refused for the agent: {refused} (agent's outcomes:\n{inside})");
    assert_eq!(allowed.received(), 0, "no source-routed datagram arrives");
    let st = d.status();
    assert!(
        st["counters"]["source_routed_packets"].as_u64().unwrap() >= refused,
        "{st:#}"
    );
}

/// With a selector the egress program sits at the root and names the agent by its socket: a
/// process a uid selector makes the agent (no `run`, no agent cgroup) has its routing-header
/// datagram dropped and reported; the same process sent the same datagram as root, before it
/// took the uid, and that one reached its first hop.
#[test]
fn source_routed_packets_of_a_uid_selected_agent_never_leave() {
    if !require_root("source_routed_packets_of_a_uid_selected_agent_never_leave") {
        return;
    }
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let agent = unique_agent("srcrouteuid");
    // A uid no one else on this host uses, so the selector catches only this test's process.
    let uid = 200_000 + std::process::id() % 50_000;
    let allowed6 = UdpSink::bind("[::1]:0");
    let d = Daemon::start(&[identity_policy(
        &agent,
        &[format!("[::1]:{}", allowed6.port)],
        &[],
        &format!("uids = [{uid}]"),
    )]);
    let _hop = LoopbackAddress::add(FIRST_HOP6);
    let mut sniffer = Command::new(PYTHON)
        .args(["-c", SNIFFER, "6"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sniffed = std::io::BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sniffed, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let script = format!(
        "{PY_ATTEMPT}srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '::1') + socket.inet_pton(socket.AF_INET6, {FIRST_HOP6:?})\n\
         def send(tag):\n\
         \x20   s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         \x20   s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh)\n\
         \x20   s6.sendto(b'srr-' + tag, ('::1', {p}))\n\
         attempt('as_root', lambda: send(b'root'))\n\
         os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n\
         attempt('as_agent', lambda: send(b'agent'))\n",
        p = allowed6.port
    );
    let out = Command::new(PYTHON).args(["-c", &script]).output().unwrap();
    let stdout = text(&out.stdout);
    let _ = sniffer.wait();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut sniffed, &mut seen).unwrap();
    assert_eq!(outcome(&stdout, "as_root"), "ok", "{stdout}");
    assert_eq!(
        outcome(&stdout, "as_agent"),
        eperm(),
        "{stdout} {}",
        text(&out.stderr)
    );
    assert!(
        seen.contains(&format!("seen srr-root {FIRST_HOP6}")),
        "{seen}"
    );
    assert!(!seen.contains("srr-agent"), "{seen}");
    let rec = d.wait_audit("dropped routing header of the uid-selected agent", |v| {
        v["agent_id"] == agent.as_str()
            && is(v, "action", "source_route")
            && is(v, "dest_addr", FIRST_HOP6)
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert!(field(&rec, "reason").contains("routing header"), "{rec:#}");
}

/// The TCP form: a root agent sets a loose source route via 127.0.0.2 on a TCP socket and
/// connects to an allowed listener. Outside agents the SYN goes to 127.0.0.2 (seen on
/// loopback); the agent's SYN never leaves (its connect does not complete) and the attempt is
/// reported as a TCP source route.
#[test]
fn source_routed_tcp_syn_of_an_agent_never_leaves() {
    if !require_root("source_routed_tcp_syn_of_an_agent_never_leaves") {
        return;
    }
    let agent = unique_agent("srcroutetcp");
    let allowed = CountingListener::bind("127.0.0.1:0");
    let d = Daemon::start(&[policy(
        &agent,
        "enforce",
        &[format!("127.0.0.1:{}", allowed.port)],
        &[PYTHON],
    )]);
    let mut sniffer = Command::new(PYTHON)
        .args(["-c", SNIFFER, "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sniffed = std::io::BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sniffed, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let script = |port: u16| {
        format!(
            "{PY_ATTEMPT}s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
             s.settimeout(1.5)\n\
             attempt('lsrr_set', lambda: s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([0x83, 7, 4, 127, 0, 0, 2, 0])))\n\
             try:\n\
             \x20   s.connect(('127.0.0.1', {port}))\n\
             \x20   print('connect ok', flush=True)\n\
             except socket.timeout:\n\
             \x20   print('connect timeout', flush=True)\n\
             except OSError as e:\n\
             \x20   print('connect errno', e.errno, flush=True)\n"
        )
    };
    // Control, outside agents, to another port (so the SYNs can be told apart).
    let other = CountingListener::bind("127.0.0.1:0");
    let out = Command::new(PYTHON)
        .args(["-c", &script(other.port)])
        .output()
        .unwrap();
    let outside = text(&out.stdout);
    assert_eq!(outcome(&outside, "lsrr_set"), "ok", "{outside}");
    let out = d.run(&agent, None, &[PYTHON, "-c", &script(allowed.port)]);
    let inside = text(&out.stdout);
    let _ = sniffer.wait();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut sniffed, &mut seen).unwrap();
    assert!(
        seen.contains(&format!("syn 127.0.0.2 {}", other.port)),
        "outside agents the SYN goes to the first hop: {seen}"
    );
    if outcome(&inside, "lsrr_set") != "ok" {
        // The agent lacks CAP_NET_RAW: the kernel refused the option itself.
        return;
    }
    assert!(
        !seen.contains(&format!("syn 127.0.0.2 {}", allowed.port)),
        "the agent's source-routed SYN left: {seen}"
    );
    assert_ne!(outcome(&inside, "connect"), "ok", "{inside}");
    assert_eq!(allowed.accepted(), 0);
    let rec = d.wait_audit("dropped source-routed SYN", |v| {
        v["agent_id"] == agent.as_str()
            && is(v, "action", "source_route")
            && is(v, "dest_addr", "127.0.0.2")
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "dest_transport"), "tcp");
}

/// Alert mode: an agent's routing-header datagram is reported as an alert and goes on to its
/// first hop, like every other off-list action of an alert-mode agent.
#[test]
fn source_routed_packet_of_an_alert_mode_agent_is_reported_and_leaves() {
    if !require_root("source_routed_packet_of_an_alert_mode_agent_is_reported_and_leaves") {
        return;
    }
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let agent = unique_agent("srcroutealert");
    let allowed6 = UdpSink::bind("[::1]:0");
    let d = Daemon::start(&[policy(
        &agent,
        "alert",
        &[format!("[::1]:{}", allowed6.port)],
        &[PYTHON],
    )]);
    let _hop = LoopbackAddress::add(FIRST_HOP6);
    let mut sniffer = Command::new(PYTHON)
        .args(["-c", SNIFFER, "5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sniffed = std::io::BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sniffed, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let script = format!(
        "{PY_ATTEMPT}s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '::1') + socket.inet_pton(socket.AF_INET6, {FIRST_HOP6:?})\n\
         s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh)\n\
         attempt('srh_send', lambda: s6.sendto(b'srr-alert', ('::1', {p})))\n",
        p = allowed6.port
    );
    let out = d.run(&agent, None, &[PYTHON, "-c", &script]);
    let stdout = text(&out.stdout);
    let _ = sniffer.wait();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut sniffed, &mut seen).unwrap();
    assert_eq!(outcome(&stdout, "srh_send"), "ok", "{stdout}");
    assert!(
        seen.contains(&format!("seen srr-alert {FIRST_HOP6}")),
        "{seen}"
    );
    let rec = d.wait_audit("alert for the routing header", |v| {
        v["agent_id"] == agent.as_str()
            && is(v, "action", "source_route")
            && is(v, "dest_addr", FIRST_HOP6)
    });
    assert_eq!(field(&rec, "verdict"), "alert");
}
