//! Addresses agents learned from DNS answers: which name gave an agent which address, for which
//! ports, until when. The daemon's copy of the kernel's `DNS_LEARNED` map, from which each kernel
//! value is computed; also names the host behind a connect (`DEST_HOST`), and holds each agent to
//! its share of the map (`dns.max_learned`), so no agent can fill what the others need. Pure.

use std::collections::{HashMap, HashSet};
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

/// The agent holds as many learned addresses as its limit allows: a new one is not learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtLimit {
    pub limit: u32,
}

#[derive(Default)]
pub struct LearnedTable {
    grants: HashMap<(u32, IpAddr), Vec<Grant>>,
    /// Addresses held, by agent.
    held: HashMap<u32, u32>,
    /// Addresses each agent may hold (`PolicySet::learned_limits`); an agent without an entry
    /// may hold none.
    limits: HashMap<u32, u32>,
}

impl LearnedTable {
    /// Records that `grant.name` resolved to `addr` for `agent`; returns the kernel value for
    /// (agent, addr): the union of the ports of every live grant, until the latest expiry. A newer
    /// answer for the same name replaces the older one. An address the agent does not hold yet is
    /// refused when it holds its limit already (an address it holds is refreshed either way).
    pub fn learn(
        &mut self,
        agent: u32,
        addr: IpAddr,
        grant: Grant,
        now_ns: u64,
    ) -> Result<Learned, AtLimit> {
        let key = (agent, canonical(addr));
        if !self.grants.contains_key(&key) {
            let limit = self.limit(agent);
            if self.held(agent) >= limit {
                return Err(AtLimit { limit });
            }
            *self.held.entry(agent).or_default() += 1;
        }
        let grants = self.grants.entry(key).or_default();
        grants.retain(|g| g.name != grant.name && g.expires_ns > now_ns);
        grants.push(grant);
        Ok(kernel_value(grants))
    }

    /// Drops the grant just added for `name` when the kernel write failed, so the table never
    /// claims what the kernel does not hold.
    pub fn unlearn(&mut self, agent: u32, addr: IpAddr, name: &str) {
        let key = (agent, canonical(addr));
        if let Some(grants) = self.grants.get_mut(&key) {
            grants.retain(|g| g.name != name);
            if grants.is_empty() {
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: (u32, IpAddr)) {
        if self.grants.remove(&key).is_some()
            && let Some(n) = self.held.get_mut(&key.0)
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Addresses `agent` holds.
    pub fn held(&self, agent: u32) -> u32 {
        self.held.get(&agent).copied().unwrap_or(0)
    }

    /// Addresses `agent` may hold.
    pub fn limit(&self, agent: u32) -> u32 {
        self.limits.get(&agent).copied().unwrap_or(0)
    }

    /// What a reload carries into the new bank: every live address of the agents in `limits`, at
    /// most each agent's new limit of them (those that expire last). Does not change the table:
    /// the reload may still fail; [`LearnedTable::set_limits`] then makes the same choice.
    pub fn carried(&self, limits: &HashMap<u32, u32>, now_ns: u64) -> Vec<(u32, IpAddr, Learned)> {
        let mut by_agent: HashMap<u32, Vec<(u64, IpAddr, Learned)>> = HashMap::new();
        for (&(agent, addr), grants) in &self.grants {
            if !limits.contains_key(&agent) {
                continue;
            }
            let live: Vec<Grant> = grants
                .iter()
                .filter(|g| g.expires_ns > now_ns)
                .cloned()
                .collect();
            if live.is_empty() {
                continue;
            }
            let value = kernel_value(&live);
            by_agent
                .entry(agent)
                .or_default()
                .push((value.expires_ns, addr, value));
        }
        let mut out = Vec::new();
        for (agent, mut entries) in by_agent {
            // Latest expiry first; the address breaks ties so the choice is repeatable.
            entries.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let keep = limits[&agent] as usize;
            out.extend(
                entries
                    .into_iter()
                    .take(keep)
                    .map(|(_, addr, value)| (agent, addr, value)),
            );
        }
        out
    }

    /// Puts a reload's limits in force: keeps exactly `carried` (what [`LearnedTable::carried`]
    /// chose and the kernel now holds); returns how many addresses each agent lost to a lower
    /// limit or to its removal.
    pub fn set_limits(
        &mut self,
        limits: HashMap<u32, u32>,
        carried: &[(u32, IpAddr)],
    ) -> HashMap<u32, u32> {
        let keep: HashSet<(u32, IpAddr)> = carried.iter().copied().collect();
        let mut dropped: HashMap<u32, u32> = HashMap::new();
        self.grants.retain(|key, _| {
            let kept = keep.contains(key);
            if !kept {
                *dropped.entry(key.0).or_default() += 1;
            }
            kept
        });
        self.held.clear();
        for &(agent, _) in self.grants.keys() {
            *self.held.entry(agent).or_default() += 1;
        }
        self.limits = limits;
        dropped
    }

    /// Forgets expired grants; returns the kernel writes that keep the map equal to the table.
    pub fn expire(&mut self, now_ns: u64) -> Vec<KernelChange> {
        let mut changes = Vec::new();
        let held = &mut self.held;
        self.grants.retain(|&(agent, addr), grants| {
            let before = grants.len();
            grants.retain(|g| g.expires_ns > now_ns);
            if grants.is_empty() {
                changes.push(KernelChange::Remove(agent, addr));
                if let Some(n) = held.get_mut(&agent) {
                    *n = n.saturating_sub(1);
                }
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

    /// The live names that gave `agent` the address `addr`, each with its expiry: the server
    /// names the kernel may pass on a connection to it (`egress::kernel_names`).
    pub fn live_names(&self, agent: u32, addr: IpAddr, now_ns: u64) -> Vec<(String, u64)> {
        self.grants
            .get(&(agent, canonical(addr)))
            .map(|g| {
                g.iter()
                    .filter(|g| g.expires_ns > now_ns)
                    .map(|g| (g.name.clone(), g.expires_ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The names that gave `agent` the address `addr` and have not expired: what a connection to
    /// it may name (the egress endpoint's domain-fronting check).
    pub fn names(&self, agent: u32, addr: IpAddr, now_ns: u64) -> Vec<String> {
        self.grants
            .get(&(agent, canonical(addr)))
            .map(|g| {
                g.iter()
                    .filter(|g| g.expires_ns > now_ns)
                    .map(|g| g.name.clone())
                    .collect()
            })
            .unwrap_or_default()
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
        kernel_sni: 0,
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

    /// A table with these (agent, limit) pairs.
    fn table(limits: &[(u32, u32)]) -> LearnedTable {
        let mut t = LearnedTable::default();
        t.set_limits(limits.iter().copied().collect(), &[]);
        t
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
        let mut t = table(&[(0, 10), (3, 10)]);
        let a = ip("10.0.0.1");
        let v = t
            .learn(0, a, grant("a.test", 100, &[(443, 443)]), 0)
            .unwrap();
        assert_eq!((v.expires_ns, ranges(&v)), (100, vec![(443, 443)]));
        let v = t.learn(0, a, grant("b.test", 50, &[(80, 80)]), 0).unwrap();
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
        let mut t = table(&[(0, 10), (3, 10)]);
        let a = ip("10.0.0.2");
        t.learn(3, a, grant("a.test", 100, &[(1, 2)]), 0).unwrap();
        let v = t
            .learn(3, a, grant("a.test", 40, &[(443, 443)]), 0)
            .unwrap();
        assert_eq!((v.expires_ns, ranges(&v)), (40, vec![(443, 443)]));
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_address() {
        let mut t = table(&[(0, 10), (3, 10)]);
        t.learn(0, ip("::ffff:10.0.0.3"), grant("a.test", 10, &[(1, 1)]), 0)
            .unwrap();
        assert!(t.lookup(0, ip("10.0.0.3"), 1).is_some());
        t.unlearn(0, ip("10.0.0.3"), "a.test");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn an_agent_at_its_limit_learns_no_new_address_and_others_are_unaffected() {
        let mut t = table(&[(0, 2), (1, 2)]);
        let g = |name: &str| grant(name, 100, &[(443, 443)]);
        t.learn(0, ip("10.0.0.1"), g("flood.test"), 0).unwrap();
        t.learn(0, ip("10.0.0.2"), g("flood.test"), 0).unwrap();
        assert_eq!(
            t.learn(0, ip("10.0.0.3"), g("flood.test"), 0),
            Err(AtLimit { limit: 2 })
        );
        // An address it holds is refreshed (another name, the same name again).
        assert!(
            t.learn(0, ip("::ffff:10.0.0.2"), g("other.test"), 0)
                .is_ok()
        );
        assert_eq!(t.held(0), 2);
        // The other agent has its own share.
        t.learn(1, ip("10.0.0.3"), g("ok.test"), 0).unwrap();
        assert_eq!((t.held(1), t.limit(1)), (1, 2));
        // An agent without a limit (no host rules, or unknown) learns nothing.
        assert!(t.learn(7, ip("10.0.0.9"), g("x.test"), 0).is_err());
        // Expiry gives the room back.
        assert_eq!(t.expire(100).len(), 3);
        assert_eq!((t.held(0), t.held(1)), (0, 0));
        t.learn(
            0,
            ip("10.0.0.3"),
            grant("flood.test", 200, &[(443, 443)]),
            100,
        )
        .unwrap();
        t.unlearn(0, ip("10.0.0.3"), "flood.test");
        assert_eq!(t.held(0), 0);
    }

    #[test]
    fn a_reload_carries_live_addresses_within_the_new_limits() {
        let mut t = table(&[(0, 4), (1, 4)]);
        for (i, exp) in [(1, 50), (2, 300), (3, 200), (4, 10)] {
            t.learn(
                0,
                ip(&format!("10.0.0.{i}")),
                grant("a.test", exp, &[(1, 1)]),
                0,
            )
            .unwrap();
        }
        t.learn(1, ip("10.0.1.1"), grant("b.test", 100, &[(1, 1)]), 0)
            .unwrap();
        // Agent 0's limit drops to 2, agent 1 is removed, at time 20 (10.0.0.4 expired).
        let limits: HashMap<u32, u32> = [(0, 2)].into_iter().collect();
        let mut carried = t.carried(&limits, 20);
        carried.sort_by_key(|c| c.1);
        let addrs: Vec<(u32, IpAddr, u64)> =
            carried.iter().map(|c| (c.0, c.1, c.2.expires_ns)).collect();
        assert_eq!(
            addrs,
            [(0, ip("10.0.0.2"), 300), (0, ip("10.0.0.3"), 200)],
            "the two that expire last"
        );
        assert_eq!(t.held(0), 4, "choosing changes nothing");
        let keep: Vec<(u32, IpAddr)> = carried.iter().map(|c| (c.0, c.1)).collect();
        let dropped = t.set_limits(limits, &keep);
        assert_eq!(dropped.get(&0), Some(&2));
        assert_eq!(dropped.get(&1), Some(&1));
        assert_eq!((t.held(0), t.held(1), t.limit(0), t.limit(1)), (2, 0, 2, 0));
        assert!(t.lookup(0, ip("10.0.0.2"), 1).is_some());
        assert!(t.lookup(0, ip("10.0.0.1"), 1).is_none());
    }
}
