use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::lookup::{exec_key_bytes, net_key_bytes, prefix_matches};
use super::*;
use crate::policy::evaluate::ExecFacts;
use crate::policy::model::Policy;

fn policy(agent: &str, network: &[&str], exec: &[&str]) -> Policy {
    crate::policy::test_policy(
        agent,
        &format!("[network]\nallow = {network:?}\n[exec]\nallow = {exec:?}\n"),
    )
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

/// The definition: an entry's ports are those of every rule whose prefix covers it.
fn covering_ports_by_definition(rules: &[NetRule], len: u8, net: u128) -> Vec<PortRange> {
    merge_ranges(
        rules
            .iter()
            .filter(|r| {
                r.prefix_len() <= len
                    && crate::policy::model::prefix_contains(
                        r.net(),
                        r.prefix_len(),
                        Ipv6Addr::from(net),
                    )
            })
            .map(NetRule::ports)
            .collect(),
    )
}

#[test]
fn nearest_cover_merging_matches_the_definition() {
    let mut rng = Lcg(7);
    // Nested prefixes of a few lengths in a small space, so that many cover each other.
    let lens = [96u8, 100, 104, 112, 116, 120, 124, 128];
    let mut entries: Vec<String> = Vec::new();
    for _ in 0..400 {
        let len = lens[(rng.next() % lens.len() as u64) as usize];
        let addr = 0x0a00_0000u32 | (rng.next() as u32 & 0x0000_ffff);
        let v4_len = len - 96;
        let mask = if v4_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(v4_len))
        };
        // At most 15 distinct, non-adjacent ports: every entry fits.
        let port = 1 + 2 * (rng.next() % 15) as u16;
        entries.push(format!("{}/{v4_len}:{port}", Ipv4Addr::from(addr & mask)));
    }
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    let p = policy("a", &entries, &[]);
    let mut out = Vec::new();
    compile_net(0, p.network(), "a", "a.toml", &mut out).expect("fits");
    assert!(out.len() > 50, "only {} entries", out.len());
    let mut covered = 0;
    for (bits, key, allow) in &out {
        let len = u8::try_from(bits - NET_KEY_AGENT_BITS).expect("len");
        let want = covering_ports_by_definition(p.network(), len, u128::from_be_bytes(key.addr));
        let own = p
            .network()
            .iter()
            .filter(|r| r.prefix_len() == len && r.net().octets() == key.addr)
            .count();
        if want.len() > own {
            covered += 1;
        }
        assert_eq!(
            allow.ranges[..allow.count as usize],
            want[..],
            "{}",
            prefix_to_string(Ipv6Addr::from(key.addr), len)
        );
    }
    assert!(
        covered > 20,
        "only {covered} entries inherit covering ports"
    );
}

/// 60,000 network rules compile in well under a second in release (the pairwise cover check
/// took minutes); the bound here is generous for a debug build.
#[test]
fn large_network_allowlist_compiles_in_linear_time() {
    let n = 60_000u32;
    let rules: Vec<NetRule> = (0..n)
        .map(|i| {
            let v4 = Ipv4Addr::from(0x0a00_0000 | (i << 4));
            let (net, len) = if i % 10 == 0 {
                (Ipv4Addr::from(u32::from(v4) & !0xff), 24)
            } else {
                (v4, 32)
            };
            NetRule {
                net: net.to_ipv6_mapped(),
                prefix_len: 96 + len,
                ports: PortRange { lo: 443, hi: 443 },
                text: String::new(),
                line: 0,
            }
        })
        .collect();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    compile_net(0, &rules, "big", "big.toml", &mut out).expect("fits");
    assert!(out.len() > 50_000);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "compiling {n} rules took {:?}",
        started.elapsed()
    );
}

fn v4_entries(n: u32, first: u32) -> Vec<String> {
    (first..first + n)
        .map(|i| format!("{}:443", Ipv4Addr::from(0x0a00_0000 | i)))
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn network_entries_up_to_one_bank_fit_and_one_more_names_the_file_and_limit() {
    let at_limit = v4_entries(NET_ENTRIES_PER_SET, 0);
    let t = compile(vec![policy("big", &strs(&at_limit), &[])]);
    assert_eq!(t.net.len(), NET_ENTRIES_PER_SET as usize);
    // Duplicates merge before counting: the same limit still fits.
    let mut dup = at_limit.clone();
    dup.extend(v4_entries(100, 0));
    assert!(set(vec![policy("big", &strs(&dup), &[])]).compile().is_ok());

    let over = v4_entries(NET_ENTRIES_PER_SET + 1, 0);
    let err = set(vec![policy("big", &strs(&over), &[])])
        .compile()
        .err()
        .expect("over capacity");
    assert_eq!(
        err.to_string(),
        "big.toml: 32769 entries: the policies compile to 32769 network allowlist entries; at most 32768 fit (NET_ALLOW holds 65536, and a reload or restart writes the new entries beside those in force)"
    );
}

#[test]
fn exec_entries_over_the_limit_name_every_contributing_file_largest_first() {
    let paths = |agent: &str, n: u32| -> Vec<String> {
        (0..n).map(|i| format!("/opt/{agent}/tool{i}")).collect()
    };
    let a = paths("a", 20_000);
    let b = paths("b", 12_769);
    let c = paths("c", 1);
    let err = set(vec![
        policy("a", &[], &strs(&a)),
        policy("b", &[], &strs(&b)),
        policy("c", &[], &strs(&c)),
    ])
    .compile()
    .err()
    .expect("over capacity");
    assert_eq!(
        err,
        CapacityError::TooManyEntries {
            table: "exec allowlist",
            map: "EXEC_ALLOW",
            needed: 32_770,
            limit: EXEC_ENTRIES_PER_SET,
            capacity: MAX_EXEC_ENTRIES,
            by_file: "a.toml: 20000 entries, b.toml: 12769 entries, c.toml: 1 entry".into(),
        }
    );
    // One entry fewer fits.
    let b = paths("b", 12_767);
    assert!(
        set(vec![
            policy("a", &[], &strs(&a)),
            policy("b", &[], &strs(&b)),
            policy("c", &[], &strs(&c)),
        ])
        .compile()
        .is_ok()
    );
}

#[test]
fn by_file_names_five_files_and_sums_the_rest() {
    let counts = (1..=8).map(|i| (format!("p{i}.toml"), i));
    assert_eq!(
        by_file(counts, ("entry", "entries")),
        "p8.toml: 8 entries, p7.toml: 7 entries, p6.toml: 6 entries, p5.toml: 5 entries, \
         p4.toml: 4 entries, 3 more files: 6 entries"
    );
    let counts = [("b.toml".to_string(), 1), ("a.toml".to_string(), 0)];
    assert_eq!(by_file(counts, ("entry", "entries")), "b.toml: 1 entry");
}

#[test]
fn more_agents_than_the_agent_table_holds_is_a_capacity_error() {
    let policies: Vec<Policy> = (0..=MAX_AGENTS)
        .map(|i| policy(&format!("a{i}"), &[], &[]))
        .collect();
    let err = set(policies).compile().err().expect("over capacity");
    assert_eq!(
        err.to_string(),
        "4097 policies (agents): the kernel's agent table (AGENT_TABLES) holds at most 4096"
    );
}

#[test]
fn more_uid_selectors_than_their_map_holds_is_a_capacity_error() {
    let uids = |from: u32, n: u32| -> String {
        (from..from + n)
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with_uids = |agent: &str, list: String| {
        let text = format!("agent = {agent:?}\n[identity]\nuids = [{list}]\n");
        Policy::parse(&text, Path::new(&format!("{agent}.toml"))).expect("valid")
    };
    // Repeats of one uid are one kernel entry.
    let fits = set(vec![
        with_uids("a", uids(10_000, 1000)),
        with_uids("b", format!("{}, 20000", uids(20_000, 24))),
    ]);
    assert!(fits.compile().is_ok());
    let over = set(vec![
        with_uids("a", uids(10_000, 1000)),
        with_uids("b", uids(20_000, 25)),
    ]);
    assert_eq!(
        over.compile().err().expect("over").to_string(),
        "a.toml: 1000 selectors, b.toml: 25 selectors: the policies have 1025 uid selectors; the kernel map UID_SELECTORS holds at most 1024"
    );
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
