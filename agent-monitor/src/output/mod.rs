//! Output sinks: every judged [`Action`] goes to journald and, if configured, to a JSON-lines audit
//! trail. Failed writes are counted per sink and logged (rate-limited), never dropped silently.
//!
//! The fields both sinks report are defined once, in [`Field`] and [`action_fields`]; journald and
//! JSON only differ in how they spell a name (`AGENT_ID` / `agent_id`) and render a value.

pub mod journald;
pub mod json;
pub mod metrics;
pub mod storm;

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::action::{Action, ChainLink, Object, Verdict};

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
}

/// A field every sink reports. Journald names are the upper-case form of the JSON names, with one
/// exception: the uid is `AGENT_UID` in journald so that nobody mistakes it for journald's trusted
/// `_UID` (the daemon's uid), while the JSON trail, which has no trusted fields, calls it `uid`.
/// `PID` keeps its plain name (the interface promises it); journald stores it as a user field next
/// to its own `_PID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    AgentId,
    AgentSpiffeId,
    TaskId,
    Action,
    Verdict,
    Pid,
    Uid,
    Comm,
    Exe,
    Interpreter,
    DestAddr,
    DestPort,
    DestTransport,
    DestHost,
    DnsName,
    Socket,
    Syscall,
    Signal,
    TargetPid,
    TargetComm,
    TargetAgent,
    TargetTask,
    ProcessChain,
    Enforcement,
    Reason,
    Message,
}

impl Field {
    /// Every field, in report order.
    pub const ALL: [Field; 26] = [
        Field::AgentId,
        Field::AgentSpiffeId,
        Field::TaskId,
        Field::Action,
        Field::Verdict,
        Field::Pid,
        Field::Uid,
        Field::Comm,
        Field::Exe,
        Field::Interpreter,
        Field::DestAddr,
        Field::DestPort,
        Field::DestTransport,
        Field::DestHost,
        Field::DnsName,
        Field::Socket,
        Field::Syscall,
        Field::Signal,
        Field::TargetPid,
        Field::TargetComm,
        Field::TargetAgent,
        Field::TargetTask,
        Field::ProcessChain,
        Field::Enforcement,
        Field::Reason,
        Field::Message,
    ];

    /// Name of the journald field (upper case, `[A-Z0-9_]`, not starting with `_`).
    pub fn journal_name(self) -> &'static str {
        match self {
            Field::AgentId => "AGENT_ID",
            Field::AgentSpiffeId => "AGENT_SPIFFE_ID",
            Field::TaskId => "TASK_ID",
            Field::Action => "ACTION",
            Field::Verdict => "VERDICT",
            Field::Pid => "PID",
            Field::Uid => "AGENT_UID",
            Field::Comm => "COMM",
            Field::Exe => "EXE",
            Field::Interpreter => "INTERPRETER",
            Field::Socket => "SOCKET",
            Field::Syscall => "SYSCALL",
            Field::Signal => "SIGNAL",
            Field::TargetPid => "TARGET_PID",
            Field::TargetComm => "TARGET_COMM",
            Field::TargetAgent => "TARGET_AGENT",
            Field::TargetTask => "TARGET_TASK",
            Field::DestAddr => "DEST_ADDR",
            Field::DestPort => "DEST_PORT",
            Field::DestTransport => "DEST_TRANSPORT",
            Field::DestHost => "DEST_HOST",
            Field::DnsName => "DNS_NAME",
            Field::ProcessChain => "PROCESS_CHAIN",
            Field::Enforcement => "ENFORCEMENT",
            Field::Reason => "REASON",
            Field::Message => "MESSAGE",
        }
    }

    /// Name of the key in a JSON audit record.
    pub fn json_name(self) -> &'static str {
        match self {
            Field::AgentId => "agent_id",
            Field::AgentSpiffeId => "agent_spiffe_id",
            Field::TaskId => "task_id",
            Field::Action => "action",
            Field::Verdict => "verdict",
            Field::Pid => "pid",
            Field::Uid => "uid",
            Field::Comm => "comm",
            Field::Exe => "exe",
            Field::Interpreter => "interpreter",
            Field::Socket => "socket",
            Field::Syscall => "syscall",
            Field::Signal => "signal",
            Field::TargetPid => "target_pid",
            Field::TargetComm => "target_comm",
            Field::TargetAgent => "target_agent",
            Field::TargetTask => "target_task",
            Field::DestAddr => "dest_addr",
            Field::DestPort => "dest_port",
            Field::DestTransport => "dest_transport",
            Field::DestHost => "dest_host",
            Field::DnsName => "dns_name",
            Field::ProcessChain => "process_chain",
            Field::Enforcement => "enforcement",
            Field::Reason => "reason",
            Field::Message => "message",
        }
    }
}

/// A field's value before a sink renders it.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Text(Cow<'a, str>),
    Number(u64),
    /// Journald renders [`Action::chain_string`]; JSON an array of `{pid, exe, args}`.
    Chain(&'a [ChainLink]),
}

/// Every [`Field`] of `action`, in [`Field::ALL`] order; `None` where it does not apply (no exe
/// known, no destination for an exec, no enforcement for an allowed action).
pub fn action_fields(action: &Action) -> Vec<(Field, Option<FieldValue<'_>>)> {
    let text = |s: &'static str| Some(FieldValue::Text(Cow::Borrowed(s)));
    let dest = action.object.destination();
    let target = action.object.target();
    Field::ALL
        .iter()
        .map(|&field| {
            let value = match field {
                Field::AgentId => Some(FieldValue::Text(Cow::Borrowed(action.agent.as_str()))),
                Field::AgentSpiffeId => {
                    Some(FieldValue::Text(Cow::Borrowed(action.spiffe_id.as_str())))
                }
                Field::TaskId => Some(FieldValue::Text(Cow::Borrowed(action.task.as_str()))),
                Field::Action => text(action.kind().as_str()),
                Field::Verdict => text(action.verdict.as_str()),
                Field::Pid => Some(FieldValue::Number(action.pid.into())),
                Field::Uid => Some(FieldValue::Number(action.uid.into())),
                Field::Comm => Some(FieldValue::Text(Cow::Borrowed(action.comm.as_str()))),
                Field::Exe => action
                    .reported_exe()
                    .map(|e| FieldValue::Text(Cow::Borrowed(e))),
                Field::Interpreter => match &action.object {
                    Object::Exec(f) => borrowed(&f.interpreter),
                    _ => None,
                },
                Field::Socket => action
                    .object
                    .call()
                    .map(|e| FieldValue::Text(Cow::Borrowed(e))),
                Field::Syscall => target.map(|t| FieldValue::Text(Cow::Borrowed(&t.syscall))),
                Field::Signal => target
                    .and_then(|t| t.signal)
                    .map(|s| FieldValue::Number(s.into())),
                Field::TargetPid => target.map(|t| FieldValue::Number(t.pid.into())),
                Field::TargetComm => target.map(|t| FieldValue::Text(Cow::Borrowed(&t.comm))),
                Field::TargetAgent => target.and_then(|t| borrowed(&t.agent)),
                Field::TargetTask => target.and_then(|t| borrowed(&t.task)),
                Field::DestAddr => dest.map(|d| FieldValue::Text(Cow::Owned(d.addr.to_string()))),
                Field::DestPort => dest.map(|d| FieldValue::Number(d.port.into())),
                Field::DestTransport => dest.and_then(|d| text(d.transport)),
                Field::DestHost => match &action.object {
                    Object::Connect(t) | Object::Sendmsg(t) => borrowed(&t.host),
                    _ => None,
                },
                Field::DnsName => match &action.object {
                    Object::Dns(q) => borrowed(&q.name),
                    _ => None,
                },
                Field::ProcessChain => Some(FieldValue::Chain(&action.chain)),
                Field::Enforcement => action.enforcement.and_then(text),
                Field::Reason => Some(FieldValue::Text(Cow::Borrowed(action.reason.as_str()))),
                Field::Message => Some(FieldValue::Text(Cow::Owned(action.message()))),
            };
            (field, value)
        })
        .collect()
}

fn borrowed(s: &Option<String>) -> Option<FieldValue<'_>> {
    s.as_deref().map(|s| FieldValue::Text(Cow::Borrowed(s)))
}

/// Which sinks to open.
#[derive(Clone, Debug, Default)]
pub struct OutputConfig {
    /// Also send allowed actions to journald (denials and alerts always go there).
    pub journal_allowed: bool,
    /// Append every action to this JSON-lines file.
    pub json_path: Option<PathBuf>,
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
}

impl Outputs {
    /// Opens journald and, if configured, the JSON trail (its failure to open is an error here,
    /// at start, rather than a stream of failed writes later).
    pub fn open(config: &OutputConfig) -> Result<Self, SinkError> {
        let json = match &config.json_path {
            Some(path) => Some(Box::new(JsonSink::open(path)?) as Box<dyn Sink + Send>),
            None => None,
        };
        let mut outputs = Self::new(Box::new(JournaldSink::new()), json, config.journal_allowed);
        outputs.storms = storm::StormGate::new(config.storm_window);
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
    }

    /// Writes the summaries of aggregation windows that ended by `now`.
    pub fn close_storms(&mut self, now: std::time::SystemTime) {
        let at = Instant::now();
        for summary in self.storms.close_expired(now) {
            self.journal.emit_summary(&summary, at);
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
            .map(Slot::stats)
            .collect()
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
        SinkStats {
            sink: self.sink.name(),
            written: self.written,
            failed: self.failed,
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
    use crate::action::{Destination, DnsQuery, ExecFile, NetTarget};

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

    #[test]
    fn field_names_are_distinct_and_json_is_lowercase_journal() {
        for (i, a) in Field::ALL.iter().enumerate() {
            for b in &Field::ALL[i + 1..] {
                assert_ne!(a.journal_name(), b.journal_name());
                assert_ne!(a.json_name(), b.json_name());
            }
            if *a != Field::Uid {
                assert_eq!(
                    a.json_name(),
                    a.journal_name().to_lowercase(),
                    "{a:?}: only Uid may be spelled differently"
                );
            }
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
    fn fields_cover_all_in_order() {
        let action = connect_action();
        let fields = action_fields(&action);
        let names: Vec<Field> = fields.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, Field::ALL);
        // A connect has every field but the exec, socket, DNS and process-target ones.
        assert!(
            fields.iter().all(|(f, v)| v.is_some()
                != matches!(
                    f,
                    Field::Interpreter
                        | Field::Socket
                        | Field::DnsName
                        | Field::Syscall
                        | Field::Signal
                        | Field::TargetPid
                        | Field::TargetComm
                        | Field::TargetAgent
                        | Field::TargetTask
                )),
            "{fields:?}"
        );
    }

    #[test]
    fn dns_action_has_its_name_and_server_but_no_host() {
        let a = dns_action();
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get(Field::DnsName),
            Some(FieldValue::Text(Cow::Borrowed("secret.attacker.net")))
        );
        assert_eq!(
            get(Field::Action),
            Some(FieldValue::Text(Cow::Borrowed("dns")))
        );
        assert_eq!(get(Field::DestPort), Some(FieldValue::Number(53)));
        assert_eq!(get(Field::DestHost), None);
        assert!(
            a.message().contains("dns query secret.attacker.net"),
            "{}",
            a.message()
        );
    }

    #[test]
    fn signal_action_names_the_call_and_its_target() {
        let a = Action {
            object: Object::Signal(crate::action::ProcessTarget {
                syscall: "kill".into(),
                signal: Some(9),
                pid: 777,
                comm: "sleep".into(),
                agent: Some("reviewer".into()),
                task: Some("t2".into()),
            }),
            ..connect_action()
        };
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(get(Field::Syscall), Some(FieldValue::Text("kill".into())));
        assert_eq!(get(Field::Signal), Some(FieldValue::Number(9)));
        assert_eq!(get(Field::TargetPid), Some(FieldValue::Number(777)));
        assert_eq!(
            get(Field::TargetAgent),
            Some(FieldValue::Text("reviewer".into()))
        );
        assert_eq!(get(Field::DestAddr), None);
        assert!(
            a.message()
                .contains("signal kill signal 9 of pid 777 (sleep, agent reviewer task t2)"),
            "{}",
            a.message()
        );
    }

    /// (An exec cannot carry a destination at all: the object is an exec file.)
    #[test]
    fn exec_has_no_destination() {
        let a = exec_action();
        assert_eq!(
            action_fields(&a)
                .iter()
                .find(|(f, _)| *f == Field::Exe)
                .and_then(|(_, v)| v.clone()),
            Some(FieldValue::Text("/usr/bin/nc".into())),
            "an exec reports the file it ran as EXE"
        );
        let fields = action_fields(&a);
        for (f, v) in fields {
            let absent = matches!(
                f,
                Field::DestAddr
                    | Field::DestPort
                    | Field::DestTransport
                    | Field::DestHost
                    | Field::DnsName
                    | Field::Enforcement
                    | Field::Interpreter
                    | Field::Socket
                    | Field::Syscall
                    | Field::Signal
                    | Field::TargetPid
                    | Field::TargetComm
                    | Field::TargetAgent
                    | Field::TargetTask
            );
            assert_eq!(v.is_none(), absent, "{f:?}: {v:?}");
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
