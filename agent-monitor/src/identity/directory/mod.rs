//! The identity directory: who is an agent process and who did what. It owns the (agent, task)
//! cgroups `run` placed processes in, the placed `run` processes themselves, the process table
//! that names each actor's chain, and the selectors with their uid bindings. The kernel is reached
//! through [`IdentityTables`], /proc through [`ProcessView`], so every flow here runs against
//! fakes in the unit tests.

use std::collections::HashMap;
use std::path::PathBuf;

use agent_monitor_common::AgentSlot;

use crate::action::ChainLink;
use crate::control;
use crate::identity::procfs::ProcessView;
use crate::identity::selected::Selected;
use crate::identity::tables::IdentityTables;
use crate::identity::{AgentCgroups, ProcessTable, TaskCgroup};

mod attribution;
mod room;
mod selectors;
#[cfg(test)]
mod tests;

pub use attribution::ProcessIdentity;
pub use room::RoomAlarm;
pub use selectors::host_snapshot;

/// A live (agent, task) cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskEntry {
    pub agent: String,
    pub task: String,
    pub path: PathBuf,
}

/// A process `run` placed in a task cgroup (the `run` client itself): the only sender of seccomp
/// reports for that task, and what `status` lists under the task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// The task cgroup it was placed in.
    pub task_cgroup: u64,
    /// Why its command is not in a Landlock domain, if it is not.
    pub unscoped: Option<String>,
    /// What it said its command holds (None: it did not say).
    pub privileges: Option<control::Privileges>,
}

/// Owner of agent identity on this host (see the module doc).
pub struct IdentityDirectory {
    cgroups: AgentCgroups,
    /// cgroup id → (agent, task).
    tasks: HashMap<u64, TaskEntry>,
    /// Placed `run` processes, by pid.
    placements: HashMap<u32, Placement>,
    procs: ProcessTable,
    /// Selectors of every policy, armed or waiting, and the uids `run --user` bound.
    pub selected: Selected,
    /// The uid bindings a previous daemon left in the pinned map were looked at (first apply).
    bindings_adopted: bool,
    /// Alarms about room in the identity maps, raised once per episode.
    room: room::RoomWatch,
}

impl IdentityDirectory {
    pub fn new(cgroups: AgentCgroups) -> Self {
        IdentityDirectory {
            cgroups,
            tasks: HashMap::new(),
            placements: HashMap::new(),
            procs: ProcessTable::default(),
            selected: Selected::default(),
            bindings_adopted: false,
            room: room::RoomWatch::default(),
        }
    }

    /// Whether the task map and the thread-tag map (of `tag_capacity`, against the host's
    /// `pid_max`) still have room: the alarms that started since the last check.
    pub fn check_room(
        &mut self,
        tag_capacity: Option<u64>,
        pid_max: Option<u64>,
    ) -> Vec<RoomAlarm> {
        self.room
            .check(self.tasks.len() as u64, tag_capacity, pid_max)
    }

    pub fn cgroups(&self) -> &AgentCgroups {
        &self.cgroups
    }

    // --- tasks and their cgroups ---

    /// Moves `pid` into the (agent, task) cgroup, creating it and its identity entry first: the
    /// identity entry exists before the process enters the cgroup, so there is no unjudged window,
    /// and a failed insert (map full) refuses the placement: the command never runs ungoverned.
    pub fn enter_task_cgroup(
        &mut self,
        kernel: &mut impl IdentityTables,
        agent: &str,
        task: &str,
        slot: AgentSlot,
        pid: u32,
    ) -> anyhow::Result<TaskCgroup> {
        let cg = self.cgroups.task(agent, task)?;
        kernel.add_agent_cgroup(cg.id, slot)?;
        self.add_task(cg.id, agent, task, cg.path.clone());
        self.cgroups.place(&cg, pid)?;
        Ok(cg)
    }

    /// Records a live task cgroup (placement, or recovered from a previous daemon).
    pub fn add_task(&mut self, cgroup_id: u64, agent: &str, task: &str, path: PathBuf) {
        self.tasks.insert(
            cgroup_id,
            TaskEntry {
                agent: agent.to_string(),
                task: task.to_string(),
                path,
            },
        );
    }

    pub fn task(&self, cgroup_id: u64) -> Option<&TaskEntry> {
        self.tasks.get(&cgroup_id)
    }

    /// Every live task cgroup, by cgroup id.
    pub fn tasks(&self) -> impl Iterator<Item = (u64, &TaskEntry)> + '_ {
        self.tasks.iter().map(|(id, t)| (*id, t))
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Forgets the task cgroups no process is left in (and removes their directories); returns
    /// them, for the caller to take their identity entries out of the kernel.
    pub fn take_empty_tasks(&mut self) -> Vec<(u64, TaskEntry)> {
        let gone: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| AgentCgroups::remove_if_empty(&t.path))
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .filter_map(|id| Some((id, self.tasks.remove(&id)?)))
            .collect()
    }

    // --- placed `run` processes ---

    /// `run` process `pid` was placed in task cgroup `task_cgroup`; a new placement of the same
    /// pid replaces the old record whole.
    pub fn note_placement(&mut self, pid: u32, task_cgroup: u64, unscoped: Option<String>) {
        self.placements.insert(
            pid,
            Placement {
                task_cgroup,
                unscoped,
                privileges: None,
            },
        );
    }

    /// What placed process `pid` said its command holds. Ignored for a pid not placed.
    pub fn note_privileges(&mut self, pid: u32, privileges: Option<control::Privileges>) {
        if let Some(p) = self.placements.get_mut(&pid) {
            p.privileges = privileges;
        }
    }

    pub fn placement(&self, pid: u32) -> Option<&Placement> {
        self.placements.get(&pid)
    }

    /// The placed processes of task cgroup `task_cgroup`, by pid, for `status`.
    pub fn placements_in(&self, task_cgroup: u64) -> Vec<control::Placement> {
        let mut v: Vec<control::Placement> = self
            .placements
            .iter()
            .filter(|(_, p)| p.task_cgroup == task_cgroup)
            .map(|(pid, p)| control::Placement {
                pid: *pid,
                privileges: p.privileges.clone(),
            })
            .collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// `run PID: why` for each placed process of `task_cgroup` whose command is not scoped.
    pub fn unscoped_in(&self, task_cgroup: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .placements
            .iter()
            .filter(|(_, p)| p.task_cgroup == task_cgroup)
            .filter_map(|(pid, p)| Some(format!("run {pid}: {}", p.unscoped.as_ref()?)))
            .collect();
        v.sort();
        v
    }

    // --- the process table ---

    /// A process that became an agent without being forked by one (placed, tagged, recovered).
    pub fn add_root(&mut self, host: &impl ProcessView, pid: u32, exe: String) {
        self.procs.add_root(pid, exe, host.args(pid));
    }

    pub fn on_fork(&mut self, parent: u32, child: u32, parent_comm: &str) {
        self.procs.on_fork(parent, child, parent_comm);
    }

    pub fn on_exec(&mut self, host: &impl ProcessView, pid: u32, path: &str) {
        self.procs.on_exec(pid, path, host.args(pid));
    }

    /// Process `pid` exited (`ktime_ns`: the kernel's record time). It stays in the chains of its
    /// descendants for a while (see [`Self::prune`]); its pid may be reused, so it is no longer a
    /// placed `run` that may report.
    pub fn on_exit(&mut self, pid: u32, ktime_ns: u64) {
        self.procs.on_exit(pid, ktime_ns);
        self.placements.remove(&pid);
    }

    /// Forgets processes that exited more than `keep_ns` before `now_ns`.
    pub fn prune(&mut self, now_ns: u64, keep_ns: u64) {
        self.procs.prune(now_ns, keep_ns);
    }

    /// Root first, `pid` last; a pid never seen is a chain of itself named `comm`.
    pub fn chain(&self, pid: u32, comm: &str) -> Vec<ChainLink> {
        self.procs.chain(pid, comm)
    }

    pub fn exe(&self, pid: u32) -> Option<&str> {
        self.procs.exe(pid)
    }

    pub fn process_count(&self) -> usize {
        self.procs.len()
    }
}
