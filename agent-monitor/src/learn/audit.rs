//! Reading the JSON audit trail back into typed recorded actions, each with its line number.
//!
//! The reader is tolerant where the trail may grow (unknown keys are ignored, unknown action kinds
//! are kept as [`What::Other`] for the caller to count) and strict where it must be sure (a key it
//! needs that is missing or of the wrong type makes the line a [`LineProblem`] naming file, line and
//! what was expected). A bad line never stops the reading.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::action::{REASON_EXEC_PATH_TOO_LONG, REASON_EXEC_PATH_UNREADABLE};

/// One action read back from the trail.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// 1-based line in the trail.
    pub line: usize,
    pub agent: String,
    pub task: String,
    pub time: OffsetDateTime,
    /// As recorded: `allowed`, `denied`, `alert` (or a verdict a later version added).
    pub verdict: String,
    /// Executables from the agent's root process to the actor (pids dropped: they differ per run).
    pub chain: Vec<String>,
    pub what: What,
}

/// What the recorded action was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    Connect {
        /// IPv4-mapped IPv6 addresses are stored as IPv4, as the evaluator judges them.
        addr: IpAddr,
        port: u16,
        /// Host name the daemon attributed to the destination (`dest_host`), if any.
        host: Option<String>,
    },
    Exec {
        path: String,
        /// False when the kernel could not read the whole path: `path` is not the file that ran.
        complete: bool,
    },
    /// An action kind this version does not know (`dns`, `sendmsg`, …): counted, not judged.
    Other { kind: String },
    /// An open of a file an agent's `[files]` denies (`file_path`).
    Open { path: String },
    /// A unix connect or datagram send (`dest_transport` `unix`) to the socket named `path`
    /// (`@name` abstract).
    Unix { path: String },
    /// A connection through the egress endpoint (`tls`, `http`): the name it carried
    /// (`tls_sni`, else `http_host`) on the original destination's port.
    Egress {
        tls: bool,
        name: Option<String>,
        port: u16,
    },
    /// One request that interception judged (`http` with `http_method`): judged on its own
    /// method and path (`[[network.http]]`).
    Request(RecordedRequest),
}

/// A request as the trail records it (`tls_sni`, `http_host`, `dest_port`, `http_method`,
/// `url_path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The connection's TLS server name.
    pub sni: Option<String>,
    /// The `Host` (or `:authority`) the request named, as sent (it may carry a port).
    pub host: Option<String>,
    /// The original destination's port.
    pub port: u16,
    /// Upper case.
    pub method: String,
    /// Normalised as interception judged it (as received when it could not be normalised).
    pub path: String,
}

impl RecordedRequest {
    /// The name the request was judged under: the server name, else the `Host` without a port
    /// (normalised).
    pub fn name(&self) -> Option<String> {
        let name = match (&self.sni, &self.host) {
            (Some(s), _) => s.clone(),
            (None, Some(h)) => match h.parse::<hyper::http::uri::Authority>() {
                Ok(a) => a.host().to_string(),
                Err(_) => h.clone(),
            },
            (None, None) => return None,
        };
        Some(crate::policy::host::normalize_name(&name))
    }
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Connect { addr, port, host } => {
                match addr {
                    IpAddr::V4(a) => write!(f, "connect {a}:{port}")?,
                    IpAddr::V6(a) => write!(f, "connect [{a}]:{port}")?,
                }
                match host {
                    Some(h) => write!(f, " ({h})"),
                    None => Ok(()),
                }
            }
            What::Exec { path, .. } => write!(f, "exec {path}"),
            What::Other { kind } => write!(f, "{kind}"),
            What::Open { path } => write!(f, "open {path}"),
            What::Unix { path } => write!(f, "connect unix {path}"),
            What::Egress { tls, name, port } => write!(
                f,
                "{} {}:{port}",
                if *tls { "tls" } else { "http" },
                name.as_deref().unwrap_or("(no name)")
            ),
            What::Request(r) => write!(
                f,
                "http {}:{} {} {}",
                r.name().as_deref().unwrap_or("(no name)"),
                r.port,
                r.method,
                r.path
            ),
        }
    }
}

/// A line that could not be read as an audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineProblem {
    pub origin: PathBuf,
    pub line: usize,
    /// What was wrong and what was expected.
    pub what: String,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.origin.display(), self.line, self.what)
    }
}

/// Everything read from one trail.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Audit {
    pub origin: PathBuf,
    /// In file order.
    pub actions: Vec<Recorded>,
    /// Lines that are not audit records, in file order.
    pub problems: Vec<LineProblem>,
}

impl Audit {
    /// Actions of `agent`, of the given tasks only if `tasks` is not empty.
    pub fn of<'a>(
        &'a self,
        agent: &'a str,
        tasks: &'a [String],
    ) -> impl Iterator<Item = &'a Recorded> + 'a {
        self.actions
            .iter()
            .filter(move |r| r.agent == agent && (tasks.is_empty() || tasks.contains(&r.task)))
    }
}

/// How many actions of each kind this version does not know, for reporting.
pub fn unknown_kinds<'a>(actions: impl IntoIterator<Item = &'a Recorded>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in actions {
        if let What::Other { kind } = &r.what {
            *counts.entry(kind.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// Reads a whole trail. Only an I/O error of `reader` is an error; bad lines become problems.
/// Blank lines are skipped (an editor may leave one at the end).
pub fn read_audit(mut reader: impl BufRead, origin: &Path) -> io::Result<Audit> {
    let mut audit = Audit {
        origin: origin.to_path_buf(),
        ..Audit::default()
    };
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line += 1;
        let problem = |what: String| LineProblem {
            origin: origin.to_path_buf(),
            line,
            what,
        };
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim(),
            Err(e) => {
                audit.problems.push(problem(format!(
                    "not UTF-8 (byte {}); expected one JSON object per line",
                    e.valid_up_to()
                )));
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        match parse_record(text, line) {
            Ok(r) => audit.actions.push(r),
            // No newline at the end of the file: the writer stopped in the middle of this line.
            Err(what) if buf.last() != Some(&b'\n') => audit.problems.push(problem(format!(
                "last line cut short (no newline at the end: the daemon stopped or the disk \
                 filled while it was written), not read: {what}"
            ))),
            Err(what) => audit.problems.push(problem(what.to_string())),
        }
    }
    Ok(audit)
}

/// What is wrong with one line of the trail; the text says what was expected.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not JSON ({0}); expected one audit record per line, as written by --json-log")]
    NotJson(#[source] serde_json::Error),
    #[error("a JSON {0}, expected an object (one audit record per line)")]
    NotObject(&'static str),
    #[error("dest_addr {0:?}: expected an IPv4 or IPv6 address")]
    BadAddress(String),
    /// `found`: the value as [`shown`] describes it.
    #[error("dest_port: expected an integer 0-65535, found {found}")]
    BadPort { found: String },
    #[error("time {0:?}: expected an RFC 3339 time")]
    BadTime(String),
    #[error("{key}: expected a string, found {found}")]
    NotString { key: String, found: String },
    #[error("{key}: expected a string or null, found {found}")]
    NotStringOrNull { key: String, found: String },
    #[error("process_chain: expected a list of {{pid, exe}}, found {found}")]
    BadChain { found: String },
    #[error("process_chain[{index}]: expected {{pid, exe}} with exe a string, found {found}")]
    BadChainLink { index: usize, found: String },
}

/// One line → one action, or what was wrong with it.
pub fn parse_record(text: &str, line: usize) -> Result<Recorded, RecordError> {
    let value: Value = serde_json::from_str(text).map_err(RecordError::NotJson)?;
    let Value::Object(obj) = value else {
        return Err(RecordError::NotObject(json_type(&value)));
    };
    let kind = string(&obj, "action")?;
    let what = match kind.as_str() {
        // A datagram sent to a named address is judged like a connect to it.
        "connect" | "sendmsg"
            if optional_string(&obj, "dest_transport")?.as_deref() == Some("unix") =>
        {
            What::Unix {
                path: string(&obj, "dest_path")?,
            }
        }
        "connect" | "sendmsg" => {
            let addr_text = string(&obj, "dest_addr")?;
            let addr: IpAddr = addr_text
                .parse()
                .map_err(|_| RecordError::BadAddress(addr_text.clone()))?;
            // The evaluator judges an IPv4-mapped address as the IPv4 address; so do we.
            let addr = match addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            let port = match obj.get("dest_port") {
                Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
                _ => None,
            }
            .ok_or_else(|| RecordError::BadPort {
                found: shown(obj.get("dest_port")),
            })?;
            let host = optional_string(&obj, "dest_host")?
                .filter(|h| !h.is_empty())
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase());
            What::Connect { addr, port, host }
        }
        "exec" => {
            let path = string(&obj, "exe")?;
            let reason = optional_string(&obj, "reason")?.unwrap_or_default();
            let complete = !(reason.starts_with(REASON_EXEC_PATH_TOO_LONG)
                || reason.starts_with(REASON_EXEC_PATH_UNREADABLE));
            What::Exec { path, complete }
        }
        "open" => What::Open {
            path: string(&obj, "file_path")?,
        },
        "tls" | "http" => {
            let port = obj
                .get("dest_port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| RecordError::BadPort {
                    found: shown(obj.get("dest_port")),
                })?;
            let sni = optional_string(&obj, "tls_sni")?.filter(|n| !n.is_empty());
            let host = optional_string(&obj, "http_host")?.filter(|n| !n.is_empty());
            if kind == "http"
                && let Some(method) = optional_string(&obj, "http_method")?
            {
                What::Request(RecordedRequest {
                    sni,
                    host,
                    port,
                    method: method.to_ascii_uppercase(),
                    path: string(&obj, "url_path")?,
                })
            } else {
                What::Egress {
                    tls: kind == "tls",
                    name: sni.or(host),
                    port,
                }
            }
        }
        _ => What::Other { kind },
    };
    let time_text = string(&obj, "time")?;
    let time = OffsetDateTime::parse(&time_text, &Rfc3339)
        .map_err(|_| RecordError::BadTime(time_text.clone()))?;
    Ok(Recorded {
        line,
        agent: string(&obj, "agent_id")?,
        task: string(&obj, "task_id")?,
        time,
        verdict: string(&obj, "verdict")?,
        chain: chain(&obj)?,
        what,
    })
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, RecordError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(RecordError::NotString {
            key: key.to_string(),
            found: shown(other),
        }),
    }
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, RecordError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        other => Err(RecordError::NotStringOrNull {
            key: key.to_string(),
            found: shown(other),
        }),
    }
}

/// `process_chain`: a list of `{pid, exe}`, root first. Absent or null is an empty chain.
fn chain(obj: &Map<String, Value>) -> Result<Vec<String>, RecordError> {
    let links = match obj.get("process_chain") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        other => {
            return Err(RecordError::BadChain {
                found: shown(other),
            });
        }
    };
    links
        .iter()
        .enumerate()
        .map(|(i, link)| match link.get("exe") {
            Some(Value::String(exe)) => Ok(exe.clone()),
            _ => Err(RecordError::BadChainLink {
                index: i,
                found: shown(Some(link)),
            }),
        })
        .collect()
}

/// A value for an error message: its type and, if short, itself.
fn shown(value: Option<&Value>) -> String {
    match value {
        None => "nothing (key missing)".into(),
        Some(v) => {
            let text = v.to_string();
            if text.len() <= 40 {
                format!("{} {text}", json_type(v))
            } else {
                json_type(v).to_string()
            }
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A connect line as the daemon writes it, plus `extra` keys.
    pub(crate) fn connect_line(
        agent: &str,
        task: &str,
        addr: &str,
        port: u16,
        extra: &str,
    ) -> String {
        format!(
            r#"{{"agent_id":"{agent}","task_id":"{task}","action":"connect","verdict":"alert","pid":10,"uid":0,"comm":"python3","exe":"/usr/bin/python3","dest_addr":"{addr}","dest_port":{port},"dest_transport":"tcp","process_chain":[{{"pid":9,"exe":"/bin/sh"}},{{"pid":10,"exe":"/usr/bin/python3"}}],"enforcement":null,"reason":"no rule matches","message":"m","time":"2026-11-29T12:00:00Z","priority":3{extra}}}"#
        )
    }

    pub(crate) fn exec_line(agent: &str, task: &str, exe: &str, time: &str) -> String {
        format!(
            r#"{{"agent_id":"{agent}","task_id":"{task}","action":"exec","verdict":"alert","pid":11,"uid":0,"comm":"sh","exe":"{exe}","dest_addr":null,"dest_port":null,"dest_transport":null,"process_chain":[{{"pid":9,"exe":"/bin/sh"}},{{"pid":11,"exe":"{exe}"}}],"enforcement":null,"reason":"no rule matches","message":"m","time":"{time}","priority":3}}"#
        )
    }

    /// A unix connect line as the daemon writes it.
    pub(crate) fn unix_line(agent: &str, task: &str, path: &str) -> String {
        format!(
            r#"{{"agent_id":"{agent}","task_id":"{task}","action":"connect","verdict":"alert","pid":12,"uid":0,"comm":"curl","exe":"/usr/bin/curl","dest_addr":null,"dest_port":null,"dest_transport":"unix","dest_path":"{path}","process_chain":[{{"pid":12,"exe":"/usr/bin/curl"}}],"enforcement":null,"reason":"no rule matches","message":"m","time":"2026-11-29T12:00:02Z","priority":3}}"#
        )
    }

    #[test]
    fn reads_unix_connects_by_their_path() {
        let audit = read(&unix_line("coder", "t1", "/run/user/1000/bus"));
        assert_eq!(audit.problems, []);
        assert_eq!(
            audit.actions[0].what,
            What::Unix {
                path: "/run/user/1000/bus".into()
            }
        );
        assert_eq!(
            audit.actions[0].what.to_string(),
            "connect unix /run/user/1000/bus"
        );
    }

    pub(crate) fn read(text: &str) -> Audit {
        read_audit(text.as_bytes(), Path::new("audit.jsonl")).expect("reading from memory")
    }

    #[test]
    fn reads_connect_and_exec_with_line_numbers() {
        let text = format!(
            "{}\n\n{}\n",
            connect_line("coder", "t1", "127.0.0.1", 8080, ""),
            exec_line("coder", "t2", "/bin/true", "2026-11-29T12:00:01.5Z")
        );
        let audit = read(&text);
        assert_eq!(audit.problems, []);
        assert_eq!(audit.actions.len(), 2);
        let c = &audit.actions[0];
        assert_eq!(c.line, 1);
        assert_eq!((c.agent.as_str(), c.task.as_str()), ("coder", "t1"));
        assert_eq!(c.verdict, "alert");
        assert_eq!(c.chain, ["/bin/sh", "/usr/bin/python3"]);
        assert_eq!(
            c.what,
            What::Connect {
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                host: None
            }
        );
        let e = &audit.actions[1];
        assert_eq!(e.line, 3, "blank line 2 is counted");
        assert_eq!(
            e.what,
            What::Exec {
                path: "/bin/true".into(),
                complete: true
            }
        );
        assert!(e.time > c.time);
    }

    #[test]
    fn reads_back_what_the_json_sink_writes() {
        use crate::output::json::json_line;
        use crate::output::tests::{connect_action, exec_action};
        let text = format!(
            "{}{}",
            json_line(&connect_action()).unwrap(),
            json_line(&exec_action()).unwrap()
        );
        let audit = read(&text);
        assert_eq!(audit.problems, []);
        let c = &audit.actions[0];
        assert_eq!((c.agent.as_str(), c.task.as_str()), ("coder", "t-42"));
        assert_eq!(c.verdict, "denied");
        assert_eq!(c.chain, ["/usr/bin/python3", "/bin/sh", "/usr/bin/curl"]);
        assert_eq!(
            c.what,
            What::Connect {
                addr: "10.1.2.3".parse().unwrap(),
                port: 443,
                // The fixture's connect went to a learned address (DNS-aware allowlists).
                host: Some("api.example.com".into())
            }
        );
        assert_eq!(
            OffsetDateTime::from(connect_action().time),
            c.time,
            "time survives to the millisecond"
        );
        assert_eq!(
            audit.actions[1].what,
            What::Exec {
                path: "/usr/bin/nc".into(),
                complete: true
            }
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_dest_host_is_read() {
        let line = connect_line(
            "coder",
            "t1",
            "10.0.0.1",
            443,
            r#","dest_host":"API.Example.com.","spiffe_id":"spiffe://x/y","grant":{"a":1}"#,
        );
        let audit = read(&line);
        assert_eq!(audit.problems, []);
        assert_eq!(
            audit.actions[0].what,
            What::Connect {
                addr: "10.0.0.1".parse().unwrap(),
                port: 443,
                host: Some("api.example.com".into())
            }
        );
    }

    #[test]
    fn unknown_kinds_are_kept_for_counting() {
        let dns = connect_line("coder", "t", "10.0.0.1", 53, "").replace("\"connect\"", "\"dns\"");
        let socket = connect_line("coder", "t", "10.0.0.1", 53, "")
            .replace("\"connect\"", "\"socket\"")
            .replace("\"dest_port\":53", "\"dest_port\":\"odd\"");
        let audit = read(&format!("{dns}\n{socket}\n{dns}\n"));
        assert_eq!(
            audit.problems,
            [],
            "an unknown kind is not judged, so not checked"
        );
        let counts = unknown_kinds(&audit.actions);
        assert_eq!(counts.get("dns"), Some(&2));
        assert_eq!(counts.get("socket"), Some(&1));
    }

    #[test]
    fn a_sendmsg_is_learned_like_a_connect() {
        let line =
            connect_line("coder", "t", "10.0.0.1", 53, "").replace("\"connect\"", "\"sendmsg\"");
        let audit = read(&line);
        assert_eq!(audit.problems, []);
        assert!(matches!(
            audit.actions[0].what,
            What::Connect { port: 53, .. }
        ));
    }

    #[test]
    fn ipv4_mapped_destinations_are_ipv4() {
        let audit = read(&connect_line("a", "t", "::ffff:10.1.2.3", 80, ""));
        assert_eq!(
            audit.actions[0].what,
            What::Connect {
                addr: "10.1.2.3".parse().unwrap(),
                port: 80,
                host: None
            }
        );
    }

    #[test]
    fn incomplete_exec_paths_are_marked() {
        let line = exec_line("a", "t", "/very/long", "2026-11-29T12:00:00Z").replace(
            "\"reason\":\"no rule matches\"",
            "\"reason\":\"exec path longer than 251 bytes cannot be matched\"",
        );
        let audit = read(&line);
        assert!(matches!(
            audit.actions[0].what,
            What::Exec {
                complete: false,
                ..
            }
        ));
    }

    #[test]
    fn malformed_lines_are_reported_and_reading_goes_on() {
        let good = exec_line("a", "t", "/bin/true", "2026-11-29T12:00:00Z");
        let lines = [
            good.clone(),
            "{\"agent_id\":\"cod".to_string(),
            "[1,2]".to_string(),
            connect_line("a", "t", "10.0.0.1", 80, "")
                .replace("\"dest_port\":80", "\"dest_port\":70000"),
            connect_line("a", "t", "example.com", 80, ""),
            good.replace(
                "\"time\":\"2026-11-29T12:00:00Z\"",
                "\"time\":\"yesterday\"",
            ),
            good.replace("\"exe\":\"/bin/true\"", "\"exe\":null"),
            good.replace("\"task_id\":\"t\",", ""),
            good.replace("[{\"pid\":9,\"exe\":\"/bin/sh\"}", "[{\"pid\":9}"),
            good.clone(),
        ];
        let mut text = lines.join("\n").into_bytes();
        text.extend_from_slice(b"\n\xff\xfe\n");
        let audit = read_audit(&text[..], Path::new("trail.jsonl")).unwrap();
        assert_eq!(audit.actions.len(), 2);
        assert_eq!(audit.actions[1].line, 10);
        let problems: Vec<String> = audit.problems.iter().map(ToString::to_string).collect();
        let expected_starts = [
            "trail.jsonl:2: not JSON (",
            "trail.jsonl:3: a JSON array, expected an object",
            "trail.jsonl:4: dest_port: expected an integer 0-65535, found number 70000",
            "trail.jsonl:5: dest_addr \"example.com\": expected an IPv4 or IPv6 address",
            "trail.jsonl:6: time \"yesterday\": expected an RFC 3339 time",
            "trail.jsonl:7: exe: expected a string, found null",
            "trail.jsonl:8: task_id: expected a string, found nothing (key missing)",
            "trail.jsonl:9: process_chain[0]: expected {pid, exe} with exe a string",
            "trail.jsonl:11: not UTF-8 (byte 0)",
        ];
        assert_eq!(problems.len(), expected_starts.len(), "{problems:#?}");
        for (p, want) in problems.iter().zip(expected_starts) {
            assert!(p.starts_with(want), "{p:?} should start with {want:?}");
        }
    }

    #[test]
    fn a_torn_last_line_is_a_problem_not_a_crash() {
        let good = exec_line("a", "t", "/bin/true", "2026-11-29T12:00:00Z");
        let audit = read(&format!("{good}\n{}", &good[..good.len() / 2]));
        assert_eq!(audit.actions.len(), 1);
        assert_eq!(audit.problems.len(), 1);
        assert_eq!(audit.problems[0].line, 2);
        assert!(
            audit.problems[0].what.starts_with("last line cut short"),
            "{:?}",
            audit.problems[0]
        );
        // A complete last line without its newline is still read.
        assert_eq!(read(&good).actions.len(), 1);
    }

    #[test]
    fn filters_by_agent_and_task() {
        let text = [
            exec_line("a", "t1", "/bin/a", "2026-11-29T12:00:00Z"),
            exec_line("a", "t2", "/bin/b", "2026-11-29T12:00:00Z"),
            exec_line("b", "t1", "/bin/c", "2026-11-29T12:00:00Z"),
        ]
        .join("\n");
        let audit = read(&text);
        assert_eq!(audit.of("a", &[]).count(), 2);
        let t1 = ["t1".to_string()];
        let lines: Vec<usize> = audit.of("a", &t1).map(|r| r.line).collect();
        assert_eq!(lines, [1]);
        assert_eq!(audit.of("nobody", &[]).count(), 0);
    }
}
