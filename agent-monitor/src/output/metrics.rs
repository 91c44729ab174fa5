//! Prometheus metrics: `daemon --metrics ADDR:PORT` serves `GET /metrics`. The monitor task owns
//! every counter; a scrape asks it for a [`Snapshot`] over a channel and renders that, so nothing
//! is shared or locked per event.

use std::net::SocketAddr;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// Everything exported, as the monitor sees it at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (agent, action, verdict) → actions reported.
    pub actions: Vec<(String, &'static str, &'static str, u64)>,
    /// Kernel records the ring buffer could not take (all kinds), and the agent actions among them.
    pub records_lost: u64,
    pub actions_lost: u64,
    /// Off-list actions of alert-mode agents refused because their record could not be queued.
    pub alerts_refused_unrecordable: u64,
    /// Packets of agents' sockets carrying a source route (dropped in enforce mode).
    pub source_routed_packets: u64,
    pub undecodable_records: u64,
    pub verdict_disagreements: u64,
    /// (map, entries used, capacity).
    pub occupancy: Vec<(String, u64, u64)>,
    pub reloads: u64,
    pub reload_failures: u64,
    /// (sink, written, failed).
    pub sinks: Vec<(String, u64, u64)>,
    /// Denials/alerts kept out of journald by aggregation (each is in a summary and the JSON trail).
    pub journald_aggregated: u64,
    /// The OTLP exporter's counters, if `--otlp-endpoint` is set.
    pub otlp: Option<super::otlp::ExportStats>,
    /// (agent, why, addresses) of allowed DNS answers not learned (`Withheld::as_str`).
    pub dns_withheld: Vec<(String, &'static str, u64)>,
    /// (agent, learned addresses held, limit).
    pub dns_learned: Vec<(String, u64, u64)>,
    pub agents: u64,
    pub tasks: u64,
    pub processes: u64,
    /// Seconds the previous daemon was away before this one adopted its programs (0 if fresh).
    pub away_seconds: f64,
    /// Files and directories the file guard has marked (`[files]`).
    pub files_marked: u64,
    /// File guard reports (judged opens) the daemon's loop could not take in time.
    pub file_reports_lost: u64,
    /// Ask mode (held requests and decisions).
    pub ask: super::ask_metrics::AskMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    agent: String,
    action: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WithheldLabels {
    agent: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// The OpenMetrics text of `s` (names prefixed `agent_monitor_`, counters end in `_total`).
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("agent_monitor");
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    };

    let actions = Family::<ActionLabels, Counter<u64>>::default();
    for (agent, action, verdict, n) in &s.actions {
        actions
            .get_or_create(&ActionLabels {
                agent: agent.clone(),
                action: (*action).into(),
                verdict: (*verdict).into(),
            })
            .inc_by(*n);
    }
    reg.register(
        "actions",
        "Agent actions reported, by agent, action and verdict",
        actions,
    );
    counter(
        &mut reg,
        "kernel_records_lost",
        "Kernel records the ring buffer could not take (the verdict still applied)",
        s.records_lost,
    );
    counter(
        &mut reg,
        "kernel_actions_lost",
        "Agent actions among the lost kernel records",
        s.actions_lost,
    );
    counter(
        &mut reg,
        "kernel_alerts_refused_unrecordable",
        "Off-list actions of alert-mode agents refused because the ring buffer could not take \
         their records (fail closed; among the lost actions)",
        s.alerts_refused_unrecordable,
    );
    counter(
        &mut reg,
        "kernel_source_routed_packets",
        "Packets of agents' sockets carrying IPv4 options or an IPv6 routing header (dropped in \
         enforce mode)",
        s.source_routed_packets,
    );
    counter(
        &mut reg,
        "undecodable_records",
        "Kernel records the daemon could not decode",
        s.undecodable_records,
    );
    counter(
        &mut reg,
        "verdict_disagreements",
        "Kernel verdicts the policy evaluator did not reproduce (expected 0)",
        s.verdict_disagreements,
    );
    let used = Family::<MapLabels, Gauge<i64>>::default();
    let capacity = Family::<MapLabels, Gauge<i64>>::default();
    for (map, u, c) in &s.occupancy {
        let l = MapLabels { map: map.clone() };
        used.get_or_create(&l)
            .set(i64::try_from(*u).unwrap_or(i64::MAX));
        capacity
            .get_or_create(&l)
            .set(i64::try_from(*c).unwrap_or(i64::MAX));
    }
    reg.register("map_entries", "Entries in use in a kernel map", used);
    reg.register("map_capacity", "Entries a kernel map can hold", capacity);
    counter(&mut reg, "reloads", "Policy reloads applied", s.reloads);
    counter(
        &mut reg,
        "reload_failures",
        "Policy reloads refused (the previous policy stayed in force)",
        s.reload_failures,
    );
    let written = Family::<SinkLabels, Counter<u64>>::default();
    let failed = Family::<SinkLabels, Counter<u64>>::default();
    for (sink, w, f) in &s.sinks {
        let l = SinkLabels { sink: sink.clone() };
        written.get_or_create(&l).inc_by(*w);
        failed.get_or_create(&l).inc_by(*f);
    }
    reg.register("sink_writes", "Entries an output sink accepted", written);
    reg.register(
        "sink_write_failures",
        "Entries an output sink failed to record",
        failed,
    );
    counter(
        &mut reg,
        "journald_aggregated",
        "Identical denials/alerts folded into journald repeat summaries",
        s.journald_aggregated,
    );
    if let Some(o) = &s.otlp {
        counter(
            &mut reg,
            "otlp_records_exported",
            "Records the OpenTelemetry collector accepted",
            o.exported,
        );
        counter(
            &mut reg,
            "otlp_records_dropped_queue_full",
            "Records lost because the export queue was full (collector slow or down)",
            o.dropped_queue_full,
        );
        counter(
            &mut reg,
            "otlp_records_failed",
            "Records lost because their batch still failed after the last retry, or the collector \
             rejected them",
            o.failed,
        );
        counter(
            &mut reg,
            "otlp_export_retries",
            "Export requests retried after a failure",
            o.retries,
        );
        gauge(
            &mut reg,
            "otlp_records_in_flight",
            "Records queued or being sent to the collector",
            o.in_flight,
        );
    }
    let withheld = Family::<WithheldLabels, Counter<u64>>::default();
    for (agent, reason, n) in &s.dns_withheld {
        withheld
            .get_or_create(&WithheldLabels {
                agent: agent.clone(),
                reason: (*reason).into(),
            })
            .inc_by(*n);
    }
    reg.register(
        "dns_addresses_withheld",
        "Addresses of allowed DNS answers an agent was not given, by reason (non-public: no dns.private_answers entry; limit: dns.max_learned reached)",
        withheld,
    );
    let held = Family::<AgentLabels, Gauge<i64>>::default();
    let limit = Family::<AgentLabels, Gauge<i64>>::default();
    for (agent, h, l) in &s.dns_learned {
        let labels = AgentLabels {
            agent: agent.clone(),
        };
        held.get_or_create(&labels)
            .set(i64::try_from(*h).unwrap_or(i64::MAX));
        limit
            .get_or_create(&labels)
            .set(i64::try_from(*l).unwrap_or(i64::MAX));
    }
    reg.register(
        "dns_learned_addresses",
        "Addresses an agent holds learned from DNS answers",
        held,
    );
    reg.register(
        "dns_learned_limit",
        "Learned addresses an agent may hold (dns.max_learned or its share)",
        limit,
    );
    gauge(&mut reg, "agents", "Agents with a policy", s.agents);
    gauge(&mut reg, "tasks", "Live (agent, task) cgroups", s.tasks);
    gauge(
        &mut reg,
        "processes",
        "Agent processes the daemon tracks",
        s.processes,
    );
    let away = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    away.set(s.away_seconds);
    reg.register(
        "adopted_after_seconds",
        "How long the previous daemon was away before this one adopted its pinned programs",
        away,
    );
    gauge(
        &mut reg,
        "files_marked",
        "Files and directories the file guard has marked for agents' [files] rules",
        s.files_marked,
    );
    counter(
        &mut reg,
        "file_reports_lost",
        "Judged opens of denied files not reported because the daemon's queue was full (the \
         verdict still applied)",
        s.file_reports_lost,
    );
    super::ask_metrics::register(&mut reg, &s.ask);
    let mut out = String::new();
    // Encoding into a String cannot fail for these metric types.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}

/// A scrape: the monitor answers with the rendered text.
pub type Scrape = oneshot::Sender<String>;

/// Binds `addr` now (so a taken port stops the daemon at start, not later).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))
}

/// Serves `GET /metrics` (anything else: 404) until the daemon stops.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, scrapes.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    scrapes: mpsc::Sender<Scrape>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "agent-monitor serves GET /metrics only\n".into(),
        ));
    }
    let (tx, rx) = oneshot::channel();
    let text = match scrapes.send(tx).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    Ok(match text {
        Some(text) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        None => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the daemon is stopping\n".into(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let s = Snapshot {
            actions: vec![
                ("coder".into(), "connect", "denied", 3),
                ("coder".into(), "exec", "allowed", 2),
            ],
            records_lost: 7,
            actions_lost: 5,
            alerts_refused_unrecordable: 3,
            source_routed_packets: 2,
            occupancy: vec![("AGENT_CGROUPS".into(), 4, 16_384)],
            reloads: 2,
            reload_failures: 1,
            sinks: vec![("json".into(), 10, 1)],
            agents: 1,
            tasks: 4,
            processes: 9,
            otlp: Some(crate::output::otlp::ExportStats {
                exported: 11,
                dropped_queue_full: 4,
                failed: 3,
                retries: 2,
                in_flight: 1,
            }),
            ..Default::default()
        };
        let t = render(&s);
        for want in [
            "agent_monitor_actions_total{agent=\"coder\",action=\"connect\",verdict=\"denied\"} 3",
            "agent_monitor_actions_total{agent=\"coder\",action=\"exec\",verdict=\"allowed\"} 2",
            "agent_monitor_kernel_records_lost_total 7",
            "agent_monitor_kernel_actions_lost_total 5",
            "agent_monitor_kernel_alerts_refused_unrecordable_total 3",
            "agent_monitor_kernel_source_routed_packets_total 2",
            "agent_monitor_map_entries{map=\"AGENT_CGROUPS\"} 4",
            "agent_monitor_map_capacity{map=\"AGENT_CGROUPS\"} 16384",
            "agent_monitor_reloads_total 2",
            "agent_monitor_reload_failures_total 1",
            "agent_monitor_sink_write_failures_total{sink=\"json\"} 1",
            "agent_monitor_tasks 4",
            "agent_monitor_processes 9",
            "agent_monitor_otlp_records_exported_total 11",
            "agent_monitor_otlp_records_dropped_queue_full_total 4",
            "agent_monitor_otlp_records_failed_total 3",
            "agent_monitor_otlp_export_retries_total 2",
            "agent_monitor_otlp_records_in_flight 1",
            "# EOF",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    /// Every metric `deploy/grafana/agent-monitor.json` queries is one the daemon serves (a
    /// renamed metric would leave a panel silently empty), and the file is a dashboard.
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_we_serve() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/agent-monitor.json"))
                .expect("the dashboard is JSON");
        assert_eq!(dashboard["uid"], "agent-monitor");
        let panels = dashboard["panels"].as_array().expect("panels");
        // Every family has a sample: each label set gets one row.
        let full = Snapshot {
            actions: vec![("coder".into(), "connect", "denied", 1)],
            occupancy: vec![("AGENT_CGROUPS".into(), 1, 2)],
            sinks: vec![("json".into(), 1, 0)],
            dns_withheld: vec![("coder".into(), "limit", 1)],
            dns_learned: vec![("coder".into(), 1, 2)],
            otlp: Some(Default::default()),
            ..Default::default()
        };
        let served: Vec<String> = render(&full)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
            .collect();
        let mut queried = 0;
        for panel in panels {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for (at, _) in expr.match_indices("agent_monitor_") {
                    let name: String = expr[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        served.contains(&name),
                        "panel {:?} queries {name}, which the daemon does not serve",
                        panel["title"]
                    );
                    queried += 1;
                }
            }
        }
        assert!(queried >= 20, "{queried}");
    }
}
