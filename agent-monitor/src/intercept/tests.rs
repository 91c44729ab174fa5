//! The interceptor end to end, in process and without root: a local upstream TLS server signed by
//! a test CA, the interceptor in front of it on a loopback listener (as if the kernel had
//! redirected the agent's connect), and real clients (hyper, curl, python3) trusting the
//! agent-monitor CA and naming the upstream's server name.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;

const NAME: &str = "api.test";
const AGENT: &str = "coder";

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

fn text(s: impl Into<String>) -> TestBody {
    Full::new(Bytes::from(s.into())).boxed_unsync()
}

/// `n` bytes of zeros in 64 KiB frames, produced as they are read.
struct Zeros {
    left: u64,
}

static ZEROS: [u8; 65536] = [0; 65536];

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &ZEROS[..n as usize],
        )))))
    }
}

/// The upstream server: `/big?N` streams N bytes, `/ws` accepts a WebSocket-style upgrade and
/// echoes, everything else answers `METHOD PATH host=HOST proto=VERSION` (and the body length).
async fn upstream_service(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let head = format!(
        "{} {} host={} proto={:?}",
        req.method(),
        req.uri().path(),
        req.headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default(),
        req.version()
    );
    if req.uri().path() == "/big" {
        let n: u64 = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
        return Ok(Response::new(Zeros { left: n }.boxed_unsync()));
    }
    if req.uri().path() == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(text(""))
            .unwrap());
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Ok(Response::new(text(format!("{head} body={body}"))))
}

struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test upstream CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(leaves::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Serve TLS + HTTP (h2 or HTTP/1.1 by ALPN, with upgrades) on a loopback port.
async fn upstream_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let io = TokioIo::new(tls);
                let service = hyper::service::service_fn(upstream_service);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    addr
}

/// The set-up of every test: upstream, interceptor listener, the CA file clients trust.
struct Setup {
    listen: SocketAddr,
    ca_pem: std::path::PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    reports: tokio::sync::mpsc::Receiver<RequestReport>,
    _dir: tempfile::TempDir,
}

fn rules() -> Vec<Rule> {
    vec![Rule {
        host: NAME.into(),
        port: 0, // set to the upstream's port below
        methods: vec!["GET".into(), "HEAD".into()],
        paths: vec![
            "/repos/acme/*".into(),
            "/user".into(),
            "/big".into(),
            "/ws".into(),
        ],
        text: "host = \"api.test\" methods = [\"GET\", \"HEAD\"] paths = [...]".into(),
        line: 7,
    }]
}

async fn setup() -> Setup {
    let test_ca = TestCa::new();
    let original = upstream_server(test_ca.server_config(&[NAME, "other.test"])).await;
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles::new(dir.path().join("ca"));
    let (ca, _) = LocalCa::load_or_create(&files).unwrap();
    let ca_der = rustls::pki_types::CertificateDer::from(
        pem::parse(ca.cert_pem()).unwrap().contents().to_vec(),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(test_ca.der.clone()).unwrap();
    let ctx = Interceptor::with(
        files.clone(),
        ca,
        upstream::Configs::with_roots(roots).unwrap(),
    );
    let (reports, rx) = Reports::channel(1024);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    let mut rules = rules();
    for r in &mut rules {
        r.port = original.port();
    }
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let flow = Flow {
                agent: AGENT.into(),
                task: Some("t1".into()),
                original,
                sni: NAME.into(),
                rules: rules.clone(),
            };
            let (ctx, reports) = (ctx.clone(), reports.clone());
            tokio::spawn(async move {
                let _ = intercept(tcp, flow, &ctx, &reports).await;
            });
        }
    });
    Setup {
        listen,
        ca_pem: files.cert(),
        ca_der,
        reports: rx,
        _dir: dir,
    }
}

/// A TLS connection to the interceptor as an agent would make it (SNI `name`, trusting only the
/// agent-monitor CA), with the given ALPN.
async fn agent_tls(
    s: &Setup,
    name: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca_der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(leaves::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(s.listen).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
            tcp,
        )
        .await
        .expect("the agent trusts the leaf the interceptor presents")
}

async fn h1_client(s: &Setup) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let tls = agent_tls(s, NAME, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

fn request(method: &str, path: &str, host: &str, body: &str) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(text(body))
        .unwrap()
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> (StatusCode, String) {
    sender.ready().await.expect("the connection is still open");
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn next_report(s: &mut Setup) -> RequestReport {
    tokio::time::timeout(Duration::from_secs(5), s.reports.recv())
        .await
        .expect("a report within 5 s")
        .expect("the report channel is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_allowed_and_post_denied_on_one_keep_alive_connection() {
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let (status, body) = send(&mut c, request("GET", "/repos/acme/x", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("GET /repos/acme/x host=api.test"),
        "{body}"
    );
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Allowed);
    assert_eq!(
        (report.method.as_str(), report.path.as_str()),
        ("GET", "/repos/acme/x")
    );
    assert_eq!(report.status, 200);
    assert_eq!(report.bytes_in, body.len() as u64);
    assert!(report.rule.is_some());

    let (status, body) = send(&mut c, request("POST", "/repos/acme/x", NAME, "secret")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("agent-monitor"), "{body}");
    assert!(body.contains(AGENT), "{body}");
    assert!(body.contains("method POST not listed"), "{body}");
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Denied);
    assert_eq!(report.status, 403);
    assert!(report.missing.unwrap().contains("POST"));

    // The same connection still serves allowed requests; lower-case methods are the same method.
    let (status, body) = send(&mut c, request("get", "/user/", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("GET /user/ "),
        "upstream sees the judged method: {body}"
    );
    let (status, body) = send(&mut c, request("HEAD", "/user/", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(&mut c, request("GET", "//repos/./acme//y", NAME, "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with("GET /repos/acme/y "),
        "upstream sees the normalised path: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_list_and_escapes_are_denied() {
    let s = setup().await;
    let mut c = h1_client(&s).await;
    for path in [
        "/repos/other/x",
        "/repos/acme/../other",
        "/repos/acme/%2e%2e/other",
        "/..",
        "/repos/acme/..%2f..%2fx",
    ] {
        let (status, body) = send(&mut c, request("GET", path, NAME, "")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(body.contains(AGENT), "{body}");
    }
    // The control: the listed path on the same connection.
    let (status, _) = send(&mut c, request("GET", "/repos/acme/%7e", NAME, "")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_other_than_the_server_name_is_denied() {
    let s = setup().await;
    let mut c = h1_client(&s).await;
    let (status, body) = send(&mut c, request("GET", "/user", "other.test", "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("domain fronting"), "{body}");
    let (status, _) = send(&mut c, request("GET", "/user", "API.test.", "")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same name in another case is the same host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_for_another_name_is_refused() {
    let s = setup().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(leaves::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.listen).await.unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("other.test").unwrap(),
            tcp,
        )
        .await;
    assert!(
        handshake.is_err(),
        "no certificate for a name the flow was not admitted for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_judged_one_by_one() {
    let mut s = setup().await;
    let tls = agent_tls(&s, NAME, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, TestBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let uri = |p: &str| format!("https://{NAME}{p}");
    let mut get = sender.clone();
    let mut post = sender.clone();
    let (a, b) = tokio::join!(
        get.send_request(Request::get(uri("/repos/acme/h2")).body(text("")).unwrap()),
        post.send_request(
            Request::post(uri("/repos/acme/h2"))
                .body(text("x"))
                .unwrap()
        ),
    );
    let a = a.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    let body = a.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("GET /repos/acme/h2 host=api.test"),
        "{body}"
    );
    let b = b.unwrap();
    assert_eq!(b.status(), StatusCode::FORBIDDEN);
    let mut verdicts = vec![
        next_report(&mut s).await.verdict,
        next_report(&mut s).await.verdict,
    ];
    verdicts.sort_by_key(|v| v.as_str());
    assert_eq!(verdicts, vec![Verdict::Allowed, Verdict::Denied]);
    // :authority other than the SNI on the same h2 connection.
    let mut fronted = sender.clone();
    let r = fronted
        .send_request(
            Request::get("https://other.test/user")
                .body(text(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_download_streams_with_flat_memory() {
    const SIZE: u64 = 1 << 30;
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let started = std::time::Instant::now();
    let response = c
        .send_request(request("GET", &format!("/big?{SIZE}"), NAME, ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let before = rss_kib();
    let (mut got, mut peak) = (0u64, before);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            got += data.len() as u64;
            if got % (64 << 20) < data.len() as u64 {
                peak = peak.max(rss_kib());
            }
        }
    }
    assert_eq!(got, SIZE);
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 * 1024,
        "RSS grew by {grew} KiB while 1 GiB passed through (before {before} KiB)"
    );
    let report = next_report(&mut s).await;
    assert_eq!(report.bytes_in, SIZE);
    eprintln!(
        "1 GiB through the interceptor in {:?}; RSS {before} KiB -> peak {peak} KiB",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_judged_then_passed_through() {
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let upgrade = |path: &str| {
        Request::get(path)
            .header("host", NAME)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(text(""))
            .unwrap()
    };
    let denied = c.send_request(upgrade("/chat")).await.unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let _ = denied.into_body().collect().await;
    assert_eq!(next_report(&mut s).await.verdict, Verdict::Denied);
    c.ready().await.unwrap();
    let response = c.send_request(upgrade("/ws")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
    drop(io);
    let report = next_report(&mut s).await;
    assert_eq!((report.verdict, report.status), (Verdict::Allowed, 101));
    assert_eq!((report.bytes_out, report.bytes_in), (23, 23));
}

/// Run a command off the runtime's threads.
async fn output(cmd: &mut std::process::Command) -> std::process::Output {
    let mut cmd = std::mem::replace(cmd, std::process::Command::new("true"));
    tokio::task::spawn_blocking(move || cmd.output().expect("the program runs"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_and_http2_are_judged_per_request() {
    let s = setup().await;
    for proto in ["--http1.1", "--http2"] {
        let out = output(
            std::process::Command::new("curl")
                .args(["-sS", proto, "--cacert"])
                .arg(&s.ca_pem)
                .arg("--connect-to")
                .arg(format!("{NAME}:443:127.0.0.1:{}", s.listen.port()))
                .args(["-w", "|%{http_code} %{num_connects} %{http_version}\n"])
                .arg(format!("https://{NAME}/repos/acme/curl"))
                .args(["--next", proto, "--cacert"])
                .arg(&s.ca_pem)
                .arg("--connect-to")
                .arg(format!("{NAME}:443:127.0.0.1:{}", s.listen.port()))
                .args(["-w", "|%{http_code} %{num_connects} %{http_version}\n"])
                .args(["-X", "POST", "-d", "data"])
                .arg(format!("https://{NAME}/repos/acme/curl")),
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "curl {proto}: {stderr}");
        // In order: the GET's body and its first connection, then the 403 on the same one.
        let order = [
            "GET /repos/acme/curl host=api.test",
            "|200 1 ",
            "agent-monitor denied this request for agent coder",
            "method POST not listed",
            "|403 0 ",
        ];
        let mut at = 0;
        for want in order {
            let found = stdout[at..].find(want);
            assert!(
                found.is_some(),
                "curl {proto}: {want:?} after byte {at} in {stdout}"
            );
            at += found.unwrap_or(0) + want.len();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_get_allowed_post_denied_on_one_connection() {
    let s = setup().await;
    let script = r#"
import http.client, socket, ssl, sys
ca, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
class Redirected(http.client.HTTPSConnection):
    def connect(self):
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)
c = Redirected(name, context=ctx)
for method, body in (("GET", None), ("POST", b"x"), ("GET", None)):
    c.request(method, "/repos/acme/py", body=body)
    r = c.getresponse()
    print(method, r.status, r.read().decode().strip())
"#;
    let out = output(
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&s.ca_pem)
            .arg(s.listen.port().to_string())
            .arg(NAME),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("GET 200 GET /repos/acme/py"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("POST 403 agent-monitor denied"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("GET 200"),
        "the connection survived the denial: {stdout}"
    );
}
