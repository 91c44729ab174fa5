//! The reporter: the one owner of what the daemon reports. Every judged action goes through
//! [`Reporter::action`] (counters global, per agent and per action, the `events` history and
//! broadcast, the output sinks), every notice about the daemon itself through
//! [`Reporter::notice`] (log and journald), and the kernel's loss counters through
//! [`Reporter::kernel_losses`]. A new sink or a new kind of report is added here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use agent_monitor_common as common;
use tokio::sync::broadcast;

use crate::action::{Action, Verdict};
use crate::control::Counters;
use crate::event;
use crate::output::journald::message_id;
use crate::output::notice::{Level, Notice, Notices};
use crate::output::{Outputs, SinkError};

#[cfg(test)]
pub(super) mod tests;

/// Recent actions kept for `agent-monitor events`.
pub(super) const HISTORY: usize = 1000;

/// One action for `events` followers: (agent, audit-trail JSON line).
pub(super) type EventLine = Arc<(String, String)>;

/// The kernel's counters (`COUNTER_*`, summed over CPUs), all the reporter needs of the kernel.
pub(super) trait KernelCounters {
    fn counters(&self) -> anyhow::Result<[u64; common::COUNTERS as usize]>;
}

impl KernelCounters for crate::bpf::Kernel {
    fn counters(&self) -> anyhow::Result<[u64; common::COUNTERS as usize]> {
        crate::bpf::Kernel::counters(self)
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AgentCounters {
    pub(super) actions: u64,
    pub(super) allowed: u64,
    pub(super) denied: u64,
    pub(super) alerts: u64,
}

/// Counters, history, `events` followers and every output of the daemon.
pub(super) struct Reporter {
    outputs: Outputs,
    notices: Notices,
    per_agent: HashMap<String, AgentCounters>,
    /// (agent, action, verdict) → count, for the metrics.
    by_action: BTreeMap<(String, &'static str, &'static str), u64>,
    /// Global counters, as `status` shows them. Owners of other concerns count their own events
    /// here (reloads, DNS queries, sockets refused, …).
    pub(super) counters: Counters,
    started: SystemTime,
    decode_errors_logged: u64,
    /// The last `HISTORY` actions as (agent, audit line), for `events`.
    history: VecDeque<EventLine>,
    events_tx: broadcast::Sender<EventLine>,
}

impl Reporter {
    pub(super) fn new(
        outputs: Outputs,
        notices: Notices,
        events_tx: broadcast::Sender<EventLine>,
    ) -> Self {
        Reporter {
            outputs,
            notices,
            per_agent: HashMap::new(),
            by_action: BTreeMap::new(),
            counters: Counters::default(),
            started: SystemTime::now(),
            decode_errors_logged: 0,
            history: VecDeque::with_capacity(HISTORY),
            events_tx,
        }
    }

    /// Counts `action`, sends it to the sinks and to `events` followers, and keeps it in the
    /// history.
    pub(super) fn action(&mut self, action: Action) {
        self.counters.actions += 1;
        let c = self.per_agent.entry(action.agent.clone()).or_default();
        c.actions += 1;
        match action.verdict {
            Verdict::Allowed => c.allowed += 1,
            Verdict::Denied => {
                c.denied += 1;
                self.counters.denied += 1;
            }
            Verdict::Alert => {
                c.alerts += 1;
                self.counters.alerts += 1;
            }
        }
        *self
            .by_action
            .entry((
                action.agent.clone(),
                action.kind().as_str(),
                action.verdict.as_str(),
            ))
            .or_default() += 1;
        self.outputs.emit(&action);
        // Kept as the audit line itself: building and dropping a JSON value tree per action
        // cost the daemon most of a core at 100k actions/s; `events` parses on request.
        match crate::output::json::json_line(&action) {
            Ok(mut line) => {
                line.pop(); // the newline
                let event: EventLine = Arc::new((action.agent, line));
                if self.events_tx.receiver_count() > 0 {
                    let _ = self.events_tx.send(Arc::clone(&event));
                }
                if self.history.len() == HISTORY {
                    self.history.pop_front();
                }
                self.history.push_back(event);
            }
            Err(e) => tracing::debug!("action not kept for `events`: {e}"),
        }
    }

    /// Says `notice` in the log and to every notice sink (journald).
    pub(super) fn notice(&mut self, notice: Notice) {
        self.notices.send(&notice);
    }

    /// A record that is not an agent action, for the JSON trail (ask mode's requests and
    /// decisions; journald gets their notices).
    pub(super) fn record(&mut self, record: &serde_json::Value) {
        self.outputs.record(record);
    }

    /// Counts a kernel record that could not be decoded; logs the first ones, then one per 1000.
    pub(super) fn undecodable(&mut self, e: &event::DecodeError) {
        self.counters.undecodable_records += 1;
        if self.decode_errors_logged < 5 || self.counters.undecodable_records.is_multiple_of(1000) {
            self.decode_errors_logged += 1;
            tracing::warn!(
                total = self.counters.undecodable_records,
                "undecodable kernel record: {e}"
            );
        }
    }

    /// Losses before this daemon started are reported once, as part of the adoption notice, not
    /// as new ones: the counters start from what the kernel holds now.
    pub(super) fn loss_baseline(&mut self, kernel: &impl KernelCounters) {
        if let Ok(k) = kernel.counters() {
            self.counters.lost_records = k[common::COUNTER_RECORDS_LOST as usize];
            self.counters.actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
            self.counters.alerts_refused_unrecordable =
                k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize];
        }
    }

    /// Reports what the kernel could not hand over since the last look, once per look with the
    /// count: the records are gone, but nobody should learn it from `status` alone.
    pub(super) fn kernel_losses(&mut self, kernel: &impl KernelCounters) {
        let k = match kernel.counters() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("reading kernel counters: {e:#}");
                return;
            }
        };
        let grown = |now: u64, before: &mut u64| std::mem::replace(before, now) < now;
        let lost = k[common::COUNTER_RECORDS_LOST as usize];
        let actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
        if lost > self.counters.lost_records {
            let new = lost - self.counters.lost_records;
            let msg = format!(
                "{new} kernel records lost (ring buffer full), {} of them agent actions: their \
                 verdicts were enforced but they are not reported ({lost} lost in total)",
                actions_lost.saturating_sub(self.counters.actions_lost)
            );
            self.notice(
                Notice::new(message_id::RECORDS_LOST, Level::Warning, msg)
                    .field("LOST_RECORDS", new)
                    .field("LOST_TOTAL", lost),
            );
        }
        self.counters.lost_records = lost;
        self.counters.actions_lost = actions_lost;
        if grown(
            k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize],
            &mut self.counters.alerts_refused_unrecordable,
        ) {
            tracing::warn!(
                total = self.counters.alerts_refused_unrecordable,
                "alert-mode agents' off-list actions were refused because the ring buffer could \
                 not take their records (an off-list action never happens unrecorded)"
            );
        }
        self.counters.grants_expired_in_kernel = k[common::COUNTER_GRANTS_EXPIRED as usize];
        // Identity anomalies: logged when they grow, always counted.
        if grown(
            k[common::COUNTER_TAGS_FULL as usize],
            &mut self.counters.tags_full,
        ) {
            tracing::error!(
                total = self.counters.tags_full,
                "processes could not be tagged (PROCESS_AGENTS full): they are not treated as agents"
            );
        }
        if grown(
            k[common::COUNTER_SELECTOR_CONFLICTS as usize],
            &mut self.counters.selector_conflicts,
        ) {
            tracing::warn!(
                total = self.counters.selector_conflicts,
                "a process exec'd another agent's selected executable; it stays with the agent that holds it by a higher-ranked selector"
            );
        }
        self.counters.source_routed_packets = k[common::COUNTER_SOURCE_ROUTED as usize];
        self.counters.dns_no_proxy = k[common::COUNTER_DNS_NO_PROXY as usize];
        self.counters.dns_orig_missing = k[common::COUNTER_DNS_ORIG_MISSING as usize];
    }

    /// Writes out what the sinks buffered (after each burst of records).
    pub(super) fn flush(&mut self) {
        self.outputs.flush();
    }

    /// Reopens the JSON trail at its path (`SIGUSR1`, after logrotate renamed it).
    pub(super) fn reopen(&mut self) -> Result<(), SinkError> {
        self.outputs.reopen()
    }

    /// Writes the summaries of journald aggregation windows that ended by `now`.
    pub(super) fn close_storms(&mut self, now: SystemTime) {
        self.outputs.close_storms(now);
    }

    /// Timed work of the sinks (chain heads to journald, OTLP batches), once per sweep.
    pub(super) fn tick(&mut self) {
        self.outputs.tick();
    }

    /// What the OTLP exporter sent and lost (metrics).
    pub(super) fn export_stats(&self) -> Option<crate::output::otlp::ExportStats> {
        self.outputs.export_stats()
    }

    /// The counters of one agent (none yet: it did nothing).
    pub(super) fn agent(&self, agent: &str) -> AgentCounters {
        self.per_agent.get(agent).copied().unwrap_or_default()
    }

    /// (agent, action, verdict, count) rows, for the metrics.
    pub(super) fn by_action(&self) -> Vec<(String, &'static str, &'static str, u64)> {
        self.by_action
            .iter()
            .map(|((a, k, v), n)| (a.clone(), *k, *v, *n))
            .collect()
    }

    /// Written and failed counts per action sink, journald first.
    pub(super) fn sink_counts(&self) -> Vec<(String, u64, u64)> {
        self.outputs
            .stats()
            .into_iter()
            .map(|s| (s.sink.to_string(), s.written, s.failed))
            .chain(std::iter::once({
                let (delivered, failed) = crate::output::notice::delivery_counts();
                ("notices".to_string(), delivered, failed)
            }))
            .collect()
    }

    /// Actions kept out of journald by aggregation.
    pub(super) fn aggregated(&self) -> u64 {
        self.outputs.aggregated()
    }

    /// The global counters as `status` shows them.
    pub(super) fn counters(&self) -> Counters {
        Counters {
            journald_aggregated: self.outputs.aggregated(),
            ..self.counters.clone()
        }
    }

    pub(super) fn started(&self) -> SystemTime {
        self.started
    }

    /// The recent actions, oldest first.
    pub(super) fn history(&self) -> impl Iterator<Item = &EventLine> {
        self.history.iter()
    }
}
