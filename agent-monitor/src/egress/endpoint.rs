//! The egress endpoint's sockets: one listener on loopback for every agent (the kernel binds each
//! redirected socket to a source address that names its flow), one task per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_monitor_common::{EGRESS_IP4, egress_token_of};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::handover::{Flow, handover};
use super::hello::{MAX_PEEK, Opening, classify};
use super::judge::{Decision, judge};
use super::relay::relay_connection;
use super::{EgressInput, FlowInfo, FlowQuery, FlowReport};
use crate::action::{Destination, EgressConnection, Verdict};
use crate::bpf::egress_relay::EgressRelay;
use crate::intercept::Interceptor;

/// How long a client may take to send its ClientHello or request head.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two peeks that found no new bytes (a peek returns at once while any byte waits).
const PEEK_PAUSE: Duration = Duration::from_millis(2);

/// The running endpoint.
pub struct Endpoint {
    /// On `EGRESS_IP4`; the kernel redirects there.
    pub port: u16,
}

impl Endpoint {
    /// Listens on a free loopback port and serves every connection; the monitor answers
    /// `inputs`' queries and takes the reports. `interceptor`: where connections with method/path
    /// rules go (none: no CA, they are refused). `relay`: how server-name-checked bytes pass.
    pub async fn start(
        inputs: mpsc::Sender<EgressInput>,
        interceptor: Option<Interceptor>,
        relay: super::RelayChoice,
    ) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind((Ipv4Addr::from(EGRESS_IP4), 0)).await?;
        let port = listener.local_addr()?.port();
        let kernel = super::kernel_relay::start(relay);
        tokio::spawn(serve(listener, inputs, interceptor, kernel));
        Ok(Endpoint { port })
    }
}

async fn serve(
    listener: TcpListener,
    inputs: mpsc::Sender<EgressInput>,
    interceptor: Option<Interceptor>,
    kernel: Option<Arc<EgressRelay>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(connection(
                    stream,
                    peer,
                    inputs.clone(),
                    interceptor.clone(),
                    kernel.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: the client's connect stays queued.
                tracing::error!("egress endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One redirected connection, from accept to its report.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    inputs: mpsc::Sender<EgressInput>,
    interceptor: Option<Interceptor>,
    kernel: Option<Arc<EgressRelay>>,
) {
    let token = match peer.ip() {
        IpAddr::V4(v4) => egress_token_of(v4.octets()),
        IpAddr::V6(_) => None,
    };
    let Some(token) = token else {
        tracing::warn!(%peer, "egress endpoint: a connection the kernel did not redirect; closed");
        return;
    };
    let (reply, answer) = oneshot::channel();
    if inputs
        .send(EgressInput::Query(FlowQuery { token, reply }))
        .await
        .is_err()
    {
        return;
    }
    let info = match answer.await {
        Ok(Ok(info)) => info,
        Ok(Err(why)) => {
            tracing::warn!(%peer, "egress endpoint: {why}; connection closed");
            return;
        }
        Err(_) => return,
    };
    let started = Instant::now();
    let opening = peek_opening(&stream).await;
    let judgement = judge(&opening, &info.rules, info.original.port(), &info.learned);
    let (tls, sni, http_host) = match &opening {
        Opening::Tls(h) => (true, h.sni.clone(), None),
        Opening::BadTls(_) => (true, None, None),
        Opening::Http { host } => (false, None, host.clone()),
        Opening::Other | Opening::Incomplete => (false, None, None),
    };
    let mut connection = EgressConnection {
        destination: Destination {
            addr: info.original.ip(),
            port: info.original.port(),
            transport: "tcp",
        },
        tls,
        sni: sni.clone(),
        http_host,
        bytes_out: 0,
        bytes_in: 0,
        duration_ms: 0,
        request: None,
    };
    let mut reason = judgement.reason;
    let kernel = kernel.as_deref();
    let (verdict, enforcement) = match judgement.decision {
        Decision::Handover(rules) => {
            // Interception reports each request; this reports the connection's server name.
            let flow = Flow {
                agent: info.agent.clone(),
                task: info.task.clone(),
                original: info.original,
                sni,
                rules,
            };
            report(
                &inputs,
                &info,
                connection.clone(),
                Verdict::Allowed,
                None,
                reason.clone(),
            )
            .await;
            handover(stream, flow, interceptor, &inputs, &info).await;
            return;
        }
        Decision::Refuse if info.enforce => {
            drop(stream);
            (Verdict::Denied, Some("closed"))
        }
        Decision::Refuse => {
            reason.push_str(" (alert mode: passed unchanged)");
            splice(stream, info.original, &mut connection, &mut reason, kernel).await;
            (Verdict::Alert, None)
        }
        Decision::Splice => {
            splice(stream, info.original, &mut connection, &mut reason, kernel).await;
            (Verdict::Allowed, None)
        }
    };
    connection.duration_ms = started.elapsed().as_millis() as u64;
    report(&inputs, &info, connection, verdict, enforcement, reason).await;
}

async fn report(
    inputs: &mpsc::Sender<EgressInput>,
    info: &FlowInfo,
    connection: EgressConnection,
    verdict: Verdict,
    enforcement: Option<&'static str>,
    reason: String,
) {
    let report = FlowReport {
        subject: info.subject.clone(),
        connection,
        verdict,
        enforcement,
        reason,
    };
    if inputs
        .send(EgressInput::Report(Box::new(report)))
        .await
        .is_err()
    {
        tracing::error!(
            agent = info.agent,
            "egress endpoint: the monitor is gone; connection not reported"
        );
    }
}

/// Reads (without consuming) until the opening can be classified, the client stops sending, or
/// the timeout.
async fn peek_opening(stream: &TcpStream) -> Opening {
    let mut buf = vec![0u8; MAX_PEEK];
    let deadline = tokio::time::Instant::now() + OPENING_TIMEOUT;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return classify(&buf[..seen]),
        };
        let opening = classify(&buf[..n]);
        if opening != Opening::Incomplete || n == 0 || n == buf.len() {
            return opening;
        }
        if n == seen {
            tokio::time::sleep(PEEK_PAUSE).await;
        }
        seen = n;
    }
}

/// Passes the bytes both ways, unchanged, between the agent and `original`; counts them.
async fn splice(
    client: TcpStream,
    original: SocketAddr,
    connection: &mut EgressConnection,
    reason: &mut String,
    kernel: Option<&EgressRelay>,
) {
    let upstream = match TcpStream::connect(original).await {
        Ok(s) => s,
        Err(e) => {
            reason.push_str(&format!("; connecting to {original} failed: {e}"));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match relay_connection(client, upstream, kernel).await {
        (_, Ok(moved)) => {
            connection.bytes_out = moved.out;
            connection.bytes_in = moved.inn;
        }
        (_, Err(e)) => reason.push_str(&format!("; the connection broke: {e}")),
    }
}
