//! Who is an agent in the kernel's eyes: agent cgroups (with their pre-filter bitmap), the agent
//! table (allowlist index and mode per stable id), the selector maps, per-thread tags and the
//! identity configuration.

use std::collections::HashSet;

use agent_monitor_common::{self as common, AgentSlot, ExecFileKey, IdentityConfig};
use aya::maps::{Array, HashMap, MapData};

use super::{Bounded, OpContext as _, Opener, TableError, absent_is_fine, hash_entries};

pub struct IdentityTables {
    pub(super) agent_cgroups: Bounded<HashMap<MapData, u64, AgentSlot>>,
    /// One bit per hash of a cgroup id: the kernel looks `AGENT_CGROUPS` up only when it is set.
    cgroup_filter: Array<MapData, u64>,
    pub(super) agent_tables: Bounded<HashMap<MapData, u32, AgentSlot>>,
    config: Array<MapData, IdentityConfig>,
    pub(super) process_agents: Bounded<HashMap<MapData, u32, AgentSlot>>,
    uid_selectors: HashMap<MapData, u32, AgentSlot>,
    exec_selectors: HashMap<MapData, ExecFileKey, AgentSlot>,
    /// The cgroup ids in `AGENT_CGROUPS` (this daemon is its only writer), so that removing one
    /// can tell whether its pre-filter bit is shared without walking the map key by key.
    cgroup_ids: HashSet<u64>,
}

impl IdentityTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        let agent_cgroups: Bounded<HashMap<MapData, u64, AgentSlot>> =
            maps.bounded("AGENT_CGROUPS", common::MAX_AGENT_CGROUPS)?;
        // An adopted map holds the previous daemon's entries; a new one is empty.
        let cgroup_ids = agent_cgroups.map.keys().filter_map(Result::ok).collect();
        Ok(IdentityTables {
            agent_cgroups,
            cgroup_filter: maps.take("AGENT_CGROUP_FILTER")?,
            agent_tables: maps.bounded("AGENT_TABLES", common::MAX_AGENTS)?,
            config: maps.take("IDENTITY_CONFIG")?,
            process_agents: maps.bounded("PROCESS_AGENTS", common::MAX_TAGGED_TASKS)?,
            uid_selectors: maps.take("UID_SELECTORS")?,
            exec_selectors: maps.take("EXEC_SELECTORS")?,
            cgroup_ids,
        })
    }

    /// Makes every task in cgroup `cgroup_id` an agent process, from the next syscall on; also
    /// rewrites an existing entry in one atomic update (reload).
    pub fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> Result<(), TableError> {
        // The pre-filter bit first: an entry whose bit is clear would never be looked up.
        let (word, bit) = common::agent_cgroup_filter_slot(cgroup_id);
        let f = &mut self.cgroup_filter;
        let old = f.get(&word, 0).op("reading the agent-cgroup pre-filter")?;
        if old & bit == 0 {
            f.set(word, old | bit, 0)
                .op("writing the agent-cgroup pre-filter")?;
        }
        self.agent_cgroups
            .map
            .insert(cgroup_id, slot, 0)
            .op("adding to the agent identity map (full?)")?;
        self.cgroup_ids.insert(cgroup_id);
        Ok(())
    }

    pub fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> Result<(), TableError> {
        self.agent_cgroups
            .map
            .remove(&cgroup_id)
            .op("removing from the agent identity map")?;
        self.cgroup_ids.remove(&cgroup_id);
        // The bit goes only if no other entry shares it; after the entry, never before.
        if !filter_bit_shared(&self.cgroup_ids, cgroup_id) {
            let (word, bit) = common::agent_cgroup_filter_slot(cgroup_id);
            let f = &mut self.cgroup_filter;
            let old = f.get(&word, 0).op("reading the agent-cgroup pre-filter")?;
            f.set(word, old & !bit, 0)
                .op("writing the agent-cgroup pre-filter")?;
        }
        Ok(())
    }

    /// Every (cgroup id, slot) in the identity map.
    pub fn agent_cgroups(&self) -> Vec<(u64, AgentSlot)> {
        hash_entries(&self.agent_cgroups.map)
    }

    /// Puts agent `id`'s allowlist index and mode in force (one atomic update per agent).
    pub fn set_agent_table(&mut self, id: u32, table: AgentSlot) -> Result<(), TableError> {
        self.agent_tables.map.insert(id, table, 0).op(format!(
            "writing the agent table (capacity {})",
            common::MAX_AGENTS
        ))
    }

    pub fn agent_table_ids(&self) -> Vec<u32> {
        self.agent_tables
            .map
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    pub fn remove_agent_table(&mut self, id: u32) -> Result<(), TableError> {
        self.agent_tables
            .map
            .remove(&id)
            .op("removing from the agent table")
    }

    pub fn set_config(&mut self, config: IdentityConfig) -> Result<(), TableError> {
        self.config
            .set(0, config, 0)
            .op("writing the identity configuration map")
    }

    pub fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> Result<(), TableError> {
        self.uid_selectors
            .insert(uid, slot, 0)
            .op("adding to the uid selector map (full?)")
    }

    pub fn remove_uid_selector(&mut self, uid: u32) -> Result<(), TableError> {
        absent_is_fine(self.uid_selectors.remove(&uid)).op("removing from the uid selector map")
    }

    pub fn uid_selector_entries(&self) -> Vec<(u32, AgentSlot)> {
        hash_entries(&self.uid_selectors)
    }

    pub fn set_exec_selector(
        &mut self,
        key: ExecFileKey,
        slot: AgentSlot,
    ) -> Result<(), TableError> {
        self.exec_selectors
            .insert(key, slot, 0)
            .op("adding to the executable selector map (full?)")
    }

    pub fn remove_exec_selector(&mut self, key: ExecFileKey) -> Result<(), TableError> {
        absent_is_fine(self.exec_selectors.remove(&key))
            .op("removing from the executable selector map")
    }

    pub fn exec_selector_entries(&self) -> Vec<(ExecFileKey, AgentSlot)> {
        hash_entries(&self.exec_selectors)
    }

    /// Tags thread `tid` as `slot` (a task switch of a selector-identified process).
    pub fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> Result<(), TableError> {
        self.process_agents
            .map
            .insert(tid, slot, 0)
            .op("tagging a process in PROCESS_AGENTS (full?)")
    }

    /// Threads the tag map can hold.
    pub fn tag_capacity(&self) -> u32 {
        self.process_agents.capacity
    }

    pub fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        self.process_agents.map.get(&tid, 0).ok()
    }

    /// Every per-thread tag: (thread id, identity).
    pub fn tags(&self) -> Vec<(u32, AgentSlot)> {
        hash_entries(&self.process_agents.map)
    }
}

/// Whether another agent cgroup in `ids` needs the pre-filter bit of `cgroup_id`.
pub(super) fn filter_bit_shared(ids: &HashSet<u64>, cgroup_id: u64) -> bool {
    let slot = common::agent_cgroup_filter_slot(cgroup_id);
    ids.iter()
        .any(|&id| id != cgroup_id && common::agent_cgroup_filter_slot(id) == slot)
}
