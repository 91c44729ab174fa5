//! Policy generations: the policy set in force, the allowlist bank it sits in, the sets replaced
//! by reloads (kept a few seconds' worth) and the predecessor's tables after an adoption; answers
//! which policy judged a record. Pure: the kernel is reached through [`AllowlistTables`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use agent_monitor_common::{self as common, AgentSlot};

use crate::identity::agent_id;
use crate::policy::{Decision, KernelTables, Policy, PolicySet};

mod kernel;
#[cfg(test)]
mod tests;

/// Allowlist indices in the kernel tables come in two banks of this size: a reload writes the new
/// allowlists in the bank not in use, switches every agent over in `AGENT_TABLES` (one map update
/// each; identities hold the agent's stable id, not the index), then deletes the old bank. No
/// agent ever sees a half-written allowlist.
pub(super) const BANK_STRIDE: u32 = 1 << 20;
/// A pause after switching agents to the new bank before the old entries go: a program that read
/// the old slot just before the switch finishes its lookup (they run for microseconds, under RCU).
/// The event loop waits it out as a timer (see [`Generations::retire_due`]), not asleep.
pub(super) const SWAP_GRACE: Duration = Duration::from_millis(10);
/// Replaced policy sets kept to explain records judged before a reload (a few seconds' worth).
const SUPERSEDED_KEPT: usize = 8;

/// What a reload needs from the kernel: the allowlist maps, the agent translation table and the
/// live-bank slot. Implemented by `crate::bpf::Kernel` and by an in-memory fake in the tests.
pub(crate) trait AllowlistTables {
    /// The bank (0 or 1) the kernel's agents are switched to.
    fn live_bank(&self) -> anyhow::Result<u32>;
    fn set_live_bank(&mut self, bank: u32) -> anyhow::Result<()>;
    fn write_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()>;
    /// Removes every allowlist entry whose agent index `keep` refuses; returns how many.
    fn retain_allowlists(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize>;
    fn set_agent_table(&mut self, id: u32, slot: AgentSlot) -> anyhow::Result<()>;
    fn agent_table_ids(&self) -> anyhow::Result<Vec<u32>>;
    fn remove_agent_table(&mut self, id: u32) -> anyhow::Result<()>;
}

/// Why a policy set was not put in force. Before the switch nothing has changed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error("{count} agents: the kernel's agent table holds {max}", max = common::MAX_AGENTS)]
    TooManyAgents { count: usize },
    #[error(
        "agents {first:?} and {second:?} have the same kernel id (a hash of the name): rename one"
    )]
    IdClash { first: String, second: String },
    #[error(transparent)]
    Capacity(#[from] crate::policy::compile::CapacityError),
    /// A kernel map update failed (the message names the map).
    #[error(transparent)]
    Kernel(#[from] anyhow::Error),
}

/// A validated set compiled into the bank not in use, not yet written.
pub(super) struct Staged {
    set: PolicySet,
    tables: KernelTables,
    /// The bank (0 or 1) it goes to.
    bank: u32,
    /// First agent index of the bank in use now (which a failed write must not touch).
    live_base: u32,
}

impl Staged {
    pub(super) fn set(&self) -> &PolicySet {
        &self.set
    }

    /// First agent index of the bank the set goes to.
    pub(super) fn base(&self) -> u32 {
        self.bank * BANK_STRIDE
    }

    /// Kernel allowlist index of `agent` in the new bank.
    pub(super) fn kernel_index(&self, agent: &str) -> Option<u32> {
        self.set.index_of(agent).map(|i| self.base() + i)
    }
}

/// What the switch did besides putting the set in force.
#[derive(Debug)]
pub(super) struct Switched {
    /// Agents whose switch failed: their id keeps the old index, whose entries go with the old
    /// bank, so they are denied everything.
    pub(super) failed: Vec<(String, anyhow::Error)>,
}

/// How the policy in force accounts for a kernel verdict (see [`Generations::explain`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Explanation {
    /// The policy in force agrees.
    Agrees(Decision),
    /// The set replaced by a reload agrees, and the record was judged while it was in force.
    Superseded(Decision),
    /// Judged by the pinned tables of the previous daemon before this one switched them.
    Predecessor,
    /// No set knows the agent.
    UnknownAgent,
    /// The tables and the evaluator differ: the kernel's verdict stands, the evaluator says this.
    Disagrees(Decision),
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Explanation::Agrees(d) | Explanation::Disagrees(d) => write!(f, "{d}"),
            Explanation::Superseded(d) => write!(f, "{d} (policy in force before a reload)"),
            // The predecessor's policy files may have changed since: not a disagreement between
            // our tables and our evaluator.
            Explanation::Predecessor => {
                f.write_str("judged by the policy in force before this daemon started")
            }
            Explanation::UnknownAgent => f.write_str("agent unknown to this daemon"),
        }
    }
}

/// The policy set in force and the generations before it.
pub(super) struct Generations {
    live: PolicySet,
    dir: PathBuf,
    loaded: SystemTime,
    /// First agent index of the live bank (0 or `BANK_STRIDE`).
    bank_base: u32,
    /// Policy sets replaced by reloads, with the monotonic time until which each was in force.
    superseded: VecDeque<(u64, PolicySet)>,
    /// After an adoption: records judged until this monotonic time used the predecessor's tables.
    predecessor_until_ns: u64,
    /// When the bank a switch left may be deleted (the switch plus `SWAP_GRACE`); none when no
    /// old bank waits.
    retire_due: Option<Instant>,
}

impl Generations {
    /// No policy yet (the first [`Generations::switch`] puts the start-up set in force).
    pub(super) fn new(dir: &Path) -> Self {
        Generations {
            live: PolicySet::default(),
            dir: dir.to_path_buf(),
            loaded: SystemTime::now(),
            bank_base: 0,
            superseded: VecDeque::new(),
            predecessor_until_ns: 0,
            retire_due: None,
        }
    }

    /// The policy set in force.
    pub(super) fn live(&self) -> &PolicySet {
        &self.live
    }

    /// The policy directory reloads read.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// When the set in force was put in force.
    pub(super) fn loaded(&self) -> SystemTime {
        self.loaded
    }

    /// First agent index of the live bank.
    pub(super) fn bank_base(&self) -> u32 {
        self.bank_base
    }

    /// Kernel allowlist index of `agent` in the live bank.
    pub(super) fn kernel_index(&self, agent: &str) -> Option<u32> {
        self.live.index_of(agent).map(|i| self.bank_base + i)
    }

    /// Checks `set` against the kernel's limits and compiles it for the bank not in use. Nothing
    /// is written.
    pub(super) fn stage(
        &self,
        set: PolicySet,
        kernel: &impl AllowlistTables,
    ) -> Result<Staged, ReloadError> {
        // From the kernel, not `bank_base`: after an adoption the predecessor's bank is live.
        let live = kernel.live_bank()?;
        let bank = if live == 0 { 1 } else { 0 };
        if set.len() > common::MAX_AGENTS as usize {
            return Err(ReloadError::TooManyAgents { count: set.len() });
        }
        let mut ids: HashMap<u32, &str> = HashMap::new();
        for p in set.iter() {
            if let Some(other) = ids.insert(agent_id(p.agent()), p.agent()) {
                return Err(ReloadError::IdClash {
                    first: other.to_string(),
                    second: p.agent().to_string(),
                });
            }
        }
        let tables = set.compile()?.rebased(bank * BANK_STRIDE);
        Ok(Staged {
            set,
            tables,
            bank,
            live_base: live * BANK_STRIDE,
        })
    }

    /// Writes the staged allowlists into their bank, then `more` (other owners' entries keyed by
    /// the new bank). The bank is emptied first: a previous switch's old entries may still wait
    /// for their timer (the caller has let [`Self::retire_due`] pass), or a predecessor may have
    /// stopped before deleting them; none of them may live on under the new set's indices. On a
    /// failure the new bank is cleared again (entries left there would count against capacity at
    /// the next try); the live bank is untouched.
    pub(super) fn write<K: AllowlistTables>(
        &mut self,
        staged: &Staged,
        kernel: &mut K,
        more: impl FnOnce(&mut K) -> anyhow::Result<()>,
    ) -> Result<(), ReloadError> {
        let live = staged.live_base;
        let keep_live = move |a: u32| (live..live + BANK_STRIDE).contains(&a);
        kernel.retain_allowlists(&keep_live)?;
        self.retire_due = None;
        let result = kernel
            .write_allowlists(&staged.tables)
            .and_then(|()| more(kernel));
        if let Err(e) = result {
            let _ = kernel.retain_allowlists(&keep_live);
            return Err(e.into());
        }
        Ok(())
    }

    /// Puts the written set in force: each agent switched to the new bank in one update (index
    /// and mode together), agents without a policy removed (no entry: denied everything) and the
    /// live bank flipped. The old bank goes at [`Self::retire_old_bank`], once [`Self::retire_due`]
    /// has passed. The replaced set is kept, until `now_ns()` after the switch, to explain records
    /// judged before it.
    pub(super) fn switch(
        &mut self,
        staged: Staged,
        kernel: &mut impl AllowlistTables,
        now_ns: impl Fn() -> u64,
    ) -> Result<Switched, ReloadError> {
        let base = staged.base();
        let mut failed = Vec::new();
        for (i, p) in staged.set.indexed() {
            let slot = AgentSlot {
                agent: base + i,
                mode: p.mode().kernel_value(),
                task: common::TASK_NONE,
                source: 0,
            };
            if let Err(e) = kernel.set_agent_table(agent_id(p.agent()), slot) {
                failed.push((p.agent().to_string(), e));
            }
        }
        let keep: std::collections::HashSet<u32> =
            staged.set.iter().map(|p| agent_id(p.agent())).collect();
        for id in kernel.agent_table_ids()? {
            if !keep.contains(&id) {
                kernel.remove_agent_table(id)?;
            }
        }
        kernel.set_live_bank(staged.bank)?;
        self.retire_due = Some(Instant::now() + SWAP_GRACE);
        let old = std::mem::replace(&mut self.live, staged.set);
        if self.superseded.len() == SUPERSEDED_KEPT {
            self.superseded.pop_front();
        }
        // Records judged until now may still be in the ring buffer: the old set explains them.
        self.superseded.push_back((now_ns(), old));
        self.bank_base = base;
        self.loaded = SystemTime::now();
        Ok(Switched { failed })
    }

    /// When the bank the last switch left may be deleted; none when no old bank waits.
    pub(super) fn retire_due(&self) -> Option<Instant> {
        self.retire_due
    }

    /// Deletes every allowlist entry outside the live bank: the bank the last switch left (call
    /// once [`Self::retire_due`] has passed). Returns the entries removed; 0 when none waited.
    /// The deletion is not retried on a failure: the next write empties that bank first.
    pub(super) fn retire_old_bank(
        &mut self,
        kernel: &mut impl AllowlistTables,
    ) -> anyhow::Result<usize> {
        if self.retire_due.take().is_none() {
            return Ok(0);
        }
        let base = self.bank_base;
        kernel.retain_allowlists(&|a| (base..base + BANK_STRIDE).contains(&a))
    }

    /// After the start-up set is in force: the empty set it replaced explains nothing, and after
    /// an adoption records judged until `now_ns` used the predecessor's tables.
    pub(super) fn started(&mut self, adopted: bool, now_ns: u64) {
        if adopted {
            self.predecessor_until_ns = now_ns;
        }
        self.superseded.clear();
    }

    /// The agent whose allowlists sit at kernel index `index` (a record judged just before a
    /// reload carries an index of the previous bank).
    pub(super) fn agent_at(&self, index: u32) -> Option<String> {
        let in_bank = |base: u32| index.checked_sub(base).filter(|p| *p < BANK_STRIDE);
        let name = |set: &PolicySet, pos: u32| {
            set.policies()
                .get(pos as usize)
                .map(|p| p.agent().to_string())
        };
        if let Some(pos) = in_bank(self.bank_base) {
            return name(&self.live, pos);
        }
        let pos = in_bank(self.bank_base ^ BANK_STRIDE)?;
        name(&self.superseded.back()?.1, pos)
    }

    /// The userspace evaluator's account of a kernel verdict on `agent`, judged at `judged_at_ns`.
    pub(super) fn explain(
        &self,
        agent: &str,
        kernel_allowed: bool,
        judged_at_ns: u64,
        check: impl Fn(&Policy) -> Decision,
    ) -> Explanation {
        let current = self.live.get(agent).map(&check);
        if let Some(d) = current.as_ref().filter(|d| d.allowed == kernel_allowed) {
            return Explanation::Agrees(d.clone());
        }
        // A record the kernel judged before a reload finished is read after it.
        for (until_ns, set) in self.superseded.iter().rev() {
            if judged_at_ns <= *until_ns
                && let Some(d) = set.get(agent).map(&check)
                && d.allowed == kernel_allowed
            {
                return Explanation::Superseded(d);
            }
        }
        if judged_at_ns <= self.predecessor_until_ns {
            return Explanation::Predecessor;
        }
        match current {
            Some(d) => Explanation::Disagrees(d),
            None => Explanation::UnknownAgent,
        }
    }
}
