//! Who did this: a process's identity as the daemon can tell it from outside (in the kernel's
//! order), and the (agent, task) names of a record's identity.

use agent_monitor_common::{self as common, AgentSlot};

use super::IdentityDirectory;
use crate::identity::procfs::ProcessView;
use crate::identity::tables::IdentityTables;
use crate::identity::{TaskNumbers, agent_id, peer};
use crate::policy::PolicySet;

/// The identity of a process as the daemon can tell it from outside (same order as the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub slot: AgentSlot,
    /// It is in one of `run`'s (agent, task) cgroups (moving it means moving its cgroup).
    pub in_run_cgroup: bool,
}

impl IdentityDirectory {
    /// Which agent process `pid` is, in the kernel's order: its own `run` cgroup, its tag, a
    /// selected ancestor cgroup, its uid.
    pub fn identify(
        &self,
        kernel: &impl IdentityTables,
        host: &impl ProcessView,
        policies: &PolicySet,
        registry: &impl TaskNumbers,
        pid: u32,
    ) -> Option<ProcessIdentity> {
        let cgroup = host.cgroup(pid);
        self.identify_in(kernel, policies, registry, pid, cgroup.as_deref(), || {
            host.uid(pid)
        })
    }

    /// [`Self::identify`] from what is already known of `pid`: its cgroup, and its uid if needed.
    pub fn identify_in(
        &self,
        kernel: &impl IdentityTables,
        policies: &PolicySet,
        registry: &impl TaskNumbers,
        pid: u32,
        cgroup: Option<&str>,
        uid: impl FnOnce() -> Option<u32>,
    ) -> Option<ProcessIdentity> {
        if let Some((agent, task)) = cgroup.and_then(peer::run_cgroup_identity) {
            // By the stable id, so a process whose agent lost its policy is still inside it.
            let number = registry.find(agent, task).unwrap_or(common::TASK_NONE);
            let mode = policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value());
            return Some(ProcessIdentity {
                slot: AgentSlot {
                    agent: agent_id(agent),
                    mode,
                    task: number,
                    source: common::SOURCE_RUN,
                },
                in_run_cgroup: true,
            });
        }
        self.by_selector(kernel, pid, cgroup, uid)
            .map(|slot| ProcessIdentity {
                slot,
                in_run_cgroup: false,
            })
    }

    /// The identity a selector gives thread `pid`: its tag, a selected ancestor cgroup, its uid.
    pub fn by_selector(
        &self,
        kernel: &impl IdentityTables,
        pid: u32,
        cgroup: Option<&str>,
        uid: impl FnOnce() -> Option<u32>,
    ) -> Option<AgentSlot> {
        kernel
            .thread_tag(pid)
            .or_else(|| cgroup.and_then(|c| self.selected.by_cgroup(c)))
            .or_else(|| self.selected.by_uid(uid()?))
    }

    /// (agent, task) names of an identity (`slot.agent` is the stable id).
    pub fn names(
        &self,
        policies: &PolicySet,
        registry: &impl TaskNumbers,
        slot: &AgentSlot,
    ) -> (String, String) {
        let agent = policies
            .iter()
            .map(|p| p.agent())
            .chain(self.tasks.values().map(|t| t.agent.as_str()))
            .chain(registry.get(slot.task).map(|t| t.agent.as_str()))
            .find(|a| agent_id(a) == slot.agent)
            .map_or_else(|| format!("agent-{:08x}", slot.agent), str::to_string);
        let task = registry
            .get(slot.task)
            .map_or_else(|| "none".to_string(), |t| t.name.clone());
        (agent, task)
    }

    /// Agent and task of a kernel record, from the identity the kernel judged with: its task
    /// number, the cgroup it acted in and the allowlist index it was judged by (`agent_at` names
    /// the agent of an index, live or superseded). A `run` task without a number is named by its
    /// cgroup.
    pub fn attribute(
        &self,
        registry: &impl TaskNumbers,
        task: u32,
        cgroup_id: u64,
        agent_index: u32,
        agent_at: impl FnOnce(u32) -> Option<String>,
    ) -> (String, String) {
        let task = registry.get(task);
        if task.is_none()
            && let Some(t) = self.tasks.get(&cgroup_id)
        {
            return (t.agent.clone(), t.task.clone());
        }
        let agent = agent_at(agent_index)
            .or_else(|| task.map(|t| t.agent.clone()))
            .unwrap_or_else(|| format!("agent-index-{agent_index}"));
        let task = task.map_or_else(|| "none".to_string(), |t| t.name.clone());
        (agent, task)
    }
}
