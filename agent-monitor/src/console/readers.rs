//! The console's inputs, each read on its own thread and handed to the UI loop through one bounded
//! channel, so the loop never waits on the socket or the keyboard: the status poll (with the
//! process trees it reads from /proc), the `events --follow` stream, the `pending --follow`
//! stream, the keyboard, and one short-lived thread per decision sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::control::{self, Decision, Outcome, PendingEvent, PendingRequest, Request, Response};

use super::feed::{StreamLine, read_stream_line};
use super::model::{Key, Snapshot, TaskTree, process_tree};

/// How often the console asks for status (agents, tasks, counters).
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long a lost stream waits before reconnecting.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// One input of the UI loop.
#[derive(Debug)]
pub enum Input {
    Key(Key),
    /// The terminal changed size (the next frame redraws all).
    Resize,
    Status(Result<Snapshot, String>),
    Stream(Result<StreamLine, String>),
    /// The daemon accepted our `events --follow`.
    EventsUp,
    EventsDown(String),
    PendingList(Vec<PendingRequest>),
    PendingEvent(PendingEvent),
    PendingDown(String),
    Decided {
        id: u64,
        answer: Result<Outcome, String>,
    },
}

/// Polls status until the UI loop is gone.
pub fn spawn_status(socket: PathBuf, tx: SyncSender<Input>) {
    std::thread::spawn(move || {
        loop {
            let snapshot = match control::call(&socket, &Request::Status {}) {
                Ok(Response::Status(status)) => Ok(snapshot(status)),
                Ok(other) => Err(format!("unexpected answer to status: {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            if tx.send(Input::Status(snapshot)).is_err() {
                return;
            }
            // Our own thread, not the async runtime's: sleeping here blocks no one.
            std::thread::sleep(STATUS_EVERY);
        }
    });
}

/// Status plus the process tree of every task (parents and names from /proc).
fn snapshot(status: control::Status) -> Snapshot {
    let trees = status
        .agents
        .iter()
        .flat_map(|a| {
            a.tasks.iter().map(|t| {
                let processes: Vec<(u32, Option<u32>, String)> = t
                    .processes
                    .iter()
                    .map(|&pid| {
                        let (parent, name) = crate::identity::procfs::parent_and_comm(pid)
                            .map_or((None, "?".to_string()), |(pp, n)| (Some(pp), n));
                        (pid, parent, name)
                    })
                    .collect();
                TaskTree {
                    agent: a.agent.clone(),
                    task: t.task.clone(),
                    rows: process_tree(&processes),
                }
            })
        })
        .collect();
    Snapshot { status, trees }
}

/// Follows every agent's actions. A line that finds the channel full is dropped and counted in
/// `overflowed`: the feed is a sample, the reader must keep up with the daemon.
pub fn spawn_events(socket: PathBuf, tx: SyncSender<Input>, overflowed: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let request = Request::Events {
            follow: true,
            agent: None,
        };
        keep_following(&tx, Input::EventsDown, |tx| {
            let mut open = true;
            let up = |_| tx.send(Input::EventsUp).is_ok();
            let ended = control::call_follow(&socket, &request, up, |line| {
                let line = read_stream_line(line);
                if let Ok(StreamLine::Lagged(_)) = line {
                    // A count of losses is never itself dropped.
                    open = tx.send(Input::Stream(line)).is_ok();
                    return open;
                }
                match tx.try_send(Input::Stream(line)) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        overflowed.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        open = false;
                        false
                    }
                }
            });
            open.then(|| ended.map_err(|e| e.to_string()))
        });
    });
}

/// Follows the held requests: the list held now, then one change per line.
pub fn spawn_pending(socket: PathBuf, tx: SyncSender<Input>) {
    std::thread::spawn(move || {
        let request = Request::Pending { follow: true };
        keep_following(&tx, Input::PendingDown, |tx| {
            let mut open = true;
            let first = |response| match response {
                Response::Pending { requests } => {
                    open = tx.send(Input::PendingList(requests)).is_ok();
                    open
                }
                other => {
                    let why = format!("unexpected answer to pending: {other:?}");
                    open = tx.send(Input::PendingDown(why)).is_ok();
                    false
                }
            };
            let ended = control::call_follow(&socket, &request, first, |line| {
                let input = match serde_json::from_str::<PendingEvent>(line) {
                    Ok(event) => Input::PendingEvent(event),
                    Err(e) => Input::PendingDown(format!("unreadable line ({e}): {line:.80}")),
                };
                tx.send(input).is_ok()
            });
            open.then(|| ended.map_err(|e| e.to_string()))
        });
    });
}

/// Runs `follow` (one connection of a stream; None once the UI loop is gone) again and again:
/// after each connection that ended, says why with `down` and waits a little.
fn keep_following(
    tx: &SyncSender<Input>,
    down: fn(String) -> Input,
    mut follow: impl FnMut(&SyncSender<Input>) -> Option<Result<(), String>>,
) {
    while let Some(ended) = follow(tx) {
        let why = ended.map_or_else(|e| e, |()| "the daemon ended the stream".to_string());
        if tx.send(down(why)).is_err() {
            return;
        }
        std::thread::sleep(RECONNECT_AFTER);
    }
}

/// Sends one decision; its answer comes back as an input.
pub fn spawn_decide(socket: PathBuf, tx: SyncSender<Input>, id: u64, decision: Decision) {
    std::thread::spawn(move || {
        let answer = match control::call(&socket, &Request::Decide { id, decision }) {
            Ok(Response::Decided(outcome)) => Ok(outcome),
            Ok(other) => Err(format!("unexpected answer to decide: {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        let _ = tx.send(Input::Decided { id, answer });
    });
}

/// Reads the keyboard (and resizes) until the UI loop is gone or the terminal fails.
pub fn spawn_keyboard(tx: SyncSender<Input>) {
    std::thread::spawn(move || {
        loop {
            let input = match event::read() {
                Ok(Event::Key(k)) => match key(k) {
                    Some(k) => Input::Key(k),
                    None => continue,
                },
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                // The terminal went away (ssh dropped): quit like Ctrl-C.
                Err(_) => Input::Key(Key::Interrupt),
            };
            let quit = matches!(input, Input::Key(Key::Interrupt));
            if tx.send(input).is_err() || quit {
                return;
            }
        }
    });
}

/// crossterm's key event → the model's key; None for releases and keys the console ignores.
pub fn key(k: KeyEvent) -> Option<Key> {
    if k.kind == KeyEventKind::Release {
        return None;
    }
    if k.modifiers.contains(KeyModifiers::CONTROL) {
        return matches!(k.code, KeyCode::Char('c' | 'C')).then_some(Key::Interrupt);
    }
    Some(match k.code {
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossterm_keys_map_to_model_keys() {
        let k = |code, modifiers| key(KeyEvent::new(code, modifiers));
        assert_eq!(
            k(KeyCode::Char('o'), KeyModifiers::NONE),
            Some(Key::Char('o'))
        );
        assert_eq!(
            k(KeyCode::Char('T'), KeyModifiers::SHIFT),
            Some(Key::Char('T'))
        );
        assert_eq!(
            k(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Key::Interrupt)
        );
        assert_eq!(k(KeyCode::Char('o'), KeyModifiers::CONTROL), None);
        assert_eq!(k(KeyCode::Up, KeyModifiers::NONE), Some(Key::Up));
        assert_eq!(k(KeyCode::F(1), KeyModifiers::NONE), None);
        let mut release = KeyEvent::new(KeyCode::Char('o'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(key(release), None);
    }

    #[test]
    fn the_daemons_answers_read_as_the_console_expects() {
        let decided: Response = serde_json::from_str(
            r#"{"result":"decided","id":42,"verdict":"approved","scope":"once","approver":"uid 0 (root)"}"#,
        )
        .unwrap();
        let Response::Decided(outcome) = decided else {
            panic!("{decided:?}")
        };
        assert_eq!((outcome.id, outcome.verdict.as_str()), (42, "approved"));
        let event: PendingEvent = serde_json::from_str(
            r#"{"held":{"id":3,"agent":"a","pid":7,"action":{"kind":"exec","path":"/usr/bin/make"},"held_ms":0,"expires_in_ms":60000}}"#,
        )
        .unwrap();
        assert!(matches!(event, PendingEvent::Held(r) if r.id == 3));
    }

    #[test]
    fn a_snapshot_has_the_process_tree_of_each_task() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let status = || control::Status {
            agents: vec![control::AgentStatus {
                agent: "coder".into(),
                tasks: vec![control::TaskStatus {
                    task: "t1".into(),
                    processes: vec![child.id(), me],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        // Until the exec is done the child is still a copy of this test.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let snapshot = loop {
            let s = snapshot(status());
            if s.trees[0].rows.iter().any(|r| r.name == "sleep")
                || std::time::Instant::now() > deadline
            {
                break s;
            }
            std::thread::yield_now();
        };
        let _ = child.kill();
        let _ = child.wait();
        let shape: Vec<(usize, u32)> = snapshot.trees[0]
            .rows
            .iter()
            .map(|r| (r.depth, r.pid))
            .collect();
        assert_eq!(shape, [(0, me), (1, child.id())]);
        assert_eq!(snapshot.trees[0].rows[1].name, "sleep");
        assert_eq!(
            (
                snapshot.trees[0].agent.as_str(),
                snapshot.trees[0].task.as_str()
            ),
            ("coder", "t1")
        );
    }
}
