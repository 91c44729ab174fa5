//! Tasks and their grants as the control requests and a restart reach them: placement of `run`,
//! recovery of the predecessor's tasks, and `task start`/`narrow`/`end` handed to the [`GrantBook`].

use super::*;

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
        self.grants.skip_past(highest);
        // A predecessor's agents may have been placed without `run`'s filter: keep its watch.
        if self.kernel.socket_watch().is_on() {
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
                    if !self.grants.adopt(&t.agent, &t.task, slot.task) {
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

    /// Takes over a predecessor's task grants (see [`GrantBook::recover`]); reported by
    /// `report_origin`.
    pub(super) fn recover_grants(&mut self) -> anyhow::Result<()> {
        let adopted = matches!(self.kernel.origin, crate::bpf::Origin::Adopted { .. });
        Ok(self
            .grants
            .recover(&mut self.kernel, adopted, monotonic_ns())?)
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
        GrantBook::check_start(task, ttl_ms)?;
        let slot = self.agent_slot(agent, task, common::SOURCE_TASK_SWITCH)?;
        let texts = self.grants.start(
            &mut self.kernel,
            slot.task,
            task,
            connect,
            exec,
            ttl_ms,
            monotonic_ns(),
        )?;
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
        let revoked =
            self.grants.end(&mut self.kernel, agent, task)? + self.ask_task_ended(agent, task);
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
        let now = monotonic_ns();
        let narrowed = self.grants.narrow(
            &mut self.kernel,
            agent,
            task,
            keep_connect,
            keep_exec,
            ttl_ms,
            now,
        )?;
        tracing::info!(agent, task, grants = ?narrowed.grants, "task narrowed");
        Ok(Response::TaskNarrowed {
            agent: agent.to_string(),
            task: task.to_string(),
            grants: narrowed.grants,
            expires_in_ms: (narrowed.expires_ns != u64::MAX)
                .then(|| narrowed.expires_ns.saturating_sub(now) / 1_000_000),
        })
    }

    /// Why a grant allowed an action (see [`GrantBook::reason`]).
    pub(super) fn grant_reason(
        &self,
        task: u32,
        rule: impl Fn(&identity::tasks::Grants) -> Option<String>,
    ) -> String {
        self.grants.reason(task, rule)
    }
}
