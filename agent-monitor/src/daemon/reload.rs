//! Reload: reading the policy directory and putting a set in force, with the other owners'
//! entries (exec files, DNS proxies, learned addresses) moved to the new bank alongside
//! [`Generations`]' allowlists.

use super::*;

/// Why a reload was refused; the previous policy stays in force.
#[derive(Debug, thiserror::Error)]
enum ReloadRefused {
    #[error("invalid policies in {}:\n{errors}", dir.display())]
    Invalid {
        dir: std::path::PathBuf,
        errors: crate::policy_dir::LoadError,
    },
    /// Putting the set in force failed; shown with its whole chain.
    #[error("{0:#}")]
    Apply(anyhow::Error),
}

impl Monitor {
    /// Re-reads the policy directory and applies it; all or nothing. The error names file, line
    /// and reason, and also goes to journald at priority err.
    pub(super) fn reload(&mut self, trigger: &str) -> Result<String, String> {
        self.reload_ca(trigger);
        let dir = self.generations.dir().to_path_buf();
        let result = crate::policy_dir::load_dir(&dir)
            .map_err(|errors| ReloadRefused::Invalid {
                dir: dir.clone(),
                errors,
            })
            .and_then(|set| {
                let agents = set.len();
                for w in crate::exec_lint::warnings(&set) {
                    tracing::warn!("{w}");
                }
                for w in crate::unix_lint::warnings(&set) {
                    tracing::warn!("{w}");
                }
                self.apply_policies(set)
                    .map(|()| agents)
                    .map_err(ReloadRefused::Apply)
            });
        match result {
            Ok(agents) => {
                self.reporter.counters.reloads += 1;
                self.publish_ask_allowlists();
                self.warn_unenforced_unix();
                let msg = format!(
                    "policy reloaded from {} ({trigger}): {agents} agent(s), applied to {} running task(s)",
                    dir.display(),
                    self.ident.task_count()
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
        self.files.check(&set)?;
        let staged = self.generations.stage(set, &self.kernel)?;
        let (set, base) = (staged.set(), staged.base());
        // Files named by exact exec rules, keyed in the new bank too.
        let mut files = ExecFiles::default();
        let file_entries = files.refresh(set, base).add;
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
            .filter_map(|(name, ports)| staged.kernel_index(name).map(|i| (i, *ports)))
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
        // Request rules: which ports of each agent's learned addresses go to the egress endpoint.
        let egress: Vec<(u32, Vec<u16>)> = set
            .iter()
            .filter_map(|p| {
                staged
                    .kernel_index(p.agent())
                    .map(|i| (i, p.egress().ports()))
            })
            .collect();
        self.generations
            .write(&staged, &mut self.kernel, |kernel| {
                kernel.update_exec_files(&file_entries, &[])?;
                for (index, ports) in &dns {
                    kernel.set_dns_proxy(*index, *ports)?;
                }
                for (index, ports) in &egress {
                    kernel.set_egress_ports(*index, ports)?;
                }
                Ok(())
            })?;
        let mut kept = Vec::with_capacity(carried.len());
        let now = monotonic_ns();
        for (dns, addr, value) in &carried {
            let name = self
                .dns
                .proxies
                .endpoints()
                .get(*dns as usize)
                .map(|(n, _)| n);
            let index = name.and_then(|name| staged.kernel_index(name));
            // The server names the kernel may pass, by the new rules.
            let live = super::dns_learner::Live {
                policies: set,
                bank_base: 0,
            };
            let (value, names) = self.dns.kernel_entry(*dns, *addr, *value, live, now);
            // Not expected (the budget keeps room); if it happens the address is forgotten, and
            // the agent resolves it again, rather than the reload being refused.
            match index.map(|i| self.kernel.write_learned(i, *addr, &value, &names)) {
                Some(Ok(())) => kept.push((*dns, *addr)),
                Some(Err(e)) => tracing::error!(
                    "a learned address could not move to the new policy bank, forgotten: {e:#}"
                ),
                None => {}
            }
        }
        self.unix_hooks_before_switch(staged.set());
        // The switch: one update per agent in the table the kernel translates identities through.
        let switched = self
            .generations
            .switch(staged, &mut self.kernel, monotonic_ns)?;
        self.unix_hooks_after_switch();
        for (agent, e) in &switched.failed {
            // Its id keeps the old index, whose entries go with the old bank: it is denied
            // everything.
            tracing::error!(
                agent,
                "switching to the new policy failed, the agent is denied everything: {e:#}"
            );
        }
        let live = self.generations.live();
        for (_, t) in self.ident.tasks() {
            if live.get(&t.agent).is_none() {
                tracing::warn!(
                    agent = t.agent,
                    task = t.task,
                    "the agent has no policy any more; its running processes are denied every action"
                );
            }
        }
        self.exec_files = files;
        // The proxies answer by the new host rules from the next query on.
        self.dns.proxies.update(live.iter());
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
        for w in crate::delegation_lint::warnings(live) {
            tracing::warn!("{w}");
        }
        self.rearm_selectors();
        let why = socket_watch_at_start(self.generations.live())
            .or_else(|| self.socket_watch_sticky.clone());
        if let Err(e) = self.kernel.watch_socket_syscalls(why.as_deref()) {
            tracing::error!("socket() watch: {e:#}");
        }
        self.apply_file_rules();
        for notice in self.request_warnings.for_load(self.generations.live()) {
            self.reporter.notice(notice);
        }
        Ok(())
    }

    /// The agent whose allowlists sit at kernel index `index` (see [`Generations::agent_at`]).
    pub(super) fn agent_at(&self, index: u32) -> Option<String> {
        self.generations.agent_at(index)
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
        let explanation =
            self.generations
                .explain(agent, verdict == Verdict::Allowed, judged_at_ns, check);
        if let Explanation::Disagrees(decision) = &explanation {
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
        }
        explanation.to_string()
    }
}
