//! A read-only handle on the per-thread tags executable selectors give (`PROCESS_AGENTS`), opened
//! from its pin for the file guard's thread, which tells agents without the daemon's loop.

use std::path::Path;

use agent_monitor_common::AgentSlot;
use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};

use super::pin::PinDir;

pub struct ThreadTags {
    map: HashMap<MapData, u32, AgentSlot>,
}

impl ThreadTags {
    /// Opens the pinned map of the daemon whose pins are in `pin_dir`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<ThreadTags> {
        let path = PinDir::new(pin_dir).map("PROCESS_AGENTS");
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = HashMap::try_from(Map::from_map_data(data)?)
            .with_context(|| format!("{} is not the tag map", path.display()))?;
        Ok(ThreadTags { map })
    }

    /// The stable agent id (`identity::agent_id`) thread `tid` is tagged with, if any.
    pub fn agent_id(&self, tid: u32) -> Option<u32> {
        self.map.get(&tid, 0).ok().map(|slot| slot.agent)
    }
}
