//! What the tables compute without a kernel: capacities, room checks, keys.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_monitor_common::{self as common, DnsProxy};
use aya::maps::MapError;

use super::dns::{learned_key, proxy_port_keys};
use super::identity::filter_bit_shared;
use super::{Occupancy, OpContext as _, TableError, capacity_or, check_room, tag_capacity};

#[test]
fn the_tag_map_holds_every_thread_id_the_kernel_can_hand_out() {
    assert_eq!(tag_capacity(Some(4_194_304)), 4_194_304);
    assert_eq!(tag_capacity(Some(32_768)), common::MAX_TAGGED_TASKS);
    assert_eq!(tag_capacity(None), common::MAX_TAGGED_TASKS);
}

#[test]
fn a_new_bank_must_fit_beside_the_one_in_force() {
    // Exactly full is fine: both banks are in the map only during the swap.
    assert!(check_room("network", 60, 40, 100).is_ok());
    assert!(check_room("network", 0, 100, 100).is_ok());
    let err = check_room("exec", 61, 40, 100).unwrap_err();
    assert!(matches!(
        err,
        TableError::NoRoom {
            have: 61,
            now: 40,
            cap: 100,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "the policies compile to 61 exec allowlist entries; with the 40 in force the kernel map \
         (capacity 100) cannot hold both during the swap"
    );
}

#[test]
fn room_check_does_not_overflow_on_huge_tables() {
    assert!(check_room("network", usize::MAX, u64::MAX, u32::MAX).is_err());
}

#[test]
fn occupancy_reports_the_kernels_capacity_else_the_built_in_one() {
    // The tag map is sized at load from pid_max: the kernel's figure wins.
    assert_eq!(
        capacity_or(Some(4_194_304), common::MAX_TAGGED_TASKS),
        4_194_304
    );
    assert_eq!(capacity_or(None, common::MAX_AGENTS), common::MAX_AGENTS);
    let o = Occupancy::new("AGENT_TABLES", 3, common::MAX_AGENTS);
    assert_eq!(
        (o.map.as_str(), o.used, o.capacity),
        ("AGENT_TABLES", 3, u64::from(common::MAX_AGENTS))
    );
}

#[test]
fn learned_ipv4_addresses_are_keyed_as_the_kernel_compares_them() {
    let v4 = learned_key(7, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    assert_eq!(v4.agent, 7);
    assert_eq!(
        v4.addr,
        Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets(),
        "::ffff:192.0.2.1"
    );
    let addr: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let v6 = learned_key(9, IpAddr::V6(addr));
    assert_eq!((v6.agent, v6.addr), (9, addr.octets()));
}

#[test]
fn a_dns_proxy_claims_only_the_ports_it_has() {
    let ports = DnsProxy {
        udp4: 5353,
        tcp4: 5353,
        udp6: 0,
        tcp6: 5354,
    };
    let keys = proxy_port_keys(&ports);
    assert_eq!(
        keys,
        vec![
            common::dns_proxy_port_key(5353, false, false),
            common::dns_proxy_port_key(5353, false, true),
            common::dns_proxy_port_key(5354, true, true),
        ]
    );
    // The same port number over UDP and TCP is two endpoints.
    assert_ne!(keys[0], keys[1]);
    let none = DnsProxy {
        udp4: 0,
        tcp4: 0,
        udp6: 0,
        tcp6: 0,
    };
    assert!(proxy_port_keys(&none).is_empty());
}

#[test]
fn a_pre_filter_bit_stays_while_another_agent_cgroup_hashes_to_it() {
    let id = 0x1234_5678u64;
    // Same word and bit: the word index wraps around the filter.
    let twin = id + 64 * u64::from(common::AGENT_CGROUP_FILTER_WORDS);
    assert_eq!(
        common::agent_cgroup_filter_slot(id),
        common::agent_cgroup_filter_slot(twin)
    );
    let neighbour = id + 1; // same word, another bit
    let ids: HashSet<u64> = [twin, neighbour].into();
    assert!(filter_bit_shared(&ids, id));
    let ids: HashSet<u64> = [neighbour].into();
    assert!(!filter_bit_shared(&ids, id));
    // The cgroup's own id does not keep its bit.
    let ids: HashSet<u64> = [id].into();
    assert!(!filter_bit_shared(&ids, id));
}

#[test]
fn a_failed_map_operation_names_what_failed_and_keeps_the_cause() {
    let err = Err::<(), _>(MapError::KeyNotFound)
        .op("removing from the agent table")
        .unwrap_err();
    assert_eq!(err.to_string(), "removing from the agent table");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(
        chain.starts_with("removing from the agent table: "),
        "{chain}"
    );
    assert!(
        chain.len() > "removing from the agent table: ".len(),
        "{chain}"
    );
}
