//! The exporter against a small OTLP/HTTP receiver that decodes the requests with the official
//! protobuf definitions, and against no receiver at all.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use prost::Message as _;

use super::*;
use crate::action::Verdict;
use crate::output::journald::journal_fields;
use crate::output::tests::{connect_action, exec_action};

/// What the receiver got; it answers `503` to the first `fail_first` requests.
#[derive(Default)]
struct Received {
    requests: Mutex<Vec<ExportLogsServiceRequest>>,
    fail_first: AtomicU32,
}

impl Received {
    fn records(&self) -> Vec<(String, LogRecord)> {
        let mut out = Vec::new();
        for req in self.requests.lock().unwrap().iter() {
            for rl in &req.resource_logs {
                let service = rl.resource.as_ref().unwrap().attributes[0].clone();
                assert_eq!(service.key, "service.name");
                let Some(any_value::Value::StringValue(spiffe)) = service.value.unwrap().value
                else {
                    panic!("service.name is not a string")
                };
                for sl in &rl.scope_logs {
                    for r in &sl.log_records {
                        out.push((spiffe.clone(), r.clone()));
                    }
                }
            }
        }
        out
    }
}

async fn receiver(received: Arc<Received>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let received = Arc::clone(&received);
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let received = Arc::clone(&received);
                    async move {
                        assert_eq!(req.uri().to_string(), "/v1/logs", "origin form");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await?.to_bytes();
                        let failing = received
                            .fail_first
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        if failing {
                            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        } else {
                            let request = ExportLogsServiceRequest::decode(body).expect("protobuf");
                            received.requests.lock().unwrap().push(request);
                        }
                        Ok::<_, hyper::Error>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

fn config(addr: SocketAddr, queue: usize) -> OtlpConfig {
    OtlpConfig {
        endpoint: parse_endpoint(&format!("http://{addr}")).unwrap(),
        actions: OtlpActions::All,
        queue,
        retry: Retry {
            attempts: 3,
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        },
    }
}

/// Waits until nothing is queued or being sent.
async fn settled(counters: &ExportCounters) -> ExportStats {
    for _ in 0..1000 {
        let s = counters.stats();
        if s.in_flight == 0 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("export did not settle: {:?}", counters.stats());
}

#[test]
fn endpoints_get_the_logs_path_and_only_http() {
    let uri = |s| parse_endpoint(s).map(|u| u.to_string());
    assert_eq!(uri("http://c:4318"), Ok("http://c:4318/v1/logs".into()));
    assert_eq!(uri("http://c:4318/"), Ok("http://c:4318/v1/logs".into()));
    assert_eq!(
        uri("http://c/otlp/v1/logs"),
        Ok("http://c/otlp/v1/logs".into())
    );
    assert!(uri("https://c:4318").unwrap_err().contains("only http://"));
    assert!(uri("c:4318").is_err());
}

#[test]
fn a_record_has_the_journald_fields_as_attributes() {
    let action = connect_action();
    let record = log_record(&action, SystemTime::UNIX_EPOCH);
    let attr = |k: &str| {
        record
            .attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.clone()?.value)
    };
    for (name, value) in journal_fields(&action) {
        if name == "SYSLOG_IDENTIFIER" {
            continue;
        }
        let key = crate::output::Field::ALL
            .into_iter()
            .find(|f| f.journal_name() == name)
            .map_or(name.to_lowercase(), |f| f.json_name().to_string());
        let rendered = match attr(&key) {
            Some(any_value::Value::StringValue(s)) => s,
            Some(any_value::Value::IntValue(n)) => n.to_string(),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(rendered, value, "{key}");
    }
    assert_eq!(record.severity_text, "WARN");
    assert_eq!(record.time_unix_nano, 1_764_416_640_250_000_000);
    let exec = log_record(&exec_action(), SystemTime::UNIX_EPOCH);
    assert_eq!(exec.severity_number, SeverityNumber::Error as i32);
    assert!(!exec.attributes.iter().any(|kv| kv.key == "dest_addr"));
}

#[tokio::test]
async fn records_reach_the_collector_grouped_by_agent() {
    let received = Arc::new(Received::default());
    let addr = receiver(Arc::clone(&received)).await;
    let mut sink = OtlpSink::start(&config(addr, 100));
    let other = Action {
        agent: "reviewer".into(),
        spiffe_id: "spiffe://host.example/agent/reviewer".into(),
        verdict: Verdict::Alert,
        ..connect_action()
    };
    for a in [connect_action(), exec_action(), other] {
        sink.emit(&a).unwrap();
    }
    let stats = settled(&sink.counters).await;
    assert_eq!(stats.exported, 3, "{stats:?}");
    let records = received.records();
    assert_eq!(records.len(), 3);
    let by = |spiffe: &str| records.iter().filter(|(s, _)| s == spiffe).count();
    assert_eq!(by("spiffe://host.example/agent/coder"), 2);
    assert_eq!(by("spiffe://host.example/agent/reviewer"), 1);
    let (_, first) = &records[0];
    let agent = first
        .attributes
        .iter()
        .find(|kv| kv.key == "agent_id")
        .unwrap();
    assert_eq!(
        agent.value.clone().unwrap().value,
        Some(any_value::Value::StringValue("coder".into()))
    );
}

#[tokio::test]
async fn a_collector_that_fails_then_recovers_gets_everything_after_retries() {
    let received = Arc::new(Received::default());
    received.fail_first.store(2, Ordering::SeqCst);
    let addr = receiver(Arc::clone(&received)).await;
    let mut sink = OtlpSink::start(&config(addr, 100));
    for _ in 0..10 {
        sink.emit(&connect_action()).unwrap();
    }
    let stats = settled(&sink.counters).await;
    assert_eq!(stats.exported, 10, "{stats:?}");
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.retries, 2);
    assert_eq!(received.records().len(), 10);
}

#[tokio::test]
async fn with_the_collector_down_every_record_is_counted_lost() {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let queue = 50;
    let mut sink = OtlpSink::start(&config(addr, queue));
    let mut refused = 0;
    for _ in 0..500 {
        if let Err(e) = sink.emit(&connect_action()) {
            assert!(matches!(e, SinkError::ExportQueueFull), "{e}");
            refused += 1;
        }
    }
    let stats = settled(&sink.counters).await;
    // The test runtime runs the exporter only when this test awaits: the queue took `queue`.
    assert_eq!(refused, 500 - queue as u64, "{stats:?}");
    assert_eq!(stats.exported, 0);
    assert_eq!(stats.dropped_queue_full, refused);
    assert_eq!(stats.dropped_queue_full + stats.failed, 500, "{stats:?}");
    assert_eq!(sink.lost_after_accept(), stats.failed);
    assert!(stats.retries >= 2, "{stats:?}");
}

#[test]
fn all_actions_are_exported_unless_limited_to_denied_and_alerts() {
    use Verdict::*;
    for (actions, verdict, exported) in [
        (OtlpActions::All, Allowed, true),
        (OtlpActions::All, Denied, true),
        (OtlpActions::All, Alert, true),
        (OtlpActions::DeniedAndAlerts, Allowed, false),
        (OtlpActions::DeniedAndAlerts, Denied, true),
        (OtlpActions::DeniedAndAlerts, Alert, true),
    ] {
        assert_eq!(
            actions.exports(verdict),
            exported,
            "{actions:?} {verdict:?}"
        );
    }
    assert_eq!(OtlpActions::default(), OtlpActions::All);
}

/// The daemon's fan-out ([`crate::output::Outputs`]) sends the collector what `--otlp-actions`
/// selects, and only that.
#[tokio::test]
async fn the_outputs_export_what_otlp_actions_selects() {
    for (actions, expected) in [
        (OtlpActions::All, vec!["allowed", "denied", "alert"]),
        (OtlpActions::DeniedAndAlerts, vec!["denied", "alert"]),
    ] {
        let received = Arc::new(Received::default());
        let addr = receiver(Arc::clone(&received)).await;
        let mut outputs = crate::output::Outputs::open(&crate::output::OutputConfig {
            otlp: Some(OtlpConfig {
                actions,
                ..config(addr, 100)
            }),
            ..Default::default()
        })
        .unwrap();
        let allowed = Action {
            verdict: Verdict::Allowed,
            ..connect_action()
        };
        for a in [allowed, connect_action(), exec_action()] {
            outputs.emit(&a);
        }
        for _ in 0..1000 {
            let s = outputs.export_stats().unwrap();
            if s.in_flight == 0 && s.exported == expected.len() as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let verdicts: Vec<String> = received
            .records()
            .into_iter()
            .map(|(_, r)| {
                let v = r.attributes.iter().find(|kv| kv.key == "verdict").unwrap();
                match v.value.clone().unwrap().value {
                    Some(any_value::Value::StringValue(s)) => s,
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(verdicts, expected, "{actions:?}");
    }
}
