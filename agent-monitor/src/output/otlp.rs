//! OpenTelemetry export (`--otlp-endpoint`): every action (or, with `--otlp-actions
//! denied-and-alerts`, denials and alerts only) as OTLP log records over HTTP/protobuf, with the
//! journald fields as attributes and the agent's SPIFFE id as the resource's `service.name`.
//!
//! Enforcement never waits for the collector: [`OtlpSink::emit`] puts the record in a bounded
//! queue and returns; an exporter task batches, sends and retries with backoff. A record the full
//! queue cannot take, or a batch still failing after the last retry, is counted as lost
//! ([`ExportCounters`]: `status`, the sink counters and the `agent_monitor_otlp_*` metrics).

mod export;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use clap::Args;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use tokio::sync::mpsc;

use super::{FieldValue, Sink, SinkError, action_fields, journald};
use crate::action::{Action, Verdict};

/// Daemon flags of the OTLP export.
#[derive(Clone, Debug, Args)]
pub struct OtlpArgs {
    /// Export every action as OpenTelemetry log records (OTLP/HTTP, protobuf) to this
    /// collector: `http://HOST:PORT` (records go to /v1/logs) or a full URL with its path. Plain
    /// HTTP only: for TLS, run a local collector that forwards. Attributes are the journald
    /// fields (agent_id, verdict, dest_addr, …); the resource's service.name is the agent's
    /// SPIFFE id. Batched, retried with backoff, held in memory up to --otlp-queue records:
    /// what cannot be sent is counted as lost (status, metrics); enforcement never waits.
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<hyper::Uri>,
    /// Which actions to export: `all` (allowed ones too, like the JSON trail) or
    /// `denied-and-alerts` (like journald without --journal-allowed; far fewer records when
    /// agents mostly do what their policy allows).
    #[arg(long, value_enum, value_name = "WHICH", default_value_t = OtlpActions::All,
          requires = "otlp_endpoint")]
    pub otlp_actions: OtlpActions,
    /// Records held for export at most (waiting for the collector); beyond, new ones are lost.
    #[arg(long, value_name = "N", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub otlp_queue: u32,
}

impl OtlpArgs {
    pub fn config(&self) -> Option<OtlpConfig> {
        self.otlp_endpoint.clone().map(|endpoint| OtlpConfig {
            endpoint,
            actions: self.otlp_actions,
            queue: self.otlp_queue as usize,
            retry: Retry::default(),
        })
    }
}

/// `http://collector:4318` → `http://collector:4318/v1/logs`; a URL with a path is kept as given.
pub fn parse_endpoint(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only http:// is supported (for TLS, send to a local collector)"
        ));
    }
    if uri.host().is_none() {
        return Err(format!("{s:?}: no host"));
    }
    if matches!(uri.path(), "" | "/") {
        return format!("{}/v1/logs", s.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("{s:?}: {e}"));
    }
    Ok(uri)
}

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub endpoint: hyper::Uri,
    /// Which actions are exported.
    pub actions: OtlpActions,
    /// Records held at most.
    pub queue: usize,
    pub retry: Retry,
}

/// Which actions `--otlp-actions` exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpActions {
    /// Every action: allowed, denied and alerts.
    #[default]
    All,
    /// Denials and alerts; allowed actions stay in the JSON trail (and the metrics).
    DeniedAndAlerts,
}

impl OtlpActions {
    /// Whether an action with `verdict` goes to the collector.
    pub fn exports(self, verdict: Verdict) -> bool {
        match self {
            OtlpActions::All => true,
            OtlpActions::DeniedAndAlerts => verdict != Verdict::Allowed,
        }
    }
}

/// Backoff of a failed batch: `first`, doubling up to `max`, for `attempts` sends in all.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub first: Duration,
    pub max: Duration,
    /// One request (connect, send, answer) at most.
    pub timeout: Duration,
}

impl Default for Retry {
    /// Five retries, 15.5 s of backoff (plus the requests) before a batch is given up.
    fn default() -> Self {
        Retry {
            attempts: 6,
            first: Duration::from_millis(500),
            max: Duration::from_secs(8),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What happened to exported records; shared by the sink and its exporter task.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Records the collector accepted.
    pub exported: AtomicU64,
    /// Records lost because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Records lost because their batch failed after the last retry (or the collector rejected
    /// them).
    pub failed: AtomicU64,
    /// Sends retried.
    pub retries: AtomicU64,
    /// Records in the queue or in a batch being sent.
    pub in_flight: AtomicU64,
}

/// A snapshot of [`ExportCounters`] for `metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub exported: u64,
    pub dropped_queue_full: u64,
    pub failed: u64,
    pub retries: u64,
    pub in_flight: u64,
}

impl ExportCounters {
    pub fn stats(&self) -> ExportStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            exported: get(&self.exported),
            dropped_queue_full: get(&self.dropped_queue_full),
            failed: get(&self.failed),
            retries: get(&self.retries),
            in_flight: get(&self.in_flight),
        }
    }
}

/// One record waiting for export, with the resource it belongs to.
#[derive(Debug)]
pub struct Queued {
    pub spiffe_id: String,
    pub record: LogRecord,
}

/// The sink in the daemon: queues records for the exporter task.
#[derive(Debug)]
pub struct OtlpSink {
    queue: mpsc::Sender<Queued>,
    counters: Arc<ExportCounters>,
}

impl OtlpSink {
    /// Starts the exporter task on the current tokio runtime.
    pub fn start(config: &OtlpConfig) -> Self {
        let (queue, rx) = mpsc::channel(config.queue);
        let counters = Arc::new(ExportCounters::default());
        tokio::spawn(export::run(config.clone(), rx, Arc::clone(&counters)));
        OtlpSink { queue, counters }
    }

    pub fn counters(&self) -> Arc<ExportCounters> {
        Arc::clone(&self.counters)
    }
}

impl Sink for OtlpSink {
    fn name(&self) -> &'static str {
        "otlp"
    }

    fn emit(&mut self, action: &Action) -> Result<(), SinkError> {
        let queued = Queued {
            spiffe_id: action.spiffe_id.clone(),
            record: log_record(action, SystemTime::now()),
        };
        match self.queue.try_send(queued) {
            Ok(()) => {
                self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(_) => {
                self.counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                Err(SinkError::ExportQueueFull)
            }
        }
    }

    /// Accepted into the queue, then lost by the exporter.
    fn lost_after_accept(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }
}

/// A record or resource attribute.
pub fn attribute(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP log record of `action`: its journald fields (JSON names) as attributes, the message
/// as body, the journald priority as severity.
pub fn log_record(action: &Action, observed: SystemTime) -> LogRecord {
    let string = |s: String| AnyValue {
        value: Some(any_value::Value::StringValue(s)),
    };
    let mut attributes: Vec<KeyValue> = action_fields(action)
        .into_iter()
        .filter_map(|(field, value)| {
            let value = match value? {
                FieldValue::Text(t) => string(t.into_owned()),
                FieldValue::Number(n) => AnyValue {
                    value: Some(any_value::Value::IntValue(
                        i64::try_from(n).unwrap_or(i64::MAX),
                    )),
                },
                FieldValue::Chain(_) => string(action.chain_string()),
            };
            Some(attribute(field.json_name(), value))
        })
        .collect();
    attributes.push(attribute(
        "message_id",
        string(journald::action_message_id(action.verdict).to_string()),
    ));
    let (severity, text) = match u8::from(journald::priority(action.verdict)) {
        0..=3 => (SeverityNumber::Error, "ERROR"),
        4 => (SeverityNumber::Warn, "WARN"),
        5 | 6 => (SeverityNumber::Info, "INFO"),
        _ => (SeverityNumber::Debug, "DEBUG"),
    };
    LogRecord {
        time_unix_nano: nanos(action.time),
        observed_time_unix_nano: nanos(observed),
        severity_number: severity as i32,
        severity_text: text.into(),
        body: Some(string(action.message())),
        attributes,
        event_name: "agent-monitor.action".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
