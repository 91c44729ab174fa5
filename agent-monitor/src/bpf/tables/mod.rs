//! The kernel maps user space reads and writes, each opened once (at install or adoption) into a
//! typed aya handle: a map of another type or layout than this build's is refused there, not on
//! first use. Grouped by what they hold: identities, allowlists, task grants, DNS, daemon state.

mod allow;
mod dns;
mod egress;
mod grants;
mod identity;
mod state;
#[cfg(test)]
mod tests;
mod unix;
// The egress relay's own object (bpf/egress_relay.rs), not part of `Tables`.
pub(super) mod relay;
mod unix_peer;

use std::borrow::{Borrow, BorrowMut};
use std::collections::BTreeMap;

use agent_monitor_common as common;
use aya::Pod;
use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, RingBuf, lpm_trie::Key};

pub use allow::AllowTables;
pub use dns::DnsTables;
pub use egress::EgressTables;
pub use grants::GrantTables;
pub use identity::IdentityTables;
pub use state::StateTables;
pub use unix::UnixTables;
pub use unix_peer::UnixPeerTables;

pub(super) use state::{counters_from, unix_ns};

/// Every map user space uses, typed. One owner (the [`super::Kernel`]) holds it.
pub struct Tables {
    pub identity: IdentityTables,
    pub allow: AllowTables,
    pub grants: GrantTables,
    pub dns: DnsTables,
    pub state: StateTables,
    pub unix: UnixTables,
    pub egress: EgressTables,
    pub unix_peer: UnixPeerTables,
    /// The action ring buffer, until its reader takes it.
    actions: Option<RingBuf<MapData>>,
    /// The maps only the kernel programs use (socket caches, scratch space), kept open: the
    /// object's programs are loaded after the maps are taken out of it and refer to these fds.
    _kernel_only: BTreeMap<String, Map>,
}

/// What went wrong with a kernel map.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("map {0} missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name} is not of the type and layout this build expects")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// A map operation failed; `what` says which, as the log shows it.
    #[error("{what}")]
    Op {
        what: String,
        #[source]
        source: MapError,
    },
    #[error(
        "the policies compile to {have} {what} allowlist entries; with the {now} in force the \
         kernel map (capacity {cap}) cannot hold both during the swap"
    )]
    NoRoom {
        what: &'static str,
        have: usize,
        now: u64,
        cap: u32,
    },
    #[error("ring buffer ACTIONS missing or already taken")]
    ActionsTaken,
}

/// Names a failed map operation (`.op("writing the agent table")`), keeping aya's error as source.
pub(super) trait OpContext<T> {
    fn op(self, what: impl Into<String>) -> Result<T, TableError>;
}

impl<T> OpContext<T> for Result<T, MapError> {
    fn op(self, what: impl Into<String>) -> Result<T, TableError> {
        self.map_err(|source| TableError::Op {
            what: what.into(),
            source,
        })
    }
}

/// Entries in use of one kernel map, against its capacity.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Occupancy {
    pub map: String,
    pub used: u64,
    pub capacity: u64,
}

/// A map that fills up, with the capacity the kernel gave it (the tag map is sized at load, an
/// adopted map by the daemon that created it).
pub struct Bounded<M> {
    pub map: M,
    pub capacity: u32,
}

/// The maps of one object (or one pin directory) by name, being turned into typed handles.
pub(super) struct Opener(BTreeMap<String, Map>);

impl Opener {
    pub(super) fn new(maps: BTreeMap<String, Map>) -> Self {
        Opener(maps)
    }

    /// Takes map `name` as handle type `T`.
    pub(super) fn take<T: TryFrom<Map, Error = MapError>>(
        &mut self,
        name: &'static str,
    ) -> Result<T, TableError> {
        let map = self.0.remove(name).ok_or(TableError::Missing(name))?;
        T::try_from(map).map_err(|source| TableError::Layout { name, source })
    }

    /// [`Opener::take`] with the map's capacity as the kernel reports it, else `builtin`.
    pub(super) fn bounded<T: TryFrom<Map, Error = MapError>>(
        &mut self,
        name: &'static str,
        builtin: u32,
    ) -> Result<Bounded<T>, TableError> {
        let reported = match self.0.get(name) {
            Some(Map::HashMap(d) | Map::LpmTrie(d)) => d.info().map(|i| i.max_entries()).ok(),
            _ => None,
        };
        Ok(Bounded {
            map: self.take(name)?,
            capacity: capacity_or(reported, builtin),
        })
    }

    /// A borrowed view of map `name` as handle type `T`, for reading a predecessor's maps.
    pub(super) fn view<'a, T: TryFrom<&'a Map, Error = MapError>>(
        &'a self,
        name: &'static str,
    ) -> Result<T, TableError> {
        let map = self.0.get(name).ok_or(TableError::Missing(name))?;
        T::try_from(map).map_err(|source| TableError::Layout { name, source })
    }
}

/// The capacity `occupancy` reports: what the kernel says, else the built-in size.
fn capacity_or(reported: Option<u32>, builtin: u32) -> u32 {
    reported.unwrap_or(builtin)
}

impl Tables {
    /// Opens every map this build uses into its typed handle.
    pub(super) fn open(mut maps: Opener) -> Result<Tables, TableError> {
        Ok(Tables {
            identity: IdentityTables::open(&mut maps)?,
            allow: AllowTables::open(&mut maps)?,
            grants: GrantTables::open(&mut maps)?,
            dns: DnsTables::open(&mut maps)?,
            state: StateTables::open(&mut maps)?,
            unix: UnixTables::open(&mut maps)?,
            egress: EgressTables::open(&mut maps)?,
            unix_peer: UnixPeerTables::open(&mut maps)?,
            actions: Some(maps.take("ACTIONS")?),
            _kernel_only: maps.0,
        })
    }

    /// Hands the ring buffer out. Once.
    pub(super) fn take_actions(&mut self) -> Result<RingBuf<MapData>, TableError> {
        self.actions.take().ok_or(TableError::ActionsTaken)
    }

    /// Entries in use of the maps that fill up, against their capacities.
    pub fn occupancy(&self) -> Vec<Occupancy> {
        let (id, allow) = (&self.identity, &self.allow);
        #[rustfmt::skip]
        let counts = [
            ("AGENT_CGROUPS", id.agent_cgroups.map.keys().count(), id.agent_cgroups.capacity),
            ("AGENT_TABLES", id.agent_tables.map.keys().count(), id.agent_tables.capacity),
            ("NET_ALLOW", allow.net.map.keys().count(), allow.net.capacity),
            ("EXEC_ALLOW", allow.exec.map.keys().count(), allow.exec.capacity),
            ("EXEC_FILES", allow.exec_files.map.keys().count(), allow.exec_files.capacity),
            ("PROCESS_AGENTS", id.process_agents.map.keys().count(), id.process_agents.capacity),
            ("UNIX_RULES", self.unix.rules.map.keys().count(), self.unix.rules.capacity),
        ];
        counts
            .into_iter()
            .map(|(map, used, capacity)| Occupancy::new(map, used, capacity))
            .collect()
    }
}

impl Occupancy {
    fn new(map: &str, used: usize, capacity: u32) -> Self {
        Occupancy {
            map: map.to_string(),
            used: used as u64,
            capacity: u64::from(capacity),
        }
    }
}

/// Refuses `have` more entries of a `what` allowlist when `now` are in a map of `cap`: the new
/// bank is written beside the old one, so both must fit at once.
pub(super) fn check_room(
    what: &'static str,
    have: usize,
    now: u64,
    cap: u32,
) -> Result<(), TableError> {
    if now.saturating_add(have as u64) > u64::from(cap) {
        return Err(TableError::NoRoom {
            what,
            have,
            now,
            cap,
        });
    }
    Ok(())
}

/// Every (key, value) of a hash map (entries that vanish while iterating are skipped).
pub(super) fn hash_entries<T: Borrow<MapData>, K: Pod, V: Pod>(
    h: &HashMap<T, K, V>,
) -> Vec<(K, V)> {
    h.iter().filter_map(Result::ok).collect()
}

/// Every (prefix length, key, value) of an LPM trie.
pub(super) fn trie_entries<T: Borrow<MapData>, K: Pod, V: Pod>(
    t: &LpmTrie<T, K, V>,
) -> Vec<(u32, K, V)> {
    t.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k.prefix_len(), k.data(), v))
        .collect()
}

/// Removes the entries of hash map `h` whose key `stale` picks; returns how many went.
fn remove_hash_entries<T: BorrowMut<MapData>, K: Pod, V: Pod>(
    h: &mut HashMap<T, K, V>,
    stale: impl Fn(&K) -> bool,
    what: &str,
) -> Result<usize, TableError> {
    let keys: Vec<K> = h
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for k in &keys {
        h.remove(k).op(format!("removing a stale {what}"))?;
    }
    Ok(keys.len())
}

/// [`remove_hash_entries`] for an LPM trie (`stale` sees the key's data).
fn remove_trie_entries<T: BorrowMut<MapData>, K: Pod, V: Pod>(
    t: &mut LpmTrie<T, K, V>,
    stale: impl Fn(&K) -> bool,
    what: &str,
) -> Result<usize, TableError> {
    let keys: Vec<Key<K>> = t
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(&k.data()))
        .collect();
    for k in &keys {
        t.remove(k).op(format!("removing a stale {what}"))?;
    }
    Ok(keys.len())
}

/// A removal that finds nothing to remove succeeded.
fn absent_is_fine(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

/// Capacity of the per-thread tag map: at least `pid_max`, so every thread the kernel can have at
/// once fits and a fork flood cannot fill it (an untagged child would run ungoverned).
pub fn tag_capacity(pid_max: Option<u32>) -> u32 {
    pid_max.map_or(common::MAX_TAGGED_TASKS, |p| {
        p.max(common::MAX_TAGGED_TASKS)
    })
}
