//! Reports: every action to the outputs, counters, kernel loss accounting, metrics and `status`.

use super::*;

impl Monitor {
    /// Losses before this daemon started are reported by `report_origin`, not as new ones.
    pub(super) fn loss_baseline(&mut self) {
        if let Ok(k) = self.kernel.counters() {
            self.counters.lost_records = k[common::COUNTER_RECORDS_LOST as usize];
            self.counters.actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
            self.counters.alerts_refused_unrecordable =
                k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize];
        }
    }

    pub(super) fn report_origin(&mut self, retired_links: usize) {
        if let crate::bpf::Origin::Adopted {
            away_seconds,
            lost_while_away,
            replaced_build,
        } = self.kernel.origin.clone()
        {
            let away = away_seconds.map_or("an unknown time".into(), |s| format!("{s:.1} s"));
            let g = self.grants.recovery();
            let msg = format!(
                "adopted the pinned programs of the previous daemon, which was away for {away}; \
                 {lost_while_away} kernel records were lost meanwhile (their verdicts applied); \
                 {} running task(s) and {} process tag(s) recovered; task grants: {} recovered \
                 in {} task(s), {} expired while away, {} kernel grant entries revoked{}{}",
                self.ident.task_count(),
                self.kernel.tags().len(),
                g.recovered,
                g.tasks,
                g.expired,
                g.revoked_entries,
                if g.why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", g.why.join("; "))
                },
                if replaced_build {
                    format!(
                        "; they came from another build and were replaced ({retired_links} old \
                         link(s) detached after the new programs were attached)"
                    )
                } else {
                    String::new()
                }
            );
            tracing::warn!("{msg}");
            journald::event(
                message_id::ADOPTED,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    (
                        "AWAY_SECONDS",
                        away_seconds.map_or(String::new(), |s| format!("{s:.3}")),
                    ),
                    ("LOST_RECORDS", lost_while_away.to_string()),
                    ("RECOVERED_TASKS", self.ident.task_count().to_string()),
                    ("GRANTS_RECOVERED", g.recovered.to_string()),
                    ("GRANTS_EXPIRED", g.expired.to_string()),
                    ("GRANTS_REVOKED", g.revoked_entries.to_string()),
                    ("GRANTS_NOT_RECOVERED_WHY", g.why.join("; ")),
                    ("PIN_DIR", self.kernel.mechanisms.pin_dir.clone()),
                ],
            );
        }
    }

    pub(super) fn metrics_snapshot(&mut self) -> metrics::Snapshot {
        self.report_kernel_losses();
        metrics::Snapshot {
            actions: self
                .by_action
                .iter()
                .map(|((a, k, v), n)| (a.clone(), *k, *v, *n))
                .collect(),
            records_lost: self.counters.lost_records,
            actions_lost: self.counters.actions_lost,
            alerts_refused_unrecordable: self.counters.alerts_refused_unrecordable,
            source_routed_packets: self.counters.source_routed_packets,
            undecodable_records: self.counters.undecodable_records,
            verdict_disagreements: self.counters.verdict_disagreements,
            occupancy: self
                .kernel
                .occupancy()
                .unwrap_or_default()
                .into_iter()
                .map(|o| (o.map, o.used, o.capacity))
                .collect(),
            reloads: self.counters.reloads,
            reload_failures: self.counters.reload_failures,
            sinks: self
                .outputs
                .stats()
                .into_iter()
                .map(|s| (s.sink.to_string(), s.written, s.failed))
                .chain(std::iter::once(self.grants.file_stats()))
                .collect(),
            journald_aggregated: self.outputs.aggregated(),
            dns_withheld: self
                .dns_withheld
                .iter()
                .map(|((agent, kind), n)| (agent.clone(), kind.as_str(), *n))
                .collect(),
            dns_learned: self
                .generations
                .live()
                .iter()
                .filter_map(|p| {
                    let i = self.dns_index(p.agent())?;
                    Some((
                        p.agent().to_string(),
                        u64::from(self.learned.held(i)),
                        u64::from(self.learned.limit(i)),
                    ))
                })
                .collect(),
            agents: self.generations.live().len() as u64,
            tasks: self.ident.task_count() as u64,
            processes: self.ident.process_count() as u64,
            away_seconds: match &self.kernel.origin {
                crate::bpf::Origin::Adopted { away_seconds, .. } => away_seconds.unwrap_or(0.0),
                crate::bpf::Origin::Installed => 0.0,
            },
        }
    }

    /// Logs what the kernel could not hand over since the last look, once per interval with the
    /// count: the records are gone, but nobody should learn it from `status` alone.
    pub(super) fn report_kernel_losses(&mut self) {
        let k = match self.kernel.counters() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("reading kernel counters: {e:#}");
                return;
            }
        };
        let grown = |now: u64, before: &mut u64| std::mem::replace(before, now) < now;
        let lost = k[common::COUNTER_RECORDS_LOST as usize];
        let actions_lost = k[common::COUNTER_ACTIONS_LOST as usize];
        if lost > self.counters.lost_records {
            let msg = format!(
                "{} kernel records lost (ring buffer full), {} of them agent actions: their \
                 verdicts were enforced but they are not reported ({lost} lost in total)",
                lost - self.counters.lost_records,
                actions_lost.saturating_sub(self.counters.actions_lost)
            );
            tracing::warn!("{msg}");
            journald::event(
                message_id::RECORDS_LOST,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    (
                        "LOST_RECORDS",
                        (lost - self.counters.lost_records).to_string(),
                    ),
                    ("LOST_TOTAL", lost.to_string()),
                ],
            );
        }
        self.counters.lost_records = lost;
        self.counters.actions_lost = actions_lost;
        if grown(
            k[common::COUNTER_ALERTS_REFUSED_UNRECORDABLE as usize],
            &mut self.counters.alerts_refused_unrecordable,
        ) {
            tracing::warn!(
                total = self.counters.alerts_refused_unrecordable,
                "alert-mode agents' off-list actions were refused because the ring buffer could \
                 not take their records (an off-list action never happens unrecorded)"
            );
        }
        self.counters.grants_expired_in_kernel = k[common::COUNTER_GRANTS_EXPIRED as usize];
        // Identity anomalies: logged when they grow, always counted.
        if grown(
            k[common::COUNTER_TAGS_FULL as usize],
            &mut self.counters.tags_full,
        ) {
            tracing::error!(
                total = self.counters.tags_full,
                "processes could not be tagged (PROCESS_AGENTS full): they are not treated as agents"
            );
        }
        if grown(
            k[common::COUNTER_SELECTOR_CONFLICTS as usize],
            &mut self.counters.selector_conflicts,
        ) {
            tracing::warn!(
                total = self.counters.selector_conflicts,
                "a process exec'd another agent's selected executable; it stays with the agent that holds it by a higher-ranked selector"
            );
        }
        self.counters.source_routed_packets = k[common::COUNTER_SOURCE_ROUTED as usize];
        self.counters.dns_no_proxy = k[common::COUNTER_DNS_NO_PROXY as usize];
        self.counters.dns_orig_missing = k[common::COUNTER_DNS_ORIG_MISSING as usize];
    }

    pub(super) fn report(&mut self, action: Action) {
        self.counters.actions += 1;
        let c = self.per_agent.entry(action.agent.clone()).or_default();
        c.actions += 1;
        match action.verdict {
            Verdict::Allowed => c.allowed += 1,
            Verdict::Denied => {
                c.denied += 1;
                self.counters.denied += 1;
            }
            Verdict::Alert => {
                c.alerts += 1;
                self.counters.alerts += 1;
            }
        }
        *self
            .by_action
            .entry((
                action.agent.clone(),
                action.kind.as_str(),
                action.verdict.as_str(),
            ))
            .or_default() += 1;
        self.outputs.emit(&action);
        // Kept as the audit line itself: building and dropping a JSON value tree per action
        // cost the daemon most of a core at 100k actions/s; `events` parses on request.
        match crate::output::json::json_line(&action) {
            Ok(mut line) => {
                line.pop(); // the newline
                let event: EventLine = Arc::new((action.agent, line));
                if self.events_tx.receiver_count() > 0 {
                    let _ = self.events_tx.send(Arc::clone(&event));
                }
                if self.history.len() == HISTORY {
                    self.history.pop_front();
                }
                self.history.push_back(event);
            }
            Err(e) => tracing::debug!("action not kept for `events`: {e}"),
        }
    }

    pub(super) fn status(&mut self) -> control::Status {
        self.report_kernel_losses();
        self.counters.tracked_processes = self.ident.process_count() as u64;
        self.counters.exec_rule_files = self.exec_files.len() as u64;
        // Agents with a policy, then agents whose policy went away while their tasks run on
        // (they are denied everything).
        let mut names: Vec<(String, String)> = self
            .generations
            .live()
            .iter()
            .map(|p| (p.agent().to_string(), p.mode().as_str().to_string()))
            .collect();
        let mut orphaned: Vec<String> = self
            .ident
            .tasks()
            .map(|(_, t)| t)
            .filter(|t| self.generations.live().get(&t.agent).is_none())
            .map(|t| t.agent.clone())
            .collect();
        orphaned.sort();
        orphaned.dedup();
        names.extend(
            orphaned
                .into_iter()
                .map(|a| (a, "no policy (denied everything)".to_string())),
        );
        let now = monotonic_ns();
        let agents = names
            .into_iter()
            .map(|(agent, mode)| {
                let c = self.per_agent.get(&agent);
                let grants_of = |task: &str| {
                    let g = self
                        .grants
                        .find(&agent, task)
                        .and_then(|n| self.grants.get(n))
                        .and_then(|t| t.grants.as_ref());
                    let texts = g.map_or_else(Vec::new, |g| grant_texts(&g.net, &g.exec));
                    let left = g
                        .filter(|g| g.expires_ns != u64::MAX)
                        .map(|g| g.expires_ns.saturating_sub(now) / 1_000_000);
                    (texts, left)
                };
                let mut tasks: Vec<TaskStatus> = self
                    .ident
                    .tasks()
                    .filter(|(_, t)| t.agent == agent)
                    .map(|(id, t)| {
                        let (grants, left) = grants_of(&t.task);
                        TaskStatus {
                            task: t.task.clone(),
                            cgroup: t.path.display().to_string(),
                            processes: AgentCgroups::processes(&t.path),
                            grants,
                            grants_expire_in_ms: left,
                            unscoped: self.ident.unscoped_in(id),
                            placements: self.ident.placements_in(id),
                        }
                    })
                    .collect();
                // Tasks with grants but no `run` cgroup (selector processes, or not started yet).
                for (_, t) in self.grants.of_agent(&agent) {
                    if t.grants.is_some() && !tasks.iter().any(|x| x.task == t.name) {
                        let (grants, left) = grants_of(&t.name);
                        tasks.push(TaskStatus {
                            task: t.name.clone(),
                            grants,
                            grants_expire_in_ms: left,
                            ..Default::default()
                        });
                    }
                }
                tasks.sort_by(|a, b| a.task.cmp(&b.task));
                let dns_proxy = self
                    .dns_proxies
                    .endpoints()
                    .iter()
                    .find(|(a, _)| *a == agent)
                    .map(|(_, dns)| control::DnsEndpoint {
                        udp4: dns.udp4,
                        tcp4: dns.tcp4,
                        udp6: dns.udp6,
                        tcp6: dns.tcp6,
                    });
                let dns_index = self.dns_index(&agent).unwrap_or(u32::MAX);
                let withheld = |kind| {
                    self.dns_withheld
                        .get(&(agent.clone(), kind))
                        .copied()
                        .unwrap_or(0)
                };
                AgentStatus {
                    dns_learned: self.learned.held(dns_index),
                    dns_learned_limit: self.learned.limit(dns_index),
                    dns_withheld_non_public: withheld(crate::dns::Withheld::NonPublic),
                    dns_withheld_limit: withheld(crate::dns::Withheld::Limit),
                    selectors: self.ident.selected.describe(&agent),
                    agent,
                    mode,
                    tasks,
                    actions: c.map_or(0, |c| c.actions),
                    allowed: c.map_or(0, |c| c.allowed),
                    denied: c.map_or(0, |c| c.denied),
                    alerts: c.map_or(0, |c| c.alerts),
                    dns_proxy,
                }
            })
            .collect();
        control::Status {
            started_unix: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            policies: self.generations.dir().display().to_string(),
            mechanisms: serde_json::to_value(&self.kernel.mechanisms).unwrap_or_default(),
            agents,
            origin: serde_json::to_value(&self.kernel.origin).unwrap_or_default(),
            occupancy: serde_json::to_value(self.kernel.occupancy().unwrap_or_default())
                .unwrap_or_default(),
            policies_loaded_unix: self
                .generations
                .loaded()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            journal_query: crate::output::journald::this_process_query(),
            counters: Counters {
                journald_aggregated: self.outputs.aggregated(),
                ..self.counters.clone()
            },
            sinks: self
                .outputs
                .stats()
                .into_iter()
                .map(|s| (s.sink.to_string(), s.written, s.failed))
                .chain(std::iter::once(self.grants.file_stats()))
                .map(|(sink, written, failed)| SinkStatus {
                    sink,
                    written,
                    failed,
                })
                .collect(),
        }
    }
}
