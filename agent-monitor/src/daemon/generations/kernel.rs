//! The real kernel's allowlist tables: `crate::bpf::Kernel`'s methods, unchanged.

use agent_monitor_common::{self as common, AgentSlot};

use super::AllowlistTables;
use crate::bpf::Kernel;
use crate::policy::KernelTables;

impl AllowlistTables for Kernel {
    fn live_bank(&self) -> anyhow::Result<u32> {
        Ok(u32::from(self.state(common::STATE_LIVE_BANK)? != 0))
    }

    fn set_live_bank(&mut self, bank: u32) -> anyhow::Result<()> {
        self.set_state(common::STATE_LIVE_BANK, u64::from(bank))
    }

    fn write_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        Kernel::write_allowlists(self, tables)
    }

    fn retain_allowlists(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize> {
        Kernel::retain_allowlists(self, keep)
    }

    fn set_agent_table(&mut self, id: u32, slot: AgentSlot) -> anyhow::Result<()> {
        Kernel::set_agent_table(self, id, slot)
    }

    fn agent_table_ids(&self) -> anyhow::Result<Vec<u32>> {
        Kernel::agent_table_ids(self)
    }

    fn remove_agent_table(&mut self, id: u32) -> anyhow::Result<()> {
        Kernel::remove_agent_table(self, id)
    }
}
