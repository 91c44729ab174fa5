//! Tasks and their grants: placement of `run`, task start/narrow/end, revocation, recovery after restart and the grant state file.

use super::*;

/// The grant state file (see [`grant_state`]) and how writing it went. A failed write never fails
/// the grant change (the kernel is the truth): it is counted (`status`, metrics: sink
/// `grant-state-file`), logged once per burst, and at worst a restarted daemon revokes grants it
/// could have kept.
pub(super) struct GrantStateFile {
    pub(super) path: PathBuf,
    pub(super) pin_dir: PathBuf,
    /// This boot's id (written into the file), or why the file cannot be used at all.
    pub(super) boot_id: Result<String, String>,
    pub(super) written: u64,
    pub(super) failed: u64,
    pub(super) throttle: FailureThrottle,
}

impl GrantStateFile {
    const SINK: &'static str = "grant-state-file";

    pub(super) fn new(path: &Path, pin_dir: &Path) -> Self {
        let boot_id = match grant_state::other_owner(path, pin_dir) {
            // A second daemon (on a private pin directory) left at the default path must not
            // clobber the first one's grants: it keeps none across restarts instead.
            Some(owner) => {
                let why = format!(
                    "{} holds the grants of the daemon on pin directory {owner}; give this one \
                     its own --state-file",
                    path.display()
                );
                tracing::warn!("{why}");
                Err(why)
            }
            None => grant_state::boot_id()
                .map_err(|e| format!("reading {}: {e}", grant_state::BOOT_ID_PATH)),
        };
        GrantStateFile {
            path: path.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            boot_id,
            written: 0,
            failed: 0,
            throttle: FailureThrottle::default(),
        }
    }

    /// The predecessor's records, or why there are none to use.
    pub(super) fn load(&self) -> Result<Vec<grant_state::Recorded>, String> {
        let boot_id = self.boot_id.as_ref().map_err(Clone::clone)?;
        match grant_state::read(&self.path) {
            Ok(Some(text)) => grant_state::decode(&self.path, &text, boot_id, &self.pin_dir)
                .map_err(|e| e.to_string()),
            Ok(None) => Err(format!(
                "no grant state file {} (first start with --state-file, or it was removed)",
                self.path.display()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Rewrites the file with the grants in force in `tasks`.
    pub(super) fn save(&mut self, tasks: &Tasks) {
        let now = Instant::now();
        let result = self.boot_id.clone().and_then(|boot_id| {
            let text = grant_state::encode(&boot_id, &self.pin_dir, grant_state::records(tasks));
            grant_state::write(&self.path, &text).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => {
                self.written += 1;
                if let Some(n) = self.throttle.success(now) {
                    tracing::warn!(
                        path = %self.path.display(),
                        unreported_failures = n,
                        total_failed = self.failed,
                        "grant state file written again; failures since the last report: {n}"
                    );
                }
            }
            Err(e) => {
                self.failed += 1;
                if let Some(n) = self.throttle.failure(now, 1) {
                    tracing::warn!(
                        path = %self.path.display(),
                        failures_since_last_report = n,
                        total_failed = self.failed,
                        "cannot write the grant state file (the grants stay in force; a restarted \
                         daemon would revoke them): {e}"
                    );
                }
            }
        }
    }

    /// After a fresh install: the maps hold no grants, so a file left by an earlier daemon of
    /// this pin directory describes none.
    pub(super) fn remove_leftover(&self) {
        match grant_state::remove_if_of(&self.path, &self.pin_dir) {
            Ok(true) => tracing::info!(
                "removed the grant state file {} left by an earlier daemon (its grants went with \
                 its pinned maps)",
                self.path.display()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot remove the stale grant state file {}: {e}",
                self.path.display()
            ),
        }
    }

    /// (sink name, written, failed) for `status` and the metrics.
    pub(super) fn stats(&self) -> (String, u64, u64) {
        (Self::SINK.to_string(), self.written, self.failed)
    }
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

/// Grants as `status` and the task commands show them: `connect ADDR`, `exec PATH`.
pub(super) fn grant_texts(
    net: &[crate::policy::NetRule],
    exec: &[crate::policy::ExecRule],
) -> Vec<String> {
    net.iter()
        .map(|r| format!("connect {}", r.text()))
        .chain(exec.iter().map(|r| format!("exec {}", r.text())))
        .collect()
}

impl Monitor {
    /// Takes over the tasks a previous daemon left in the pinned identity map. Entries whose
    /// cgroup is gone are dropped; the others get their names back from the cgroup tree.
    pub(super) fn recover_tasks(&mut self) -> anyhow::Result<()> {
        let entries = self.kernel.agent_cgroups()?;
        if entries.is_empty() {
            return Ok(());
        }
        // Task numbers a predecessor handed out may live on in tags: never allocate them again.
        let tags = self.kernel.tags();
        let highest = entries
            .iter()
            .map(|(_, s)| s.task)
            .chain(tags.iter().map(|(_, s)| s.task))
            .max()
            .unwrap_or(0);
        self.registry.skip_past(highest);
        // A predecessor's agents may have been placed without `run`'s filter: keep its watch.
        if self
            .kernel
            .mechanisms
            .socket_syscall_watch
            .starts_with("on")
        {
            self.socket_watch_sticky = Some(
                "agents recovered from the previous daemon, which watched socket() for them".into(),
            );
        }
        let tree = self.ident.cgroups().tasks();
        let mut stale = 0;
        for (id, slot) in entries {
            // Selector cgroups are the selectors' business (`rearm_selectors`).
            if slot.source != common::SOURCE_RUN {
                continue;
            }
            match tree.iter().find(|t| t.id == id) {
                Some(t) => {
                    if !self.registry.adopt(&t.agent, &t.task, slot.task) {
                        tracing::warn!(
                            agent = t.agent,
                            task = t.task,
                            number = slot.task,
                            "recovered task number clashes; keeping the first"
                        );
                    }
                    for pid in AgentCgroups::processes(&t.path) {
                        let exe = identity::procfs::exe_name(pid);
                        self.ident.add_root(&LiveProcs, pid, exe);
                    }
                    self.ident.add_task(id, &t.agent, &t.task, t.path.clone());
                }
                None => {
                    stale += 1;
                    self.kernel.remove_agent_cgroup(id)?;
                }
            }
        }
        tracing::info!(
            tasks = self.ident.task_count(),
            stale,
            tags = tags.len(),
            "recovered the running tasks of the previous daemon"
        );
        Ok(())
    }

    /// Takes over a predecessor's task grants: those the state file records, not expired, whose
    /// entries the kernel still holds exactly (a file older than the kernel could otherwise bring
    /// back a grant that was ended or narrowed). Every other grant entry is revoked, so nothing
    /// stays granted that `task end` could not take back. After a fresh install (empty maps) a
    /// leftover state file is removed. Reported by `report_origin`.
    pub(super) fn recover_grants(&mut self) -> anyhow::Result<()> {
        if !matches!(self.kernel.origin, crate::bpf::Origin::Adopted { .. }) {
            self.grant_file.remove_leftover();
            return Ok(());
        }
        let kernel = self.kernel.task_grants()?;
        let now = monotonic_ns();
        let mut r = GrantRecovery::default();
        let mut keep = std::collections::HashSet::new();
        let mut expired = std::collections::HashSet::new();
        match self.grant_file.load() {
            // Without grants in the kernel nothing is lost, whatever the file says.
            Err(_) if kernel.numbers().is_empty() => {}
            Err(why) => r.why.push(why),
            Ok(records) => {
                for rec in records {
                    let name = format!("task {} of agent {}", rec.task, rec.agent);
                    if rec.expires_ns <= now {
                        r.expired += rec.rules();
                        expired.insert(rec.number);
                        continue;
                    }
                    // The task may be known from the cgroup tree already: by the same number.
                    let same_number = match self.registry.find(&rec.agent, &rec.task) {
                        Some(n) => n == rec.number,
                        None => self.registry.adopt(&rec.agent, &rec.task, rec.number),
                    };
                    if !same_number {
                        r.why.push(format!(
                            "{name}: recorded number {} clashes with a recovered task",
                            rec.number
                        ));
                        continue;
                    }
                    let tables = match crate::policy::compile_grants(
                        rec.number, &rec.task, &rec.net, &rec.exec,
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            r.why.push(format!("{name}: {e}"));
                            continue;
                        }
                    };
                    if let Err(e) = kernel.holds_exactly(rec.number, &tables, rec.expires_ns) {
                        r.why.push(format!(
                            "{name}: {e} (the state file is older than the kernel's grants)"
                        ));
                        continue;
                    }
                    r.tasks += 1;
                    r.recovered += rec.rules();
                    keep.insert(rec.number);
                    if let Some(t) = self.registry.get_mut(rec.number) {
                        t.grants = Some(identity::tasks::Grants {
                            net: rec.net,
                            exec: rec.exec,
                            expires_ns: rec.expires_ns,
                            kernel: tables,
                        });
                    }
                }
            }
        }
        r.revoked_entries = kernel.entries(|n| !keep.contains(&n) && !expired.contains(&n));
        let removed = self.kernel.retain_task_grants(|n| keep.contains(&n))?;
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
        self.grant_recovery = r;
        // The file now says what is in force again (or that nothing is).
        self.grant_file.save(&self.registry);
        Ok(())
    }

    /// Makes `pid` a process of `agent`, task `task`; with `user` (`run --user`), binds that uid
    /// to the agent. Returns the task cgroup and warnings for `run`.
    pub(super) fn place(
        &mut self,
        agent: &str,
        task: &str,
        pid: u32,
        user: Option<u32>,
        unscoped: Option<String>,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let slot = self.agent_slot(agent, task, common::SOURCE_RUN)?;
        // Refused before anything changes: a uid that is root's or another agent's.
        let arm_uid = match user {
            Some(uid) => Some((uid, self.ident.may_bind(agent, uid)?)),
            None => None,
        };
        // Before the process becomes an agent: from then on its socket() calls are watched.
        // Sticky for the daemon's life (cheap to keep right; a reload recomputes it).
        if let Some(why) = unfiltered_placement(pid) {
            self.kernel.watch_socket_syscalls(Some(&why))?;
            self.socket_watch_sticky = Some(why);
        }
        let cg = self.enter_task_cgroup(agent, task, slot, pid)?;
        self.ident
            .add_root(&LiveProcs, pid, identity::procfs::exe_name(pid));
        tracing::info!(agent, task, pid, cgroup = %cg.path.display(), "agent process placed");
        if let Some(why) = &unscoped {
            tracing::warn!(
                agent,
                task,
                pid,
                "`run` could not scope its command to its own processes: {why}"
            );
        }
        self.ident.note_placement(pid, cg.id, unscoped);
        let warnings = match arm_uid {
            Some((uid, arm)) => self.bind_uid(agent, uid, pid, arm)?,
            None => Vec::new(),
        };
        Ok((cg.path.display().to_string(), warnings))
    }

    /// Moves `pid` into the (agent, task) cgroup, creating it and its identity entry first.
    pub(super) fn enter_task_cgroup(
        &mut self,
        agent: &str,
        task: &str,
        slot: AgentSlot,
        pid: u32,
    ) -> anyhow::Result<identity::TaskCgroup> {
        self.check_identity_room();
        self.ident
            .enter_task_cgroup(&mut self.kernel, agent, task, slot, pid)
    }

    /// Grants `task` of `agent` what is given (added to what it has; all its grants then share
    /// the new expiry) and optionally moves process `target` into it.
    pub(super) fn task_start(
        &mut self,
        agent: &str,
        task: &str,
        connect: &[String],
        exec: &[String],
        ttl_ms: Option<u64>,
        target: Option<u32>,
    ) -> anyhow::Result<Response> {
        if task == UNVERIFIED_TASK {
            bail!(
                "task {UNVERIFIED_TASK:?} holds processes of an executable whose digest did not match; it is never granted anything"
            );
        }
        if let Some(ms) = ttl_ms {
            identity::tasks::check_ttl_ms(ms).map_err(anyhow::Error::msg)?;
        }
        let slot = self.agent_slot(agent, task, common::SOURCE_TASK_SWITCH)?;
        let (mut net, mut execs) =
            crate::policy::parse_grants(connect, exec).map_err(anyhow::Error::msg)?;
        let old = self
            .registry
            .get_mut(slot.task)
            .and_then(|t| t.grants.take());
        if let Some(old) = &old {
            net.extend(old.net.iter().cloned());
            execs.extend(old.exec.iter().cloned());
        }
        let now = monotonic_ns();
        let expires_ns = ttl_ms.map_or(u64::MAX, |ms| {
            now.saturating_add(ms.saturating_mul(1_000_000))
        });
        let kernel_tables = crate::policy::compile_grants(slot.task, task, &net, &execs)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // New entries first (same keys are overwritten), then the old keys that are gone: no
        // moment in which a grant that continues is missing.
        self.kernel
            .set_task_grants(&kernel_tables, common::Expiry { expires_ns })?;
        if let Some(old) = &old {
            let stale = stale_entries(&old.kernel, &kernel_tables);
            self.kernel.remove_task_grants(&stale)?;
        }
        let texts = grant_texts(&net, &execs);
        if let Some(t) = self.registry.get_mut(slot.task) {
            t.grants = (!net.is_empty() || !execs.is_empty()).then(|| identity::tasks::Grants {
                net,
                exec: execs,
                expires_ns,
                kernel: kernel_tables,
            });
        }
        self.grant_file.save(&self.registry);
        let moved = match target {
            Some(pid) => {
                self.move_into_task(agent, task, slot, pid)?;
                Some(pid)
            }
            None => None,
        };
        tracing::info!(agent, task, grants = ?texts, ttl_ms, moved, "task started");
        Ok(Response::TaskStarted {
            agent: agent.to_string(),
            task: task.to_string(),
            grants: texts,
            expires_in_ms: ttl_ms,
            moved,
        })
    }

    /// Moves process `pid` (an agent process of `agent`) into `task`: a `run` process changes
    /// cgroup; a selector-identified one has every thread re-tagged (its later children inherit).
    pub(super) fn move_into_task(
        &mut self,
        agent: &str,
        task: &str,
        slot: AgentSlot,
        pid: u32,
    ) -> anyhow::Result<()> {
        let Some(id) = self.identify(pid) else {
            bail!(
                "process {pid} is not an agent process; `task start --pid` moves processes of the agent only"
            );
        };
        if id.slot.agent != slot.agent {
            let (other, _) = self.names(&id.slot);
            bail!("process {pid} is agent {other}, not {agent}");
        }
        if id.in_run_cgroup {
            let slot = AgentSlot {
                source: common::SOURCE_RUN,
                ..slot
            };
            self.enter_task_cgroup(agent, task, slot, pid)?;
        } else {
            self.ident.selected.tags_in_use = true;
            self.kernel
                .set_identity_config(self.ident.selected.config())?;
            let threads = identity::procfs::threads(pid);
            if threads.is_empty() {
                bail!("listing the threads of {pid}: the process is gone");
            }
            for tid in threads {
                self.kernel.tag_thread(tid, slot)?;
            }
        }
        tracing::info!(agent, task, pid, "process moved into task");
        Ok(())
    }

    /// Ends `task` of `agent`: its grants leave the kernel now.
    pub(super) fn task_end(&mut self, agent: &str, task: &str) -> anyhow::Result<Response> {
        let Some(number) = self.registry.find(agent, task) else {
            bail!("agent {agent:?} has no task {task:?}");
        };
        let revoked = self.revoke(number)?;
        tracing::info!(agent, task, revoked, "task ended");
        Ok(Response::TaskEnded {
            agent: agent.to_string(),
            task: task.to_string(),
            revoked,
        })
    }

    /// Narrows `task` of `agent` to a subset of its grants, ending no later than before.
    pub(super) fn task_narrow(
        &mut self,
        agent: &str,
        task: &str,
        keep_connect: &[String],
        keep_exec: &[String],
        ttl_ms: Option<u64>,
    ) -> anyhow::Result<Response> {
        if let Some(ms) = ttl_ms {
            identity::tasks::check_ttl_ms(ms).map_err(anyhow::Error::msg)?;
        }
        let Some(number) = self.registry.find(agent, task) else {
            bail!("agent {agent:?} has no task {task:?}");
        };
        let Some(old) = self.registry.get(number).and_then(|t| t.grants.clone()) else {
            bail!("task {task:?} of agent {agent:?} has no grants to narrow");
        };
        let now = monotonic_ns();
        let wanted = ttl_ms.map(|ms| now.saturating_add(ms.saturating_mul(1_000_000)));
        let (net, exec, expires_ns) =
            identity::tasks::narrow(&old, keep_connect, keep_exec, wanted)
                .map_err(anyhow::Error::msg)?;
        let tables = crate::policy::compile_grants(number, task, &net, &exec)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Kept entries are rewritten with the (possibly earlier) expiry, then the rest removed.
        self.kernel
            .set_task_grants(&tables, common::Expiry { expires_ns })?;
        self.kernel
            .remove_task_grants(&stale_entries(&old.kernel, &tables))?;
        let texts = grant_texts(&net, &exec);
        if let Some(t) = self.registry.get_mut(number) {
            t.grants = (!texts.is_empty()).then(|| identity::tasks::Grants {
                net,
                exec,
                expires_ns,
                kernel: tables,
            });
        }
        self.grant_file.save(&self.registry);
        tracing::info!(agent, task, grants = ?texts, "task narrowed");
        Ok(Response::TaskNarrowed {
            agent: agent.to_string(),
            task: task.to_string(),
            grants: texts,
            expires_in_ms: (expires_ns != u64::MAX)
                .then(|| expires_ns.saturating_sub(now) / 1_000_000),
        })
    }

    /// Removes the grants of task `number`; returns how many there were.
    pub(super) fn revoke(&mut self, number: u32) -> anyhow::Result<usize> {
        let Some(grants) = self.registry.get_mut(number).and_then(|t| t.grants.take()) else {
            return Ok(0);
        };
        // The file first: if the kernel update fails, a restart then revokes (never re-grants).
        self.grant_file.save(&self.registry);
        self.kernel.remove_task_grants(&grants.kernel)?;
        Ok(grants.net.len() + grants.exec.len())
    }

    /// Why a grant allowed an action: the task's grant rule that covers it.
    pub(super) fn grant_reason(
        &self,
        task: u32,
        rule: impl Fn(&identity::tasks::Grants) -> Option<String>,
    ) -> String {
        match self.registry.get(task) {
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
}
