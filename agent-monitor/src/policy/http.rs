//! Request rules (`[[network.http]]`, `[[network.tls]]`): which server names an agent's TLS and
//! plain-HTTP connections may carry, and (HTTP rules) which methods and paths. Connects to
//! addresses learned for these names are redirected by the kernel to the daemon's egress endpoint
//! (`egress/`), which judges the server name with these rules; method and path are judged by the
//! interception module. Pure: no I/O.

use std::fmt;

use crate::policy::host::{HostPattern, normalize_name};
use crate::policy::model::Policy;

/// One `[[network.http]]` entry: requests to `host:port` with one of `methods` on one of `paths`.
/// The connection is terminated and each request judged (interception).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRule {
    pub(crate) host: HostPattern,
    pub(crate) port: u16,
    /// Upper case; `*` is any method.
    pub(crate) methods: Vec<String>,
    /// Absolute paths; a trailing `*` makes a prefix (`/repos/acme/*`).
    pub(crate) paths: Vec<String>,
    pub(crate) text: String,
    pub(crate) line: usize,
}

impl HttpRule {
    pub fn host(&self) -> &HostPattern {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn methods(&self) -> &[String] {
        &self.methods
    }
    pub fn paths(&self) -> &[String] {
        &self.paths
    }
    /// The entry as one line (`http api.github.com:443 GET,HEAD /repos/acme/*,/user`), for
    /// reasons and reports.
    pub fn text(&self) -> &str {
        &self.text
    }
    pub fn line(&self) -> usize {
        self.line
    }
}

/// One `[[network.tls]]` entry: connections to `host:port` whose server name (TLS SNI, or the
/// `Host` of a plain-HTTP request) is that name pass unchanged, without interception.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsRule {
    pub(crate) host: HostPattern,
    pub(crate) port: u16,
    pub(crate) text: String,
    pub(crate) line: usize,
}

impl TlsRule {
    pub fn host(&self) -> &HostPattern {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn text(&self) -> &str {
        &self.text
    }
    pub fn line(&self) -> usize {
        self.line
    }
}

/// An agent's request rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    pub(crate) http: Vec<HttpRule>,
    pub(crate) tls: Vec<TlsRule>,
}

impl EgressRules {
    pub fn http(&self) -> &[HttpRule] {
        &self.http
    }
    pub fn tls(&self) -> &[TlsRule] {
        &self.tls
    }
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.tls.is_empty()
    }

    /// Every port some rule names, sorted, without repeats: the kernel redirects connects to
    /// learned addresses on these ports.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .http
            .iter()
            .map(|r| r.port)
            .chain(self.tls.iter().map(|r| r.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// What the rules say about a connection to `port` whose server name is `name` (any
    /// spelling).
    pub fn judge_name(&self, name: &str, port: u16) -> NameVerdict {
        let name = normalize_name(name);
        let http: Vec<HttpRule> = self
            .http
            .iter()
            .filter(|r| r.port == port && r.host.matches(&name))
            .cloned()
            .collect();
        if !http.is_empty() {
            return NameVerdict::Intercept(http);
        }
        match self
            .tls
            .iter()
            .find(|r| r.port == port && r.host.matches(&name))
        {
            Some(r) => NameVerdict::Pass(r.clone()),
            None => NameVerdict::NoRule,
        }
    }
}

/// The rules' answer for one server name on one port. HTTP rules win over a server-name rule for
/// the same name: method and path rules are the narrower grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Method/path rules cover the name: hand the connection to interception with these rules.
    Intercept(Vec<HttpRule>),
    /// A server-name rule covers it: the bytes pass unchanged.
    Pass(TlsRule),
    /// No request rule names it on this port.
    NoRule,
}

impl fmt::Display for NameVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameVerdict::Intercept(rules) => {
                let texts: Vec<String> = rules.iter().map(|r| format!("{:?}", r.text)).collect();
                write!(f, "rule {}", texts.join(", "))
            }
            NameVerdict::Pass(r) => write!(f, "rule {:?}", r.text),
            NameVerdict::NoRule => f.write_str("no network.http or network.tls rule names it"),
        }
    }
}

impl Policy {
    /// `[[network.http]]` and `[[network.tls]]`.
    pub fn egress(&self) -> &EgressRules {
        &self.egress
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn policy(body: &str) -> Policy {
        crate::policy::test_policy("t", body)
    }

    const RULES: &str = r#"
[[network.http]]
host = "API.GitHub.com"
port = 443
methods = ["get", "HEAD"]
paths = ["/repos/acme/*", "/user"]

[[network.tls]]
host = "*.pypi.org"
port = 443
"#;

    #[test]
    fn http_and_tls_rules_parse_into_the_model() {
        let p = policy(RULES);
        let r = &p.egress().http()[0];
        assert_eq!(r.host(), &HostPattern::Exact("api.github.com".into()));
        assert_eq!(r.port(), 443);
        assert_eq!(r.methods(), ["GET", "HEAD"]);
        assert_eq!(r.paths(), ["/repos/acme/*", "/user"]);
        assert_eq!(r.line(), 3);
        assert_eq!(
            r.text(),
            "http api.github.com:443 GET,HEAD /repos/acme/*,/user"
        );
        let t = &p.egress().tls()[0];
        assert_eq!(t.host(), &HostPattern::Subdomains("pypi.org".into()));
        assert_eq!(t.text(), "tls *.pypi.org:443");
        assert_eq!(t.line(), 9);
        assert_eq!(p.egress().ports(), [443]);
    }

    #[test]
    fn request_rule_names_resolve_through_the_proxy_for_their_port() {
        let p = policy(RULES);
        assert!(p.check_resolved("api.github.com", 443).allowed);
        assert!(!p.check_resolved("api.github.com", 80).allowed);
        assert!(p.check_resolved("files.pypi.org", 443).allowed);
        assert!(!p.check_name("evil.test").allowed);
    }

    #[test]
    fn names_are_judged_by_port_and_http_rules_win() {
        let p = policy(&format!(
            "{RULES}\n[[network.tls]]\nhost = \"api.github.com\"\nport = 443\n"
        ));
        let e = p.egress();
        assert!(matches!(
            e.judge_name("API.github.com.", 443),
            NameVerdict::Intercept(ref r) if r.len() == 1
        ));
        assert!(matches!(
            e.judge_name("files.pypi.org", 443),
            NameVerdict::Pass(ref r) if r.text() == "tls *.pypi.org:443"
        ));
        assert_eq!(e.judge_name("pypi.org", 443), NameVerdict::NoRule);
        assert_eq!(e.judge_name("files.pypi.org", 8443), NameVerdict::NoRule);
    }

    #[test]
    fn a_policy_without_request_rules_has_none() {
        let p = policy("[network]\nallow = [\"a.test:443\"]\n");
        assert!(p.egress().is_empty());
        assert!(p.egress().ports().is_empty());
    }
}
