//! `run`'s way of reporting caught calls to the daemon: one connection opened before `run` is
//! placed, carrying one `CaughtReport` per line (`caught_channel`). Opened early because once
//! `run` sits in its agent's cgroup, a new connect of its own to the control socket is judged by
//! the agent's `[unix]` list like the agent's (and refused by `allow = [...]`). If the channel
//! breaks (a daemon restart), each report falls back to a `caught` request of its own; a report
//! that cannot be delivered either way is printed on stderr, never dropped silently.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::control::{self, CaughtReport, Request, Response};

pub struct CaughtReporter {
    socket: PathBuf,
    channel: Option<UnixStream>,
}

impl CaughtReporter {
    /// Opens the channel on the control socket `socket`; without it (an older daemon, or none
    /// yet) reports go one request each.
    pub fn open(socket: PathBuf) -> CaughtReporter {
        let channel = open_channel(&socket)
            .map_err(|e| eprintln!("agent-monitor run: caught channel to the daemon: {e}"))
            .ok();
        CaughtReporter { socket, channel }
    }

    /// Delivers `c` to the daemon.
    pub fn report(&mut self, c: CaughtReport) {
        if let Some(stream) = self.channel.as_mut() {
            let sent = serde_json::to_vec(&c)
                .map_err(std::io::Error::other)
                .and_then(|mut line| {
                    line.push(b'\n');
                    stream.write_all(&line)
                });
            match sent {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("agent-monitor run: caught channel to the daemon broke: {e}");
                    self.channel = None;
                }
            }
        }
        let req = Request::Caught(c);
        if let Err(e) = control::call(&self.socket, &req) {
            eprintln!("agent-monitor run: cannot report {req:?} to the daemon: {e}");
        }
    }
}

fn open_channel(socket: &std::path::Path) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(&Request::CaughtChannel {}).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Recorded {}) => Ok(stream),
        Ok(other) => Err(std::io::Error::other(format!(
            "the daemon answered {other:?}"
        ))),
        Err(e) => Err(std::io::Error::other(format!(
            "unreadable answer {answer:?}: {e}"
        ))),
    }
}
