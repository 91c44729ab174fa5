//! Compiling a policy set into the kernel's LPM-trie entries; `lookup` is a pure model of the
//! kernel lookup so tests can prove the tables and the userspace evaluator agree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv6Addr;

use agent_monitor_common::{
    EXEC_KEY_AGENT_BITS, EXEC_PATH_LEN, ExecKey, MAX_AGENT_CGROUPS, MAX_AGENTS, MAX_EXEC_ENTRIES,
    MAX_EXEC_SELECTORS, MAX_NET_ENTRIES, MAX_PORT_RANGES, MAX_UID_SELECTORS, NET_KEY_AGENT_BITS,
    NetAllow, NetKey, PortRange,
};
use thiserror::Error;

use crate::policy::model::{ExecRule, NetRule, PolicySet, prefix_mask, prefix_to_string};

mod lookup;
#[cfg(test)]
mod tests;

/// Entries for the kernel allowlist maps. Each `u32` is the LPM prefix length in bits, counting
/// the agent index bits.
#[derive(Clone, Default)]
pub struct KernelTables {
    pub net: Vec<(u32, NetKey, NetAllow)>,
    pub exec: Vec<(u32, ExecKey)>,
    /// `UNIX_RULES`: (allowlist index, socket name) → `UNIX_ALLOW`/`UNIX_DENY`.
    pub unix: Vec<(agent_monitor_common::UnixKey, u32)>,
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
        for (key, _) in &mut self.unix {
            key.agent += base;
        }
        self
    }
}

/// Entries one policy set may put in the network allowlist map: half of it, because a reload,
/// and a restart that adopts the previous daemon's maps, write the new set's entries beside the
/// ones in force before switching each agent over (no moment of deny-all or allow-all).
pub const NET_ENTRIES_PER_SET: u32 = MAX_NET_ENTRIES / 2;
/// The same for the exec allowlist map (and so for the file-identity map, which holds at most
/// one entry per exact exec rule).
pub const EXEC_ENTRIES_PER_SET: u32 = MAX_EXEC_ENTRIES / 2;

/// A policy set that is valid but does not fit the kernel's maps or fixed-size entries. Found by
/// `compile`, so `policy check` reports it and the daemon refuses it before loading anything.
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
    #[error(
        "{needed} policies (agents): the kernel's agent table (AGENT_TABLES) holds at most {max}",
        max = MAX_AGENTS
    )]
    TooManyAgents { needed: usize },
    /// The allowlist entries of the whole set overflow one bank of an allowlist map.
    #[error(
        "{by_file}: the policies compile to {needed} {table} entries; at most {limit} fit ({map} holds {capacity}, and a reload or restart writes the new entries beside those in force)"
    )]
    TooManyEntries {
        /// `network allowlist`, `exec allowlist`.
        table: &'static str,
        /// The kernel map.
        map: &'static str,
        needed: usize,
        limit: u32,
        capacity: u32,
        /// The files that contribute, largest first: `big.toml: 70000 entries`.
        by_file: String,
    },
    /// More selectors of one kind than their kernel map holds.
    #[error(
        "{by_file}: the policies have {needed} {kind} selectors; the kernel map {map} holds at most {max}"
    )]
    TooManySelectors {
        kind: &'static str,
        map: &'static str,
        needed: usize,
        max: u32,
        by_file: String,
    },
}

/// `a.toml: 40000 entries, b.toml: 30000 entries`: the files behind a total, largest first (at
/// most five named).
fn by_file(counts: impl IntoIterator<Item = (String, usize)>, unit: (&str, &str)) -> String {
    let count = |n: usize| format!("{n} {}", if n == 1 { unit.0 } else { unit.1 });
    let mut counts: Vec<(String, usize)> = counts.into_iter().filter(|(_, n)| *n > 0).collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let shown = 5;
    let mut parts: Vec<String> = counts
        .iter()
        .take(shown)
        .map(|(file, n)| format!("{file}: {}", count(*n)))
        .collect();
    if counts.len() > shown {
        let rest: usize = counts[shown..].iter().map(|(_, n)| n).sum();
        parts.push(format!(
            "{} more files: {}",
            counts.len() - shown,
            count(rest)
        ));
    }
    parts.join(", ")
}

impl PolicySet {
    /// Builds every agent's kernel entries; output order is deterministic. Fails if the set does
    /// not fit the kernel (see [`CapacityError`]), naming the files and the limit.
    pub fn compile(&self) -> Result<KernelTables, CapacityError> {
        if self.len() > MAX_AGENTS as usize {
            return Err(CapacityError::TooManyAgents { needed: self.len() });
        }
        self.check_selector_capacity()?;
        let mut tables = KernelTables::default();
        // Each agent's share of the learned-address map must fit before anything is loaded.
        self.learned_limits()?;
        let mut net_by_file = Vec::new();
        let mut exec_by_file = Vec::new();
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
            let (net_before, exec_before) = (tables.net.len(), tables.exec.len());
            compile_net(
                index,
                policy.network(),
                policy.agent(),
                &origin,
                &mut tables.net,
            )?;
            compile_exec(index, policy.exec(), &mut tables.exec);
            if let Some(unix) = policy.unix() {
                tables.unix.extend(unix.kernel_entries(index));
            }
            net_by_file.push((origin.clone(), tables.net.len() - net_before));
            exec_by_file.push((origin, tables.exec.len() - exec_before));
        }
        for (table, map, needed, limit, capacity, files) in [
            (
                "network allowlist",
                "NET_ALLOW",
                tables.net.len(),
                NET_ENTRIES_PER_SET,
                MAX_NET_ENTRIES,
                net_by_file,
            ),
            (
                "exec allowlist",
                "EXEC_ALLOW",
                tables.exec.len(),
                EXEC_ENTRIES_PER_SET,
                MAX_EXEC_ENTRIES,
                exec_by_file,
            ),
            (
                "unix socket rules",
                "UNIX_RULES",
                tables.unix.len(),
                agent_monitor_common::MAX_UNIX_ENTRIES / 2,
                agent_monitor_common::MAX_UNIX_ENTRIES,
                self.iter()
                    .map(|p| {
                        let n = p.unix().map_or(0, |u| u.kernel_entries(0).len());
                        (p.origin().display().to_string(), n)
                    })
                    .collect(),
            ),
        ] {
            if needed > limit as usize {
                return Err(CapacityError::TooManyEntries {
                    table,
                    map,
                    needed,
                    limit,
                    capacity,
                    by_file: by_file(files, ("entry", "entries")),
                });
            }
        }
        Ok(tables)
    }

    /// Selectors are keyed by what they select (a uid, a file, a cgroup), not by policy bank.
    fn check_selector_capacity(&self) -> Result<(), CapacityError> {
        let origin = |p: &crate::policy::Policy| p.origin().display().to_string();
        let distinct = |values: Vec<String>| values.into_iter().collect::<BTreeSet<_>>().len();
        let kinds: [(
            &str,
            &str,
            u32,
            fn(&crate::policy::selectors::Selectors) -> Vec<String>,
        ); 3] = [
            ("uid", "UID_SELECTORS", MAX_UID_SELECTORS, |s| {
                s.uids.iter().map(|u| u.value.to_string()).collect()
            }),
            ("executable", "EXEC_SELECTORS", MAX_EXEC_SELECTORS, |s| {
                s.executables.iter().map(|e| e.value.path.clone()).collect()
            }),
            // Each resolves to one cgroup in the identity map, which `run`'s agents share.
            (
                "cgroup and systemd unit",
                "AGENT_CGROUPS",
                MAX_AGENT_CGROUPS,
                |s| {
                    s.cgroups
                        .iter()
                        .chain(&s.systemd_units)
                        .map(|c| c.value.clone())
                        .collect()
                },
            ),
        ];
        for (kind, map, max, values) in kinds {
            let per_file: Vec<(String, usize)> = self
                .iter()
                .map(|p| (origin(p), distinct(values(p.selectors()))))
                .collect();
            let needed = distinct(self.iter().flat_map(|p| values(p.selectors())).collect());
            if needed > max as usize {
                return Err(CapacityError::TooManySelectors {
                    kind,
                    map,
                    needed,
                    max,
                    by_file: by_file(per_file, ("selector", "selectors")),
                });
            }
        }
        Ok(())
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
/// ports of every rule whose prefix covers it, not only its own. Those are its own ports plus the
/// (already merged) ports of the nearest covering entry, found by looking up the entry's address
/// under each shorter prefix length in use: linear in the rules, not quadratic.
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
    let lengths: BTreeSet<u8> = own.keys().map(|&(len, _)| len).collect();
    let mut merged_of: HashMap<(u8, u128), Vec<PortRange>> = HashMap::with_capacity(own.len());
    for (&(len, net), ranges) in &own {
        let nearest_cover = lengths
            .range(..len)
            .rev()
            .find_map(|&outer| merged_of.get(&(outer, net & prefix_mask(outer))));
        let mut ranges = ranges.clone();
        ranges.extend(nearest_cover.into_iter().flatten().copied());
        let merged = merge_ranges(ranges);
        let net_addr = Ipv6Addr::from(net);
        if merged.len() > MAX_PORT_RANGES {
            return Err(CapacityError::TooManyPortRanges {
                agent: owner.to_string(),
                origin: origin.to_string(),
                prefix: prefix_to_string(net_addr, len),
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
            addr: net_addr.octets(),
        };
        out.push((NET_KEY_AGENT_BITS + u32::from(len), key, allow));
        merged_of.insert((len, net), merged);
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
