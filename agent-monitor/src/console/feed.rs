//! The console's feed of actions: a bounded, sampled view of `events --follow`. At 10,000 actions
//! a second no one reads every line, and the console must not fall behind or grow without bound:
//! the feed keeps the newest lines (at most `capacity`), shows the newest that fit on screen at
//! each frame, and counts every line that never reached the screen. The exact numbers are the
//! daemon's counters (status), never this sample.

use std::collections::VecDeque;

use serde_json::Value;

/// Longest text kept of one action (its message); the rest is cut, so memory stays bounded.
const MAX_TEXT: usize = 400;

/// How an action or a held request ended up, as the feed colours it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    Alert,
    /// A held request of an ask-mode agent, waiting for a decision.
    Pending,
    Approved,
    Timeout,
    /// The held request's process went away before a decision.
    Withdrawn,
    /// A verdict this console does not know (a newer daemon).
    Other,
}

impl Verdict {
    /// The verdict as the audit trail and `Outcome::verdict` write it.
    pub fn parse(s: &str) -> Verdict {
        match s {
            "allowed" => Verdict::Allowed,
            "denied" => Verdict::Denied,
            "alert" => Verdict::Alert,
            "pending" => Verdict::Pending,
            "approved" => Verdict::Approved,
            "timeout" => Verdict::Timeout,
            "withdrawn" => Verdict::Withdrawn,
            _ => Verdict::Other,
        }
    }

    /// Short tag shown before the line.
    pub fn tag(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "DENIED",
            Verdict::Alert => "ALERT",
            Verdict::Pending => "PENDING",
            Verdict::Approved => "approved",
            Verdict::Timeout => "TIMEOUT",
            Verdict::Withdrawn => "withdrawn",
            Verdict::Other => "?",
        }
    }
}

/// One action of the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedLine {
    /// Time of day (`HH:MM:SS`) from the action's `time`.
    pub time: String,
    pub agent: String,
    pub verdict: Verdict,
    pub text: String,
}

/// One line of the `events --follow` stream, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamLine {
    Action(FeedLine),
    /// `{"lagged": N}`: N actions went by too fast for the daemon to send them to us.
    Lagged(u64),
}

/// Reads one line of the events stream (an audit-trail action, or a `lagged` note).
pub fn read_stream_line(line: &str) -> Result<StreamLine, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line:.80}"))?;
    if let Some(n) = v.get("lagged") {
        return n
            .as_u64()
            .map(StreamLine::Lagged)
            .ok_or_else(|| format!("lagged is not a count: {line:.80}"));
    }
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    let agent = text("agent_id").ok_or_else(|| format!("no agent_id: {line:.80}"))?;
    let verdict = Verdict::parse(text("verdict").unwrap_or(""));
    let mut message = match text("message") {
        Some(m) => m.to_string(),
        None => format!(
            "agent {agent}: {} {}",
            text("action").unwrap_or("?"),
            text("verdict").unwrap_or("?")
        ),
    };
    cut(&mut message, MAX_TEXT);
    // RFC 3339 (`2025-11-29T11:44:00.25Z`): the time of day is what a live feed needs.
    let time = text("time")
        .and_then(|t| t.get(11..19))
        .unwrap_or("--:--:--")
        .to_string();
    Ok(StreamLine::Action(FeedLine {
        time,
        agent: agent.to_string(),
        verdict,
        text: message,
    }))
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// The feed: newest lines last.
#[derive(Debug)]
pub struct Feed {
    lines: VecDeque<FeedLine>,
    capacity: usize,
    /// Only this agent's actions are kept (the others are filtered, not lost: status counts them).
    filter: Option<String>,
    paused: bool,
    /// Actions received from the daemon, all agents.
    received: u64,
    /// Actions kept since the last frame: all but the newest that fit on screen scrolled past unseen.
    since_frame: u64,
    /// Actions of the filtered agent that never reached the screen: scrolled past between two
    /// frames, or arrived while paused.
    scrolled_past: u64,
    /// Actions the daemon did not send us (`lagged`): too fast for this connection.
    lagged: u64,
    /// Actions our reader dropped because the console was behind (its queue was full).
    overflowed: u64,
    /// Stream lines that were not actions (a newer or broken daemon).
    unreadable: u64,
}

impl Feed {
    pub fn new(capacity: usize, filter: Option<String>) -> Feed {
        Feed {
            lines: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            filter,
            paused: false,
            received: 0,
            since_frame: 0,
            scrolled_past: 0,
            lagged: 0,
            overflowed: 0,
            unreadable: 0,
        }
    }

    pub fn push(&mut self, line: StreamLine) {
        match line {
            StreamLine::Lagged(n) => self.lagged += n,
            StreamLine::Action(a) => {
                self.received += 1;
                if self.filter.as_ref().is_some_and(|f| *f != a.agent) {
                    return;
                }
                if self.paused {
                    self.scrolled_past += 1;
                    return;
                }
                if self.lines.len() == self.capacity {
                    self.lines.pop_front();
                }
                self.lines.push_back(a);
                self.since_frame += 1;
            }
        }
    }

    pub fn unreadable(&mut self) {
        self.unreadable += 1;
    }

    /// The reader's running total of actions it could not queue.
    pub fn set_overflowed(&mut self, total: u64) {
        self.overflowed = total;
    }

    /// A frame showed the newest `rows` lines: what arrived since the last frame beyond them was
    /// never on screen.
    pub fn rendered(&mut self, rows: usize) {
        self.scrolled_past += self.since_frame.saturating_sub(rows as u64);
        self.since_frame = 0;
    }

    /// The newest `rows` lines, oldest first.
    pub fn newest(&self, rows: usize) -> impl Iterator<Item = &FeedLine> {
        self.lines
            .iter()
            .skip(self.lines.len().saturating_sub(rows))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Every action that did not reach the screen, whatever the reason.
    pub fn not_shown(&self) -> u64 {
        self.scrolled_past + self.lagged + self.overflowed
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    pub fn unreadable_lines(&self) -> u64 {
        self.unreadable
    }

    pub fn filter(&self) -> Option<&str> {
        self.filter.as_deref()
    }

    /// Shows only `agent`'s actions from now on (None: every agent's); lines already kept of
    /// other agents go.
    pub fn set_filter(&mut self, agent: Option<String>) {
        if let Some(a) = &agent {
            self.lines.retain(|l| l.agent == *a);
        }
        self.filter = agent;
        self.since_frame = 0;
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn toggle_pause(&mut self) {
        self.paused = !self.paused;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(agent: &str, verdict: &str, n: usize) -> String {
        format!(
            r#"{{"agent_id":"{agent}","verdict":"{verdict}","action":"connect","time":"2026-12-06T05:10:{:02}.25Z","message":"agent {agent} task t: connect tcp 10.0.0.1:{n} by pid 7 (curl): {verdict}"}}"#,
            n % 60
        )
    }

    fn line(agent: &str, verdict: &str, n: usize) -> StreamLine {
        read_stream_line(&action(agent, verdict, n)).unwrap()
    }

    #[test]
    fn reads_actions_and_lagged_notes() {
        let StreamLine::Action(a) = line("coder", "denied", 7) else {
            panic!()
        };
        assert_eq!(a.agent, "coder");
        assert_eq!(a.verdict, Verdict::Denied);
        assert_eq!(a.time, "05:10:07");
        assert!(a.text.contains("10.0.0.1:7"));
        assert_eq!(
            read_stream_line(r#"{"lagged":42}"#).unwrap(),
            StreamLine::Lagged(42)
        );
        for v in [
            "allowed",
            "alert",
            "pending",
            "approved",
            "timeout",
            "withdrawn",
        ] {
            assert_ne!(Verdict::parse(v), Verdict::Other, "{v}");
        }
        assert_eq!(Verdict::parse("maybe"), Verdict::Other);
        assert!(read_stream_line("not json").is_err());
        assert!(read_stream_line(r#"{"verdict":"denied"}"#).is_err());
        assert!(read_stream_line(r#"{"lagged":"lots"}"#).is_err());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let l = read_stream_line(&format!(r#"{{"agent_id":"a","message":"{long}"}}"#)).unwrap();
        let StreamLine::Action(a) = l else { panic!() };
        assert!(a.text.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(a.text.ends_with('…'));
    }

    #[test]
    fn a_burst_of_ten_thousand_stays_bounded_and_counts_what_was_not_shown() {
        let mut feed = Feed::new(500, None);
        for n in 0..10_000 {
            feed.push(line("coder", "allowed", n));
        }
        feed.push(StreamLine::Lagged(250));
        feed.set_overflowed(30);
        assert_eq!(feed.len(), 500, "memory is bounded by the capacity");
        assert_eq!(feed.received(), 10_000);
        // One frame of 40 rows showed the newest 40.
        feed.rendered(40);
        assert_eq!(feed.not_shown(), 10_000 - 40 + 250 + 30);
        let shown: Vec<_> = feed.newest(40).collect();
        assert_eq!(shown.len(), 40);
        assert!(shown[39].text.contains(":9999 "), "{:?}", shown[39]);
        assert!(shown[0].text.contains(":9960 "), "{:?}", shown[0]);
        // The next frame, with nothing new, loses nothing more.
        feed.rendered(40);
        assert_eq!(feed.not_shown(), 10_000 - 40 + 250 + 30);
        // A quiet stream shows every line.
        for n in 0..10 {
            feed.push(line("coder", "denied", n));
            feed.rendered(40);
        }
        assert_eq!(feed.not_shown(), 10_000 - 40 + 250 + 30);
    }

    #[test]
    fn the_filter_keeps_one_agent_and_pause_counts_what_it_hides() {
        let mut feed = Feed::new(100, None);
        feed.push(line("coder", "allowed", 1));
        feed.push(line("bot", "denied", 2));
        feed.set_filter(Some("bot".into()));
        assert_eq!(feed.len(), 1);
        feed.push(line("coder", "allowed", 3));
        feed.push(line("bot", "alert", 4));
        assert_eq!(feed.len(), 2);
        assert!(feed.newest(10).all(|l| l.agent == "bot"));
        assert_eq!(feed.received(), 4);
        feed.rendered(10);
        assert_eq!(feed.not_shown(), 0, "filtered lines are not losses");
        feed.toggle_pause();
        feed.push(line("bot", "denied", 5));
        feed.push(line("coder", "denied", 6));
        assert_eq!(feed.len(), 2, "paused: the view stands still");
        assert_eq!(feed.not_shown(), 1);
        feed.toggle_pause();
        feed.set_filter(None);
        feed.push(line("coder", "denied", 7));
        assert_eq!(feed.len(), 3);
    }
}
