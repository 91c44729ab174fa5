//! OTLP export from the real daemon: denials reach a test collector (a small HTTP/1.1 server that
//! decodes the requests with the official protobuf definitions) with their fields; with the
//! collector down, enforcement goes on and every record is counted as lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

/// (service.name, attributes as strings) of every record received.
type Records = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// A collector on `listener` until `stop` is set (then it closes every connection).
fn collector(listener: TcpListener, records: Records, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let (records, stop) = (Arc::clone(&records), Arc::clone(&stop));
            std::thread::spawn(move || serve(stream, &records, &stop));
        }
    });
}

fn serve(stream: std::net::TcpStream, records: &Records, stop: &AtomicBool) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => continue, // read timeout: look at `stop` again
        }
        assert!(line.starts_with("POST /v1/logs "), "{line}");
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let req = ExportLogsServiceRequest::decode(&body[..]).expect("OTLP protobuf");
        for rl in req.resource_logs {
            let attr = |v: Option<AnyValue>| match v {
                Some(AnyValue::StringValue(s)) => s,
                Some(AnyValue::IntValue(n)) => n.to_string(),
                other => format!("{other:?}"),
            };
            let service = attr(
                rl.resource.unwrap().attributes[0]
                    .value
                    .clone()
                    .unwrap()
                    .value,
            );
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    let fields = r
                        .attributes
                        .into_iter()
                        .map(|kv| (kv.key, attr(kv.value.and_then(|v| v.value))))
                        .collect();
                    records.lock().unwrap().push((service.clone(), fields));
                }
            }
        }
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    }
}

fn metric(port: u16, name: &str) -> u64 {
    let (_, body) = http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in\n{body}"))
        .parse()
        .unwrap()
}

/// The agent makes `n` connects to a port its policy does not allow; all must be denied.
fn denied_connects(d: &Daemon, agent: &str, n: usize) {
    let port = listener_v4();
    let script = format!(
        "import socket\nd=0\nfor i in range({n}):\n s=socket.socket()\n try: s.connect(('127.0.0.1',{port}))\n except OSError as e:\n  d+=e.errno==1\n s.close()\nprint(d)\n"
    );
    let out = Command::new(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args(["--agent", agent, "--", PYTHON, "-c", &script])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout).trim(),
        n.to_string(),
        "every connect must be denied"
    );
}

/// Waits until nothing is queued for export.
fn settled(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while metric(port, "agent_monitor_otlp_records_in_flight") > 0 {
        assert!(Instant::now() < deadline, "the export never settled");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn denials_reach_the_collector_and_losses_are_counted_when_it_is_down() {
    if !require_root("denials_reach_the_collector_and_losses_are_counted_when_it_is_down") {
        return;
    }
    let agent = unique_agent("otlp");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let records: Records = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    collector(listener, Arc::clone(&records), Arc::clone(&stop));
    let port = free_port();
    let policy = format!(
        "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [{PYTHON:?}]\n"
    );
    let mut d = Daemon::start_with(
        &[(format!("{agent}.toml"), policy)],
        &[
            "--metrics",
            &format!("127.0.0.1:{port}"),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{otlp_port}"),
            "--otlp-queue",
            "1000",
            // Denials only: the python exec (allowed) stays out of the counts below.
            "--otlp-actions",
            "denied-and-alerts",
        ],
    );

    // Collector up: every denial arrives, with its fields; the allowed exec is not exported.
    denied_connects(&d, &agent, 500);
    settled(port);
    let got: Vec<_> = records.lock().unwrap().clone();
    let ours: Vec<_> = got
        .iter()
        .filter(|(_, f)| f.contains(&("agent_id".into(), agent.clone())))
        .collect();
    assert_eq!(ours.len(), 500, "records of {agent}");
    let (service, fields) = ours[0];
    assert!(service.starts_with("spiffe://") && service.ends_with(&format!("/agent/{agent}")));
    let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("verdict"), Some("denied"));
    assert_eq!(get("action"), Some("connect"));
    assert_eq!(get("dest_addr"), Some("127.0.0.1"));
    assert_eq!(get("exe"), Some(PYTHON));
    assert!(get("process_chain").is_some() && get("message").is_some());
    assert_eq!(
        metric(port, "agent_monitor_otlp_records_exported_total"),
        500
    );

    // Collector down: enforcement unaffected, and every record is counted lost, exactly.
    stop.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    denied_connects(&d, &agent, 3000);
    settled(port);
    let dropped = metric(port, "agent_monitor_otlp_records_dropped_queue_full_total");
    let failed = metric(port, "agent_monitor_otlp_records_failed_total");
    assert_eq!(
        metric(port, "agent_monitor_otlp_records_exported_total"),
        500
    );
    assert_eq!(
        dropped + failed,
        3000,
        "dropped {dropped} + failed {failed}"
    );
    assert!(dropped > 0, "a queue of 1000 cannot hold 3000 records");
    let st = d.status();
    let otlp = st["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "otlp")
        .unwrap_or_else(|| panic!("no otlp sink in status: {st:#}"));
    assert_eq!(otlp["failed"], 3000, "{otlp}");
    assert_eq!(otlp["written"], 500, "{otlp}");
    d.stop();
}
