//! The reporter without root: fake sinks for actions and notices, a fake kernel counter table.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use super::*;
use crate::action::ActionKind;
use crate::output::notice::NoticeSink;
use crate::output::tests::{connect_action, exec_action};
use crate::output::{Sink, SinkError};

/// Keeps every action it is given.
#[derive(Clone, Default)]
pub(in crate::daemon) struct ActionProbe(pub(in crate::daemon) Arc<Mutex<Vec<Action>>>);

impl Sink for ActionProbe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn emit(&mut self, action: &Action) -> Result<(), SinkError> {
        self.0.lock().unwrap().push(action.clone());
        Ok(())
    }
}

/// Keeps every notice it is given.
#[derive(Clone, Default)]
pub(in crate::daemon) struct NoticeProbe(pub(in crate::daemon) Arc<Mutex<Vec<Notice>>>);

impl NoticeSink for NoticeProbe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn notice(&mut self, notice: &Notice) -> Result<(), SinkError> {
        self.0.lock().unwrap().push(notice.clone());
        Ok(())
    }
}

impl NoticeProbe {
    pub(in crate::daemon) fn ids(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().iter().map(|n| n.id).collect()
    }

    /// The value of `field` in the notice number `i`.
    pub(in crate::daemon) fn field(&self, i: usize, field: &str) -> Option<String> {
        self.0.lock().unwrap()[i]
            .fields
            .iter()
            .find(|(k, _)| *k == field)
            .map(|(_, v)| v.clone())
    }
}

/// A reporter whose journald role (every verdict) and notices go to probes.
pub(in crate::daemon) fn reporter() -> (Reporter, ActionProbe, NoticeProbe) {
    let (actions, notices) = (ActionProbe::default(), NoticeProbe::default());
    let reporter = Reporter::new(
        Outputs::new(Box::new(actions.clone()), None, true),
        Notices::new(vec![Box::new(notices.clone())]),
        // As the daemon's: more than a history's worth.
        broadcast::channel(4096).0,
    );
    (reporter, actions, notices)
}

/// Kernel counters as a test sets them; `None`: reading them fails.
struct FakeCounters(RefCell<Option<[u64; common::COUNTERS as usize]>>);

impl FakeCounters {
    fn new() -> Self {
        FakeCounters(RefCell::new(Some([0; common::COUNTERS as usize])))
    }
    fn set(&self, counter: u32, value: u64) {
        self.0.borrow_mut().as_mut().expect("readable")[counter as usize] = value;
    }
}

impl KernelCounters for FakeCounters {
    fn counters(&self) -> anyhow::Result<[u64; common::COUNTERS as usize]> {
        self.0
            .borrow()
            .ok_or_else(|| anyhow::anyhow!("map unreadable"))
    }
}

fn action(agent: &str, kind: ActionKind, verdict: Verdict) -> Action {
    let object = match kind {
        ActionKind::Connect => connect_action().object,
        ActionKind::Exec => crate::output::tests::exec_action().object,
        other => panic!("no sample action of kind {other:?}"),
    };
    Action {
        agent: agent.into(),
        object,
        verdict,
        ..connect_action()
    }
}

#[test]
fn actions_are_counted_globally_per_agent_and_per_action_and_verdict() {
    let (mut r, sink, _) = reporter();
    r.action(action("coder", ActionKind::Connect, Verdict::Denied));
    r.action(action("coder", ActionKind::Connect, Verdict::Denied));
    r.action(action("coder", ActionKind::Exec, Verdict::Allowed));
    r.action(action("reviewer", ActionKind::Connect, Verdict::Alert));
    let c = r.counters();
    assert_eq!((c.actions, c.denied, c.alerts), (4, 2, 1));
    assert_eq!(
        r.agent("coder"),
        AgentCounters {
            actions: 3,
            allowed: 1,
            denied: 2,
            alerts: 0
        }
    );
    assert_eq!(r.agent("reviewer").alerts, 1);
    assert_eq!(r.agent("nobody"), AgentCounters::default());
    assert_eq!(
        r.by_action(),
        vec![
            ("coder".to_string(), "connect", "denied", 2),
            ("coder".to_string(), "exec", "allowed", 1),
            ("reviewer".to_string(), "connect", "alert", 1),
        ]
    );
    // Every action reached the sink, and its counters say so.
    assert_eq!(sink.0.lock().unwrap().len(), 4);
    let counts = r.sink_counts();
    assert_eq!(counts[0], ("probe".to_string(), 4, 0));
    // Then the daemon's notices (counted process-wide: other tests send some too).
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(counts[1].0, "notices");
}

#[test]
fn history_keeps_the_last_actions_and_followers_get_each_one() {
    let (mut r, _, _) = reporter();
    let mut follower = r.events_tx.subscribe();
    for i in 0..HISTORY + 5 {
        r.action(Action {
            pid: i as u32,
            ..exec_action()
        });
    }
    let history: Vec<serde_json::Value> = r
        .history()
        .map(|e| serde_json::from_str(&e.1).expect("an audit line"))
        .collect();
    assert_eq!(history.len(), HISTORY);
    assert_eq!(history[0]["pid"], 5, "the oldest five went");
    assert_eq!(history[HISTORY - 1]["pid"], (HISTORY + 4) as u64);
    let first = follower.try_recv().expect("broadcast to followers");
    assert_eq!(first.0, "coder");
    let line: serde_json::Value = serde_json::from_str(&first.1).expect("json");
    assert_eq!(line["pid"], 0);
    assert_eq!(line["action"], "exec");
}

#[test]
fn kernel_losses_are_reported_as_deltas_from_the_baseline() {
    let (mut r, _, notices) = reporter();
    let kernel = FakeCounters::new();
    // A predecessor's losses: the adoption notice says them, not a loss notice.
    kernel.set(common::COUNTER_RECORDS_LOST, 10);
    kernel.set(common::COUNTER_ACTIONS_LOST, 4);
    r.loss_baseline(&kernel);
    r.kernel_losses(&kernel);
    assert!(notices.ids().is_empty());
    assert_eq!(r.counters().lost_records, 10);

    kernel.set(common::COUNTER_RECORDS_LOST, 15);
    kernel.set(common::COUNTER_ACTIONS_LOST, 7);
    r.kernel_losses(&kernel);
    assert_eq!(notices.ids(), vec![message_id::RECORDS_LOST]);
    assert_eq!(notices.field(0, "LOST_RECORDS").as_deref(), Some("5"));
    assert_eq!(notices.field(0, "LOST_TOTAL").as_deref(), Some("15"));
    let text = notices.0.lock().unwrap()[0].message.clone();
    assert!(text.starts_with("5 kernel records lost"), "{text}");
    assert!(text.contains("3 of them agent actions"), "{text}");
    assert_eq!(
        (r.counters().lost_records, r.counters().actions_lost),
        (15, 7)
    );

    // Nothing new: no notice. The other counters follow the kernel.
    kernel.set(common::COUNTER_TAGS_FULL, 2);
    kernel.set(common::COUNTER_DNS_NO_PROXY, 3);
    r.kernel_losses(&kernel);
    assert_eq!(notices.ids().len(), 1);
    assert_eq!((r.counters().tags_full, r.counters().dns_no_proxy), (2, 3));

    // Unreadable counters change nothing.
    *kernel.0.borrow_mut() = None;
    r.kernel_losses(&kernel);
    assert_eq!(r.counters().lost_records, 15);
}

#[test]
fn notices_go_to_every_notice_sink() {
    let (mut r, actions, notices) = reporter();
    r.notice(Notice::new(message_id::STOPPING, Level::Notice, "stopped").field("PIN_DIR", "/pins"));
    assert_eq!(notices.ids(), vec![message_id::STOPPING]);
    assert_eq!(notices.field(0, "PIN_DIR").as_deref(), Some("/pins"));
    // A notice is not an action.
    assert!(actions.0.lock().unwrap().is_empty());
    assert_eq!(r.counters().actions, 0);
}

#[test]
fn undecodable_records_are_counted() {
    let (mut r, _, _) = reporter();
    for _ in 0..7 {
        r.undecodable(&event::DecodeError::UnknownKind(99));
    }
    assert_eq!(r.counters().undecodable_records, 7);
}
