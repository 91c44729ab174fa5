//! Whether the kernel's identity maps still have room: the task map nearly full, or a pid_max
//! raised past the thread-tag map's capacity. Each alarm is raised once when its condition
//! starts, and again only after it has cleared in between.

use agent_monitor_common as common;

/// Task-map use at which placements start being warned about.
pub const TASKS_WARN_PERCENT: u64 = 90;

/// A condition that just started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomAlarm {
    /// The agent identity (task cgroup) map is at least [`TASKS_WARN_PERCENT`] full.
    TasksNearlyFull { used: u64, capacity: u64 },
    /// `kernel.pid_max` exceeds the thread-tag map's capacity (sized at load): a fork flood of a
    /// selector-identified agent could fill it.
    PidMaxAboveTagRoom { pid_max: u64, capacity: u64 },
}

/// Which alarms are raised now.
#[derive(Debug, Default)]
pub struct RoomWatch {
    tasks_high: bool,
    tags_short: bool,
}

impl RoomWatch {
    /// Checks `tasks` task entries in use, and the tag map's capacity against pid_max (either
    /// unknown: not judged). Returns the alarms that started with this check.
    pub fn check(
        &mut self,
        tasks: u64,
        tag_capacity: Option<u64>,
        pid_max: Option<u64>,
    ) -> Vec<RoomAlarm> {
        let mut started = Vec::new();
        let capacity = u64::from(common::MAX_AGENT_CGROUPS);
        let high = tasks * 100 >= capacity * TASKS_WARN_PERCENT;
        if high && !self.tasks_high {
            started.push(RoomAlarm::TasksNearlyFull {
                used: tasks,
                capacity,
            });
        }
        self.tasks_high = high;
        let short = match (tag_capacity, pid_max) {
            (Some(c), Some(p)) if p > c => Some((p, c)),
            _ => None,
        };
        if let (Some((pid_max, capacity)), false) = (short, self.tags_short) {
            started.push(RoomAlarm::PidMaxAboveTagRoom { pid_max, capacity });
        }
        self.tags_short = short.is_some();
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_alarm_starts_once_and_again_after_clearing() {
        let mut w = RoomWatch::default();
        let cap = u64::from(common::MAX_AGENT_CGROUPS);
        let high = cap * TASKS_WARN_PERCENT / 100 + 1;
        assert_eq!(w.check(1, Some(4_194_304), Some(4_194_304)), vec![]);
        assert_eq!(
            w.check(high, None, None),
            vec![RoomAlarm::TasksNearlyFull {
                used: high,
                capacity: cap
            }]
        );
        assert_eq!(w.check(high + 1, None, None), vec![]);
        assert_eq!(w.check(1, None, None), vec![]);
        assert_eq!(w.check(high, None, None).len(), 1);
        assert_eq!(
            w.check(1, Some(32_768), Some(4_194_304)),
            vec![RoomAlarm::PidMaxAboveTagRoom {
                pid_max: 4_194_304,
                capacity: 32_768
            }]
        );
        assert_eq!(w.check(1, Some(32_768), Some(4_194_304)), vec![]);
        // pid_max unknown: not judged, and the alarm clears.
        assert_eq!(w.check(1, Some(32_768), None), vec![]);
        assert_eq!(w.check(1, Some(32_768), Some(40_000)).len(), 1);
    }
}
