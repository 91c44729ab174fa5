//! Addresses agents learned from DNS answers: which name gave an agent which address, for which
//! ports, until when. The daemon's copy of the kernel's `DNS_LEARNED` map, from which each kernel
//! value is computed; also names the host behind a connect (`DEST_HOST`). Pure.

use std::collections::HashMap;
use std::net::IpAddr;

use agent_monitor_common::{Learned, MAX_PORT_RANGES, NetAllow, PortRange};

use crate::policy::compile::merge_ranges;

/// One name's answer that gave the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The name the agent asked (normalised).
    pub name: String,
    /// The rules that allowed the name, as written.
    pub rule: String,
    /// CLOCK_MONOTONIC ns.
    pub expires_ns: u64,
    pub ports: Vec<PortRange>,
}

/// What the kernel map must hold for one (agent, address) after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelChange {
    Write(u32, IpAddr, Learned),
    Remove(u32, IpAddr),
}

#[derive(Default)]
pub struct LearnedTable {
    grants: HashMap<(u32, IpAddr), Vec<Grant>>,
}

impl LearnedTable {
    /// Records that `grant.name` resolved to `addr` for `agent`; returns the kernel value for
    /// (agent, addr): the union of the ports of every live grant, until the latest expiry. A newer
    /// answer for the same name replaces the older one.
    pub fn learn(&mut self, agent: u32, addr: IpAddr, grant: Grant, now_ns: u64) -> Learned {
        let grants = self.grants.entry((agent, canonical(addr))).or_default();
        grants.retain(|g| g.name != grant.name && g.expires_ns > now_ns);
        grants.push(grant);
        kernel_value(grants)
    }

    /// Drops the grant just added for `name` when the kernel write failed, so the table never
    /// claims what the kernel does not hold.
    pub fn unlearn(&mut self, agent: u32, addr: IpAddr, name: &str) {
        let key = (agent, canonical(addr));
        if let Some(grants) = self.grants.get_mut(&key) {
            grants.retain(|g| g.name != name);
            if grants.is_empty() {
                self.grants.remove(&key);
            }
        }
    }

    /// Forgets expired grants; returns the kernel writes that keep the map equal to the table.
    pub fn expire(&mut self, now_ns: u64) -> Vec<KernelChange> {
        let mut changes = Vec::new();
        self.grants.retain(|&(agent, addr), grants| {
            let before = grants.len();
            grants.retain(|g| g.expires_ns > now_ns);
            if grants.is_empty() {
                changes.push(KernelChange::Remove(agent, addr));
                false
            } else {
                if grants.len() != before {
                    changes.push(KernelChange::Write(agent, addr, kernel_value(grants)));
                }
                true
            }
        });
        changes
    }

    /// The live grant that covers `port` on `addr` for `agent` (the latest to expire), or any
    /// grant for the address: the host a connect went to, for reports.
    pub fn lookup(&self, agent: u32, addr: IpAddr, port: u16) -> Option<&Grant> {
        let grants = self.grants.get(&(agent, canonical(addr)))?;
        grants
            .iter()
            .filter(|g| g.ports.iter().any(|r| r.lo <= port && port <= r.hi))
            .max_by_key(|g| g.expires_ns)
            .or_else(|| grants.iter().max_by_key(|g| g.expires_ns))
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }
}

/// The kernel compares IPv4 destinations as `::ffff:a.b.c.d`; so does the table.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn kernel_value(grants: &[Grant]) -> Learned {
    let merged = merge_ranges(
        grants
            .iter()
            .flat_map(|g| g.ports.iter().copied())
            .collect(),
    );
    let mut ports = NetAllow {
        count: 0,
        ranges: [PortRange::default(); MAX_PORT_RANGES],
    };
    // Policy compilation checked that every host rule's ports together fit one entry.
    for (slot, r) in ports.ranges.iter_mut().zip(&merged) {
        *slot = *r;
        ports.count += 1;
    }
    Learned {
        expires_ns: grants.iter().map(|g| g.expires_ns).max().unwrap_or(0),
        ports,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str, expires_ns: u64, ports: &[(u16, u16)]) -> Grant {
        Grant {
            name: name.into(),
            rule: format!("{name}:x"),
            expires_ns,
            ports: ports.iter().map(|&(lo, hi)| PortRange { lo, hi }).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("addr")
    }

    fn ranges(l: &Learned) -> Vec<(u16, u16)> {
        l.ports.ranges[..l.ports.count as usize]
            .iter()
            .map(|r| (r.lo, r.hi))
            .collect()
    }

    #[test]
    fn two_names_on_one_address_merge_ports_and_keep_the_latest_expiry() {
        let mut t = LearnedTable::default();
        let a = ip("10.0.0.1");
        let v = t.learn(0, a, grant("a.test", 100, &[(443, 443)]), 0);
        assert_eq!((v.expires_ns, ranges(&v)), (100, vec![(443, 443)]));
        let v = t.learn(0, a, grant("b.test", 50, &[(80, 80)]), 0);
        assert_eq!(
            (v.expires_ns, ranges(&v)),
            (100, vec![(80, 80), (443, 443)])
        );
        assert_eq!(t.lookup(0, a, 80).map(|g| g.name.as_str()), Some("b.test"));
        assert_eq!(t.lookup(0, a, 443).map(|g| g.name.as_str()), Some("a.test"));
        assert_eq!(t.lookup(0, a, 22).map(|g| g.name.as_str()), Some("a.test"));
        assert!(
            t.lookup(1, a, 443).is_none(),
            "another agent learned nothing"
        );

        // b.test expires first: the kernel value loses port 80.
        let changes = t.expire(60);
        assert_eq!(changes.len(), 1);
        match &changes[0] {
            KernelChange::Write(0, addr, v) => {
                assert_eq!(*addr, a);
                assert_eq!(ranges(v), [(443, 443)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.expire(100), [KernelChange::Remove(0, a)]);
        assert_eq!(t.len(), 0);
        assert!(t.expire(200).is_empty());
    }

    #[test]
    fn a_new_answer_for_the_same_name_replaces_the_old() {
        let mut t = LearnedTable::default();
        let a = ip("10.0.0.2");
        t.learn(3, a, grant("a.test", 100, &[(1, 2)]), 0);
        let v = t.learn(3, a, grant("a.test", 40, &[(443, 443)]), 0);
        assert_eq!((v.expires_ns, ranges(&v)), (40, vec![(443, 443)]));
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_address() {
        let mut t = LearnedTable::default();
        t.learn(0, ip("::ffff:10.0.0.3"), grant("a.test", 10, &[(1, 1)]), 0);
        assert!(t.lookup(0, ip("10.0.0.3"), 1).is_some());
        t.unlearn(0, ip("10.0.0.3"), "a.test");
        assert_eq!(t.len(), 0);
    }
}
