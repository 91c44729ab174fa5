//! Task grants: allowlist entries keyed by task number instead of agent index, each with its
//! expiry, which the kernel checks itself.

use agent_monitor_common::{ExecFileKey, ExecKey, Expiry, FileGrant, NetGrant, NetKey};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};

use crate::identity::grant_state::KernelGrants;
use crate::policy::KernelTables;

use super::{
    OpContext as _, Opener, TableError, absent_is_fine, remove_trie_entries, trie_entries,
};

pub struct GrantTables {
    net: LpmTrie<MapData, NetKey, NetGrant>,
    exec: LpmTrie<MapData, ExecKey, Expiry>,
    /// Exec grants by file (ask-mode approvals): not recorded in the grant state file.
    files: HashMap<MapData, ExecFileKey, FileGrant>,
}

impl GrantTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(GrantTables {
            net: maps.take("TASK_NET_GRANTS")?,
            exec: maps.take("TASK_EXEC_GRANTS")?,
            files: maps.take("TASK_EXEC_FILE_GRANTS")?,
        })
    }

    /// Every task grant entry, with its expiry.
    pub fn entries(&self) -> KernelGrants {
        KernelGrants {
            net: trie_entries(&self.net),
            exec: trie_entries(&self.exec),
        }
    }

    /// Removes every entry whose task number `keep` rejects; returns how many went.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, TableError> {
        Ok(
            remove_trie_entries(&mut self.net, |k| !keep(k.agent), "task network grant")?
                + remove_trie_entries(&mut self.exec, |k| !keep(k.agent), "task exec grant")?,
        )
    }

    /// Writes entries as read by [`GrantTables::entries`] (an upgrade copies them over).
    pub fn copy_in(&mut self, grants: &KernelGrants) -> Result<(), TableError> {
        for (prefix_len, key, grant) in &grants.net {
            self.net
                .insert(&Key::new(*prefix_len, *key), grant, 0)
                .op("copying a task network grant")?;
        }
        for (prefix_len, key, expiry) in &grants.exec {
            self.exec
                .insert(&Key::new(*prefix_len, *key), expiry, 0)
                .op("copying a task exec grant")?;
        }
        Ok(())
    }

    /// Writes the grants of one task (entries keyed by the task number), valid until `expiry`.
    pub fn set(&mut self, tables: &KernelTables, expiry: Expiry) -> Result<(), TableError> {
        for (prefix_len, key, allow) in &tables.net {
            let grant = NetGrant {
                expiry,
                allow: *allow,
                _pad: 0,
            };
            self.net
                .insert(&Key::new(*prefix_len, *key), grant, 0)
                .op("writing the task network grant map (full?)")?;
        }
        for (prefix_len, key) in &tables.exec {
            self.exec
                .insert(&Key::new(*prefix_len, *key), expiry, 0)
                .op("writing the task exec grant map (full?)")?;
        }
        Ok(())
    }

    /// Removes entries written by [`GrantTables::set`]. Entries already gone are fine.
    pub fn remove(&mut self, tables: &KernelTables) -> Result<(), TableError> {
        for (prefix_len, key, _) in &tables.net {
            absent_is_fine(self.net.remove(&Key::new(*prefix_len, *key)))
                .op("removing a task network grant")?;
        }
        for (prefix_len, key) in &tables.exec {
            absent_is_fine(self.exec.remove(&Key::new(*prefix_len, *key)))
                .op("removing a task exec grant")?;
        }
        Ok(())
    }

    /// Writes one exec grant by file (key: task number, device, inode).
    pub fn set_file(&mut self, key: ExecFileKey, grant: FileGrant) -> Result<(), TableError> {
        self.files
            .insert(key, grant, 0)
            .op("writing the task exec file grant map (full?)")
    }

    /// Removes one exec grant by file; one already gone (a `once` grant the kernel used) is fine.
    pub fn remove_file(&mut self, key: ExecFileKey) -> Result<(), TableError> {
        absent_is_fine(self.files.remove(&key)).op("removing a task exec file grant")
    }

    /// Removes every exec grant by file; returns how many went.
    pub fn clear_files(&mut self) -> Result<usize, TableError> {
        let keys: Vec<ExecFileKey> = self.files.keys().filter_map(Result::ok).collect();
        for key in &keys {
            absent_is_fine(self.files.remove(key)).op("removing a task exec file grant")?;
        }
        Ok(keys.len())
    }
}
