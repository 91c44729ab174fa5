//! Ask mode on the command line: `pending`, `approve`, `deny` (clients of the control socket),
//! and the daemon's `--ask-timeout` / `--approver-url` options.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::cli::SocketArg;
use crate::control::{
    self, Decision, HeldAction, PendingEvent, PendingRequest, Request, Response, Scope,
};

/// The daemon's ask-mode options.
#[derive(Debug, Args)]
pub struct AskDaemonArgs {
    /// How long a held request of an ask-mode agent waits for a decision before it is denied
    /// (reported as VERDICT=timeout, APPROVER=timeout). 5s, 1m, 90s …
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub ask_timeout: Duration,
    /// A decision service: every new held request is POSTed to this http:// URL as JSON (agent,
    /// SPIFFE id, task, uid, process chain, the action), and the answer
    /// `{"decision":"allow"|"deny","scope":"once"|"task"|"always","ttl":"10m","reason":"…"}`
    /// decides it (an OPA data API answer `{"result":{…}}` too). No answer within
    /// --approver-timeout, an error or a bad answer is a deny (counted). See docs/ask.md.
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    pub approver_url: Option<hyper::Uri>,
    /// Longest wait for the decision service's answer (never beyond --ask-timeout).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub approver_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be longer than 0"));
    }
    Ok(d)
}

fn parse_url(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only http:// is supported (serve TLS through a local proxy)"
        ));
    }
    if uri.host().is_none() {
        return Err(format!("{s:?}: no host"));
    }
    Ok(uri)
}

#[derive(Debug, Args)]
pub struct PendingArgs {
    /// Keep the connection open and show every request held and every decision as it happens.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per line (the requests, then with --follow `{"held":…}` / `{"decided":…}`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("scope").required(true).args(["once", "task", "always"]))]
pub struct ApproveArgs {
    /// The request's id, as `agent-monitor pending` shows it.
    #[arg(value_name = "ID")]
    pub id: u64,
    /// This call only: for a connect or exec, an exact kernel entry of the task, removed once
    /// the call was made (at the latest after 5 s); for a DNS name, this answer's addresses
    /// (learned for its TTL).
    #[arg(long)]
    pub once: bool,
    /// For the request's task: a task grant as `task start --allow-connect/--allow-exec` makes
    /// (for a name: its later queries in this task are answered without asking).
    #[arg(long)]
    pub task: bool,
    /// With --task: how long the grant lasts (30s, 10m, 1h); without it, until the task ends.
    #[arg(long, value_name = "DURATION", requires = "task", value_parser = crate::identity::tasks::parse_ttl)]
    pub ttl: Option<Duration>,
    /// From now on: the entry is appended to `<policy dir>/<agent>.approved.toml` (a reviewed
    /// file, with a comment naming you, the request and the time) and the policies are reloaded.
    #[arg(long)]
    pub always: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct DenyArgs {
    /// The request's id, as `agent-monitor pending` shows it.
    #[arg(value_name = "ID")]
    pub id: u64,
    /// Why, for the agent's operator (journald REASON, the JSON trail).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// What a held action is, in words: `dns pypi.org (A)`, `tcp 192.0.2.1:443 (pypi.org)`,
/// `exec /usr/bin/make all`.
pub fn action_text(a: &HeldAction) -> String {
    match a {
        HeldAction::Dns { name, qtype } => format!("dns {name} ({qtype})"),
        HeldAction::Connect {
            transport,
            address,
            port,
            host,
        } => format!(
            "{transport} {}{}",
            std::net::SocketAddr::new(*address, *port),
            host.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
        ),
        HeldAction::Exec { path, argv, .. } => format!("exec {path} {}", argv.join(" "))
            .trim_end()
            .to_string(),
        HeldAction::Unix { path, resolved, .. } => match resolved {
            Some(r) if r != path => format!("unix {path} -> {r}"),
            _ => format!("unix {path}"),
        },
        HeldAction::Open {
            path, open_flags, ..
        } => format!("open {path} ({open_flags})"),
    }
}

/// One line for a held request: `12  coder/t1  pid 4711  dns pypi.org (A)  held 3s, 57s left`.
pub fn describe(r: &PendingRequest) -> String {
    let what = action_text(&r.action);
    let chain: Vec<&str> = r.chain.iter().map(|c| c.exe.as_str()).collect();
    format!(
        "{:>5}  {}/{}  pid {}  {}  held {}s, {}s left{}",
        r.id,
        r.agent,
        r.task.as_deref().unwrap_or("?"),
        r.pid,
        what.trim_end(),
        r.held_ms / 1000,
        r.expires_in_ms / 1000,
        if chain.is_empty() {
            String::new()
        } else {
            format!("  [{}]", chain.join(" > "))
        }
    )
}

fn describe_outcome(o: &control::Outcome) -> String {
    let scope = o.scope.map(|s| match s {
        Scope::Once => " (once)",
        Scope::Task => " (task)",
        Scope::Always => " (always)",
    });
    format!(
        "request {} {}{} by {}{}",
        o.id,
        o.verdict,
        scope.unwrap_or(""),
        o.approver,
        o.reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )
}

fn out(line: &str) {
    if let Err(e) = writeln!(std::io::stdout(), "{line}") {
        crate::stdout::failed(&e);
    }
}

pub fn pending(args: PendingArgs) -> ExitCode {
    let req = Request::Pending {
        follow: args.follow,
    };
    if !args.follow {
        return match control::call(&args.socket.control_socket, &req) {
            Ok(Response::Pending { requests }) => {
                show_list(&requests, args.json);
                ExitCode::SUCCESS
            }
            Ok(other) => {
                eprintln!("agent-monitor pending: unexpected answer: {other:?}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("agent-monitor pending: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match follow(&args, &req) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-monitor pending: {e}");
            ExitCode::FAILURE
        }
    }
}

fn show_list(requests: &[PendingRequest], json: bool) {
    if json {
        for r in requests {
            out(&serde_json::to_string(r).unwrap_or_default());
        }
    } else if requests.is_empty() {
        out("no held requests");
    } else {
        for r in requests {
            out(&describe(r));
        }
    }
}

/// `pending --follow`: the list, then every held request and decision as the daemon sends them.
fn follow(args: &PendingArgs, req: &Request) -> Result<(), String> {
    let path = &args.socket.control_socket;
    let mut stream = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).map_err(|e| e.to_string())?;
    match serde_json::from_str::<Response>(&first) {
        Ok(Response::Pending { requests }) => show_list(&requests, args.json),
        Ok(Response::Error { message }) => return Err(message),
        Ok(other) => return Err(format!("unexpected answer: {other:?}")),
        Err(e) => return Err(format!("unreadable answer ({e}): {first}")),
    }
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if args.json {
            out(&line);
            continue;
        }
        match serde_json::from_str::<PendingEvent>(&line) {
            Ok(PendingEvent::Held(r)) => out(&format!("held    {}", describe(&r))),
            Ok(PendingEvent::Decided(o)) => out(&format!("decided {}", describe_outcome(&o))),
            Err(_) => out(&line),
        }
    }
    Ok(())
}

fn decide(socket: &SocketArg, id: u64, decision: Decision, verb: &str) -> ExitCode {
    match control::call(&socket.control_socket, &Request::Decide { id, decision }) {
        Ok(Response::Decided(o)) => {
            out(&describe_outcome(&o));
            if o.verdict == "approved" || verb == "deny" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(other) => {
            eprintln!("agent-monitor {verb}: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor {verb}: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn approve(args: ApproveArgs) -> ExitCode {
    let scope = if args.always {
        Scope::Always
    } else if args.task {
        Scope::Task
    } else {
        Scope::Once
    };
    let ttl_ms = args.ttl.map(|d| d.as_millis() as u64);
    decide(
        &args.socket,
        args.id,
        Decision::Allow { scope, ttl_ms },
        "approve",
    )
}

pub fn deny(args: DenyArgs) -> ExitCode {
    decide(
        &args.socket,
        args.id,
        Decision::Deny {
            reason: args.reason,
        },
        "deny",
    )
}

/// `status`: the held requests, when there are any.
pub fn print_status(pending: &[PendingRequest]) {
    if pending.is_empty() {
        return;
    }
    out(&format!(
        "pending requests (ask mode): {} (decide with `agent-monitor approve ID` / `deny ID`)",
        pending.len()
    ));
    for r in pending {
        out(&format!("  {}", describe(r)));
    }
}
