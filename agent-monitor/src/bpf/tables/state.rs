//! What the daemon leaves in the kernel for itself and its successor (`DAEMON_STATE`: object
//! hash, heartbeat, where the agent-socket hooks are) and the kernel's loss counters.

use std::borrow::Borrow;

use agent_monitor_common::{self as common, COUNTERS, DAEMON_STATE_LEN};
use aya::maps::{Array, MapData, PerCpuArray};

use super::{OpContext as _, Opener, TableError};

pub struct StateTables {
    /// Indexed by `common::STATE_*`.
    state: Array<MapData, u64>,
    /// Per CPU, indexed by `common::COUNTER_*`.
    counters: PerCpuArray<MapData, u64>,
}

const _: () = assert!(common::STATE_AGENT_HOOKS_HOST_WIDE < DAEMON_STATE_LEN);

impl StateTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(StateTables {
            state: maps.take("DAEMON_STATE")?,
            counters: maps.take("COUNTERS_MAP")?,
        })
    }

    /// The kernel's loss counters summed over CPUs, indexed by `COUNTER_*`.
    pub fn counters(&self) -> [u64; COUNTERS as usize] {
        counters_from(&self.counters)
    }

    pub fn get(&self, slot: u32) -> Result<u64, TableError> {
        self.state
            .get(&slot, 0)
            .op(format!("reading daemon state slot {slot}"))
    }

    pub fn set(&mut self, slot: u32, value: u64) -> Result<(), TableError> {
        self.state
            .set(slot, value, 0)
            .op(format!("writing daemon state slot {slot}"))
    }

    /// Leaves the time and the loss counter in the pinned state, for the next daemon.
    pub fn heartbeat(&mut self) -> Result<(), TableError> {
        let lost = self.counters()[common::COUNTER_RECORDS_LOST as usize];
        self.set(common::STATE_LOST_AT_HEARTBEAT, lost)?;
        self.set(common::STATE_HEARTBEAT_UNIX_NS, unix_ns())
    }
}

/// The counters of `a` summed over CPUs. A map pinned by an older build may be shorter: its
/// missing counters read as 0.
pub(in crate::bpf) fn counters_from<T: Borrow<MapData>>(
    a: &PerCpuArray<T, u64>,
) -> [u64; COUNTERS as usize] {
    let mut out = [0u64; COUNTERS as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = a.get(&(i as u32), 0).map_or(0, |v| v.iter().sum());
    }
    out
}

pub(in crate::bpf) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
