//! The DNS proxy: one endpoint per agent (a UDP socket and a TCP listener on 127.0.0.1, and on ::1
//! when the host has it), so the endpoint a query arrives on says which agent asked. The kernel
//! sends each agent's port-53 traffic to its own endpoint (`DNS_PROXY` map).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_monitor_common::DnsProxy;
use anyhow::Context as _;
use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dns::message::{parse_answer, parse_query, reply_to, strip_addresses};
use crate::dns::{Outcome, QueryReport};
use crate::policy::Policy;
use crate::policy::model::Mode;

/// How the proxy reaches the real resolver.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `None`: no upstream could be found; every allowed query gets SERVFAIL.
    pub upstream: Option<SocketAddr>,
    /// Per query, connect and exchange together.
    pub timeout: Duration,
}

/// How long a TCP client may stay silent between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries one agent may have in flight at once; beyond it a query is answered SERVFAIL at once
/// (and counted), so a flood cannot exhaust the daemon's sockets.
const MAX_IN_FLIGHT: usize = 256;

/// What every query of one agent's endpoint needs.
struct Endpoint {
    agent: u32,
    /// The agent's policy in force: a reload sends the new one (see [`Proxies::update`]).
    policy: watch::Receiver<Policy>,
    config: Arc<ProxyConfig>,
    reports: mpsc::Sender<QueryReport>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Binds the endpoint of agent `agent` (kernel index) and serves it in the background. Returns its
/// ports for the kernel's `DNS_PROXY` map. IPv6 ports are 0 when `::1` cannot be bound: the kernel
/// then refuses the agent's IPv6 DNS (enforce mode) rather than let it through.
/// Every agent's DNS proxy, by index (the position its reports carry, stable across reloads:
/// a proxy is never removed, an agent added by a reload gets the next index).
pub struct Proxies {
    config: Arc<ProxyConfig>,
    reports: mpsc::Sender<QueryReport>,
    endpoints: Vec<(String, DnsProxy)>,
    policies: Vec<watch::Sender<Policy>>,
    /// Agent name → index, so a reload of thousands of agents stays linear.
    by_agent: std::collections::HashMap<String, usize>,
}

impl Proxies {
    pub fn new(config: Arc<ProxyConfig>, reports: mpsc::Sender<QueryReport>) -> Self {
        Proxies {
            config,
            reports,
            endpoints: Vec::new(),
            policies: Vec::new(),
            by_agent: Default::default(),
        }
    }

    /// (agent, ports) by index.
    pub fn endpoints(&self) -> &[(String, DnsProxy)] {
        &self.endpoints
    }

    /// Starts a proxy for `policy`'s agent unless it has one. Must run inside the tokio runtime.
    pub fn ensure(&mut self, policy: &Policy) -> anyhow::Result<()> {
        if self.by_agent.contains_key(policy.agent()) {
            return Ok(());
        }
        let index = self.endpoints.len() as u32;
        let (tx, rx) = watch::channel(policy.clone());
        let ports = spawn(
            index,
            policy.agent(),
            rx,
            self.config.clone(),
            self.reports.clone(),
        )?;
        tracing::debug!(agent = policy.agent(), ?ports, "DNS proxy endpoint");
        self.by_agent
            .insert(policy.agent().to_string(), self.endpoints.len());
        self.endpoints.push((policy.agent().to_string(), ports));
        self.policies.push(tx);
        Ok(())
    }

    /// Puts the policies of `set` in force in their agents' proxies (names a reload added or
    /// removed are answered by the new rules from the next query on).
    pub fn update<'a>(&self, set: impl IntoIterator<Item = &'a Policy>) {
        for policy in set {
            if let Some(&i) = self.by_agent.get(policy.agent()) {
                self.policies[i].send_replace(policy.clone());
            }
        }
    }
}

/// Binds the agent's endpoints on 127.0.0.1 and ::1 (UDP and TCP, ports chosen by the kernel)
/// and serves them on the runtime. Synchronous so that a reload can start one.
fn spawn(
    agent: u32,
    name: &str,
    policy: watch::Receiver<Policy>,
    config: Arc<ProxyConfig>,
    reports: mpsc::Sender<QueryReport>,
) -> anyhow::Result<DnsProxy> {
    let ep = Arc::new(Endpoint {
        agent,
        policy,
        config,
        reports,
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
    });
    let mut ports = DnsProxy::default();
    let (udp4, tcp4) = bind("127.0.0.1:0")
        .with_context(|| format!("binding the DNS proxy of agent {name:?} on 127.0.0.1"))?;
    ports.udp4 = udp4.local_addr()?.port();
    ports.tcp4 = tcp4.local_addr()?.port();
    tokio::spawn(serve_udp(udp4, ep.clone()));
    tokio::spawn(serve_tcp(tcp4, ep.clone()));
    match bind("[::1]:0") {
        Ok((udp6, tcp6)) => {
            ports.udp6 = udp6.local_addr()?.port();
            ports.tcp6 = tcp6.local_addr()?.port();
            tokio::spawn(serve_udp(udp6, ep.clone()));
            tokio::spawn(serve_tcp(tcp6, ep));
        }
        Err(e) => tracing::warn!(
            agent = name,
            "no IPv6 DNS proxy ({e:#}): the agent's DNS over IPv6 is refused"
        ),
    }
    Ok(ports)
}

fn bind(addr: &str) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?))
}

async fn serve_udp(sock: UdpSocket, ep: Arc<Endpoint>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier replies surface here; the socket stays usable.
                tracing::debug!("DNS proxy UDP receive: {e}");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, ep) = (sock.clone(), ep.clone());
        tokio::spawn(async move {
            if let Some(reply) = ep.answer(&query, "udp").await
                && let Err(e) = sock.send_to(&reply, from).await
            {
                tracing::warn!("DNS proxy: replying to {from}: {e}");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, ep: Arc<Endpoint>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ep = ep.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp_client(stream, &ep).await {
                        tracing::debug!("DNS proxy TCP client: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("DNS proxy TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// RFC 1035 4.2.2: each message is preceded by its length as two bytes.
async fn serve_tcp_client(mut stream: TcpStream, ep: &Endpoint) -> std::io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => len,
            // Closed or idle: done.
            _ => return Ok(()),
        };
        let mut query = vec![0u8; usize::from(len)];
        stream.read_exact(&mut query).await?;
        if let Some(reply) = ep.answer(&query, "tcp").await {
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
            stream.write_u16(len).await?;
            stream.write_all(&reply[..usize::from(len)]).await?;
        }
    }
}

impl Endpoint {
    /// Judges one query and produces the reply for the agent (`None`: nothing to send).
    async fn answer(&self, query: &[u8], transport: &'static str) -> Option<Vec<u8>> {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            self.report(String::new(), String::new(), transport, Outcome::Overloaded)
                .await;
            return reply_to(query, ResponseCode::ServFail);
        };
        let q = match parse_query(query) {
            Ok(q) => q,
            Err(u) => {
                self.report(
                    String::new(),
                    String::new(),
                    transport,
                    Outcome::Malformed { reason: u.reason },
                )
                .await;
                return u.response;
            }
        };
        let (mut decision, enforce, ask) = {
            let policy = self.policy.borrow();
            (
                policy.check_name(&q.name),
                policy.mode() == Mode::Enforce,
                policy.mode() == Mode::Ask,
            )
        };
        // Ask mode: the query waits for a decision (the monitor's ask desk; it times out there).
        let mut refused_after_ask = false;
        if !decision.allowed && ask {
            let (reply, answer) = oneshot::channel();
            self.report(
                q.name.clone(),
                q.qtype.clone(),
                transport,
                Outcome::Ask { reply },
            )
            .await;
            match answer.await {
                Ok(Some(ports)) => {
                    decision.allowed = true;
                    decision.ports = ports;
                    decision.reason = "approved (ask mode)".into();
                }
                // Denied, timed out, withdrawn, or the monitor is gone: refused as in enforce.
                Ok(None) | Err(_) => refused_after_ask = true,
            }
        }
        if !decision.allowed && (enforce || refused_after_ask) {
            // Nothing leaves the host for a name off the list: this is what stops exfiltration
            // through query names.
            let reason = if refused_after_ask {
                format!("{} (ask mode: not approved)", decision.reason)
            } else {
                decision.reason
            };
            self.report(q.name, q.qtype, transport, Outcome::Refused { reason })
                .await;
            return reply_to(query, ResponseCode::Refused);
        }
        let upstream = self.forward(query, transport).await.and_then(|bytes| {
            parse_answer(&bytes, q.id, &q.name)
                .map(|a| (bytes, a))
                .map_err(UpstreamError::from)
        });
        let (bytes, answer) = match upstream {
            Ok(r) => r,
            Err(reason) => {
                self.report(
                    q.name,
                    q.qtype,
                    transport,
                    Outcome::UpstreamFailed {
                        allowed: decision.allowed,
                        reason: reason.to_string(),
                    },
                )
                .await;
                return reply_to(query, ResponseCode::ServFail);
            }
        };
        let must_install = decision.allowed && !answer.addrs.is_empty();
        let (tx, rx) = oneshot::channel();
        self.report(
            q.name,
            q.qtype,
            transport,
            Outcome::Answered {
                allowed: decision.allowed,
                reason: decision.reason,
                rcode: answer.rcode,
                addrs: answer.addrs,
                cnames: answer.cnames,
                ports: decision.ports,
                installed: must_install.then_some(tx),
            },
        )
        .await;
        if must_install {
            // The reply waits until the addresses are in the kernel map: the agent's connect
            // right after it must find them. A failure was logged and counted by the monitor.
            let installed = match rx.await {
                Ok(Ok(installed)) => installed,
                Ok(Err(_)) | Err(_) => return reply_to(query, ResponseCode::ServFail),
            };
            if !installed.strip.is_empty() {
                // The agent's resolver only sees addresses it may reach; when none is left it
                // gets SERVFAIL for the limit (room comes back as answers expire), REFUSED for
                // non-public answers (that does not change).
                return match strip_addresses(&bytes, &installed.strip) {
                    Ok((reply, left)) if left > 0 => Some(reply),
                    Ok(_) if !installed.limit_reached => reply_to(query, ResponseCode::Refused),
                    _ => reply_to(query, ResponseCode::ServFail),
                };
            }
        }
        Some(bytes)
    }

    async fn report(&self, name: String, qtype: String, transport: &'static str, outcome: Outcome) {
        let report = QueryReport {
            agent: self.agent,
            name,
            qtype,
            transport,
            outcome,
        };
        if self.reports.send(report).await.is_err() {
            tracing::warn!("DNS proxy: the monitor stopped; query not reported");
        }
    }

    /// Sends the agent's query bytes unchanged to the upstream, over the transport the agent used
    /// (a truncated UDP answer makes the agent retry over TCP, which comes here as TCP).
    async fn forward(&self, query: &[u8], transport: &str) -> Result<Vec<u8>, UpstreamError> {
        let Some(upstream) = self.config.upstream else {
            return Err(UpstreamError::NotConfigured);
        };
        let exchange = async {
            if transport == "tcp" {
                tcp_exchange(upstream, query).await
            } else {
                udp_exchange(upstream, query).await
            }
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(source)) => Err(UpstreamError::Exchange { upstream, source }),
            Err(_) => Err(UpstreamError::Timeout {
                upstream,
                timeout: self.config.timeout,
            }),
        }
    }
}

/// Why a forwarded query got no usable answer (the agent gets SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream DNS server configured")]
    NotConfigured,
    #[error("upstream {upstream}: {source}")]
    Exchange {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream} did not answer within {} ms", timeout.as_millis())]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error(transparent)]
    Answer(#[from] crate::dns::message::AnswerError),
}

/// One query over a fresh connected UDP socket: only the upstream can answer it, and a
/// port-unreachable error ends the wait at once.
pub async fn udp_exchange(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Same id as the query; anything else is a stray datagram.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

pub async fn tcp_exchange(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::other("query longer than 65535 bytes"))?;
    s.write_u16(len).await?;
    s.write_all(query).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}
