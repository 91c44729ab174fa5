//! Which learned addresses have their server names judged in the kernel, and by which names. A
//! connect to an address the agent learned goes to the egress endpoint when the port has request
//! rules; but when no name the address was learned from has method/path rules (`network.http`),
//! there is nothing to intercept, only a name to check: the kernel lets the connect go straight
//! to the server and judges the first bytes the socket sends against the (port, name) pairs
//! computed here. Pure.

use agent_monitor_common::server_name::{PLAIN_HTTP_PORT, SNI_NAME_LEN};

use crate::policy::http::{EgressRules, NameVerdict};

/// A name the agent may present to one learned address on `port`, until `expires_ns`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelName {
    pub port: u16,
    /// Normalised (lower case, no trailing dot).
    pub name: String,
    pub expires_ns: u64,
}

/// What the kernel holds for one learned address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelNames {
    /// Its connects on request-rule ports have their server name judged in the kernel.
    pub in_kernel: bool,
    /// The (port, name) pairs a server-name rule passes; every other name is refused there.
    pub names: Vec<KernelName>,
}

/// For an address learned from `learned` (name, expiry; normalised, live) by an agent with
/// `rules`. Any name with method/path rules on any port sends the address to the endpoint (the
/// connection may need interception); so does an address without names. Port 80 is plain HTTP,
/// whose `Host` only the endpoint reads: no pair is written for it and the kernel never judges
/// it.
pub fn for_address(rules: &EgressRules, learned: &[(String, u64)]) -> KernelNames {
    if learned.is_empty() || rules.is_empty() {
        return KernelNames::default();
    }
    let ports = rules.ports();
    let mut names = Vec::new();
    for (name, expires_ns) in learned {
        for &port in &ports {
            match rules.judge_name(name, port) {
                NameVerdict::Intercept(_) => return KernelNames::default(),
                NameVerdict::Pass(_)
                    if port != PLAIN_HTTP_PORT && !name.is_empty() && name.len() < SNI_NAME_LEN =>
                {
                    names.push(KernelName {
                        port,
                        name: name.clone(),
                        expires_ns: *expires_ns,
                    });
                }
                NameVerdict::Pass(_) | NameVerdict::NoRule => {}
            }
        }
    }
    KernelNames {
        in_kernel: true,
        names,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::model::Policy;

    fn rules(extra: &str) -> EgressRules {
        let text = format!(
            r#"agent = "t"
[[network.tls]]
host = "pypi.org"
port = 443
[[network.tls]]
host = "*.cdn.test"
port = 8443
[[network.tls]]
host = "plain.test"
port = 80
{extra}"#
        );
        Policy::parse(&text, Path::new("t.toml"))
            .expect("policy")
            .egress()
            .clone()
    }

    fn learned(names: &[&str]) -> Vec<(String, u64)> {
        names.iter().map(|n| (n.to_string(), 99)).collect()
    }

    #[test]
    fn a_name_with_server_name_rules_only_is_judged_in_the_kernel_on_its_ports() {
        let k = for_address(&rules(""), &learned(&["pypi.org", "a.cdn.test"]));
        assert!(k.in_kernel);
        assert_eq!(
            k.names,
            vec![
                KernelName {
                    port: 443,
                    name: "pypi.org".into(),
                    expires_ns: 99
                },
                KernelName {
                    port: 8443,
                    name: "a.cdn.test".into(),
                    expires_ns: 99
                },
            ],
            "each name only on the port its rule names"
        );
    }

    #[test]
    fn a_name_with_method_and_path_rules_sends_the_address_to_the_endpoint() {
        let http = r#"[[network.http]]
host = "api.github.com"
port = 443
methods = ["GET"]
paths = ["/*"]
"#;
        let k = for_address(&rules(http), &learned(&["pypi.org", "api.github.com"]));
        assert_eq!(k, KernelNames::default(), "interception may be needed");
        // The same rules, an address learned from the server-name host only.
        assert!(for_address(&rules(http), &learned(&["pypi.org"])).in_kernel);
    }

    #[test]
    fn names_without_rules_are_judged_in_the_kernel_and_refused_there() {
        let k = for_address(&rules(""), &learned(&["other.test"]));
        assert!(k.in_kernel, "nothing to intercept");
        assert!(
            k.names.is_empty(),
            "no name to pass: every ClientHello is refused"
        );
    }

    #[test]
    fn port_80_is_never_judged_in_the_kernel_and_no_rules_means_no_change() {
        let k = for_address(&rules(""), &learned(&["plain.test"]));
        assert!(
            k.names.is_empty(),
            "plain HTTP's Host is the endpoint's: {k:?}"
        );
        assert_eq!(
            for_address(&EgressRules::default(), &learned(&["pypi.org"])),
            KernelNames::default()
        );
        assert_eq!(for_address(&rules(""), &[]), KernelNames::default());
    }
}
