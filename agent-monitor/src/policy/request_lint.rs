//! Warnings about network entries that do not do what they seem to next to request rules
//! (`[[network.http]]`, `[[network.tls]]`; docs/egress.md). On a port with request rules the
//! kernel sends every connect an agent makes to an address it learned from DNS to the egress
//! endpoint, and the endpoint refuses a name no request rule covers; an address entry on that
//! port bypasses the endpoint. `policy check` prints these; they are warnings, not errors. Pure.

use crate::policy::Policy;
use crate::policy::host::{HostPattern, HostRule};
use crate::policy::http::{EgressRules, NameVerdict};

/// Whether every name `pattern` covers has a request rule on `port` (HTTP or server name).
fn covered(rules: &EgressRules, pattern: &HostPattern, port: u16) -> bool {
    match pattern {
        HostPattern::Exact(name) => rules.judge_name(name, port) != NameVerdict::NoRule,
        HostPattern::Subdomains(parent) => {
            let wider = |p: &HostPattern| match p {
                HostPattern::Subdomains(d) => {
                    parent == d
                        || parent
                            .strip_suffix(d.as_str())
                            .is_some_and(|head| head.ends_with('.'))
                }
                HostPattern::Exact(_) => false,
            };
            rules
                .http()
                .iter()
                .any(|r| r.port() == port && wider(r.host()))
                || rules
                    .tls()
                    .iter()
                    .any(|r| r.port() == port && wider(r.host()))
        }
    }
}

/// The host rules written in `network.allow` (not the ones request rules imply).
fn written_hosts(policy: &Policy) -> impl Iterator<Item = &HostRule> {
    let implied: Vec<(&str, usize)> = policy
        .egress()
        .http()
        .iter()
        .map(|r| (r.text(), r.line()))
        .chain(policy.egress().tls().iter().map(|r| (r.text(), r.line())))
        .collect();
    policy
        .hosts()
        .iter()
        .filter(move |h| !implied.contains(&(h.text(), h.line())))
}

/// Each warning with the line it is about.
pub fn policy_warnings(policy: &Policy) -> Vec<(usize, String)> {
    let rules = policy.egress();
    let ports = rules.ports();
    if ports.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for host in written_hosts(policy) {
        let range = host.ports();
        for &port in ports.iter().filter(|p| (range.lo..=range.hi).contains(*p)) {
            let pattern = host.pattern();
            if !covered(rules, pattern, port) {
                out.push((
                    host.line(),
                    format!(
                        "network.allow {:?}: port {port} has request rules, so the kernel sends \
                         connects to {pattern}'s addresses on it to the egress endpoint, which \
                         refuses a name no [[network.http]] or [[network.tls]] rule names on port \
                         {port}; add a [[network.tls]] rule for {pattern} (server name only) or \
                         an HTTP rule (docs/egress.md)",
                        host.text()
                    ),
                ));
            } else if range.lo == range.hi
                && let HostPattern::Exact(name) = pattern
                && matches!(rules.judge_name(name, port), NameVerdict::Intercept(_))
            {
                out.push((
                    host.line(),
                    format!(
                        "network.allow {:?}: the [[network.http]] rules for {name} on port {port} \
                         already allow its connects (through interception); this entry adds \
                         nothing",
                        host.text()
                    ),
                ));
            }
        }
    }
    for net in policy.network() {
        let range = net.ports();
        let hit: Vec<String> = ports
            .iter()
            .filter(|p| (range.lo..=range.hi).contains(*p))
            .map(u16::to_string)
            .collect();
        if !hit.is_empty() {
            out.push((
                net.line(),
                format!(
                    "network.allow {:?} covers port(s) {} with request rules: a connect to an \
                     address it covers is allowed by it and not redirected, so a request-rule \
                     name whose address lies in it is reached without its server name or \
                     requests being judged (docs/egress.md, Limits)",
                    net.text(),
                    hit.join(", ")
                ),
            ));
        }
    }
    for tls in rules.tls() {
        if let NameVerdict::Intercept(http) = match tls.host() {
            HostPattern::Exact(name) => rules.judge_name(name, tls.port()),
            HostPattern::Subdomains(_) => NameVerdict::NoRule,
        } {
            let lines: Vec<String> = http.iter().map(|r| r.line().to_string()).collect();
            out.push((
                tls.line(),
                format!(
                    "[[network.tls]] {}: the [[network.http]] rule(s) on line(s) {} cover the same \
                     name and port and win, so this rule has no effect (each request is judged)",
                    tls.text(),
                    lines.join(", ")
                ),
            ));
        }
    }
    out.sort();
    out
}

/// Every warning of the set, as `file:line: warning: …`.
pub fn warnings(set: &crate::policy::PolicySet) -> Vec<String> {
    set.iter()
        .flat_map(|p| {
            policy_warnings(p)
                .into_iter()
                .map(move |(line, w)| format!("{}:{line}: warning: {w}", p.origin().display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn warned(body: &str) -> Vec<(usize, String)> {
        policy_warnings(&crate::policy::test_policy("t", body))
    }

    const HTTP: &str = "[[network.http]]\nhost = \"api.github.com\"\nport = 443\n\
                        methods = [\"GET\"]\npaths = [\"/*\"]\n";

    #[test]
    fn without_request_rules_nothing_is_said() {
        assert_eq!(
            warned("[network]\nallow = [\"github.com:443\", \"10.0.0.0/8:443\"]\n"),
            []
        );
    }

    #[test]
    fn a_host_entry_on_a_request_rule_port_without_a_request_rule_is_refused_at_the_endpoint() {
        let w = warned(&format!(
            "[network]\nallow = [\"github.com:443\", \"github.com:22\", \"*.pythonhosted.org:1-1000\"]\n{HTTP}"
        ));
        let lines: Vec<usize> = w.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 3], "{w:#?}");
        assert!(
            w[0].1
                .starts_with("network.allow \"*.pythonhosted.org:1-1000\": port 443")
        );
        assert!(
            w[1].1
                .starts_with("network.allow \"github.com:443\": port 443 has request rules")
        );
        // A server-name rule for the name is what it needs.
        let ok = warned(&format!(
            "[network]\nallow = [\"github.com:443\"]\n{HTTP}\
             [[network.tls]]\nhost = \"github.com\"\nport = 443\n"
        ));
        assert_eq!(ok, []);
        let wide = warned(&format!(
            "[network]\nallow = [\"*.a.example.com:443\"]\n{HTTP}\
             [[network.tls]]\nhost = \"*.example.com\"\nport = 443\n"
        ));
        assert_eq!(wide, [], "*.example.com covers *.a.example.com");
    }

    #[test]
    fn a_host_entry_the_http_rules_imply_is_redundant() {
        let w = warned(&format!(
            "[network]\nallow = [\"api.github.com:443\"]\n{HTTP}"
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].1.contains("adds nothing"), "{w:?}");
    }

    #[test]
    fn an_address_entry_on_a_request_rule_port_bypasses_the_endpoint() {
        let w = warned(&format!(
            "[network]\nallow = [\"140.82.112.0/20:443\", \"10.0.0.1:22\"]\n{HTTP}"
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].0, 3);
        assert!(
            w[0].1
                .starts_with("network.allow \"140.82.112.0/20:443\" covers port(s) 443"),
            "{w:?}"
        );
    }

    #[test]
    fn a_tls_rule_under_an_http_rule_has_no_effect() {
        let w = warned(&format!(
            "{HTTP}[[network.tls]]\nhost = \"api.github.com\"\nport = 443\n"
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].0, 7);
        assert!(w[0].1.contains("line(s) 2"), "{w:?}");
        let formatted = {
            let text = format!(
                "agent = \"t\"\n{HTTP}[[network.tls]]\nhost = \"api.github.com\"\nport = 443\n"
            );
            let p = Policy::parse(&text, Path::new("t.toml")).expect("valid");
            warnings(&crate::policy::PolicySet::new(vec![p]).expect("set"))
        };
        assert!(
            formatted[0].starts_with("t.toml:7: warning: [[network.tls]] tls api.github.com:443")
        );
    }
}
