//! How a server-name-checked connection's bytes pass (`[[network.tls]]`; docs/egress.md, "How the
//! bytes pass"): a large download arrives intact with its bytes counted in the record, a client
//! that ends its sending still gets its answer, both with splice (the default) and with the
//! kernel's sockmap relay (`daemon --egress-relay kernel`), each with a control outside
//! agents. Also: the daemon logs `policy check`'s request-rule warnings. Run one at a time
//! (`--test-threads=1`).

mod egress_support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

use agent_monitor_tests::*;
use egress_support::*;

/// The download: 256 MiB.
const BIG: u64 = 256 << 20;

/// Servers on `ip`: TLS (cert, key) answering any request with `size` bytes of a fixed pattern
/// and closing; and plain TCP that reads a request to its end of stream, then answers with what
/// it read and closes. Prints both ports.
const PY_SERVERS: &str = r#"
import socket, ssl, sys, threading
ip, cert, key, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
BLOCK = bytes(range(256)) * 4096
def head(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            return buf
        buf += d
    return buf
def big(c):
    try:
        head(c)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
        left = size
        while left > 0:
            n = min(left, len(BLOCK))
            c.sendall(BLOCK[:n])
            left -= n
        c.unwrap().close()
    except Exception as e:
        print("big:", e, file=sys.stderr)
def half(c):
    asked = c.makefile("rb").read()
    c.sendall(b"HTTP/1.0 200 OK\r\n\r\nafter your end of stream, you asked %d bytes" % len(asked))
    c.close()
def serve(s, handle, wrap):
    while True:
        c, _ = s.accept()
        if wrap:
            try:
                c = wrap(c)
            except Exception:
                continue
        threading.Thread(target=handle, args=(c,), daemon=True).start()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
t, p = socket.socket(), socket.socket()
for s in (t, p):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, 0))
    s.listen(16)
print(t.getsockname()[1], p.getsockname()[1], flush=True)
threading.Thread(target=serve, args=(p, half, None), daemon=True).start()
serve(t, big, lambda c: ctx.wrap_socket(c, server_side=True))
"#;

/// The client (in the agent, and outside as the control): `big NAME PORT CA` downloads over
/// TLS and prints the body's length and SHA-256; `half NAME PORT` sends a plain-HTTP request,
/// ends its sending (after a pause) and prints the answer.
const PY_CLIENT: &str = r#"
import hashlib, json, socket, ssl, sys, time
a = sys.argv[1:]
if a[0] == "big":
    name, port, ca = a[1], int(a[2]), a[3]
    ctx = ssl.create_default_context(cafile=ca)
    s = ctx.wrap_socket(socket.create_connection((name, port)), server_hostname=name)
    s.sendall(("GET /big HTTP/1.1\r\nHost: %s\r\n\r\n" % name).encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    _, _, body = buf.partition(b"\r\n\r\n")
    h, n = hashlib.sha256(body), len(body)
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        h.update(d)
        n += len(d)
    print(json.dumps({"op": "big", "bytes": n, "sha256": h.hexdigest()}))
else:
    name, port = a[1], int(a[2])
    s = socket.create_connection((name, port))
    s.sendall(("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % name).encode())
    # A pause first: by then the endpoint has judged the request and set up its relay, so the
    # end of stream goes through it (sent at once, the kernel relay would leave it to splice).
    time.sleep(0.3)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
    print(json.dumps({"op": "half", "got": got.decode(errors="replace")}))
"#;

struct Servers {
    child: Child,
    tls: u16,
    plain: u16,
}

impl Servers {
    fn start(ip: &str, pki: &Pki) -> Servers {
        let mut child = Command::new(PYTHON)
            .args(["-c", PY_SERVERS, ip])
            .arg(pki.file("srv.pem"))
            .arg(pki.file("srv.key"))
            .arg(BIG.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the python servers");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("server ports");
        let ports: Vec<u16> = line
            .split_whitespace()
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|_| panic!("servers said {line:?}"))
            })
            .collect();
        Servers {
            child,
            tls: ports[0],
            plain: ports[1],
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body every download must have: `BIG` bytes of the pattern, hashed outside agents.
fn expected_sha256() -> String {
    let out = Command::new(PYTHON)
        .args([
            "-c",
            "import hashlib,sys\nb=bytes(range(256))*4096\nh=hashlib.sha256()\n\
             for _ in range(int(sys.argv[1])//len(b)): h.update(b)\nprint(h.hexdigest())",
            &BIG.to_string(),
        ])
        .output()
        .expect("python3");
    text(&out.stdout).trim().to_string()
}

/// The download and the half-closed request through the egress endpoint of a daemon started
/// with `--egress-relay relay`, each checked against the same done outside agents.
fn large_download_and_half_close_pass_intact(label: &str, relay: &str) {
    let pki = Pki::new();
    let servers = Servers::start("127.0.0.3", &pki);
    let up = Dnsmasq::start(&["--address=/ok.test/127.0.0.3"]);
    let agent = unique_agent(label);
    let addr = up.addr.to_string();
    let d = Daemon::start_with(
        &[policy(
            &agent,
            "enforce",
            &[("ok.test", servers.tls), ("ok.test", servers.plain)],
            &[],
        )],
        &[
            "--dns-upstream",
            addr.as_str(),
            "--egress-relay",
            relay,
            // The relay is the endpoint's: every server name goes through it.
            "--server-names",
            "endpoint",
        ],
    );
    if relay == "kernel" {
        let log = d.log();
        if log.contains("the kernel relay (sockmap) is unavailable") {
            eprintln!("NOTE: this kernel refused the sockmap relay; checking the splice fallback");
        } else {
            assert!(
                log.contains("connections pass in the kernel (sockmap)"),
                "the daemon does not say how the bytes pass:\n{log}"
            );
        }
    }
    let ca = ca(&pki);
    let (tls, plain) = (servers.tls.to_string(), servers.plain.to_string());
    let r = d.run_json_lines(
        &agent,
        Some("egress"),
        &[PYTHON, "-c", PY_CLIENT, "big", "ok.test", &tls, &ca],
    );
    let want = expected_sha256();
    assert_eq!(r[0]["bytes"], BIG, "{}", r[0]);
    assert_eq!(
        r[0]["sha256"],
        want.as_str(),
        "the download changed on its way"
    );
    let record = d.wait_audit("the download's record", |v| {
        is(v, "action", "tls") && is(v, "verdict", "allowed") && is(v, "agent_id", &agent)
    });
    assert_eq!(field(&record, "tls_sni"), "ok.test");
    // The TLS records around the body add a little: at least the body, and not much more.
    let bytes_in = record["bytes_in"].as_u64().unwrap_or(0);
    assert!(
        (BIG..BIG + BIG / 50).contains(&bytes_in),
        "bytes_in {bytes_in} for a body of {BIG}: {record}"
    );
    let bytes_out = record["bytes_out"].as_u64().unwrap_or(0);
    assert!(
        (100..64 << 10).contains(&bytes_out),
        "bytes_out {bytes_out}: {record}"
    );

    let r = d.run_json_lines(
        &agent,
        Some("egress"),
        &[PYTHON, "-c", PY_CLIENT, "half", "ok.test", &plain],
    );
    let asked = "GET / HTTP/1.0\r\nHost: ok.test\r\n\r\n".len();
    let answer = format!("after your end of stream, you asked {asked} bytes");
    assert!(
        field(&r[0], "got").ends_with(&answer),
        "{}\ndaemon log:\n{}",
        r[0],
        d.log()
    );
    let record = d.wait_audit("the half-closed request's record", |v| {
        is(v, "action", "http")
            && is(v, "verdict", "allowed")
            && is(v, "agent_id", &agent)
            && v["dest_port"] == servers.plain
    });
    assert_eq!(record["bytes_out"], asked as u64, "{record}");
    assert_eq!(
        record["bytes_in"],
        (field(&r[0], "got").len()) as u64,
        "{record}"
    );

    // Control: the same outside agents (straight to the server; the name resolves only for
    // agents, through the daemon's DNS proxy).
    let outside = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(PYTHON)
            .args([
                "-c",
                &format!(
                    "import socket\nreal = socket.create_connection\n\
                     socket.create_connection = lambda a, *r, **k: real(('127.0.0.3', a[1]), *r, **k)\n\
                     exec({PY_CLIENT:?})"
                ),
            ])
            .args(args)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "outside agents: {}",
            text(&out.stderr)
        );
        serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line")
    };
    let big = outside(&["big", "ok.test", &tls, &ca]);
    assert_eq!(big["sha256"], want.as_str(), "outside agents: {big}");
    let half = outside(&["half", "ok.test", &plain]);
    assert!(
        field(&half, "got").ends_with(&answer),
        "outside agents: {half}"
    );
    drop(servers);
}

#[test]
fn a_large_download_and_a_half_closed_request_pass_intact_spliced() {
    if !require_root("a_large_download_and_a_half_closed_request_pass_intact_spliced") {
        return;
    }
    large_download_and_half_close_pass_intact("relay-splice", "splice");
}

#[test]
fn a_large_download_and_a_half_closed_request_pass_intact_through_the_kernel_relay() {
    if !require_root(
        "a_large_download_and_a_half_closed_request_pass_intact_through_the_kernel_relay",
    ) {
        return;
    }
    large_download_and_half_close_pass_intact("relay-kernel", "kernel");
}

#[test]
fn the_daemon_logs_request_rule_warnings_with_their_place() {
    if !require_root("the_daemon_logs_request_rule_warnings_with_their_place") {
        return;
    }
    let up = Dnsmasq::start(&["--address=/warned.test/127.0.0.3"]);
    let agent = unique_agent("relay-warn");
    // warned.test on 443 has no request rule, yet 443 has one: the endpoint would refuse it.
    let (file, text) = policy(
        &agent,
        "enforce",
        &[("tls-only.test", 443)],
        &["warned.test:443".to_string()],
    );
    let d = daemon(&[(file.clone(), text)], &up);
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("warning: network.allow \"warned.test:443\""))
        .unwrap_or_else(|| panic!("no request-rule warning in the daemon log:\n{log}"));
    // file:line of the entry (line 4: the allow list).
    assert!(line.contains(&format!("{file}:4: warning:")), "{line}");
    let journal = journal_matching(&[
        "MESSAGE_ID=e36e471eda2249c485a5b1fc41ca3676".to_string(),
        format!("AGENT={agent}"),
    ]);
    assert_eq!(journal.len(), 1, "{journal:#?}");
    assert_eq!(field(&journal[0], "POLICY_LINE"), "4");
    // Control: a policy without such an entry makes no warning.
    let quiet = unique_agent("relay-quiet");
    let (file, text) = policy(&quiet, "enforce", &[("tls-only.test", 443)], &[]);
    let d = daemon(&[(file, text)], &up);
    assert!(!d.log().contains("warning: network.allow"), "{}", d.log());
}
