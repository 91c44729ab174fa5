//! The allowlists policies compile to: network (LPM trie by agent index and address), exec by
//! path (LPM trie) and exec by file identity (device, inode).

use agent_monitor_common::{self as common, ExecFileKey, ExecKey, NetAllow, NetKey};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};

use crate::policy::KernelTables;

use super::{
    Bounded, OpContext as _, Opener, TableError, check_room, remove_hash_entries,
    remove_trie_entries,
};

pub struct AllowTables {
    pub(super) net: Bounded<LpmTrie<MapData, NetKey, NetAllow>>,
    /// Value: the entry's position in the compiled table (unused by the kernel).
    pub(super) exec: Bounded<LpmTrie<MapData, ExecKey, u32>>,
    /// Value: the rule the file matched.
    pub(super) exec_files: Bounded<HashMap<MapData, ExecFileKey, u32>>,
}

impl AllowTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(AllowTables {
            net: maps.bounded("NET_ALLOW", common::MAX_NET_ENTRIES)?,
            exec: maps.bounded("EXEC_ALLOW", common::MAX_EXEC_ENTRIES)?,
            exec_files: maps.bounded("EXEC_FILES", common::MAX_EXEC_ENTRIES)?,
        })
    }

    /// Adds allowlist entries (those of one bank; see the daemon's reload). Checks capacity
    /// against what is in the maps now, and on failure removes what it added: all or nothing.
    pub fn write(&mut self, tables: &KernelTables) -> Result<(), TableError> {
        let net_now = self.net.map.keys().count() as u64;
        let exec_now = self.exec.map.keys().count() as u64;
        check_room(
            "network",
            tables.net.len(),
            net_now,
            common::MAX_NET_ENTRIES,
        )?;
        check_room(
            "exec",
            tables.exec.len(),
            exec_now,
            common::MAX_EXEC_ENTRIES,
        )?;
        let result = self.insert(tables);
        if result.is_err() {
            for (prefix_len, key, _) in &tables.net {
                let _ = self.net.map.remove(&Key::new(*prefix_len, *key));
            }
            for (prefix_len, key) in &tables.exec {
                let _ = self.exec.map.remove(&Key::new(*prefix_len, *key));
            }
        }
        result
    }

    fn insert(&mut self, tables: &KernelTables) -> Result<(), TableError> {
        for (prefix_len, key, allow) in &tables.net {
            self.net
                .map
                .insert(&Key::new(*prefix_len, *key), allow, 0)
                .op("writing the network allowlist map")?;
        }
        for (i, (prefix_len, key)) in tables.exec.iter().enumerate() {
            self.exec
                .map
                .insert(&Key::new(*prefix_len, *key), i as u32, 0)
                .op("writing the exec allowlist map")?;
        }
        Ok(())
    }

    /// Removes every entry whose agent index `keep` rejects. Returns how many went.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, TableError> {
        Ok(remove_trie_entries(
            &mut self.net.map,
            |k| !keep(k.agent),
            "network allowlist entry",
        )? + remove_trie_entries(
            &mut self.exec.map,
            |k| !keep(k.agent),
            "exec allowlist entry",
        )? + remove_hash_entries(
            &mut self.exec_files.map,
            |k| !keep(k.agent),
            "exec file-identity entry",
        )?)
    }

    /// Adds and removes entries of the file-identity exec allowlist.
    pub fn update_exec_files(
        &mut self,
        add: &[(ExecFileKey, u32)],
        remove: &[ExecFileKey],
    ) -> Result<(), TableError> {
        let m = &mut self.exec_files.map;
        for key in remove {
            m.remove(key)
                .op("removing from the exec file-identity map")?;
        }
        for (key, rule) in add {
            m.insert(*key, *rule, 0)
                .op("writing the exec file-identity map (full?)")?;
        }
        Ok(())
    }
}
