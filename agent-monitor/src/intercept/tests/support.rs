//! Fixtures of the interceptor's in-process tests: a test CA and an upstream TLS server signed
//! by it (HTTP/1.1 and h2, streaming, WebSocket echo, or `git http-backend`), the interceptor in
//! front of it on a loopback listener, and clients that speak to it as an agent would.

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

use super::super::*;

pub(super) const NAME: &str = "api.test";
pub(super) const AGENT: &str = "coder";

pub(super) type TestBody = UnsyncBoxBody<Bytes, Infallible>;

pub(super) fn text(s: impl Into<String>) -> TestBody {
    Full::new(Bytes::from(s.into())).boxed_unsync()
}

/// `n` bytes of zeros in 64 KiB frames, produced as they are read.
pub(super) struct Zeros {
    left: u64,
}

pub(super) static ZEROS: [u8; 65536] = [0; 65536];

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
pub(super) async fn upstream_service(
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
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

pub(super) struct TestCa {
    pub(super) issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub(super) der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCa {
    pub(super) fn new() -> TestCa {
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

    pub(super) fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
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

pub(super) type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> Pin<
            Box<dyn std::future::Future<Output = Result<Response<TestBody>, Infallible>> + Send>,
        > + Send
        + Sync,
>;

/// Serve TLS + HTTP (h2 or HTTP/1.1 by ALPN, with upgrades) on a loopback port.
pub(super) async fn upstream_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_upstream(
        listener,
        config,
        Arc::new(|req| Box::pin(upstream_service(req))),
    )
}

pub(super) fn serve_upstream(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handler: Handler,
) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let io = TokioIo::new(tls);
                let service = hyper::service::service_fn(move |req| handler(req));
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
pub(super) struct Setup {
    pub(super) listen: SocketAddr,
    pub(super) ca_pem: std::path::PathBuf,
    pub(super) ca_der: rustls::pki_types::CertificateDer<'static>,
    pub(super) reports: tokio::sync::mpsc::Receiver<RequestReport>,
    pub(super) _dir: tempfile::TempDir,
    /// The upstream server and its CA (direct measurements).
    pub(super) original: SocketAddr,
    pub(super) upstream_ca: rustls::pki_types::CertificateDer<'static>,
}

pub(super) fn rules() -> Vec<Rule> {
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

pub(super) async fn setup() -> Setup {
    setup_with(OnMiss::Refuse).await
}

/// The set-up for an agent whose requests off the rules get `on_miss` (its mode).
pub(super) async fn setup_with(on_miss: OnMiss) -> Setup {
    let test_ca = TestCa::new();
    let original = upstream_server(test_ca.server_config(&[NAME, "other.test"])).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    front(&test_ca, original, rules(), listener, on_miss)
}

/// The interceptor on `listener`, in front of `original`, for agent `AGENT` and server name
/// `NAME`; the rules' port is the original's.
pub(super) fn front(
    test_ca: &TestCa,
    original: SocketAddr,
    mut rules: Vec<Rule>,
    listener: TcpListener,
    on_miss: OnMiss,
) -> Setup {
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
    let listen = listener.local_addr().unwrap();
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
                on_miss,
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
        original,
        upstream_ca: test_ca.der.clone(),
    }
}

/// A TLS connection to the interceptor as an agent would make it (SNI `name`, trusting only the
/// agent-monitor CA), with the given ALPN.
pub(super) async fn agent_tls(
    s: &Setup,
    name: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_to(s.listen, &s.ca_der, name, alpn)
        .await
        .expect("the agent trusts the leaf the interceptor presents")
}

/// A TLS client connection to `addr` trusting only `ca`.
pub(super) async fn tls_to(
    addr: SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(leaves::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
            tcp,
        )
        .await
}

pub(super) async fn h1_client(s: &Setup) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let tls = agent_tls(s, NAME, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

pub(super) fn request(method: &str, path: &str, host: &str, body: &str) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(text(body))
        .unwrap()
}

pub(super) async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> (StatusCode, String) {
    sender.ready().await.expect("the connection is still open");
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub(super) async fn next_report(s: &mut Setup) -> RequestReport {
    tokio::time::timeout(Duration::from_secs(5), s.reports.recv())
        .await
        .expect("a report within 5 s")
        .expect("the report channel is open")
}

pub(super) fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Run a command off the runtime's threads.
pub(super) async fn output(cmd: &mut std::process::Command) -> std::process::Output {
    let mut cmd = std::mem::replace(cmd, std::process::Command::new("true"));
    tokio::task::spawn_blocking(move || cmd.output().expect("the program runs"))
        .await
        .unwrap()
}

/// `git http-backend` as a CGI program behind a hyper handler (smart HTTP).
pub(super) async fn git_backend(
    root: std::path::PathBuf,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let query = req.uri().query().unwrap_or("").to_string();
    let (ctype, encoding) = (header("content-type"), header("content-encoding"));
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new("git")
            .arg("http-backend")
            .env("GIT_PROJECT_ROOT", &root)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REMOTE_USER", "tester")
            .env("REMOTE_ADDR", "127.0.0.1")
            .env("REQUEST_METHOD", method)
            .env("PATH_INFO", path)
            .env("QUERY_STRING", query)
            .env("CONTENT_TYPE", ctype)
            .env("HTTP_CONTENT_ENCODING", encoding)
            .env("CONTENT_LENGTH", body.len().to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        out.stdout
    })
    .await
    .unwrap();
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let end = end.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let (at, sep) = end.expect("CGI headers");
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(&out[..at]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.trim()[..3].parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name.trim(), value.trim());
        }
    }
    Ok(response
        .body(Full::new(Bytes::copy_from_slice(&out[at + sep..])).boxed_unsync())
        .unwrap())
}

pub(super) fn git(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> std::process::Output {
    let mut cmd = std::process::Command::new("git");
    cmd.current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "protocol.version=2",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub(super) async fn h1_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
