//! What the request-rule tests (egress.rs, http_requests.rs) share: a test PKI made by openssl,
//! TLS or plain HTTP servers (python3), the agent's client script and the policies.

// Each test file uses what it needs.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use agent_monitor_tests::*;
use serde_json::Value;

/// A test CA and a server certificate for `ok.test` and `other.test` (CN `egress-test-server`).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| dir.path().join(f).display().to_string();
        std::fs::write(p("san.ext"), "subjectAltName=DNS:ok.test,DNS:other.test\n").unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let steps: Vec<Vec<String>> = vec![
            [
                &["req", "-x509"][..],
                &ec[..],
                &["-days", "1", "-subj", "/CN=agent-monitor egress test CA"],
            ]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .chain(["-keyout".into(), p("ca.key"), "-out".into(), p("ca.pem")])
            .collect(),
            [&["req"][..], &ec[..], &["-subj", "/CN=egress-test-server"]]
                .concat()
                .iter()
                .map(|s| s.to_string())
                .chain(["-keyout".into(), p("srv.key"), "-out".into(), p("srv.csr")])
                .collect(),
            [
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &p("srv.csr"),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-out",
                &p("srv.pem"),
                "-extfile",
                &p("san.ext"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                text(&out.stderr)
            );
        }
        Pki { dir }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An HTTP server (TLS when given a certificate) on `ip`, answering `hello <Host>` (or serving
/// git).
pub struct Server {
    child: Child,
    pub port: u16,
}

pub const PY_SERVER: &str = r#"
import http.server, ssl, sys
ip, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()
    def do_GET(self):
        body = ("hello " + (self.headers.get("Host") or "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
"#;

/// `git http-backend` as CGI behind python3's `http.server` over TLS (a request body may come
/// chunked); every response with a `Content-Length`.
pub const PY_GIT_SERVER: &str = r#"
import http.server, os, ssl, subprocess, sys
ip, cert, key, root = sys.argv[1:5]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while True:
            n = int(self.rfile.readline().split(b";")[0], 16)
            if n == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return data
            data += self.rfile.read(n)
            self.rfile.readline()
    def cgi(self):
        path, _, query = self.path.partition("?")
        data = self.body() if self.command == "POST" else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1",
                   REMOTE_USER="tester", REMOTE_ADDR="127.0.0.1", REQUEST_METHOD=self.command,
                   PATH_INFO=path, QUERY_STRING=query,
                   CONTENT_TYPE=self.headers.get("Content-Type", ""),
                   CONTENT_LENGTH=str(len(data)))
        for header, var in (("Content-Encoding", "HTTP_CONTENT_ENCODING"),
                            ("Git-Protocol", "GIT_PROTOCOL")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        out = subprocess.run(["git", "http-backend"], input=data, env=env,
                             capture_output=True).stdout
        head, sep, rest = out.partition(b"\r\n\r\n")
        if not sep:
            head, sep, rest = out.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip()[:3])
            elif k:
                headers.append((k.strip(), v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
    do_GET = cgi
    do_POST = cgi
    def log_message(self, *a):
        pass
"#;

/// How every server script serves its handler `H` on `ip`: TLS with `cert` and `key` unless
/// `cert` is `-`; the port on the first line of output.
const PY_SERVE: &str = r#"
srv = http.server.ThreadingHTTPServer((ip, 0), H)
if cert != "-":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl Server {
    pub fn start(ip: &str, tls: Option<&Pki>) -> Server {
        let (cert, key) = match tls {
            Some(p) => (
                p.file("srv.pem").display().to_string(),
                p.file("srv.key").display().to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        Server::script(PY_SERVER, &[ip, &cert, &key])
    }

    /// A smart-HTTP git server over TLS (certificate of `pki`) on `ip`: `git http-backend`
    /// serving the repositories under `root`, pushes included.
    pub fn git(ip: &str, pki: &Pki, root: &Path) -> Server {
        let (cert, key) = (pki.file("srv.pem"), pki.file("srv.key"));
        Server::script(
            PY_GIT_SERVER,
            &[
                ip,
                &cert.display().to_string(),
                &key.display().to_string(),
                &root.display().to_string(),
            ],
        )
    }

    /// A python3 server: `handler` defines `H` (and reads its arguments), `PY_SERVE` serves it.
    fn script(handler: &str, args: &[&str]) -> Server {
        let mut child = Command::new(PYTHON)
            .args(["-c", &format!("{handler}{PY_SERVE}")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the python server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("server port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("server said {line:?}"));
        Server { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's client: each argument group is one operation, each prints one JSON line.
/// - `pyhttps NAME PORT CA`: python3 `http.client` over TLS trusting CA: status, body, and the
///   certificate the client saw (its subject CN).
/// - `curl URL CA RESOLVE HOST`: curl (RESOLVE `-` for none, else NAME:PORT:IP; HOST `-` or a
///   `Host` header): exit code and body.
/// - `peer NAME PORT`: connect, then getpeername / getsockname.
/// - `raw NAME PORT`: connect, send an SSH banner, read: whether it connected, what came back
///   (or the error of a closed or reset connection).
/// - `udp NAME PORT`: one datagram: errno.
pub const PY_CLIENT: &str = r#"
import json, socket, ssl, subprocess, sys, http.client
a = sys.argv[1:]
def out(**kw):
    print(json.dumps(kw), flush=True)
while a:
    op = a.pop(0)
    if op == "pyhttps":
        name, port, ca = a.pop(0), int(a.pop(0)), a.pop(0)
        try:
            ctx = ssl.create_default_context(cafile=ca)
            c = http.client.HTTPSConnection(name, port, context=ctx, timeout=10)
            c.request("GET", "/")
            r = c.getresponse()
            cert = c.sock.getpeercert()
            cn = [v for rdn in cert["subject"] for (k, v) in rdn if k == "commonName"]
            out(op=op, status=r.status, body=r.read().decode(), cn=cn)
        except Exception as e:
            out(op=op, error=repr(e))
    elif op == "curl":
        url, ca, resolve, host = a.pop(0), a.pop(0), a.pop(0), a.pop(0)
        cmd = ["/usr/bin/curl", "-sS", "--max-time", "10", "--cacert", ca]
        if resolve != "-":
            cmd += ["--resolve", resolve]
        if host != "-":
            cmd += ["-H", "Host: " + host]
        p = subprocess.run(cmd + [url], capture_output=True, text=True)
        out(op=op, rc=p.returncode, body=p.stdout, err=p.stderr)
    elif op == "peer":
        name, port = a.pop(0), int(a.pop(0))
        s = socket.create_connection((name, port), timeout=10)
        out(op=op, peer=list(s.getpeername()), local=list(s.getsockname()))
        s.close()
    elif op == "raw":
        name, port = a.pop(0), int(a.pop(0))
        try:
            s = socket.create_connection((name, port), timeout=10)
        except Exception as e:
            out(op=op, connected=False, error=repr(e))
            continue
        try:
            s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            got = s.recv(100)
            out(op=op, connected=True, got=len(got))
        except Exception as e:
            # The peer closed or reset the connection: connected, nothing came back.
            out(op=op, connected=True, error=repr(e))
    elif op == "reqs":
        # One keep-alive connection, default trust (run's CA bundle): METHOD:PATH ... then "end".
        name, port = a.pop(0), int(a.pop(0))
        c = http.client.HTTPSConnection(name, port, context=ssl.create_default_context(), timeout=10)
        got = []
        while a and a[0] != "end":
            method, path = a.pop(0).split(":", 1)
            try:
                c.request(method, path, body=(b"x" if method == "POST" else None))
                r = c.getresponse()
                got.append([r.status, r.read().decode(errors="replace")])
            except Exception as e:
                got.append([0, repr(e)])
        a.pop(0)
        out(op=op, got=got)
    elif op == "udp":
        name, port = a.pop(0), int(a.pop(0))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"quic?", (socket.gethostbyname(name), port))
            out(op=op, errno=0)
        except OSError as e:
            out(op=op, errno=e.errno)
"#;

pub fn policy(agent: &str, mode: &str, tls: &[(&str, u16)], allow: &[String]) -> (String, String) {
    let mut text = format!(
        "agent = {agent:?}\nmode = {mode:?}\n[network]\nallow = {allow:?}\n[exec]\nallow = [\"/usr/bin/python3*\", \"/usr/bin/curl\"]\n[dns]\nprivate_answers = [\"*.test\"]\n"
    );
    for (host, port) in tls {
        text.push_str(&format!(
            "[[network.tls]]\nhost = {host:?}\nport = {port}\n"
        ));
    }
    (format!("{agent}.toml"), text)
}

pub fn agent_ops(d: &Daemon, agent: &str, ops: &[String]) -> Vec<Value> {
    let mut cmd = vec![PYTHON, "-c", PY_CLIENT];
    cmd.extend(ops.iter().map(String::as_str));
    d.run_json_lines(agent, Some("egress"), &cmd)
}

pub fn ops(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

pub fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

pub fn ca(p: &Pki) -> String {
    p.file("ca.pem").display().to_string()
}

/// curl from the test process itself (not an agent).
pub fn curl_outside(args: &[&str]) -> std::process::Output {
    Command::new("/usr/bin/curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl")
}

/// A daemon whose egress endpoint judges every server name (`--server-names endpoint`): what
/// these tests exercise is the endpoint.
pub fn daemon(policies: &[(String, String)], up: &Dnsmasq) -> Daemon {
    let addr = up.addr.to_string();
    Daemon::start_with(
        policies,
        &[
            "--dns-upstream",
            addr.as_str(),
            "--server-names",
            "endpoint",
        ],
    )
}

/// A daemon with the default: server names of connections with only `[[network.tls]]` rules
/// are judged in the kernel.
pub fn kernel_daemon(policies: &[(String, String)], up: &Dnsmasq) -> Daemon {
    let addr = up.addr.to_string();
    Daemon::start_with(policies, &["--dns-upstream", addr.as_str()])
}

pub fn assert_path_exists(p: &Path) {
    assert!(p.exists(), "{} missing", p.display());
}

/// `[[network.http]]` for `host`:`port` with these methods and paths, as policy text.
pub fn http_rule(host: &str, port: u16, methods: &[&str], paths: &[&str]) -> String {
    format!(
        "[[network.http]]\nhost = {host:?}\nport = {port}\nmethods = {methods:?}\npaths = {paths:?}\n"
    )
}

/// A daemon that intercepts: its CA in `ca_dir`, the servers behind it verified against the test
/// PKI's CA.
pub fn intercepting_daemon(
    policies: &[(String, String)],
    up: &Dnsmasq,
    pki: &Pki,
    ca_dir: &Path,
) -> Daemon {
    let (dns, ca_dir, upstream_ca) = (up.addr.to_string(), ca_dir.display().to_string(), ca(pki));
    Daemon::start_with(
        policies,
        &[
            "--dns-upstream",
            dns.as_str(),
            "--ca-dir",
            ca_dir.as_str(),
            "--upstream-ca-bundle",
            upstream_ca.as_str(),
        ],
    )
}

/// A TLS `hello` server for `ok.test` (test PKI) on 127.0.0.3, the name in dnsmasq, and an
/// intercepting daemon for one agent allowed `GET /allowed/*` there.
pub struct HelloSite {
    // Dropped in this order: the daemon first.
    pub d: Daemon,
    pub agent: String,
    pub port: u16,
    pub pki: Pki,
    pub server: Server,
    pub up: Dnsmasq,
    pub ca_dir: tempfile::TempDir,
}

impl HelloSite {
    /// `policy(agent, rules)`: the agent's policy file with the request rule `rules` in it.
    pub fn start(label: &str, policy: impl FnOnce(&str, &str) -> (String, String)) -> HelloSite {
        let pki = Pki::new();
        let server = Server::start("127.0.0.3", Some(&pki));
        let port = server.port;
        let up = Dnsmasq::start(&["--address=/ok.test/127.0.0.3"]);
        let agent = unique_agent(label);
        let ca_dir = tempfile::tempdir().unwrap();
        let rules = http_rule("ok.test", port, &["GET"], &["/allowed/*"]);
        let d = intercepting_daemon(&[policy(&agent, &rules)], &up, &pki, ca_dir.path());
        HelloSite {
            d,
            agent,
            port,
            pki,
            server,
            up,
            ca_dir,
        }
    }
}

impl HelloSite {
    /// A control: curl outside agents (`curl_args`, then the URL of `path`) reaches the server
    /// and gets its answer.
    pub fn assert_reached_outside_agents(&self, curl_args: &[&str], path: &str) {
        let port = self.port;
        let (ca, resolve, url) = (
            ca(&self.pki),
            format!("ok.test:{port}:127.0.0.3"),
            format!("https://ok.test:{port}{path}"),
        );
        let mut args = vec!["--cacert", ca.as_str(), "--resolve", resolve.as_str()];
        args.extend(curl_args);
        args.push(&url);
        let out = curl_outside(&args);
        assert!(
            out.status.success(),
            "outside agents: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), format!("hello ok.test:{port}"));
    }
}
