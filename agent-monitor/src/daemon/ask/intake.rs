//! Ask mode's intake: the ask channels of `run` and the DNS proxy's held queries come in here,
//! are answered at once when the agent's own list or a grant already covers them, or are held
//! on the desk until a decision or their timeout (`ask_tick`).

use super::*;

impl Monitor {
    /// `AskChannel` from `run_pid`: only the `run` this daemon placed for (agent, task), of an
    /// agent in ask mode.
    pub(in crate::daemon) fn open_ask_channel(
        &self,
        run_pid: u32,
        agent: &str,
        task: &str,
    ) -> anyhow::Result<()> {
        let Some(placement) = self.ident.placement(run_pid) else {
            bail!("pid {run_pid} is not an `agent-monitor run` this daemon placed");
        };
        let Some(entry) = self.ident.task(placement.task_cgroup) else {
            bail!("the task pid {run_pid} was placed in is gone");
        };
        if entry.agent != agent || entry.task != task {
            bail!(
                "`run` {run_pid} was placed for agent {} task {}, not agent {agent} task {task}",
                entry.agent,
                entry.task
            );
        }
        match self.generations.live().get(agent).map(|p| p.mode()) {
            Some(crate::policy::model::Mode::Ask) => {
                self.publish_ask_allowlists();
                Ok(())
            }
            _ => bail!("agent {agent} is not in ask mode"),
        }
    }

    /// Puts the own allowlist of every ask-mode agent in force where the ask channels read it
    /// (at a channel's opening and after every reload). The channels send a changed one on.
    pub(in crate::daemon) fn publish_ask_allowlists(&self) {
        let lists: AskAllowlists = self
            .generations
            .live()
            .iter()
            .filter(|p| p.mode() == crate::policy::model::Mode::Ask)
            .map(|p| {
                let list = AskAllowlist {
                    connect: p.network().iter().map(|r| r.text().to_string()).collect(),
                    exec: p.exec().iter().map(|r| r.text().to_string()).collect(),
                };
                (p.agent().to_string(), list)
            })
            .collect();
        self.ask.allowlists.send_if_modified(|old| {
            let changed = **old != lists;
            if changed {
                *old = Arc::new(lists);
            }
            changed
        });
    }

    /// A query of an ask-mode agent for a name off its list.
    pub(in crate::daemon) fn on_dns_ask(
        &mut self,
        dns_index: u32,
        name: String,
        qtype: String,
        reply: oneshot::Sender<Option<Vec<PortRange>>>,
    ) {
        let Some(agent) = self
            .dns
            .proxies
            .endpoints()
            .get(dns_index as usize)
            .map(|(a, _)| a.clone())
        else {
            let _ = reply.send(None);
            return;
        };
        let client = self.dns.client(&agent).cloned();
        let (pid, task, uid, chain) = match &client {
            Some(c) => {
                let a = self.subject_action(&c.subject, Object::Control, Verdict::Denied);
                (a.pid, Some(a.task), Some(a.uid), a.chain)
            }
            None => (0, None, None, Vec::new()),
        };
        let now = monotonic_ns();
        if self.ask.names.approved(&agent, task.as_deref(), &name, now) {
            self.ask.counters.allowed_without_asking += 1;
            let _ = reply.send(Some(vec![ALL_PORTS]));
            return;
        }
        if self
            .ask
            .denied_names
            .approved(&agent, task.as_deref(), &name, now)
        {
            self.ask.counters.denied_without_asking += 1;
            let _ = reply.send(None);
            return;
        }
        let key = format!("{agent}\0dns\0{name}");
        let request = self.pending_request(
            &agent,
            task,
            uid,
            pid,
            chain,
            HeldAction::Dns { name, qtype },
        );
        self.hold(
            NewRequest {
                request,
                key: Some(key),
            },
            Waiter::Dns(reply),
        );
    }

    pub(in crate::daemon) fn pending_request(
        &self,
        agent: &str,
        task: Option<String>,
        uid: Option<u32>,
        pid: u32,
        chain: Vec<crate::action::ChainLink>,
        action: HeldAction,
    ) -> PendingRequest {
        PendingRequest {
            id: 0,
            agent: agent.to_string(),
            spiffe_id: Some(self.spiffe_id(agent)),
            task,
            uid,
            pid,
            chain: chain
                .into_iter()
                .map(|l| ChainProcess {
                    pid: l.pid,
                    exe: l.exe,
                    args: l.args,
                })
                .collect(),
            action,
            held_ms: 0,
            expires_in_ms: 0,
        }
    }

    pub(in crate::daemon) fn hold(&mut self, new: NewRequest, waiter: Waiter) {
        let now = monotonic_ns();
        match self.ask.desk.hold(new, waiter, now) {
            Ok(Hold::Joined(_)) => {}
            Ok(Hold::New(id)) => {
                self.ask.counters.held += 1;
                let Some(request) = self.ask.desk.get(id, now) else {
                    return;
                };
                self.report_held(&request);
                if let Ok(line) = serde_json::to_string(&PendingEvent::Held(request.clone())) {
                    let _ = self.ask.followers.send(line);
                }
                if let Some((url, timeout)) = self.ask.approver.clone() {
                    let to_monitor = self.ask.to_monitor.clone();
                    tokio::spawn(async move {
                        let result = approver::ask(&url, &request, timeout).await;
                        let _ = to_monitor.send(AskIn::Approver { id, result }).await;
                    });
                }
            }
            Err((e, waiter)) => {
                self.ask.counters.refused_full += 1;
                tracing::warn!("ask mode: {e}");
                answer(waiter, false, vec![], None, None);
            }
        }
    }

    /// A call `run` holds on its ask channel.
    pub(in crate::daemon) fn on_ask_in(&mut self, input: AskIn) {
        match input {
            AskIn::Call {
                run_pid,
                call,
                answers,
            } => self.on_ask_call(run_pid, call, answers),
            AskIn::Closed { run_pid } => {
                let now = monotonic_ns();
                let ended = self.ask.desk.withdraw(
                    |r| {
                        (r.chain.first().map(|c| c.pid) == Some(run_pid) || r.pid == run_pid).then(
                            || {
                                format!(
                                    "the ask channel of `run` {run_pid} closed: its held calls \
                                     went with it"
                                )
                            },
                        )
                    },
                    now,
                );
                for e in ended {
                    self.finish(e, None);
                }
            }
            AskIn::Approver { id, result } => {
                let decision = match result {
                    Ok(d) => d,
                    Err(e) => {
                        self.ask.counters.approver_errors += 1;
                        tracing::warn!(id, "decision service: {e}; the request is denied");
                        Decision::Deny {
                            reason: Some(format!("decision service: {e}")),
                        }
                    }
                };
                // Decided already (an operator was faster, or it timed out): nothing to do.
                if let Err(DeskError::Refused { why, .. }) =
                    self.decide(id, &decision, "approver-url")
                {
                    // A scope this request cannot take (`always` for an open): denied, not
                    // left to time out.
                    let deny = Decision::Deny {
                        reason: Some(format!("decision service: {why}")),
                    };
                    let _ = self.decide(id, &deny, "approver-url");
                }
            }
        }
    }

    pub(super) fn on_ask_call(
        &mut self,
        run_pid: u32,
        call: AskCall,
        answers: mpsc::UnboundedSender<AskAnswer>,
    ) {
        let refuse = |answers: &mpsc::UnboundedSender<AskAnswer>, why: &str| {
            tracing::warn!(run_pid, "ask channel: {why}");
            let _ = answers.send(AskAnswer {
                call: call.call,
                allow: false,
                outcome: None,
                grant_ms: None,
            });
        };
        let Some(placement) = self.ident.placement(run_pid) else {
            return refuse(&answers, "not a `run` this daemon placed");
        };
        let Some(entry) = self.ident.task(placement.task_cgroup) else {
            return refuse(&answers, "its task is gone");
        };
        let (agent, task) = (entry.agent.clone(), entry.task.clone());
        let comm = identity::procfs::comm(call.pid).unwrap_or_default();
        let chain = self.ident.chain(call.pid, &comm);
        if chain.len() > 1 && chain[0].pid != run_pid {
            return refuse(
                &answers,
                &format!("pid {} is not a process of its task", call.pid),
            );
        }
        if self.already_allowed(&agent, &task, &call.action) {
            self.ask.counters.allowed_without_asking += 1;
            let _ = answers.send(AskAnswer {
                call: call.call,
                allow: true,
                outcome: None,
                grant_ms: None,
            });
            return;
        }
        let uid = identity::procfs::credentials(call.pid).map(|c| c.uid);
        let request = self.pending_request(&agent, Some(task), uid, call.pid, chain, call.action);
        self.hold(
            NewRequest { request, key: None },
            Waiter::Channel {
                answers,
                call: call.call,
            },
        );
    }

    /// Whether the kernel would let the action through now (policy, learned addresses, task
    /// grants): then it is released at once, and the kernel judges it anyway.
    pub(super) fn already_allowed(&self, agent: &str, task: &str, action: &HeldAction) -> bool {
        let Some(policy) = self.generations.live().get(agent) else {
            return false;
        };
        let grants = self
            .grants
            .find(agent, task)
            .and_then(|n| self.grants.get(n))
            .and_then(|t| t.grants.as_ref());
        match action {
            HeldAction::Dns { name, .. } => policy.check_name(name).allowed,
            HeldAction::Connect { address, port, .. } => {
                // DNS: the kernel sends every port-53 datagram and connect of an agent to its
                // DNS proxy, which judges (and in ask mode holds) the name itself.
                if *port == common::DNS_PORT {
                    return true;
                }
                if policy.check_connect(*address, *port).allowed {
                    return true;
                }
                let table = crate::policy::to_table_addr(*address);
                if grants.is_some_and(|g| {
                    g.net
                        .iter()
                        .any(|r| r.covers(table) && (r.ports.lo..=r.ports.hi).contains(port))
                }) {
                    return true;
                }
                let index = self
                    .dns
                    .proxies
                    .endpoints()
                    .iter()
                    .position(|(a, _)| a == agent);
                index.is_some_and(|i| self.dns.learned.lookup(i as u32, *address, *port).is_some())
            }
            HeldAction::Exec {
                path,
                device,
                inode,
                ..
            } => {
                policy.check_exec(path).allowed
                    || grants.is_some_and(|g| g.exec.iter().any(|r| r.matches(path)))
                    || match (self.grants.find(agent, task), device, inode) {
                        (Some(number), Some(device), Some(inode)) => self.ask.exec_grants.covers(
                            number,
                            path,
                            *device,
                            *inode,
                            monotonic_ns(),
                        ),
                        _ => false,
                    }
            }
            // `run` judged it against the list it was placed with and found it off the list;
            // its grants for this socket are its own (it connects unix sockets itself).
            HeldAction::Unix { .. } => false,
            // Opens are held by the file guard, not on `run`'s channel.
            HeldAction::Open { .. } => false,
        }
    }

    /// A connect the kernel allowed by a task grant: if it used up a `once` approval's entry,
    /// the entry goes now (the approval was for that call only).
    pub(in crate::daemon) fn ask_saw_connect(&mut self, c: &event::ConnectEvent) {
        let key = (crate::policy::to_table_addr(c.addr), c.port);
        let task = c.subject.task;
        if let Some(entry) = self
            .ask
            .once
            .take_used(|e| e.task == task && e.connect == Some(key))
            && let Err(e) =
                super::grant_book::GrantTables::remove_task_grants(&mut self.kernel, &entry.tables)
        {
            tracing::warn!("removing a used once approval's kernel entry: {e:#}");
        }
    }

    /// An exec the kernel allowed by a task grant: which ask approval allowed it, if one did
    /// (a `once` script grant is used up now).
    pub(in crate::daemon) fn ask_saw_exec(&mut self, e: &event::ExecEvent) -> Option<String> {
        if self.ask.exec_grants.len() == 0 {
            return None;
        }
        let seen = SeenExec {
            task: e.subject.task,
            file_dev: e.file_dev,
            file_ino: e.file_ino,
            path: &e.path,
            script: e.interpreter.is_some(),
        };
        self.ask.exec_grants.saw_exec(&mut self.kernel, &seen)
    }

    /// Timeouts, the end of `once` entries, and (at the sweep) requests of exited processes.
    pub(in crate::daemon) fn ask_tick(&mut self, check_liveness: bool) {
        let now = monotonic_ns();
        for e in self.ask.desk.expire(now) {
            self.finish(e, None);
        }
        self.ask.exec_grants.expire(&mut self.kernel, now);
        for entry in self.ask.once.due(now) {
            if let Err(e) =
                super::grant_book::GrantTables::remove_task_grants(&mut self.kernel, &entry.tables)
            {
                tracing::warn!("removing a once approval's kernel entry: {e:#}");
            }
        }
        if check_liveness && self.ask.desk.len() > 0 {
            let gone: std::collections::HashSet<u32> = self
                .ask
                .desk
                .pids()
                .filter(|&pid| pid != 0 && !identity::procfs::running(pid))
                .collect();
            if !gone.is_empty() {
                let ended = self.ask.desk.withdraw(
                    |r| {
                        gone.contains(&r.pid)
                            .then(|| format!("process {} exited while its call was held", r.pid))
                    },
                    now,
                );
                for e in ended {
                    self.finish(e, None);
                }
            }
            let grants = &self.grants;
            self.ask
                .names
                .expire(now, |agent, task| grants.find(agent, task).is_none());
            self.ask
                .denied_names
                .expire(now, |agent, task| grants.find(agent, task).is_none());
        }
        if check_liveness {
            self.ask_files_sweep(now);
        }
    }
}
