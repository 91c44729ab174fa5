//! The egress endpoint's decision on one connection: the name it carries (TLS server name or
//! plain-HTTP `Host`) must be covered by the agent's request rules on this port AND be a name
//! the agent resolved to this very address (else it is domain fronting: an allowed name in DNS,
//! another on the wire). Pure.

use crate::egress::hello::Opening;
use crate::policy::host::normalize_name;
use crate::policy::http::{EgressRules, HttpRule, NameVerdict};

/// What to do with the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Pass the bytes unchanged to the original destination (a server-name rule).
    Splice,
    /// Method/path rules cover the name: hand the connection to interception.
    Handover(Vec<HttpRule>),
    /// Refused (alert mode: passed and reported).
    Refuse,
}

/// The decision and why, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub decision: Decision,
    pub reason: String,
}

fn refuse(reason: String) -> Judgement {
    Judgement {
        decision: Decision::Refuse,
        reason,
    }
}

/// Judges a complete `opening` of a connection to `port` of an address the agent learned from
/// the names `learned` (normalised).
pub fn judge(opening: &Opening, rules: &EgressRules, port: u16, learned: &[String]) -> Judgement {
    let name = match opening {
        Opening::Tls(hello) if hello.ech => {
            return refuse(
                "the ClientHello is encrypted (ECH): the server name cannot be judged".into(),
            );
        }
        Opening::Tls(hello) => match &hello.sni {
            Some(n) => n,
            None => return refuse("the ClientHello names no server (no SNI)".into()),
        },
        Opening::Http { host: Some(h) } => h,
        Opening::Http { host: None } => {
            return refuse("the HTTP request has no Host header".into());
        }
        Opening::BadTls(why) => return refuse(why.clone()),
        Opening::Other | Opening::Incomplete => {
            return refuse(format!(
                "neither TLS nor HTTP on port {port}, which has request rules"
            ));
        }
    };
    let what = match opening {
        Opening::Http { .. } => "Host",
        _ => "server name",
    };
    let name = normalize_name(name);
    let verdict = rules.judge_name(&name, port);
    if verdict == NameVerdict::NoRule {
        return refuse(format!(
            "{what} {name}: no network.http or network.tls rule names it on port {port}"
        ));
    }
    if !learned.iter().any(|l| *l == name) {
        let from = if learned.is_empty() {
            "no name (it expired)".to_string()
        } else {
            learned.join(", ")
        };
        return refuse(format!(
            "{what} {name} is not the name the agent resolved this address from ({from}): \
             domain fronting"
        ));
    }
    match verdict {
        NameVerdict::Intercept(rules) => Judgement {
            reason: format!(
                "{what} {name}: {}; method and path judged per request",
                NameVerdict::Intercept(rules.clone())
            ),
            decision: Decision::Handover(rules),
        },
        pass => Judgement {
            reason: format!("{what} {name}: {pass}"),
            decision: Decision::Splice,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::egress::hello::ClientHello;
    use crate::policy::model::Policy;

    fn rules() -> EgressRules {
        let text = r#"agent = "t"
[[network.tls]]
host = "pypi.org"
port = 443
[[network.tls]]
host = "*.cdn.test"
port = 443
[[network.http]]
host = "api.github.com"
port = 443
methods = ["GET"]
paths = ["/*"]
"#;
        Policy::parse(text, Path::new("t.toml"))
            .expect("policy")
            .egress()
            .clone()
    }

    fn tls(sni: Option<&str>, ech: bool) -> Opening {
        Opening::Tls(ClientHello {
            sni: sni.map(str::to_string),
            ech,
        })
    }

    fn learned(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_server_name_rule_passes_its_name_on_its_address() {
        let j = judge(
            &tls(Some("PyPI.org"), false),
            &rules(),
            443,
            &learned(&["pypi.org"]),
        );
        assert_eq!(j.decision, Decision::Splice);
        assert_eq!(j.reason, "server name pypi.org: rule \"tls pypi.org:443\"");
    }

    #[test]
    fn method_and_path_rules_hand_the_connection_over() {
        let j = judge(
            &tls(Some("api.github.com"), false),
            &rules(),
            443,
            &learned(&["api.github.com"]),
        );
        assert!(
            matches!(j.decision, Decision::Handover(ref r) if r.len() == 1),
            "{j:?}"
        );
    }

    /// The reason of a refusal (fails if it was not refused).
    fn refused(opening: Opening, learned_from: &[&str]) -> String {
        let j = judge(&opening, &rules(), 443, &learned(learned_from));
        assert_eq!(j.decision, Decision::Refuse, "{opening:?}: {}", j.reason);
        j.reason
    }

    #[test]
    fn domain_fronting_is_refused() {
        // Allowed name in DNS, another allowed name in the handshake.
        let why = refused(tls(Some("x.cdn.test"), false), &["pypi.org"]);
        assert!(
            why.contains("not the name the agent resolved this address from (pypi.org)"),
            "{why}"
        );
        // Allowed name in DNS, a name without any rule in the handshake.
        let why = refused(tls(Some("evil.test"), false), &["pypi.org"]);
        assert!(
            why.contains("no network.http or network.tls rule names it"),
            "{why}"
        );
        // The same for plain HTTP's Host.
        let host = Opening::Http {
            host: Some("evil.test".into()),
        };
        assert!(refused(host, &["pypi.org"]).starts_with("Host evil.test"));
    }

    #[test]
    fn missing_names_ech_and_other_protocols_are_refused() {
        let l = learned(&["pypi.org"]);
        for (opening, why) in [
            (tls(None, false), "no SNI"),
            (tls(Some("pypi.org"), true), "ECH"),
            (Opening::Http { host: None }, "no Host header"),
            (Opening::Other, "neither TLS nor HTTP"),
            (Opening::BadTls("x".into()), "x"),
        ] {
            let j = judge(&opening, &rules(), 443, &l);
            assert_eq!(j.decision, Decision::Refuse, "{opening:?}");
            assert!(j.reason.contains(why), "{opening:?}: {}", j.reason);
        }
    }

    #[test]
    fn the_port_counts() {
        let j = judge(
            &tls(Some("pypi.org"), false),
            &rules(),
            8443,
            &learned(&["pypi.org"]),
        );
        assert_eq!(j.decision, Decision::Refuse);
    }
}
