//! The real kernel's grant maps: `crate::bpf::Kernel`'s methods, unchanged.

use agent_monitor_common::Expiry;

use super::GrantTables;
use crate::bpf::Kernel;
use crate::identity::grant_state::KernelGrants;
use crate::policy::KernelTables;

impl GrantTables for Kernel {
    fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        Kernel::set_task_grants(self, tables, expiry)
    }

    fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        Kernel::remove_task_grants(self, tables)
    }

    fn task_grants(&self) -> anyhow::Result<KernelGrants> {
        Kernel::task_grants(self)
    }

    fn retain_task_grants(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize> {
        Kernel::retain_task_grants(self, keep)
    }

    fn clear_exec_file_grants(&mut self) -> anyhow::Result<usize> {
        Kernel::clear_exec_file_grants(self)
    }
}
