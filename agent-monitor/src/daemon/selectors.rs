//! Selectors and uid bindings: arming them in the kernel, carrying them across reloads, tagging processes already running.

use super::*;

impl Monitor {
    /// Selectors of the policies in force, armed from scratch (issue 4's `Selected::arm` is
    /// re-runnable): the new set's entries are written over the old (same stable ids), then kernel
    /// entries no selector of the new set owns — left by the previous policy or a previous
    /// daemon — are removed.
    pub(super) fn rearm_selectors(&mut self) {
        let registry = &mut self.registry;
        let policies = &self.policies;
        let mut selected = Selected::from_policies(policies, |agent| AgentSlot {
            agent: agent_id(agent),
            mode: policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value()),
            task: registry.number(agent, DEFAULT_TASK),
            source: common::SOURCE_RUN,
        });
        // Tags of task switches (this daemon's or a predecessor's) keep the kernel looking at tags.
        selected.tags_in_use = self.selected.tags_in_use || !self.kernel.tags().is_empty();
        selected.bound = self.carried_bindings(&selected);
        self.selected = selected;
        self.arm_selectors();
        if let Err(e) = self.remove_stale_selectors() {
            tracing::error!("removing selectors of the previous policy: {e:#}");
        }
        match self.tag_running_selected() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                processes = n,
                "running processes of selected executables (and their descendants) are now their agent"
            ),
            Err(e) => tracing::error!("tagging running processes of selected executables: {e:#}"),
        }
    }

    /// The uid bindings that stay under the policies of `next` (see `identity::uid_binding` for
    /// their lifetime): this daemon's, and at the first apply those a previous daemon left in the
    /// pinned map (every uid entry no `uids` selector claims, for an agent that has a policy).
    /// Each kept binding is rewritten for the agent's `default` task as numbered now.
    pub(super) fn carried_bindings(&mut self, next: &Selected) -> identity::uid_binding::Bindings {
        let mut candidates = std::mem::take(&mut self.selected.bound);
        if !self.bindings_adopted {
            self.bindings_adopted = true;
            match self.kernel.uid_selector_entries() {
                Ok(entries) => {
                    for (uid, slot) in entries {
                        let Some(p) = self
                            .policies
                            .iter()
                            .find(|p| agent_id(p.agent()) == slot.agent)
                        else {
                            continue;
                        };
                        candidates
                            .entry(uid)
                            .or_insert(identity::uid_binding::Binding {
                                agent: p.agent().to_string(),
                                slot,
                                origin: "a previous daemon (adopted from the pinned uid map)"
                                    .into(),
                            });
                    }
                }
                Err(e) => tracing::error!("reading the pinned uid map: {e:#}"),
            }
        }
        let mut kept = identity::uid_binding::Bindings::new();
        for (uid, mut b) in candidates {
            let Some(policy) = self.policies.get(&b.agent) else {
                tracing::warn!(
                    uid,
                    agent = b.agent,
                    "uid binding ended: the agent has no policy any more; processes of uid {uid} are no agent's now"
                );
                continue;
            };
            if let Some(identity::uid_binding::Owner::Selector { agent, at }) = next.uid_owner(uid)
            {
                if agent != b.agent {
                    tracing::warn!(
                        uid,
                        "uid {uid} was bound to agent {} by {}; the `uids` selector of agent {agent} at {at} outranks the binding: its processes are agent {agent} now",
                        b.agent,
                        b.origin
                    );
                }
                continue;
            }
            // Bindings give the `default` task, as a selector does; re-numbered for this daemon.
            let mode = policy.mode().kernel_value();
            b.slot = AgentSlot {
                agent: agent_id(&b.agent),
                mode,
                task: self.registry.number(&b.agent, DEFAULT_TASK),
                source: common::SOURCE_UID,
            };
            if let Err(e) = self.kernel.set_uid_selector(uid, b.slot) {
                tracing::error!(uid, agent = b.agent, "rewriting the uid binding: {e:#}");
            }
            kept.insert(uid, b);
        }
        kept
    }

    /// Binds `uid` to `agent` for `run --user` (pid `pid`): checked by `place` before the
    /// placement (`arm` says whether it is new), armed before `run` forks its command. Returns the
    /// warnings for `run` (the uid's processes outside the agent, which are the agent now).
    pub(super) fn bind_uid(
        &mut self,
        agent: &str,
        uid: u32,
        pid: u32,
        arm: bool,
    ) -> anyhow::Result<Vec<String>> {
        if arm {
            let mode = self
                .policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value());
            let slot = AgentSlot {
                agent: agent_id(agent),
                mode,
                task: self.registry.number(agent, DEFAULT_TASK),
                source: common::SOURCE_UID,
            };
            self.kernel
                .set_uid_selector(uid, slot)
                .with_context(|| format!("binding uid {uid} to agent {agent}"))?;
            self.selected.bound.insert(
                uid,
                identity::uid_binding::Binding {
                    agent: agent.to_string(),
                    slot,
                    origin: format!("`run --user` (pid {pid})"),
                },
            );
            self.kernel.set_identity_config(self.selected.config())?;
            tracing::info!(
                uid,
                agent,
                pid,
                "uid bound to the agent by `run --user`: every process of uid {uid} on this host is agent {agent}, whoever starts it"
            );
        }
        let found = identity::uid_binding::outsiders(uid, agent);
        let warning =
            identity::uid_binding::outsiders_warning(uid, agent, "bound by `run --user`", &found);
        if let Some(w) = &warning {
            tracing::warn!(uid, agent, "{w}");
        }
        Ok(warning.into_iter().collect())
    }

    /// The kernel tags at exec and fork only, so a process that already runs a selected
    /// executable (or descends from one) when the selector is armed — daemon start, reload — is
    /// found here through procfs and tagged, every thread. Repeated until a pass finds nothing
    /// new: a child forked before its parent was tagged is caught by the next pass, one forked
    /// after inherits the tag in the kernel. Processes with an identity already keep it (except a
    /// uid one, which an executable selector outranks, as at exec). Returns processes tagged.
    pub(super) fn tag_running_selected(&mut self) -> anyhow::Result<usize> {
        let files: HashMap<common::ExecFileKey, AgentSlot> =
            self.kernel.exec_selector_entries()?.into_iter().collect();
        if files.is_empty() {
            return Ok(0);
        }
        let mut done: HashMap<u32, AgentSlot> = HashMap::new();
        for _pass in 0..5 {
            let procs = identity::procfs::processes();
            let mut found: HashMap<u32, AgentSlot> = HashMap::new();
            let free = |pid: u32| {
                self.identify(pid)
                    .is_none_or(|id| id.slot.source == common::SOURCE_UID)
            };
            for &(pid, _) in &procs {
                if done.contains_key(&pid) || !free(pid) {
                    continue;
                }
                let Ok(st) = identity::selected::stamp(Path::new(&format!("/proc/{pid}/exe")))
                else {
                    continue;
                };
                if let Some(slot) = files.get(&st.selector_key()) {
                    found.insert(
                        pid,
                        AgentSlot {
                            source: common::SOURCE_EXECUTABLE,
                            ..*slot
                        },
                    );
                }
            }
            // Descendants, parents first: repeat until no untagged child of a tagged one is left.
            loop {
                let mut more = Vec::new();
                for &(pid, ppid) in &procs {
                    if found.contains_key(&pid) || done.contains_key(&pid) {
                        continue;
                    }
                    let parent = found.get(&ppid).or_else(|| done.get(&ppid));
                    if let Some(slot) = parent
                        && free(pid)
                    {
                        more.push((pid, *slot));
                    }
                }
                if more.is_empty() {
                    break;
                }
                found.extend(more);
            }
            if found.is_empty() {
                break;
            }
            for (pid, slot) in found {
                for tid in identity::procfs::threads(pid) {
                    self.kernel.tag_thread(tid, slot)?;
                }
                done.insert(pid, slot);
            }
        }
        Ok(done.len())
    }

    pub(super) fn remove_stale_selectors(&mut self) -> anyhow::Result<()> {
        let armed = self.selected.kernel_keys();
        for uid in self.kernel.uid_selectors()? {
            if !armed.uids.contains(&uid) {
                self.kernel.remove_uid_selector(uid)?;
            }
        }
        for key in self.kernel.exec_selectors()? {
            if !armed.files.contains(&key) {
                self.kernel.remove_exec_selector(key)?;
            }
        }
        for (id, slot) in self.kernel.agent_cgroups()? {
            let selector = matches!(slot.source, common::SOURCE_CGROUP | common::SOURCE_UNIT);
            if selector && !armed.cgroups.contains(&id) && !self.tasks.contains_key(&id) {
                self.kernel.remove_agent_cgroup(id)?;
            }
        }
        Ok(())
    }

    /// Arms what selectors can be armed, re-verifies changed executables, writes the kernel's
    /// selector configuration and reports what changed.
    pub(super) fn arm_selectors(&mut self) {
        let registry = &mut self.registry;
        let report = self
            .selected
            .arm(&mut self.kernel, &self.cgroup_root, |agent| AgentSlot {
                agent: agent_id(agent),
                mode: common::MODE_ENFORCE,
                task: registry.number(agent, UNVERIFIED_TASK),
                source: common::SOURCE_EXECUTABLE,
            });
        if let Err(e) = self.kernel.set_identity_config(self.selected.config()) {
            tracing::error!("writing the selector configuration: {e:#}");
        }
        for a in report.armed {
            tracing::info!("selector armed: {a}");
        }
        for w in report.waiting {
            tracing::info!("selector waiting: {w}");
        }
        for r in report.restored {
            tracing::warn!("selector verified again: {r}");
        }
        for e in report.errors {
            tracing::error!("selector not armed: {e}");
        }
        for (agent, uid) in report.uids_armed {
            let found = identity::uid_binding::outsiders(uid, &agent);
            if let Some(w) =
                identity::uid_binding::outsiders_warning(uid, &agent, "a `uids` selector", &found)
            {
                tracing::warn!(uid, agent, "{w}");
            }
        }
        for (agent, m) in report.mismatches {
            tracing::error!(agent, "executable selector digest mismatch: {m}");
            let action = Action {
                time: SystemTime::now(),
                spiffe_id: self.spiffe_id(&agent),
                agent,
                task: UNVERIFIED_TASK.to_string(),
                kind: ActionKind::Identity,
                verdict: Verdict::Alert,
                pid: std::process::id(),
                uid: 0,
                comm: "agent-monitor".into(),
                exe: None,
                destination: None,
                interpreter: None,
                socket: None,
                target: None,
                dest_host: None,
                dns_name: None,
                chain: Vec::new(),
                enforcement: None,
                reason: format!("executable selector digest mismatch: {m}"),
            };
            self.reporter.action(action);
        }
    }

    /// Warns (once per crossing) when the identity map nears its capacity; when it is full,
    /// placements are refused rather than run ungoverned.
    pub(super) fn check_identity_room(&mut self) {
        let used = self.tasks.len() as u64;
        let cap = u64::from(common::MAX_AGENT_CGROUPS);
        let high = used * 100 >= cap * IDENTITY_WARN_PERCENT;
        if high && !self.identity_warned {
            tracing::warn!(
                used,
                capacity = cap,
                "the agent identity map is nearly full; new agent tasks will be refused when it is"
            );
        }
        self.identity_warned = high;
        // The tag map holds every thread only while pid_max fits in it (it was sized at load);
        // a pid_max raised since then could let a fork flood fill it.
        let tag_room = self
            .kernel
            .occupancy()
            .ok()
            .and_then(|o| o.into_iter().find(|m| m.map == "PROCESS_AGENTS"))
            .map(|m| m.capacity);
        let pid_max = crate::host::pid_max().map(u64::from);
        let short = matches!((tag_room, pid_max), (Some(c), Some(p)) if p > c);
        if short && !self.tag_room_warned {
            tracing::error!(
                pid_max,
                capacity = tag_room,
                "kernel.pid_max was raised above the thread-tag map's capacity: a fork flood of a \
                 selector-identified agent could now fill it; restart after `agent-monitor daemon \
                 --uninstall` to resize"
            );
        }
        self.tag_room_warned = short;
    }
}
