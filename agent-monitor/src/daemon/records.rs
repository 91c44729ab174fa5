//! Kernel records to actions: who did it (agent, task, chain) and what it was.

use super::*;

/// The identity a `KIND_TAGGED` record carries (stable agent id, not an allowlist index).
pub(super) fn tagged_identity(subject: &event::Subject) -> AgentSlot {
    AgentSlot {
        agent: subject.agent,
        mode: 0,
        task: subject.task,
        source: subject.source,
    }
}

pub(super) fn tagged_identity_of(agent: u32) -> AgentSlot {
    AgentSlot {
        agent,
        mode: 0,
        task: common::TASK_NONE,
        source: 0,
    }
}

/// Why a socket was refused (or, alert, reported), by the mechanism that judged it.
pub(super) fn socket_reason(sk: &event::SocketEvent) -> String {
    let inet = matches!(sk.family, common::AF_INET | common::AF_INET6);
    match (inet, sk.verdict) {
        (true, _) => "agents may create TCP and UDP inet sockets only (cgroup sock_create): raw, \
                      ICMP ping, SCTP and MPTCP sockets reach endpoints the connect and sendmsg \
                      hooks do not judge"
            .into(),
        (false, _) => "a socket family the cgroup hooks cannot judge (vsock, packet…): it was \
                       created (`agent-monitor run` refuses these in enforce mode with its \
                       seccomp filter; this process is in alert mode or was not started by run)"
            .into(),
    }
}

/// How a process became an agent, in words (`SOURCE_*`).
pub(super) fn source_name(source: u32) -> &'static str {
    match source {
        common::SOURCE_RUN => "agent-monitor run",
        common::SOURCE_CGROUP => "cgroup selector",
        common::SOURCE_UNIT => "systemd unit selector",
        common::SOURCE_EXECUTABLE => "executable selector",
        common::SOURCE_UID => "uid selector",
        common::SOURCE_TASK_SWITCH => "task start --pid",
        _ => "unknown",
    }
}

impl Monitor {
    /// Which agent process `pid` is, in the kernel's order: its own `run` cgroup, its tag, a
    /// selected ancestor cgroup, its uid.
    pub(super) fn identify(&self, pid: u32) -> Option<ProcessIdentity> {
        self.ident.identify(
            &self.kernel,
            &LiveProcs,
            self.generations.live(),
            &self.grants,
            pid,
        )
    }

    /// (agent, task) names of an identity (`slot.agent` is the stable id).
    pub(super) fn names(&self, slot: &AgentSlot) -> (String, String) {
        self.ident
            .names(self.generations.live(), &self.grants, slot)
    }

    pub(super) fn spiffe_id(&self, agent: &str) -> String {
        format!("spiffe://{}/agent/{agent}", self.trust_domain)
    }

    pub(super) fn agent_slot(
        &mut self,
        agent: &str,
        task: &str,
        source: u32,
    ) -> anyhow::Result<AgentSlot> {
        if self.generations.live().get(agent).is_none() {
            let known: Vec<&str> = self.generations.live().iter().map(|p| p.agent()).collect();
            bail!(
                "no policy for agent {agent:?} in {} (agents with a policy: {})",
                self.generations.dir().display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        identity::check_task_id(task)?;
        let policy = self
            .generations
            .live()
            .get(agent)
            .context("policy vanished")?;
        Ok(AgentSlot {
            agent: agent_id(agent),
            mode: policy.mode().kernel_value(),
            task: self.grants.number(agent, task),
            source,
        })
    }

    pub(super) fn on_event(&mut self, ev: Result<KernelEvent, event::DecodeError>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                self.reporter.undecodable(&e);
                return;
            }
        };
        match ev {
            KernelEvent::Fork { subject, child } => {
                self.ident.on_fork(subject.pid, child, &subject.comm)
            }
            KernelEvent::Exit { subject } => self.ident.on_exit(subject.pid, subject.ktime_ns),
            KernelEvent::Tagged {
                subject,
                path,
                retagged_from,
            } => {
                let (agent, task) = self.names(&tagged_identity(&subject));
                tracing::info!(
                    agent,
                    task,
                    pid = subject.pid,
                    path,
                    "process became an agent by its executable selector"
                );
                if let Some(prior) = retagged_from {
                    let was = self.names(&tagged_identity_of(prior)).0;
                    let why = format!(
                        "selector conflict: pid {} was agent {was} (uid selector) and exec'd {path}, selected by agent {agent}; the executable selector outranks the uid selector, so it is now agent {agent}",
                        subject.pid
                    );
                    self.report_conflict(&subject, agent, task, path.clone(), why);
                }
                self.ident.add_root(&LiveProcs, subject.pid, path);
            }
            KernelEvent::ClaimRefused {
                subject,
                path,
                claimed_by,
            } => {
                let (agent, task) = self.names(&tagged_identity(&subject));
                let claimant = self.names(&tagged_identity_of(claimed_by)).0;
                let why = format!(
                    "selector conflict: pid {} exec'd {path}, selected by agent {claimant}, but it is agent {agent} by a higher-ranked identity ({}); it stays agent {agent}",
                    subject.pid,
                    source_name(subject.source)
                );
                self.report_conflict(&subject, agent, task, path, why);
            }
            KernelEvent::Exec(e) => {
                self.ident.on_exec(&LiveProcs, e.subject.pid, &e.path);
                let mut action = self.exec_action(&e);
                if e.granted
                    && e.verdict == Verdict::Allowed
                    && let Some(approval) = self.ask_saw_exec(&e)
                {
                    action.reason = format!("granted to the task: {approval}");
                }
                self.reporter.action(action);
            }
            KernelEvent::Connect(c) => {
                let action = self.connect_action(&c);
                self.reporter.action(action);
                if c.granted && c.verdict == Verdict::Allowed {
                    self.ask_saw_connect(&c);
                }
            }
            KernelEvent::Socket(sk) => {
                let action = self.socket_action(&sk);
                self.reporter.action(action);
            }
            KernelEvent::SourceRoute(r) => {
                let action = self.source_route_action(&r);
                self.reporter.action(action);
            }
            KernelEvent::DnsRedirect(c) => {
                let (agent, _) = self.identity(&c.subject);
                if c.dns_refused {
                    let server = Destination {
                        addr: c.addr,
                        port: c.port,
                        transport: event::transport(c.sock_type),
                    };
                    let query = DnsQuery {
                        name: None,
                        server: Some(server),
                    };
                    let action = Action {
                        enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
                        reason: "DNS traffic, and the agent has no DNS proxy endpoint for this \
                                 address family"
                            .into(),
                        ..self.subject_action(&c.subject, Object::Dns(query), c.verdict)
                    };
                    self.reporter.action(action);
                } else {
                    self.dns.redirected(agent, c);
                }
            }
            KernelEvent::Unix(u) => {
                let action = self.unix_action(&u);
                self.reporter.action(action);
            }
            KernelEvent::EgressRedirect { connect, token } => {
                self.egress.redirected(token, connect);
            }
            KernelEvent::UnixPeer(u) => {
                let action = self.unix_peer_action(&u);
                self.reporter.action(action);
            }
            KernelEvent::ServerName(e) => self.on_server_name(e),
        }
    }

    /// A process two agents claimed: resolved by precedence in the kernel, reported here as
    /// ACTION=identity VERDICT=alert (PRIORITY err) so the operator fixes the selectors.
    pub(super) fn report_conflict(
        &mut self,
        subject: &event::Subject,
        agent: String,
        task: String,
        path: String,
        why: String,
    ) {
        tracing::warn!("{why}");
        let action = Action {
            exe: Some(path),
            reason: why,
            ..self.action(subject, agent, task, Object::Identity, Verdict::Alert)
        };
        self.reporter.action(action);
    }

    /// Agent and task of an event, from the identity the kernel judged with.
    /// Records carry the allowlist index the kernel judged with (live bank, or the previous one
    /// for records judged just before a reload).
    pub(super) fn identity(&self, subject: &event::Subject) -> (String, String) {
        self.ident.attribute(
            &self.grants,
            subject.task,
            subject.cgroup_id,
            subject.agent,
            |index| self.agent_at(index),
        )
    }

    pub(super) fn exec_action(&mut self, e: &event::ExecEvent) -> Action {
        let (agent, task) = self.identity(&e.subject);
        let reason = if e.granted {
            self.grant_reason(e.subject.task, |g| {
                g.exec
                    .iter()
                    .find(|r| {
                        r.matches(&e.path) || e.interpreter.as_deref().is_some_and(|i| r.matches(i))
                    })
                    .map(|r| format!("exec {}", r.text()))
            })
        } else if e.truncated {
            format!(
                "{} {} bytes cannot be matched",
                crate::action::REASON_EXEC_PATH_TOO_LONG,
                common::EXEC_PATH_LEN - 1
            )
        } else if e.unreadable {
            // The name, the interpreter or the file could not be read.
            crate::action::REASON_EXEC_PATH_UNREADABLE.to_string()
        } else {
            // File-identity entries are keyed by the kernel index (bank + position).
            let agent_index = self.generations.kernel_index(&agent);
            let file_rule = agent_index
                .and_then(|a| self.exec_files.rule_for(a, e.file_dev, e.file_ino))
                .map(str::to_string);
            let facts = ExecFacts {
                name: &e.path,
                interpreter: e.interpreter.as_deref(),
                file_rule: file_rule.as_deref(),
                initial_user_ns: !e.user_ns,
            };
            let why = self.explain(&agent, e.verdict, e.subject.ktime_ns, |p| {
                p.check_exec_facts(&facts)
            });
            let file = format!(
                "file {}:{} inode {}",
                e.file_dev >> 20,
                e.file_dev & 0xf_ffff,
                e.file_ino
            );
            match e.basis {
                common::EXEC_BASIS_FILE => format!("{why} (the file that runs, {file})"),
                _ => format!("{why} ({file})"),
            }
        };
        if e.user_ns {
            self.reporter.counters.execs_in_user_namespaces += 1;
        }
        if e.truncated {
            self.reporter.counters.exec_paths_too_long += 1;
        }
        if e.unreadable {
            self.reporter.counters.exec_paths_unreadable += 1;
        }
        if e.not_normal {
            self.reporter.counters.exec_paths_not_normal += 1;
        }
        let file = ExecFile {
            path: e.path.clone(),
            interpreter: e.interpreter.clone(),
        };
        Action {
            enforcement: e.killed.then_some("sigkill"),
            reason,
            ..self.action(&e.subject, agent, task, Object::Exec(file), e.verdict)
        }
    }

    pub(super) fn connect_action(&mut self, c: &event::ConnectEvent) -> Action {
        let (agent, task) = self.identity(&c.subject);
        let grant = self
            .dns
            .index(&agent)
            .and_then(|i| self.dns.learned.lookup(i, c.addr, c.port))
            .cloned();
        let mut reason = match (&grant, c.learned) {
            _ if c.dns_refused => "the destination is another agent's DNS proxy endpoint, which \
                                   only that agent's redirected DNS traffic may use"
                .to_string(),
            (Some(g), true) => format!(
                "allowed: the agent resolved {} to this address through the DNS proxy ({})",
                g.name, g.rule
            ),
            (None, true) => {
                // The kernel allowed it from an entry the daemon does not know.
                self.reporter.counters.verdict_disagreements += 1;
                tracing::error!(agent, addr = %c.addr, "kernel allowed a learned address the daemon did not learn");
                "allowed by a learned DNS address the daemon does not know".into()
            }
            _ if c.granted => {
                let addr = crate::policy::to_table_addr(c.addr);
                self.grant_reason(c.subject.task, |g| {
                    g.net
                        .iter()
                        .find(|r| {
                            r.covers(addr) && r.ports().lo <= c.port && c.port <= r.ports().hi
                        })
                        .map(|r| format!("connect {}", r.text()))
                })
            }
            (_, false) => self.explain(&agent, c.verdict, c.subject.ktime_ns, |p| {
                p.check_connect(c.addr, c.port)
            }),
        };
        if c.egress_refused {
            reason = crate::egress::refused_reason(c.send, c.sock_type, c.verdict);
        }
        if c.unspecified {
            reason.push_str(" (the unspecified address goes to loopback: judged as loopback)");
        }
        if c.connected_peer {
            reason.push_str(" (the send named no address: judged as the socket's connected peer)");
        }
        let exe = self
            .ident
            .exe(c.subject.pid)
            .map(str::to_string)
            .or_else(|| identity::procfs::exe(c.subject.pid).map(|p| p.display().to_string()));
        let target = NetTarget {
            destination: Destination {
                addr: c.addr,
                port: c.port,
                transport: event::transport(c.sock_type),
            },
            host: grant.map(|g| g.name),
        };
        let object = if c.send {
            Object::Sendmsg(target)
        } else {
            Object::Connect(target)
        };
        Action {
            exe,
            enforcement: (c.verdict == Verdict::Denied).then_some("eperm"),
            reason,
            ..self.action(&c.subject, agent, task, object, c.verdict)
        }
    }

    /// A source-routed packet of an agent's socket. The record's task is whoever ran when the
    /// packet left, so no program is named; the agent and task are the socket's.
    pub(super) fn source_route_action(&mut self, r: &event::SourceRouteEvent) -> Action {
        let (agent, task) = self.identity(&r.subject);
        let option = match (r.first_hop, r.detail) {
            (IpAddr::V4(_), 0x83) => "an IPv4 loose source route (LSRR)".to_string(),
            (IpAddr::V4(_), 0x89) => "an IPv4 strict source route (SSRR)".to_string(),
            (IpAddr::V4(_), t) => format!("IPv4 options (first option type {t:#x})"),
            (IpAddr::V6(_), t) => format!("an IPv6 routing header (type {t})"),
        };
        let transport = match r.protocol {
            6 => "tcp",
            17 => "udp",
            _ => "other",
        };
        let object = Object::SourceRoute {
            first_hop: r.first_hop,
            transport,
        };
        Action {
            enforcement: (r.verdict == Verdict::Denied).then_some("dropped"),
            reason: format!(
                "the packet carried {option}: it would go to its first hop {} instead of the \
                 destination judged; agents' sockets may not set the path of their packets",
                r.first_hop
            ),
            ..self.action(&r.subject, agent, task, object, r.verdict)
        }
    }

    pub(super) fn socket_action(&mut self, sk: &event::SocketEvent) -> Action {
        let (agent, task) = self.identity(&sk.subject);
        self.reporter.counters.sockets_refused += 1;
        let exe = self.ident.exe(sk.subject.pid).map(str::to_string);
        let object = Object::Socket(event::socket_description(
            sk.family,
            sk.sock_type,
            sk.protocol,
        ));
        Action {
            exe,
            enforcement: (sk.verdict == Verdict::Denied).then_some("eperm"),
            reason: socket_reason(sk),
            ..self.action(&sk.subject, agent, task, object, sk.verdict)
        }
    }

    /// `action` for a subject whose agent and task come from its cgroup.
    pub(super) fn subject_action(
        &self,
        subject: &event::Subject,
        object: Object,
        verdict: Verdict,
    ) -> Action {
        let (agent, task) = self.identity(subject);
        self.action(subject, agent, task, object, verdict)
    }

    /// The parts of an action every kind shares: who acted, as what, with which verdict.
    pub(super) fn action(
        &self,
        subject: &event::Subject,
        agent: String,
        task: String,
        object: Object,
        verdict: Verdict,
    ) -> Action {
        Action {
            time: SystemTime::now(),
            chain: self.ident.chain(subject.pid, &subject.comm),
            spiffe_id: self.spiffe_id(&agent),
            agent,
            task,
            verdict,
            pid: subject.pid,
            uid: subject.uid,
            comm: subject.comm.clone(),
            exe: None,
            object,
            enforcement: None,
            reason: String::new(),
        }
    }
}
