//! HTTP interception: for a connection the egress endpoint hands over (an agent's TLS connection to
//! a host with method/path rules), terminate TLS with a leaf certificate from the local CA, judge
//! every request (method, normalised path, `Host` = SNI) and pass the allowed ones upstream over a
//! new verified TLS connection; denied ones get a 403 naming agent-monitor, the agent and the
//! missing rule. See docs/http-interception.md.

// The egress endpoint (issue 16's other half: the kernel redirect, SNI checks, the accept loop)
// calls `intercept`; until it is merged the serving path has no caller outside the tests.

pub mod agent_env;
pub mod ca;
pub mod command;
mod leaves;
mod metered;
mod proxy;
pub mod rules;
#[cfg(test)]
mod tests;
mod upstream;
// The policy's rules in interception's form (egress handover, `policy test`).
pub mod from_policy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use ca::{CaError, CaFiles, LocalCa};
pub use rules::Rule;

/// One intercepted connection, as the egress endpoint hands it over.
#[derive(Clone, Debug)]
pub struct Flow {
    pub agent: String,
    pub task: Option<String>,
    /// The destination the agent connected to (before the kernel's redirect).
    pub original: SocketAddr,
    /// The server name the endpoint read from the ClientHello (checked again here).
    pub sni: String,
    /// The agent's method/path rules (those for other hosts never match).
    pub rules: Vec<Rule>,
    /// What a request the rules do not allow gets (the agent's mode).
    pub on_miss: OnMiss,
}

/// What a request the rules do not allow gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMiss {
    /// A 403 naming agent-monitor (enforce mode; ask mode too: requests are not held).
    Refuse,
    /// Passed upstream as the agent sent it and reported as an alert (alert mode).
    Forward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Not allowed by the rules, forwarded anyway (alert mode).
    Alert,
}

impl Verdict {
    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Alert => "alert",
        }
    }
}

/// One judged request, reported when its response has ended (or, for a WebSocket, when the
/// tunnel closes).
#[derive(Clone, Debug)]
pub struct RequestReport {
    // The daemon attributes a report by its connection's process; these name it in tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub agent: String,
    #[cfg_attr(not(test), allow(dead_code))]
    pub task: Option<String>,
    pub original: SocketAddr,
    /// Upper case.
    pub method: String,
    /// Normalised (as judged and sent upstream), or as received when it could not be normalised.
    pub path: String,
    /// The `Host` header or `:authority` as the agent sent it.
    pub host: String,
    pub sni: String,
    /// What the agent got: the upstream status (alert mode too), 403 for a denial, 502 when
    /// upstream failed.
    pub status: u16,
    /// Response body bytes (or WebSocket bytes) that came in from upstream to the agent.
    pub bytes_in: u64,
    /// Request body bytes (or WebSocket bytes) the agent sent out.
    pub bytes_out: u64,
    /// From the request's head to the end of its response.
    pub duration: Duration,
    pub verdict: Verdict,
    /// The rule that allowed the request, as written.
    pub rule: Option<String>,
    /// Why it was denied (or, in alert mode, would have been): what is missing.
    pub missing: Option<String>,
}

impl RequestReport {
    /// A request of `flow` just read: no status, bytes or verdict yet.
    pub fn opened(flow: &Flow, sni: &str, method: &str, path: &str, host: &str) -> RequestReport {
        RequestReport {
            agent: flow.agent.clone(),
            task: flow.task.clone(),
            original: flow.original,
            method: method.to_string(),
            path: path.to_string(),
            host: host.to_string(),
            sni: sni.to_string(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            verdict: Verdict::Allowed,
            rule: None,
            missing: None,
        }
    }
}

/// Where request reports go: a bounded channel; a report that does not fit is counted, never
/// waited for (the agent's traffic does not stall behind the reporter).
#[derive(Clone, Debug)]
pub struct Reports {
    tx: tokio::sync::mpsc::Sender<RequestReport>,
    lost: Arc<AtomicU64>,
}

impl Reports {
    pub fn channel(capacity: usize) -> (Reports, tokio::sync::mpsc::Receiver<RequestReport>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (
            Reports {
                tx,
                lost: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    pub fn send(&self, report: RequestReport) {
        if self.tx.try_send(report).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports that found the channel full or closed.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// The daemon's interception flags.
#[derive(clap::Args, Clone, Debug)]
pub struct InterceptArgs {
    /// Directory of the local CA that signs the certificates agents see on intercepted HTTPS
    /// connections (created on first start; its key is root's only). `run` hands agents
    /// `bundle.pem` from here.
    #[arg(long, value_name = "DIR", default_value = ca::DEFAULT_CA_DIR)]
    pub ca_dir: PathBuf,
    /// Verify the servers behind intercepted connections against the CA certificates in this PEM
    /// file instead of the system trust store.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_bundle: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("reading the upstream CA bundle {path}: {why}")]
    UpstreamBundle { path: PathBuf, why: String },
    #[error("no usable root certificate for upstream verification ({0})")]
    NoRoots(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the agent's TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the ClientHello names {got:?}, the connection was admitted for {want}")]
    ServerName { got: Option<String>, want: String },
    #[error("serving HTTP to the agent: {0}")]
    Serve(hyper::Error),
}

/// What the egress endpoint holds for interception: the CA, the leaf cache and the upstream TLS
/// configurations. Cheap to clone (shared).
#[derive(Clone)]
pub struct Interceptor {
    inner: Arc<Shared>,
}

struct Shared {
    files: CaFiles,
    /// Replaced whole on rotation: connections in flight keep the CA they started with.
    issuing: RwLock<Arc<leaves::Issuing>>,
    upstream: upstream::Configs,
}

impl Interceptor {
    /// The daemon's start: read or create the CA, (re)write the agents' bundle, load the
    /// upstream roots. Returns a line for the log.
    pub fn start(args: &InterceptArgs) -> Result<(Interceptor, String), InterceptError> {
        let files = CaFiles::new(&args.ca_dir);
        let (ca, created) = LocalCa::load_or_create(&files)?;
        let roots = ca.write_bundle(&files)?;
        let upstream = upstream::Configs::load(args.upstream_ca_bundle.as_deref())?;
        let note = format!(
            "HTTP interception: {} CA {} (SHA-256 {}); agents' bundle {} ({roots} system roots)",
            if created { "created" } else { "loaded" },
            files.cert().display(),
            ca.fingerprint(),
            files.bundle().display()
        );
        Ok((Self::with(files, ca, upstream), note))
    }

    /// An interceptor from parts (tests: a CA in a temporary directory, a test upstream CA).
    pub fn with(files: CaFiles, ca: LocalCa, upstream: upstream::Configs) -> Interceptor {
        Interceptor {
            inner: Arc::new(Shared {
                files,
                issuing: RwLock::new(Arc::new(leaves::Issuing::new(ca))),
                upstream,
            }),
        }
    }

    /// Re-read the CA from disk (the daemon's reload, after `ca rotate`). Returns the new
    /// fingerprint if the CA changed; the leaf cache starts empty with it.
    pub fn reload_ca(&self) -> Result<Option<String>, InterceptError> {
        let ca = LocalCa::load(&self.inner.files)?;
        if ca.fingerprint() == self.fingerprint() {
            return Ok(None);
        }
        ca.write_bundle(&self.inner.files)?;
        let fingerprint = ca.fingerprint();
        let fresh = Arc::new(leaves::Issuing::new(ca));
        match self.inner.issuing.write() {
            Ok(mut current) => *current = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(Some(fingerprint))
    }

    fn issuing(&self) -> Arc<leaves::Issuing> {
        match self.inner.issuing.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn fingerprint(&self) -> String {
        self.issuing().ca().fingerprint()
    }

    /// The bundle `run` hands agents (system roots + this CA).
    pub fn bundle_path(&self) -> PathBuf {
        self.inner.files.bundle()
    }
}

/// Serve one intercepted connection until the agent or upstream closes it. `client` arrives with
/// the ClientHello unread. Each request's report goes to `reports` when its response has ended.
pub async fn intercept(
    client: tokio::net::TcpStream,
    flow: Flow,
    ctx: &Interceptor,
    reports: &Reports,
) -> Result<(), InterceptError> {
    proxy::serve(client, flow, ctx.clone(), reports.clone()).await
}
