//! The supervisor loop of an ask-mode agent: besides answering what the enforce filter catches,
//! it holds connects, datagrams and execs (held.rs says which), asks the daemon over the ask
//! channel, and answers each held call when the daemon does. One thread, one poll over the
//! listener and the channel: any number of calls wait at once, each costing a map entry.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libseccomp::{ScmpArch, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags, notify_id_valid};

use super::arguments::Width;
use super::ask_channel::{AskChannel, ChannelError};
use super::held::{HELD_SYSCALLS, LiveCaller, Question, question};
use super::holds::{Answered, HeldCalls, HeldKind, Reply};
use super::supervisor::{ListenerFailed, Supervisor, answer_caught, sync_wake_up};
use super::unix_ask::UnixAsk;
use super::unix_connect::{Taken, release, take_or_hold};
use crate::control::{AskCall, CaughtReport as Caught};

/// How often held calls are checked for callers that went away, and how soon after a broken
/// channel `run` tries to open a new one (when a call needs it).
const TICK: Duration = Duration::from_secs(1);

/// Why the ask supervisor stopped.
#[derive(Debug, thiserror::Error)]
pub enum AskSupervisorError {
    #[error(transparent)]
    Listener(#[from] ListenerFailed),
    #[error("waiting on the seccomp listener and the ask channel: {0}")]
    Poll(std::io::Error),
}

/// Serves the listener of an ask-mode agent until no process uses the filter any more (Ok) or
/// the listener fails. `channel` is the open ask channel; `reopen` opens a new one after it
/// broke (a daemon restart). Held calls are answered CONTINUE only on the daemon's allow; a
/// deny, a broken channel, or no channel refuse them (EPERM, EACCES for an exec). `busy` and
/// `report` as in [`super::supervise`].
pub fn supervise_asking<S: Read + Write + AsRawFd>(
    listener: OwnedFd,
    channel: AskChannel<S>,
    mut reopen: impl FnMut() -> Result<AskChannel<S>, ChannelError>,
    busy: &AtomicBool,
    mut report: impl FnMut(Caught),
) -> Result<(), AskSupervisorError> {
    let fd = listener.as_raw_fd();
    let own = Supervisor::this_process();
    let native = ScmpArch::native();
    sync_wake_up(fd);
    let mut holds = HeldCalls::default();
    // Held unix connects and the grants approvals left (unix_ask.rs).
    let mut unix: UnixAsk = UnixAsk::default();
    let mut channel = Some(channel);
    let mut last_reopen = Instant::now();
    let mut last_sweep = Instant::now();
    loop {
        busy.store(false, Ordering::SeqCst);
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: channel.as_ref().map_or(-1, |c| c.as_raw_fd()),
                events: libc::POLLIN
                    | if channel.as_ref().is_some_and(|c| c.wants_write()) {
                        libc::POLLOUT
                    } else {
                        0
                    },
                revents: 0,
            },
        ];
        // SAFETY: poll over our own two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK.as_millis() as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(AskSupervisorError::Poll(e));
        }
        // The channel first: answers free held calls.
        let ch_events = fds[1].revents;
        if let Some(ch) = channel.as_mut().filter(|_| ch_events != 0) {
            let mut result = Ok(());
            if ch_events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match ch.receive() {
                    Ok(answers) => {
                        for a in answers {
                            match holds.answer(a.call, a.allow) {
                                // A held unix connect: connected by `run` to the socket it
                                // resolved when it was held, never continued by name.
                                Answered::Release {
                                    id,
                                    reply: Reply::Continue,
                                } if let Some(held) = unix.take(id) => {
                                    let why = unix.approved(
                                        held.identity,
                                        a.outcome.as_ref(),
                                        a.grant_ms,
                                        Instant::now(),
                                    );
                                    release(fd, id, held, why, &mut report);
                                }
                                Answered::Release { id, reply } => {
                                    unix.take(id);
                                    respond(fd, id, reply)
                                }
                                Answered::StillWaiting => {}
                                Answered::Unknown => eprintln!(
                                    "agent-monitor run: the daemon answered call {} that is not \
                                     held (already refused, or its caller went away)",
                                    a.call
                                ),
                            }
                        }
                    }
                    Err(e) => result = Err(e),
                }
            }
            if result.is_ok() && ch.wants_write() && ch_events & libc::POLLOUT != 0 {
                result = ch.flush();
            }
            if let Err(e) = result {
                break_channel(fd, &mut channel, &mut holds, &e);
            }
        }
        let ls_events = fds[0].revents;
        if ls_events & libc::POLLIN != 0 {
            let req = match ScmpNotifReq::receive(fd) {
                Ok(r) => r,
                Err(e) => {
                    let os = std::io::Error::last_os_error();
                    if matches!(os.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) {
                        continue;
                    }
                    return Err(ListenerFailed {
                        reason: e,
                        errno: os,
                    }
                    .into());
                }
            };
            busy.store(true, Ordering::SeqCst);
            let name = req
                .data
                .syscall
                .get_name_by_arch(req.data.arch)
                .unwrap_or_default();
            // An agent with `[unix]`: its pathname unix connects are judged on the socket they
            // resolve to (unix_connect.rs); one off its list that no approval of this `run`
            // covers is held and asked about (unix_ask.rs); the rest is asked about as before.
            let mut unix_held = None;
            if name == "connect" {
                let now = Instant::now();
                let granted = |socket| unix.granted(socket, now);
                match take_or_hold(fd, &req, &granted, &mut report) {
                    Taken::NotOurs => {}
                    Taken::Answered => continue,
                    Taken::Held(h) => unix_held = Some(h),
                }
            }
            if matches!(name.as_str(), "sendto" | "sendmsg" | "sendmmsg")
                && super::unix_send::take(fd, &req, &mut report)
            {
                continue;
            }
            let (kind, actions) = if let Some(h) = &unix_held {
                (HeldKind::Network, vec![super::unix_ask::action(h)])
            } else {
                if !HELD_SYSCALLS.contains(&name.as_str()) {
                    answer_caught(fd, &own, req, true, &mut report);
                    continue;
                }
                let width = if req.data.arch == native {
                    Width::Native
                } else {
                    Width::Compat
                };
                let (kind, actions) =
                    match question(&name, &req.data.args, width, &LiveCaller::new(req.pid)) {
                        Question::Nothing => {
                            respond(fd, req.id, Reply::Continue);
                            continue;
                        }
                        Question::Ask { kind, actions } => (kind, actions),
                    };
                // On the agent's own list: no question (the kernel judges it, as every call).
                if channel.as_ref().is_some_and(|c| c.allows_locally(&actions)) {
                    respond(fd, req.id, Reply::Continue);
                    continue;
                }
                (kind, actions)
            };
            // What we read belongs to this caller only if it still waits: its pid was not
            // reused meanwhile (libseccomp's notify_id_valid, SECCOMP_IOCTL_NOTIF_ID_VALID).
            if notify_id_valid(fd, req.id).is_err() {
                continue;
            }
            if channel.is_none() && last_reopen.elapsed() >= TICK {
                last_reopen = Instant::now();
                match reopen() {
                    Ok(c) => {
                        eprintln!("agent-monitor run: the ask channel to the daemon is open again");
                        channel = Some(c);
                    }
                    Err(e) => eprintln!("agent-monitor run: reopening the ask channel: {e}"),
                }
            }
            let Some(ch) = channel.as_mut() else {
                eprintln!(
                    "agent-monitor run: {name} of pid {} refused: no ask channel to the daemon",
                    req.pid
                );
                respond(fd, req.id, Reply::Fail(kind.refusal()));
                continue;
            };
            let calls = holds.hold(req.id, kind, actions.len());
            if let Some(h) = unix_held {
                unix.hold(req.id, h);
            }
            for (call, action) in calls.into_iter().zip(actions) {
                ch.queue(&AskCall {
                    call,
                    pid: req.pid,
                    action,
                });
            }
            if let Err(e) = ch.flush() {
                break_channel(fd, &mut channel, &mut holds, &e);
            }
        } else if ls_events & (libc::POLLHUP | libc::POLLERR) != 0 {
            // No process uses the filter any more: nothing can be held or caught.
            return Ok(());
        }
        if last_sweep.elapsed() >= TICK {
            last_sweep = Instant::now();
            // A held caller that was killed: its notification is gone. The daemon learns of the
            // exit itself (its request is withdrawn); here it only stops being held.
            let gone: Vec<u64> = holds
                .held()
                .map(|(id, _)| id)
                .filter(|&id| notify_id_valid(fd, id).is_err())
                .collect();
            for id in gone {
                holds.forget(id);
            }
            // Held unix connects whose hold ended without an answer (channel broke, caller
            // gone) close their descriptors; grants past their ttl go.
            let still: std::collections::HashSet<u64> = holds.held().map(|(id, _)| id).collect();
            unix.retain_held(|id| still.contains(&id));
            unix.expire(Instant::now());
        }
    }
}

/// The channel broke: every held call is refused, and new ones until a new channel opens.
fn break_channel<S>(
    fd: RawFd,
    channel: &mut Option<AskChannel<S>>,
    holds: &mut HeldCalls,
    why: &ChannelError,
) {
    *channel = None;
    let refused = holds.refuse_all();
    eprintln!(
        "agent-monitor run: {why}: {} held calls refused; calls that need a decision are refused \
         until the channel opens again",
        refused.len()
    );
    for (id, reply) in refused {
        respond(fd, id, reply);
    }
}

/// Answers notification `id`. A caller that went away (ENOENT) needs no answer.
fn respond(fd: RawFd, id: u64, reply: Reply) {
    let resp = match reply {
        Reply::Continue => ScmpNotifResp::new_continue(id, ScmpNotifRespFlags::empty()),
        Reply::Fail(errno) => ScmpNotifResp::new_error(id, -errno, ScmpNotifRespFlags::empty()),
    };
    let _ = resp.respond(fd);
}
