//! The grant book: task numbers, the grants `task start` gives a task, their TTLs, narrowing,
//! ending and expiry, the grant state file and the recovery of a predecessor's grants after a
//! restart. The kernel's grant maps are reached through [`GrantTables`].

use std::collections::HashSet;

use agent_monitor_common::Expiry;

use crate::identity::grant_state::{self, KernelGrants};
use crate::identity::tasks::{self, Grants, Task};
use crate::identity::{Tasks, UNVERIFIED_TASK};
use crate::policy::{ExecRule, KernelTables, NetRule};

mod kernel;
mod state_file;
#[cfg(test)]
mod tests;

pub(super) use state_file::GrantStateFile;

/// What the grant book needs from the kernel: the per-task grant maps. Implemented by
/// `crate::bpf::Kernel` and by an in-memory fake in the tests.
pub(crate) trait GrantTables {
    /// Writes `tables` (same keys are overwritten), each entry until `expiry`.
    fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()>;
    fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()>;
    /// Every grant entry the kernel holds.
    fn task_grants(&self) -> anyhow::Result<KernelGrants>;
    /// Removes every entry whose task number `keep` refuses; returns how many.
    fn retain_task_grants(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize>;
    /// Removes every exec grant by file (ask mode's exec approvals, written by
    /// `ask_desk::exec_grants`); returns how many.
    fn clear_exec_file_grants(&mut self) -> anyhow::Result<usize>;
}

/// Why a grant change was refused. Nothing changed, except for `Kernel` (see its note).
#[derive(Debug, thiserror::Error)]
pub(super) enum GrantError {
    #[error(
        "task {UNVERIFIED_TASK:?} holds processes of an executable whose digest did not match; it is never granted anything"
    )]
    Unverified,
    /// A TTL outside what [`tasks::check_ttl_ms`] accepts.
    #[error(transparent)]
    Ttl(#[from] tasks::TtlError),
    /// A `--allow-*` text that is not a grant rule.
    #[error(transparent)]
    Rules(#[from] crate::policy::GrantRuleError),
    /// A `--keep-*` text that is not one of the task's grants.
    #[error(transparent)]
    Narrow(#[from] tasks::NarrowError),
    #[error(transparent)]
    Capacity(#[from] crate::policy::compile::CapacityError),
    #[error("agent {agent:?} has no task {task:?}")]
    NoTask { agent: String, task: String },
    #[error("task {task:?} of agent {agent:?} has no grants to narrow")]
    NoGrants { agent: String, task: String },
    /// A grant map update failed; the book already says what was asked (the kernel keeps at most
    /// what it had, and a restart revokes what the file does not describe).
    #[error(transparent)]
    Kernel(#[from] anyhow::Error),
}

/// Why one recorded task's grants were not taken over after a restart.
#[derive(Debug, thiserror::Error)]
enum TaskNotRecovered {
    #[error("task {task} of agent {agent}: recorded number {number} clashes with a recovered task")]
    NumberClash {
        agent: String,
        task: String,
        number: u32,
    },
    #[error("task {task} of agent {agent}: {reason}")]
    Capacity {
        agent: String,
        task: String,
        reason: crate::policy::compile::CapacityError,
    },
    #[error(
        "task {task} of agent {agent}: {differ} (the state file is older than the kernel's grants)"
    )]
    NotHeld {
        agent: String,
        task: String,
        differ: grant_state::HeldGrantsDiffer,
    },
}

/// What became of a predecessor's task grants at adoption.
#[derive(Default)]
pub(super) struct GrantRecovery {
    /// Tasks whose grants were taken over, and their grants (rules).
    pub(super) tasks: usize,
    pub(super) recovered: usize,
    /// Grants (rules) recorded but expired while no daemon ran.
    pub(super) expired: usize,
    /// Kernel grant entries removed because nothing recoverable described them.
    pub(super) revoked_entries: usize,
    /// Why grants were not recovered (the whole file, or one task).
    pub(super) why: Vec<String>,
}

/// The grants of a task after `task narrow`.
#[derive(Debug)]
pub(super) struct Narrowed {
    /// As `status` shows them.
    pub(super) grants: Vec<String>,
    /// CLOCK_MONOTONIC ns; `u64::MAX`: until `task end`.
    pub(super) expires_ns: u64,
}

/// Grants as `status` and the task commands show them: `connect ADDR`, `exec PATH`.
pub(super) fn grant_texts(net: &[NetRule], exec: &[ExecRule]) -> Vec<String> {
    net.iter()
        .map(|r| format!("connect {}", r.text()))
        .chain(exec.iter().map(|r| format!("exec {}", r.text())))
        .collect()
}

/// Entries of `old` that `new` does not write again (compared by prefix length and key bytes).
fn stale_entries(old: &KernelTables, new: &KernelTables) -> KernelTables {
    let net = old
        .net
        .iter()
        .filter(|(len, key, _)| !new.net.iter().any(|(l, k, _)| l == len && k == key))
        .cloned()
        .collect();
    let exec = old
        .exec
        .iter()
        .filter(|(len, key)| {
            !new.exec
                .iter()
                .any(|(l, k)| l == len && k.agent == key.agent && k.path == key.path)
        })
        .cloned()
        .collect();
    KernelTables {
        net,
        exec,
        unix: Vec::new(),
    }
}

/// `now_ns` plus a TTL in ms (`None`: until `task end`).
fn expiry(now_ns: u64, ttl_ms: Option<u64>) -> u64 {
    ttl_ms.map_or(u64::MAX, |ms| {
        now_ns.saturating_add(ms.saturating_mul(1_000_000))
    })
}

/// Every task the daemon numbered, with its grants, and the file that keeps them for a restart.
pub(super) struct GrantBook {
    tasks: Tasks,
    file: GrantStateFile,
    recovery: GrantRecovery,
}

impl GrantBook {
    pub(super) fn new(file: GrantStateFile) -> Self {
        GrantBook {
            tasks: Tasks::default(),
            file,
            recovery: GrantRecovery::default(),
        }
    }

    /// The number of (agent, task), allocated on first use (the key of its kernel grants).
    pub(super) fn number(&mut self, agent: &str, task: &str) -> u32 {
        self.tasks.number(agent, task)
    }

    pub(super) fn find(&self, agent: &str, task: &str) -> Option<u32> {
        self.tasks.find(agent, task)
    }

    pub(super) fn get(&self, number: u32) -> Option<&Task> {
        self.tasks.get(number)
    }

    /// Tasks of `agent`.
    pub(super) fn of_agent<'a>(
        &'a self,
        agent: &'a str,
    ) -> impl Iterator<Item = (u32, &'a Task)> + 'a {
        self.tasks.of_agent(agent)
    }

    /// Takes over a predecessor's task number (see [`Tasks::adopt`]).
    pub(super) fn adopt(&mut self, agent: &str, task: &str, number: u32) -> bool {
        self.tasks.adopt(agent, task, number)
    }

    /// Never allocates `number` or below (see [`Tasks::skip_past`]).
    pub(super) fn skip_past(&mut self, number: u32) {
        self.tasks.skip_past(number);
    }

    /// What became of the predecessor's grants (see [`GrantBook::recover`]).
    pub(super) fn recovery(&self) -> &GrantRecovery {
        &self.recovery
    }

    /// (sink name, written, failed) of the state file, for `status` and the metrics.
    pub(super) fn file_stats(&self) -> (String, u64, u64) {
        self.file.stats()
    }

    /// Refusals of `task start` that need no lookup, checked before the task gets a number.
    pub(super) fn check_start(task: &str, ttl_ms: Option<u64>) -> Result<(), GrantError> {
        if task == UNVERIFIED_TASK {
            return Err(GrantError::Unverified);
        }
        if let Some(ms) = ttl_ms {
            tasks::check_ttl_ms(ms)?;
        }
        Ok(())
    }

    /// Grants task `number` (named `task`) what is given, added to what it has; all its grants
    /// then share the new expiry. Returns its grants as `status` shows them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        &mut self,
        kernel: &mut impl GrantTables,
        number: u32,
        task: &str,
        connect: &[String],
        exec: &[String],
        ttl_ms: Option<u64>,
        now_ns: u64,
    ) -> Result<Vec<String>, GrantError> {
        Self::check_start(task, ttl_ms)?;
        let (mut net, mut execs) = crate::policy::parse_grants(connect, exec)?;
        let old = self.tasks.get(number).and_then(|t| t.grants.clone());
        if let Some(old) = &old {
            net.extend(old.net.iter().cloned());
            execs.extend(old.exec.iter().cloned());
        }
        let expires_ns = expiry(now_ns, ttl_ms);
        let tables = crate::policy::compile_grants(number, task, &net, &execs)?;
        // New entries first (same keys are overwritten), then the old keys that are gone: no
        // moment in which a grant that continues is missing.
        kernel.set_task_grants(&tables, Expiry { expires_ns })?;
        if let Some(old) = &old {
            kernel.remove_task_grants(&stale_entries(&old.kernel, &tables))?;
        }
        let texts = grant_texts(&net, &execs);
        self.set_grants(number, net, execs, expires_ns, tables);
        Ok(texts)
    }

    /// Narrows `task` of `agent` to a subset of its grants, ending no later than before.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn narrow(
        &mut self,
        kernel: &mut impl GrantTables,
        agent: &str,
        task: &str,
        keep_connect: &[String],
        keep_exec: &[String],
        ttl_ms: Option<u64>,
        now_ns: u64,
    ) -> Result<Narrowed, GrantError> {
        if let Some(ms) = ttl_ms {
            tasks::check_ttl_ms(ms)?;
        }
        let number = self.find_task(agent, task)?;
        let Some(old) = self.tasks.get(number).and_then(|t| t.grants.clone()) else {
            return Err(GrantError::NoGrants {
                agent: agent.to_string(),
                task: task.to_string(),
            });
        };
        let wanted = ttl_ms.map(|ms| expiry(now_ns, Some(ms)));
        let (net, exec, expires_ns) = tasks::narrow(&old, keep_connect, keep_exec, wanted)?;
        let tables = crate::policy::compile_grants(number, task, &net, &exec)?;
        // Kept entries are rewritten with the (possibly earlier) expiry, then the rest removed.
        kernel.set_task_grants(&tables, Expiry { expires_ns })?;
        kernel.remove_task_grants(&stale_entries(&old.kernel, &tables))?;
        let grants = grant_texts(&net, &exec);
        self.set_grants(number, net, exec, expires_ns, tables);
        Ok(Narrowed { grants, expires_ns })
    }

    /// Ends `task` of `agent`: its grants leave the kernel now. Returns how many there were.
    pub(super) fn end(
        &mut self,
        kernel: &mut impl GrantTables,
        agent: &str,
        task: &str,
    ) -> Result<usize, GrantError> {
        let number = self.find_task(agent, task)?;
        self.revoke(kernel, number)
    }

    /// Removes the grants of task `number`; returns how many there were.
    pub(super) fn revoke(
        &mut self,
        kernel: &mut impl GrantTables,
        number: u32,
    ) -> Result<usize, GrantError> {
        let Some(grants) = self.tasks.get_mut(number).and_then(|t| t.grants.take()) else {
            return Ok(0);
        };
        // The file first: if the kernel update fails, a restart then revokes (never re-grants).
        self.file.save(&self.tasks);
        kernel.remove_task_grants(&grants.kernel)?;
        Ok(grants.net.len() + grants.exec.len())
    }

    /// Removes the grants that expired at `now_ns`. The kernel already refuses them; this tidies
    /// its maps, the book and the file.
    pub(super) fn expire(&mut self, kernel: &mut impl GrantTables, now_ns: u64) {
        for number in self.tasks.expired(now_ns) {
            let names = self
                .tasks
                .get(number)
                .map(|t| (t.agent.clone(), t.name.clone()));
            match self.revoke(kernel, number) {
                Ok(n) => {
                    tracing::info!(task = ?names, grants = n, "task grants expired and removed")
                }
                Err(e) => tracing::warn!("removing expired grants of {names:?}: {e:#}"),
            }
        }
    }

    /// Why a grant allowed an action: the task's grant rule that covers it.
    pub(super) fn reason(&self, task: u32, rule: impl Fn(&Grants) -> Option<String>) -> String {
        match self.tasks.get(task) {
            Some(t) => match t.grants.as_ref().and_then(rule) {
                Some(r) => format!("granted to task {} by `task start`: {r}", t.name),
                None => format!(
                    "granted to task {} by `task start` (grant since ended)",
                    t.name
                ),
            },
            None => "granted to an unknown task".into(),
        }
    }

    /// Takes over a predecessor's task grants (`adopted`: its pinned maps were adopted): those
    /// the state file records, not expired, whose entries the kernel still holds exactly (a file
    /// older than the kernel could otherwise bring back a grant that was ended or narrowed).
    /// Every other grant entry is revoked, so nothing stays granted that `task end` could not
    /// take back. After a fresh install (empty maps) a leftover state file is removed. Tasks
    /// known from the cgroup tree must be adopted first (their numbers are checked).
    pub(super) fn recover(
        &mut self,
        kernel: &mut impl GrantTables,
        adopted: bool,
        now_ns: u64,
    ) -> Result<(), GrantError> {
        if !adopted {
            self.file.remove_leftover();
            return Ok(());
        }
        let held = kernel.task_grants()?;
        let mut r = GrantRecovery::default();
        let mut keep = HashSet::new();
        let mut expired = HashSet::new();
        match self.file.load() {
            // Without grants in the kernel nothing is lost, whatever the file says.
            Err(_) if held.numbers().is_empty() => {}
            Err(why) => r.why.push(why.to_string()),
            Ok(records) => {
                for rec in records {
                    if rec.expires_ns <= now_ns {
                        r.expired += rec.rules();
                        expired.insert(rec.number);
                        continue;
                    }
                    match self.recover_one(&held, rec) {
                        Ok((number, rules)) => {
                            r.tasks += 1;
                            r.recovered += rules;
                            keep.insert(number);
                        }
                        Err(why) => r.why.push(why.to_string()),
                    }
                }
            }
        }
        r.revoked_entries = held.entries(|n| !keep.contains(&n) && !expired.contains(&n));
        let removed = kernel.retain_task_grants(&|n| keep.contains(&n))?;
        // Exec grants by file (ask approvals) are not in the state file: none is recovered, and
        // the held calls they were for were refused when the predecessor's ask channels broke.
        r.revoked_entries += kernel.clear_exec_file_grants()?;
        for why in &r.why {
            tracing::warn!("task grants not recovered: {why}");
        }
        tracing::info!(
            tasks = r.tasks,
            grants = r.recovered,
            expired = r.expired,
            revoked_entries = r.revoked_entries,
            removed_entries = removed,
            "recovered the task grants of the previous daemon"
        );
        self.recovery = r;
        // The file now says what is in force again (or that nothing is).
        self.file.save(&self.tasks);
        Ok(())
    }

    /// Takes over one recorded task's grants if the kernel holds exactly them: (number, rules),
    /// or why not.
    fn recover_one(
        &mut self,
        held: &KernelGrants,
        rec: grant_state::Recorded,
    ) -> Result<(u32, usize), TaskNotRecovered> {
        let names = || (rec.agent.clone(), rec.task.clone());
        // The task may be known from the cgroup tree already: by the same number.
        let same_number = match self.tasks.find(&rec.agent, &rec.task) {
            Some(n) => n == rec.number,
            None => self.tasks.adopt(&rec.agent, &rec.task, rec.number),
        };
        if !same_number {
            let (agent, task) = names();
            return Err(TaskNotRecovered::NumberClash {
                agent,
                task,
                number: rec.number,
            });
        }
        let tables = crate::policy::compile_grants(rec.number, &rec.task, &rec.net, &rec.exec)
            .map_err(|reason| {
                let (agent, task) = names();
                TaskNotRecovered::Capacity {
                    agent,
                    task,
                    reason,
                }
            })?;
        held.holds_exactly(rec.number, &tables, rec.expires_ns)
            .map_err(|differ| {
                let (agent, task) = names();
                TaskNotRecovered::NotHeld {
                    agent,
                    task,
                    differ,
                }
            })?;
        let rules = rec.rules();
        if let Some(t) = self.tasks.get_mut(rec.number) {
            t.grants = Some(Grants {
                net: rec.net,
                exec: rec.exec,
                expires_ns: rec.expires_ns,
                kernel: tables,
            });
        }
        Ok((rec.number, rules))
    }

    fn find_task(&self, agent: &str, task: &str) -> Result<u32, GrantError> {
        self.tasks
            .find(agent, task)
            .ok_or_else(|| GrantError::NoTask {
                agent: agent.to_string(),
                task: task.to_string(),
            })
    }

    /// Records the grants of task `number` (none if both lists are empty) and saves the file.
    fn set_grants(
        &mut self,
        number: u32,
        net: Vec<NetRule>,
        exec: Vec<ExecRule>,
        expires_ns: u64,
        kernel: KernelTables,
    ) {
        if let Some(t) = self.tasks.get_mut(number) {
            t.grants = (!net.is_empty() || !exec.is_empty()).then_some(Grants {
                net,
                exec,
                expires_ns,
                kernel,
            });
        }
        self.file.save(&self.tasks);
    }
}

/// The identity directory numbers tasks through the book, so numbering and grants stay one record.
impl crate::identity::TaskNumbers for GrantBook {
    fn number(&mut self, agent: &str, task: &str) -> u32 {
        self.tasks.number(agent, task)
    }
    fn find(&self, agent: &str, task: &str) -> Option<u32> {
        self.tasks.find(agent, task)
    }
    fn get(&self, number: u32) -> Option<&Task> {
        self.tasks.get(number)
    }
}
