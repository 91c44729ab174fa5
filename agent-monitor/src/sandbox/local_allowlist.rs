//! `run`'s copy of an ask-mode agent's own allowlist (its address and exec rules, sent by the
//! daemon on the ask channel and replaced whenever the policy in force changes). A held call it
//! allows continues at once instead of waiting for the daemon's round trip, which was most of
//! what an ask-mode agent paid on every allowed connect and exec. It only ever lets a call go
//! on to the kernel, which judges it as it judges every call: a copy that is stale for a moment
//! after a reload cannot allow anything the kernel refuses (the call fails as in enforce mode
//! instead of being asked). What it does not allow (host-name rules, learned addresses, task
//! grants, approvals) is asked as before.

use std::net::Ipv6Addr;

use agent_monitor_common::{DNS_PORT, EXEC_PATH_LEN, exec_path_is_normal, net_judged_addr};

use crate::control::{AskAllowlist, HeldAction};
use crate::policy::{ExecRule, GrantRuleError, NetRule, parse_grants, to_table_addr};

/// The rules, parsed once per policy change.
#[derive(Debug, Default)]
pub struct LocalAllowlist {
    net: Vec<NetRule>,
    exec: Vec<ExecRule>,
}

impl LocalAllowlist {
    pub fn new(list: &AskAllowlist) -> Result<LocalAllowlist, GrantRuleError> {
        let (net, exec) = parse_grants(&list.connect, &list.exec)?;
        Ok(LocalAllowlist { net, exec })
    }

    /// Whether every action of a held call is on the list (then it needs no question).
    pub fn allows_all(&self, actions: &[HeldAction]) -> bool {
        !actions.is_empty() && actions.iter().all(|a| self.allows(a))
    }

    fn allows(&self, action: &HeldAction) -> bool {
        match action {
            HeldAction::Connect { address, port, .. } => {
                // DNS goes to the agent's DNS proxy, which judges (and holds) the name itself;
                // the daemon answers these at once too.
                if *port == DNS_PORT {
                    return true;
                }
                // As the kernel judges it: IPv4 as ::ffff:a.b.c.d, the unspecified address as
                // loopback.
                let addr = Ipv6Addr::from(net_judged_addr(to_table_addr(*address).octets()).0);
                self.net.iter().any(|r| {
                    let ports = r.ports();
                    r.covers(addr) && (ports.lo..=ports.hi).contains(port)
                })
            }
            HeldAction::Exec { path, .. } => {
                // Names the kernel cannot match (too long, not in normal form) are asked.
                let mut buf = [0u8; EXEC_PATH_LEN];
                if path.len() >= EXEC_PATH_LEN || path.contains('\0') {
                    return false;
                }
                buf[..path.len()].copy_from_slice(path.as_bytes());
                exec_path_is_normal(&buf) && self.exec.iter().any(|r| r.matches(path))
            }
            HeldAction::Dns { .. } => false,
            // Judged on the resolved socket by `run` already: off its list.
            HeldAction::Unix { .. } => false,
            // Held by the file guard, never by `run`.
            HeldAction::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(connect: &[&str], exec: &[&str]) -> LocalAllowlist {
        LocalAllowlist::new(&AskAllowlist {
            connect: connect.iter().map(|s| s.to_string()).collect(),
            exec: exec.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    fn connect(address: &str, port: u16) -> HeldAction {
        HeldAction::Connect {
            transport: "tcp".into(),
            address: address.parse().unwrap(),
            port,
            host: None,
        }
    }

    fn exec(path: &str) -> HeldAction {
        HeldAction::Exec {
            path: path.into(),
            sha256: None,
            argv: vec![],
            device: Some(1),
            inode: Some(2),
        }
    }

    #[test]
    fn connects_on_the_list_need_no_question() {
        let l = list(
            &["127.0.0.1:8080", "10.0.0.0/8:443", "[2001:db8::/32]:1-1024"],
            &[],
        );
        assert!(l.allows_all(&[connect("127.0.0.1", 8080)]));
        assert!(l.allows_all(&[connect("::ffff:127.0.0.1", 8080)]));
        assert!(l.allows_all(&[connect("10.1.2.3", 443)]));
        assert!(l.allows_all(&[connect("2001:db8::5", 80)]));
        assert!(l.allows_all(&[connect("1.1.1.1", 53)]), "DNS: the proxy's");
        assert!(!l.allows_all(&[connect("127.0.0.1", 8081)]));
        assert!(!l.allows_all(&[connect("11.0.0.1", 443)]));
        assert!(!l.allows_all(&[connect("2001:db9::5", 80)]));
        // A sendmmsg: all of its destinations, or it is asked.
        assert!(!l.allows_all(&[connect("10.1.2.3", 443), connect("11.0.0.1", 443)]));
        assert!(!l.allows_all(&[]));
    }

    #[test]
    fn execs_on_the_list_need_no_question() {
        let l = list(&[], &["/usr/bin/git", "/usr/bin/python3*"]);
        assert!(l.allows_all(&[exec("/usr/bin/git")]));
        assert!(l.allows_all(&[exec("/usr/bin/python3.11")]));
        assert!(!l.allows_all(&[exec("/usr/bin/gitk")]));
        assert!(!l.allows_all(&[exec("/tmp/tool")]));
        // Not in normal form: the kernel would not match it by name; asked.
        assert!(!l.allows_all(&[exec("/usr/bin/python3/../../../tmp/tool")]));
        assert!(!l.allows_all(&[exec("/usr/bin//git")]));
        let long = format!("/usr/bin/python3{}", "x".repeat(EXEC_PATH_LEN));
        assert!(!l.allows_all(&[exec(&long)]));
    }

    #[test]
    fn dns_holds_and_an_empty_list_allow_nothing() {
        let l = LocalAllowlist::default();
        assert!(!l.allows_all(&[connect("127.0.0.1", 8080)]));
        assert!(!l.allows_all(&[exec("/bin/sh")]));
        let dns = HeldAction::Dns {
            name: "example.com".into(),
            qtype: "A".into(),
        };
        assert!(!list(&["0.0.0.0/0:1-65535"], &[]).allows_all(&[dns]));
    }

    #[test]
    fn a_bad_rule_is_an_error_not_an_empty_list() {
        let bad = AskAllowlist {
            connect: vec!["not an address".into()],
            exec: vec![],
        };
        assert!(LocalAllowlist::new(&bad).is_err());
    }
}
