//! Lookup tables over one policy's rules, so that judging an action (every record the daemon
//! explains, `policy test`) costs a few hash lookups rather than a pass over every rule: with tens
//! of thousands of entries a pass per record would cap the event rate the daemon can follow.
//! Built on first use from the rules and never changed (a policy is immutable).

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::policy::model::{ExecRule, NetRule, prefix_mask};

/// Positions of rules in their list, in file order.
type Positions = Vec<usize>;

#[derive(Debug, Default)]
pub(crate) struct RuleIndex {
    /// Network rules by (prefix length, network).
    net: HashMap<(u8, u128), Positions>,
    /// Prefix lengths in use, longest first.
    net_lengths: Vec<u8>,
    /// The first exact exec rule of each path.
    exact: HashMap<String, usize>,
    /// The first glob of each prefix.
    globs: HashMap<String, usize>,
    /// Glob prefix lengths in use (bytes), longest first.
    glob_lengths: Vec<usize>,
}

impl RuleIndex {
    fn new(network: &[NetRule], exec: &[ExecRule]) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (i, rule) in network.iter().enumerate() {
            index
                .net
                .entry((rule.prefix_len, u128::from(rule.net)))
                .or_default()
                .push(i);
        }
        index.net_lengths = index.net.keys().map(|&(len, _)| len).collect();
        index.net_lengths.sort_unstable_by(|a, b| b.cmp(a));
        index.net_lengths.dedup();
        for (i, rule) in exec.iter().enumerate() {
            let map = if rule.prefix_glob {
                &mut index.globs
            } else {
                &mut index.exact
            };
            map.entry(rule.path.clone()).or_insert(i);
        }
        index.glob_lengths = index.globs.keys().map(String::len).collect();
        index.glob_lengths.sort_unstable_by(|a, b| b.cmp(a));
        index.glob_lengths.dedup();
        index
    }

    /// The rule that allows `addr:port`: the longest prefix covering `addr` with a rule whose
    /// ports hold `port`, the first in the file among those.
    pub(crate) fn connect(&self, addr: u128, port: u16, network: &[NetRule]) -> Option<usize> {
        self.net_lengths.iter().find_map(|&len| {
            self.net
                .get(&(len, addr & prefix_mask(len)))?
                .iter()
                .copied()
                .find(|&i| {
                    let ports = network[i].ports;
                    ports.lo <= port && port <= ports.hi
                })
        })
    }

    /// The first exact rule naming `path`.
    pub(crate) fn exact(&self, path: &str) -> Option<usize> {
        self.exact.get(path).copied()
    }

    /// The rule that allows running `path` by name: an exact rule, else the longest glob prefix
    /// (the first in the file among equal ones).
    pub(crate) fn exec(&self, path: &str) -> Option<usize> {
        self.exact(path).or_else(|| {
            self.glob_lengths
                .iter()
                .find_map(|&len| self.globs.get(path.get(..len)?).copied())
        })
    }
}

/// A policy's [`RuleIndex`], built on first use. It is derived from the rules, so it takes no
/// part in comparing policies, and a clone builds its own.
#[derive(Default)]
pub(crate) struct LazyIndex(OnceLock<RuleIndex>);

impl LazyIndex {
    pub(crate) fn get(&self, network: &[NetRule], exec: &[ExecRule]) -> &RuleIndex {
        self.0.get_or_init(|| RuleIndex::new(network, exec))
    }
}

impl Clone for LazyIndex {
    fn clone(&self) -> LazyIndex {
        LazyIndex::default()
    }
}

impl PartialEq for LazyIndex {
    fn eq(&self, _: &LazyIndex) -> bool {
        true
    }
}

impl Eq for LazyIndex {}

impl std::fmt::Debug for LazyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "LazyIndex(built)"
        } else {
            "LazyIndex"
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};
    use std::path::Path;

    use crate::policy::Policy;
    use crate::policy::evaluate::judged_addr;
    use crate::policy::model::{ExecRule, NetRule};

    /// The evaluator's rule choice by its definition: one pass over every rule.
    fn connect_by_scan(rules: &[NetRule], addr: Ipv6Addr, port: u16) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, rule) in rules.iter().enumerate() {
            let ports = rule.ports;
            if rule.covers(addr)
                && ports.lo <= port
                && port <= ports.hi
                && best.is_none_or(|b| rule.prefix_len > rules[b].prefix_len)
            {
                best = Some(i);
            }
        }
        best
    }

    fn exec_by_scan(rules: &[ExecRule], path: &str) -> Option<usize> {
        let key = |r: &ExecRule| (!r.prefix_glob, r.path.len());
        rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(path))
            .fold(None, |best: Option<usize>, (i, r)| match best {
                Some(b) if key(&rules[b]) >= key(r) => Some(b),
                _ => Some(i),
            })
    }

    fn policy() -> Policy {
        let text = r#"
agent = "a"
[network]
allow = ["10.0.0.0/8:443", "10.1.0.0/16:80", "10.1.0.0/16:443", "10.1.2.3:22", "10.1.0.0/16:80",
         "10.1.2.3:1-100", "[::/0]:53", "0.0.0.0/0:8000-9000", "[fd00::/8]:*", "[fd00::1]:7",
         "127.0.0.1:8080", "10.2.0.0/15:444"]
[exec]
allow = ["/usr/bin/git", "/usr/bin/*", "/usr/bin/py*", "/usr/bin/python3*", "/usr/bin/git",
         "/usr/bin/py*", "/bin/sh", "/opt/é/*", "/opt/*"]
"#;
        Policy::parse(text, Path::new("a.toml")).expect("valid")
    }

    #[test]
    fn indexed_choices_match_the_scan() {
        let p = policy();
        let index = p.index.get(&p.network, &p.exec);
        let addrs = [
            "10.1.2.3",
            "10.1.2.4",
            "10.1.9.9",
            "10.9.9.9",
            "10.2.0.1",
            "10.3.255.255",
            "10.4.0.0",
            "11.0.0.1",
            "127.0.0.1",
            "0.0.0.0",
            "fd00::1",
            "fd00::2",
            "2001:db8::1",
        ];
        let ports = [
            1, 7, 22, 53, 80, 100, 101, 443, 444, 8000, 8080, 9000, 9001, 65535,
        ];
        for a in addrs {
            let addr = judged_addr(a.parse::<IpAddr>().expect("ip"));
            for port in ports {
                assert_eq!(
                    index.connect(u128::from(addr), port, &p.network),
                    connect_by_scan(&p.network, addr, port),
                    "{a} port {port}"
                );
            }
        }
        for path in [
            "/usr/bin/git",
            "/usr/bin/gitx",
            "/usr/bin/python3",
            "/usr/bin/python3.12",
            "/usr/bin/py",
            "/usr/bin/p",
            "/usr/bin/",
            "/usr/bin",
            "/bin/sh",
            "/bin/shx",
            "/opt/é/x",
            "/opt/é",
            "/opt/e",
            "/opt",
            "",
            "/",
        ] {
            assert_eq!(index.exec(path), exec_by_scan(&p.exec, path), "{path:?}");
        }
        // Duplicates: the first in the file is reported.
        assert_eq!(index.exact("/usr/bin/git"), Some(0));
        assert_eq!(index.exec("/usr/bin/pyx"), Some(2));
    }

    /// A record's explanation against 60,000 rules costs lookups, not a pass over them.
    #[test]
    fn lookups_do_not_scan_a_large_policy() {
        let net: Vec<String> = (0..30_000u32)
            .map(|i| format!("\"10.{}.{}.1:443\"", i >> 8, i & 255))
            .collect();
        let exec: Vec<String> = (0..30_000).map(|i| format!("\"/opt/t{i}\"")).collect();
        let text = format!(
            "agent = \"big\"\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
            net.join(","),
            exec.join(",")
        );
        let p = Policy::parse(&text, Path::new("big.toml")).expect("valid");
        let started = std::time::Instant::now();
        let mut allowed = 0;
        for i in 0..20_000u32 {
            let addr = IpAddr::from([10, (i >> 8) as u8, i as u8, 1]);
            allowed += usize::from(p.check_connect(addr, 443).allowed);
            allowed += usize::from(p.check_exec(&format!("/opt/t{i}")).allowed);
        }
        assert_eq!(allowed, 40_000);
        // A pass over the rules per call would be 1.2 billion rule comparisons; lookups take
        // milliseconds.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
