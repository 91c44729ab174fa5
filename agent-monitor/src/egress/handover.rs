//! Where a connection whose server name has method/path rules (`[[network.http]]`) goes: TLS
//! termination and per-request judging (`crate::intercept`). Each judged request comes back to
//! the monitor as an `ACTION=http` action of the process behind the connect.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{EgressInput, FlowInfo, RequestDone};
use crate::intercept::{self, Interceptor, Reports};
use crate::policy::http::HttpRule;

/// Request reports of one connection that may wait for the monitor; beyond, they are counted as
/// lost (`intercept::Reports`) and the count is logged when the connection ends.
const REPORTS_PER_CONNECTION: usize = 256;

/// A connection the endpoint accepted and judged on its server name, with what interception
/// needs: whose it is, where it was going, and the rules for its requests. The stream still holds
/// every byte the client sent (the endpoint only peeked).
#[derive(Clone, Debug)]
pub struct Flow {
    pub agent: String,
    pub task: Option<String>,
    pub original: SocketAddr,
    pub sni: Option<String>,
    pub rules: Vec<HttpRule>,
}

impl Flow {
    /// Interception's view: the server name is known (the endpoint admitted it), the rules are
    /// plain, and the agent's mode says what a request off the rules gets.
    fn for_interception(self, sni: String, enforce: bool) -> intercept::Flow {
        intercept::Flow {
            // Ask mode refuses (`enforce`): an HTTP request is not held for an operator.
            on_miss: if enforce {
                intercept::OnMiss::Refuse
            } else {
                intercept::OnMiss::Forward
            },
            agent: self.agent,
            task: self.task,
            original: self.original,
            sni,
            rules: intercept::from_policy::rules_of(&self.rules),
        }
    }
}

/// Hands `stream` to interception; without an interceptor (no CA) or a server name, refuses it.
pub async fn handover(
    mut stream: TcpStream,
    flow: Flow,
    interceptor: Option<Interceptor>,
    inputs: &mpsc::Sender<EgressInput>,
    info: &FlowInfo,
) {
    let (Some(interceptor), Some(sni)) = (interceptor, flow.sni.clone()) else {
        tracing::warn!(
            agent = flow.agent,
            original = %flow.original,
            "HTTP method/path rules need interception, which is off (no CA; see the start-up \
             log) or had no server name: connection refused"
        );
        let _ = stream.shutdown().await;
        return;
    };
    let agent = flow.agent.clone();
    let (reports, mut rx) = Reports::channel(REPORTS_PER_CONNECTION);
    // Each request's report goes to the monitor with the process behind the connect.
    let forward = {
        let inputs = inputs.clone();
        let subject = info.subject.clone();
        tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                let done = RequestDone {
                    subject: subject.clone(),
                    report,
                };
                if inputs
                    .send(EgressInput::Request(Box::new(done)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    if let Err(e) = intercept::intercept(
        stream,
        flow.for_interception(sni, info.enforce),
        &interceptor,
        &reports,
    )
    .await
    {
        tracing::info!(agent, "intercepted connection ended: {e}");
    }
    let lost = reports.lost();
    drop(reports);
    let _ = forward.await;
    if lost > 0 {
        tracing::error!(
            agent,
            lost,
            "request reports of an intercepted connection were lost (the monitor fell behind)"
        );
    }
}
