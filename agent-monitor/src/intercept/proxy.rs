//! One intercepted connection: the agent-side TLS handshake with a leaf for the SNI, a hyper
//! server (HTTP/1.1 with keep-alive and pipelining, or h2 by ALPN) judging each request, and the
//! allowed ones passed upstream, bodies streamed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::metered::{Counts, Direction, Metered, Pending};
use super::rules::{self, Judgement};
use super::upstream::Upstream;
use super::{Flow, InterceptError, Interceptor, OnMiss, Reports, RequestReport, Verdict};

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Everything one agent connection's requests share.
struct Conn {
    flow: Flow,
    sni: String,
    reports: Reports,
    upstream: Upstream,
}

pub async fn serve(
    client: tokio::net::TcpStream,
    flow: Flow,
    ctx: Interceptor,
    reports: Reports,
) -> Result<(), InterceptError> {
    let _ = client.set_nodelay(true);
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client)
        .await
        .map_err(InterceptError::Handshake)?;
    let sni = rules::normalise_host(&flow.sni);
    let hello_name = start
        .client_hello()
        .server_name()
        .map(rules::normalise_host);
    if hello_name.as_deref() != Some(sni.as_str()) {
        return Err(InterceptError::ServerName {
            got: hello_name,
            want: sni,
        });
    }
    let config = ctx.issuing().server_config(&sni)?;
    let tls = start
        .into_stream(config)
        .await
        .map_err(InterceptError::Handshake)?;
    let agent_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let conn = Arc::new(Conn {
        upstream: Upstream::new(
            ctx.inner.upstream.clone(),
            flow.original,
            sni.clone(),
            agent_h2,
        ),
        flow,
        sni,
        reports,
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let io = TokioIo::new(tls);
    let served = if agent_h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    served.map_err(InterceptError::Serve)
}

/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded as they are.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
];

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == hyper::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The authority the agent asked for: `:authority` (h2, absolute-form) or `Host`; both present and
/// different is itself a refusal.
fn requested_host(req: &Request<Incoming>) -> Result<String, String> {
    let header = req
        .headers()
        .get(header::HOST)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| "a Host header that is not text".to_string())
        })
        .transpose()?;
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    match (authority, header) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(&h) => Err(format!(
            "the request names two hosts (authority {a}, Host {h})"
        )),
        (Some(a), _) => Ok(a),
        (None, Some(h)) => Ok(h),
        (None, None) => Err("the request has no Host header".into()),
    }
}

/// Check that `host` (with an optional port) is the connection's server name and port.
fn host_is_sni(host: &str, sni: &str, port: u16) -> Result<(), String> {
    let authority: hyper::http::uri::Authority = host
        .parse()
        .map_err(|_| format!("the Host {host:?} is not a host name"))?;
    let name = rules::normalise_host(authority.host());
    if name != sni {
        return Err(format!(
            "the Host {name} is not the TLS server name {sni} (domain fronting)"
        ));
    }
    if let Some(p) = authority.port_u16()
        && p != port
    {
        return Err(format!(
            "the Host names port {p}, the connection is to port {port}"
        ));
    }
    Ok(())
}

fn full(text: String) -> ProxyBody {
    Full::new(Bytes::from(text))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

impl Conn {
    fn report(&self, method: &str, path: &str, host: &str) -> RequestReport {
        RequestReport::opened(&self.flow, &self.sni, method, path, host)
    }

    fn deny(
        &self,
        mut report: RequestReport,
        started: Instant,
        why: String,
    ) -> Response<ProxyBody> {
        let body = format!(
            "agent-monitor denied this request for agent {}: {why}\n",
            self.flow.agent
        );
        report.status = StatusCode::FORBIDDEN.as_u16();
        report.verdict = Verdict::Denied;
        report.missing = Some(why);
        report.duration = started.elapsed();
        self.reports.send(report);
        let mut response = Response::new(full(body));
        *response.status_mut() = StatusCode::FORBIDDEN;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    fn bad_gateway(
        &self,
        mut report: RequestReport,
        started: Instant,
        why: String,
    ) -> Response<ProxyBody> {
        report.status = StatusCode::BAD_GATEWAY.as_u16();
        report.missing = None;
        report.duration = started.elapsed();
        self.reports.send(report);
        let mut response = Response::new(full(format!("agent-monitor: upstream failed: {why}\n")));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response
    }

    /// Alert mode: a request the rules do not allow goes upstream anyway, reported as an alert
    /// with what is missing. Its path is the normal form when there is one (what the report
    /// names), else the path as sent; its host the one it named, else the server name.
    fn alerted(&self, mut report: RequestReport, why: String, req: &Request<Incoming>) -> Admitted {
        let raw_path = req.uri().path();
        let path = rules::normalise_path(raw_path)
            .map(|p| p.forward)
            .unwrap_or_else(|_| raw_path.to_string());
        let host = requested_host(req).unwrap_or_else(|_| self.sni.clone());
        report.verdict = Verdict::Alert;
        report.missing = Some(why);
        Admitted {
            method: report.method.clone(),
            report,
            host,
            path,
        }
    }
}

/// A request that passed: what `forward` needs.
struct Admitted {
    report: RequestReport,
    method: String,
    host: String,
    /// As sent upstream.
    path: String,
}

/// Judge one request: host, path, method. A refusal carries its report and the reason.
fn admit(conn: &Conn, req: &Request<Incoming>) -> Result<Admitted, (RequestReport, String)> {
    let method = rules::normalise_method(req.method().as_str());
    let raw_path = req.uri().path().to_string();
    let host = requested_host(req);
    let shown_host = host.clone().unwrap_or_default();
    let mut report = conn.report(&method, &raw_path, &shown_host);
    let host = match host {
        Ok(h) => h,
        Err(why) => return Err((report, why)),
    };
    if let Err(why) = host_is_sni(&host, &conn.sni, conn.flow.original.port()) {
        return Err((report, why));
    }
    let path = match rules::normalise_path(&raw_path) {
        Ok(p) => p,
        Err(e) => return Err((report, format!("the path {raw_path:?} is refused: {e}"))),
    };
    report.path = path.forward.clone();
    match rules::judge(
        &conn.flow.rules,
        &conn.sni,
        conn.flow.original.port(),
        &method,
        &path,
    ) {
        Judgement::Allowed(rule) => {
            report.rule = Some(rule.text.clone());
            Ok(Admitted {
                report,
                method,
                host,
                path: path.forward,
            })
        }
        Judgement::Denied(why) => Err((report, why)),
    }
}

/// A denied request's body: read and dropped when small and already on its way, so an
/// HTTP/1.1 connection stays usable for the next request; otherwise the connection is closed
/// after the 403 (returns false). A client waiting for `100 Continue` never gets it.
const DRAIN_MAX: u64 = 64 * 1024;

async fn drain(req: Request<Incoming>) -> bool {
    // h2 ends one stream (a reset once the response is out), never the connection; a body left
    // unread there only costs the client a stream error instead of the 403.
    let h1 = req.version() <= hyper::Version::HTTP_11;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let small = !req.headers().contains_key(header::EXPECT)
        && (hyper::body::Body::is_end_stream(req.body()) || length.is_some_and(|n| n <= DRAIN_MAX));
    if !small {
        return !h1;
    }
    let body = http_body_util::Limited::new(req.into_body(), DRAIN_MAX as usize);
    let drained = matches!(
        tokio::time::timeout(Duration::from_secs(2), body.collect()).await,
        Ok(Ok(_))
    );
    drained || !h1
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    match admit(&conn, &req) {
        Ok(admitted) => forward(&conn, req, admitted, started).await,
        Err((report, why)) if conn.flow.on_miss == OnMiss::Forward => {
            let admitted = conn.alerted(report, why, &req);
            forward(&conn, req, admitted, started).await
        }
        Err((report, why)) => {
            let keep = drain(req).await;
            let mut response = conn.deny(report, started, why);
            if !keep {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    admitted: Admitted,
    started: Instant,
) -> Response<ProxyBody> {
    let Admitted {
        mut report,
        method,
        host,
        path,
    } = admitted;
    // The request as the server will see it: the path that was judged, the query as sent.
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let upgrade = is_upgrade(&req);
    let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The server sees the method that was judged (`get` is judged, and sent, as `GET`).
    if let Ok(m) = hyper::Method::from_bytes(method.as_bytes()) {
        parts.method = m;
    }
    let counts = Arc::new(Counts::default());
    let body = Metered::new(body, counts.clone(), Direction::Out);

    let mut sender = match if upgrade {
        conn.upstream.connect(false, true).await
    } else {
        conn.upstream.take().await
    } {
        Ok(s) => s,
        Err(e) => return conn.bad_gateway(report, started, e.to_string()),
    };
    let to_h2 = sender.is_h2();
    parts.uri = match if to_h2 {
        format!("https://{host}{target}").parse()
    } else {
        target.parse()
    } {
        Ok(uri) => uri,
        Err(e) => return conn.bad_gateway(report, started, format!("request target: {e}")),
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if to_h2 {
        parts.version = hyper::Version::HTTP_2;
        // h2 carries the host in :authority; a Host header alongside is redundant.
        parts.headers.remove(header::HOST);
    } else {
        parts.version = hyper::Version::HTTP_11;
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    let sent = conn
        .upstream
        .send(&mut sender, Request::from_parts(parts, body))
        .await;
    if !upgrade {
        conn.upstream.give_back(sender);
    }
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return conn.bad_gateway(report, started, e.to_string()),
    };
    report.status = response.status().as_u16();
    let pending = Pending {
        report,
        started,
        reports: conn.reports.clone(),
        counts: counts.clone(),
    };
    if let Some(agent_side) = agent_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let server_side = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(agent_side, server_side, pending));
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, full(String::new()));
    }
    let (mut parts, body) = response.into_parts();
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    let body = Metered::new(body, counts, Direction::In).reporting(pending);
    Response::from_parts(parts, body.boxed_unsync())
}

/// Drop the connection's own headers (those `Connection` lists too); an upgrade keeps
/// `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        if upgrade && name == "connection" {
            continue;
        }
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// A WebSocket (or other upgraded protocol) after its 101: bytes copied both ways until either
/// side closes; the request's report carries the byte counts.
async fn tunnel(
    agent_side: hyper::upgrade::OnUpgrade,
    server_side: hyper::upgrade::OnUpgrade,
    pending: Pending,
) {
    let (agent, server) = match tokio::try_join!(agent_side, server_side) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            pending.finish();
            return;
        }
    };
    let (agent_read, agent_write) = tokio::io::split(TokioIo::new(agent));
    let (server_read, server_write) = tokio::io::split(TokioIo::new(server));
    // Counted as they pass: a side that closes without TLS close_notify ends its direction with
    // an error, and the bytes before it still count.
    let counts = pending.counts.clone();
    tokio::join!(
        pipe(agent_read, server_write, &counts.bytes_out),
        pipe(server_read, agent_write, &counts.bytes_in),
    );
    pending.finish();
}

/// Copy until EOF or an error on either side, counting; then shut the writer down.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    count: &std::sync::atomic::AtomicU64,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_must_be_the_server_name_and_port() {
        assert!(host_is_sni("api.example.com", "api.example.com", 443).is_ok());
        assert!(host_is_sni("API.example.com.:443", "api.example.com", 443).is_ok());
        let fronted = host_is_sni("evil.example.net", "api.example.com", 443).unwrap_err();
        assert!(fronted.contains("domain fronting"), "{fronted}");
        assert!(host_is_sni("api.example.com:8443", "api.example.com", 443).is_err());
        assert!(host_is_sni("a b", "api.example.com", 443).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut up = HeaderMap::new();
        up.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        up.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.len(), 2);
    }
}
