//! Questions that read several owners: the adoption notice, the metrics snapshot and `status`.

use super::*;

impl Monitor {
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
            self.reporter.notice(
                Notice::new(message_id::ADOPTED, Level::Warning, msg)
                    .field(
                        "AWAY_SECONDS",
                        away_seconds.map_or(String::new(), |s| format!("{s:.3}")),
                    )
                    .field("LOST_RECORDS", lost_while_away)
                    .field("RECOVERED_TASKS", self.ident.task_count())
                    .field("GRANTS_RECOVERED", g.recovered)
                    .field("GRANTS_EXPIRED", g.expired)
                    .field("GRANTS_REVOKED", g.revoked_entries)
                    .field("GRANTS_NOT_RECOVERED_WHY", g.why.join("; "))
                    .field("PIN_DIR", &self.kernel.mechanisms.pin_dir),
            );
        }
    }

    pub(super) fn metrics_snapshot(&mut self) -> metrics::Snapshot {
        self.reporter.kernel_losses(&self.kernel);
        let counters = &self.reporter.counters;
        metrics::Snapshot {
            actions: self.reporter.by_action(),
            records_lost: counters.lost_records,
            actions_lost: counters.actions_lost,
            alerts_refused_unrecordable: counters.alerts_refused_unrecordable,
            source_routed_packets: counters.source_routed_packets,
            undecodable_records: counters.undecodable_records,
            verdict_disagreements: counters.verdict_disagreements,
            occupancy: self
                .kernel
                .occupancy()
                .unwrap_or_default()
                .into_iter()
                .map(|o| (o.map, o.used, o.capacity))
                .collect(),
            reloads: counters.reloads,
            reload_failures: counters.reload_failures,
            sinks: self
                .reporter
                .sink_counts()
                .into_iter()
                .chain(std::iter::once(self.grants.file_stats()))
                .collect(),
            journald_aggregated: self.reporter.aggregated(),
            otlp: self.reporter.export_stats(),
            dns_withheld: self.dns.withheld_rows(),
            dns_learned: self
                .generations
                .live()
                .iter()
                .filter_map(|p| {
                    let (held, limit) = self.dns.learned_of(p.agent())?;
                    Some((p.agent().to_string(), u64::from(held), u64::from(limit)))
                })
                .collect(),
            agents: self.generations.live().len() as u64,
            tasks: self.ident.task_count() as u64,
            processes: self.ident.process_count() as u64,
            away_seconds: match &self.kernel.origin {
                crate::bpf::Origin::Adopted { away_seconds, .. } => away_seconds.unwrap_or(0.0),
                crate::bpf::Origin::Installed => 0.0,
            },
            files_marked: self.files.marked,
            file_reports_lost: self.files.lost(),
            ask: self.ask_metrics(),
        }
    }

    pub(super) fn status(&mut self) -> control::Status {
        self.reporter.kernel_losses(&self.kernel);
        self.reporter.counters.tracked_processes = self.ident.process_count() as u64;
        self.reporter.counters.exec_rule_files = self.exec_files.len() as u64;
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
                let c = self.reporter.agent(&agent);
                let grants_of = |task: &str| {
                    let g = self
                        .grants
                        .find(&agent, task)
                        .and_then(|n| self.grants.get(n))
                        .and_then(|t| t.grants.as_ref());
                    let mut texts = g.map_or_else(Vec::new, |g| grant_texts(&g.net, &g.exec));
                    if let Some(number) = self.grants.find(&agent, task) {
                        texts.extend(self.ask_exec_grant_texts(number, now));
                    }
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
                let dns_proxy = self.dns.endpoint(&agent).map(|dns| control::DnsEndpoint {
                    udp4: dns.udp4,
                    tcp4: dns.tcp4,
                    udp6: dns.udp6,
                    tcp6: dns.tcp6,
                });
                let (dns_learned, dns_learned_limit) =
                    self.dns.learned_of(&agent).unwrap_or((0, 0));
                let withheld = |kind| self.dns.withheld_of(&agent, kind);
                AgentStatus {
                    dns_learned,
                    dns_learned_limit,
                    dns_withheld_non_public: withheld(crate::dns::Withheld::NonPublic),
                    dns_withheld_limit: withheld(crate::dns::Withheld::Limit),
                    selectors: self.ident.selected.describe(&agent),
                    agent,
                    mode,
                    tasks,
                    actions: c.actions,
                    allowed: c.allowed,
                    denied: c.denied,
                    alerts: c.alerts,
                    dns_proxy,
                }
            })
            .collect();
        control::Status {
            started_unix: self
                .reporter
                .started()
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
            pending: self.pending(),
            counters: self.reporter.counters(),
            sinks: self
                .reporter
                .sink_counts()
                .into_iter()
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
