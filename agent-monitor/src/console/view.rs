//! Drawing the console's model with ratatui: nothing here changes state or talks to the daemon.

use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize as _};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};

use crate::control::{ChainProcess, Counters, HeldAction, PendingRequest};

use super::feed::Verdict;
use super::model::{Console, Held, Link};

/// The keys, as the help line shows them (also in `top --help`).
pub const HELP: &str = "o approve once · t for the task · T task, with a TTL · a always · d deny · ↑↓/jk select · f next agent · / type agent · space pause · q quit";

/// Draws one frame; returns how many feed lines it showed (for the feed's "not shown" count).
pub fn render(console: &Console, frame: &mut Frame, now: Instant) -> usize {
    let [header, counters, body, notice, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(6),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_line(console, now)), header);
    frame.render_widget(Paragraph::new(counters_line(console)), counters);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(38), Constraint::Percentage(62)]).areas(body);
    let agents = console.status.as_ref().map_or(0, |s| s.status.agents.len());
    let [agents_area, tasks_area] = Layout::vertical([
        Constraint::Length(u16::try_from(agents).unwrap_or(u16::MAX).saturating_add(2)),
        Constraint::Min(3),
    ])
    .areas(left);
    render_agents(console, frame, agents_area);
    render_tasks(console, frame, tasks_area, now);
    // Held requests, the selected one's chain, the outcomes (or the "nothing waiting" line).
    let pending_rows = console.pending().len() + console.decided.len() + 2;
    let [pending_area, feed_area] = Layout::vertical([
        Constraint::Length(
            u16::try_from(pending_rows.min(14))
                .unwrap_or(14)
                .saturating_add(2),
        ),
        Constraint::Min(3),
    ])
    .areas(right);
    render_pending(console, frame, pending_area, now);
    let shown = render_feed(console, frame, feed_area);
    let bottom = match (&console.prompt, &console.notice) {
        (Some(p), _) => Line::from(p.line()).bold().fg(Color::Yellow),
        (None, Some(n)) => Line::from(n.as_str()),
        (None, None) => Line::default(),
    };
    frame.render_widget(Paragraph::new(bottom), notice);
    frame.render_widget(Paragraph::new(Line::from(HELP).dim()), help);
    shown
}

fn link_span(what: &str, link: &Link) -> Span<'static> {
    match link {
        Link::Up => Span::raw(""),
        Link::Connecting => Span::raw(format!(" · {what}: connecting")).fg(Color::Yellow),
        Link::Down(why) => Span::raw(format!(" · {what} DOWN: {why}"))
            .fg(Color::Red)
            .bold(),
    }
}

fn header_line(console: &Console, now: Instant) -> Line<'static> {
    let age = console.status_at.map_or_else(
        || "no status yet".to_string(),
        |at| {
            format!(
                "status {:.1} s ago",
                now.saturating_duration_since(at).as_secs_f64()
            )
        },
    );
    Line::from(vec![
        Span::raw("agent-monitor top").bold(),
        Span::raw(format!(" · {} · {age}", console.socket)),
        link_span("status", &console.status_link),
        link_span("events", &console.events_link),
        link_span("pending", &console.pending_link),
    ])
}

fn counters_line(console: &Console) -> Line<'static> {
    let Some(snapshot) = &console.status else {
        return Line::from("counters: waiting for the daemon's status").dim();
    };
    let c: &Counters = &snapshot.status.counters;
    let sink_failures: u64 = snapshot.status.sinks.iter().map(|s| s.failed).sum();
    let losses = c.lost_records + c.actions_lost + c.undecodable_records + sink_failures;
    let loss_style = if losses > 0 {
        Style::new().fg(Color::Red).bold()
    } else {
        Style::new()
    };
    Line::from(vec![
        Span::raw(format!(
            "actions {} · denied {} · alerts {} · ",
            c.actions, c.denied, c.alerts
        )),
        Span::styled(
            format!(
                "lost records {} · actions lost {} · alerts refused unrecordable {} · undecodable {} · output failures {}",
                c.lost_records,
                c.actions_lost,
                c.alerts_refused_unrecordable,
                c.undecodable_records,
                sink_failures
            ),
            loss_style,
        ),
        Span::raw(format!(
            " · dns queries {} refused {} · seccomp caught {} · processes {}",
            c.dns_queries, c.dns_refused, c.seccomp_caught, c.tracked_processes
        )),
    ])
}

fn mode_style(mode: &str) -> Style {
    match mode {
        "enforce" => Style::new().fg(Color::Green),
        "alert" => Style::new().fg(Color::Yellow),
        "ask" => Style::new().fg(Color::Magenta).bold(),
        _ => Style::new(),
    }
}

fn render_agents(console: &Console, frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = console
        .status
        .iter()
        .flat_map(|s| &s.status.agents)
        .map(|a| {
            Line::from(vec![
                Span::raw(format!("{} ", a.agent)).bold(),
                Span::styled(a.mode.clone(), mode_style(&a.mode)),
                Span::raw(format!(
                    "  tasks {} · actions {} · denied {} · alerts {}",
                    a.tasks.len(),
                    a.actions,
                    a.denied,
                    a.alerts
                )),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" agents ")),
        area,
    );
}

fn render_tasks(console: &Console, frame: &mut Frame, area: Rect, now: Instant) {
    let mut lines: Vec<Line> = Vec::new();
    if let Some(snapshot) = &console.status {
        let age = console
            .status_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        for agent in &snapshot.status.agents {
            for task in &agent.tasks {
                let time_left = match task.grants_expire_in_ms {
                    _ if task.grants.is_empty() => String::new(),
                    Some(ms) => format!(
                        ", {} left",
                        short_duration(Duration::from_millis(ms).saturating_sub(age))
                    ),
                    None => ", until task end".into(),
                };
                lines.push(Line::from(vec![
                    Span::raw(format!("{}/{}", agent.agent, task.task)).bold(),
                    Span::raw(format!(
                        "  grants {}{time_left} · processes {}",
                        task.grants.len(),
                        task.processes.len()
                    )),
                ]));
                for grant in &task.grants {
                    lines.push(Line::from(format!("  + {grant}")).fg(Color::Cyan));
                }
                let tree = snapshot
                    .trees
                    .iter()
                    .find(|t| t.agent == agent.agent && t.task == task.task);
                for row in tree.iter().flat_map(|t| &t.rows) {
                    let branch = if row.depth == 0 {
                        String::new()
                    } else {
                        format!("{}└ ", "  ".repeat(row.depth - 1))
                    };
                    lines.push(Line::from(format!("  {branch}{} {}", row.pid, row.name)));
                }
            }
        }
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" tasks · grants · processes ")),
        area,
    );
}

/// What a held request asks for, in one phrase.
pub fn action_text(r: &PendingRequest) -> String {
    match &r.action {
        HeldAction::Dns { name, qtype } => format!("dns {name} {qtype}"),
        HeldAction::Connect {
            transport,
            address,
            port,
            host,
        } => {
            let host = host
                .as_deref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            let addr = match address {
                std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
                std::net::IpAddr::V4(a) => format!("{a}:{port}"),
            };
            format!("connect {transport} {addr}{host}")
        }
        HeldAction::Exec { path, argv, .. } => {
            let args = argv.iter().skip(1).take(4).cloned().collect::<Vec<_>>();
            if args.is_empty() {
                format!("exec {path}")
            } else {
                format!("exec {path} {}", args.join(" "))
            }
        }
        HeldAction::Unix { .. } => format!("connect {}", crate::ask_cmd::action_text(&r.action)),
        HeldAction::Open {
            path, open_flags, ..
        } => format!("open {path} {open_flags}"),
    }
}

/// A held request's process chain, outermost first: `python3 tool.py → sh -c make → make`.
pub fn chain_text(chain: &[ChainProcess]) -> String {
    chain
        .iter()
        .rev()
        .map(|p| {
            let name = p.exe.rsplit('/').next().unwrap_or(&p.exe);
            let mut words = vec![format!("{name}[{}]", p.pid)];
            words.extend(p.args.iter().take(3).cloned());
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

fn pending_line(h: &Held, selected: bool, now: Instant) -> Line<'static> {
    let r = &h.request;
    let task = r.task.as_deref().unwrap_or("-");
    let mut spans = vec![
        Span::raw(if selected { "▶ " } else { "  " }),
        Span::raw(format!("#{} ", r.id)).bold(),
        Span::raw(format!("{}/{task} pid {} ", r.agent, r.pid)),
        Span::raw(action_text(r)).fg(Color::Magenta).bold(),
        Span::raw(format!(
            "  held {} · {} left",
            short_duration(h.held_for(now)),
            short_duration(h.time_left(now))
        )),
    ];
    if let Some(sent) = &h.sent {
        spans.push(Span::raw(format!("  [{sent}…]")).fg(Color::Yellow));
    }
    let line = Line::from(spans);
    if selected {
        line.add_modifier(Modifier::REVERSED)
    } else {
        line
    }
}

fn render_pending(console: &Console, frame: &mut Frame, area: Rect, now: Instant) {
    let mut lines: Vec<Line> = Vec::new();
    for h in console.pending() {
        let selected = console.selected() == Some(h.request.id);
        lines.push(pending_line(h, selected, now));
        // Who is asking: the selected request's process chain, from the agent's first process.
        if selected && !h.request.chain.is_empty() {
            lines.push(Line::from(format!("    {}", chain_text(&h.request.chain))).dim());
        }
    }
    if console.pending().is_empty() {
        lines.push(Line::from("  nothing is waiting for a decision").dim());
    }
    for o in &console.decided {
        lines.push(
            Line::from(format!("  {}", super::model::outcome_line(o)))
                .style(verdict_style(Verdict::parse(&o.verdict)).add_modifier(Modifier::DIM)),
        );
    }
    let title = format!(
        " pending requests ({}) · oldest first ",
        console.pending().len()
    );
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

pub fn verdict_style(v: Verdict) -> Style {
    match v {
        Verdict::Allowed | Verdict::Approved => Style::new().fg(Color::Green),
        Verdict::Denied | Verdict::Timeout => Style::new().fg(Color::Red),
        Verdict::Alert => Style::new().fg(Color::Yellow),
        Verdict::Pending => Style::new().fg(Color::Magenta),
        Verdict::Withdrawn | Verdict::Other => Style::new().fg(Color::Gray),
    }
}

fn render_feed(console: &Console, frame: &mut Frame, area: Rect) -> usize {
    let feed = &console.feed;
    let rows = usize::from(area.height.saturating_sub(2));
    let lines: Vec<Line> = feed
        .newest(rows)
        .map(|l| {
            let style = verdict_style(l.verdict);
            Line::from(vec![
                Span::raw(format!("{} ", l.time)).dim(),
                Span::styled(format!("{:<9} ", l.verdict.tag()), style.bold()),
                Span::styled(l.text.clone(), style),
            ])
        })
        .collect();
    let shown = lines.len();
    let mut title = format!(
        " feed: {} · {} received · {} not shown",
        feed.filter().unwrap_or("all agents"),
        feed.received(),
        feed.not_shown()
    );
    if feed.lagged() + feed.overflowed() > 0 {
        title.push_str(&format!(
            " ({} lagged at the daemon, {} while the console was behind)",
            feed.lagged(),
            feed.overflowed()
        ));
    }
    if feed.unreadable_lines() > 0 {
        title.push_str(&format!(" · {} unreadable", feed.unreadable_lines()));
    }
    if feed.paused() {
        title.push_str(" · PAUSED (space)");
    }
    title.push(' ');
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
    shown
}

/// `48s`, `9m12s`, `2h05m`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::console::feed::{Feed, read_stream_line};
    use crate::console::model::{Key, Snapshot, TaskTree, TreeRow};
    use crate::control::{AgentStatus, PendingEvent, Status, TaskStatus};

    fn screen(terminal: &Terminal<TestBackend>) -> String {
        let buffer = terminal.backend().buffer();
        let mut out = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                out.push_str(buffer[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn a_frame_shows_agents_tasks_trees_pending_and_the_feed() {
        let now = Instant::now();
        let mut console = Console::new("/tmp/fake.sock".into(), Feed::new(1000, None));
        let status = Status {
            agents: vec![AgentStatus {
                agent: "coder".into(),
                mode: "ask".into(),
                tasks: vec![TaskStatus {
                    task: "t1".into(),
                    processes: vec![10, 11],
                    grants: vec!["connect 192.0.2.7:443".into()],
                    grants_expire_in_ms: Some(125_000),
                    ..Default::default()
                }],
                actions: 12,
                ..Default::default()
            }],
            ..Default::default()
        };
        let trees = vec![TaskTree {
            agent: "coder".into(),
            task: "t1".into(),
            rows: vec![
                TreeRow {
                    depth: 0,
                    pid: 10,
                    name: "python3".into(),
                },
                TreeRow {
                    depth: 1,
                    pid: 11,
                    name: "curl".into(),
                },
            ],
        }];
        console.on_status(Ok(Snapshot { status, trees }), now);
        for n in 0..10_000 {
            let line = format!(
                r#"{{"agent_id":"coder","verdict":"{}","time":"2026-12-06T05:10:00Z","message":"agent coder task t1: connect tcp 10.0.0.1:{n}: x"}}"#,
                if n % 2 == 0 { "allowed" } else { "denied" }
            );
            console.on_stream_line(read_stream_line(&line));
        }
        let request: crate::control::PendingRequest = serde_json::from_str(
            r#"{"id":3,"agent":"coder","task":"t1","pid":11,"chain":[{"pid":11,"exe":"/usr/bin/curl"},{"pid":10,"exe":"/usr/bin/python3","args":["tool.py"]}],"action":{"kind":"dns","name":"pypi.org","qtype":"A"},"held_ms":2000,"expires_in_ms":58000}"#,
        )
        .unwrap();
        console.on_pending_event(PendingEvent::Held(request), now);
        let mut terminal = Terminal::new(TestBackend::new(140, 30)).unwrap();
        let mut shown = 0;
        terminal.draw(|f| shown = render(&console, f, now)).unwrap();
        console.feed.rendered(shown);
        let text = screen(&terminal);
        for want in [
            "coder ask",
            "coder/t1",
            "+ connect 192.0.2.7:443",
            "2m05s left",
            "10 python3",
            "└ 11 curl",
            "#3 coder/t1 pid 11 dns pypi.org A",
            "58s left",
            "python3[10] tool.py → curl[11]",
            "10000 received",
            "10.0.0.1:9999",
            "o approve once",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(shown > 5 && shown < 30, "{shown}");
        // The next frame counts the burst that never reached the screen.
        terminal.draw(|f| shown = render(&console, f, now)).unwrap();
        let text = screen(&terminal);
        assert!(
            text.contains(&format!("{} not shown", 10_000 - shown)),
            "{text}"
        );
        // A prompt takes the notice line.
        console.on_key(Key::Char('d'));
        terminal.draw(|f| _ = render(&console, f, now)).unwrap();
        assert!(screen(&terminal).contains("deny #3, reason"));
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(short_duration(Duration::from_secs(48)), "48s");
        assert_eq!(short_duration(Duration::from_secs(552)), "9m12s");
        assert_eq!(short_duration(Duration::from_secs(7500)), "2h05m");
    }
}
