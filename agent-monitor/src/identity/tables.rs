//! What the identity directory needs of the kernel: the tables that make a process an agent
//! (agent cgroups, per-thread tags, uid and executable selectors) and the selector configuration.
//! `crate::bpf::Kernel` implements it by delegation; unit tests use an in-memory fake.

use agent_monitor_common::{AgentSlot, ExecFileKey, IdentityConfig};

use crate::bpf::Kernel;

pub trait IdentityTables {
    /// Every (cgroup id, identity) in the agent cgroup map.
    fn agent_cgroups(&self) -> anyhow::Result<Vec<(u64, AgentSlot)>>;
    fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()>;
    fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()>;

    /// The tag of thread `tid`, if it has one.
    fn thread_tag(&self, tid: u32) -> Option<AgentSlot>;
    fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()>;
    /// Every per-thread tag.
    fn tags(&self) -> Vec<(u32, AgentSlot)>;

    /// The uids with a selector entry (a `uids` selector or a binding).
    fn uid_selectors(&self) -> anyhow::Result<Vec<u32>>;
    fn uid_selector_entries(&self) -> anyhow::Result<Vec<(u32, AgentSlot)>>;
    fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()>;
    fn remove_uid_selector(&mut self, uid: u32) -> anyhow::Result<()>;

    /// The files with an executable selector entry.
    fn exec_selectors(&self) -> anyhow::Result<Vec<ExecFileKey>>;
    fn exec_selector_entries(&self) -> anyhow::Result<Vec<(ExecFileKey, AgentSlot)>>;
    fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()>;
    fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()>;

    /// Which selector kinds the kernel consults.
    fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()>;
}

impl IdentityTables for Kernel {
    fn agent_cgroups(&self) -> anyhow::Result<Vec<(u64, AgentSlot)>> {
        Kernel::agent_cgroups(self)
    }
    fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()> {
        Kernel::add_agent_cgroup(self, cgroup_id, slot)
    }
    fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        Kernel::remove_agent_cgroup(self, cgroup_id)
    }
    fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        Kernel::thread_tag(self, tid)
    }
    fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        Kernel::tag_thread(self, tid, slot)
    }
    fn tags(&self) -> Vec<(u32, AgentSlot)> {
        Kernel::tags(self)
    }
    fn uid_selectors(&self) -> anyhow::Result<Vec<u32>> {
        Kernel::uid_selectors(self)
    }
    fn uid_selector_entries(&self) -> anyhow::Result<Vec<(u32, AgentSlot)>> {
        Kernel::uid_selector_entries(self)
    }
    fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        Kernel::set_uid_selector(self, uid, slot)
    }
    fn remove_uid_selector(&mut self, uid: u32) -> anyhow::Result<()> {
        Kernel::remove_uid_selector(self, uid)
    }
    fn exec_selectors(&self) -> anyhow::Result<Vec<ExecFileKey>> {
        Kernel::exec_selectors(self)
    }
    fn exec_selector_entries(&self) -> anyhow::Result<Vec<(ExecFileKey, AgentSlot)>> {
        Kernel::exec_selector_entries(self)
    }
    fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()> {
        Kernel::set_exec_selector(self, key, slot)
    }
    fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        Kernel::remove_exec_selector(self, key)
    }
    fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        Kernel::set_identity_config(self, config)
    }
}
