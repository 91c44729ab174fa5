//! OTLP export from the real daemon: denials reach a test collector (a small HTTP/1.1 server that
//! decodes the requests with the official protobuf definitions) with their fields; with the
//! collector down, enforcement goes on and every record is counted as lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

mod flood;

/// One record: service.name, attributes as strings.
type Record = (String, Vec<(String, String)>);

/// What a test collector received.
#[derive(Default)]
struct Received {
    /// (service.name, attributes as strings) of every record, if `keep`.
    records: Mutex<Vec<Record>>,
    keep: bool,
    /// Records answered with 200.
    count: AtomicU64,
    /// Answer each request this many milliseconds late (a slow collector).
    delay_ms: AtomicU64,
}

type Records = Arc<Received>;

/// A collector on `listener` until `stop` is set (then it closes every connection, after
/// answering the request in hand).
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

fn serve(stream: std::net::TcpStream, received: &Received, stop: &AtomicBool) {
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
        let mut records = Vec::new();
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
                    records.push((service.clone(), fields));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(
            received.delay_ms.load(Ordering::SeqCst),
        ));
        // Counted before the answer goes out (the test may look as soon as the daemon has it);
        // the count is taken back if it cannot go out: the daemon then sends the request again.
        let n = records.len() as u64;
        received.count.fetch_add(n, Ordering::SeqCst);
        if received.keep {
            received.records.lock().unwrap().extend(records);
        }
        if out
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            received.count.fetch_sub(n, Ordering::SeqCst);
            return;
        }
    }
}

/// The `otlp` sink's counters in `status --json`.
fn otlp_sink(st: &serde_json::Value) -> &serde_json::Value {
    st["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "otlp")
        .unwrap_or_else(|| panic!("no otlp sink in status: {st:#}"))
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
    let records: Records = Arc::new(Received {
        keep: true,
        ..Default::default()
    });
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
    let got: Vec<_> = records.records.lock().unwrap().clone();
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
    let otlp = otlp_sink(&st);
    assert_eq!(otlp["failed"], 3000, "{otlp}");
    assert_eq!(otlp["written"], 500, "{otlp}");
    d.stop();
}

/// The daemon's export counters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Export {
    exported: u64,
    dropped: u64,
    failed: u64,
}

impl Export {
    fn of(port: u16) -> Export {
        Export {
            exported: metric(port, "agent_monitor_otlp_records_exported_total"),
            dropped: metric(port, "agent_monitor_otlp_records_dropped_queue_full_total"),
            failed: metric(port, "agent_monitor_otlp_records_failed_total"),
        }
    }

    fn lost(&self) -> u64 {
        self.dropped + self.failed
    }
}

/// Samples the export queue and the daemon's memory every 100 ms until dropped; the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl Sampler {
    fn start(port: u16, pid: i32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut in_flight, mut rss_kib) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                in_flight = in_flight.max(metric(port, "agent_monitor_otlp_records_in_flight"));
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
                    .unwrap_or(0);
                rss_kib = rss_kib.max(rss);
                std::thread::sleep(Duration::from_millis(100));
            }
            (in_flight, rss_kib)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// (largest records in flight, largest resident memory in KiB).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn export_at_10k_actions_per_second_with_the_collector_slow_down_and_back() {
    if !require_root("export_at_10k_actions_per_second_with_the_collector_slow_down_and_back") {
        return;
    }
    let agent = unique_agent("otlp10k");
    let tools = tempfile::tempdir().unwrap();
    let bin = flood::compile(tools.path());
    let allowed_port = free_udp_port();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let received: Records = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    collector(listener, Arc::clone(&received), Arc::clone(&stop));
    let port = free_port();
    const QUEUE: u64 = 10_000;
    const BATCH: u64 = 512;
    let mut d = Daemon::start_with(
        &[flood::policy(&agent, &bin, allowed_port)],
        &[
            "--metrics",
            &format!("127.0.0.1:{port}"),
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{otlp_port}"),
            "--otlp-queue",
            &QUEUE.to_string(),
        ],
    );
    let sampler = Sampler::start(port, d.pid());
    // 10k connects/s, one in ten to a denied port: every action is exported (the default).
    let load = |secs: f64| flood::Load {
        allowed_port,
        denied_port: free_udp_port(),
        deny_every: 10,
        secs,
        rate: 10_000,
    };
    let mut phases = Vec::new();
    let mut phase = |name: &'static str, secs: f64| {
        let f = flood::run(&d, &agent, name, &bin, &load(secs));
        let export = Export::of(port);
        eprintln!(
            "{name}: {:.0} actions/s, {:.0} denials/s (all EPERM: {}); collector has {}, \
             daemon {export:?}",
            f.rate(),
            f.denial_rate(),
            f.denied_eperm == f.denied_sent,
            received.count.load(Ordering::SeqCst),
        );
        phases.push((name, f));
    };

    phase("up", 3.0);
    received.delay_ms.store(2000, Ordering::SeqCst);
    phase("slow", 5.0);
    stop.store(true, Ordering::SeqCst);
    // Down long enough for a batch to run out of retries (0.5 + 1 + 2 + 4 + 8 s of backoff),
    // which may start up to 2 s late (the slow answer in hand when the collector stopped).
    phase("down", 20.0);
    let listener = TcpListener::bind(("127.0.0.1", otlp_port)).expect("the same port again");
    received.delay_ms.store(0, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    collector(listener, Arc::clone(&received), Arc::clone(&stop));
    phase("back", 4.0);
    settled(port);

    // Export resumed: with the backlog gone, a further flood reaches the collector whole.
    let (before, at_collector) = (Export::of(port), received.count.load(Ordering::SeqCst));
    let counted_before = flood::settled(port, &agent);
    phase("resumed", 2.0);
    settled(port);
    let counted = flood::settled(port, &agent);
    let after = Export::of(port);
    let (max_in_flight, max_rss_kib) = sampler.finish();
    let st = d.status();
    stop.store(true, Ordering::SeqCst);
    d.stop();
    let collected = received.count.load(Ordering::SeqCst);
    eprintln!(
        "total: {counted} actions of the agent, collector received {collected}, daemon \
         {after:?}; largest queue {max_in_flight} records (--otlp-queue {QUEUE}), largest \
         daemon RSS {} MiB",
        max_rss_kib / 1024
    );

    // Enforcement unaffected: every phase made its 10k actions/s and every denial held.
    let up_rate = phases[0].1.denial_rate();
    for (name, f) in &phases {
        f.assert_enforced(name);
        assert!(
            f.rate() >= 9_000.0 && (f.denial_rate() - up_rate).abs() <= 0.1 * up_rate,
            "{name}: {:.0} actions/s, {:.0} denials/s against {up_rate:.0} with the collector up",
            f.rate(),
            f.denial_rate()
        );
    }
    // Loss counted exactly: every action was produced for export, and each one either reached
    // the collector or is counted lost.
    let lost_in_kernel = st["counters"]["actions_lost"].as_u64().unwrap();
    assert_eq!(lost_in_kernel, 0, "status: {st:#}");
    let made: usize = phases.iter().map(|(_, f)| f.sent() + 1).sum();
    assert_eq!(counted, made, "actions counted != connects and execs made");
    let otlp = otlp_sink(&st);
    assert_eq!(
        otlp["written"].as_u64().unwrap() + otlp["failed"].as_u64().unwrap(),
        counted as u64,
        "records produced for export != actions: {otlp}"
    );
    assert_eq!(collected, after.exported, "collector != daemon's exported");
    assert_eq!(
        after.exported + after.lost(),
        counted as u64,
        "exported + lost != produced: {after:?}"
    );
    assert_eq!(otlp["failed"].as_u64().unwrap(), after.lost(), "{otlp}");
    assert!(
        after.dropped > 0,
        "the slow and down collector must overflow the queue"
    );
    assert!(
        after.failed >= BATCH,
        "a batch must have run out of retries: {after:?}"
    );
    // Bounded: the queue plus the batch being sent.
    assert!(
        (QUEUE..=QUEUE + BATCH).contains(&max_in_flight),
        "largest queue {max_in_flight}"
    );
    // Resumed: the last flood lost nothing.
    assert_eq!(after.lost(), before.lost(), "{before:?} → {after:?}");
    assert_eq!(
        collected - at_collector,
        (counted - counted_before) as u64,
        "the resumed export did not deliver the last flood whole"
    );
}
