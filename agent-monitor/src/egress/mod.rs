//! The egress endpoint: where the kernel redirects an agent's connects to addresses it learned
//! for names with request rules (`[[network.http]]`, `[[network.tls]]`). For each connection it
//! finds the flow (agent, task, original destination) by its token, peeks at the opening bytes,
//! checks the server name (TLS SNI, or plain-HTTP `Host`) against the rules and the name the
//! address was learned from, then passes the bytes unchanged (`tls` rules), hands the connection
//! to interception (`http` rules), or refuses it; every connection is reported.
//!
//! The monitor owns the facts (records, policies, learned names): the endpoint asks it through
//! [`EgressInput`] and reports back the same way.

mod endpoint;
pub mod handover;
pub mod hello;
pub mod judge;
pub mod kernel_names;
mod kernel_relay;
mod relay;
pub mod sock_destroy;

use std::net::SocketAddr;

use tokio::sync::oneshot;

pub use endpoint::Endpoint;

/// How the bytes of a connection admitted by a server-name rule pass (`daemon --egress-relay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayChoice {
    /// splice(2) through pipes, driven by the daemon (`relay.rs`).
    Splice,
    /// The kernel's sockmap relay (`kernel_relay.rs`); splice where it cannot be had.
    Kernel,
}

/// Where the server name of a connection with only server-name rules is judged
/// (`daemon --server-names`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerNameCheck {
    /// In the kernel, on the agent's own connection: it goes straight to the server, and its
    /// first bytes are judged where its packets leave (`kernel_names`, the eBPF `server_name`).
    Kernel,
    /// In the egress endpoint, which the connection is redirected to and which then passes its
    /// bytes (`--egress-relay`).
    Endpoint,
}

use crate::action::{EgressConnection, Verdict};
use crate::event::Subject;
use crate::policy::http::EgressRules;

/// What the endpoint asks of and tells the monitor.
#[derive(Debug)]
pub enum EgressInput {
    Query(FlowQuery),
    Report(Box<FlowReport>),
    /// A request interception judged, on a connection of `subject`.
    Request(Box<RequestDone>),
}

/// A request of an intercepted connection, judged and answered.
#[derive(Debug)]
pub struct RequestDone {
    pub subject: Subject,
    pub report: crate::intercept::RequestReport,
}

/// Which flow is behind `token` (the host part of the accepted connection's source address)?
#[derive(Debug)]
pub struct FlowQuery {
    pub token: u32,
    pub reply: oneshot::Sender<Result<FlowInfo, String>>,
}

/// A redirected flow as the monitor knows it.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    pub agent: String,
    pub task: Option<String>,
    pub enforce: bool,
    pub original: SocketAddr,
    pub rules: EgressRules,
    /// The names this agent resolved to the original address (normalised, live).
    pub learned: Vec<String>,
    /// The process behind the connect (the kernel's redirect record).
    pub subject: Subject,
}

/// One connection, judged and finished (or refused), for the monitor to attribute and report.
#[derive(Debug)]
pub struct FlowReport {
    pub subject: Subject,
    pub connection: EgressConnection,
    pub verdict: Verdict,
    /// How a refusal was carried out (`closed`), if it was.
    pub enforcement: Option<&'static str>,
    pub reason: String,
}

/// Why the kernel refused (alert mode: reported) a connect or datagram to a destination with
/// request rules, or an agent's own connect to the endpoint.
pub fn refused_reason(send: bool, sock_type: u32, verdict: Verdict) -> String {
    let what = if send || sock_type != agent_monitor_common::SOCK_STREAM {
        "UDP to a destination with request rules (network.http/network.tls) is refused: its \
         server name cannot be judged (QUIC/HTTP3); clients fall back to TCP"
    } else {
        "a connect to a destination with request rules could not go through the egress endpoint \
         (the socket was bound before its connect, or no endpoint runs), or went to the endpoint \
         itself"
    };
    match verdict {
        Verdict::Alert => format!("{what} (alert mode: let through)"),
        _ => what.to_string(),
    }
}
