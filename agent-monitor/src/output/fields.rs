//! The fields every sink reports, defined once: journald and JSON only differ in how they spell
//! a name (`AGENT_ID` / `agent_id`) and render a value.

use std::borrow::Cow;

use crate::action::{Action, ChainLink, Object};

/// A field every sink reports. Journald names are the upper-case form of the JSON names, with one
/// exception: the uid is `AGENT_UID` in journald so that nobody mistakes it for journald's trusted
/// `_UID` (the daemon's uid), while the JSON trail, which has no trusted fields, calls it `uid`.
/// `PID` keeps its plain name (the interface promises it); journald stores it as a user field next
/// to its own `_PID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    AgentId,
    AgentSpiffeId,
    TaskId,
    Action,
    Verdict,
    Pid,
    Uid,
    Comm,
    Exe,
    Interpreter,
    DestAddr,
    DestPort,
    DestTransport,
    DestHost,
    DnsName,
    Socket,
    Syscall,
    Signal,
    TargetPid,
    TargetComm,
    TargetAgent,
    TargetTask,
    ProcessChain,
    Enforcement,
    Reason,
    Message,
    FilePath,
    OpenFlags,
    /// A unix connect's socket (`DEST_TRANSPORT=unix`); an abstract name as `@name`.
    DestPath,
    TlsSni,
    HttpHost,
    BytesIn,
    BytesOut,
    DurationMs,
    HttpMethod,
    UrlPath,
    HttpStatus,
}

impl Field {
    /// Every field, in report order.
    pub const ALL: [Field; 37] = [
        Field::AgentId,
        Field::AgentSpiffeId,
        Field::TaskId,
        Field::Action,
        Field::Verdict,
        Field::Pid,
        Field::Uid,
        Field::Comm,
        Field::Exe,
        Field::Interpreter,
        Field::DestAddr,
        Field::DestPort,
        Field::DestTransport,
        Field::DestHost,
        Field::DnsName,
        Field::Socket,
        Field::Syscall,
        Field::Signal,
        Field::TargetPid,
        Field::TargetComm,
        Field::TargetAgent,
        Field::TargetTask,
        Field::ProcessChain,
        Field::Enforcement,
        Field::Reason,
        Field::Message,
        Field::FilePath,
        Field::OpenFlags,
        Field::DestPath,
        Field::TlsSni,
        Field::HttpHost,
        Field::BytesIn,
        Field::BytesOut,
        Field::DurationMs,
        Field::HttpMethod,
        Field::UrlPath,
        Field::HttpStatus,
    ];

    /// Name of the journald field (upper case, `[A-Z0-9_]`, not starting with `_`).
    pub fn journal_name(self) -> &'static str {
        match self {
            Field::AgentId => "AGENT_ID",
            Field::AgentSpiffeId => "AGENT_SPIFFE_ID",
            Field::TaskId => "TASK_ID",
            Field::Action => "ACTION",
            Field::Verdict => "VERDICT",
            Field::Pid => "PID",
            Field::Uid => "AGENT_UID",
            Field::Comm => "COMM",
            Field::Exe => "EXE",
            Field::Interpreter => "INTERPRETER",
            Field::Socket => "SOCKET",
            Field::Syscall => "SYSCALL",
            Field::Signal => "SIGNAL",
            Field::TargetPid => "TARGET_PID",
            Field::TargetComm => "TARGET_COMM",
            Field::TargetAgent => "TARGET_AGENT",
            Field::TargetTask => "TARGET_TASK",
            Field::DestAddr => "DEST_ADDR",
            Field::DestPort => "DEST_PORT",
            Field::DestTransport => "DEST_TRANSPORT",
            Field::DestHost => "DEST_HOST",
            Field::DnsName => "DNS_NAME",
            Field::ProcessChain => "PROCESS_CHAIN",
            Field::Enforcement => "ENFORCEMENT",
            Field::Reason => "REASON",
            Field::Message => "MESSAGE",
            Field::FilePath => "FILE_PATH",
            Field::OpenFlags => "OPEN_FLAGS",
            Field::DestPath => "DEST_PATH",
            Field::TlsSni => "TLS_SNI",
            Field::HttpHost => "HTTP_HOST",
            Field::BytesIn => "BYTES_IN",
            Field::BytesOut => "BYTES_OUT",
            Field::DurationMs => "DURATION_MS",
            Field::HttpMethod => "HTTP_METHOD",
            Field::UrlPath => "URL_PATH",
            Field::HttpStatus => "HTTP_STATUS",
        }
    }

    /// Name of the key in a JSON audit record.
    pub fn json_name(self) -> &'static str {
        match self {
            Field::AgentId => "agent_id",
            Field::AgentSpiffeId => "agent_spiffe_id",
            Field::TaskId => "task_id",
            Field::Action => "action",
            Field::Verdict => "verdict",
            Field::Pid => "pid",
            Field::Uid => "uid",
            Field::Comm => "comm",
            Field::Exe => "exe",
            Field::Interpreter => "interpreter",
            Field::Socket => "socket",
            Field::Syscall => "syscall",
            Field::Signal => "signal",
            Field::TargetPid => "target_pid",
            Field::TargetComm => "target_comm",
            Field::TargetAgent => "target_agent",
            Field::TargetTask => "target_task",
            Field::DestAddr => "dest_addr",
            Field::DestPort => "dest_port",
            Field::DestTransport => "dest_transport",
            Field::DestHost => "dest_host",
            Field::DnsName => "dns_name",
            Field::ProcessChain => "process_chain",
            Field::Enforcement => "enforcement",
            Field::Reason => "reason",
            Field::Message => "message",
            Field::FilePath => "file_path",
            Field::OpenFlags => "open_flags",
            Field::DestPath => "dest_path",
            Field::TlsSni => "tls_sni",
            Field::HttpHost => "http_host",
            Field::BytesIn => "bytes_in",
            Field::BytesOut => "bytes_out",
            Field::DurationMs => "duration_ms",
            Field::HttpMethod => "http_method",
            Field::UrlPath => "url_path",
            Field::HttpStatus => "http_status",
        }
    }
}

/// A field's value before a sink renders it.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue<'a> {
    Text(Cow<'a, str>),
    Number(u64),
    /// Journald renders [`Action::chain_string`]; JSON an array of `{pid, exe, args}`.
    Chain(&'a [ChainLink]),
}

/// Every [`Field`] of `action`, in [`Field::ALL`] order; `None` where it does not apply (no exe
/// known, no destination for an exec, no enforcement for an allowed action).
pub fn action_fields(action: &Action) -> Vec<(Field, Option<FieldValue<'_>>)> {
    let text = |s: &'static str| Some(FieldValue::Text(Cow::Borrowed(s)));
    let dest = action.object.destination();
    let target = action.object.target();
    Field::ALL
        .iter()
        .map(|&field| {
            let value = match field {
                Field::AgentId => Some(FieldValue::Text(Cow::Borrowed(action.agent.as_str()))),
                Field::AgentSpiffeId => {
                    Some(FieldValue::Text(Cow::Borrowed(action.spiffe_id.as_str())))
                }
                Field::TaskId => Some(FieldValue::Text(Cow::Borrowed(action.task.as_str()))),
                Field::Action => text(action.kind().as_str()),
                Field::Verdict => text(action.verdict.as_str()),
                Field::Pid => Some(FieldValue::Number(action.pid.into())),
                Field::Uid => Some(FieldValue::Number(action.uid.into())),
                Field::Comm => Some(FieldValue::Text(Cow::Borrowed(action.comm.as_str()))),
                Field::Exe => action
                    .reported_exe()
                    .map(|e| FieldValue::Text(Cow::Borrowed(e))),
                Field::Interpreter => match &action.object {
                    Object::Exec(f) => borrowed(&f.interpreter),
                    _ => None,
                },
                Field::Socket => action
                    .object
                    .call()
                    .map(|e| FieldValue::Text(Cow::Borrowed(e))),
                Field::Syscall => target.map(|t| FieldValue::Text(Cow::Borrowed(&t.syscall))),
                Field::Signal => target
                    .and_then(|t| t.signal)
                    .map(|s| FieldValue::Number(s.into())),
                Field::TargetPid => target.map(|t| FieldValue::Number(t.pid.into())),
                Field::TargetComm => target.map(|t| FieldValue::Text(Cow::Borrowed(&t.comm))),
                Field::TargetAgent => target.and_then(|t| borrowed(&t.agent)),
                Field::TargetTask => target.and_then(|t| borrowed(&t.task)),
                Field::DestAddr => dest.map(|d| FieldValue::Text(Cow::Owned(d.addr.to_string()))),
                Field::DestPort => dest.map(|d| FieldValue::Number(d.port.into())),
                Field::DestTransport => dest
                    .and_then(|d| text(d.transport))
                    .or_else(|| action.object.unix_path().and_then(|_| text("unix"))),
                Field::DestHost => match &action.object {
                    Object::Connect(t) | Object::Sendmsg(t) => borrowed(&t.host),
                    _ => None,
                },
                Field::DnsName => match &action.object {
                    Object::Dns(q) => borrowed(&q.name),
                    _ => None,
                },
                Field::ProcessChain => Some(FieldValue::Chain(&action.chain)),
                Field::Enforcement => action.enforcement.and_then(text),
                Field::Reason => Some(FieldValue::Text(Cow::Borrowed(action.reason.as_str()))),
                Field::Message => Some(FieldValue::Text(Cow::Owned(action.message()))),
                Field::FilePath => match &action.object {
                    Object::Open(f) => Some(FieldValue::Text(Cow::Borrowed(f.path.as_str()))),
                    _ => None,
                },
                Field::OpenFlags => match &action.object {
                    Object::Open(f) => Some(FieldValue::Text(Cow::Borrowed(&f.open_flags))),
                    _ => None,
                },
                Field::DestPath => action
                    .object
                    .unix_path()
                    .map(|p| FieldValue::Text(Cow::Borrowed(p))),
                Field::TlsSni
                | Field::HttpHost
                | Field::BytesIn
                | Field::BytesOut
                | Field::DurationMs
                | Field::HttpMethod
                | Field::UrlPath
                | Field::HttpStatus => egress_field(field, &action.object),
            };
            (field, value)
        })
        .collect()
}

/// The egress endpoint's fields (`TLS_SNI`, `HTTP_HOST`, bytes, duration) of a connection it
/// handled; none for every other action.
fn egress_field(field: Field, object: &Object) -> Option<FieldValue<'_>> {
    let Object::Egress(c) = object else {
        return None;
    };
    match field {
        Field::TlsSni => borrowed(&c.sni),
        Field::HttpHost => borrowed(&c.http_host),
        Field::BytesIn => Some(FieldValue::Number(c.bytes_in)),
        Field::BytesOut => Some(FieldValue::Number(c.bytes_out)),
        Field::DurationMs => Some(FieldValue::Number(c.duration_ms)),
        Field::HttpMethod => c
            .request
            .as_ref()
            .map(|r| FieldValue::Text(Cow::Borrowed(r.method.as_str()))),
        Field::UrlPath => c
            .request
            .as_ref()
            .map(|r| FieldValue::Text(Cow::Borrowed(r.path.as_str()))),
        Field::HttpStatus => c
            .request
            .as_ref()
            .map(|r| FieldValue::Number(u64::from(r.status))),
        _ => None,
    }
}

fn borrowed(s: &Option<String>) -> Option<FieldValue<'_>> {
    s.as_deref().map(|s| FieldValue::Text(Cow::Borrowed(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::{connect_action, dns_action, exec_action};

    #[test]
    fn field_names_are_distinct_and_json_is_lowercase_journal() {
        for (i, a) in Field::ALL.iter().enumerate() {
            for b in &Field::ALL[i + 1..] {
                assert_ne!(a.journal_name(), b.journal_name());
                assert_ne!(a.json_name(), b.json_name());
            }
            if *a != Field::Uid {
                assert_eq!(
                    a.json_name(),
                    a.journal_name().to_lowercase(),
                    "{a:?}: only Uid may be spelled differently"
                );
            }
        }
    }

    #[test]
    fn fields_cover_all_in_order() {
        let action = connect_action();
        let fields = action_fields(&action);
        let names: Vec<Field> = fields.iter().map(|(f, _)| *f).collect();
        assert_eq!(names, Field::ALL);
        // A connect has every field but the exec, socket, DNS, process-target and unix ones.
        assert!(
            fields.iter().all(|(f, v)| v.is_some()
                != matches!(
                    f,
                    Field::Interpreter
                        | Field::Socket
                        | Field::DnsName
                        | Field::Syscall
                        | Field::Signal
                        | Field::TargetPid
                        | Field::TargetComm
                        | Field::TargetAgent
                        | Field::TargetTask
                        | Field::FilePath
                        | Field::OpenFlags
                        | Field::DestPath
                        | Field::TlsSni
                        | Field::HttpHost
                        | Field::BytesIn
                        | Field::BytesOut
                        | Field::DurationMs
                        | Field::HttpMethod
                        | Field::UrlPath
                        | Field::HttpStatus
                )),
            "{fields:?}"
        );
    }

    #[test]
    fn dns_action_has_its_name_and_server_but_no_host() {
        let a = dns_action();
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get(Field::DnsName),
            Some(FieldValue::Text(Cow::Borrowed("secret.attacker.net")))
        );
        assert_eq!(
            get(Field::Action),
            Some(FieldValue::Text(Cow::Borrowed("dns")))
        );
        assert_eq!(get(Field::DestPort), Some(FieldValue::Number(53)));
        assert_eq!(get(Field::DestHost), None);
        assert!(
            a.message().contains("dns query secret.attacker.net"),
            "{}",
            a.message()
        );
    }

    #[test]
    fn signal_action_names_the_call_and_its_target() {
        let a = Action {
            object: Object::Signal(crate::action::ProcessTarget {
                syscall: "kill".into(),
                signal: Some(9),
                pid: 777,
                comm: "sleep".into(),
                agent: Some("reviewer".into()),
                task: Some("t2".into()),
            }),
            ..connect_action()
        };
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(get(Field::Syscall), Some(FieldValue::Text("kill".into())));
        assert_eq!(get(Field::Signal), Some(FieldValue::Number(9)));
        assert_eq!(get(Field::TargetPid), Some(FieldValue::Number(777)));
        assert_eq!(
            get(Field::TargetAgent),
            Some(FieldValue::Text("reviewer".into()))
        );
        assert_eq!(get(Field::DestAddr), None);
        assert!(
            a.message()
                .contains("signal kill signal 9 of pid 777 (sleep, agent reviewer task t2)"),
            "{}",
            a.message()
        );
    }

    /// (An exec cannot carry a destination at all: the object is an exec file.)
    #[test]
    fn exec_has_no_destination() {
        let a = exec_action();
        assert_eq!(
            action_fields(&a)
                .iter()
                .find(|(f, _)| *f == Field::Exe)
                .and_then(|(_, v)| v.clone()),
            Some(FieldValue::Text("/usr/bin/nc".into())),
            "an exec reports the file it ran as EXE"
        );
        let fields = action_fields(&a);
        for (f, v) in fields {
            let absent = matches!(
                f,
                Field::DestAddr
                    | Field::DestPort
                    | Field::DestTransport
                    | Field::DestHost
                    | Field::DnsName
                    | Field::Enforcement
                    | Field::Interpreter
                    | Field::Socket
                    | Field::Syscall
                    | Field::Signal
                    | Field::TargetPid
                    | Field::TargetComm
                    | Field::TargetAgent
                    | Field::TargetTask
                    | Field::FilePath
                    | Field::OpenFlags
                    | Field::DestPath
                    | Field::TlsSni
                    | Field::HttpHost
                    | Field::BytesIn
                    | Field::BytesOut
                    | Field::DurationMs
                    | Field::HttpMethod
                    | Field::UrlPath
                    | Field::HttpStatus
            );
            assert_eq!(v.is_none(), absent, "{f:?}: {v:?}");
        }
    }

    #[test]
    fn a_unix_connect_has_transport_unix_and_its_path_and_no_address() {
        let mut a = connect_action();
        a.object = Object::Unix(crate::action::UnixTarget {
            path: "/var/run/docker.sock".into(),
            send: false,
            sock_type: "stream",
        });
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get(Field::Action),
            Some(Some(FieldValue::Text("connect".into())))
        );
        assert_eq!(
            get(Field::DestTransport),
            Some(Some(FieldValue::Text("unix".into())))
        );
        assert_eq!(
            get(Field::DestPath),
            Some(Some(FieldValue::Text("/var/run/docker.sock".into())))
        );
        for absent in [Field::DestAddr, Field::DestPort, Field::DestHost] {
            assert_eq!(get(absent), Some(None), "{absent:?}");
        }
        a.object = Object::Unix(crate::action::UnixTarget {
            path: "@bus".into(),
            send: true,
            sock_type: "dgram",
        });
        let fields = action_fields(&a);
        assert!(fields.contains(&(Field::Action, Some(FieldValue::Text("sendmsg".into())))));
        assert!(a.message().contains("sendmsg unix dgram @bus"));
    }

    #[test]
    fn an_egress_connection_reports_its_names_bytes_and_duration() {
        let mut a = connect_action();
        a.object = Object::Egress(crate::action::EgressConnection {
            destination: a.object.destination().expect("connect"),
            tls: true,
            sni: Some("pypi.org".into()),
            http_host: None,
            bytes_out: 517,
            bytes_in: 4096,
            duration_ms: 12,
            request: None,
        });
        assert_eq!(a.kind().as_str(), "tls");
        let fields = action_fields(&a);
        let get = |want: Field| {
            fields
                .iter()
                .find(|(f, _)| *f == want)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get(Field::TlsSni),
            Some(FieldValue::Text("pypi.org".into()))
        );
        assert_eq!(get(Field::HttpHost), None);
        assert_eq!(get(Field::BytesOut), Some(FieldValue::Number(517)));
        assert_eq!(get(Field::BytesIn), Some(FieldValue::Number(4096)));
        assert_eq!(get(Field::DurationMs), Some(FieldValue::Number(12)));
        assert_eq!(get(Field::DestPort), Some(FieldValue::Number(443)));
        assert!(
            a.message()
                .contains("tls 10.1.2.3:443 (server name pypi.org)"),
            "{}",
            a.message()
        );
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;
    use crate::action::FileOpen;
    use crate::output::tests::exec_action;

    #[test]
    fn an_open_has_its_file_and_flags_and_nothing_of_a_destination() {
        let action = Action {
            object: Object::Open(FileOpen {
                path: "/root/.aws/credentials".into(),
                open_flags: "O_RDONLY|O_CLOEXEC".into(),
            }),
            ..exec_action()
        };
        let fields = action_fields(&action);
        let get = |f: Field| {
            fields
                .iter()
                .find(|(g, _)| *g == f)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get(Field::FilePath),
            Some(FieldValue::Text("/root/.aws/credentials".into()))
        );
        assert_eq!(
            get(Field::OpenFlags),
            Some(FieldValue::Text("O_RDONLY|O_CLOEXEC".into()))
        );
        assert_eq!(get(Field::Action), Some(FieldValue::Text("open".into())));
        assert_eq!(get(Field::DestAddr), None);
        assert_eq!(get(Field::Interpreter), None);
        assert!(
            action
                .message()
                .contains("open /root/.aws/credentials (O_RDONLY|O_CLOEXEC)")
        );
    }
}
