//! Host-name network rules (`api.github.com:443`, `*.example.com:443`): parsing, name
//! normalisation and matching. The DNS proxy judges the name an agent asks with these; the
//! addresses in the answer are then allowed for the ports of the rules that matched.

use std::fmt;

use agent_monitor_common::{MAX_PORT_RANGES, PortRange};

use crate::policy::Decision;
use crate::policy::compile::merge_ranges;
use crate::policy::model::Policy;
use crate::policy::parse::Reason;

/// Longest DNS name in text form, without the trailing dot (RFC 1035: 255 octets on the wire).
pub const NAME_MAX: usize = 253;
/// Longest DNS label.
pub const LABEL_MAX: usize = 63;

/// Which names a host rule covers. Names are stored normalised: ASCII lower case, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.github.com`: that name only.
    Exact(String),
    /// `*.example.com`: every name below `example.com` (`a.example.com`, `a.b.example.com`), not
    /// `example.com` itself — write both rules to allow both.
    Subdomains(String),
}

impl HostPattern {
    /// Whether the normalised `name` is covered.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(n) => name == n,
            HostPattern::Subdomains(parent) => name
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

/// One host-name network allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    pub(crate) pattern: HostPattern,
    pub(crate) ports: PortRange,
    pub(crate) text: String,
    pub(crate) line: usize,
}

impl HostRule {
    pub fn pattern(&self) -> &HostPattern {
        &self.pattern
    }

    pub fn ports(&self) -> PortRange {
        self.ports
    }

    /// The entry as written in the policy file.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn line(&self) -> usize {
        self.line
    }
}

/// A name as the proxy compares it: ASCII lower case, without the root's trailing dot. DNS names
/// compare case-insensitively (RFC 4343); bytes outside ASCII are kept as they are.
pub fn normalize_name(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Whether a network entry is written as a host name rather than an address: not bracketed, at
/// most one ':', and a letter or a '*' in the part before the port.
pub(crate) fn is_host_entry(text: &str) -> bool {
    if text.starts_with('[') || text.matches(':').count() > 1 || text.contains('/') {
        return false;
    }
    let host = text.split_once(':').map_or(text, |(h, _)| h);
    host.starts_with('*') || host.bytes().any(|b| b.is_ascii_alphabetic())
}

/// `NAME:PORTS` or `*.NAME:PORTS` → (pattern, ports). `parse_ports` is the address rules' port
/// parser, so both spell ports the same way.
pub(crate) fn parse_host_entry(
    text: &str,
    parse_ports: impl Fn(&str) -> Result<PortRange, Reason>,
) -> Result<(HostPattern, PortRange), Reason> {
    let (host, ports) = match text.split_once(':') {
        Some((host, ports)) if !ports.is_empty() => (host, parse_ports(ports)?),
        _ => return Err(Reason::MissingPort),
    };
    Ok((parse_host_pattern(host)?, ports))
}

/// `NAME` or `*.NAME` (no port) → the pattern, normalised.
pub(crate) fn parse_host_pattern(host: &str) -> Result<HostPattern, Reason> {
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    if name.contains('*') || (!wildcard && host.starts_with('*')) {
        return Err(Reason::MisplacedWildcard);
    }
    let name = normalize_name(name);
    check_name(&name)?;
    Ok(if wildcard {
        HostPattern::Subdomains(name)
    } else {
        HostPattern::Exact(name)
    })
}

/// A normalised host name: labels of [a-z0-9_-], 1-63 characters, not starting or ending with
/// '-', at most 253 characters, and a last label that is not all digits (that is a mistyped IPv4
/// address, not a name).
fn check_name(name: &str) -> Result<(), Reason> {
    if name.is_empty() {
        return Err(Reason::HostEmpty);
    }
    if name.len() > NAME_MAX {
        return Err(Reason::HostTooLong { len: name.len() });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(Reason::HostEmptyLabel);
        }
        if label.len() > LABEL_MAX {
            return Err(Reason::HostLabelTooLong {
                label: label.to_string(),
            });
        }
        if let Some(bad) = label
            .chars()
            .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'))
        {
            return Err(Reason::HostBadChar(bad));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(Reason::HostHyphen {
                label: label.to_string(),
            });
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(Reason::HostNumeric);
    }
    Ok(())
}

/// The proxy's verdict on a name an agent asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameDecision {
    pub allowed: bool,
    /// Ports the answer's addresses are allowed for: every matching rule's ports, merged.
    pub ports: Vec<PortRange>,
    /// The matching entries as written, or why none matched.
    pub reason: String,
}

impl Policy {
    /// Whether this agent may resolve `name` (any spelling; it is normalised here), and for which
    /// ports the answer's addresses then become reachable.
    pub fn check_name(&self, name: &str) -> NameDecision {
        let name = normalize_name(name);
        let matching: Vec<&HostRule> = self
            .hosts
            .iter()
            .filter(|r| r.pattern.matches(&name))
            .collect();
        if matching.is_empty() {
            return NameDecision {
                allowed: false,
                ports: Vec::new(),
                reason: format!("no host rule matches {name:?}"),
            };
        }
        let ports = merge_ranges(matching.iter().map(|r| r.ports).collect());
        let texts: Vec<String> = matching.iter().map(|r| format!("{:?}", r.text)).collect();
        NameDecision {
            allowed: true,
            ports,
            reason: format!("rule {}", texts.join(", ")),
        }
    }

    /// Whether a connect to `port` of an address the agent resolved for `host` through the DNS
    /// proxy is allowed: the name must be allowed and the port among its rules' ports. What the
    /// kernel decides from its learned addresses, for replaying recorded actions.
    pub fn check_resolved(&self, host: &str, port: u16) -> Decision {
        let d = self.check_name(host);
        let allowed = d.allowed && d.ports.iter().any(|r| r.lo <= port && port <= r.hi);
        Decision {
            allowed,
            reason: if allowed {
                format!("{} (resolved through the DNS proxy)", d.reason)
            } else if d.allowed {
                format!("port {port} is not among the ports of {}", d.reason)
            } else {
                d.reason
            },
        }
    }

    /// Port ranges of all host rules merged: an upper bound on what one learned address can carry,
    /// checked against the kernel entry's capacity when compiling.
    pub(crate) fn host_port_ranges(&self) -> Vec<PortRange> {
        merge_ranges(self.hosts.iter().map(|r| r.ports).collect())
    }
}

/// Whether `ranges` fit one kernel entry.
pub(crate) fn fits_kernel(ranges: &[PortRange]) -> bool {
    ranges.len() <= MAX_PORT_RANGES
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(network: &[&str]) -> Policy {
        crate::policy::test_policy("t", &format!("[network]\nallow = {network:?}\n"))
    }

    fn parse_err(entry: &str) -> String {
        let text = format!("agent = \"t\"\n[network]\nallow = [{entry:?}]\n");
        match Policy::parse(&text, Path::new("t.toml")) {
            Ok(p) => panic!("{entry:?} parsed: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn exact_and_wildcard_entries_parse_and_normalise() {
        let p = policy(&[
            "API.GitHub.com.:443",
            "*.Example.COM:80-81",
            "10.0.0.1:22",
            "localhost:8080",
        ]);
        assert_eq!(p.network().len(), 1, "the address stays an address rule");
        let hosts = p.hosts();
        assert_eq!(hosts.len(), 3);
        assert_eq!(
            hosts[0].pattern(),
            &HostPattern::Exact("api.github.com".into())
        );
        assert_eq!(hosts[0].ports(), PortRange { lo: 443, hi: 443 });
        assert_eq!(hosts[0].text(), "API.GitHub.com.:443");
        assert_eq!(hosts[0].line(), 3);
        assert_eq!(
            hosts[1].pattern(),
            &HostPattern::Subdomains("example.com".into())
        );
        assert_eq!(hosts[1].pattern().to_string(), "*.example.com");
        assert_eq!(hosts[2].pattern(), &HostPattern::Exact("localhost".into()));
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let w = HostPattern::Subdomains("example.com".into());
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("example.com.evil.net"));
        let e = HostPattern::Exact("ok.example.com".into());
        assert!(e.matches("ok.example.com"));
        assert!(!e.matches("x.ok.example.com"));
    }

    #[test]
    fn names_are_judged_in_any_spelling() {
        let p = policy(&["ok.example.com:443", "*.example.com:80", "*.cdn.test:*"]);
        let d = p.check_name("OK.Example.com.");
        assert!(d.allowed);
        assert_eq!(
            d.ports,
            [PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }]
        );
        assert_eq!(
            d.reason,
            "rule \"ok.example.com:443\", \"*.example.com:80\""
        );
        let d = p.check_name("x.y.cdn.test");
        assert!(d.allowed);
        assert_eq!(d.ports, [PortRange { lo: 0, hi: 65535 }]);
        let d = p.check_name("example.com");
        assert!(!d.allowed);
        assert_eq!(d.reason, "no host rule matches \"example.com\"");
        assert!(!p.check_name("secret-data.attacker.net").allowed);
        assert!(!p.check_name("").allowed);
    }

    #[test]
    fn resolved_connects_need_the_name_and_the_port() {
        let p = policy(&["ok.example.com:443", "*.example.com:80"]);
        assert!(p.check_resolved("OK.example.com", 443).allowed);
        assert!(p.check_resolved("ok.example.com", 80).allowed);
        let d = p.check_resolved("ok.example.com", 22);
        assert!(!d.allowed);
        assert!(
            d.reason
                .starts_with("port 22 is not among the ports of rule"),
            "{}",
            d.reason
        );
        assert!(!p.check_resolved("evil.test", 443).allowed);
    }

    #[test]
    fn policy_without_host_rules_resolves_nothing() {
        assert!(!policy(&["127.0.0.1:53"]).check_name("localhost").allowed);
    }

    #[test]
    fn bad_host_entries_say_what_was_expected() {
        let cases = [
            ("ok.example.com", "missing port"),
            ("ok.example.com:", "missing port"),
            (
                "ok.example.com:http",
                "is not valid; expected N (1-65535), LO-HI or *",
            ),
            ("ok.example.com:0", "port 0 is not allowed"),
            (
                "a.*.example.com:443",
                "'*' is only allowed as the first label",
            ),
            ("*example.com:443", "'*' is only allowed as the first label"),
            ("*:443", "'*' is only allowed as the first label"),
            ("*.:443", "host name is empty"),
            ("a..b:443", "empty label"),
            ("-a.example.com:443", "must not start or end with '-'"),
            (
                "a_b.exa mple.com:443",
                "character ' ' is not allowed in a host name",
            ),
        ];
        for (entry, want) in cases {
            let msg = parse_err(entry);
            assert!(msg.contains(want), "{entry:?}: {msg}");
            assert!(msg.starts_with("t.toml:3:10: network.allow[0]"), "{msg}");
        }
        let long_label = format!("{}.com:443", "a".repeat(64));
        assert!(parse_err(&long_label).contains("longer than 63"));
        let long_name = format!("{}com:443", "abcdefghi.".repeat(26));
        assert!(parse_err(&long_name).contains("at most 253"));
    }

    #[test]
    fn an_all_digit_last_label_is_not_a_name() {
        assert!(!is_host_entry("10.0.0.256:80"));
        assert!(parse_err("10.0.0.256:80").contains("not a valid IPv4 address"));
        assert!(parse_err("a.10:80").contains("last label is all digits"));
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_name("A.B."), "a.b");
        assert_eq!(normalize_name("a.b"), "a.b");
        assert_eq!(normalize_name("."), "");
    }
}
