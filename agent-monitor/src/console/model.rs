//! The console's view model: what the daemon told it (status, actions, held requests), what the
//! operator selected and typed, and what a key press means. Pure: no terminal, no socket, no
//! clock of its own (callers pass `now`), so every rule is a unit test.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::{Decision, Outcome, PendingEvent, PendingRequest, Scope, Status};

use super::feed::{Feed, StreamLine};

/// Outcomes kept under the pending requests, newest first.
const RECENT_OUTCOMES: usize = 6;

/// A key, as the model sees it (the terminal layer maps crossterm's events to these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    /// Ctrl-C: raw mode delivers it as a key, not as SIGINT.
    Interrupt,
}

/// What the operator's key asks the console to do beyond its own state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Decide { id: u64, decision: Decision },
    Quit,
}

/// One status poll, with what the poller read of /proc for the process trees.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub status: Status,
    pub trees: Vec<TaskTree>,
}

/// The live processes of one task, as a tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskTree {
    pub agent: String,
    pub task: String,
    pub rows: Vec<TreeRow>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeRow {
    /// 0 for a process whose parent is not in the task.
    pub depth: usize,
    pub pid: u32,
    pub name: String,
}

/// A task's processes as (pid, parent pid if known, name) → rows of a tree, parents before their
/// children, siblings by pid. A process whose parent is outside the set is a root.
pub fn process_tree(processes: &[(u32, Option<u32>, String)]) -> Vec<TreeRow> {
    let pids: std::collections::BTreeSet<u32> = processes.iter().map(|p| p.0).collect();
    let mut sorted: Vec<&(u32, Option<u32>, String)> = processes.iter().collect();
    sorted.sort_by_key(|p| p.0);
    let parent_of =
        |p: &(u32, Option<u32>, String)| p.1.filter(|pp| pids.contains(pp) && *pp != p.0);
    let mut rows = Vec::with_capacity(processes.len());
    let mut stack: Vec<(u32, usize)> = sorted
        .iter()
        .rev()
        .filter(|p| parent_of(p).is_none())
        .map(|p| (p.0, 0))
        .collect();
    let mut placed = std::collections::BTreeSet::new();
    while let Some((pid, depth)) = stack.pop() {
        if !placed.insert(pid) {
            continue;
        }
        let name = sorted
            .iter()
            .find(|p| p.0 == pid)
            .map_or_else(String::new, |p| p.2.clone());
        rows.push(TreeRow { depth, pid, name });
        for child in sorted.iter().rev().filter(|p| parent_of(p) == Some(pid)) {
            stack.push((child.0, depth + 1));
        }
    }
    // A cycle (pids reused while we read) has no root: show its processes flat, not lose them.
    for p in sorted {
        if !placed.contains(&p.0) {
            rows.push(TreeRow {
                depth: 0,
                pid: p.0,
                name: p.2.clone(),
            });
        }
    }
    rows
}

/// A held request as the console tracks it.
#[derive(Clone, Debug)]
pub struct Held {
    pub request: PendingRequest,
    /// When the console learned of it (its `held_ms`/`expires_in_ms` were true then).
    pub seen: Instant,
    /// The decision sent for it and not yet answered (e.g. "approve once").
    pub sent: Option<String>,
}

impl Held {
    pub fn held_for(&self, now: Instant) -> Duration {
        Duration::from_millis(self.request.held_ms) + now.saturating_duration_since(self.seen)
    }

    pub fn time_left(&self, now: Instant) -> Duration {
        Duration::from_millis(self.request.expires_in_ms)
            .saturating_sub(now.saturating_duration_since(self.seen))
    }
}

/// What the operator is typing, if anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// The agent whose actions the feed shows (empty: all).
    Filter(String),
    /// A reason for denying request `id` (empty: none).
    DenyReason { id: u64, text: String },
    /// How long a task grant for request `id` lasts (`10m`; empty: until the task ends).
    TaskTtl { id: u64, text: String },
    /// `y` approves request `id` always (its agent's allowlist grows, by a reload).
    ConfirmAlways { id: u64 },
}

impl Prompt {
    /// The question and what was typed so far.
    pub fn line(&self) -> String {
        match self {
            Prompt::Filter(t) => format!("show agent (Enter; empty: all): {t}"),
            Prompt::DenyReason { id, text } => {
                format!("deny #{id}, reason (Enter; empty: none; Esc: cancel): {text}")
            }
            Prompt::TaskTtl { id, text } => format!(
                "approve #{id} for its task, for how long (e.g. 10m; empty: until the task ends): {text}"
            ),
            Prompt::ConfirmAlways { id } => format!(
                "approve #{id} ALWAYS: add it to the agent's allowlist (<agent>.approved.toml)? y/n"
            ),
        }
    }
}

/// Where a data source stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Link {
    #[default]
    Connecting,
    Up,
    /// Lost or refused, with why; the reader tries again.
    Down(String),
}

/// Everything the console shows.
#[derive(Debug)]
pub struct Console {
    pub socket: String,
    pub status: Option<Snapshot>,
    /// When `status` arrived (grant time left counts down from there).
    pub status_at: Option<Instant>,
    pub status_link: Link,
    pub feed: Feed,
    pub events_link: Link,
    /// Held requests, oldest first.
    pending: Vec<Held>,
    pub pending_link: Link,
    /// How the last requests ended, newest first.
    pub decided: VecDeque<Outcome>,
    selected: Option<u64>,
    pub prompt: Option<Prompt>,
    /// The last thing the console has to tell the operator.
    pub notice: Option<String>,
}

impl Console {
    pub fn new(socket: String, feed: Feed) -> Console {
        Console {
            socket,
            status: None,
            status_at: None,
            status_link: Link::Connecting,
            feed,
            events_link: Link::Connecting,
            pending: Vec::new(),
            pending_link: Link::Connecting,
            decided: VecDeque::new(),
            selected: None,
            prompt: None,
            notice: None,
        }
    }

    pub fn pending(&self) -> &[Held] {
        &self.pending
    }

    pub fn selected(&self) -> Option<u64> {
        self.selected
    }

    pub fn on_status(&mut self, snapshot: Result<Snapshot, String>, now: Instant) {
        match snapshot {
            Ok(s) => {
                self.status = Some(s);
                self.status_at = Some(now);
                self.status_link = Link::Up;
            }
            // The last good status stays on screen, marked stale by the link.
            Err(e) => self.status_link = Link::Down(e),
        }
    }

    pub fn on_stream_line(&mut self, line: Result<StreamLine, String>) {
        self.events_link = Link::Up;
        match line {
            Ok(l) => self.feed.push(l),
            Err(_) => self.feed.unreadable(),
        }
    }

    /// The first answer of `pending --follow`: every request held now (replaces what we had,
    /// e.g. after a reconnection), keeping the decisions already sent.
    pub fn on_pending_list(&mut self, requests: Vec<PendingRequest>, now: Instant) {
        self.pending_link = Link::Up;
        let old = std::mem::take(&mut self.pending);
        for request in requests {
            let sent = old
                .iter()
                .find(|h| h.request.id == request.id)
                .and_then(|h| h.sent.clone());
            self.pending.push(Held {
                request,
                seen: now,
                sent,
            });
        }
        self.pending.sort_by_key(|h| h.request.id);
        self.fix_selection();
    }

    pub fn on_pending_event(&mut self, event: PendingEvent, now: Instant) {
        match event {
            PendingEvent::Held(request) => {
                if self.pending.iter().any(|h| h.request.id == request.id) {
                    return;
                }
                self.pending.push(Held {
                    request,
                    seen: now,
                    sent: None,
                });
                self.pending.sort_by_key(|h| h.request.id);
                self.fix_selection();
            }
            PendingEvent::Decided(outcome) => self.on_outcome(outcome),
        }
    }

    pub fn on_pending_down(&mut self, why: String) {
        self.pending_link = Link::Down(why);
    }

    /// The daemon's answer to a `decide` we sent.
    pub fn on_decide_answer(&mut self, id: u64, answer: Result<Outcome, String>) {
        match answer {
            Ok(outcome) => self.on_outcome(outcome),
            Err(e) => {
                if let Some(h) = self.pending.iter_mut().find(|h| h.request.id == id) {
                    h.sent = None;
                }
                self.notice = Some(format!("request #{id}: {e}"));
            }
        }
    }

    fn on_outcome(&mut self, outcome: Outcome) {
        let id = outcome.id;
        self.pending.retain(|h| h.request.id != id);
        self.fix_selection();
        // The `decide` answer and the follow stream both report it; show it once.
        if self.decided.iter().any(|o| o.id == id) {
            return;
        }
        self.notice = Some(outcome_line(&outcome));
        self.decided.push_front(outcome);
        self.decided.truncate(RECENT_OUTCOMES);
    }

    /// Keeps a selection on an existing request: the one selected, else the one that took its
    /// place (the next newer), else the newest.
    fn fix_selection(&mut self) {
        let ids: Vec<u64> = self.pending.iter().map(|h| h.request.id).collect();
        self.selected = match self.selected {
            Some(s) if ids.contains(&s) => Some(s),
            Some(s) => ids.iter().copied().find(|&i| i > s).or(ids.last().copied()),
            None => ids.first().copied(),
        };
    }

    fn move_selection(&mut self, down: bool) {
        let Some(pos) = self
            .pending
            .iter()
            .position(|h| Some(h.request.id) == self.selected)
        else {
            self.fix_selection();
            return;
        };
        let pos = if down {
            (pos + 1).min(self.pending.len() - 1)
        } else {
            pos.saturating_sub(1)
        };
        self.selected = Some(self.pending[pos].request.id);
    }

    /// The agents `f` cycles through: those in the last status, by name.
    fn agents(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .status
            .iter()
            .flat_map(|s| s.status.agents.iter().map(|a| a.agent.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// What a key press means. Decisions mark their request as sent; the caller sends them.
    pub fn on_key(&mut self, key: Key) -> Option<Command> {
        if key == Key::Interrupt {
            return Some(Command::Quit);
        }
        match self.prompt.take() {
            Some(prompt) => self.on_prompt_key(prompt, key),
            None => self.on_plain_key(key),
        }
    }

    fn on_plain_key(&mut self, key: Key) -> Option<Command> {
        let decide = |scope| Decision::Allow {
            scope,
            ttl_ms: None,
        };
        match key {
            Key::Char('q') => return Some(Command::Quit),
            Key::Up | Key::Char('k') => self.move_selection(false),
            Key::Down | Key::Char('j') => self.move_selection(true),
            Key::Char(' ') => self.feed.toggle_pause(),
            Key::Char('f') => {
                let agents = self.agents();
                let next = match self.feed.filter() {
                    None => agents.first().cloned(),
                    Some(f) => agents.iter().skip_while(|a| *a != f).nth(1).cloned(),
                };
                self.feed.set_filter(next);
            }
            Key::Char('/') => self.prompt = Some(Prompt::Filter(String::new())),
            Key::Char('o') => return self.send(decide(Scope::Once), "approve once"),
            Key::Char('t') => return self.send(decide(Scope::Task), "approve for the task"),
            Key::Char('T') => {
                if let Some(id) = self.decidable() {
                    self.prompt = Some(Prompt::TaskTtl {
                        id,
                        text: String::new(),
                    });
                }
            }
            Key::Char('a') => {
                if let Some(id) = self.decidable() {
                    self.prompt = Some(Prompt::ConfirmAlways { id });
                }
            }
            Key::Char('d') => {
                if let Some(id) = self.decidable() {
                    self.prompt = Some(Prompt::DenyReason {
                        id,
                        text: String::new(),
                    });
                }
            }
            _ => {}
        }
        None
    }

    fn on_prompt_key(&mut self, mut prompt: Prompt, key: Key) -> Option<Command> {
        if key == Key::Esc {
            return None;
        }
        let text = match &mut prompt {
            Prompt::ConfirmAlways { id } => {
                let decision = Decision::Allow {
                    scope: Scope::Always,
                    ttl_ms: None,
                };
                return (key == Key::Char('y'))
                    .then(|| self.send_for(*id, decision, "approve always"))
                    .flatten();
            }
            Prompt::Filter(text)
            | Prompt::DenyReason { text, .. }
            | Prompt::TaskTtl { text, .. } => text,
        };
        if key != Key::Enter {
            edit(text, key);
            self.prompt = Some(prompt);
            return None;
        }
        let typed = text.trim().to_string();
        let typed = (!typed.is_empty()).then_some(typed);
        match prompt {
            Prompt::Filter(_) => {
                self.feed.set_filter(typed);
                None
            }
            Prompt::DenyReason { id, .. } => {
                self.send_for(id, Decision::Deny { reason: typed }, "deny")
            }
            Prompt::TaskTtl { id, .. } => {
                let ttl_ms = match typed.as_deref().map(crate::identity::tasks::parse_ttl) {
                    None => None,
                    Some(Ok(d)) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    Some(Err(e)) => {
                        self.notice = Some(format!("task grant duration: {e}"));
                        self.prompt = Some(prompt);
                        return None;
                    }
                };
                let decision = Decision::Allow {
                    scope: Scope::Task,
                    ttl_ms,
                };
                self.send_for(id, decision, "approve for the task")
            }
            Prompt::ConfirmAlways { .. } => None,
        }
    }

    /// The selected request, if one can be decided now (says why not otherwise).
    fn decidable(&mut self) -> Option<u64> {
        let Some(held) = self
            .pending
            .iter()
            .find(|h| Some(h.request.id) == self.selected)
        else {
            self.notice = Some("no pending request to decide".into());
            return None;
        };
        if let Some(sent) = &held.sent {
            self.notice = Some(format!(
                "request #{} already has a decision on its way ({sent})",
                held.request.id
            ));
            return None;
        }
        Some(held.request.id)
    }

    fn send(&mut self, decision: Decision, what: &str) -> Option<Command> {
        let id = self.decidable()?;
        self.send_for(id, decision, what)
    }

    fn send_for(&mut self, id: u64, decision: Decision, what: &str) -> Option<Command> {
        // The request may have been decided elsewhere while the operator typed.
        let Some(held) = self.pending.iter_mut().find(|h| h.request.id == id) else {
            self.notice = Some(format!("request #{id} is no longer pending"));
            return None;
        };
        held.sent = Some(what.to_string());
        self.notice = Some(format!("request #{id}: {what}…"));
        Some(Command::Decide { id, decision })
    }
}

/// One key of a one-line prompt (Enter and Esc are the caller's).
fn edit(text: &mut String, key: Key) {
    match key {
        Key::Backspace => {
            text.pop();
        }
        // Bounded: a reason or a name, not a document.
        Key::Char(c) if !c.is_control() && text.len() < 200 => text.push(c),
        _ => {}
    }
}

/// How a request ended, in one line.
pub fn outcome_line(o: &Outcome) -> String {
    let scope = match o.scope {
        Some(Scope::Once) => " (once)",
        Some(Scope::Task) => " (for the task)",
        Some(Scope::Always) => " (always)",
        None => "",
    };
    let reason = o
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!(
        "request #{} {}{scope} by {}{reason}",
        o.id, o.verdict, o.approver
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::HeldAction;

    fn request(id: u64, agent: &str) -> PendingRequest {
        PendingRequest {
            id,
            agent: agent.into(),
            spiffe_id: None,
            task: Some("t1".into()),
            uid: Some(1000),
            pid: 4242,
            chain: vec![],
            action: HeldAction::Dns {
                name: "pypi.org".into(),
                qtype: "A".into(),
            },
            held_ms: 1_000,
            expires_in_ms: 59_000,
        }
    }

    fn outcome(id: u64, verdict: &str) -> Outcome {
        Outcome {
            id,
            verdict: verdict.into(),
            scope: None,
            approver: "uid 0 (root)".into(),
            reason: None,
        }
    }

    fn console_with(ids: &[u64]) -> (Console, Instant) {
        let now = Instant::now();
        let mut c = Console::new("/run/x.sock".into(), Feed::new(100, None));
        c.on_pending_list(ids.iter().map(|&i| request(i, "coder")).collect(), now);
        (c, now)
    }

    fn typed(c: &mut Console, text: &str) -> Option<Command> {
        let mut last = None;
        for ch in text.chars() {
            last = c.on_key(Key::Char(ch));
        }
        last
    }

    #[test]
    fn keys_map_to_the_documented_decisions() {
        let allow = |scope, ttl_ms| Decision::Allow { scope, ttl_ms };
        let deny = |reason: Option<&str>| Decision::Deny {
            reason: reason.map(str::to_string),
        };
        // Typed keys; `\n` is Enter, `\x08` Backspace.
        let cases = [
            ("o", allow(Scope::Once, None)),
            ("t", allow(Scope::Task, None)),
            ("T10m\n", allow(Scope::Task, Some(600_000))),
            ("T\n", allow(Scope::Task, None)),
            ("ay", allow(Scope::Always, None)),
            ("dnot today\x08\n", deny(Some("not toda"))),
            ("d\n", deny(None)),
        ];
        for (keys, decision) in cases {
            let (mut c, _) = console_with(&[5]);
            let mut commands = keys.chars().map(|ch| {
                c.on_key(match ch {
                    '\n' => Key::Enter,
                    '\x08' => Key::Backspace,
                    ch => Key::Char(ch),
                })
            });
            let all: Vec<_> = commands.by_ref().collect();
            let (last, before) = all.split_last().unwrap();
            assert!(before.iter().all(Option::is_none), "{keys:?}: sent early");
            assert_eq!(last, &Some(Command::Decide { id: 5, decision }), "{keys:?}");
        }
    }

    #[test]
    fn cancelled_and_impossible_decisions_send_nothing() {
        let (mut c, _) = console_with(&[5]);
        c.on_key(Key::Char('a'));
        assert_eq!(c.on_key(Key::Char('n')), None, "anything but y cancels");
        assert_eq!(c.prompt, None);
        c.on_key(Key::Char('d'));
        typed(&mut c, "why");
        assert_eq!(c.on_key(Key::Esc), None);
        assert_eq!(c.prompt, None);
        c.on_key(Key::Char('T'));
        typed(&mut c, "soon");
        assert_eq!(c.on_key(Key::Enter), None, "a bad duration is not sent");
        assert!(c.notice.as_deref().unwrap().contains("soon"));
        assert!(matches!(c.prompt, Some(Prompt::TaskTtl { .. })));
        c.on_key(Key::Esc);
        // One decision per request at a time.
        assert!(c.on_key(Key::Char('o')).is_some());
        assert_eq!(c.on_key(Key::Char('o')), None);
        assert!(c.notice.as_deref().unwrap().contains("already"));
        // A refused decision can be retried.
        c.on_decide_answer(5, Err("request 5 is not pending".into()));
        assert!(c.notice.as_deref().unwrap().contains("not pending"));
        assert!(c.on_key(Key::Char('o')).is_some());
        // Nothing pending: nothing to decide.
        let (mut c, _) = console_with(&[]);
        assert_eq!(c.on_key(Key::Char('o')), None);
        assert_eq!(c.notice.as_deref(), Some("no pending request to decide"));
        assert_eq!(c.on_key(Key::Char('q')), Some(Command::Quit));
        assert_eq!(c.on_key(Key::Interrupt), Some(Command::Quit));
        // q inside a prompt is text, Ctrl-C still quits.
        c.on_key(Key::Char('/'));
        assert_eq!(c.on_key(Key::Char('q')), None);
        assert_eq!(c.on_key(Key::Interrupt), Some(Command::Quit));
    }

    #[test]
    fn pending_requests_stay_oldest_first_and_the_selection_follows() {
        let (mut c, now) = console_with(&[7, 3]);
        let ids = |c: &Console| c.pending().iter().map(|h| h.request.id).collect::<Vec<_>>();
        assert_eq!(ids(&c), [3, 7]);
        assert_eq!(c.selected(), Some(3));
        c.on_pending_event(PendingEvent::Held(request(9, "bot")), now);
        c.on_pending_event(PendingEvent::Held(request(9, "bot")), now);
        assert_eq!(ids(&c), [3, 7, 9], "a repeated announcement is one request");
        c.on_key(Key::Down);
        assert_eq!(c.selected(), Some(7));
        c.on_key(Key::Down);
        c.on_key(Key::Down);
        assert_eq!(c.selected(), Some(9));
        c.on_key(Key::Char('k'));
        assert_eq!(c.selected(), Some(7));
        // Decided elsewhere (another operator, the timeout): it goes, the next takes its place.
        c.on_pending_event(PendingEvent::Decided(outcome(7, "timeout")), now);
        assert_eq!(ids(&c), [3, 9]);
        assert_eq!(c.selected(), Some(9));
        assert!(c.notice.as_deref().unwrap().contains("#7 timeout"));
        // Our decide's answer and the stream's event report one outcome.
        let o = c.on_key(Key::Char('o'));
        assert!(matches!(o, Some(Command::Decide { id: 9, .. })));
        assert!(c.pending()[1].sent.is_some());
        c.on_decide_answer(9, Ok(outcome(9, "approved")));
        c.on_pending_event(PendingEvent::Decided(outcome(9, "approved")), now);
        assert_eq!(c.decided.iter().map(|o| o.id).collect::<Vec<_>>(), [9, 7]);
        assert_eq!(c.selected(), Some(3));
        // A reconnection's list replaces what we had.
        c.on_pending_list(vec![request(11, "coder")], now);
        assert_eq!(ids(&c), [11]);
        assert_eq!(c.selected(), Some(11));
    }

    #[test]
    fn time_left_counts_down_from_when_the_request_was_seen() {
        let (c, now) = console_with(&[1]);
        let h = &c.pending()[0];
        let later = now + Duration::from_secs(10);
        assert_eq!(h.time_left(later), Duration::from_secs(49));
        assert_eq!(h.held_for(later), Duration::from_secs(11));
        assert_eq!(h.time_left(now + Duration::from_secs(100)), Duration::ZERO);
    }

    #[test]
    fn f_cycles_the_agents_of_the_last_status_and_slash_types_one() {
        let (mut c, now) = console_with(&[]);
        let mut status = Status::default();
        for a in ["zed", "coder"] {
            status.agents.push(crate::control::AgentStatus {
                agent: a.into(),
                ..Default::default()
            });
        }
        c.on_status(
            Ok(Snapshot {
                status,
                trees: vec![],
            }),
            now,
        );
        let mut seen = vec![];
        for _ in 0..3 {
            c.on_key(Key::Char('f'));
            seen.push(c.feed.filter().map(str::to_string));
        }
        assert_eq!(seen, [Some("coder".into()), Some("zed".into()), None]);
        typed(&mut c, "/bot");
        c.on_key(Key::Enter);
        assert_eq!(c.feed.filter(), Some("bot"));
        c.on_key(Key::Char('/'));
        c.on_key(Key::Enter);
        assert_eq!(c.feed.filter(), None);
        // A failed poll keeps the last status, marked down.
        c.on_status(Err("daemon gone".into()), now);
        assert!(c.status.is_some());
        assert_eq!(c.status_link, Link::Down("daemon gone".into()));
    }

    #[test]
    fn process_trees_put_children_under_their_parents() {
        let p = |pid, ppid: Option<u32>, name: &str| (pid, ppid, name.to_string());
        let rows = process_tree(&[
            p(30, Some(20), "curl"),
            p(10, Some(1), "run"),
            p(20, Some(10), "sh"),
            p(25, Some(10), "python3"),
            p(40, None, "gone"),
        ]);
        let shape: Vec<(usize, u32)> = rows.iter().map(|r| (r.depth, r.pid)).collect();
        assert_eq!(shape, [(0, 10), (1, 20), (2, 30), (1, 25), (0, 40)]);
        assert_eq!(rows[2].name, "curl");
        // A cycle (pid reuse mid-read) loses no process.
        let rows = process_tree(&[p(1, Some(2), "a"), p(2, Some(1), "b")]);
        assert_eq!(rows.len(), 2);
    }
}
