//! The member offsets the peer tracepoint follows (`UNIX_PEER_LAYOUT`, one entry), written at
//! every start from the running kernel's BTF.

use agent_monitor_common::UnixPeerLayout;
use aya::maps::{Array, MapData};

use super::{OpContext as _, Opener, TableError};

pub struct UnixPeerTables {
    layout: Array<MapData, UnixPeerLayout>,
}

impl UnixPeerTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(UnixPeerTables {
            layout: maps.take("UNIX_PEER_LAYOUT")?,
        })
    }

    /// `layout.enabled` = 0 turns the peer judging off (connects judged by name only).
    pub fn set_layout(&mut self, layout: &UnixPeerLayout) -> Result<(), TableError> {
        self.layout
            .set(0, layout, 0)
            .op("writing the unix peer layout map")
    }
}
