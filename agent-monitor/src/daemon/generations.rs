//! Policy generations: reload, applying a policy set through the allowlist banks, and which set judged a record.

use super::*;

/// Entries of `old` that `new` does not write again (compared by prefix length and key bytes).
pub(super) fn stale_entries(old: &KernelTables, new: &KernelTables) -> KernelTables {
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
    KernelTables { net, exec }
}

impl Monitor {
    /// Re-reads the policy directory and applies it; all or nothing. The error names file, line
    /// and reason, and also goes to journald at priority err.
    pub(super) fn reload(&mut self, trigger: &str) -> Result<String, String> {
        let dir = self.policies_dir.clone();
        let result = crate::policy_dir::load_dir(&dir)
            .map_err(|e| format!("invalid policies in {}:\n{e}", dir.display()))
            .and_then(|set| {
                let agents = set.len();
                for w in crate::exec_lint::warnings(&set) {
                    tracing::warn!("{w}");
                }
                self.apply_policies(set)
                    .map(|()| agents)
                    .map_err(|e| format!("{e:#}"))
            });
        match result {
            Ok(agents) => {
                self.reporter.counters.reloads += 1;
                let msg = format!(
                    "policy reloaded from {} ({trigger}): {agents} agent(s), applied to {} running task(s)",
                    dir.display(),
                    self.tasks.len()
                );
                self.reporter.notice(
                    Notice::new(message_id::RELOAD_APPLIED, Level::Notice, &msg)
                        .field("POLICY_DIR", dir.display()),
                );
                Ok(msg)
            }
            Err(e) => {
                self.reporter.counters.reload_failures += 1;
                let msg = format!(
                    "policy reload ({trigger}) refused, the previous policy stays in force: {e}"
                );
                self.reporter.notice(
                    Notice::new(message_id::RELOAD_FAILED, Level::Error, &msg)
                        .field("POLICY_DIR", dir.display())
                        .field("RELOAD_ERROR", e),
                );
                Err(msg)
            }
        }
    }

    /// Puts `set` in force for new and running agents without a moment of deny-all or allow-all:
    /// the new allowlists go into the other bank of agent indices beside the old ones, each agent
    /// cgroup is switched over in one map update (index and mode together), then the old bank
    /// goes. On a failure before the switch nothing has changed.
    pub(super) fn apply_policies(&mut self, set: PolicySet) -> anyhow::Result<()> {
        refuse_host_capture(&set, &self.cgroup_root)?;
        let live = self.kernel.state(common::STATE_LIVE_BANK)?;
        let next: u32 = if live == 0 { 1 } else { 0 };
        let base = next * BANK_STRIDE;
        if set.len() > common::MAX_AGENTS as usize {
            bail!(
                "{} agents: the kernel's agent table holds {}",
                set.len(),
                common::MAX_AGENTS
            );
        }
        let mut ids: HashMap<u32, &str> = HashMap::new();
        for p in set.iter() {
            if let Some(other) = ids.insert(agent_id(p.agent()), p.agent()) {
                bail!(
                    "agents {other:?} and {:?} have the same kernel id (a hash of the name): \
                     rename one",
                    p.agent()
                );
            }
        }
        let tables = set
            .compile()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .rebased(base);
        // Files named by exact exec rules, keyed in the new bank too.
        let mut files = ExecFiles::default();
        let file_entries = files.refresh(&set, base).add;
        // DNS: an agent the set adds gets its proxy now (its kernel entry is written with the
        // others below); each agent's proxy endpoint and learned addresses under its new index.
        for p in set.iter() {
            self.dns
                .proxies
                .ensure(p)
                .with_context(|| format!("starting the DNS proxy of agent {:?}", p.agent()))?;
        }
        let dns: Vec<(u32, DnsProxy)> = self
            .dns
            .proxies
            .endpoints()
            .iter()
            .filter_map(|(name, ports)| set.index_of(name).map(|i| (base + i, *ports)))
            .collect();
        // Learned addresses move to the new bank from the daemon's table (live ones only, within
        // each agent's new limit). The limits add up to at most half the map, so both banks fit
        // side by side: learned state can never make a reload fail (compile checked the sum).
        let limits: HashMap<u32, u32> = set
            .learned_limits()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .zip(set.iter())
            .filter_map(|(limit, p)| self.dns.index(p.agent()).map(|i| (i, limit)))
            .collect();
        let carried = self.dns.learned.carried(&limits, monotonic_ns());
        if let Err(e) = self
            .kernel
            .write_allowlists(&tables)
            .and_then(|()| self.kernel.update_exec_files(&file_entries, &[]))
            .and_then(|()| {
                for (index, ports) in &dns {
                    self.kernel.set_dns_proxy(*index, *ports)?;
                }
                Ok(())
            })
        {
            // Entries of the next bank left by an interrupted earlier attempt would be counted
            // against capacity; clear them for the next try.
            let old_base = self.bank_base;
            let _ = self
                .kernel
                .retain_allowlists(|a| (old_base..old_base + BANK_STRIDE).contains(&a));
            return Err(e);
        }
        let mut kept = Vec::with_capacity(carried.len());
        for (dns, addr, value) in &carried {
            let index = self
                .dns
                .proxies
                .endpoints()
                .get(*dns as usize)
                .and_then(|(name, _)| set.index_of(name));
            // Not expected (the budget keeps room); if it happens the address is forgotten, and
            // the agent resolves it again, rather than the reload being refused.
            match index.map(|i| self.kernel.write_learned(base + i, *addr, value)) {
                Some(Ok(())) => kept.push((*dns, *addr)),
                Some(Err(e)) => tracing::error!(
                    "a learned address could not move to the new policy bank, forgotten: {e:#}"
                ),
                None => {}
            }
        }
        // The switch: one update per agent in the table the kernel translates identities through.
        for (i, p) in set.indexed() {
            let table = AgentSlot {
                agent: base + i,
                mode: p.mode().kernel_value(),
                task: common::TASK_NONE,
                source: 0,
            };
            if let Err(e) = self.kernel.set_agent_table(agent_id(p.agent()), table) {
                // Its id keeps the old index, whose entries go below: it is denied everything.
                tracing::error!(
                    agent = p.agent(),
                    "switching to the new policy failed, the agent is denied everything: {e:#}"
                );
            }
        }
        // Agents whose policy went away: no entry = no allowlist, enforce (fail closed).
        let keep: std::collections::HashSet<u32> =
            set.iter().map(|p| agent_id(p.agent())).collect();
        for id in self.kernel.agent_table_ids()? {
            if !keep.contains(&id) {
                self.kernel.remove_agent_table(id)?;
            }
        }
        self.kernel
            .set_state(common::STATE_LIVE_BANK, u64::from(next))?;
        std::thread::sleep(SWAP_GRACE);
        let removed = self
            .kernel
            .retain_allowlists(|a| (base..base + BANK_STRIDE).contains(&a))?;
        tracing::debug!(removed, "old allowlist bank removed");
        for t in self.tasks.values() {
            if set.get(&t.agent).is_none() {
                tracing::warn!(
                    agent = t.agent,
                    task = t.task,
                    "the agent has no policy any more; its running processes are denied every action"
                );
            }
        }
        // Records judged until now may still be in the ring buffer: keep the old set to explain
        // them (see `explain`).
        self.exec_files = files;
        // The proxies answer by the new host rules from the next query on.
        self.dns.proxies.update(set.iter());
        for (dns, lost) in self.dns.learned.set_limits(limits, &kept) {
            if let Some((agent, _)) = self.dns.proxies.endpoints().get(dns as usize) {
                tracing::info!(
                    agent,
                    lost,
                    "learned addresses dropped by the reload (agent removed or its dns.max_learned lowered)"
                );
            }
        }
        self.reporter.counters.dns_learned = self.dns.learned.len() as u64;
        let old = std::mem::replace(&mut self.policies, set);
        if self.superseded.len() == SUPERSEDED_KEPT {
            self.superseded.pop_front();
        }
        self.superseded.push_back((monotonic_ns(), old));
        self.bank_base = base;
        self.policies_loaded = SystemTime::now();
        for w in crate::delegation_lint::warnings(&self.policies) {
            tracing::warn!("{w}");
        }
        self.rearm_selectors();
        let why =
            socket_watch_at_start(&self.policies).or_else(|| self.socket_watch_sticky.clone());
        if let Err(e) = self.kernel.watch_socket_syscalls(why.as_deref()) {
            tracing::error!("socket() watch: {e:#}");
        }
        Ok(())
    }

    /// The agent whose allowlists sit at kernel index `index`.
    pub(super) fn agent_at(&self, index: u32) -> Option<String> {
        let in_bank = |base: u32| index.checked_sub(base).filter(|p| *p < BANK_STRIDE);
        let name = |set: &PolicySet, pos: u32| {
            set.policies()
                .get(pos as usize)
                .map(|p| p.agent().to_string())
        };
        if let Some(pos) = in_bank(self.bank_base) {
            return name(&self.policies, pos);
        }
        let pos = in_bank(self.bank_base ^ BANK_STRIDE)?;
        name(&self.superseded.back()?.1, pos)
    }

    /// The userspace evaluator's account of a kernel verdict. A disagreement means the compiled
    /// tables and the policy model differ: counted and logged, the kernel's verdict stands.
    pub(super) fn explain(
        &mut self,
        agent: &str,
        verdict: Verdict,
        judged_at_ns: u64,
        check: impl Fn(&crate::policy::Policy) -> crate::policy::Decision,
    ) -> String {
        let kernel_allowed = verdict == Verdict::Allowed;
        let current = self.policies.get(agent).map(&check);
        if let Some(d) = current.as_ref().filter(|d| d.allowed == kernel_allowed) {
            return d.to_string();
        }
        // A record the kernel judged before a reload finished is read after it: the policy in
        // force then explains it.
        for (until_ns, set) in self.superseded.iter().rev() {
            if judged_at_ns <= *until_ns
                && let Some(d) = set.get(agent).map(&check)
                && d.allowed == kernel_allowed
            {
                return format!("{d} (policy in force before a reload)");
            }
        }
        if judged_at_ns <= self.predecessor_until_ns {
            // Judged by the pinned tables of the previous daemon, whose policy files may have
            // changed since: not a disagreement between our tables and our evaluator.
            return "judged by the policy in force before this daemon started".into();
        }
        let Some(decision) = current else {
            return "agent unknown to this daemon".into();
        };
        self.reporter.counters.verdict_disagreements += 1;
        tracing::error!(
            agent,
            "kernel verdict {} but policy evaluation says {}: {}",
            verdict.as_str(),
            if decision.allowed {
                "allowed"
            } else {
                "not allowed"
            },
            decision.to_string()
        );
        decision.to_string()
    }
}
