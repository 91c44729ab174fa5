//! Reading one policy file: the raw TOML shape and its validation into the model, with errors that
//! name the file, line, column, value and what was expected.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use agent_monitor_common::{EXEC_PATH_LEN, PortRange};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::policy::dns::DnsSettings;
use crate::policy::host::{self, HostRule};
use crate::policy::model::{ExecRule, Mode, NetRule, Policy, prefix_mask};
use crate::policy::selectors::{
    At, Executable, Selectors, check_cgroup, check_executable_path, check_uid, check_unit,
    parse_sha256,
};

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
    network: Option<RawAllow>,
    #[serde(default)]
    exec: Option<RawAllow>,
    #[serde(default)]
    identity: Option<RawIdentity>,
    #[serde(default)]
    dns: Option<RawDns>,
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

/// A place in a policy file: `policies/coder.toml:7:3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub origin: PathBuf,
    /// 1-based line and column (in characters); `None` when the problem has no position.
    pub line_col: Option<(usize, usize)>,
}

impl Location {
    /// Location of byte `offset` of `text`. Scans `text` up to `offset`: for one place; a file's
    /// many entries go through a [`LineIndex`].
    pub fn at(origin: &Path, text: &str, offset: usize) -> Location {
        Location {
            origin: origin.to_path_buf(),
            line_col: Some(line_col(text, offset)),
        }
    }

    pub fn line(&self) -> usize {
        self.line_col.map_or(0, |(line, _)| line)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin.display())?;
        if let Some((line, col)) = self.line_col {
            write!(f, ":{line}:{col}")?;
        }
        Ok(())
    }
}

/// 1-based line and column of byte `offset`; works on bytes so a bad offset cannot panic.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let col = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, col)
}

/// Where each line of a text starts, so that the line and column of each of a file's entries is
/// found by a binary search rather than a scan from the top (a scan per entry made a 20,000-entry
/// policy take seconds to parse).
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    origin: &'a Path,
    /// Byte offset of the start of each line; `starts[0] == 0`.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str, origin: &'a Path) -> LineIndex<'a> {
        let starts = std::iter::once(0)
            .chain(
                text.bytes()
                    .enumerate()
                    .filter(|&(_, b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        LineIndex {
            text,
            origin,
            starts,
        }
    }

    /// 1-based line and column (in characters) of byte `offset`, as [`line_col`] computes them.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The last line starting at or before `offset`.
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line.saturating_sub(1)];
        let col = self.text.as_bytes()[start..offset]
            .iter()
            .filter(|&&b| b & 0xC0 != 0x80)
            .count()
            + 1;
        (line.max(1), col)
    }

    pub(crate) fn location(&self, offset: usize) -> Location {
        Location {
            origin: self.origin.to_path_buf(),
            line_col: Some(self.line_col(offset)),
        }
    }
}

/// Everything wrong with one or more policy files, one problem per line when displayed.
#[derive(Debug, Error, PartialEq, Eq)]
pub struct PolicyError {
    issues: Vec<Issue>,
}

impl PolicyError {
    pub fn new(issues: Vec<Issue>) -> PolicyError {
        PolicyError { issues }
    }

    pub fn issues(&self) -> &[Issue] {
        &self.issues
    }

    pub fn into_issues(self) -> Vec<Issue> {
        self.issues
    }
}

impl From<Issue> for PolicyError {
    fn from(issue: Issue) -> PolicyError {
        PolicyError::new(vec![issue])
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// One problem in a policy file.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Issue {
    /// TOML syntax, unknown key, wrong type or missing key, as reported by the TOML parser.
    #[error("{at}: {message}")]
    Toml { at: Location, message: String },
    /// A value of the right type that is not valid.
    #[error("{at}: {field} {value:?}: {reason}")]
    Value {
        at: Location,
        /// `agent`, `mode`, `network.allow[2]`, …
        field: String,
        value: String,
        reason: Reason,
    },
    #[error("agent {agent:?} is defined twice: at {first} and at {second}")]
    DuplicateAgent {
        agent: String,
        first: Location,
        second: Location,
    },
    #[error(
        "{second}: {kind} selector {second_value:?} of agent {second_agent:?} overlaps {kind} selector {first_value:?} of agent {first_agent:?} at {first}: a process would match two agents; expected selectors that no two agents share"
    )]
    SelectorConflict {
        kind: &'static str,
        first_agent: String,
        first_value: String,
        first: Location,
        second_agent: String,
        second_value: String,
        second: Location,
    },
}

/// Why a value was rejected; the text says what was expected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Reason {
    #[error(
        "agent name is empty; expected 1-{AGENT_NAME_MAX} characters of [a-z0-9_.-], starting with [a-z0-9]"
    )]
    AgentEmpty,
    #[error("agent name is {len} characters; expected at most {AGENT_NAME_MAX}")]
    AgentTooLong { len: usize },
    #[error("agent name must start with [a-z0-9], not {0:?}")]
    AgentBadStart(char),
    #[error("character {0:?} is not allowed in an agent name; expected [a-z0-9_.-]")]
    AgentBadChar(char),
    #[error("expected \"enforce\" or \"alert\"")]
    BadMode,

    #[error("empty entry; expected ADDR[/PREFIX]:PORT")]
    NetEmpty,
    #[error("missing port; expected ADDR[/PREFIX]:PORT where PORT is N, LO-HI or *")]
    MissingPort,
    #[error("expected ':' and a port after ']'")]
    JunkAfterBracket,
    #[error("missing ']' after the IPv6 address")]
    UnclosedBracket,
    #[error("IPv6 addresses must be in brackets, e.g. [::1]:80 or [fd00::/8]:443")]
    UnbracketedIpv6,
    #[error("IPv4 addresses are written without brackets, e.g. 10.0.0.1:80")]
    BracketedIpv4,
    #[error("host names take no prefix length; expected NAME:PORT or *.NAME:PORT")]
    HostName,
    #[error("'*' is only allowed as the first label, as in *.example.com:443 (subdomains only)")]
    MisplacedWildcard,
    #[error("host name is empty")]
    HostEmpty,
    #[error("host name is {len} characters; expected at most 253")]
    HostTooLong { len: usize },
    #[error("host name has an empty label; expected labels separated by single dots")]
    HostEmptyLabel,
    #[error("label {label:?} is longer than 63 characters")]
    HostLabelTooLong { label: String },
    #[error(
        "character {0:?} is not allowed in a host name; expected labels of [a-z0-9_-] separated by '.'"
    )]
    HostBadChar(char),
    #[error("label {label:?} must not start or end with '-'")]
    HostHyphen { label: String },
    #[error("the last label is all digits: neither a host name nor an IPv4 address")]
    HostNumeric,
    #[error("{0:?} is not a valid IPv4 address; expected a.b.c.d")]
    BadIpv4(String),
    #[error("{0:?} is not a valid IPv6 address")]
    BadIpv6(String),
    #[error("prefix length {0:?} is not a number")]
    BadPrefix(String),
    #[error("prefix length {len} is longer than {max} for {family}")]
    PrefixTooLong {
        len: u64,
        max: u8,
        family: &'static str,
    },
    #[error("host bits are set below the prefix; did you mean {network}?")]
    HostBitsSet { network: String },
    #[error("port {0:?} is not valid; expected N (1-65535), LO-HI or *")]
    BadPort(String),
    #[error("port 0 is not allowed; expected 1-65535 (or * for every port)")]
    PortZero,
    #[error("port {0} is out of range; expected 1-65535")]
    PortTooLarge(String),
    #[error("port range {lo}-{hi} is reversed; expected LO <= HI")]
    PortRangeReversed { lo: u16, hi: u16 },

    #[error("path contains a NUL byte")]
    NulByte,
    #[error("path must be absolute (start with /)")]
    NotAbsolute,
    #[error("'*' is only allowed at the end of a path, as a prefix glob")]
    MisplacedGlob,
    #[error("path must be normalised (no //, /./, /../, or trailing /. or /..)")]
    NotNormalised,
    #[error(
        "an exact path names a file and cannot end with '/'; use a trailing '*' for a directory's contents"
    )]
    TrailingSlash,
    #[error("path is {len} bytes; at most {max} fit in the kernel table")]
    PathTooLong { len: usize, max: usize },

    #[error(
        "expected a systemd unit name such as \"coder-agent.service\" (.service, .scope or .slice)"
    )]
    BadUnit,
    #[error(
        "the cgroup root would select every process; expected a cgroup below it, e.g. \"/agents/coder\""
    )]
    CgroupRoot,
    #[error(
        "agent-monitor's own cgroup tree cannot be selected; `agent-monitor run` places processes there"
    )]
    ReservedCgroup,
    #[error(
        "uid 0 is root: it would select the daemon, PID 1 and the operator's shell (in enforce mode every root exec the policy does not allow, `daemon --uninstall` included, would be killed); expected the agent's own dedicated uid"
    )]
    RootUid,
    #[error(
        "{what} would capture the host: it holds {holds}; expected a unit or cgroup that holds only the agent's processes"
    )]
    HostCgroup {
        what: &'static str,
        holds: &'static str,
    },
    #[error("an executable selector names one file; globs are not allowed")]
    GlobInSelector,
    #[error("expected the file's sha256 as 64 hex digits (sha256sum FILE)")]
    BadSha256,

    #[error("expected 1-{max} (addresses learned from DNS the agent may hold at once)", max = crate::policy::dns::LEARNED_BUDGET)]
    LearnedLimit,
    #[error("expected a host name without a port: NAME or *.NAME")]
    PatternWithPort,
}

impl Policy {
    /// Parses and validates one policy file. `origin` only names the file in errors; nothing is read.
    pub fn parse(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| toml_issue(&e, text, origin))?;
        Policy::try_from(RawFile { raw, text, origin })
    }
}

/// Grants given on the command line (`task start --allow-connect ADDR --allow-exec PATH`), in the
/// policy's own entry syntax; the error names the option and value and says what was expected.
pub fn parse_grants(
    connect: &[String],
    exec: &[String],
) -> Result<(Vec<NetRule>, Vec<ExecRule>), String> {
    let mut net = Vec::new();
    for text in connect {
        let (addr, prefix_len, ports) =
            parse_net(text).map_err(|r| format!("--allow-connect {text:?}: {r}"))?;
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
        let (path, prefix_glob) =
            parse_exec(text).map_err(|r| format!("--allow-exec {text:?}: {r}"))?;
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
                _ => {
                    check("mode".into(), m, Reason::BadMode);
                    Mode::default()
                }
            },
        };

        let mut network = Vec::new();
        let mut hosts = Vec::new();
        for (i, entry) in raw.network.unwrap_or_default().allow.iter().enumerate() {
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

        if !issues.is_empty() {
            return Err(PolicyError::new(issues));
        }
        Ok(Policy {
            dns,
            selectors,
            defined_at: lines.location(raw.agent.span().start),
            agent: raw.agent.into_inner(),
            mode,
            network,
            hosts,
            exec,
            index: Default::default(),
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

/// `ADDR[/PREFIX]:PORTSPEC` → (network as IPv6, prefix length in IPv6 bits, ports).
pub(crate) fn parse_net(text: &str) -> Result<(Ipv6Addr, u8, PortRange), Reason> {
    if text.is_empty() {
        return Err(Reason::NetEmpty);
    }
    let (addr_text, bracketed, port_text) = match text.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']').ok_or(Reason::UnclosedBracket)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(Reason::JunkAfterBracket)?),
            };
            (inside, true, port)
        }
        // Any IPv6 address has at least two colons; a bare one cannot be told apart from its port.
        None if text.matches(':').count() > 1 => return Err(Reason::UnbracketedIpv6),
        None => match text.split_once(':') {
            Some((addr, port)) => (addr, false, Some(port)),
            None => (text, false, None),
        },
    };

    let (ip_text, prefix_text) = match addr_text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (addr_text, None),
    };
    let (net, prefix_len) = if bracketed {
        let ip: Ipv6Addr = ip_text.parse().map_err(|_| {
            if ip_text.parse::<Ipv4Addr>().is_ok() {
                Reason::BracketedIpv4
            } else {
                Reason::BadIpv6(ip_text.to_string())
            }
        })?;
        let len = parse_prefix(prefix_text, 128, "IPv6")?;
        let bits = u128::from(ip);
        if bits & !prefix_mask(len) != 0 {
            let network = Ipv6Addr::from(bits & prefix_mask(len));
            return Err(Reason::HostBitsSet {
                network: format!("[{network}/{len}]"),
            });
        }
        (ip, len)
    } else {
        let ip: Ipv4Addr = ip_text.parse().map_err(|_| {
            if looks_like_host_name(ip_text) {
                Reason::HostName
            } else {
                Reason::BadIpv4(ip_text.to_string())
            }
        })?;
        let len = parse_prefix(prefix_text, 32, "IPv4")?;
        let bits = u32::from(ip);
        let mask = match len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        };
        if bits & !mask != 0 {
            let network = Ipv4Addr::from(bits & mask);
            return Err(Reason::HostBitsSet {
                network: format!("{network}/{len}"),
            });
        }
        // One table serves both families: IPv4 lives at ::ffff:0:0/96.
        (ip.to_ipv6_mapped(), len + 96)
    };

    let ports = match port_text {
        None | Some("") => return Err(Reason::MissingPort),
        Some(spec) => parse_ports(spec)?,
    };
    Ok((net, prefix_len, ports))
}

/// Letters where an IPv4 address was expected: someone wrote a name like `example.com`.
fn looks_like_host_name(text: &str) -> bool {
    text.chars().any(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Prefix length after `/`; a missing prefix means a single address.
fn parse_prefix(text: Option<&str>, max: u8, family: &'static str) -> Result<u8, Reason> {
    let Some(text) = text else {
        return Ok(max);
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 18 {
        return Err(Reason::BadPrefix(text.to_string()));
    }
    let len: u64 = text
        .parse()
        .map_err(|_| Reason::BadPrefix(text.to_string()))?;
    match u8::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(Reason::PrefixTooLong { len, max, family }),
    }
}

/// Whether `text` is a valid `network.allow` entry, in address or host-name form.
pub(crate) fn valid_net_entry(text: &str) -> bool {
    if host::is_host_entry(text) {
        host::parse_host_entry(text, parse_ports).is_ok()
    } else {
        parse_net(text).is_ok()
    }
}

/// `N`, `LO-HI` or `*`.
fn parse_ports(spec: &str) -> Result<PortRange, Reason> {
    if spec == "*" {
        return Ok(PortRange {
            lo: 0,
            hi: u16::MAX,
        });
    }
    let (lo, hi) = match spec.split_once('-') {
        Some((lo, hi)) => (parse_port(lo, spec)?, parse_port(hi, spec)?),
        None => {
            let port = parse_port(spec, spec)?;
            (port, port)
        }
    };
    if lo > hi {
        return Err(Reason::PortRangeReversed { lo, hi });
    }
    Ok(PortRange { lo, hi })
}

fn parse_port(text: &str, spec: &str) -> Result<u16, Reason> {
    // Digits only: `str::parse` would also take a leading '+'.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reason::BadPort(spec.to_string()));
    }
    match text.parse::<u16>() {
        Ok(0) => Err(Reason::PortZero),
        Ok(port) => Ok(port),
        Err(_) => Err(Reason::PortTooLarge(text.to_string())),
    }
}

/// An absolute, normalised path, optionally ending in `*` → (path or prefix, is prefix glob).
pub(crate) fn parse_exec(text: &str) -> Result<(String, bool), Reason> {
    if text.contains('\0') {
        return Err(Reason::NulByte);
    }
    if !text.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    let (path, glob) = match text.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    if path.contains('*') {
        return Err(Reason::MisplacedGlob);
    }
    // The kernel compares bytes, so `/usr/./bin/git` would never match `/usr/bin/git`. In a glob the
    // text after the last '/' is the start of a name (`/home/u/.*` is dotfiles), not a component.
    let components = match (glob, path.rfind('/')) {
        (true, Some(slash)) => &path[..=slash],
        _ => path,
    };
    if components.contains("//")
        || components.contains("/./")
        || components.contains("/../")
        || components.ends_with("/.")
        || components.ends_with("/..")
    {
        return Err(Reason::NotNormalised);
    }
    if !glob && path.ends_with('/') {
        return Err(Reason::TrailingSlash);
    }
    // An exact key holds the terminating NUL too; a glob prefix does not.
    let max = if glob {
        EXEC_PATH_LEN
    } else {
        EXEC_PATH_LEN - 1
    };
    if path.len() > max {
        return Err(Reason::PathTooLong {
            len: path.len(),
            max,
        });
    }
    Ok((path.to_string(), glob))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "policies/coder.toml";

    fn ok(text: &str) -> Policy {
        match Policy::parse(text, Path::new(ORIGIN)) {
            Ok(p) => p,
            Err(e) => panic!("expected {text:?} to parse, got:\n{e}"),
        }
    }

    fn err(text: &str) -> String {
        match Policy::parse(text, Path::new(ORIGIN)) {
            Ok(p) => panic!("expected {text:?} to fail, got {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn net(entry: &str) -> NetRule {
        let p = ok(&format!("agent = \"a\"\n[network]\nallow = [{entry:?}]\n"));
        p.network[0].clone()
    }

    /// The error for one network entry, which sits on line 3, column 10.
    fn net_err(entry: &str) -> String {
        err(&format!("agent = \"a\"\n[network]\nallow = [{entry:?}]\n"))
    }

    fn exec(entry: &str) -> ExecRule {
        let p = ok(&format!("agent = \"a\"\n[exec]\nallow = [{entry:?}]\n"));
        p.exec[0].clone()
    }

    fn exec_err(entry: &str) -> String {
        err(&format!("agent = \"a\"\n[exec]\nallow = [{entry:?}]\n"))
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    fn range(lo: u16, hi: u16) -> PortRange {
        PortRange { lo, hi }
    }

    #[test]
    fn full_example_parses() {
        let p = ok(r#"
agent = "coder"
mode = "enforce"
[network]
allow = ["127.0.0.1:8080", "10.0.0.0/8:443", "[::1]:8080", "192.168.1.5:1000-2000", "[fd00::/8]:*"]
[exec]
allow = ["/usr/bin/git", "/bin/sh", "/usr/bin/python3*"]
"#);
        assert_eq!(p.agent(), "coder");
        assert_eq!(p.mode(), Mode::Enforce);
        assert_eq!(p.network().len(), 5);
        assert_eq!(p.exec().len(), 3);
        assert_eq!(p.network()[1].text(), "10.0.0.0/8:443");
        assert_eq!(p.network()[1].line(), 5);
        assert_eq!(p.origin(), Path::new(ORIGIN));
        assert_eq!(p.defined_at().to_string(), "policies/coder.toml:2:9");
    }

    #[test]
    fn minimal_policy_allows_nothing_and_enforces() {
        let p = ok("agent = \"a\"");
        assert_eq!(p.mode(), Mode::Enforce);
        assert!(p.network().is_empty());
        assert!(p.exec().is_empty());
    }

    #[test]
    fn empty_sections_are_allowed() {
        let p = ok("agent = \"a\"\n[network]\n[exec]\nallow = []\n");
        assert!(p.network().is_empty() && p.exec().is_empty());
    }

    #[test]
    fn alert_mode() {
        assert_eq!(ok("agent = \"a\"\nmode = \"alert\"").mode(), Mode::Alert);
        assert_eq!(Mode::Alert.kernel_value(), agent_monitor_common::MODE_ALERT);
        assert_eq!(
            Mode::Enforce.kernel_value(),
            agent_monitor_common::MODE_ENFORCE
        );
    }

    #[test]
    fn ipv4_single_address_is_mapped_slash_128() {
        let r = net("127.0.0.1:8080");
        assert_eq!(r.net(), v6("::ffff:127.0.0.1"));
        assert_eq!(r.prefix_len(), 128);
        assert_eq!(r.ports(), range(8080, 8080));
    }

    #[test]
    fn ipv4_cidr() {
        let r = net("10.0.0.0/8:443");
        assert_eq!(r.net(), v6("::ffff:10.0.0.0"));
        assert_eq!(r.prefix_len(), 104);
        assert_eq!(r.ports(), range(443, 443));
    }

    #[test]
    fn ipv4_zero_prefix_covers_all_ipv4() {
        let r = net("0.0.0.0/0:53");
        assert_eq!(r.net(), v6("::ffff:0.0.0.0"));
        assert_eq!(r.prefix_len(), 96);
    }

    #[test]
    fn ipv6_address_and_cidr() {
        let r = net("[::1]:8080");
        assert_eq!((r.net(), r.prefix_len()), (v6("::1"), 128));
        let r = net("[fd00::/8]:*");
        assert_eq!((r.net(), r.prefix_len()), (v6("fd00::"), 8));
        assert_eq!(r.ports(), range(0, 65535));
        let r = net("[::/0]:443");
        assert_eq!(r.prefix_len(), 0);
    }

    #[test]
    fn ipv4_mapped_ipv6_entry() {
        let r = net("[::ffff:10.0.0.0/104]:80");
        assert_eq!((r.net(), r.prefix_len()), (v6("::ffff:10.0.0.0"), 104));
    }

    #[test]
    fn port_forms() {
        assert_eq!(net("1.2.3.4:1").ports(), range(1, 1));
        assert_eq!(net("1.2.3.4:65535").ports(), range(65535, 65535));
        assert_eq!(net("192.168.1.5:1000-2000").ports(), range(1000, 2000));
        assert_eq!(net("1.2.3.4:7-7").ports(), range(7, 7));
        assert_eq!(net("1.2.3.4:*").ports(), range(0, 65535));
    }

    #[test]
    fn error_format_names_file_line_column_value_and_expectation() {
        let msg = err(
            "agent = \"coder\"\n\n[network]\nallow = [\n  \"127.0.0.1:80\",\n  \"10.0.0.0/8:443\",\n  \"10.0.0.0/33:443\",\n]\n",
        );
        assert_eq!(
            msg,
            "policies/coder.toml:7:3: network.allow[2] \"10.0.0.0/33:443\": prefix length 33 is longer than 32 for IPv4"
        );
    }

    #[test]
    fn all_bad_entries_are_reported() {
        let msg = err(
            "agent = \"Bad\"\nmode = \"block\"\n[network]\nallow = [\"1.2.3.4\", \"1.2.3.4:80\", \"x..y:1\"]\n[exec]\nallow = [\"bin/sh\"]\n",
        );
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), 5, "{msg}");
        assert!(lines[0].starts_with("policies/coder.toml:1:9: agent \"Bad\""));
        assert!(lines[1].starts_with("policies/coder.toml:2:8: mode \"block\""));
        assert!(lines[2].starts_with("policies/coder.toml:4:10: network.allow[0] \"1.2.3.4\""));
        assert!(lines[3].starts_with("policies/coder.toml:4:35: network.allow[2] \"x..y:1\""));
        assert!(lines[4].starts_with("policies/coder.toml:6:10: exec.allow[0] \"bin/sh\""));
    }

    #[test]
    fn bad_ipv4() {
        assert_eq!(
            net_err("10.0.0.256:80"),
            "policies/coder.toml:3:10: network.allow[0] \"10.0.0.256:80\": \"10.0.0.256\" is not a valid IPv4 address; expected a.b.c.d"
        );
        assert!(net_err("1.2.3:80").contains("\"1.2.3\" is not a valid IPv4 address"));
        assert!(net_err(":80").contains("\"\" is not a valid IPv4 address"));
    }

    #[test]
    fn bad_ipv6() {
        let msg = net_err("[fd00::g]:80");
        assert!(msg.starts_with("policies/coder.toml:3:10: network.allow[0] \"[fd00::g]:80\": "));
        assert!(
            msg.ends_with("\"fd00::g\" is not a valid IPv6 address"),
            "{msg}"
        );
        assert!(
            net_err("[10.0.0.1]:80")
                .ends_with("IPv4 addresses are written without brackets, e.g. 10.0.0.1:80")
        );
        assert!(net_err("[::1:80").ends_with("missing ']' after the IPv6 address"));
        assert!(net_err("[::1]80").ends_with("expected ':' and a port after ']'"));
    }

    #[test]
    fn prefix_too_long() {
        assert!(net_err("10.0.0.0/33:443").ends_with(
            "network.allow[0] \"10.0.0.0/33:443\": prefix length 33 is longer than 32 for IPv4"
        ));
        assert!(
            net_err("[fd00::/129]:443").ends_with("prefix length 129 is longer than 128 for IPv6")
        );
        assert!(
            net_err("10.0.0.0/300:443").ends_with("prefix length 300 is longer than 32 for IPv4")
        );
    }

    #[test]
    fn bad_prefix() {
        assert!(net_err("10.0.0.0/:443").ends_with("prefix length \"\" is not a number"));
        assert!(net_err("10.0.0.0/x:443").ends_with("prefix length \"x\" is not a number"));
        assert!(net_err("10.0.0.0/+8:443").ends_with("prefix length \"+8\" is not a number"));
    }

    #[test]
    fn host_bits_set() {
        assert_eq!(
            net_err("10.0.0.1/8:443"),
            "policies/coder.toml:3:10: network.allow[0] \"10.0.0.1/8:443\": host bits are set below the prefix; did you mean 10.0.0.0/8?"
        );
        assert!(net_err("[fd00::1/8]:443").ends_with("did you mean [fd00::/8]?"));
        assert!(net_err("1.2.3.4/0:1").ends_with("did you mean 0.0.0.0/0?"));
    }

    #[test]
    fn missing_port() {
        for entry in ["10.0.0.1", "10.0.0.1:", "10.0.0.0/8", "[::1]", "[::1]:"] {
            let msg = net_err(entry);
            assert!(
                msg.ends_with(
                    "missing port; expected ADDR[/PREFIX]:PORT where PORT is N, LO-HI or *"
                ),
                "{entry}: {msg}"
            );
            assert!(msg.contains(&format!("{entry:?}")), "{msg}");
        }
    }

    #[test]
    fn port_zero() {
        assert_eq!(
            net_err("1.2.3.4:0"),
            "policies/coder.toml:3:10: network.allow[0] \"1.2.3.4:0\": port 0 is not allowed; expected 1-65535 (or * for every port)"
        );
        assert!(
            net_err("1.2.3.4:0-10")
                .ends_with("port 0 is not allowed; expected 1-65535 (or * for every port)")
        );
    }

    #[test]
    fn port_too_large() {
        assert!(net_err("1.2.3.4:65536").ends_with("port 65536 is out of range; expected 1-65535"));
        assert!(
            net_err("1.2.3.4:1-99999999999999999999")
                .ends_with("port 99999999999999999999 is out of range; expected 1-65535")
        );
    }

    #[test]
    fn bad_port_text() {
        for entry in [
            "1.2.3.4:http",
            "1.2.3.4:+80",
            "1.2.3.4:1-",
            "1.2.3.4:-5",
            "1.2.3.4:1-2-3",
            "1.2.3.4: 80",
        ] {
            let msg = net_err(entry);
            assert!(
                msg.contains("is not valid; expected N (1-65535), LO-HI or *"),
                "{entry}: {msg}"
            );
        }
    }

    #[test]
    fn reversed_range() {
        assert!(net_err("1.2.3.4:2000-1000").ends_with(
            "\"1.2.3.4:2000-1000\": port range 2000-1000 is reversed; expected LO <= HI"
        ));
    }

    #[test]
    fn unbracketed_ipv6() {
        for entry in ["::1:80", "fd00::/8:443", "::1"] {
            assert!(
                net_err(entry).ends_with(
                    "IPv6 addresses must be in brackets, e.g. [::1]:80 or [fd00::/8]:443"
                ),
                "{entry}"
            );
        }
    }

    #[test]
    fn host_name_with_prefix() {
        let msg = net_err("example.com/8:443");
        assert!(
            msg.ends_with("host names take no prefix length; expected NAME:PORT or *.NAME:PORT"),
            "{msg}"
        );
    }

    #[test]
    fn empty_network_entry() {
        assert!(
            net_err("")
                .ends_with("network.allow[0] \"\": empty entry; expected ADDR[/PREFIX]:PORT")
        );
    }

    #[test]
    fn exec_forms() {
        let r = exec("/usr/bin/git");
        assert_eq!(
            (r.path(), r.prefix_glob(), r.text()),
            ("/usr/bin/git", false, "/usr/bin/git")
        );
        let r = exec("/usr/bin/python3*");
        assert_eq!(
            (r.path(), r.prefix_glob(), r.text()),
            ("/usr/bin/python3", true, "/usr/bin/python3*")
        );
        assert_eq!(exec("/opt/tools/*").path(), "/opt/tools/");
        assert_eq!(exec("/*").path(), "/");
        // The last part of a glob is the start of a name, so dotfiles are fine.
        assert_eq!(exec("/home/u/.*").path(), "/home/u/.");
        assert_eq!(exec("/usr/bin/.hidden").path(), "/usr/bin/.hidden");
    }

    #[test]
    fn relative_exec_path() {
        assert_eq!(
            exec_err("bin/sh"),
            "policies/coder.toml:3:10: exec.allow[0] \"bin/sh\": path must be absolute (start with /)"
        );
        assert!(exec_err("").ends_with("exec.allow[0] \"\": path must be absolute (start with /)"));
        assert!(exec_err("*").ends_with("path must be absolute (start with /)"));
    }

    #[test]
    fn star_in_the_middle() {
        assert!(exec_err("/usr/*/git").ends_with(
            "exec.allow[0] \"/usr/*/git\": '*' is only allowed at the end of a path, as a prefix glob"
        ));
        assert!(
            exec_err("/usr/bin/**")
                .ends_with("'*' is only allowed at the end of a path, as a prefix glob")
        );
    }

    #[test]
    fn non_normalised_paths() {
        for entry in [
            "/usr//bin/git",
            "/usr/./bin/git",
            "/usr/../bin/git",
            "/usr/bin/.",
            "/usr/bin/..",
            "//bin/sh",
            "/usr/../*",
            "/usr/.//*",
        ] {
            let msg = exec_err(entry);
            assert!(
                msg.ends_with(&format!(
                    "exec.allow[0] {entry:?}: path must be normalised (no //, /./, /../, or trailing /. or /..)"
                )),
                "{entry}: {msg}"
            );
        }
    }

    #[test]
    fn exact_path_with_trailing_slash() {
        assert!(exec_err("/usr/bin/").contains("cannot end with '/'"));
        assert!(exec_err("/").contains("cannot end with '/'"));
    }

    #[test]
    fn path_length_limits() {
        let exact_max = format!("/{}", "a".repeat(EXEC_PATH_LEN - 2));
        assert_eq!(exec(&exact_max).path().len(), EXEC_PATH_LEN - 1);
        let too_long = format!("{exact_max}b");
        assert!(
            exec_err(&too_long).ends_with("path is 252 bytes; at most 251 fit in the kernel table")
        );

        let glob_max = format!("/{}*", "a".repeat(EXEC_PATH_LEN - 1));
        assert_eq!(exec(&glob_max).path().len(), EXEC_PATH_LEN);
        let glob_too_long = format!("/{}*", "a".repeat(EXEC_PATH_LEN));
        assert!(
            exec_err(&glob_too_long)
                .ends_with("path is 253 bytes; at most 252 fit in the kernel table")
        );
    }

    #[test]
    fn nul_byte_in_path() {
        let msg = err("agent = \"a\"\n[exec]\nallow = [\"/bin/s\\u0000h\"]\n");
        assert!(
            msg.ends_with("exec.allow[0] \"/bin/s\\0h\": path contains a NUL byte"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let msg = err("agent = \"a\"\nmodee = \"alert\"\n");
        assert!(
            msg.starts_with("policies/coder.toml:2:1: unknown field `modee`, expected one of"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_key_in_network() {
        let msg = err("agent = \"a\"\n[network]\nallows = [\"1.2.3.4:80\"]\n");
        assert!(
            msg.starts_with("policies/coder.toml:3:1: unknown field `allows`, expected `allow`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_table() {
        let msg = err("agent = \"a\"\n[files]\nallow = []\n");
        assert!(msg.starts_with("policies/coder.toml:2:"), "{msg}");
        assert!(msg.contains("unknown field `files`"), "{msg}");
    }

    #[test]
    fn wrong_types() {
        let msg = err("agent = 5\n");
        assert!(
            msg.starts_with(
                "policies/coder.toml:1:9: invalid type: integer `5`, expected a string"
            ),
            "{msg}"
        );
        let msg = err("agent = \"a\"\n[network]\nallow = \"1.2.3.4:80\"\n");
        assert!(
            msg.starts_with(
                "policies/coder.toml:3:9: invalid type: string \"1.2.3.4:80\", expected a sequence"
            ),
            "{msg}"
        );
        let msg = err("agent = \"a\"\n[exec]\nallow = [\"/bin/sh\", 7]\n");
        assert!(
            msg.starts_with(
                "policies/coder.toml:3:21: invalid type: integer `7`, expected a string"
            ),
            "{msg}"
        );
        let msg = err("agent = \"a\"\nnetwork = 1\n");
        assert!(
            msg.starts_with("policies/coder.toml:2:11: invalid type: integer `1`"),
            "{msg}"
        );
    }

    #[test]
    fn missing_agent() {
        let msg = err("mode = \"alert\"\n");
        assert!(msg.starts_with("policies/coder.toml"), "{msg}");
        assert!(msg.contains("missing field `agent`"), "{msg}");
    }

    #[test]
    fn toml_syntax_error() {
        let msg = err("agent = \"a\"\n[network\n");
        assert_eq!(
            msg,
            "policies/coder.toml:2:9: invalid table header; expected `.`, `]`"
        );
        let msg = err("agent = \"a\"\nagent = \"b\"\n");
        assert_eq!(
            msg,
            "policies/coder.toml:2:1: duplicate key `agent` in document root"
        );
    }

    #[test]
    fn bad_mode() {
        assert_eq!(
            err("agent = \"a\"\nmode = \"block\"\n"),
            "policies/coder.toml:2:8: mode \"block\": expected \"enforce\" or \"alert\""
        );
        assert!(err("agent = \"a\"\nmode = \"Enforce\"\n").contains("mode \"Enforce\": expected"));
    }

    #[test]
    fn good_agent_names() {
        for name in [
            "a",
            "0",
            "coder",
            "code-review_2.x",
            &"a".repeat(AGENT_NAME_MAX),
        ] {
            assert_eq!(ok(&format!("agent = {name:?}")).agent(), name);
        }
    }

    #[test]
    fn bad_agent_names() {
        let cases = [
            (
                "",
                "agent name is empty; expected 1-63 characters of [a-z0-9_.-], starting with [a-z0-9]",
            ),
            ("Coder", "agent name must start with [a-z0-9], not 'C'"),
            ("-x", "agent name must start with [a-z0-9], not '-'"),
            (".x", "agent name must start with [a-z0-9], not '.'"),
            (
                "co der",
                "character ' ' is not allowed in an agent name; expected [a-z0-9_.-]",
            ),
            (
                "a/b",
                "character '/' is not allowed in an agent name; expected [a-z0-9_.-]",
            ),
            (
                "café",
                "character 'é' is not allowed in an agent name; expected [a-z0-9_.-]",
            ),
        ];
        for (name, reason) in cases {
            assert_eq!(
                err(&format!("agent = {name:?}")),
                format!("policies/coder.toml:1:9: agent {name:?}: {reason}")
            );
        }
        let long = "a".repeat(AGENT_NAME_MAX + 1);
        assert!(
            err(&format!("agent = {long:?}"))
                .ends_with("agent name is 64 characters; expected at most 63")
        );
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(line_col("é = 1", 3), (1, 3));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("a", 99), (1, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn line_index_agrees_with_the_scan_at_every_offset() {
        for text in ["", "a", "\n", "a\nbc\n\né = 1\n  x", "é\r\nü\n"] {
            let index = LineIndex::new(text, Path::new("p.toml"));
            for offset in 0..=text.len() + 2 {
                assert_eq!(
                    index.line_col(offset),
                    line_col(text, offset),
                    "{text:?} at {offset}"
                );
            }
        }
    }

    /// Entries far down a large file still get their own line (and parsing stays linear: the
    /// line of each entry is found without rescanning the file).
    #[test]
    fn large_policy_keeps_entry_lines() {
        let n = 20_000;
        let net: Vec<String> = (0..n)
            .map(|i| format!("\"10.{}.{}.1:443\"", i / 256, i % 256))
            .collect();
        let text = format!(
            "agent = \"big\"\n[network]\nallow = [\n{}\n]\n",
            net.join(",\n")
        );
        let started = std::time::Instant::now();
        let p = ok(&text);
        assert_eq!(p.network().len(), n);
        assert_eq!(p.network()[0].line(), 4);
        assert_eq!(p.network()[n - 1].line(), 4 + n - 1);
        // Generous for a debug build on a busy machine; the quadratic scan took seconds in release.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "parsing {n} entries took {:?}",
            started.elapsed()
        );
    }

    const SUM: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn identity_section_parses() {
        let p = ok(&format!(
            "agent = \"coder\"\n[identity]\nuids = [1001, 1002]\nsystemd_units = [\"coder-agent.service\"]\ncgroups = [\"/agents/coder\"]\nexecutables = [{{ path = \"/opt/coder/bin/agent\", sha256 = \"{SUM}\" }}]\n"
        ));
        let s = p.selectors();
        let uids: Vec<u32> = s.uids.iter().map(|u| u.value).collect();
        assert_eq!(uids, [1001, 1002]);
        assert_eq!(s.uids[0].at.to_string(), format!("{ORIGIN}:3:9"));
        assert_eq!(s.systemd_units[0].value, "coder-agent.service");
        assert_eq!(s.cgroups[0].value, "/agents/coder");
        assert_eq!(s.executables[0].value.path, "/opt/coder/bin/agent");
        assert_eq!(s.executables[0].value.sha256[0], 0xba);
        assert!(ok("agent = \"a\"\n").selectors().is_empty());
    }

    #[test]
    fn selectors_that_capture_the_host_name_place_and_reason() {
        let e = err(
            "agent = \"a\"\n[identity]\nuids = [1001, 0]\nsystemd_units = [\"init.scope\"]\ncgroups = [\"/system.slice\"]\n",
        );
        for want in [
            "policies/coder.toml:4:18: identity.systemd_units[0] \"init.scope\": this unit would capture the host: it holds PID 1",
            "policies/coder.toml:5:12: identity.cgroups[0] \"/system.slice\": this cgroup would capture the host: it holds the daemon",
            "policies/coder.toml:3:15: identity.uids[1] \"0\": uid 0 is root",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn bad_selectors_name_field_and_expectation() {
        let e = err(&format!(
            "agent = \"a\"\n[identity]\ncgroups = [\"/\", \"/agent-monitor/a/t\"]\nsystemd_units = [\"coder\"]\nexecutables = [{{ path = \"/opt/*\", sha256 = \"xyz\" }}, {{ path = \"/opt/a\", sha256 = \"{SUM}\" }}]\n"
        ));
        for want in [
            "identity.cgroups[0] \"/\": the cgroup root would select every process",
            "identity.cgroups[1] \"/agent-monitor/a/t\": agent-monitor's own cgroup tree",
            "identity.systemd_units[0] \"coder\": expected a systemd unit name",
            "identity.executables[0].path \"/opt/*\": an executable selector names one file",
            "identity.executables[0].sha256 \"xyz\": expected the file's sha256 as 64 hex digits",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = err("agent = \"a\"\n[identity]\nexecutables = [{ path = \"/x\" }]\n");
        assert!(e.contains("sha256"), "{e}");
        let e = err("agent = \"a\"\n[identity]\nuids = [-1]\n");
        assert!(e.starts_with(ORIGIN), "{e}");
        let e = err("agent = \"a\"\n[identity]\nuser = \"x\"\n");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn overlapping_selectors_across_files_are_refused_with_both_places() {
        let a = Policy::parse(
            "agent = \"a\"\n[identity]\ncgroups = [\"/agents\"]\nuids = [7]\n",
            Path::new("policies/a.toml"),
        )
        .unwrap();
        let b = Policy::parse(
            "agent = \"b\"\n[identity]\ncgroups = [\"/agents/b\"]\nuids = [8]\n",
            Path::new("policies/b.toml"),
        )
        .unwrap();
        let e = crate::policy::PolicySet::new(vec![a, b])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "policies/b.toml:3:12: cgroup selector \"/agents/b\" of agent \"b\" overlaps cgroup selector \"/agents\" of agent \"a\" at policies/a.toml:3:12: a process would match two agents; expected selectors that no two agents share"
        );
    }
}
