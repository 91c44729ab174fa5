//! The decision service (`daemon --approver-url URL`): each new held request is POSTed as its
//! `PendingRequest` JSON; the answer is `{"decision": "allow"|"deny", "scope": "once"|"task"|
//! "always", "ttl": "10m" or seconds, "reason": "…"}`. Plain HTTP/1 with hyper's connection-level
//! client (as the OTLP export); an error, a bad answer or no answer within the bound is a deny.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde::Deserialize;

use crate::control::{Decision, PendingRequest, Scope};

/// Why the decision service gave no decision (the request is denied, and this is counted).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApproverError {
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("answered HTTP {0}")]
    Status(hyper::StatusCode),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("unreadable answer: {0}")]
    Answer(String),
}

/// The service's answer, as it may write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    decision: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    ttl: Option<Ttl>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ttl {
    Seconds(u64),
    Text(String),
}

/// Reads the service's answer. `allow` without a scope is `once`. An Open Policy Agent data API
/// answer (`{"result": {...}}`) is read as its `result`.
pub(crate) fn parse_answer(body: &[u8]) -> Result<Decision, ApproverError> {
    let bad = |e: serde_json::Error| ApproverError::Answer(e.to_string());
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(bad)?;
    if let Some(result) = v.as_object_mut().and_then(|o| o.remove("result")) {
        v = result;
    }
    let a: Answer = serde_json::from_value(v).map_err(bad)?;
    match a.decision.as_str() {
        "deny" => Ok(Decision::Deny { reason: a.reason }),
        "allow" => {
            let scope = match a.scope.as_deref() {
                None | Some("once") => Scope::Once,
                Some("task") => Scope::Task,
                Some("always") => Scope::Always,
                Some(other) => {
                    return Err(ApproverError::Answer(format!(
                        "scope {other:?}: expected \"once\", \"task\" or \"always\""
                    )));
                }
            };
            let ttl_ms = match a.ttl {
                None => None,
                Some(Ttl::Seconds(s)) => Some(s.saturating_mul(1000)),
                Some(Ttl::Text(t)) => Some(
                    humantime::parse_duration(&t)
                        .map_err(|e| ApproverError::Answer(format!("ttl {t:?}: {e}")))?
                        .as_millis() as u64,
                ),
            };
            Ok(Decision::Allow { scope, ttl_ms })
        }
        other => Err(ApproverError::Answer(format!(
            "decision {other:?}: expected \"allow\" or \"deny\""
        ))),
    }
}

/// POSTs `request` to `url` and reads the decision, within `timeout` for the whole exchange.
pub(crate) async fn ask(
    url: &hyper::Uri,
    request: &PendingRequest,
    timeout: Duration,
) -> Result<Decision, ApproverError> {
    let body = serde_json::to_vec(request).map_err(|e| ApproverError::Answer(e.to_string()))?;
    tokio::time::timeout(timeout, post(url, body))
        .await
        .unwrap_or(Err(ApproverError::Timeout(timeout)))
}

async fn post(url: &hyper::Uri, body: Vec<u8>) -> Result<Decision, ApproverError> {
    let host = url.host().unwrap_or("localhost");
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| ApproverError::Connect(format!("{host}:{port}"), e))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("decision service connection: {e}");
        }
    });
    let authority = url.authority().map_or_else(String::new, |a| a.to_string());
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = send.send_request(req).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(ApproverError::Status(status));
    }
    parse_answer(&answer)
}
