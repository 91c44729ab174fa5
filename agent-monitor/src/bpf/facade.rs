//! [`Kernel`]'s methods over the tables: what the rest of the daemon calls. Each delegates to the
//! table that owns the map; the few that span tables (reload's clean-up, selectors moving the
//! agent-socket hooks) combine them here.

use std::net::IpAddr;

use agent_monitor_common::{
    self as common, AgentSlot, COUNTERS, DnsProxy, ExecFileKey, Expiry, IdentityConfig, Learned,
};
use anyhow::Context as _;

use super::{ActionStream, Kernel, Occupancy};
use crate::identity::grant_state::KernelGrants;
use crate::policy::KernelTables;

impl Kernel {
    /// Adds allowlist entries (those of one bank; see the daemon's reload). Checks capacity
    /// against what is in the maps now, and on failure removes what it added: all or nothing.
    pub fn write_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        self.tables.allow.write(tables)?;
        Ok(self.tables.unix.write(tables)?)
    }

    /// Removes every allowlist entry (and DNS proxy and learned address) whose agent index `keep`
    /// rejects. Returns how many went.
    pub fn retain_allowlists(&mut self, keep: impl Fn(u32) -> bool) -> anyhow::Result<usize> {
        Ok(self.tables.allow.retain(&keep)?
            + self.tables.dns.retain(&keep)?
            + self.tables.unix.retain(&keep)?
            + self.tables.egress.retain(&keep)?)
    }

    /// Adds and removes entries of the file-identity exec allowlist.
    pub fn update_exec_files(
        &mut self,
        add: &[(ExecFileKey, u32)],
        remove: &[ExecFileKey],
    ) -> anyhow::Result<()> {
        Ok(self.tables.allow.update_exec_files(add, remove)?)
    }

    /// Makes every task in cgroup `cgroup_id` an agent process, from the next syscall on; also
    /// rewrites an existing entry in one atomic update (reload).
    pub fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()> {
        Ok(self.tables.identity.add_agent_cgroup(cgroup_id, slot)?)
    }

    /// Puts agent `id`'s allowlist index and mode in force (one atomic update per agent).
    pub fn set_agent_table(&mut self, id: u32, table: AgentSlot) -> anyhow::Result<()> {
        Ok(self.tables.identity.set_agent_table(id, table)?)
    }

    /// Stable ids with an entry in the agent table.
    pub fn agent_table_ids(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.tables.identity.agent_table_ids())
    }

    /// Forgets agent `id`: its processes fall back to "no allowlist, enforce" in the kernel.
    pub fn remove_agent_table(&mut self, id: u32) -> anyhow::Result<()> {
        Ok(self.tables.identity.remove_agent_table(id)?)
    }

    pub fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        Ok(self.tables.identity.remove_agent_cgroup(cgroup_id)?)
    }

    /// Every (cgroup id, slot) in the identity map: what a previous daemon left governed.
    pub fn agent_cgroups(&self) -> anyhow::Result<Vec<(u64, AgentSlot)>> {
        Ok(self.tables.identity.agent_cgroups())
    }

    /// Which selector kinds the kernel consults beyond the agent cgroups. With any, a process
    /// anywhere on the host can be an agent, so the agent-socket hooks go to the root first; with
    /// none, they return below the agents' cgroup afterwards.
    pub fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        let host_wide = config.selectors != 0;
        // A failed move still lets the selectors in: their agents are then judged by every
        // hook but the agent-socket ones, rather than by none.
        let moved = if host_wide {
            self.scope_agent_hooks(true)
        } else {
            Ok(())
        };
        self.tables.identity.set_config(config)?;
        if !host_wide {
            self.scope_agent_hooks(false)?;
        }
        moved
    }

    /// Moves the agent-socket hooks (see `HookPlacement::scope_agent_hooks`) and leaves where
    /// they are for the next daemon.
    fn scope_agent_hooks(&mut self, host_wide: bool) -> anyhow::Result<()> {
        if self
            .hooks
            .scope_agent_hooks(host_wide, &mut self.mechanisms)?
        {
            self.tables
                .state
                .set(common::STATE_AGENT_HOOKS_HOST_WIDE, u64::from(host_wide))
                .context("writing where the agent-socket hooks are")?;
        }
        if self.mechanisms.unix_socket_hooks.is_available() {
            self.set_unix_peer_hooks()?;
        }
        Ok(())
    }

    pub fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        Ok(self.tables.identity.set_uid_selector(uid, slot)?)
    }

    /// Arms (or re-arms with another slot) the executable selector for the file `key`
    /// (device and inode, `agent` 0).
    pub fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()> {
        Ok(self.tables.identity.set_exec_selector(key, slot)?)
    }

    pub fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        Ok(self.tables.identity.remove_exec_selector(key)?)
    }

    /// How many threads the tag map can hold (sized at load from pid_max).
    pub fn tag_capacity(&self) -> u64 {
        u64::from(self.tables.identity.tag_capacity())
    }

    /// Every per-thread tag: (thread id, identity).
    pub fn tags(&self) -> Vec<(u32, AgentSlot)> {
        self.tables.identity.tags()
    }

    pub fn uid_selectors(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tables
            .identity
            .uid_selector_entries()
            .into_iter()
            .map(|(uid, _)| uid)
            .collect())
    }

    /// Every uid selector entry with the identity it gives (a restarted daemon adopts the
    /// `run --user` bindings among them).
    pub fn uid_selector_entries(&self) -> anyhow::Result<Vec<(u32, AgentSlot)>> {
        Ok(self.tables.identity.uid_selector_entries())
    }

    pub fn remove_uid_selector(&mut self, uid: u32) -> anyhow::Result<()> {
        Ok(self.tables.identity.remove_uid_selector(uid)?)
    }

    /// Every armed executable selector: the file (device, inode) and the identity it gives.
    pub fn exec_selector_entries(&self) -> anyhow::Result<Vec<(ExecFileKey, AgentSlot)>> {
        Ok(self.tables.identity.exec_selector_entries())
    }

    pub fn exec_selectors(&self) -> anyhow::Result<Vec<ExecFileKey>> {
        Ok(self
            .tables
            .identity
            .exec_selector_entries()
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// Tags thread `tid` as `slot` (a task switch of a selector-identified process).
    pub fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        Ok(self.tables.identity.tag_thread(tid, slot)?)
    }

    /// The tag of thread `tid`, if it has one.
    pub fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        self.tables.identity.thread_tag(tid)
    }

    /// Every task grant entry in the kernel, with its expiry.
    pub fn task_grants(&self) -> anyhow::Result<KernelGrants> {
        Ok(self.tables.grants.entries())
    }

    /// Removes every task grant entry whose task number `keep` rejects; returns how many went.
    pub fn retain_task_grants(&mut self, keep: impl Fn(u32) -> bool) -> anyhow::Result<usize> {
        Ok(self.tables.grants.retain(keep)?)
    }

    /// Writes the grants of one task (entries keyed by the task number), valid until `expiry`.
    pub fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        Ok(self.tables.grants.set(tables, expiry)?)
    }

    /// Removes grant entries written by `set_task_grants`. Entries already gone are fine.
    pub fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        Ok(self.tables.grants.remove(tables)?)
    }

    /// Writes a task's exec grant by file (an ask-mode approval of an exec).
    pub fn set_exec_file_grant(
        &mut self,
        key: common::ExecFileKey,
        grant: common::FileGrant,
    ) -> anyhow::Result<()> {
        Ok(self.tables.grants.set_file(key, grant)?)
    }

    /// Removes a task's exec grant by file; one already gone is fine.
    pub fn remove_exec_file_grant(&mut self, key: common::ExecFileKey) -> anyhow::Result<()> {
        Ok(self.tables.grants.remove_file(key)?)
    }

    /// Removes every exec grant by file; returns how many went.
    pub fn clear_exec_file_grants(&mut self) -> anyhow::Result<usize> {
        Ok(self.tables.grants.clear_files()?)
    }

    /// Points agent `agent`'s port-53 traffic at its DNS proxy endpoint, and keeps every other
    /// agent away from that endpoint.
    pub fn set_dns_proxy(&mut self, agent: u32, ports: DnsProxy) -> anyhow::Result<()> {
        Ok(self.tables.dns.set_proxy(agent, ports)?)
    }

    /// Allows `agent` to reach `addr` as `value` says (ports, expiry), learned from a DNS answer,
    /// with the server names a connection to it may present when they are judged in the kernel.
    pub fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
        names: &[crate::egress::kernel_names::KernelName],
    ) -> anyhow::Result<()> {
        Ok(self.tables.dns.write_learned(agent, addr, value, names)?)
    }

    pub fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()> {
        Ok(self.tables.dns.remove_learned(agent, addr)?)
    }

    /// Where the kernel redirects connects with request rules (0: nowhere, they are refused).
    pub fn set_egress_endpoint(&mut self, port: u16) -> anyhow::Result<()> {
        Ok(self.tables.egress.set_endpoint(port)?)
    }

    /// The ports of agent index `agent`'s request rules (see `EGRESS_PORTS`).
    pub fn set_egress_ports(&mut self, agent: u32, ports: &[u16]) -> anyhow::Result<()> {
        Ok(self.tables.egress.set_ports(agent, ports)?)
    }

    /// Whether connects with server-name rules only have their names judged in the kernel.
    pub fn set_server_names_in_kernel(&mut self, on: bool) -> anyhow::Result<()> {
        Ok(self.tables.egress.set_server_names_in_kernel(on)?)
    }

    /// Forgets the kernel-judged connection `cookie` (closed by the daemon, or gone).
    pub fn remove_sni_flow(&mut self, cookie: u64) -> anyhow::Result<()> {
        Ok(self.tables.egress.remove_sni_flow(cookie)?)
    }

    /// The cookies of the connections the kernel holds for server-name judging.
    pub fn sni_flow_cookies(&self) -> Vec<u64> {
        self.tables.egress.sni_flow_cookies()
    }

    /// The flow the kernel redirected as `token`, if it still holds it.
    pub fn egress_flow(&self, token: u32) -> Option<common::EgressFlow> {
        self.tables.egress.flow(token)
    }

    /// The kernel's loss counters summed over CPUs, indexed by `COUNTER_*`.
    pub fn counters(&self) -> anyhow::Result<[u64; COUNTERS as usize]> {
        Ok(self.tables.state.counters())
    }

    pub fn state(&self, slot: u32) -> anyhow::Result<u64> {
        Ok(self.tables.state.get(slot)?)
    }

    pub fn set_state(&mut self, slot: u32, value: u64) -> anyhow::Result<()> {
        Ok(self.tables.state.set(slot, value)?)
    }

    /// Leaves the time and the loss counter in the pinned state, for the next daemon.
    pub fn heartbeat(&mut self) -> anyhow::Result<()> {
        Ok(self.tables.state.heartbeat()?)
    }

    /// Entries in use of the maps that fill up, against their capacities.
    pub fn occupancy(&self) -> anyhow::Result<Vec<Occupancy>> {
        Ok(self.tables.occupancy())
    }

    /// Hands the ring buffer to its reader. Can be called once.
    pub fn take_actions(&mut self) -> anyhow::Result<ActionStream> {
        ActionStream::new(self.tables.take_actions()?)
    }
}
