//! DNS proxy reports: learning answers into the kernel, withheld addresses, expiry.

use super::*;

impl Monitor {
    /// Reports one query the DNS proxy judged; for an allowed answer, first installs its
    /// addresses in the kernel and tells the proxy it may reply.
    pub(super) fn on_dns(&mut self, r: QueryReport) {
        let policy = self
            .dns_proxies
            .endpoints()
            .get(r.agent as usize)
            .and_then(|(name, _)| self.generations.live().get(name));
        let Some(policy) = policy else {
            tracing::error!(
                agent = r.agent,
                "DNS report for an unknown agent index (or an agent a reload removed)"
            );
            return;
        };
        let agent = policy.agent().to_string();
        let enforce = policy.mode() == crate::policy::model::Mode::Enforce;
        // The DNS-rebinding opt-in for the name asked, if the policy has one.
        let private_ok = policy.private_answers_for(&r.name).map(str::to_string);
        self.counters.dns_queries += 1;
        let (verdict, enforcement, reason) = match r.outcome {
            Outcome::Refused { reason } => {
                self.counters.dns_refused += 1;
                (Verdict::Denied, Some("refused"), reason)
            }
            Outcome::Malformed { reason } => {
                self.counters.dns_malformed += 1;
                (
                    Verdict::Denied,
                    Some("not forwarded"),
                    format!("{reason}; not forwarded"),
                )
            }
            Outcome::Overloaded => {
                self.counters.dns_overloaded += 1;
                (
                    Verdict::Denied,
                    Some("servfail"),
                    "too many queries of this agent in flight; answered SERVFAIL unjudged".into(),
                )
            }
            Outcome::UpstreamFailed { allowed, reason } => {
                self.counters.dns_upstream_failures += 1;
                tracing::warn!(
                    agent,
                    name = r.name,
                    "DNS upstream failed: {reason}; answered SERVFAIL"
                );
                let verdict = if allowed {
                    Verdict::Allowed
                } else {
                    Verdict::Alert
                };
                (
                    verdict,
                    Some("servfail"),
                    format!("{reason}; answered SERVFAIL"),
                )
            }
            Outcome::Answered {
                allowed,
                reason,
                rcode,
                addrs,
                cnames,
                ports,
                installed,
            } => {
                let chain = if cnames.is_empty() {
                    String::new()
                } else {
                    format!(" via CNAME {}", cnames.join(" > "))
                };
                let list = crate::dns::brief_list(
                    addrs.iter().map(|(a, ttl)| format!("{a} (ttl {ttl}s)")),
                );
                if allowed {
                    // DNS rebinding: a non-public address is not learned unless the policy lets
                    // this name answer with one.
                    let host = crate::dns::scope::host_addresses();
                    let (private, public): (Vec<_>, Vec<_>) = addrs.iter().partition(|(a, _)| {
                        private_ok.is_none()
                            && crate::dns::scope::non_public_here(*a, &host).is_some()
                    });
                    let result = self.install(r.agent, &r.name, &reason, &public, &ports);
                    let result = result.map(|over_limit| {
                        let private: Vec<IpAddr> = private.iter().map(|(a, _)| *a).collect();
                        self.withheld(&agent, &r.name, &private, &over_limit, enforce);
                        let limit_reached = !over_limit.is_empty();
                        let mut strip = private;
                        strip.extend(over_limit);
                        (strip, limit_reached)
                    });
                    if let Some(tx) = installed {
                        let _ = tx.send(match &result {
                            Ok((strip, limit_reached)) => Ok(crate::dns::Installed {
                                strip: if enforce { strip.clone() } else { Vec::new() },
                                limit_reached: *limit_reached,
                            }),
                            Err(e) => Err(e.clone()),
                        });
                    }
                    match result {
                        Ok((strip, limit_reached)) if !strip.is_empty() => {
                            let learned = crate::dns::brief_list(
                                addrs
                                    .iter()
                                    .filter(|(a, _)| !strip.contains(a))
                                    .map(|(a, ttl)| format!("{a} (ttl {ttl}s)")),
                            );
                            let why = if limit_reached {
                                "over the agent's learned-address limit or non-public"
                            } else {
                                "non-public, and no dns.private_answers entry covers the name"
                            };
                            let withheld =
                                crate::dns::brief_list(strip.iter().map(ToString::to_string));
                            let text = format!(
                                "{reason}; {rcode}{chain}; learned [{learned}]; not learned ({why}): [{withheld}]"
                            );
                            if !enforce {
                                (
                                    Verdict::Alert,
                                    None,
                                    format!("{text} (alert mode: answered unchanged)"),
                                )
                            } else if addrs.iter().all(|(a, _)| strip.contains(a)) {
                                let (code, verdict) = if limit_reached {
                                    ("servfail", "answered SERVFAIL")
                                } else {
                                    ("refused", "answered REFUSED")
                                };
                                (Verdict::Denied, Some(code), format!("{text}; {verdict}"))
                            } else {
                                (
                                    Verdict::Allowed,
                                    Some("stripped"),
                                    format!("{text}; taken out of the reply"),
                                )
                            }
                        }
                        Ok(_) => (
                            Verdict::Allowed,
                            None,
                            format!("{reason}; {rcode}{chain}; learned [{list}]"),
                        ),
                        Err(e) => {
                            self.counters.dns_install_failures += 1;
                            tracing::error!(agent, name = r.name, "{e}; answered SERVFAIL");
                            (
                                Verdict::Allowed,
                                Some("servfail"),
                                format!("{reason}; not installed: {e}; answered SERVFAIL"),
                            )
                        }
                    }
                } else {
                    (
                        Verdict::Alert,
                        None,
                        format!(
                            "{reason} (alert mode: forwarded); {rcode}{chain}; answer [{list}] not learned"
                        ),
                    )
                }
            }
        };
        let client = self.dns_clients.get(&agent).cloned();
        let base = match &client {
            Some(c) => self.subject_action(&c.subject, ActionKind::Dns, verdict),
            None => Action {
                agent: agent.clone(),
                task: "?".into(),
                ..self.subject_action(&event::Subject::unknown(), ActionKind::Dns, verdict)
            },
        };
        let action = Action {
            destination: client.map(|c| Destination {
                addr: c.addr,
                port: c.port,
                transport: r.transport,
            }),
            dns_name: Some(r.name),
            enforcement,
            reason: format!("{} query: {reason}", r.qtype),
            ..base
        };
        self.report(action);
    }

    /// Writes every address of an allowed answer into the agent's kernel allowlist, until its TTL
    /// plus the grace, as far as the agent's learned-address limit allows; returns the addresses
    /// over the limit (not learned). On a failure the table forgets what the kernel does not hold.
    pub(super) fn install(
        &mut self,
        agent: u32,
        name: &str,
        rule: &str,
        addrs: &[&(IpAddr, u32)],
        ports: &[common::PortRange],
    ) -> Result<Vec<IpAddr>, String> {
        let mut over_limit = Vec::new();
        let now = monotonic_ns();
        for &&(addr, ttl) in addrs {
            let grant = Grant {
                name: name.to_string(),
                rule: rule.to_string(),
                expires_ns: now
                    .saturating_add(u64::from(ttl).saturating_mul(1_000_000_000))
                    .saturating_add(self.dns_grace_ns),
                ports: ports.to_vec(),
            };
            let Ok(value) = self.learned.learn(agent, addr, grant, now) else {
                over_limit.push(addr);
                continue;
            };
            let written = match self.dns_kernel_index(agent) {
                Some(k) => self.kernel.write_learned(k, addr, &value),
                None => Err(anyhow::anyhow!("the agent has no policy any more")),
            };
            if let Err(e) = written {
                self.learned.unlearn(agent, addr, name);
                return Err(format!("{e:#}"));
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
        Ok(over_limit)
    }

    /// Counts and reports addresses of an allowed answer that `agent` was not given: a journald
    /// notice (rate-limited per agent and kind; the counters and the query's own entry have
    /// every one).
    pub(super) fn withheld(
        &mut self,
        agent: &str,
        name: &str,
        private: &[IpAddr],
        over_limit: &[IpAddr],
        enforce: bool,
    ) {
        let index = self.dns_index(agent).unwrap_or(u32::MAX);
        let (held, limit) = (self.learned.held(index), self.learned.limit(index));
        for (kind, addrs) in [
            (crate::dns::Withheld::NonPublic, private),
            (crate::dns::Withheld::Limit, over_limit),
        ] {
            if addrs.is_empty() {
                continue;
            }
            let n = addrs.len() as u64;
            match kind {
                crate::dns::Withheld::NonPublic => self.counters.dns_withheld_non_public += n,
                crate::dns::Withheld::Limit => {
                    self.counters.dns_withheld_limit += n;
                    self.counters.dns_limit_reached += 1;
                }
            }
            *self
                .dns_withheld
                .entry((agent.to_string(), kind))
                .or_default() += n;
            let Some(unsaid) = self.dns_notices.admit(agent, kind, monotonic_ns()) else {
                continue;
            };
            let list = crate::dns::brief_list(addrs.iter().map(ToString::to_string));
            let outcome = if enforce {
                "taken out of the reply"
            } else {
                "alert mode: left in the reply, connects to them are alerts"
            };
            let msg = match kind {
                crate::dns::Withheld::NonPublic => format!(
                    "agent {agent}: {name} answered non-public addresses [{list}]; not learned                      ({outcome}); a dns.private_answers entry allows this name"
                ),
                crate::dns::Withheld::Limit => format!(
                    "agent {agent}: learned-address limit reached ({held} of {limit}); {n}                      address(es) of {name} not learned [{list}] ({outcome}); room comes back                      as learned addresses expire"
                ),
            };
            tracing::warn!("{msg}");
            journald::event(
                message_id::DNS_WITHHELD,
                libsystemd::logging::Priority::Warning,
                &msg,
                &[
                    ("AGENT_ID", agent.to_string()),
                    ("DNS_NAME", name.to_string()),
                    ("WITHHELD", kind.as_str().to_string()),
                    ("WITHHELD_ADDRS", list),
                    ("WITHHELD_COUNT", n.to_string()),
                    ("LEARNED", held.to_string()),
                    ("LEARNED_LIMIT", limit.to_string()),
                    ("NOTICES_SUPPRESSED", unsaid.to_string()),
                ],
            );
        }
    }

    /// The DNS proxy start-up index of `agent` (how the learned table keys it).
    pub(super) fn dns_index(&self, agent: &str) -> Option<u32> {
        self.dns_proxies
            .endpoints()
            .iter()
            .position(|(a, _)| a == agent)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The kernel agent index (live bank) of the agent whose DNS proxy has start-up index `dns`.
    pub(super) fn dns_kernel_index(&self, dns: u32) -> Option<u32> {
        let (name, _) = self.dns_proxies.endpoints().get(dns as usize)?;
        self.generations.kernel_index(name)
    }

    /// Removes expired learned addresses from the kernel (which already ignores them).
    pub(super) fn expire_learned(&mut self) {
        for change in self.learned.expire(monotonic_ns()) {
            let result = match change {
                KernelChange::Write(agent, addr, value) => match self.dns_kernel_index(agent) {
                    Some(k) => self.kernel.write_learned(k, addr, &value),
                    None => Ok(()),
                },
                KernelChange::Remove(agent, addr) => match self.dns_kernel_index(agent) {
                    Some(k) => self.kernel.remove_learned(k, addr),
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                tracing::warn!("expiring a learned address: {e:#}");
            }
        }
        self.counters.dns_learned = self.learned.len() as u64;
    }
}
