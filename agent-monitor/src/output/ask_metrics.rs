//! Metrics of ask mode: held requests by how they ended, and the time from hold to decision.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Seconds: an operator answers in seconds to minutes; a decision service in milliseconds.
const BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Time from hold to decision. Shared: a clone observes into the same buckets, so each scrape
/// registers the one the monitor fills.
#[derive(Clone, Debug)]
pub struct DecisionSeconds(pub Histogram);

impl Default for DecisionSeconds {
    fn default() -> Self {
        DecisionSeconds(Histogram::new(BUCKETS))
    }
}

/// Ask mode's counters for one scrape.
#[derive(Clone, Debug, Default)]
pub struct AskMetrics {
    /// Requests held (new; retransmissions that joined one are not counted again).
    pub held: u64,
    pub pending: u64,
    /// verdict ("approved", "denied", "timeout", "withdrawn") → requests.
    pub ended: Vec<(&'static str, u64)>,
    /// Calls of ask-mode agents released at once: already allowed (policy, grant, approval).
    pub allowed_without_asking: u64,
    /// DNS queries refused at once: the name was just denied for that agent and task.
    pub denied_without_asking: u64,
    /// Decision service failures (each a deny).
    pub approver_errors: u64,
    /// Calls denied at once because the desk was full.
    pub refused_full: u64,
    pub decision_seconds: DecisionSeconds,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: String,
}

/// Adds ask mode's metrics to `reg` (prefix `agent_monitor_ask_`).
pub fn register(reg: &mut Registry, m: &AskMetrics) {
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    counter(
        reg,
        "ask_requests_held",
        "Requests of ask-mode agents held for a decision",
        m.held,
    );
    let pending = Gauge::<i64>::default();
    pending.set(i64::try_from(m.pending).unwrap_or(i64::MAX));
    reg.register("ask_requests_pending", "Requests held now", pending);
    let ended = Family::<VerdictLabels, Counter<u64>>::default();
    for (verdict, n) in &m.ended {
        ended
            .get_or_create(&VerdictLabels {
                verdict: (*verdict).into(),
            })
            .inc_by(*n);
    }
    reg.register(
        "ask_requests_decided",
        "Held requests by how they ended (approved, denied, timeout, withdrawn)",
        ended,
    );
    counter(
        reg,
        "ask_allowed_without_asking",
        "Calls of ask-mode agents released at once because already allowed",
        m.allowed_without_asking,
    );
    counter(
        reg,
        "ask_denied_without_asking",
        "DNS queries of ask-mode agents refused at once: the name was just denied for the task",
        m.denied_without_asking,
    );
    counter(
        reg,
        "ask_approver_errors",
        "Decision service (--approver-url) errors and timeouts, each a deny",
        m.approver_errors,
    );
    counter(
        reg,
        "ask_refused_full",
        "Calls denied at once because too many requests were held",
        m.refused_full,
    );
    reg.register(
        "ask_decision_seconds",
        "Time from a held request to its decision (timeouts included, withdrawals not)",
        m.decision_seconds.0.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ask_metrics_render_with_their_names() {
        let m = AskMetrics {
            held: 3,
            pending: 1,
            ended: vec![("approved", 1), ("timeout", 1)],
            ..Default::default()
        };
        m.decision_seconds.0.observe(0.2);
        let mut reg = Registry::with_prefix("agent_monitor");
        register(&mut reg, &m);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("agent_monitor_ask_requests_held_total 3"),
            "{out}"
        );
        assert!(
            out.contains("agent_monitor_ask_requests_pending 1"),
            "{out}"
        );
        assert!(
            out.contains("agent_monitor_ask_requests_decided_total{verdict=\"timeout\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("agent_monitor_ask_decision_seconds_count 1"),
            "{out}"
        );
    }
}
