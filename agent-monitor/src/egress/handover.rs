//! Where a connection whose server name has method/path rules (`[[network.http]]`) goes: TLS
//! termination and per-request judging (`crate::intercept`, built separately).
//!
//! STUB — until the interception module is merged, [`handover`] refuses the flow. At the merge,
//! its body becomes `crate::intercept::intercept(stream, flow).await`.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::policy::http::HttpRule;

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

/// Hands `stream` over to interception. STUB: refuses it (the client sees the connection close).
pub async fn handover(mut stream: TcpStream, flow: Flow) {
    tracing::warn!(
        agent = flow.agent,
        task = flow.task.as_deref().unwrap_or("-"),
        original = %flow.original,
        sni = flow.sni.as_deref().unwrap_or("-"),
        rules = flow.rules.len(),
        "HTTP method/path interception is not built in yet: connection refused"
    );
    let _ = stream.shutdown().await;
}
