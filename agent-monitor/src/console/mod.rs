//! `agent-monitor top`: a live console over the control socket. Agents and their mode, tasks with
//! their grants and process trees, a sampled feed of actions, the daemon's counters, and the
//! requests of ask-mode agents waiting for a decision, with keys to decide them.
//!
//! Split so that the rules are tested without a terminal: `model` (state, selection, what a key
//! means) and `feed` (the bounded, sampled feed) are pure; `view` draws them; `readers` feed the
//! UI loop from their own threads; `terminal` takes the terminal and always gives it back.

mod feed;
mod model;
mod readers;
mod terminal;
mod view;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

use clap::Args;

use crate::control::{self, Request, Response};

use feed::Feed;
use model::{Command, Console};
use readers::Input;

/// Feed lines kept (for pausing and filtering); the screen shows the newest that fit.
const FEED_LINES: usize = 2000;
/// Inputs queued between the readers and the UI loop; an action that finds it full is counted,
/// not waited for.
const QUEUE: usize = 8192;
/// Time between frames: ten a second, whatever the rate of actions.
const FRAME: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
#[command(after_long_help = concat!(
    "Keys: o approve the selected request once · t approve it for its task (a task grant, until \
     the task ends) · T the same, with a TTL you type (10m) · a approve it always (added to the \
     agent's allowlist file; asks y/n) · d deny it (you may type a reason) · ↑↓ or j/k select a \
     request · f show the next agent's actions only (then all) · / type the agent to show · space \
     pause the feed · Esc cancel a prompt · q or Ctrl-C quit.\n\n",
    "The feed is a sample: at thousands of actions a second it shows the newest that fit at each \
     frame (ten a second) and counts the rest as \"not shown\" (also those the daemon could not \
     send fast enough); the counters line is exact (the daemon's own). See docs/console.md."
))]
pub struct TopArgs {
    /// Show only this agent's actions in the feed at first (`f` and `/` change it).
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

pub fn main(args: TopArgs) -> ExitCode {
    let socket = args.socket.control_socket;
    // Before the terminal is taken: a missing daemon or a refusal (not root, not in the admin
    // group) is said plainly on the operator's own screen.
    let refused = match control::call(&socket, &Request::Status {}) {
        Ok(Response::Status(_)) => None,
        Ok(other) => Some(format!("unexpected answer to status: {other:?}")),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = refused {
        eprintln!("agent-monitor top: {why}");
        return ExitCode::FAILURE;
    }
    let stop = match terminal::stop_signals() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("agent-monitor top: cannot watch for signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = sync_channel(QUEUE);
    let overflowed = Arc::new(AtomicU64::new(0));
    readers::spawn_status(socket.clone(), tx.clone());
    readers::spawn_events(socket.clone(), tx.clone(), Arc::clone(&overflowed));
    readers::spawn_pending(socket.clone(), tx.clone());
    let mut screen = match terminal::Screen::take() {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "agent-monitor top: cannot take over the terminal ({e}); run it in an interactive terminal"
            );
            return ExitCode::FAILURE;
        }
    };
    readers::spawn_keyboard(tx.clone());
    let console = Console::new(
        socket.display().to_string(),
        Feed::new(FEED_LINES, args.agent),
    );
    let decide = |id, decision| readers::spawn_decide(socket.clone(), tx.clone(), id, decision);
    let result = ui_loop(&mut screen, console, &rx, &overflowed, &stop, decide);
    drop(screen);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-monitor top: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Applies inputs as they come and draws a frame every `FRAME` (and at once after a key), until
/// `q`, Ctrl-C or a stop signal.
fn ui_loop(
    screen: &mut terminal::Screen,
    mut console: Console,
    rx: &Receiver<Input>,
    overflowed: &AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
    decide: impl Fn(u64, control::Decision),
) -> std::io::Result<()> {
    let mut last_frame: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wait = last_frame.map_or(Duration::ZERO, |t| FRAME.saturating_sub(t.elapsed()));
        let first = match rx.recv_timeout(wait) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut keyed = false;
        // At most one queue's worth per turn, so a flood cannot hold back the next frame.
        for input in first.into_iter().chain(rx.try_iter().take(QUEUE)) {
            keyed |= matches!(input, Input::Key(_) | Input::Resize);
            match apply(&mut console, input, Instant::now()) {
                Some(Command::Quit) => return Ok(()),
                Some(Command::Decide { id, decision }) => decide(id, decision),
                None => {}
            }
        }
        console
            .feed
            .set_overflowed(overflowed.load(Ordering::Relaxed));
        if keyed || last_frame.is_none_or(|t| t.elapsed() >= FRAME) {
            let now = Instant::now();
            let mut shown = 0;
            screen
                .terminal
                .draw(|frame| shown = view::render(&console, frame, now))?;
            console.feed.rendered(shown);
            last_frame = Some(now);
        }
    }
}

/// One input into the model; a key may ask for a command.
fn apply(console: &mut Console, input: Input, now: Instant) -> Option<Command> {
    match input {
        Input::Key(k) => return console.on_key(k),
        Input::Resize => {}
        Input::Status(s) => console.on_status(s, now),
        Input::Stream(line) => console.on_stream_line(line),
        Input::EventsUp => console.events_link = model::Link::Up,
        Input::EventsDown(why) => console.events_link = model::Link::Down(why),
        Input::PendingList(requests) => console.on_pending_list(requests, now),
        Input::PendingEvent(event) => console.on_pending_event(event, now),
        Input::PendingDown(why) => console.on_pending_down(why),
        Input::Decided { id, answer } => console.on_decide_answer(id, answer),
    }
    None
}
