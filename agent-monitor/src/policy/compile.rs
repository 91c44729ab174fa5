//! Compiling a policy set into the kernel's LPM-trie entries, and a pure model of the kernel lookup
//! so tests can prove the tables and the userspace evaluator agree.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use agent_monitor_common::{
    EXEC_KEY_AGENT_BITS, EXEC_PATH_LEN, ExecKey, MAX_PORT_RANGES, NET_KEY_AGENT_BITS, NetAllow,
    NetKey, PortRange,
};
use thiserror::Error;

use crate::policy::evaluate::{ExecFacts, judged_addr};
use crate::policy::model::{ExecRule, NetRule, PolicySet, prefix_contains, prefix_to_string};

/// Entries for the kernel allowlist maps. Each `u32` is the LPM prefix length in bits, counting
/// the agent index bits.
#[derive(Clone, Default)]
pub struct KernelTables {
    pub net: Vec<(u32, NetKey, NetAllow)>,
    pub exec: Vec<(u32, ExecKey)>,
}

impl KernelTables {
    /// The same entries with every agent index moved up by `base`. The daemon keeps two banks of
    /// agent indices so that a reload writes the new allowlists beside the old ones and switches
    /// each agent over in one map update.
    pub fn rebased(mut self, base: u32) -> KernelTables {
        for (_, key, _) in &mut self.net {
            key.agent += base;
        }
        for (_, key) in &mut self.exec {
            key.agent += base;
        }
        self
    }
}

/// A policy that is valid but does not fit the kernel's fixed-size entries.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error(
        "agent {agent:?} ({origin}): network prefix {prefix} needs {needed} port ranges once the rules covering it are merged; a kernel entry holds at most {max}",
        max = MAX_PORT_RANGES
    )]
    TooManyPortRanges {
        agent: String,
        origin: String,
        prefix: String,
        needed: usize,
    },
    #[error(
        "agent {agent:?} ({origin}): the host-name rules need {needed} port ranges once merged; an address learned from DNS can carry at most {max}",
        max = MAX_PORT_RANGES
    )]
    TooManyHostPortRanges {
        agent: String,
        origin: String,
        needed: usize,
    },
    #[error(transparent)]
    LearnedBudget(#[from] crate::policy::dns::LearnedBudgetError),
}

impl PolicySet {
    /// Builds every agent's kernel entries; output order is deterministic.
    pub fn compile(&self) -> Result<KernelTables, CapacityError> {
        let mut tables = KernelTables::default();
        // Each agent's share of the learned-address map must fit before anything is loaded.
        self.learned_limits()?;
        for (index, policy) in self.indexed() {
            // A name can match every host rule at once; its addresses must still fit one entry.
            let host_ports = policy.host_port_ranges();
            if !crate::policy::host::fits_kernel(&host_ports) {
                return Err(CapacityError::TooManyHostPortRanges {
                    agent: policy.agent().to_string(),
                    origin: policy.origin().display().to_string(),
                    needed: host_ports.len(),
                });
            }
            let origin = policy.origin().display().to_string();
            compile_net(
                index,
                policy.network(),
                policy.agent(),
                &origin,
                &mut tables.net,
            )?;
            compile_exec(index, policy.exec(), &mut tables.exec);
        }
        Ok(tables)
    }
}

/// Kernel entries of one task's grants, keyed by the task number (the grant maps have the same
/// key layout as the allowlists, with the task number where the agent index would be).
pub fn compile_grants(
    task_number: u32,
    task: &str,
    net: &[NetRule],
    exec: &[ExecRule],
) -> Result<KernelTables, CapacityError> {
    let mut tables = KernelTables::default();
    compile_net(task_number, net, task, "task grants", &mut tables.net)?;
    compile_exec(task_number, exec, &mut tables.exec);
    Ok(tables)
}

/// The kernel does one longest-prefix match and then checks the port, so each entry carries the
/// ports of every rule whose prefix covers it, not only its own.
fn compile_net(
    agent: u32,
    rules: &[NetRule],
    owner: &str,
    origin: &str,
    out: &mut Vec<(u32, NetKey, NetAllow)>,
) -> Result<(), CapacityError> {
    // Rules with the same prefix become one entry. Keyed (len, net) so covering prefixes come first.
    let mut own: BTreeMap<(u8, u128), Vec<PortRange>> = BTreeMap::new();
    for rule in rules {
        own.entry((rule.prefix_len(), u128::from(rule.net())))
            .or_default()
            .push(rule.ports());
    }
    for &(len, net) in own.keys() {
        let net = Ipv6Addr::from(net);
        let ranges: Vec<PortRange> = own
            .iter()
            .filter(|&(&(outer_len, outer), _)| {
                outer_len <= len && prefix_contains(Ipv6Addr::from(outer), outer_len, net)
            })
            .flat_map(|(_, ranges)| ranges.iter().copied())
            .collect();
        let merged = merge_ranges(ranges);
        if merged.len() > MAX_PORT_RANGES {
            return Err(CapacityError::TooManyPortRanges {
                agent: owner.to_string(),
                origin: origin.to_string(),
                prefix: prefix_to_string(net, len),
                needed: merged.len(),
            });
        }
        let mut allow = NetAllow {
            count: 0,
            ranges: [PortRange::default(); MAX_PORT_RANGES],
        };
        for (slot, range) in allow.ranges.iter_mut().zip(&merged) {
            *slot = *range;
            allow.count += 1;
        }
        let key = NetKey {
            agent,
            addr: net.octets(),
        };
        out.push((NET_KEY_AGENT_BITS + u32::from(len), key, allow));
    }
    Ok(())
}

/// Sorts and coalesces overlapping and adjacent ranges (`1-5` and `6-9` become `1-9`).
pub(crate) fn merge_ranges(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_by_key(|r| (r.lo, r.hi));
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(range.lo) <= u32::from(last.hi) + 1 => {
                last.hi = last.hi.max(range.hi);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Exact paths are keyed with their NUL inside the prefix, so `/bin/sh` does not match `/bin/shx`;
/// globs without it.
fn compile_exec(agent: u32, rules: &[ExecRule], out: &mut Vec<(u32, ExecKey)>) {
    let mut rules: Vec<(&str, bool)> = rules.iter().map(|r| (r.path(), r.prefix_glob())).collect();
    rules.sort_unstable();
    rules.dedup();
    for (path, glob) in rules {
        let bytes = path.as_bytes();
        // Validation guarantees the path fits (with its NUL when exact); zip cannot overrun.
        debug_assert!(bytes.len() + usize::from(!glob) <= EXEC_PATH_LEN);
        let mut key = ExecKey {
            agent,
            path: [0; EXEC_PATH_LEN],
        };
        for (slot, byte) in key.path.iter_mut().zip(bytes) {
            *slot = *byte;
        }
        let data_bytes = bytes.len() + usize::from(!glob);
        let bits = u32::try_from(data_bytes * 8).unwrap_or(u32::MAX);
        out.push((EXEC_KEY_AGENT_BITS + bits, key));
    }
}

impl KernelTables {
    /// What the kernel decides for a connect: one longest-prefix match on (agent, address), then the
    /// port against that entry's ranges.
    pub fn lookup_connect(&self, agent: u32, addr: IpAddr, port: u16) -> bool {
        let data = net_key_bytes(&NetKey {
            agent,
            addr: judged_addr(addr).octets(),
        });
        let best = self
            .net
            .iter()
            .filter(|(bits, key, _)| prefix_matches(&net_key_bytes(key), &data, *bits))
            .max_by_key(|(bits, _, _)| *bits);
        best.is_some_and(|(_, _, allow)| {
            allow
                .ranges
                .iter()
                .take(allow.count as usize)
                .any(|r| r.lo <= port && port <= r.hi)
        })
    }

    /// What the kernel decides for an exec: the looked-up data is the path and its NUL; a path that
    /// does not fit is denied.
    pub fn lookup_exec(&self, agent: u32, path: &str) -> bool {
        let bytes = path.as_bytes();
        if bytes.len() > EXEC_PATH_LEN - 1 || bytes.contains(&0) {
            return false;
        }
        let lookup = ExecKey {
            agent,
            path: crate::policy::evaluate::path_buffer(path),
        };
        // Like the kernel program: a path not in normal form is never looked up.
        if !agent_monitor_common::exec_path_is_normal(&lookup.path) {
            return false;
        }
        let data = exec_key_bytes(&lookup);
        self.exec
            .iter()
            .any(|(bits, key)| prefix_matches(&exec_key_bytes(key), &data, *bits))
    }
}

impl KernelTables {
    /// What the kernel exec program decides (exec.rs), given whether the file that runs is one the
    /// agent's exact rules name (`file_ok`, a lookup in the file-identity map the daemon fills).
    pub fn judge_exec(&self, agent: u32, facts: &ExecFacts<'_>, file_ok: bool) -> bool {
        let script = facts.interpreter.is_some();
        if !facts.initial_user_ns {
            return file_ok && !script;
        }
        let program = facts.interpreter.unwrap_or(facts.name);
        if !file_ok && !self.lookup_exec(agent, program) {
            return false;
        }
        !script || self.lookup_exec(agent, facts.name)
    }
}

/// The key's bytes as the kernel sees them (`#[repr(C)]`, no padding).
fn net_key_bytes(key: &NetKey) -> [u8; 20] {
    let mut bytes = [0; 20];
    bytes[..4].copy_from_slice(&key.agent.to_ne_bytes());
    bytes[4..].copy_from_slice(&key.addr);
    bytes
}

fn exec_key_bytes(key: &ExecKey) -> [u8; 4 + EXEC_PATH_LEN] {
    let mut bytes = [0; 4 + EXEC_PATH_LEN];
    bytes[..4].copy_from_slice(&key.agent.to_ne_bytes());
    bytes[4..].copy_from_slice(&key.path);
    bytes
}

/// Whether the first `bits` bits of `key` and `data` are equal, as the LPM trie compares them.
fn prefix_matches(key: &[u8], data: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    let (Some(k), Some(d)) = (key.get(..whole), data.get(..whole)) else {
        return false;
    };
    if k != d {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (key.get(whole), data.get(whole)) {
        (Some(k), Some(d)) => k & mask == d & mask,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::Path;

    use super::*;
    use crate::policy::model::Policy;

    fn policy(agent: &str, network: &[&str], exec: &[&str]) -> Policy {
        let text = format!(
            "agent = {agent:?}\n[network]\nallow = {network:?}\n[exec]\nallow = {exec:?}\n"
        );
        match Policy::parse(&text, Path::new(&format!("{agent}.toml"))) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn set(policies: Vec<Policy>) -> PolicySet {
        match PolicySet::new(policies) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn compile(policies: Vec<Policy>) -> KernelTables {
        match set(policies).compile() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn ranges(allow: &NetAllow) -> Vec<(u16, u16)> {
        allow.ranges[..allow.count as usize]
            .iter()
            .map(|r| (r.lo, r.hi))
            .collect()
    }

    /// The compiled entry for `prefix` (as `prefix_to_string` writes it) of agent 0.
    fn entry<'a>(t: &'a KernelTables, prefix: &str) -> &'a (u32, NetKey, NetAllow) {
        t.net
            .iter()
            .find(|(bits, key, _)| {
                let len = u8::try_from(bits - NET_KEY_AGENT_BITS).expect("prefix len");
                prefix_to_string(Ipv6Addr::from(key.addr), len) == prefix
            })
            .unwrap_or_else(|| panic!("no entry for {prefix}"))
    }

    #[test]
    fn merge_coalesces_overlapping_and_adjacent() {
        let r = |lo, hi| PortRange { lo, hi };
        let merged = merge_ranges(vec![
            r(10, 20),
            r(1, 5),
            r(6, 8),
            r(15, 30),
            r(40, 40),
            r(65535, 65535),
            r(0, 0),
        ]);
        let pairs: Vec<_> = merged.iter().map(|r| (r.lo, r.hi)).collect();
        assert_eq!(pairs, [(0, 8), (10, 30), (40, 40), (65535, 65535)]);
        let all = merge_ranges(vec![r(0, 65535), r(80, 80)]);
        assert_eq!(all, [r(0, 65535)]);
        assert!(merge_ranges(Vec::new()).is_empty());
    }

    #[test]
    fn ipv4_entry_key_and_prefix_length() {
        let t = compile(vec![policy("a", &["10.0.0.0/8:443"], &[])]);
        assert_eq!(t.net.len(), 1);
        let (bits, key, allow) = &t.net[0];
        assert_eq!(*bits, 32 + 96 + 8);
        assert_eq!(key.agent, 0);
        assert_eq!(
            key.addr,
            Ipv4Addr::new(10, 0, 0, 0).to_ipv6_mapped().octets()
        );
        assert_eq!(ranges(allow), [(443, 443)]);
        assert!(allow.ranges[1..].iter().all(|r| *r == PortRange::default()));
    }

    #[test]
    fn covered_entries_carry_the_covering_ports() {
        let t = compile(vec![policy(
            "a",
            &[
                "10.0.0.0/8:443",
                "10.1.0.0/16:8000-8100",
                "10.1.2.3:22",
                "10.2.0.0/16:444",
                "[::/0]:53",
            ],
            &[],
        )]);
        // ::/0 covers IPv4 too (::ffff:0:0/96 lies inside it), so its port 53 is everywhere.
        assert_eq!(ranges(&entry(&t, "::/0").2), [(53, 53)]);
        assert_eq!(ranges(&entry(&t, "10.0.0.0/8").2), [(53, 53), (443, 443)]);
        assert_eq!(
            ranges(&entry(&t, "10.1.0.0/16").2),
            [(53, 53), (443, 443), (8000, 8100)]
        );
        assert_eq!(
            ranges(&entry(&t, "10.1.2.3/32").2),
            [(22, 22), (53, 53), (443, 443), (8000, 8100)]
        );
        // Adjacent ranges from different rules coalesce.
        assert_eq!(ranges(&entry(&t, "10.2.0.0/16").2), [(53, 53), (443, 444)]);
        assert_eq!(t.net.len(), 5);
    }

    #[test]
    fn ipv6_zero_prefix_reaches_ipv4_entries() {
        let t = compile(vec![policy("a", &["[::/0]:53", "10.0.0.0/8:443"], &[])]);
        assert_eq!(ranges(&entry(&t, "10.0.0.0/8").2), [(53, 53), (443, 443)]);
        assert!(t.lookup_connect(0, "10.0.0.1".parse().expect("ip"), 53));
    }

    #[test]
    fn identical_prefixes_merge_into_one_entry() {
        let t = compile(vec![policy(
            "a",
            &[
                "10.0.0.0/8:443",
                "10.0.0.0/8:80",
                "[::ffff:10.0.0.0/104]:81",
                "10.0.0.0/8:443",
            ],
            &[],
        )]);
        assert_eq!(t.net.len(), 1);
        assert_eq!(ranges(&t.net[0].2), [(80, 81), (443, 443)]);
    }

    #[test]
    fn sibling_prefixes_do_not_share_ports() {
        let t = compile(vec![policy("a", &["10.1.0.0/16:1", "10.2.0.0/16:2"], &[])]);
        assert_eq!(ranges(&entry(&t, "10.1.0.0/16").2), [(1, 1)]);
        assert_eq!(ranges(&entry(&t, "10.2.0.0/16").2), [(2, 2)]);
    }

    #[test]
    fn agents_get_their_own_keys() {
        let t = compile(vec![
            policy("zed", &["10.0.0.0/8:1"], &["/bin/z"]),
            policy("abe", &["10.0.0.0/8:2"], &["/bin/a"]),
        ]);
        let agents: Vec<_> = t.net.iter().map(|(_, k, a)| (k.agent, ranges(a))).collect();
        assert_eq!(agents, [(0, vec![(2, 2)]), (1, vec![(1, 1)])]);
        let ip = "10.0.0.1".parse().expect("ip");
        assert!(t.lookup_connect(0, ip, 2) && !t.lookup_connect(0, ip, 1));
        assert!(t.lookup_connect(1, ip, 1) && !t.lookup_connect(1, ip, 2));
        assert!(!t.lookup_connect(2, ip, 1));
        assert!(t.lookup_exec(0, "/bin/a") && !t.lookup_exec(0, "/bin/z"));
        assert!(t.lookup_exec(1, "/bin/z") && !t.lookup_exec(1, "/bin/a"));
    }

    #[test]
    fn too_many_port_ranges_is_a_capacity_error() {
        let ports: Vec<String> = (0..=MAX_PORT_RANGES)
            .map(|i| format!("10.0.0.0/8:{}", 100 + 2 * i))
            .collect();
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let err = set(vec![policy("coder", &ports, &[])])
            .compile()
            .err()
            .expect("capacity");
        assert_eq!(
            err.to_string(),
            "agent \"coder\" (coder.toml): network prefix 10.0.0.0/8 needs 17 port ranges once the rules covering it are merged; a kernel entry holds at most 16"
        );
    }

    #[test]
    fn capacity_counts_covering_ranges() {
        // 16 ranges on the /8 fit; one more on a /16 inside it does not fit that /16's entry.
        let mut rules: Vec<String> = (0..MAX_PORT_RANGES)
            .map(|i| format!("10.0.0.0/8:{}", 100 + 2 * i))
            .collect();
        let ok = rules.iter().map(String::as_str).collect::<Vec<_>>();
        assert!(set(vec![policy("a", &ok, &[])]).compile().is_ok());
        rules.push("10.1.0.0/16:9".into());
        let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
        let err = set(vec![policy("a", &rules, &[])])
            .compile()
            .err()
            .expect("capacity");
        assert!(
            err.to_string()
                .contains("network prefix 10.1.0.0/16 needs 17 port ranges"),
            "{err}"
        );
        // Ranges that coalesce do not count twice.
        let adjacent: Vec<String> = (1..=40).map(|p| format!("10.0.0.0/8:{p}")).collect();
        let adjacent: Vec<&str> = adjacent.iter().map(String::as_str).collect();
        let t = compile(vec![policy("a", &adjacent, &[])]);
        assert_eq!(ranges(&t.net[0].2), [(1, 40)]);
    }

    #[test]
    fn exec_prefix_lengths_and_keys() {
        let t = compile(vec![policy(
            "a",
            &[],
            &["/bin/sh", "/usr/bin/python3*", "/bin/sh"],
        )]);
        assert_eq!(t.exec.len(), 2, "duplicates collapse");
        let find = |bits: u32| {
            t.exec
                .iter()
                .find(|(b, _)| *b == bits)
                .unwrap_or_else(|| panic!("no exec entry with {bits} bits"))
        };
        // Exact: the 7 bytes and the NUL.
        let (_, key) = find(32 + 8 * 8);
        assert_eq!(&key.path[..8], b"/bin/sh\0");
        assert!(key.path[8..].iter().all(|&b| b == 0));
        // Glob: the 16 prefix bytes, no NUL.
        let (_, key) = find(32 + 8 * 16);
        assert_eq!(&key.path[..16], b"/usr/bin/python3");
        assert!(key.path[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn exec_lookup_exact_versus_glob() {
        let t = compile(vec![policy("a", &[], &["/bin/sh", "/usr/bin/python3*"])]);
        assert!(t.lookup_exec(0, "/bin/sh"));
        assert!(!t.lookup_exec(0, "/bin/shx"));
        assert!(!t.lookup_exec(0, "/bin/s"));
        assert!(t.lookup_exec(0, "/usr/bin/python3"));
        assert!(t.lookup_exec(0, "/usr/bin/python3.12"));
        assert!(!t.lookup_exec(0, "/usr/bin/python"));
    }

    #[test]
    fn exec_lookup_length_limit() {
        let t = compile(vec![policy("a", &[], &["/*"])]);
        let max = format!("/{}", "x".repeat(EXEC_PATH_LEN - 2));
        assert!(t.lookup_exec(0, &max));
        assert!(!t.lookup_exec(0, &format!("{max}x")));
        let exact_max = format!("/{}", "y".repeat(EXEC_PATH_LEN - 2));
        let t = compile(vec![policy("a", &[], &[exact_max.as_str()])]);
        assert_eq!(t.exec[0].0, 32 + 8 * EXEC_PATH_LEN as u32);
        assert!(t.lookup_exec(0, &exact_max));
    }

    #[test]
    fn prefix_matches_counts_bits() {
        assert!(prefix_matches(&[0b1010_0000], &[0b1011_1111], 3));
        assert!(!prefix_matches(&[0b1010_0000], &[0b1011_1111], 4));
        assert!(prefix_matches(&[1, 2], &[1, 3], 8));
        assert!(prefix_matches(&[1], &[9], 0));
        assert!(!prefix_matches(&[1], &[1], 9));
    }

    /// A tiny deterministic generator, so the agreement test needs no extra crates.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 16
        }
    }

    fn agreement_set() -> PolicySet {
        set(vec![
            policy(
                "coder",
                &[
                    "127.0.0.1:8080",
                    "10.0.0.0/8:443",
                    "10.1.0.0/16:8000-8100",
                    "10.1.2.0/24:22",
                    "10.1.2.128/25:444",
                    "192.168.1.5:1000-2000",
                    "[::1]:8080",
                    "[fd00::/8]:*",
                    "[fd00:1::/32]:80",
                    "[::ffff:172.16.0.0/108]:5432",
                ],
                &[
                    "/usr/bin/git",
                    "/bin/sh",
                    "/usr/bin/python3*",
                    "/usr/lib/*",
                    "/usr/lib/x/y",
                ],
            ),
            policy(
                "reviewer",
                &["0.0.0.0/0:443", "[2001:db8::/32]:1-1024", "10.1.2.3:*"],
                &["/usr/bin/*", "/bin/sh"],
            ),
            policy("open", &["[::/0]:*"], &["/*"]),
            policy("closed", &[], &[]),
        ])
    }

    fn candidate_addrs(set: &PolicySet, rng: &mut Lcg) -> Vec<IpAddr> {
        let mut addrs = Vec::new();
        for policy in set {
            for rule in policy.network() {
                let net = u128::from(rule.net());
                let host_mask = !crate::policy::model::prefix_mask(rule.prefix_len());
                let last = net | host_mask;
                // The edges of every prefix, and one step outside them.
                for a in [
                    net,
                    last,
                    net.wrapping_sub(1),
                    last.wrapping_add(1),
                    net | (host_mask & 0x5a5a),
                ] {
                    addrs.push(IpAddr::V6(Ipv6Addr::from(a)));
                    if let Some(v4) = Ipv6Addr::from(a).to_ipv4_mapped() {
                        addrs.push(IpAddr::V4(v4));
                    }
                }
            }
        }
        for _ in 0..300 {
            let v4 = Ipv4Addr::from((rng.next() as u32) & 0x0fff_ffff | 0x0a00_0000);
            addrs.push(IpAddr::V4(v4));
            addrs.push(IpAddr::V4(Ipv4Addr::from(rng.next() as u32)));
            let hi = u128::from(rng.next()) << 64 | u128::from(rng.next());
            addrs.push(IpAddr::V6(Ipv6Addr::from(hi)));
            addrs.push(IpAddr::V6(Ipv6Addr::from(
                hi & 0x00ff_ffff_ffff_ffff_ffff_ffff_ffff_ffff | 0xfd00 << 112,
            )));
        }
        addrs
    }

    fn candidate_ports(set: &PolicySet, rng: &mut Lcg) -> Vec<u16> {
        let mut ports = vec![0, 1, 80, 65534, 65535];
        for policy in set {
            for rule in policy.network() {
                let r = rule.ports();
                ports.extend([r.lo, r.hi, r.lo.saturating_sub(1), r.hi.saturating_add(1)]);
            }
        }
        ports.extend((0..20).map(|_| rng.next() as u16));
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn candidate_paths(set: &PolicySet) -> Vec<String> {
        let mut paths = vec![
            String::new(),
            "/".into(),
            "/bin/bash".into(),
            "/usr/bin/git\0".into(),
            format!("/{}", "a".repeat(EXEC_PATH_LEN - 2)),
            format!("/{}", "a".repeat(EXEC_PATH_LEN - 1)),
            format!("/usr/bin/{}", "p".repeat(EXEC_PATH_LEN)),
        ];
        for policy in set {
            for rule in policy.exec() {
                let p = rule.path();
                paths.push(p.to_string());
                paths.push(format!("{p}x"));
                paths.push(format!("{p}/sub"));
                paths.push(p[..p.len() - 1].to_string());
                paths.push(p.to_uppercase());
            }
        }
        paths
    }

    #[test]
    fn kernel_tables_agree_with_evaluator() {
        let set = agreement_set();
        let tables = match set.compile() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let mut rng = Lcg(0x5eed);
        let addrs = candidate_addrs(&set, &mut rng);
        let ports = candidate_ports(&set, &mut rng);
        let paths = candidate_paths(&set);
        let mut checked = 0;
        for (index, policy) in set.indexed() {
            for &addr in &addrs {
                for &port in &ports {
                    let evaluator = policy.check_connect(addr, port);
                    let kernel = tables.lookup_connect(index, addr, port);
                    assert_eq!(
                        kernel,
                        evaluator.allowed,
                        "agent {} connect {addr} port {port}: kernel {kernel}, evaluator {evaluator}",
                        policy.agent()
                    );
                    checked += 1;
                }
            }
            for path in &paths {
                let evaluator = policy.check_exec(path);
                let kernel = tables.lookup_exec(index, path);
                assert_eq!(
                    kernel,
                    evaluator.allowed,
                    "agent {} exec {path:?}: kernel {kernel}, evaluator {evaluator}",
                    policy.agent()
                );
            }
        }
        assert!(checked > 10_000, "only {checked} cases");
    }

    /// The exec program's decision from the kernel's facts (name, interpreter, file identity, user
    /// namespace) and `check_exec_facts` agree.
    #[test]
    fn exec_facts_agree_with_evaluator() {
        let set = agreement_set();
        let tables = set.compile().expect("fits");
        let paths = candidate_paths(&set);
        let mut interpreters: Vec<Option<&str>> = vec![None];
        interpreters.extend(
            [
                "/bin/sh",
                "/usr/bin/perl",
                "/usr/bin/python3.12",
                "/bin//sh",
            ]
            .map(Some),
        );
        let mut checked = 0;
        for (index, policy) in set.indexed() {
            let mut files: Vec<Option<&str>> = vec![None];
            files.extend(
                policy
                    .exec()
                    .iter()
                    .filter(|r| !r.prefix_glob())
                    .map(|r| Some(r.path())),
            );
            for name in &paths {
                for &interpreter in &interpreters {
                    for &file_rule in &files {
                        for initial_user_ns in [true, false] {
                            let facts = ExecFacts {
                                name,
                                interpreter,
                                file_rule,
                                initial_user_ns,
                            };
                            let evaluator = policy.check_exec_facts(&facts);
                            let kernel = tables.judge_exec(index, &facts, file_rule.is_some());
                            assert_eq!(
                                kernel,
                                evaluator.allowed,
                                "agent {} {facts:?}: kernel {kernel}, evaluator {evaluator}",
                                policy.agent()
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 3_000, "only {checked} cases");
    }

    #[test]
    fn keys_are_unique_per_table() {
        let tables = agreement_set().compile().expect("fits");
        let mut net: Vec<_> = tables
            .net
            .iter()
            .map(|(b, k, _)| (*b, net_key_bytes(k)))
            .collect();
        let n = net.len();
        net.sort_unstable();
        net.dedup();
        assert_eq!(net.len(), n);
        let mut exec: Vec<_> = tables
            .exec
            .iter()
            .map(|(b, k)| (*b, exec_key_bytes(k).to_vec()))
            .collect();
        let n = exec.len();
        exec.sort_unstable();
        exec.dedup();
        assert_eq!(exec.len(), n);
    }
}
