//! Replaying recorded actions through the daemon's own evaluator (`Policy::check_connect`,
//! `Policy::check_exec`): which of them would a policy not allow?

use std::collections::BTreeMap;
use std::fmt;

use crate::learn::audit::{Recorded, What};
use crate::policy::model::Mode;
use crate::policy::{Decision, Policy, PolicySet};

/// Why an exec whose path the kernel could not read in full is never allowed.
pub const INCOMPLETE_PATH: &str = "the kernel could not read the whole path when this was recorded; \
     it cannot match any rule";

/// The evaluator's answer for one recorded action; `None` for a kind this version cannot judge.
pub fn judge(policy: &Policy, what: &What) -> Option<Decision> {
    match what {
        What::Connect { addr, port, host } => {
            let by_addr = policy.check_connect(*addr, *port);
            // A connect to an address the agent resolved through the DNS proxy (the trail names
            // the host) is also allowed by a host rule for that name and port.
            Some(match host {
                Some(h) if !by_addr.allowed => {
                    let by_name = policy.check_resolved(h, *port);
                    if by_name.allowed {
                        crate::learn::requests::through_endpoint(policy, h, *port, by_name)
                    } else {
                        by_addr
                    }
                }
                _ => by_addr,
            })
        }
        What::Exec { path, complete } => Some(if *complete {
            policy.check_exec(path)
        } else {
            Decision {
                allowed: false,
                reason: INCOMPLETE_PATH.into(),
            }
        }),
        What::Other { .. } => None,
        What::Open { path } => Some(judge_open(policy, path, homes())),
        What::Unix { path } => Some(policy.check_unix(path)),
        // The name only: method and path are judged per request by interception.
        What::Egress { name, port, .. } => Some(match name {
            Some(n) => {
                let verdict = policy.egress().judge_name(n, *port);
                Decision {
                    allowed: verdict != crate::policy::http::NameVerdict::NoRule,
                    reason: verdict.to_string(),
                }
            }
            None => Decision {
                allowed: false,
                reason: "no server name (SNI) or Host was recorded".into(),
            },
        }),
        What::Request(r) => Some(crate::learn::requests::judge_request(policy, r)),
    }
}

/// An open is judged by name against `[files]` (the daemon judges the file itself, so a hard
/// link or bind mount recorded under its own name may be judged allowed here).
fn judge_open(policy: &Policy, path: &str, homes: &[String]) -> Decision {
    match policy.files().denying(path, homes) {
        Some(rule) => Decision {
            allowed: false,
            reason: format!("denied by {}", rule.describe()),
        },
        None => Decision {
            allowed: true,
            reason: "no [files] rule names it".into(),
        },
    }
}

/// The home directories `~/` entries stand for: this host's /etc/passwd, plus /root.
fn homes() -> &'static [String] {
    static HOMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    HOMES.get_or_init(|| {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        crate::policy::files::homes_from_passwd(&passwd)
    })
}

/// A recorded action the policy does not allow.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding<'a> {
    pub record: &'a Recorded,
    /// The policy's mode: in enforce mode the action would be denied, in alert mode reported.
    pub mode: Mode,
    pub reason: String,
}

impl fmt::Display for Finding<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.record;
        let outcome = match self.mode {
            Mode::Enforce => "would be DENIED",
            Mode::Alert => "would raise an ALERT (alert mode)",
            Mode::Ask => "would be HELD for a decision (ask mode)",
        };
        write!(f, "agent {} task {}: {}", r.agent, r.task, r.what)?;
        if !r.chain.is_empty() {
            write!(f, " by {}", r.chain.join(" > "))?;
        }
        write!(
            f,
            ": {outcome}: {} (recorded as {})",
            self.reason, r.verdict
        )
    }
}

/// What a replay found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replay<'a> {
    /// Actions judged (known kinds of agents that have a policy).
    pub judged: u64,
    /// In trail order.
    pub not_allowed: Vec<Finding<'a>>,
    /// Actions of agents the policies do not name, per agent.
    pub other_agents: BTreeMap<String, u64>,
    /// Actions of kinds this version cannot judge, per kind.
    pub unknown_kinds: BTreeMap<String, u64>,
    /// Actions recorded as `denied` that the policy would allow, in trail order, with the rule.
    pub now_allowed: Vec<(&'a Recorded, String)>,
}

/// Replays `actions` against the policy of each one's agent.
pub fn replay<'a>(set: &PolicySet, actions: impl IntoIterator<Item = &'a Recorded>) -> Replay<'a> {
    let mut out = Replay::default();
    for r in actions {
        let Some(policy) = set.get(&r.agent) else {
            *out.other_agents.entry(r.agent.clone()).or_insert(0) += 1;
            continue;
        };
        note(&mut out, policy, r);
    }
    out
}

/// Replays the actions of `policy`'s agent only; others are counted.
pub fn replay_policy<'a>(
    policy: &Policy,
    actions: impl IntoIterator<Item = &'a Recorded>,
) -> Replay<'a> {
    let mut out = Replay::default();
    for r in actions {
        if r.agent == policy.agent() {
            note(&mut out, policy, r);
        } else {
            *out.other_agents.entry(r.agent.clone()).or_insert(0) += 1;
        }
    }
    out
}

fn note<'a>(out: &mut Replay<'a>, policy: &Policy, r: &'a Recorded) {
    match judge(policy, &r.what) {
        None => {
            if let What::Other { kind } = &r.what {
                *out.unknown_kinds.entry(kind.clone()).or_insert(0) += 1;
            }
        }
        Some(d) => {
            out.judged += 1;
            if d.allowed && r.verdict == "denied" {
                out.now_allowed.push((r, d.reason));
            } else if !d.allowed {
                out.not_allowed.push(Finding {
                    record: r,
                    mode: policy.mode(),
                    reason: d.reason,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::learn::audit::tests::{connect_line, exec_line, read};

    fn policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn lists_what_the_policy_would_not_allow_with_lines() {
        let audit = read(
            &[
                connect_line("coder", "t1", "127.0.0.1", 8080, ""),
                connect_line("coder", "t1", "127.0.0.1", 9999, ""),
                exec_line("coder", "t1", "/bin/true", "2026-11-29T12:00:00Z"),
                exec_line("coder", "t2", "/usr/bin/id", "2026-11-29T12:00:00Z"),
                exec_line("other", "t1", "/usr/bin/id", "2026-11-29T12:00:00Z"),
                connect_line("coder", "t1", "10.0.0.1", 53, "").replace("\"connect\"", "\"dns\""),
            ]
            .join("\n"),
        );
        let p = policy(
            "agent = \"coder\"\n[network]\nallow = [\"127.0.0.1:8080\"]\n[exec]\nallow = [\"/bin/*\"]\n",
        );
        let set = PolicySet::new(vec![p.clone()]).unwrap();
        for r in [
            replay(&set, &audit.actions),
            replay_policy(&p, &audit.actions),
        ] {
            assert_eq!(r.judged, 4);
            let lines: Vec<usize> = r.not_allowed.iter().map(|f| f.record.line).collect();
            assert_eq!(lines, [2, 4]);
            assert_eq!(r.other_agents.get("other"), Some(&1));
            assert_eq!(r.unknown_kinds.get("dns"), Some(&1));
            assert_eq!(
                r.not_allowed[0].to_string(),
                "agent coder task t1: connect 127.0.0.1:9999 by /bin/sh > /usr/bin/python3: \
                 would be DENIED: no rule matches (recorded as alert)"
            );
        }
    }

    #[test]
    fn alert_mode_says_alert_and_incomplete_paths_are_never_allowed() {
        let line = exec_line("a", "t", "/bin/tru", "2026-11-29T12:00:00Z").replace(
            "\"reason\":\"no rule matches\"",
            "\"reason\":\"exec path longer than 251 bytes cannot be matched\"",
        );
        let audit = read(&line);
        let p = policy("agent = \"a\"\nmode = \"alert\"\n[exec]\nallow = [\"/*\"]\n");
        let r = replay_policy(&p, &audit.actions);
        assert_eq!(r.not_allowed.len(), 1);
        assert_eq!(r.not_allowed[0].reason, INCOMPLETE_PATH);
        assert!(
            r.not_allowed[0]
                .to_string()
                .contains("would raise an ALERT (alert mode)")
        );
    }

    #[test]
    fn same_verdicts_as_the_evaluator_for_mapped_and_non_normal_paths() {
        let audit = read(
            &[
                connect_line("a", "t", "::ffff:10.1.2.3", 443, ""),
                exec_line("a", "t", "/opt/tools/../../bin/sh", "2026-11-29T12:00:00Z"),
            ]
            .join("\n"),
        );
        let p = policy(
            "agent = \"a\"\n[network]\nallow = [\"10.0.0.0/8:443\"]\n[exec]\nallow = [\"/opt/tools/*\"]\n",
        );
        let r = replay_policy(&p, &audit.actions);
        assert_eq!(r.judged, 2);
        let lines: Vec<usize> = r.not_allowed.iter().map(|f| f.record.line).collect();
        assert_eq!(lines, [2], "the IPv4-mapped connect is the IPv4 one");
        assert!(
            r.not_allowed[0].reason.contains("normal form"),
            "{:?}",
            r.not_allowed[0]
        );
    }

    #[test]
    fn egress_connections_are_judged_on_the_name_they_carried() {
        let tls = |name: &str| {
            connect_line(
                "coder",
                "t1",
                "127.0.0.3",
                443,
                &format!(r#","tls_sni":"{name}""#),
            )
            .replace("\"connect\"", "\"tls\"")
        };
        let audit = read(&[tls("pypi.org"), tls("evil.test")].join("\n"));
        let p = policy("agent = \"coder\"\n[[network.tls]]\nhost = \"pypi.org\"\nport = 443\n");
        assert_eq!(
            judge(&p, &audit.actions[0].what).map(|d| (d.allowed, d.reason)),
            Some((true, "rule \"tls pypi.org:443\"".to_string()))
        );
        let d = judge(&p, &audit.actions[1].what).expect("judged");
        assert!(!d.allowed);
        assert_eq!(d.reason, "no network.http or network.tls rule names it");
        assert_eq!(audit.actions[1].what.to_string(), "tls evil.test:443");
    }
}

#[cfg(test)]
mod open_tests {
    use std::path::Path;

    use super::*;
    use crate::learn::audit::tests::{exec_line, read};

    /// An `open` record as the daemon writes it (an exec line with its kind and file swapped).
    fn open_line(agent: &str, path: &str) -> String {
        exec_line(agent, "t1", "/usr/bin/cat", "2026-12-06T05:00:00Z")
            .replace("\"exec\"", "\"open\"")
            .replacen('{', &format!("{{\"file_path\":{path:?},"), 1)
    }

    #[test]
    fn opens_are_judged_by_name_against_files() {
        let audit = read(
            &[
                open_line("coder", "/etc/shadow"),
                open_line("coder", "/srv/app/.env"),
                open_line("coder", "/srv/app/main.rs"),
            ]
            .join("\n"),
        );
        assert!(audit.problems.is_empty(), "{:?}", audit.problems);
        let text =
            "agent = \"coder\"\n[files]\ndeny = [\"/srv/*/.env\"]\ndeny_known_secrets = true\n";
        let p = Policy::parse(text, Path::new("p.toml")).expect("valid");
        let r = replay_policy(&p, &audit.actions);
        assert_eq!(r.judged, 3);
        let found: Vec<String> = r.not_allowed.iter().map(|f| f.reason.clone()).collect();
        assert_eq!(
            found,
            [
                "denied by files.deny_known_secrets \"/etc/shadow\"",
                "denied by files.deny \"/srv/*/.env\" (line 3)"
            ]
        );
        assert!(r.not_allowed[0].to_string().contains("open /etc/shadow"));
    }
}
