//! Journald sink: one structured entry per action over the native protocol, so that
//! `journalctl _UID=0 _EXE=/usr/bin/agent-monitor AGENT_ID=coder VERDICT=denied` finds it.
//!
//! Any process can write an entry with `SYSLOG_IDENTIFIER=agent-monitor` and `AGENT_ID`/`VERDICT`
//! fields of its choosing, so the fields we write prove nothing. Queries must match journald's
//! trusted fields, which journald sets from the sender's kernel credentials (see
//! [`own_entries_query`]).

use libsystemd::logging::{Priority, journal_send};

use super::storm::StormSummary;
use super::{Field, FieldValue, Sink, SinkError, action_fields};
use crate::action::{Action, Verdict};

/// `SYSLOG_IDENTIFIER` of every entry (what `journalctl -t` matches).
pub const SYSLOG_IDENTIFIER: &str = "agent-monitor";

/// `MESSAGE_ID`s of every kind of entry the daemon writes; `packaging/agent-monitor.catalog`
/// explains each (install it in `/usr/lib/systemd/catalog/` and run `journalctl --update-catalog`,
/// then `journalctl -x` shows the explanation). They never change once released.
pub mod message_id {
    pub const ACTION_ALLOWED: &str = "0fb0ec2aa4d847c4a491d52abccaf50a";
    pub const ACTION_DENIED: &str = "5d59276407424888bc69e2683d35856b";
    pub const ACTION_ALERT: &str = "33cdc5c5996243bcb32d0889ef0260c3";
    /// Identical denials or alerts aggregated into one entry (count and window in the fields).
    pub const REPEATED_ACTIONS: &str = "3108a85902c74570b117651be139bfc7";
    /// Enforcement active: the daemon installed or adopted its programs and serves.
    pub const ENFORCEMENT_ACTIVE: &str = "3649d9819dc3408b9b41c358453489f7";
    /// A restarted daemon adopted pinned programs; says how long it was away and what was lost.
    pub const ADOPTED: &str = "0474ba54449a47e08c96ff618b9ecec3";
    pub const RELOAD_APPLIED: &str = "12d9e75a15f04e76ae3abad39c5d3b1b";
    pub const RELOAD_FAILED: &str = "b0a0e56e4b794526a45c061afb6ed4c5";
    /// Kernel records lost (ring buffer full), once per burst with the count.
    pub const RECORDS_LOST: &str = "f9ff6c47a97e42e6b656a0e927b0150f";
    /// Addresses of an allowed DNS answer an agent was not given (non-public, or over its
    /// learned-address limit); rate-limited per agent and kind.
    pub const DNS_WITHHELD: &str = "fc147e30ec8643468e477fb1c10bcdbe";
    /// The daemon stops; pinned enforcement continues without it.
    pub const STOPPING: &str = "6dd3bf0c09fa4612a800860c1e2c0a29";
    /// An agent command was started with every capability of root (`run --keep-capabilities`).
    pub const CAPABILITIES_KEPT: &str = "9fae3a6167374aa4a33de186d13699a3";
    /// The hash chain head of the JSON audit trail (`audit verify --head`), at intervals and at
    /// every rotation.
    pub const AUDIT_CHAIN_HEAD: &str = "858ddc9a713a495cbbc0227a5b02e866";
    /// A held request of an ask-mode agent, and how it ended (VERDICT=pending|approved|denied|
    /// timeout|withdrawn, REQUEST_ID, APPROVER, DECISION_SCOPE).
    pub const ASK_REQUEST: &str = "4b1d7e2c9a3f4e5d8c6b0a1f2e3d4c5b";
    /// A network entry of a policy that does not do what it seems next to request rules (what
    /// `policy check` warns about), once per load of a changed policy set (POLICY_FILE,
    /// POLICY_LINE, AGENT).
    pub const POLICY_REQUEST_WARNING: &str = "e36e471eda2249c485a5b1fc41ca3676";
}

/// `MESSAGE_ID` of an action entry.
pub fn action_message_id(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allowed => message_id::ACTION_ALLOWED,
        Verdict::Denied => message_id::ACTION_DENIED,
        Verdict::Alert => message_id::ACTION_ALERT,
    }
}

/// Writes one daemon event (not an action) to journald with its `MESSAGE_ID` and extra fields.
/// The daemon sends these as notices (see [`super::notice`]), which log a failure.
pub fn event(
    id: &str,
    priority: Priority,
    message: &str,
    fields: &[(&str, String)],
) -> Result<(), libsystemd::errors::SdError> {
    let mut all = vec![
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.to_string()),
        ("MESSAGE_ID", id.to_string()),
    ];
    all.extend(fields.iter().map(|(k, v)| (*k, without_nul(v.clone()))));
    journal_send(priority, message, all.into_iter())
}

/// The `journalctl` command (without further matches) that selects the entries the daemon
/// running as `exe` wrote and no forgery: `_UID=0` (the sender's uid from `SCM_CREDENTIALS`; a
/// process can claim another only with `CAP_SETUID`/`CAP_SYS_ADMIN`), `_EXE` (journald reads
/// `/proc/PID/exe` of that pid: a sender cannot choose it, unlike `_COMM` or `_CMDLINE`), and
/// under systemd `_SYSTEMD_UNIT` (from the sender's cgroup; agents live in their own cgroups).
/// `SYSLOG_IDENTIFIER` stays for readability only: anyone can set it.
pub fn own_entries_query(exe: &str, unit: Option<&str>) -> String {
    let mut q = format!("journalctl _UID=0 _EXE={}", shell_word(exe));
    if let Some(unit) = unit {
        q.push_str(&format!(" _SYSTEMD_UNIT={}", shell_word(unit)));
    }
    q.push_str(" -t ");
    q.push_str(SYSLOG_IDENTIFIER);
    q
}

/// [`own_entries_query`] for this process: its executable as journald will read it (a binary
/// replaced on disk reads `PATH (deleted)`, and so does `_EXE`) and its systemd service, if any.
pub fn this_process_query() -> String {
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/usr/local/bin/agent-monitor".to_string());
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own_entries_query(&exe, systemd_service(&cgroup).as_deref())
}

/// The systemd service whose cgroup holds the process, from `/proc/self/cgroup` (the v2 line
/// `0::/system.slice/NAME.service/…`), as journald derives `_SYSTEMD_UNIT`. Only a `.service`:
/// a session `.scope` also holds the operator's shell and whatever it starts.
pub fn systemd_service(proc_cgroup: &str) -> Option<String> {
    let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let unit = path
        .split('/')
        .find(|c| !c.is_empty() && !c.ends_with(".slice"))?;
    unit.ends_with(".service").then(|| unit.to_string())
}

/// `text` as one shell word (quoted only when it needs to be).
fn shell_word(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@,=".contains(&b))
    {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Journald priority of a verdict.
///
/// - alert → err (3): an action that is not on the allowlist actually happened (alert mode); the
///   operator has something to look at.
/// - denied → warning (4): the kernel stopped it, so nothing happened, but the agent tried
///   something it may not do.
/// - allowed → info (6): normal operation, only journaled when asked for.
pub fn priority(verdict: Verdict) -> Priority {
    match verdict {
        Verdict::Alert => Priority::Error,
        Verdict::Denied => Priority::Warning,
        Verdict::Allowed => Priority::Info,
    }
}

/// The journald fields of `action`: `SYSLOG_IDENTIFIER` first, then every applicable [`Field`]
/// (absent ones are left out), `MESSAGE` last. `PRIORITY` is not included: it travels separately
/// (see [`priority`]). Values never contain NUL (replaced by U+FFFD); newlines are kept, the native
/// protocol carries them.
pub fn journal_fields(action: &Action) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.to_string()),
        ("MESSAGE_ID", action_message_id(action.verdict).to_string()),
    ];
    for (field, value) in action_fields(action) {
        let Some(value) = value else { continue };
        let text = match value {
            FieldValue::Text(t) => t.into_owned(),
            FieldValue::Number(n) => n.to_string(),
            FieldValue::Chain(_) => action.chain_string(),
        };
        fields.push((field.journal_name(), without_nul(text)));
    }
    fields
}

fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Sends to the journald socket `/run/systemd/journal/socket`. If that socket is absent, `emit`
/// fails (the caller counts it); nothing is buffered.
#[derive(Debug, Default)]
pub struct JournaldSink {
    _private: (),
}

impl JournaldSink {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Sink for JournaldSink {
    fn name(&self) -> &'static str {
        "journald"
    }

    fn emit(&mut self, action: &Action) -> Result<(), SinkError> {
        send(action, journal_fields(action))
    }

    fn emit_summary(&mut self, s: &StormSummary) -> Result<(), SinkError> {
        send(&s.sample, summary_fields(s))
    }
}

/// The journald entry for `count` actions like `sample` that were kept out of journald between
/// `first` and `last` (see `storm`): the sample's fields, `MESSAGE_ID` of a repeat, `REPEAT_COUNT`,
/// `REPEAT_FIRST` and `REPEAT_LAST` (RFC 3339), and a message saying so.
pub fn summary_fields(s: &StormSummary) -> Vec<(&'static str, String)> {
    let rfc3339 = |t: std::time::SystemTime| {
        time::OffsetDateTime::from(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut fields = journal_fields(&s.sample);
    for (k, v) in fields.iter_mut() {
        match *k {
            "MESSAGE_ID" => *v = message_id::REPEATED_ACTIONS.to_string(),
            "MESSAGE" => {
                *v = format!(
                    "{} more identical {} between {} and {} (every one is in the JSON audit trail): {}",
                    s.count,
                    if s.sample.verdict == Verdict::Alert {
                        "alerts"
                    } else {
                        "denials"
                    },
                    rfc3339(s.first),
                    rfc3339(s.last),
                    s.sample.message()
                )
            }
            _ => {}
        }
    }
    fields.push(("REPEAT_COUNT", s.count.to_string()));
    fields.push(("REPEAT_FIRST", rfc3339(s.first)));
    fields.push(("REPEAT_LAST", rfc3339(s.last)));
    fields
}

fn send(action: &Action, mut fields: Vec<(&'static str, String)>) -> Result<(), SinkError> {
    {
        // libsystemd takes MESSAGE (and PRIORITY) as arguments and silently drops them, and any
        // name it considers invalid, from the field list; the names are checked in the tests.
        let message_at = fields
            .iter()
            .position(|(k, _)| *k == Field::Message.journal_name());
        let message = match message_at {
            Some(i) => fields.remove(i).1,
            None => String::new(),
        };
        journal_send(priority(action.verdict), &message, fields.into_iter())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::action::Object;
    use crate::output::tests::{connect_action, exec_action};

    fn get<'a>(fields: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        let mut hits = fields.iter().filter(|(k, _)| *k == name);
        let hit = hits.next().map(|(_, v)| v.as_str());
        assert!(hits.next().is_none(), "{name} appears twice");
        hit
    }

    /// journald's rule (journal_field_valid): 1-64 bytes of `[A-Z0-9_]`, not starting with `_` or a
    /// digit. libsystemd drops invalid names without an error, so they must be caught here.
    fn valid_journal_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    }

    #[test]
    fn every_name_is_a_valid_user_field() {
        assert!(valid_journal_name("SYSLOG_IDENTIFIER"));
        for f in Field::ALL {
            assert!(valid_journal_name(f.journal_name()), "{f:?}");
        }
        assert!(!valid_journal_name("_PID") && !valid_journal_name("agent_id"));
    }

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let ids = [
            message_id::ACTION_ALLOWED,
            message_id::ACTION_DENIED,
            message_id::ACTION_ALERT,
            message_id::REPEATED_ACTIONS,
            message_id::ENFORCEMENT_ACTIVE,
            message_id::ADOPTED,
            message_id::RELOAD_APPLIED,
            message_id::RELOAD_FAILED,
            message_id::RECORDS_LOST,
            message_id::DNS_WITHHELD,
            message_id::STOPPING,
            message_id::AUDIT_CHAIN_HEAD,
            message_id::POLICY_REQUEST_WARNING,
        ];
        for id in ids {
            assert!(
                id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
        }
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        // Every id is explained in the catalog shipped with the unit.
        let catalog = include_str!("../../../packaging/agent-monitor.catalog");
        for id in ids {
            assert!(
                catalog.contains(&format!("-- {id}")),
                "{id} missing from the catalog"
            );
        }
    }

    #[test]
    fn repeat_summary_keeps_the_fields_and_says_how_many() {
        let a = connect_action();
        let s = StormSummary {
            count: 41,
            first: a.time,
            last: a.time + std::time::Duration::from_secs(9),
            sample: a,
        };
        let f = summary_fields(&s);
        assert_eq!(get(&f, "MESSAGE_ID"), Some(message_id::REPEATED_ACTIONS));
        assert_eq!(get(&f, "AGENT_ID"), Some("coder"));
        assert_eq!(get(&f, "VERDICT"), Some("denied"));
        assert_eq!(get(&f, "REPEAT_COUNT"), Some("41"));
        let msg = get(&f, "MESSAGE").unwrap();
        assert!(
            msg.starts_with("41 more identical denials between "),
            "{msg}"
        );
    }

    #[test]
    fn connect_maps_every_field() {
        let a = connect_action();
        let f = journal_fields(&a);
        let expected = [
            ("SYSLOG_IDENTIFIER", "agent-monitor"),
            ("MESSAGE_ID", message_id::ACTION_DENIED),
            ("AGENT_ID", "coder"),
            ("AGENT_SPIFFE_ID", "spiffe://host.example/agent/coder"),
            ("TASK_ID", "t-42"),
            ("ACTION", "connect"),
            ("VERDICT", "denied"),
            ("PID", "4242"),
            ("AGENT_UID", "1000"),
            ("COMM", "curl"),
            ("EXE", "/usr/bin/curl"),
            ("DEST_ADDR", "10.1.2.3"),
            ("DEST_PORT", "443"),
            ("DEST_TRANSPORT", "tcp"),
            ("DEST_HOST", "api.example.com"),
            (
                "PROCESS_CHAIN",
                "4000:/usr/bin/python3 > 4100:/bin/sh \"-c curl https://10.1.2.3\" > 4242:/usr/bin/curl",
            ),
            ("ENFORCEMENT", "eperm"),
            ("REASON", "no network rule matches 10.1.2.3:443"),
            (
                "MESSAGE",
                "agent coder task t-42: connect tcp 10.1.2.3:443 (api.example.com) by pid 4242 (curl): DENIED",
            ),
        ];
        let got: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(got, expected);
        assert_eq!(get(&f, "MESSAGE"), Some(a.message().as_str()));
        assert_eq!(get(&f, "PROCESS_CHAIN"), Some(a.chain_string().as_str()));
    }

    #[test]
    fn exec_has_no_destination_fields() {
        let f = journal_fields(&exec_action());
        assert_eq!(get(&f, "ACTION"), Some("exec"));
        assert_eq!(get(&f, "VERDICT"), Some("alert"));
        assert_eq!(get(&f, "EXE"), Some("/usr/bin/nc"));
        assert_eq!(get(&f, "COMM"), Some("sh"));
        for absent in ["DEST_ADDR", "DEST_PORT", "DEST_TRANSPORT", "ENFORCEMENT"] {
            assert_eq!(get(&f, absent), None, "{absent}");
        }
        assert!(get(&f, "MESSAGE").unwrap().contains("exec /usr/bin/nc"));
    }

    #[test]
    fn exec_killed_reports_enforcement() {
        let a = Action {
            verdict: Verdict::Denied,
            enforcement: Some("sigkill"),
            ..exec_action()
        };
        assert_eq!(get(&journal_fields(&a), "ENFORCEMENT"), Some("sigkill"));
    }

    #[test]
    fn ipv6_destination_is_a_bare_address() {
        let mut a = connect_action();
        let Object::Connect(t) = &mut a.object else {
            panic!("not a connect")
        };
        t.destination.addr = IpAddr::V6(Ipv6Addr::LOCALHOST);
        t.destination.port = 8080;
        let f = journal_fields(&a);
        assert_eq!(get(&f, "DEST_ADDR"), Some("::1"));
        assert_eq!(get(&f, "DEST_PORT"), Some("8080"));
        assert!(get(&f, "MESSAGE").unwrap().contains("[::1]:8080"));
    }

    #[test]
    fn unknown_exe_is_left_out() {
        let a = Action {
            exe: None,
            ..connect_action()
        };
        let f = journal_fields(&a);
        assert_eq!(get(&f, "EXE"), None);
        assert_eq!(get(&f, "COMM"), Some("curl"));
    }

    #[test]
    fn an_action_without_destination_has_no_dest_fields() {
        // (A connect always has one: its object is the destination.)
        let a = Action {
            object: Object::Control,
            ..connect_action()
        };
        let f = journal_fields(&a);
        assert_eq!(get(&f, "DEST_ADDR"), None);
        assert_eq!(get(&f, "DEST_PORT"), None);
        assert_eq!(get(&f, "DEST_TRANSPORT"), None);
    }

    #[test]
    fn nul_is_replaced_newline_kept() {
        let a = Action {
            comm: "a\0b".into(),
            reason: "line one\nline two".into(),
            ..connect_action()
        };
        let f = journal_fields(&a);
        assert!(f.iter().all(|(_, v)| !v.contains('\0')));
        assert_eq!(get(&f, "COMM"), Some("a\u{FFFD}b"));
        assert_eq!(get(&f, "REASON"), Some("line one\nline two"));
    }

    #[test]
    fn priority_matches_verdict() {
        assert_eq!(u8::from(priority(Verdict::Alert)), 3);
        assert_eq!(u8::from(priority(Verdict::Denied)), 4);
        assert_eq!(u8::from(priority(Verdict::Allowed)), 6);
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        if std::path::Path::new(libsystemd::logging::SD_JOURNAL_SOCK_PATH).exists() {
            eprintln!("journald socket present; skipping the missing-socket case");
            return;
        }
        let err = JournaldSink::new().emit(&connect_action()).unwrap_err();
        assert!(matches!(err, SinkError::Journald(_)), "{err:?}");
    }

    #[test]
    fn the_query_matches_trusted_fields_only() {
        assert_eq!(
            own_entries_query("/usr/local/bin/agent-monitor", None),
            "journalctl _UID=0 _EXE=/usr/local/bin/agent-monitor -t agent-monitor"
        );
        assert_eq!(
            own_entries_query(
                "/usr/local/bin/agent-monitor (deleted)",
                Some("agent-monitor.service")
            ),
            "journalctl _UID=0 _EXE='/usr/local/bin/agent-monitor (deleted)' \
             _SYSTEMD_UNIT=agent-monitor.service -t agent-monitor"
        );
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn the_service_comes_from_the_v2_cgroup_line() {
        let unit = |text: &str| systemd_service(text);
        assert_eq!(
            unit("1:name=systemd:/\n0::/system.slice/agent-monitor.service\n").as_deref(),
            Some("agent-monitor.service")
        );
        assert_eq!(
            unit("0::/system.slice/agent-monitor.service/sub\n").as_deref(),
            Some("agent-monitor.service")
        );
        // A login session's scope holds the operator's shell too; the root is no unit.
        assert_eq!(unit("0::/user.slice/user-0.slice/session-3.scope\n"), None);
        assert_eq!(unit("0::/\n"), None);
        assert_eq!(unit(""), None);
    }
}
