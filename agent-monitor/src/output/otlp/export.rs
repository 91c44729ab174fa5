//! The exporter task: takes queued records in batches, groups them by agent (one OTLP resource
//! each), POSTs them as an `ExportLogsServiceRequest` and retries with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, any_value};
use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio::sync::mpsc;

use super::{ExportCounters, OtlpConfig, Queued};
use crate::output::FailureThrottle;

/// Records per request at most.
const BATCH: usize = 512;
/// How long a batch waits to fill once its first record arrived.
const LINGER: Duration = Duration::from_millis(200);

/// Why one send failed; `retry` unless the collector refused the request as such.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("collector answered {0}")]
    Status(hyper::StatusCode),
}

impl SendError {
    /// Per the OTLP/HTTP spec: 429, 502, 503, 504 and transport failures are retryable.
    fn retryable(&self) -> bool {
        match self {
            SendError::Status(s) => matches!(s.as_u16(), 429 | 502 | 503 | 504),
            SendError::Request(_) => false,
            _ => true,
        }
    }
}

/// Runs until the sink (the queue's sender) is dropped.
pub async fn run(
    config: OtlpConfig,
    mut rx: mpsc::Receiver<Queued>,
    counters: Arc<ExportCounters>,
) {
    let mut client = Client {
        endpoint: config.endpoint.clone(),
        conn: None,
    };
    let mut throttle = FailureThrottle::default();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(q) => batch.push(q),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let n = batch.len() as u64;
        let body = request(std::mem::take(&mut batch)).encode_to_vec();
        let outcome = send_with_retries(&mut client, &config, Bytes::from(body), &counters).await;
        counters.in_flight.fetch_sub(n, Ordering::Relaxed);
        match outcome {
            Ok(rejected) => {
                counters
                    .exported
                    .fetch_add(n - rejected.min(n), Ordering::Relaxed);
                counters
                    .failed
                    .fetch_add(rejected.min(n), Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(n, Ordering::Relaxed);
                if let Some(batches) = throttle.failure(std::time::Instant::now(), 1) {
                    tracing::warn!(
                        lost_records = n,
                        failed_batches = batches,
                        "OTLP export to {} failed, records lost: {e}",
                        config.endpoint
                    );
                }
            }
        }
    }
}

/// The request for `batch`: one resource (service.name = SPIFFE id) per agent.
fn request(batch: Vec<Queued>) -> ExportLogsServiceRequest {
    let mut by_agent: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for q in batch {
        by_agent.entry(q.spiffe_id).or_default().push(q.record);
    }
    let text = |key: &str, value: String| {
        super::attribute(
            key,
            AnyValue {
                value: Some(any_value::Value::StringValue(value)),
            },
        )
    };
    ExportLogsServiceRequest {
        resource_logs: by_agent
            .into_iter()
            .map(|(spiffe_id, log_records)| ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![text("service.name", spiffe_id)],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "agent-monitor".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Sends `body` until it is accepted, refused for good, or the attempts run out; the number of
/// records the collector rejected (partial success).
async fn send_with_retries(
    client: &mut Client,
    config: &OtlpConfig,
    body: Bytes,
    counters: &ExportCounters,
) -> Result<u64, SendError> {
    let mut wait = config.retry.first;
    let mut attempt = 1;
    loop {
        let result = tokio::time::timeout(config.retry.timeout, client.post(body.clone()))
            .await
            .unwrap_or(Err(SendError::Timeout(config.retry.timeout)));
        match result {
            Ok(rejected) => return Ok(rejected),
            Err(e) if !e.retryable() || attempt >= config.retry.attempts => return Err(e),
            Err(e) => {
                tracing::debug!("OTLP export attempt {attempt} failed: {e}; retrying in {wait:?}");
                client.conn = None;
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(config.retry.max);
                attempt += 1;
            }
        }
    }
}

/// One HTTP/1 connection to the collector, made again after a failure.
struct Client {
    endpoint: hyper::Uri,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, SendError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let host = self.endpoint.host().unwrap_or("localhost");
            let port = self.endpoint.port_u16().unwrap_or(80);
            let stream = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|e| SendError::Connect(format!("{host}:{port}"), e))?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("OTLP connection: {e}");
                }
            });
            self.conn = Some(send);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn post(&mut self, body: Bytes) -> Result<u64, SendError> {
        let authority = self
            .endpoint
            .authority()
            .map_or_else(String::new, |a| a.to_string());
        // Origin form (`POST /v1/logs`), as HTTP/1.1 asks of a request to the server itself.
        let path = self
            .endpoint
            .path_and_query()
            .map_or("/v1/logs", |p| p.as_str());
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))?;
        let conn = self.connection().await?;
        conn.ready().await?;
        let response = conn.send_request(req).await?;
        let status = response.status();
        let answer = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(SendError::Status(status));
        }
        // A collector that accepted only part says how many it rejected.
        Ok(ExportLogsServiceResponse::decode(answer)
            .ok()
            .and_then(|r| r.partial_success)
            .map_or(0, |p| u64::try_from(p.rejected_log_records).unwrap_or(0)))
    }
}
