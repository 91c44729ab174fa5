//! `run`'s end of the ask channel: one control-socket connection, opened with `ask_channel`,
//! that then carries `AskCall` lines to the daemon and `AskAnswer` lines back, in any order.
//! Non-blocking both ways, so the supervisor serves the listener and the channel from one poll
//! loop: a daemon slow to read never stalls the agent's other calls, and no thread or fd is
//! spent per held call.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::local_allowlist::LocalAllowlist;
use crate::control::{AskAllowlistLine, AskAnswer, AskCall, Request, Response};

/// Longest answer line accepted (an `AskAnswer` with an outcome and a reason is well below).
const MAX_LINE: usize = 64 * 1024;

/// How long opening the channel may wait for the daemon's first answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the channel could not be opened or stopped working. Every held call is then refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("control socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon refused the ask channel: {0}")]
    Refused(String),
    #[error("the daemon closed the ask channel")]
    Closed,
    #[error("ask channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("ask channel: unreadable line from the daemon ({error}): {line:?}")]
    Protocol { error: String, line: String },
}

/// The channel: a stream, the bytes read but not yet a whole line, and the lines not yet written.
pub struct AskChannel<S = UnixStream> {
    stream: S,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    /// The agent's own allowlist, as the daemon last sent it (none yet: everything is asked).
    local: Option<LocalAllowlist>,
}

impl AskChannel<UnixStream> {
    /// Opens the channel for (agent, task) on the daemon's control socket; the daemon accepts it
    /// only from the `run` it placed there. Blocks until the daemon answers (at most 5 s).
    pub fn open(socket: &Path, agent: &str, task: &str) -> Result<AskChannel, ChannelError> {
        let stream = Self::connect(socket)?;
        Self::open_on(stream, agent, task)
    }

    /// The control-socket connection a channel will be opened on. `run` makes it before it is
    /// placed: once in its agent's cgroup, its own connect to the control socket is judged by
    /// the agent's `[unix]` list like the agent's (and refused by an `allow` list).
    pub fn connect(socket: &Path) -> Result<UnixStream, ChannelError> {
        UnixStream::connect(socket).map_err(|source| ChannelError::Connect {
            path: socket.display().to_string(),
            source,
        })
    }

    /// [`open`](Self::open) on a connection made by [`connect`](Self::connect).
    pub fn open_on(
        mut stream: UnixStream,
        agent: &str,
        task: &str,
    ) -> Result<AskChannel, ChannelError> {
        stream.set_read_timeout(Some(OPEN_TIMEOUT))?;
        let req = Request::AskChannel {
            agent: agent.to_string(),
            task: task.to_string(),
        };
        let mut line = serde_json::to_string(&req).map_err(std::io::Error::other)?;
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut channel = AskChannel::new(stream);
        // The first line is the response; answers cannot precede our first call, but whatever
        // follows the newline stays in the inbox.
        let first = loop {
            if let Some(line) = channel.take_line()? {
                break line;
            }
            let mut buf = [0u8; 4096];
            let n = channel.stream.read(&mut buf)?;
            if n == 0 {
                return Err(ChannelError::Closed);
            }
            channel.inbox.extend_from_slice(&buf[..n]);
        };
        match serde_json::from_str::<Response>(&first) {
            Ok(Response::AskChannelOpen {}) => {}
            Ok(Response::Error { message }) => return Err(ChannelError::Refused(message)),
            Ok(other) => {
                return Err(ChannelError::Protocol {
                    error: format!("expected ask_channel_open, got {other:?}"),
                    line: first,
                });
            }
            Err(e) => {
                return Err(ChannelError::Protocol {
                    error: e.to_string(),
                    line: first,
                });
            }
        }
        channel.stream.set_read_timeout(None)?;
        channel.stream.set_nonblocking(true)?;
        // The daemon's allowlist line follows the response, maybe in the same read: take it now
        // (poll would not report bytes already in the inbox). No answer can come yet.
        channel.receive()?;
        Ok(channel)
    }
}

impl<S: Read + Write> AskChannel<S> {
    /// A channel over an open, non-blocking stream (tests: one end of a socketpair).
    pub fn new(stream: S) -> AskChannel<S> {
        AskChannel {
            stream,
            inbox: Vec::new(),
            outbox: Vec::new(),
            local: None,
        }
    }

    /// Whether the agent's own allowlist (the daemon's latest copy) allows every action of a
    /// held call: then it continues without a question, and the kernel judges it.
    pub fn allows_locally(&self, actions: &[crate::control::HeldAction]) -> bool {
        self.local.as_ref().is_some_and(|l| l.allows_all(actions))
    }

    /// Queues one call; [`flush`](Self::flush) writes it.
    pub fn queue(&mut self, call: &AskCall) {
        // AskCall is plain data: serializing it cannot fail.
        if let Ok(mut line) = serde_json::to_vec(call) {
            line.push(b'\n');
            self.outbox.extend_from_slice(&line);
        }
    }

    /// Writes what the stream takes now; the rest waits for the next POLLOUT.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        while !self.outbox.is_empty() {
            match self.stream.write(&self.outbox) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Bytes queued but not yet written.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Reads what the stream has now and returns the whole answers in it. A closed stream, an
    /// unreadable line or one longer than 64 KiB break the channel.
    pub fn receive(&mut self) -> Result<Vec<AskAnswer>, ChannelError> {
        let mut closed = false;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            if self.inbox.len() > MAX_LINE && !self.inbox.contains(&b'\n') {
                break;
            }
        }
        let mut answers = Vec::new();
        while let Some(line) = self.take_line()? {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<AskAnswer>(&line) {
                Ok(a) => answers.push(a),
                Err(_) if line.starts_with("{\"allowlist\"") => {
                    self.local = match serde_json::from_str::<AskAllowlistLine>(&line)
                        .map_err(|e| e.to_string())
                        .and_then(|l| LocalAllowlist::new(&l.allowlist).map_err(|e| e.to_string()))
                    {
                        Ok(l) => Some(l),
                        Err(e) => {
                            // Not a reason to refuse calls: they are all asked instead.
                            eprintln!(
                                "agent-monitor run: the daemon's allowlist cannot be read ({e}); \
                                 every held call is asked"
                            );
                            None
                        }
                    };
                }
                Err(e) => {
                    return Err(ChannelError::Protocol {
                        error: e.to_string(),
                        line,
                    });
                }
            }
        }
        if self.inbox.len() > MAX_LINE {
            return Err(ChannelError::Protocol {
                error: format!("a line longer than {MAX_LINE} bytes"),
                line: String::from_utf8_lossy(&self.inbox[..200]).into_owned(),
            });
        }
        // Answers that came with the close still count; the caller sees the close next time.
        if closed && answers.is_empty() {
            return Err(ChannelError::Closed);
        }
        Ok(answers)
    }

    /// The first whole line of the inbox, without its newline.
    fn take_line(&mut self) -> Result<Option<String>, ChannelError> {
        let Some(end) = self.inbox.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line: Vec<u8> = self.inbox.drain(..=end).collect();
        String::from_utf8(line[..end].to_vec())
            .map(Some)
            .map_err(|e| ChannelError::Protocol {
                error: e.to_string(),
                line: String::from_utf8_lossy(&line).into_owned(),
            })
    }
}

impl<S: AsRawFd> AsRawFd for AskChannel<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::HeldAction;
    use std::io::BufRead as _;

    fn pair() -> (AskChannel<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (AskChannel::new(a), b)
    }

    #[test]
    fn calls_go_out_as_lines_and_answers_come_back_in_any_order() {
        let (mut ch, daemon) = pair();
        for call in [1, 2] {
            ch.queue(&AskCall {
                call,
                pid: 42,
                action: HeldAction::Connect {
                    transport: "tcp".into(),
                    address: "192.0.2.7".parse().unwrap(),
                    port: 443,
                    host: None,
                },
            });
        }
        ch.flush().unwrap();
        assert!(!ch.wants_write());
        let mut lines = std::io::BufReader::new(&daemon).lines();
        let first: AskCall = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!((first.call, first.pid), (1, 42));
        // Nothing yet: not an error, no answers.
        assert_eq!(ch.receive().unwrap(), vec![]);
        // Two answers, the second split across writes.
        (&daemon)
            .write_all(b"{\"call\":2,\"allow\":false}\n{\"call\":1,")
            .unwrap();
        let got = ch.receive().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].call, got[0].allow), (2, false));
        (&daemon).write_all(b"\"allow\":true}\n").unwrap();
        let got = ch.receive().unwrap();
        assert_eq!((got[0].call, got[0].allow), (1, true));
    }

    #[test]
    fn a_closed_or_garbled_channel_is_broken() {
        let (mut ch, daemon) = pair();
        drop(daemon);
        assert!(matches!(ch.receive(), Err(ChannelError::Closed)));
        let (mut ch, daemon) = pair();
        (&daemon)
            .write_all(b"{\"call\":1,\"allow\":\"yes\"}\n")
            .unwrap();
        assert!(matches!(ch.receive(), Err(ChannelError::Protocol { .. })));
        let (mut ch, daemon) = pair();
        (&daemon).write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        assert!(matches!(ch.receive(), Err(ChannelError::Protocol { .. })));
    }

    #[test]
    fn a_full_socket_keeps_the_rest_for_later() {
        let (mut ch, daemon) = pair();
        // Far more than a socket buffer holds: flush writes what fits, keeps the rest.
        for call in 0..20_000 {
            ch.queue(&AskCall {
                call,
                pid: 1,
                action: HeldAction::Exec {
                    path: "/usr/bin/make".into(),
                    sha256: None,
                    argv: vec!["make".into(), "all".into()],
                    device: Some(1),
                    inode: Some(2),
                },
            });
        }
        ch.flush().unwrap();
        assert!(ch.wants_write());
        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(&daemon)
                .lines()
                .take(20_000)
                .count()
        });
        while ch.wants_write() {
            ch.flush().unwrap();
            std::thread::yield_now();
        }
        assert_eq!(reader.join().unwrap(), 20_000);
    }

    #[test]
    fn the_daemons_allowlist_lets_calls_on_it_go_without_asking_until_replaced() {
        let (mut ch, daemon) = pair();
        let on_list = HeldAction::Connect {
            transport: "tcp".into(),
            address: "192.0.2.7".parse().unwrap(),
            port: 443,
            host: None,
        };
        // Before the daemon sent one: everything is asked.
        assert!(!ch.allows_locally(std::slice::from_ref(&on_list)));
        (&daemon)
            .write_all(b"{\"allowlist\":{\"connect\":[\"192.0.2.0/24:443\"],\"exec\":[]}}\n{\"call\":1,\"allow\":true}\n")
            .unwrap();
        let got = ch.receive().unwrap();
        assert_eq!(got.len(), 1, "answers still come through");
        assert!(ch.allows_locally(std::slice::from_ref(&on_list)));
        // A reload narrowed the list.
        (&daemon)
            .write_all(b"{\"allowlist\":{\"connect\":[],\"exec\":[]}}\n")
            .unwrap();
        assert_eq!(ch.receive().unwrap(), vec![]);
        assert!(!ch.allows_locally(std::slice::from_ref(&on_list)));
        // An unreadable list: everything is asked, the channel stays.
        (&daemon)
            .write_all(b"{\"allowlist\":{\"connect\":[\"192.0.2.0/24:443\"]}}\n{\"allowlist\":{\"connect\":[\"no\"]}}\n")
            .unwrap();
        assert_eq!(ch.receive().unwrap(), vec![]);
        assert!(!ch.allows_locally(std::slice::from_ref(&on_list)));
    }
}
