//! Alert-storm aggregation for journald: an agent that retries the same forbidden action a thousand
//! times gets one journald entry for the first try and one summary with the count and the time
//! window, instead of a thousand lines that bury everything else. The JSON trail still gets every
//! action; this only decides what journald sees.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::action::{Action, Object, Verdict};

/// What makes two actions "identical" for aggregation: same agent, task, kind, verdict, object.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StormKey {
    agent: String,
    task: String,
    kind: &'static str,
    verdict: &'static str,
    object: String,
}

impl StormKey {
    /// Only denials and alerts aggregate; `None` for an allowed action.
    pub fn of(action: &Action) -> Option<StormKey> {
        if action.verdict == Verdict::Allowed {
            return None;
        }
        let object = match &action.object {
            Object::Connect(_) | Object::Sendmsg(_) | Object::SourceRoute { .. } => action
                .object
                .destination()
                .map(|d| format!("{}:{}/{}", d.addr, d.port, d.transport))
                .unwrap_or_default(),
            Object::Socket(s) | Object::IoUring(s) | Object::Seccomp(s) => s.clone(),
            // A refused control request or an identity alert: its reason says what it was about.
            Object::Control | Object::Identity => action.reason.clone(),
            Object::Dns(q) => q.name.clone().unwrap_or_default(),
            Object::Exec(f) => f.path.clone(),
            Object::Open(f) => f.path.clone(),
            Object::Ptrace(t) | Object::Signal(t) => format!("{} {}", t.syscall, t.pid),
            Object::Unix(t) => format!("unix:{}", t.path),
            // An intercepted request is its own object: method and path, not just the server.
            Object::Egress(c) => format!(
                "{}:{} {}{}",
                c.destination.addr,
                c.destination.port,
                c.sni.as_deref().or(c.http_host.as_deref()).unwrap_or("-"),
                c.request
                    .as_ref()
                    .map(|r| format!(" {} {}", r.method, r.path))
                    .unwrap_or_default()
            ),
        };
        Some(StormKey {
            agent: action.agent.clone(),
            task: action.task.clone(),
            kind: action.kind().as_str(),
            verdict: action.verdict.as_str(),
            object,
        })
    }
}

/// Repeats of one key that journald has not seen yet.
#[derive(Debug)]
struct Window {
    /// Time of the entry journald did get (the window's start).
    opened: SystemTime,
    suppressed: u64,
    first_suppressed: Option<SystemTime>,
    last: Option<Action>,
}

/// A summary entry to write: `count` actions like `sample` between `first` and `last`.
#[derive(Debug)]
pub struct StormSummary {
    pub sample: Action,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// Decides which denials reach journald. A key's first action passes and opens a window of
/// `window`; repeats inside it are counted, not written; when the window closes (see
/// [`StormGate::close_expired`]) one [`StormSummary`] carries them. A zero window passes everything.
#[derive(Debug)]
pub struct StormGate {
    window: Duration,
    open: HashMap<StormKey, Window>,
    /// Actions kept out of journald so far (they are all in summaries, or pending in one).
    pub suppressed_total: u64,
}

impl StormGate {
    pub fn new(window: Duration) -> Self {
        StormGate {
            window,
            open: HashMap::new(),
            suppressed_total: 0,
        }
    }

    /// Whether journald should get `action` now. Also returns the summary of a window of the same
    /// key that expired, which must be written first so entries stay in order.
    pub fn admit(&mut self, action: &Action) -> (bool, Option<StormSummary>) {
        let Some(key) = StormKey::of(action).filter(|_| !self.window.is_zero()) else {
            return (true, None);
        };
        let now = action.time;
        let mut closed = None;
        if let Some(w) = self.open.get(&key)
            && !self.inside(w, now)
        {
            closed = self.open.remove(&key).and_then(summary);
        }
        match self.open.get_mut(&key) {
            Some(w) => {
                w.suppressed += 1;
                w.first_suppressed.get_or_insert(now);
                w.last = Some(action.clone());
                self.suppressed_total += 1;
                (false, closed)
            }
            None => {
                self.open.insert(
                    key,
                    Window {
                        opened: now,
                        suppressed: 0,
                        first_suppressed: None,
                        last: None,
                    },
                );
                (true, closed)
            }
        }
    }

    /// Closes the windows older than the window length at `now` and returns their summaries.
    pub fn close_expired(&mut self, now: SystemTime) -> Vec<StormSummary> {
        let expired: Vec<StormKey> = self
            .open
            .iter()
            .filter(|(_, w)| !self.inside(w, now))
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.open.remove(&k).and_then(summary))
            .collect()
    }

    fn inside(&self, w: &Window, now: SystemTime) -> bool {
        now.duration_since(w.opened)
            .map_or(true, |age| age < self.window)
    }
}

fn summary(w: Window) -> Option<StormSummary> {
    let sample = w.last?;
    Some(StormSummary {
        first: w.first_suppressed.unwrap_or(sample.time),
        last: sample.time,
        count: w.suppressed,
        sample,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::{connect_action, exec_action};

    fn with(mut a: Action, verdict: Verdict) -> Action {
        a.verdict = verdict;
        a
    }

    fn at(mut a: Action, secs: u64) -> Action {
        a.time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + secs);
        a
    }

    #[test]
    fn first_passes_repeats_are_summarised_once_the_window_closes() {
        let mut g = StormGate::new(Duration::from_secs(10));
        let a = with(connect_action(), Verdict::Denied);
        assert!(g.admit(&at(a.clone(), 0)).0);
        for s in 1..=5 {
            assert!(!g.admit(&at(a.clone(), s)).0);
        }
        assert!(
            g.close_expired(SystemTime::UNIX_EPOCH + Duration::from_secs(1_005))
                .is_empty()
        );
        let s = g.close_expired(SystemTime::UNIX_EPOCH + Duration::from_secs(1_011));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].count, 5);
        assert_eq!(
            s[0].first,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_001)
        );
        assert_eq!(
            s[0].last,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_005)
        );
        assert_eq!(g.suppressed_total, 5);
        // A new window opens with the next try, which passes again.
        assert!(g.admit(&at(a, 20)).0);
    }

    #[test]
    fn a_late_repeat_closes_the_old_window_first() {
        let mut g = StormGate::new(Duration::from_secs(10));
        let a = with(exec_action(), Verdict::Denied);
        assert!(g.admit(&at(a.clone(), 0)).0);
        assert!(!g.admit(&at(a.clone(), 3)).0);
        let (pass, closed) = g.admit(&at(a, 15));
        assert!(pass);
        assert_eq!(closed.map(|s| s.count), Some(1));
    }

    #[test]
    fn different_objects_and_allowed_actions_are_never_held_back() {
        let mut g = StormGate::new(Duration::from_secs(10));
        let a = with(connect_action(), Verdict::Denied);
        let mut b = a.clone();
        if let Object::Connect(t) = &mut b.object {
            t.destination.port += 1;
        }
        assert!(g.admit(&a).0);
        assert!(g.admit(&b).0);
        let ok = with(connect_action(), Verdict::Allowed);
        assert!(g.admit(&ok).0 && g.admit(&ok).0);
        // Nothing suppressed, nothing to summarise.
        assert!(
            g.close_expired(SystemTime::now() + Duration::from_secs(60))
                .is_empty()
        );
    }

    #[test]
    fn zero_window_passes_everything() {
        let mut g = StormGate::new(Duration::ZERO);
        let a = with(connect_action(), Verdict::Denied);
        assert!(g.admit(&a).0 && g.admit(&a).0);
    }
}
