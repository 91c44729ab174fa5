//! Server names judged in the kernel (the daemon's default, `--server-names kernel`): an agent's
//! connect to an address learned for names with only `[[network.tls]]` rules goes straight to
//! the server (no redirect, no relay); the egress hook judges the first bytes the socket sends.
//! Real clients (python3 `ssl`, curl), a real TLS server (python3), names from a real dnsmasq.
//! Every route by which bytes can leave a socket passes the same hook: a send before the
//! connection is established, TCP Fast Open, a ClientHello written in pieces. Run one at a time
//! (`--test-threads=1`).

mod egress_support;

use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use egress_support::*;
use serde_json::Value;

/// The agent's client: each argument group is one operation, each prints one JSON line.
/// - `hello NAME PORT CA SNI HOW`: a ClientHello for SNI (`-`: none) made by python's ssl, sent
///   on a TCP connection to NAME:PORT (HOW: `plain` connect then send; `early` send while the
///   connect is still in progress; `tfo` sendto with MSG_FASTOPEN; `split` the first 20 bytes,
///   a pause, the rest; `ech` with an encrypted_client_hello extension added; `http` a plain
///   HTTP request instead), then read: how many bytes the server sent back, or the error, and how
///   long it took.
/// - `https NAME PORT CA SNI`: a whole TLS exchange (GET /) with that SNI: status and body.
/// - `peer NAME PORT`: connect; getpeername, getsockname.
const PY: &str = r#"
import json, socket, ssl, sys, time
a = sys.argv[1:]
def out(**kw):
    print(json.dumps(kw), flush=True)
def client_hello(ca, sni):
    ctx = ssl.create_default_context(cafile=ca)
    if sni == "-":
        ctx.check_hostname = False
    inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outg, server_hostname=None if sni == "-" else sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outg.read()
def add_extension(h, kind, data):
    body = bytearray(h[9:])
    i = 2 + 32
    i += 1 + body[i]
    i += 2 + int.from_bytes(body[i:i + 2], "big")
    i += 1 + body[i]
    n = int.from_bytes(body[i:i + 2], "big")
    ext = kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    body = body[:i] + (n + len(ext)).to_bytes(2, "big") + body[i + 2:] + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return h[:3] + len(hs).to_bytes(2, "big") + hs
def addr(name, port):
    return (socket.gethostbyname(name), port)
while a:
    op = a.pop(0)
    if op == "hello":
        name, port, ca, sni, how = a.pop(0), int(a.pop(0)), a.pop(0), a.pop(0), a.pop(0)
        h = client_hello(ca, sni)
        if how == "ech":
            h = add_extension(h, 0xfe0d, b"\x00" * 8)
        if how == "http":
            h = b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n"
        t = time.monotonic()
        s = socket.socket()
        s.settimeout(15)
        try:
            if how == "early":
                s.setblocking(False)
                s.connect_ex(addr(name, port))
                s.setblocking(True)
                s.settimeout(15)
                s.sendall(h)
            elif how == "tfo":
                # Blocking: without a Fast Open cookie the data goes right after the handshake.
                s.settimeout(None)
                s.sendto(h, socket.MSG_FASTOPEN, addr(name, port))
                s.settimeout(15)
            elif how == "split":
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect(addr(name, port))
                s.sendall(h[:20])
                time.sleep(0.05)
                s.sendall(h[20:])
            else:
                s.connect(addr(name, port))
                s.sendall(h)
            got = s.recv(4096)
            out(op=op, how=how, got=len(got), secs=time.monotonic() - t)
        except OSError as e:
            out(op=op, how=how, errno=e.errno, error=repr(e), secs=time.monotonic() - t)
        s.close()
    elif op == "https":
        name, port, ca, sni = a.pop(0), int(a.pop(0)), a.pop(0), a.pop(0)
        ctx = ssl.create_default_context(cafile=ca)
        try:
            s = ctx.wrap_socket(socket.create_connection(addr(name, port), timeout=10),
                                server_hostname=sni)
            s.sendall(b"GET / HTTP/1.0\r\nHost: " + sni.encode() + b"\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            out(op=op, status=int(head.split()[1]), body=body.decode())
        except OSError as e:
            out(op=op, errno=e.errno, error=repr(e))
    elif op == "peer":
        name, port = a.pop(0), int(a.pop(0))
        s = socket.create_connection(addr(name, port), timeout=10)
        out(op=op, peer=list(s.getpeername()), local=list(s.getsockname()))
        s.close()
"#;

/// Where the TLS server listens; ok.test resolves here.
const SERVER: &str = "127.0.0.3";

fn agent(d: &Daemon, agent: &str, script: &str) -> Vec<Value> {
    let mut cmd = vec![PYTHON, "-c", PY];
    let args = ops(script);
    cmd.extend(args.iter().map(String::as_str));
    d.run_json_lines(agent, Some("names"), &cmd)
}

/// The same client outside every agent.
fn outside(script: &str) -> Vec<Value> {
    let out = std::process::Command::new(PYTHON)
        .args(["-c", PY])
        .args(ops(script))
        .output()
        .expect("python3");
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A refused connection: closed by the daemon (ECONNABORTED, which only a local abort gives)
/// well before any timeout.
fn assert_closed(r: &Value, what: &str) {
    assert_eq!(r["errno"], libc::ECONNABORTED, "{what}: {r}");
    assert!(
        r["secs"].as_f64().unwrap_or(99.0) < 5.0,
        "{what}: closed late: {r}"
    );
}

/// The server answered the ClientHello (a ServerHello, or an alert: bytes of the server's).
fn assert_answered(r: &Value, what: &str) {
    assert!(r["got"].as_u64().unwrap_or(0) > 0, "{what}: {r}");
}

struct Setup {
    _server: Server,
    _up: Dnsmasq,
    pki: Pki,
    port: u16,
    d: Daemon,
    agent: String,
}

fn setup(label: &str, mode: &str) -> Setup {
    let pki = Pki::new();
    let server = Server::start(SERVER, Some(&pki));
    let port = server.port;
    let up = Dnsmasq::start(&[
        "--address=/ok.test/127.0.0.3",
        "--address=/other.test/127.0.0.4",
    ]);
    let agent = unique_agent(label);
    let d = kernel_daemon(
        &[policy(
            &agent,
            mode,
            &[("ok.test", port), ("other.test", port)],
            &[],
        )],
        &up,
    );
    Setup {
        _server: server,
        _up: up,
        pki,
        port,
        d,
        agent,
    }
}

#[test]
fn server_names_are_judged_in_the_kernel_on_every_route_and_fronting_is_closed() {
    if !require_root("server_names_are_judged_in_the_kernel_on_every_route_and_fronting_is_closed")
    {
        return;
    }
    let s = setup("names", "enforce");
    let (ca, port) = (ca(&s.pki), s.port);
    let started = Instant::now();
    let r = agent(
        &s.d,
        &s.agent,
        &format!(
            "https ok.test {port} {ca} ok.test peer ok.test {port} \
             hello ok.test {port} {ca} other.test plain \
             hello ok.test {port} {ca} other.test early \
             hello ok.test {port} {ca} other.test tfo \
             hello ok.test {port} {ca} other.test split \
             hello ok.test {port} {ca} ok.test early \
             hello ok.test {port} {ca} ok.test tfo \
             hello ok.test {port} {ca} ok.test split"
        ),
    );
    // Allowed: the real server, straight (the socket's own address is the host's, not a flow's
    // loopback source as through the endpoint).
    assert_eq!(r[0]["status"], 200, "{}\n{}", r[0], s.d.log());
    assert_eq!(r[0]["body"], "hello ok.test", "the server saw the request");
    assert_eq!(r[1]["peer"], serde_json::json!(["127.0.0.3", port]));
    assert_eq!(r[1]["local"][0], "127.0.0.1", "not redirected: {}", r[1]);
    // Domain fronting (ok.test's address, other.test in the ClientHello), whichever way the
    // bytes leave: closed at once.
    for (i, how) in [(2, "plain"), (3, "early"), (4, "tfo"), (5, "split")] {
        assert_closed(&r[i], how);
    }
    // The same routes with the allowed name reach the server (a split hello after the
    // retransmission that carries it whole).
    for (i, how) in [(6, "early"), (7, "tfo"), (8, "split")] {
        assert_answered(&r[i], how);
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    let allowed = s.d.wait_audit("allowed tls connection", |v| {
        is(v, "action", "tls") && is(v, "verdict", "allowed") && is(v, "agent_id", &s.agent)
    });
    assert_eq!(field(&allowed, "tls_sni"), "ok.test");
    assert_eq!(field(&allowed, "dest_addr"), "127.0.0.3");
    assert_eq!(field(&allowed, "task_id"), "names");
    assert!(
        field(&allowed, "reason").contains("judged in the kernel"),
        "{allowed}"
    );
    let denied: Vec<Value> = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d: Vec<Value> =
                s.d.audit()
                    .into_iter()
                    .filter(|v| {
                        is(v, "action", "tls")
                            && is(v, "verdict", "denied")
                            && is(v, "tls_sni", "other.test")
                    })
                    .collect();
            if d.len() >= 4 || Instant::now() > deadline {
                break d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(denied.len(), 4, "one refusal per route: {denied:#?}");
    for v in &denied {
        assert!(field(v, "reason").contains("domain fronting"), "{v}");
        assert_eq!(field(v, "enforcement"), "closed", "{v}");
    }
    let j = wait_journal(&s.agent, "refused fronting in journald", |e| {
        is(e, "ACTION", "tls") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&j, "TLS_SNI"), "other.test");

    // Control: the same fronting outside agents (ok.test's address) reaches the server.
    let o = outside(&format!(
        "hello {SERVER} {port} {ca} other.test plain hello {SERVER} {port} {ca} other.test early"
    ));
    assert_answered(&o[0], "outside, plain");
    assert_answered(&o[1], "outside, early");
}

#[test]
fn what_the_kernel_cannot_judge_is_refused_and_said_why() {
    if !require_root("what_the_kernel_cannot_judge_is_refused_and_said_why") {
        return;
    }
    let s = setup("namesbad", "enforce");
    let (ca, port) = (ca(&s.pki), s.port);
    let script = format!(
        "hello ok.test {port} {ca} - plain hello ok.test {port} {ca} ok.test ech \
         hello ok.test {port} {ca} ok.test http"
    );
    let r = agent(&s.d, &s.agent, &script);
    for (i, what) in [(0, "no SNI"), (1, "ECH"), (2, "plain HTTP")] {
        assert_closed(&r[i], what);
    }
    for (what, says) in [
        ("no SNI", "no SNI"),
        ("ECH", "ECH"),
        ("plain HTTP", "did not open with a TLS ClientHello"),
    ] {
        let v = s.d.wait_audit(what, |v| {
            is(v, "verdict", "denied")
                && is(v, "agent_id", &s.agent)
                && field(v, "reason").contains(says)
        });
        assert_eq!(field(&v, "enforcement"), "closed", "{what}: {v}");
        assert!(field(&v, "reason").contains("judged in the kernel"), "{v}");
    }
    // Control: outside agents (ok.test's address) the server gets the same bytes and answers.
    let o = outside(&script.replace("hello ok.test", &format!("hello {SERVER}")));
    for (i, what) in [(0, "no SNI"), (1, "ECH")] {
        assert_answered(&o[i], what);
    }
    // A TLS server resets a plain-HTTP request: it got it.
    assert!(
        o[2]["got"].as_u64().is_some() || o[2]["errno"] == libc::ECONNRESET,
        "plain HTTP outside: {}",
        o[2]
    );
}

#[test]
fn alert_mode_reports_fronting_and_lets_it_through() {
    if !require_root("alert_mode_reports_fronting_and_lets_it_through") {
        return;
    }
    let s = setup("namesalert", "alert");
    let (ca, port) = (ca(&s.pki), s.port);
    let r = agent(
        &s.d,
        &s.agent,
        &format!("https ok.test {port} {ca} other.test"),
    );
    assert_eq!(r[0]["status"], 200, "alert mode lets it through: {}", r[0]);
    assert_eq!(r[0]["body"], "hello other.test");
    let alert = s.d.wait_audit("alert for fronting", |v| {
        is(v, "action", "tls") && is(v, "verdict", "alert") && is(v, "tls_sni", "other.test")
    });
    let reason = field(&alert, "reason");
    assert!(reason.contains("alert mode: passed unchanged"), "{alert}");
    assert!(reason.contains("domain fronting"), "{alert}");
}
