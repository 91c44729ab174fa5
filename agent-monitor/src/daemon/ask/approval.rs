//! Ask mode's decisions: an approval's kernel entry, approved file or grant is written first,
//! and only then is the held call released (`finish`), so the kernel judges it again with the
//! entry in place. Denials, timeouts and withdrawals end here too.

use super::*;

impl Monitor {
    /// `pending`: the held requests, oldest first.
    pub(in crate::daemon) fn pending(&self) -> Vec<PendingRequest> {
        self.ask.desk.pending(monotonic_ns())
    }

    /// Decides request `id`: for an approval its kernel entry (or allowlist entry) first, then
    /// the held calls are released. A failed entry turns the approval into a denial.
    pub(in crate::daemon) fn decide(
        &mut self,
        id: u64,
        decision: &Decision,
        approver: &str,
    ) -> Result<Outcome, DeskError> {
        let now = monotonic_ns();
        if let Some(why) = self
            .ask
            .desk
            .get(id, now)
            .and_then(|r| super::ask_files::scope_refusal(&r, decision))
        {
            return Err(DeskError::Refused { id, why });
        }
        let mut ended = self.ask.desk.decide(id, decision, approver, now)?;
        let mut ports = vec![ALL_PORTS];
        if let Decision::Allow { scope, ttl_ms } = decision {
            match self.apply_approval(&ended.request, *scope, *ttl_ms, approver, now) {
                Ok(p) => ports = p,
                Err(why) => {
                    tracing::error!(id, "approval could not be put in force: {why:#}");
                    ended.outcome.verdict = "denied".into();
                    ended.outcome.scope = None;
                    ended.outcome.reason = Some(format!("approval not put in force: {why:#}"));
                }
            }
        }
        let outcome = ended.outcome.clone();
        let grant_ms = super::unix_ask::grant_ms(&ended.request.action, decision, &outcome);
        self.finish_granting(ended, Some(ports), grant_ms);
        Ok(outcome)
    }

    /// Writes what an approval needs before the call is released; the ports a DNS answer gets.
    pub(super) fn apply_approval(
        &mut self,
        r: &PendingRequest,
        scope: Scope,
        ttl_ms: Option<u64>,
        approver: &str,
        now: u64,
    ) -> anyhow::Result<Vec<PortRange>> {
        let task = r.task.clone().unwrap_or_default();
        // An exec is approved by the file `run` held, if it is still that file.
        let held = match &r.action {
            HeldAction::Exec {
                path,
                device: Some(device),
                inode: Some(inode),
                ..
            } => Some(held_file(path, *device, *inode)?),
            HeldAction::Exec { .. } if scope != Scope::Always => {
                return Err(HeldFileError::NoFile.into());
            }
            _ => None,
        };
        if scope == Scope::Always && matches!(r.action, HeldAction::Unix { .. }) {
            super::unix_ask::check_always(&r.agent, self.generations.live().get(&r.agent))?;
        }
        match (scope, &r.action) {
            (Scope::Once | Scope::Task, HeldAction::Exec { path, .. }) => {
                let Some(file) = held else {
                    return Err(HeldFileError::NoFile.into());
                };
                super::grant_book::GrantBook::check_start(&task, ttl_ms)?;
                let once = scope == Scope::Once;
                let expires_ns = match (once, ttl_ms) {
                    (true, _) => now + ONCE_ENTRY.as_nanos() as u64,
                    (false, Some(ms)) => now.saturating_add(ms.saturating_mul(1_000_000)),
                    (false, None) => u64::MAX,
                };
                let number = self.grants.number(&r.agent, &task);
                self.ask.exec_grants.grant(
                    &mut self.kernel,
                    r.id,
                    number,
                    path,
                    file,
                    once,
                    expires_ns,
                )?;
            }
            (Scope::Once, HeldAction::Dns { name, .. }) => {
                // The answer's addresses are learned as for a listed name, for its TTL.
                self.ask
                    .names
                    .approve(&r.agent, None, name, now + ONCE_NAME.as_nanos() as u64);
            }
            (Scope::Task, HeldAction::Dns { name, .. }) => {
                let until = ttl_ms.map_or(u64::MAX, |ms| now.saturating_add(ms * 1_000_000));
                self.ask.names.approve(&r.agent, Some(&task), name, until);
            }
            // `run` connects the very socket it held; a task grant lives in that `run`
            // (AskAnswer::grant_ms). Nothing goes into the kernel: the connector's connect runs
            // no unix hook.
            (Scope::Once | Scope::Task, HeldAction::Unix { .. }) => {}
            (scope, HeldAction::Open { device, inode, .. }) => {
                self.approve_open(r, scope, ttl_ms, (*device, *inode), now)?;
            }
            (Scope::Once, action) => {
                // An exact task grant with a short expiry of its own, outside the grant book (the
                // task's other grants keep their expiry); the kernel refuses it after that.
                let (connect, exec) = grant_texts_of(action);
                let (net, execs) = crate::policy::parse_grants(&connect, &exec)?;
                let number = self.grants.number(&r.agent, &task);
                let tables = crate::policy::compile_grants(number, &task, &net, &execs)?;
                let expires_ns = now + ONCE_ENTRY.as_nanos() as u64;
                super::grant_book::GrantTables::set_task_grants(
                    &mut self.kernel,
                    &tables,
                    common::Expiry { expires_ns },
                )?;
                let connect = match action {
                    HeldAction::Connect { address, port, .. } => {
                        Some((crate::policy::to_table_addr(*address), *port))
                    }
                    _ => None,
                };
                self.ask.once.add(
                    r.id,
                    expires_ns,
                    OnceEntry {
                        tables,
                        task: number,
                        connect,
                    },
                );
            }
            (Scope::Task, action) => {
                let (connect, exec) = grant_texts_of(action);
                let number = self.grants.number(&r.agent, &task);
                self.grants.start(
                    &mut self.kernel,
                    number,
                    &task,
                    &connect,
                    &exec,
                    ttl_ms,
                    now,
                )?;
            }
            (Scope::Always, action) => {
                let (list, entry) = entry_of(action);
                let comment = format!(
                    "request {}: {} by agent {} task {}, approved by {approver} at {}",
                    r.id,
                    describe(action),
                    r.agent,
                    task,
                    humantime::format_rfc3339_seconds(SystemTime::now())
                );
                let dir = self.generations.dir().to_path_buf();
                let previous = approved_file::append(&dir, &r.agent, list, &entry, &comment)?;
                if let Err(why) = self.reload(&format!("ask approval {}", r.id)) {
                    if let Err(e) = approved_file::restore(&previous) {
                        tracing::error!(
                            "putting {} back after a failed reload: {e}",
                            previous.path.display()
                        );
                    }
                    anyhow::bail!("{why}");
                }
            }
        }
        Ok(vec![ALL_PORTS])
    }

    /// Answers the held calls of a request that ended and reports it.
    pub(super) fn finish(&mut self, ended: Ended<Waiter>, ports: Option<Vec<PortRange>>) {
        self.finish_granting(ended, ports, None);
    }

    /// [`finish`](Self::finish), telling `run` how long it keeps a unix socket's task grant.
    pub(super) fn finish_granting(
        &mut self,
        ended: Ended<Waiter>,
        ports: Option<Vec<PortRange>>,
        grant_ms: Option<u64>,
    ) {
        let allow = ended.approved();
        let c = &mut self.ask.counters;
        match ended.outcome.verdict.as_str() {
            "approved" => c.approved += 1,
            "timeout" => c.timeout += 1,
            "withdrawn" => c.withdrawn += 1,
            _ => c.denied += 1,
        }
        if ended.outcome.verdict != "withdrawn" {
            c.decision_seconds
                .0
                .observe(ended.waited_ns as f64 / 1_000_000_000.0);
        }
        if !allow
            && ended.outcome.verdict != "withdrawn"
            && let HeldAction::Dns { name, .. } = &ended.request.action
        {
            let until = monotonic_ns() + ONCE_NAME.as_nanos() as u64;
            let task = ended.request.task.as_deref();
            self.ask
                .denied_names
                .approve(&ended.request.agent, task, name, until);
        }
        let ports = ports.unwrap_or_default();
        for w in ended.waiters {
            answer(w, allow, ports.clone(), Some(&ended.outcome), grant_ms);
        }
        self.report_decided(&ended.request, &ended.outcome, ended.waited_ns);
        if let Ok(line) = serde_json::to_string(&PendingEvent::Decided(ended.outcome)) {
            let _ = self.ask.followers.send(line);
        }
    }

    /// The exec approvals of task `number` as `status` lists them among the task's grants.
    pub(in crate::daemon) fn ask_exec_grant_texts(&self, number: u32, now: u64) -> Vec<String> {
        self.ask
            .exec_grants
            .of_task(number)
            .map(|(text, expires_ns)| match expires_ns {
                u64::MAX => format!("{text}, until task end"),
                t => format!("{text}, {} s left", t.saturating_sub(now) / 1_000_000_000),
            })
            .collect()
    }

    /// `task end`: the task's exec approvals leave the kernel too; returns how many there were.
    pub(in crate::daemon) fn ask_task_ended(&mut self, agent: &str, task: &str) -> usize {
        let files = self.ask_files_task_ended(agent, task);
        files
            + match self.grants.find(agent, task) {
                Some(number) => self.ask.exec_grants.end_task(&mut self.kernel, number),
                None => 0,
            }
    }
}

/// The allowlist entry an approval of `a` stands for (policy syntax).
fn entry_of(a: &HeldAction) -> (List, String) {
    match a {
        HeldAction::Dns { name, .. } => (List::Network, format!("{name}:1-65535")),
        HeldAction::Connect { address, port, .. } => (
            List::Network,
            std::net::SocketAddr::new(*address, *port).to_string(),
        ),
        HeldAction::Exec { path, .. } => (List::Exec, path.clone()),
        // The socket's own path (where the name led), which the list then matches by identity:
        // a symlink's name would name no socket (docs/unix-sockets.md).
        HeldAction::Unix { path, resolved, .. } => {
            (List::Unix, resolved.clone().unwrap_or_else(|| path.clone()))
        }
        // `apply_approval` takes every approval of an open before (`always` is refused: the
        // policy has no way to allow a file despite `files.deny`).
        HeldAction::Open { .. } => unreachable!("opens are approved by approve_open"),
    }
}

/// `--allow-connect` / `--allow-exec` texts of an action (as `task start` takes them).
fn grant_texts_of(a: &HeldAction) -> (Vec<String>, Vec<String>) {
    match a {
        HeldAction::Connect { address, port, .. } => (
            vec![std::net::SocketAddr::new(*address, *port).to_string()],
            vec![],
        ),
        HeldAction::Exec { path, .. } => (vec![], vec![path.clone()]),
        HeldAction::Dns { .. } | HeldAction::Open { .. } | HeldAction::Unix { .. } => {
            (vec![], vec![])
        }
    }
}
