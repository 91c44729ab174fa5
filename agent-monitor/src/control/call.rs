//! The client side: one request over the socket, its response, and (for `events --follow`) the
//! lines that follow.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Request, Response};

/// Why a client call failed, worded for the person who ran the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent-monitor daemon is not running (no control socket at {path}); start it with `agent-monitor daemon`"
    )]
    NotRunning { path: String },
    #[error(
        "permission denied on the control socket {path}: it is for root and the daemon's --admin-group"
    )]
    PermissionDenied { path: String },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    call_then(socket, req, |_| true)
}

/// Sends one request, reads the response, then hands every further line to `more` until the
/// daemon closes the connection or `more` returns false (streaming requests: `events --follow`).
pub fn call_then(
    socket: &Path,
    req: &Request,
    more: impl FnMut(&str) -> bool,
) -> Result<Response, ClientError> {
    let mut response = None;
    let streams = matches!(req, Request::Events { follow: true, .. });
    call_follow(
        socket,
        req,
        |r| {
            response = Some(r);
            streams
        },
        more,
    )?;
    response.ok_or_else(|| ClientError::Protocol("no response".into()))
}

/// Sends one request and hands its response to `first` before reading on; if `first` returns
/// true, then every further line to `more` until the daemon closes the connection or `more`
/// returns false. For streams whose first answer must be seen before the lines that follow it
/// (`pending --follow`: the requests held now, then each change; `top`).
pub fn call_follow(
    socket: &Path,
    req: &Request,
    first: impl FnOnce(Response) -> bool,
    mut more: impl FnMut(&str) -> bool,
) -> Result<(), ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path: path.clone() }
        }
        std::io::ErrorKind::PermissionDenied => {
            ClientError::PermissionDenied { path: path.clone() }
        }
        _ => ClientError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(&stream);
    reader.read_line(&mut answer).map_err(io)?;
    let resp: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    let resp = match resp {
        Response::Error { message } => return Err(ClientError::Refused(message)),
        other => other,
    };
    if first(resp) {
        // A follower waits as long as it takes for the next line.
        stream.set_read_timeout(None).map_err(io)?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 || !more(line.trim_end()) {
                break;
            }
        }
    }
    Ok(())
}
