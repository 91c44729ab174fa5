//! The AF_UNIX rules policies compile to (`UNIX_RULES`): one hash entry per (allowlist index,
//! socket name), plus each `[unix]` agent's default entry.

use agent_monitor_common::{self as common, UnixKey};
use aya::maps::{HashMap, MapData};

use crate::policy::KernelTables;

use super::{Bounded, OpContext as _, Opener, TableError, check_room, remove_hash_entries};

pub struct UnixTables {
    pub(super) rules: Bounded<HashMap<MapData, UnixKey, u32>>,
}

impl UnixTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(UnixTables {
            rules: maps.bounded("UNIX_RULES", common::MAX_UNIX_ENTRIES)?,
        })
    }

    /// Adds one bank's entries beside those in force; all or nothing, like `AllowTables::write`.
    pub fn write(&mut self, tables: &KernelTables) -> Result<(), TableError> {
        let now = self.rules.map.keys().count() as u64;
        check_room("unix", tables.unix.len(), now, common::MAX_UNIX_ENTRIES)?;
        let mut result = Ok(());
        for (key, rule) in &tables.unix {
            result = self
                .rules
                .map
                .insert(key, rule, 0)
                .op("writing the unix socket rules map");
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            for (key, _) in &tables.unix {
                let _ = self.rules.map.remove(key);
            }
        }
        result
    }

    /// Removes every entry whose agent index `keep` rejects. Returns how many went.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, TableError> {
        remove_hash_entries(&mut self.rules.map, |k| !keep(k.agent), "unix socket rule")
    }
}
