//! Output sinks: every judged [`Action`] goes to journald and, if configured, to a JSON-lines audit
//! trail. Failed writes are counted per sink and logged (rate-limited), never dropped silently.
//!
//! The fields both sinks report are defined once, in [`Field`] and [`action_fields`]; journald and
//! JSON only differ in how they spell a name (`AGENT_ID` / `agent_id`) and render a value.

pub mod ask_metrics;
pub mod chain;
mod fields;
pub mod journald;
pub mod json;
pub mod metrics;
pub mod notice;
pub mod otlp;
pub mod rotate;
pub mod storm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::action::{Action, Verdict};

pub use fields::{Field, FieldValue, action_fields};
pub use journald::JournaldSink;
pub use json::JsonSink;

/// One destination for actions.
pub trait Sink {
    /// Short stable name used in logs and `status` ("journald", "json").
    fn name(&self) -> &'static str;
    /// Reports one action. An error means this action did not reach the destination.
    fn emit(&mut self, action: &Action) -> Result<(), SinkError>;
    /// Reports actions that were aggregated (see [`storm`]); only the journal role gets these.
    fn emit_summary(&mut self, _summary: &storm::StormSummary) -> Result<(), SinkError> {
        Ok(())
    }
    /// Reports a record that is not an agent action (ask mode's held requests and decisions);
    /// only the JSON trail keeps these (journald gets them as notices).
    fn emit_record(&mut self, _record: &serde_json::Value) -> Result<(), SinkError> {
        Ok(())
    }
    /// Actions accepted by `emit` but held in a buffer until [`Sink::flush`].
    fn pending(&self) -> u64 {
        0
    }
    /// Writes out what `emit` buffered. An error means the [`Sink::pending`] actions did not
    /// reach the destination.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Opens the destination anew (the JSON trail after an external rotation renamed it). What was
    /// buffered goes to the old destination first.
    fn reopen(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Periodic housekeeping (the daemon's sweep): the JSON trail reports its chain head.
    fn tick(&mut self, _now: Instant) {}
    /// Actions `emit` accepted that were lost later (an export that failed after its retries):
    /// counted as failed, not written.
    fn lost_after_accept(&self) -> u64 {
        0
    }
}

/// Why a sink could not report an action.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sending to journald failed: {0}")]
    Journald(#[from] libsystemd::errors::SdError),
    #[error("opening audit trail {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing audit trail {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding action as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("formatting action time: {0}")]
    Time(#[from] time::error::Format),
    #[error("OTLP export queue full (the collector is slow or down): record lost")]
    ExportQueueFull,
}

/// Which sinks to open.
#[derive(Clone, Debug, Default)]
pub struct OutputConfig {
    /// Also send allowed actions to journald (denials and alerts always go there).
    pub journal_allowed: bool,
    /// Append every action to this JSON-lines file.
    pub json_path: Option<PathBuf>,
    /// Size-based rotation of that file (`--json-log-max-size`).
    pub json_rotation: Option<rotate::Rotation>,
    /// Export to an OpenTelemetry collector (`--otlp-endpoint`).
    pub otlp: Option<otlp::OtlpConfig>,
    /// Identical denials/alerts within this window reach journald once plus one summary
    /// (zero: every one). The JSON trail always gets every action.
    pub storm_window: Duration,
}

/// Counters of one sink, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    pub sink: &'static str,
    /// Actions the sink accepted.
    pub written: u64,
    /// Actions the sink failed to report.
    pub failed: u64,
    /// The most recent failure, if any.
    pub last_error: Option<String>,
}

/// Fans each action out to the configured sinks and keeps their counters.
pub struct Outputs {
    journal: Slot,
    json: Option<Slot>,
    journal_allowed: bool,
    storms: storm::StormGate,
    otlp: Option<Export>,
}

/// The OTLP sink, what it exports, and its exporter's counters.
struct Export {
    slot: Slot,
    actions: otlp::OtlpActions,
    counters: std::sync::Arc<otlp::ExportCounters>,
}

impl Outputs {
    /// Opens journald and, if configured, the JSON trail (its failure to open is an error here,
    /// at start, rather than a stream of failed writes later).
    pub fn open(config: &OutputConfig) -> Result<Self, SinkError> {
        let json = match &config.json_path {
            Some(path) => Some(Box::new(JsonSink::open_with(
                path,
                config.json_rotation,
                Some(chain::head_notice),
            )?) as Box<dyn Sink + Send>),
            None => None,
        };
        let mut outputs = Self::new(Box::new(JournaldSink::new()), json, config.journal_allowed);
        outputs.storms = storm::StormGate::new(config.storm_window);
        outputs.otlp = config.otlp.as_ref().map(|c| {
            let sink = otlp::OtlpSink::start(c);
            Export {
                counters: sink.counters(),
                slot: Slot::new(Box::new(sink)),
                actions: c.actions,
            }
        });
        Ok(outputs)
    }

    /// Builds from given sinks (tests, or other destinations in the journald/JSON roles).
    pub fn new(
        journal: Box<dyn Sink + Send>,
        json: Option<Box<dyn Sink + Send>>,
        journal_allowed: bool,
    ) -> Self {
        Self {
            journal: Slot::new(journal),
            json: json.map(Slot::new),
            journal_allowed,
            storms: storm::StormGate::new(Duration::ZERO),
            otlp: None,
        }
    }

    /// Reports `action` to every sink it belongs to. Failures are counted and logged, not
    /// returned: one broken sink must not stop the others or the daemon.
    pub fn emit(&mut self, action: &Action) {
        let now = Instant::now();
        if action.verdict != Verdict::Allowed || self.journal_allowed {
            let (pass, closed) = self.storms.admit(action);
            if let Some(summary) = closed {
                self.journal.emit_summary(&summary, now);
            }
            if pass {
                self.journal.emit(action, now);
            }
        }
        if let Some(json) = &mut self.json {
            json.emit(action, now);
        }
        if let Some(otlp) = &mut self.otlp
            && otlp.actions.exports(action.verdict)
        {
            otlp.slot.emit(action, now);
        }
    }

    /// Writes a record that is not an agent action to the JSON trail (see [`Sink::emit_record`]).
    pub fn record(&mut self, record: &serde_json::Value) {
        if let Some(json) = &mut self.json {
            let now = Instant::now();
            let result = json.sink.emit_record(record);
            json.account(result, 1, now);
        }
    }

    /// Writes the summaries of aggregation windows that ended by `now`.
    pub fn close_storms(&mut self, now: std::time::SystemTime) {
        let at = Instant::now();
        for summary in self.storms.close_expired(now) {
            self.journal.emit_summary(&summary, at);
        }
    }

    /// Periodic housekeeping (the daemon's sweep): the JSON trail writes its chain head to
    /// journald if it moved.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if let Some(json) = &mut self.json {
            json.sink.tick(now);
        }
    }

    /// Actions kept out of journald by aggregation (all are in summaries and the JSON trail).
    pub fn aggregated(&self) -> u64 {
        self.storms.suppressed_total
    }

    /// Writes out what the sinks buffered; call it after each burst of [`Outputs::emit`] (the
    /// daemon does after every event it handled). Failures are counted and logged like `emit`'s.
    pub fn flush(&mut self) {
        let now = Instant::now();
        self.journal.flush(now);
        if let Some(json) = &mut self.json {
            json.flush(now);
        }
    }

    /// Flushes, then reopens the JSON trail at its path (`SIGUSR1`, after logrotate renamed it):
    /// every line goes either to the renamed file or to the new one. A failure to reopen keeps
    /// writing to the old file, and is returned.
    pub fn reopen(&mut self) -> Result<(), SinkError> {
        self.flush();
        match &mut self.json {
            Some(json) => json.sink.reopen(),
            None => Ok(()),
        }
    }

    /// Counters per sink, journald first.
    pub fn stats(&self) -> Vec<SinkStats> {
        std::iter::once(&self.journal)
            .chain(self.json.as_ref())
            .chain(self.otlp.as_ref().map(|o| &o.slot))
            .map(Slot::stats)
            .collect()
    }

    /// What the OTLP exporter did, if it runs.
    pub fn export_stats(&self) -> Option<otlp::ExportStats> {
        self.otlp.as_ref().map(|o| o.counters.stats())
    }
}

/// A sink with its counters.
struct Slot {
    sink: Box<dyn Sink + Send>,
    written: u64,
    failed: u64,
    last_error: Option<String>,
    throttle: FailureThrottle,
}

impl Slot {
    /// Buffered actions written out even inside a long burst: bounds memory and the delay.
    const FLUSH_EVERY: u64 = 1024;

    fn new(sink: Box<dyn Sink + Send>) -> Self {
        Self {
            sink,
            written: 0,
            failed: 0,
            last_error: None,
            throttle: FailureThrottle::default(),
        }
    }

    fn emit(&mut self, action: &Action, now: Instant) {
        let result = self.sink.emit(action);
        self.account(result, 1, now);
        if self.sink.pending() >= Self::FLUSH_EVERY {
            self.flush(now);
        }
    }

    /// A flush that fails loses the buffered actions, which were counted as written.
    fn flush(&mut self, now: Instant) {
        let pending = self.sink.pending();
        if pending == 0 {
            return;
        }
        let result = self.sink.flush();
        if result.is_err() {
            self.written = self.written.saturating_sub(pending);
        }
        self.account(result, pending, now);
    }

    /// Counts `n` actions as written or failed.
    fn account(&mut self, result: Result<(), SinkError>, n: u64, now: Instant) {
        match result {
            Ok(()) => {
                self.written += n;
                if let Some(unreported) = self.throttle.success(now) {
                    tracing::warn!(
                        sink = self.sink.name(),
                        unreported_failures = unreported,
                        total_failed = self.failed,
                        "output sink works again; failures since the last report: {unreported}"
                    );
                }
            }
            Err(err) => self.failed(&err, now, n, "action"),
        }
    }

    fn emit_summary(&mut self, summary: &storm::StormSummary, now: Instant) {
        match self.sink.emit_summary(summary) {
            Ok(()) => self.written += 1,
            Err(err) => self.failed(&err, now, 1, "repeat summary"),
        }
    }

    /// Counts a failed write and logs it, rate-limited; `what` did not reach this sink.
    fn failed(&mut self, err: &SinkError, now: Instant, n: u64, what: &str) {
        self.failed += n;
        let text = err.to_string();
        if let Some(count) = self.throttle.failure(now, n) {
            tracing::warn!(
                sink = self.sink.name(),
                failures_since_last_report = count,
                total_failed = self.failed,
                "output sink failed, {what} not recorded there: {text}"
            );
        }
        self.last_error = Some(text);
    }

    fn stats(&self) -> SinkStats {
        let lost = self.sink.lost_after_accept();
        SinkStats {
            sink: self.sink.name(),
            written: self.written.saturating_sub(lost),
            failed: self.failed + lost,
            last_error: self.last_error.clone(),
        }
    }
}

/// Rate limit for failure logs: the first failure is reported at once, later ones at most once per
/// [`FailureThrottle::INTERVAL`] with the number of failures since the previous report. Failures
/// that were not yet reported when the sink recovers are reported with the first success that is
/// due, so every failure appears in some log line as well as in the counters.
#[derive(Debug, Default)]
pub(crate) struct FailureThrottle {
    last_report: Option<Instant>,
    unreported: u64,
}

impl FailureThrottle {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn due(&self, now: Instant) -> bool {
        self.last_report
            .is_none_or(|last| now.saturating_duration_since(last) >= Self::INTERVAL)
    }

    /// Records a failure; `Some(n)` when it should be logged, `n` failures since the last report.
    pub(crate) fn failure(&mut self, now: Instant, n: u64) -> Option<u64> {
        self.unreported += n;
        self.report(now)
    }

    /// Records a success; `Some(n)` when `n` earlier failures are still to be logged.
    pub(crate) fn success(&mut self, now: Instant) -> Option<u64> {
        if self.unreported == 0 {
            return None;
        }
        self.report(now)
    }

    fn report(&mut self, now: Instant) -> Option<u64> {
        if !self.due(now) {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    use super::*;
    use crate::action::{ChainLink, Destination, DnsQuery, ExecFile, NetTarget, Object};

    /// A connect from a three-process chain, fully populated.
    pub(crate) fn connect_action() -> Action {
        Action {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_416_640_250),
            agent: "coder".into(),
            spiffe_id: "spiffe://host.example/agent/coder".into(),
            task: "t-42".into(),
            verdict: Verdict::Denied,
            pid: 4242,
            uid: 1000,
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            object: Object::Connect(NetTarget {
                destination: Destination {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                    port: 443,
                    transport: "tcp",
                },
                host: Some("api.example.com".into()),
            }),
            chain: vec![
                ChainLink {
                    pid: 4000,
                    exe: "/usr/bin/python3".into(),
                    args: vec![],
                },
                ChainLink {
                    pid: 4100,
                    exe: "/bin/sh".into(),
                    args: vec!["-c".into(), "curl https://10.1.2.3".into()],
                },
                ChainLink {
                    pid: 4242,
                    exe: "/usr/bin/curl".into(),
                    args: vec![],
                },
            ],
            enforcement: Some("eperm"),
            reason: "no network rule matches 10.1.2.3:443".into(),
        }
    }

    /// An exec, alert mode, nothing enforced.
    pub(crate) fn exec_action() -> Action {
        Action {
            verdict: Verdict::Alert,
            comm: "sh".into(),
            exe: None,
            object: Object::Exec(ExecFile {
                path: "/usr/bin/nc".into(),
                interpreter: None,
            }),
            enforcement: None,
            reason: "no exec rule matches /usr/bin/nc".into(),
            ..connect_action()
        }
    }

    /// A refused DNS query.
    pub(crate) fn dns_action() -> Action {
        Action {
            object: Object::Dns(DnsQuery {
                name: Some("secret.attacker.net".into()),
                server: Some(Destination {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 255, 255, 53)),
                    port: 53,
                    transport: "udp",
                }),
            }),
            enforcement: Some("refused"),
            reason: "no host rule matches \"secret.attacker.net\"".into(),
            ..connect_action()
        }
    }

    #[test]
    fn throttle_reports_first_then_every_interval_with_count() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut t = FailureThrottle::default();
        assert_eq!(t.failure(s(0), 1), Some(1));
        assert_eq!(t.failure(s(1), 1), None);
        assert_eq!(t.failure(s(9), 1), None);
        assert_eq!(t.failure(s(10), 1), Some(3));
        assert_eq!(t.failure(s(11), 1), None);
        // Recovery before the interval: the pending failure waits for the next due report.
        assert_eq!(t.success(s(12)), None);
        assert_eq!(t.success(s(20)), Some(1));
        assert_eq!(t.success(s(21)), None);
        // A new burst long after starts with an immediate report.
        assert_eq!(t.failure(s(100), 1), Some(1));
    }

    /// Records what it was given; fails while `fail` is set.
    #[derive(Clone, Default)]
    struct Probe {
        seen: Arc<Mutex<Vec<Verdict>>>,
        fail: Arc<Mutex<bool>>,
    }

    impl Sink for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn emit(&mut self, action: &Action) -> Result<(), SinkError> {
            if *self.fail.lock().unwrap() {
                return Err(SinkError::Write {
                    path: "/probe".into(),
                    source: std::io::Error::other("probe failure"),
                });
            }
            self.seen.lock().unwrap().push(action.verdict);
            Ok(())
        }
    }

    fn all_verdicts() -> Vec<Action> {
        [Verdict::Allowed, Verdict::Denied, Verdict::Alert]
            .into_iter()
            .map(|verdict| Action {
                verdict,
                ..connect_action()
            })
            .collect()
    }

    #[test]
    fn allowed_goes_to_journal_only_when_asked() {
        for journal_allowed in [false, true] {
            let (journal, json) = (Probe::default(), Probe::default());
            let mut out = Outputs::new(
                Box::new(journal.clone()),
                Some(Box::new(json.clone())),
                journal_allowed,
            );
            for a in all_verdicts() {
                out.emit(&a);
            }
            let mut expected = vec![Verdict::Denied, Verdict::Alert];
            if journal_allowed {
                expected.insert(0, Verdict::Allowed);
            }
            assert_eq!(*journal.seen.lock().unwrap(), expected);
            assert_eq!(json.seen.lock().unwrap().len(), 3);
            let stats = out.stats();
            assert_eq!(stats.len(), 2);
            assert_eq!(stats[0].written, expected.len() as u64);
            assert_eq!(stats[1].written, 3);
        }
    }

    #[test]
    fn failures_are_counted_per_sink() {
        let (journal, json) = (Probe::default(), Probe::default());
        let mut out = Outputs::new(
            Box::new(journal.clone()),
            Some(Box::new(json.clone())),
            false,
        );
        *json.fail.lock().unwrap() = true;
        for a in all_verdicts() {
            out.emit(&a);
        }
        *json.fail.lock().unwrap() = false;
        out.emit(&connect_action());
        let stats = out.stats();
        assert_eq!(
            stats[0],
            SinkStats {
                sink: "probe",
                written: 3,
                failed: 0,
                last_error: None
            }
        );
        assert_eq!(stats[1].written, 1);
        assert_eq!(stats[1].failed, 3);
        let err = stats[1].last_error.as_deref().unwrap();
        assert!(err.contains("probe failure"), "{err}");
    }

    #[test]
    fn no_json_sink_means_one_stats_row() {
        let mut out = Outputs::new(Box::new(Probe::default()), None, true);
        out.emit(&exec_action());
        assert_eq!(out.stats().len(), 1);
        assert_eq!(out.stats()[0].written, 1);
    }
}
