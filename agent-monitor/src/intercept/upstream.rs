//! The upstream side of an intercepted connection: new TLS connections to the original
//! destination, verified against the system trust store (or `--upstream-ca-bundle`), with the
//! agent's server name; a small pool of hyper client connections per agent connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::InterceptError;
use super::leaves::provider;
use super::metered::Metered;

/// The body sent upstream: the agent's, counted.
pub type UpBody = Metered<Incoming>;

/// Client configurations: one offering h2 and http/1.1 (for agents that speak h2), one offering
/// http/1.1 only (HTTP/1.1 agents, WebSocket upgrades).
#[derive(Clone)]
pub struct Configs {
    with_h2: Arc<rustls::ClientConfig>,
    http1_only: Arc<rustls::ClientConfig>,
}

impl Configs {
    /// Roots from `bundle` if given, else from the system trust store.
    pub fn load(bundle: Option<&Path>) -> Result<Configs, InterceptError> {
        let mut roots = rustls::RootCertStore::empty();
        match bundle {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| InterceptError::UpstreamBundle {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })?;
                let pems = pem::parse_many(&text).map_err(|e| InterceptError::UpstreamBundle {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })?;
                for p in pems.iter().filter(|p| p.tag() == "CERTIFICATE") {
                    roots.add(p.contents().to_vec().into()).map_err(|e| {
                        InterceptError::UpstreamBundle {
                            path: path.to_path_buf(),
                            why: e.to_string(),
                        }
                    })?;
                }
                if roots.is_empty() {
                    return Err(InterceptError::UpstreamBundle {
                        path: path.to_path_buf(),
                        why: "no CERTIFICATE in it".into(),
                    });
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found
                        .errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(InterceptError::NoRoots(why));
                }
            }
        }
        Self::with_roots(roots)
    }

    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Configs, InterceptError> {
        let roots = Arc::new(roots);
        let make = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, InterceptError> {
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(Configs {
            with_h2: make(&[b"h2", b"http/1.1"])?,
            http1_only: make(&[b"http/1.1"])?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("invalid server name {0:?}")]
    Name(String),
    #[error("TLS with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("HTTP with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
}

/// A hyper client connection upstream.
pub enum Sender {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

/// The upstream connections of one agent connection.
pub struct Upstream {
    configs: Configs,
    original: SocketAddr,
    sni: String,
    /// The agent speaks h2 (concurrent requests): offer h2 upstream too.
    agent_h2: bool,
    idle: Mutex<Vec<Sender>>,
}

/// At most this many idle HTTP/1.1 connections are kept per agent connection.
const IDLE_MAX: usize = 8;

impl Upstream {
    pub fn new(configs: Configs, original: SocketAddr, sni: String, agent_h2: bool) -> Self {
        Upstream {
            configs,
            original,
            sni,
            agent_h2,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A connection for the next request: an h2 one is shared, an HTTP/1.1 one is taken (and
    /// given back with `give_back` once the request is sent).
    pub async fn take(&self) -> Result<Sender, UpstreamError> {
        let reusable = {
            let mut idle = self.idle();
            idle.retain(|s| !s.is_closed());
            if let Some(Sender::H2(s)) = idle.iter().find(|s| s.is_h2()) {
                return Ok(Sender::H2(s.clone()));
            }
            idle.pop()
        };
        if let Some(Sender::H1(mut s)) = reusable {
            // An HTTP/1.1 agent sends its next request once the last response has ended: the
            // connection is ready now or in a moment. An h2 agent's concurrent request does
            // not wait for another's response.
            if s.is_ready() || (!self.agent_h2 && s.ready().await.is_ok()) {
                return Ok(Sender::H1(s));
            }
            if !self.agent_h2 {
                // Closed while waiting: a new connection below.
            } else if !s.is_closed() {
                self.give_back(Sender::H1(s));
            }
        }
        self.connect(self.agent_h2, false).await
    }

    pub fn give_back(&self, sender: Sender) {
        let mut idle = self.idle();
        if sender.is_h2() {
            if !idle.iter().any(|s| s.is_h2()) {
                idle.push(sender);
            }
        } else if idle.len() < IDLE_MAX {
            idle.push(sender);
        }
    }

    /// A new connection; `upgrades`: HTTP/1.1 only, for a WebSocket (never pooled).
    pub async fn connect(&self, offer_h2: bool, upgrades: bool) -> Result<Sender, UpstreamError> {
        let tcp = tokio::net::TcpStream::connect(self.original)
            .await
            .map_err(|e| UpstreamError::Connect(self.original, e))?;
        let _ = tcp.set_nodelay(true);
        let config = if offer_h2 && !upgrades {
            self.configs.with_h2.clone()
        } else {
            self.configs.http1_only.clone()
        };
        let name = rustls::pki_types::ServerName::try_from(self.sni.clone())
            .map_err(|_| UpstreamError::Name(self.sni.clone()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| UpstreamError::Tls(self.original, e))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = TokioIo::new(tls);
        let http = |e| UpstreamError::Http(self.original, e);
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream h2 connection: {e}");
                }
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(http)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!("upstream HTTP/1.1 connection: {e}");
                }
            });
            Ok(Sender::H1(sender))
        }
    }

    /// Send one request on `sender`.
    pub async fn send(
        &self,
        sender: &mut Sender,
        request: hyper::Request<UpBody>,
    ) -> Result<hyper::Response<Incoming>, UpstreamError> {
        let http = |e| UpstreamError::Http(self.original, e);
        match sender {
            Sender::H1(s) => s.send_request(request).await.map_err(http),
            Sender::H2(s) => s.send_request(request).await.map_err(http),
        }
    }
}
