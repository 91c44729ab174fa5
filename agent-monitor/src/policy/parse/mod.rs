//! Reading one policy file: the raw TOML shape and its validation into the model, with errors that
//! name the file, line, column, value and what was expected.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::policy::dns::DnsSettings;
use crate::policy::host::{self, HostRule};
use crate::policy::model::{ExecRule, Mode, NetRule, Policy};
use crate::policy::selectors::{
    At, Executable, Selectors, check_cgroup, check_executable_path, check_uid, check_unit,
    parse_sha256,
};

mod exec;
mod files;
mod http;
mod issue;
mod location;
mod network;
#[cfg(test)]
mod tests;
mod unix;

pub(crate) use exec::parse_exec;
#[cfg(test)]
pub(crate) use files::parse_file_entry;
pub use issue::{Issue, PolicyError, Reason};
pub(crate) use location::LineIndex;
pub use location::Location;
use network::parse_ports;
pub(crate) use network::{parse_net, valid_net_entry};
pub(crate) use unix::parse_unix_name;

/// Longest agent name: it becomes a cgroup directory name and a journald field value.
pub const AGENT_NAME_MAX: usize = 63;

/// The file as written. Unknown keys are errors so a typo never silently allows or denies.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    agent: Spanned<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<http::RawNetwork>,
    #[serde(default)]
    exec: Option<RawAllow>,
    #[serde(default)]
    identity: Option<RawIdentity>,
    #[serde(default)]
    dns: Option<RawDns>,
    #[serde(default)]
    files: Option<files::RawFiles>,
    unix: Option<unix::RawUnix>,
}

/// `[dns]`: the agent's share of the learned-address map and its DNS-rebinding opt-in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    #[serde(default)]
    max_learned: Option<Spanned<i64>>,
    #[serde(default)]
    private_answers: Vec<Spanned<String>>,
}

/// `[identity]`: the selectors that make processes started elsewhere this agent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    #[serde(default)]
    uids: Vec<Spanned<u32>>,
    #[serde(default)]
    systemd_units: Vec<Spanned<String>>,
    #[serde(default)]
    cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    executables: Vec<Spanned<RawExecutable>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExecutable {
    path: Spanned<String>,
    sha256: Spanned<String>,
}

/// `[network]` or `[exec]`. Each entry keeps its span so errors point at it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAllow {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

/// A raw policy with the text and file name its spans refer to.
pub(crate) struct RawFile<'a> {
    pub raw: RawPolicy,
    pub text: &'a str,
    pub origin: &'a Path,
}

impl Policy {
    /// Parses and validates one policy file. `origin` only names the file in errors; nothing is read.
    pub fn parse(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| toml_issue(&e, text, origin))?;
        Policy::try_from(RawFile { raw, text, origin })
    }
}

/// Why a grant given on the command line is not a grant rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantRuleError {
    #[error("--allow-connect {text:?}: {reason}")]
    Connect { text: String, reason: Reason },
    #[error("--allow-exec {text:?}: {reason}")]
    Exec { text: String, reason: Reason },
}

/// Grants given on the command line (`task start --allow-connect ADDR --allow-exec PATH`), in the
/// policy's own entry syntax; the error names the option and value and says what was expected.
pub fn parse_grants(
    connect: &[String],
    exec: &[String],
) -> Result<(Vec<NetRule>, Vec<ExecRule>), GrantRuleError> {
    let mut net = Vec::new();
    for text in connect {
        let (addr, prefix_len, ports) =
            parse_net(text).map_err(|reason| GrantRuleError::Connect {
                text: text.clone(),
                reason,
            })?;
        net.push(NetRule {
            net: addr,
            prefix_len,
            ports,
            text: text.clone(),
            line: 0,
        });
    }
    let mut rules = Vec::new();
    for text in exec {
        let (path, prefix_glob) = parse_exec(text).map_err(|reason| GrantRuleError::Exec {
            text: text.clone(),
            reason,
        })?;
        rules.push(ExecRule {
            path,
            prefix_glob,
            text: text.clone(),
            line: 0,
        });
    }
    Ok((net, rules))
}

fn toml_issue(err: &toml::de::Error, text: &str, origin: &Path) -> Issue {
    let at = match err.span() {
        Some(span) => Location::at(origin, text, span.start),
        None => Location {
            origin: origin.to_path_buf(),
            line_col: None,
        },
    };
    // Some TOML messages span lines ("invalid table header\nexpected ..."); keep one problem per line.
    let message: Vec<&str> = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Issue::Toml {
        at,
        message: message.join("; "),
    }
}

impl TryFrom<RawFile<'_>> for Policy {
    type Error = PolicyError;

    /// Validates every value and reports every problem, not only the first.
    fn try_from(file: RawFile<'_>) -> Result<Policy, PolicyError> {
        let RawFile { raw, text, origin } = file;
        let lines = LineIndex::new(text, origin);
        let mut issues = Vec::new();
        let mut check = |field: String, value: &Spanned<String>, reason: Reason| {
            issues.push(Issue::Value {
                at: lines.location(value.span().start),
                field,
                value: value.get_ref().clone(),
                reason,
            });
        };

        if let Err(reason) = check_agent_name(raw.agent.get_ref()) {
            check("agent".into(), &raw.agent, reason);
        }

        let mode = match &raw.mode {
            None => Mode::default(),
            Some(m) => match m.get_ref().as_str() {
                "enforce" => Mode::Enforce,
                "alert" => Mode::Alert,
                "ask" => Mode::Ask,
                _ => {
                    check("mode".into(), m, Reason::BadMode);
                    Mode::default()
                }
            },
        };

        let mut network = Vec::new();
        let mut hosts = Vec::new();
        let raw_network = raw.network.unwrap_or_default();
        for (i, entry) in raw_network.allow.iter().enumerate() {
            if host::is_host_entry(entry.get_ref()) {
                match host::parse_host_entry(entry.get_ref(), parse_ports) {
                    Ok((pattern, ports)) => hosts.push(HostRule {
                        pattern,
                        ports,
                        text: entry.get_ref().clone(),
                        line: lines.line_col(entry.span().start).0,
                    }),
                    Err(reason) => check(format!("network.allow[{i}]"), entry, reason),
                }
                continue;
            }
            match parse_net(entry.get_ref()) {
                Ok((net, prefix_len, ports)) => network.push(NetRule {
                    net,
                    prefix_len,
                    ports,
                    text: entry.get_ref().clone(),
                    line: lines.line_col(entry.span().start).0,
                }),
                Err(reason) => check(format!("network.allow[{i}]"), entry, reason),
            }
        }

        let mut exec = Vec::new();
        for (i, entry) in raw.exec.unwrap_or_default().allow.iter().enumerate() {
            match parse_exec(entry.get_ref()) {
                Ok((path, prefix_glob)) => exec.push(ExecRule {
                    path,
                    prefix_glob,
                    text: entry.get_ref().clone(),
                    line: lines.line_col(entry.span().start).0,
                }),
                Err(reason) => check(format!("exec.allow[{i}]"), entry, reason),
            }
        }

        let mut selectors = Selectors::default();
        let identity = raw.identity.unwrap_or_default();
        // Kept apart while `check` borrows `issues`; added in file order below.
        let mut uid_issues = Vec::new();
        for (i, uid) in identity.uids.iter().enumerate() {
            let at = lines.location(uid.span().start);
            match check_uid(*uid.get_ref()) {
                Ok(()) => selectors.uids.push(At {
                    value: *uid.get_ref(),
                    at,
                }),
                Err(reason) => uid_issues.push(Issue::Value {
                    at,
                    field: format!("identity.uids[{i}]"),
                    value: uid.get_ref().to_string(),
                    reason,
                }),
            }
        }
        for (i, unit) in identity.systemd_units.iter().enumerate() {
            match check_unit(unit.get_ref()) {
                Ok(()) => selectors.systemd_units.push(At {
                    value: unit.get_ref().clone(),
                    at: lines.location(unit.span().start),
                }),
                Err(reason) => check(format!("identity.systemd_units[{i}]"), unit, reason),
            }
        }
        for (i, cg) in identity.cgroups.iter().enumerate() {
            match check_cgroup(cg.get_ref()) {
                Ok(()) => selectors.cgroups.push(At {
                    value: cg.get_ref().clone(),
                    at: lines.location(cg.span().start),
                }),
                Err(reason) => check(format!("identity.cgroups[{i}]"), cg, reason),
            }
        }
        for (i, exe) in identity.executables.iter().enumerate() {
            let raw_exe = exe.get_ref();
            let path_ok = check_executable_path(raw_exe.path.get_ref())
                .map_err(|r| check(format!("identity.executables[{i}].path"), &raw_exe.path, r))
                .is_ok();
            let digest = parse_sha256(raw_exe.sha256.get_ref())
                .map_err(|r| {
                    check(
                        format!("identity.executables[{i}].sha256"),
                        &raw_exe.sha256,
                        r,
                    )
                })
                .ok();
            if let (true, Some(sha256)) = (path_ok, digest) {
                selectors.executables.push(At {
                    value: Executable {
                        path: raw_exe.path.get_ref().clone(),
                        sha256,
                    },
                    at: lines.location(raw_exe.path.span().start),
                });
            }
        }

        issues.extend(uid_issues);
        let (egress, implied_hosts) = http::parse_request_rules(&raw_network, &lines, &mut issues);
        hosts.extend(implied_hosts);

        let raw_dns = raw.dns.unwrap_or_default();
        let mut dns = DnsSettings::default();
        if let Some(n) = &raw_dns.max_learned {
            match u32::try_from(*n.get_ref()) {
                Ok(v) if (1..=crate::policy::dns::LEARNED_BUDGET).contains(&v) => {
                    dns.max_learned = Some(v)
                }
                _ => issues.push(Issue::Value {
                    at: lines.location(n.span().start),
                    field: "dns.max_learned".into(),
                    value: n.get_ref().to_string(),
                    reason: Reason::LearnedLimit,
                }),
            }
        }
        for (i, entry) in raw_dns.private_answers.iter().enumerate() {
            let parsed = if entry.get_ref().contains(':') {
                Err(Reason::PatternWithPort)
            } else {
                host::parse_host_pattern(entry.get_ref())
            };
            match parsed {
                Ok(pattern) => dns.private_answers.push((pattern, entry.get_ref().clone())),
                Err(reason) => issues.push(Issue::Value {
                    at: lines.location(entry.span().start),
                    field: format!("dns.private_answers[{i}]"),
                    value: entry.get_ref().clone(),
                    reason,
                }),
            }
        }

        let files = files::parse_files(raw.files, &lines, &mut issues);
        let unix = raw
            .unix
            .and_then(|u| unix::parse_unix(u, text, &lines, &mut issues));

        if !issues.is_empty() {
            return Err(PolicyError::new(issues));
        }
        Ok(Policy {
            unix,
            dns,
            selectors,
            defined_at: lines.location(raw.agent.span().start),
            agent: raw.agent.into_inner(),
            mode,
            network,
            hosts,
            exec,
            index: Default::default(),
            files,
            egress,
        })
    }
}

/// Agent names become cgroup directory names and journald field values, hence the small alphabet.
fn check_agent_name(name: &str) -> Result<(), Reason> {
    let mut chars = name.chars();
    let first = chars.next().ok_or(Reason::AgentEmpty)?;
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(Reason::AgentBadStart(first));
    }
    if let Some(bad) = chars
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Reason::AgentBadChar(bad));
    }
    // Checked after the alphabet so the length is in characters and bytes alike.
    if name.len() > AGENT_NAME_MAX {
        return Err(Reason::AgentTooLong { len: name.len() });
    }
    Ok(())
}
