//! The DNS learner: what the agents' DNS proxies report. It owns the learned addresses (mirror of
//! the kernel's `DNS_LEARNED`), the proxies, who is behind each agent's next query (its latest
//! DNS redirect), the withheld-address counts and notices, and the install path into the kernel,
//! reached through [`LearnedAddresses`] only.

use std::collections::HashMap;
use std::net::IpAddr;

use agent_monitor_common::{self as common, Learned};

use super::reporter::Reporter;
use crate::action::{Action, Destination, Object, Verdict};
use crate::dns::learned::{Grant, KernelChange, LearnedTable};
use crate::dns::proxy::Proxies;
use crate::dns::{InstallError, Installed, NoticeGate, Outcome, QueryReport, Withheld};
use crate::egress::kernel_names::{KernelName, for_address};
use crate::event::ConnectEvent;
use crate::output::journald::message_id;
use crate::output::notice::{Level, Notice};
use crate::policy::PolicySet;

#[cfg(test)]
mod tests;

/// What the learner needs of the kernel: the learned-address table, with the server names each
/// address may be presented (`egress::kernel_names`).
pub(super) trait LearnedAddresses {
    fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
        names: &[KernelName],
    ) -> anyhow::Result<()>;
    fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()>;
}

impl LearnedAddresses for crate::bpf::Kernel {
    fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
        names: &[KernelName],
    ) -> anyhow::Result<()> {
        crate::bpf::Kernel::write_learned(self, agent, addr, value, names)
    }
    fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()> {
        crate::bpf::Kernel::remove_learned(self, agent, addr)
    }
}

/// The policies in force and the first kernel agent index of their bank.
#[derive(Clone, Copy)]
pub(super) struct Live<'a> {
    pub(super) policies: &'a PolicySet,
    pub(super) bank_base: u32,
}

/// A judged query, for the monitor to attribute to a process and report.
#[derive(Debug)]
pub(super) struct DnsQuery {
    pub(super) agent: String,
    /// The agent's latest DNS redirect: the process and server behind the query (none seen: the
    /// process is unknown).
    pub(super) client: Option<ConnectEvent>,
    pub(super) verdict: Verdict,
    pub(super) transport: &'static str,
    pub(super) name: String,
    pub(super) enforcement: Option<&'static str>,
    pub(super) reason: String,
}

impl DnsQuery {
    /// What was asked: the name, and the server the agent sent it to (the object of the action).
    pub(super) fn object(&self) -> Object {
        Object::Dns(crate::action::DnsQuery {
            name: Some(self.name.clone()),
            server: self.client.as_ref().map(|c| Destination {
                addr: c.addr,
                port: c.port,
                transport: self.transport,
            }),
        })
    }

    /// The `dns` action, on `base` (who asked, with [`DnsQuery::object`]).
    pub(super) fn into_action(self, base: Action) -> Action {
        Action {
            enforcement: self.enforcement,
            reason: self.reason,
            ..base
        }
    }
}

pub(super) struct DnsLearner {
    /// Addresses agents resolved through the DNS proxy, keyed by the proxy's start-up index
    /// (stable across reloads; see [`DnsLearner::kernel_index`]).
    pub(super) learned: LearnedTable,
    /// Addresses of allowed answers not learned, by agent and why (status, metrics).
    withheld: HashMap<(String, Withheld), u64>,
    notices: NoticeGate,
    /// Added to every answer's TTL.
    grace_ns: u64,
    /// Per agent, its latest DNS redirect: who is behind the next query its proxy reports.
    clients: HashMap<String, ConnectEvent>,
    /// Each agent's DNS proxy, by the proxy's index (stable across reloads).
    pub(super) proxies: Proxies,
}

impl DnsLearner {
    pub(super) fn new(proxies: Proxies, grace_ns: u64) -> Self {
        DnsLearner {
            learned: LearnedTable::default(),
            withheld: HashMap::new(),
            notices: NoticeGate::default(),
            grace_ns,
            clients: HashMap::new(),
            proxies,
        }
    }

    /// The process behind `agent`'s latest DNS redirect (who asked its next query).
    pub(super) fn client(&self, agent: &str) -> Option<&ConnectEvent> {
        self.clients.get(agent)
    }

    /// The kernel redirected `agent`'s DNS traffic to its proxy: the next query it reports came
    /// from this process.
    pub(super) fn redirected(&mut self, agent: String, redirect: ConnectEvent) {
        self.clients.insert(agent, redirect);
    }

    /// Judges one query the DNS proxy reports; for an allowed answer, first installs its
    /// addresses in the kernel and tells the proxy it may reply. Counts and notices go to
    /// `reporter`; the query itself is returned for the monitor to attribute and report.
    pub(super) fn on_report(
        &mut self,
        r: QueryReport,
        live: Live<'_>,
        kernel: &mut impl LearnedAddresses,
        reporter: &mut Reporter,
        now_ns: u64,
    ) -> Option<DnsQuery> {
        let policy = self
            .proxies
            .endpoints()
            .get(r.agent as usize)
            .and_then(|(name, _)| live.policies.get(name));
        let Some(policy) = policy else {
            tracing::error!(
                agent = r.agent,
                "DNS report for an unknown agent index (or an agent a reload removed)"
            );
            return None;
        };
        let agent = policy.agent().to_string();
        // Ask mode refuses like enforce once a held query is denied.
        let enforce = policy.mode().refuses();
        // The DNS-rebinding opt-in for the name asked, if the policy has one.
        let private_ok = policy.private_answers_for(&r.name).map(str::to_string);
        let counters = &mut reporter.counters;
        counters.dns_queries += 1;
        let (verdict, enforcement, reason) = match r.outcome {
            // Held queries go to the ask desk (`Monitor::on_dns`), never here.
            Outcome::Ask { .. } => return None,
            Outcome::Refused { reason } => {
                counters.dns_refused += 1;
                (Verdict::Denied, Some("refused"), reason)
            }
            Outcome::Malformed { reason } => {
                counters.dns_malformed += 1;
                (
                    Verdict::Denied,
                    Some("not forwarded"),
                    format!("{reason}; not forwarded"),
                )
            }
            Outcome::Overloaded => {
                counters.dns_overloaded += 1;
                (
                    Verdict::Denied,
                    Some("servfail"),
                    "too many queries of this agent in flight; answered SERVFAIL unjudged".into(),
                )
            }
            Outcome::UpstreamFailed { allowed, reason } => {
                counters.dns_upstream_failures += 1;
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
                allowed: false,
                reason,
                rcode,
                addrs,
                cnames,
                ..
            } => (
                Verdict::Alert,
                None,
                format!(
                    "{reason} (alert mode: forwarded); {rcode}{}; answer [{}] not learned",
                    via(&cnames),
                    ttl_list(&addrs)
                ),
            ),
            Outcome::Answered {
                allowed: true,
                reason,
                rcode,
                addrs,
                cnames,
                ports,
                installed,
            } => {
                let chain = via(&cnames);
                // DNS rebinding: a non-public address is not learned unless the policy lets
                // this name answer with one.
                let host = crate::dns::scope::host_addresses();
                let (private, public): (Vec<_>, Vec<_>) = addrs.iter().partition(|(a, _)| {
                    private_ok.is_none() && crate::dns::scope::non_public_here(*a, &host).is_some()
                });
                let result = self.install(
                    r.agent, &r.name, &reason, &public, &ports, live, kernel, now_ns,
                );
                let result = result.map(|over_limit| {
                    let private: Vec<IpAddr> = private.iter().map(|(a, _)| *a).collect();
                    self.withhold(
                        &agent,
                        &r.name,
                        &private,
                        &over_limit,
                        enforce,
                        reporter,
                        now_ns,
                    );
                    let limit_reached = !over_limit.is_empty();
                    let mut strip = private;
                    strip.extend(over_limit);
                    (strip, limit_reached)
                });
                reporter.counters.dns_learned = self.learned.len() as u64;
                if let Some(tx) = installed {
                    let _ = tx.send(match &result {
                        Ok((strip, limit_reached)) => Ok(Installed {
                            strip: if enforce { strip.clone() } else { Vec::new() },
                            limit_reached: *limit_reached,
                        }),
                        Err(e) => Err(e.clone()),
                    });
                }
                match result {
                    Ok((strip, limit_reached)) if !strip.is_empty() => {
                        let learned = ttl_list(
                            &addrs
                                .iter()
                                .filter(|(a, _)| !strip.contains(a))
                                .copied()
                                .collect::<Vec<_>>(),
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
                        format!("{reason}; {rcode}{chain}; learned [{}]", ttl_list(&addrs)),
                    ),
                    Err(e) => {
                        reporter.counters.dns_install_failures += 1;
                        tracing::error!(agent, name = r.name, "{e}; answered SERVFAIL");
                        (
                            Verdict::Allowed,
                            Some("servfail"),
                            format!("{reason}; not installed: {e}; answered SERVFAIL"),
                        )
                    }
                }
            }
        };
        Some(DnsQuery {
            client: self.clients.get(&agent).cloned(),
            agent,
            verdict,
            transport: r.transport,
            name: r.name,
            enforcement,
            reason: format!("{} query: {reason}", r.qtype),
        })
    }

    /// Writes every address of an allowed answer into the agent's kernel allowlist, until its TTL
    /// plus the grace, as far as the agent's learned-address limit allows; returns the addresses
    /// over the limit (not learned). On a failure the table forgets what the kernel does not hold.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        agent: u32,
        name: &str,
        rule: &str,
        addrs: &[&(IpAddr, u32)],
        ports: &[common::PortRange],
        live: Live<'_>,
        kernel: &mut impl LearnedAddresses,
        now_ns: u64,
    ) -> Result<Vec<IpAddr>, InstallError> {
        let mut over_limit = Vec::new();
        for &&(addr, ttl) in addrs {
            let grant = Grant {
                name: name.to_string(),
                rule: rule.to_string(),
                expires_ns: now_ns
                    .saturating_add(u64::from(ttl).saturating_mul(1_000_000_000))
                    .saturating_add(self.grace_ns),
                ports: ports.to_vec(),
            };
            let Ok(value) = self.learned.learn(agent, addr, grant, now_ns) else {
                over_limit.push(addr);
                continue;
            };
            let written = match self.kernel_index(agent, live) {
                Some(k) => {
                    let (value, names) = self.kernel_entry(agent, addr, value, live, now_ns);
                    kernel
                        .write_learned(k, addr, &value, &names)
                        .map_err(|e| InstallError::Kernel(e.into()))
                }
                None => Err(InstallError::NoPolicy),
            };
            if let Err(e) = written {
                self.learned.unlearn(agent, addr, name);
                return Err(e);
            }
        }
        Ok(over_limit)
    }

    /// Counts and reports addresses of an allowed answer that `agent` was not given: a notice
    /// (rate-limited per agent and kind; the counters and the query's own entry have every one).
    #[allow(clippy::too_many_arguments)]
    fn withhold(
        &mut self,
        agent: &str,
        name: &str,
        private: &[IpAddr],
        over_limit: &[IpAddr],
        enforce: bool,
        reporter: &mut Reporter,
        now_ns: u64,
    ) {
        let index = self.index(agent).unwrap_or(u32::MAX);
        let (held, limit) = (self.learned.held(index), self.learned.limit(index));
        for (kind, addrs) in [
            (Withheld::NonPublic, private),
            (Withheld::Limit, over_limit),
        ] {
            if addrs.is_empty() {
                continue;
            }
            let n = addrs.len() as u64;
            let counters = &mut reporter.counters;
            match kind {
                Withheld::NonPublic => counters.dns_withheld_non_public += n,
                Withheld::Limit => {
                    counters.dns_withheld_limit += n;
                    counters.dns_limit_reached += 1;
                }
            }
            *self.withheld.entry((agent.to_string(), kind)).or_default() += n;
            let Some(unsaid) = self.notices.admit(agent, kind, now_ns) else {
                continue;
            };
            let list = crate::dns::brief_list(addrs.iter().map(ToString::to_string));
            let outcome = if enforce {
                "taken out of the reply"
            } else {
                "alert mode: left in the reply, connects to them are alerts"
            };
            let msg = match kind {
                Withheld::NonPublic => format!(
                    "agent {agent}: {name} answered non-public addresses [{list}]; not learned                      ({outcome}); a dns.private_answers entry allows this name"
                ),
                Withheld::Limit => format!(
                    "agent {agent}: learned-address limit reached ({held} of {limit}); {n}                      address(es) of {name} not learned [{list}] ({outcome}); room comes back                      as learned addresses expire"
                ),
            };
            reporter.notice(
                Notice::new(message_id::DNS_WITHHELD, Level::Warning, msg)
                    .field("AGENT_ID", agent)
                    .field("DNS_NAME", name)
                    .field("WITHHELD", kind.as_str())
                    .field("WITHHELD_ADDRS", list)
                    .field("WITHHELD_COUNT", n)
                    .field("LEARNED", held)
                    .field("LEARNED_LIMIT", limit)
                    .field("NOTICES_SUPPRESSED", unsaid),
            );
        }
    }

    /// The DNS proxy start-up index of `agent` (how the learned table keys it).
    pub(super) fn index(&self, agent: &str) -> Option<u32> {
        self.proxies
            .endpoints()
            .iter()
            .position(|(a, _)| a == agent)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The kernel's value for (`dns`, `addr`) and the server names it may be presented, as the
    /// table and the policies `live` hold them now.
    pub(super) fn kernel_entry(
        &self,
        dns: u32,
        addr: IpAddr,
        mut value: Learned,
        live: Live<'_>,
        now_ns: u64,
    ) -> (Learned, Vec<KernelName>) {
        let rules = self
            .proxies
            .endpoints()
            .get(dns as usize)
            .and_then(|(name, _)| live.policies.get(name))
            .map(|p| p.egress());
        let names = self.learned.live_names(dns, addr, now_ns);
        let k = rules.map(|r| for_address(r, &names)).unwrap_or_default();
        value.kernel_sni = u32::from(k.in_kernel);
        (value, k.names)
    }

    /// The kernel agent index (live bank) of the agent whose DNS proxy has start-up index `dns`.
    fn kernel_index(&self, dns: u32, live: Live<'_>) -> Option<u32> {
        let (name, _) = self.proxies.endpoints().get(dns as usize)?;
        live.policies.index_of(name).map(|i| live.bank_base + i)
    }

    /// Removes expired learned addresses from the kernel (which already ignores them).
    pub(super) fn expire(
        &mut self,
        live: Live<'_>,
        kernel: &mut impl LearnedAddresses,
        reporter: &mut Reporter,
        now_ns: u64,
    ) {
        for change in self.learned.expire(now_ns) {
            let result = match change {
                KernelChange::Write(agent, addr, value) => match self.kernel_index(agent, live) {
                    Some(k) => {
                        let (value, names) = self.kernel_entry(agent, addr, value, live, now_ns);
                        kernel.write_learned(k, addr, &value, &names)
                    }
                    None => Ok(()),
                },
                KernelChange::Remove(agent, addr) => match self.kernel_index(agent, live) {
                    Some(k) => kernel.remove_learned(k, addr),
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                tracing::warn!("expiring a learned address: {e:#}");
            }
        }
        reporter.counters.dns_learned = self.learned.len() as u64;
    }

    /// (held, limit) learned addresses of `agent`.
    pub(super) fn learned_of(&self, agent: &str) -> Option<(u32, u32)> {
        let i = self.index(agent)?;
        Some((self.learned.held(i), self.learned.limit(i)))
    }

    /// Addresses withheld from `agent` for `kind`, since start.
    pub(super) fn withheld_of(&self, agent: &str, kind: Withheld) -> u64 {
        self.withheld
            .get(&(agent.to_string(), kind))
            .copied()
            .unwrap_or(0)
    }

    /// (agent, kind, count) rows, for the metrics.
    pub(super) fn withheld_rows(&self) -> Vec<(String, &'static str, u64)> {
        self.withheld
            .iter()
            .map(|((agent, kind), n)| (agent.clone(), kind.as_str(), *n))
            .collect()
    }

    /// The ports of `agent`'s DNS proxy endpoints.
    pub(super) fn endpoint(&self, agent: &str) -> Option<common::DnsProxy> {
        self.proxies
            .endpoints()
            .iter()
            .find(|(a, _)| a == agent)
            .map(|(_, ports)| *ports)
    }
}

/// ` via CNAME a > b`, or nothing.
fn via(cnames: &[String]) -> String {
    if cnames.is_empty() {
        String::new()
    } else {
        format!(" via CNAME {}", cnames.join(" > "))
    }
}

/// `addr (ttl Ns), …`, brief.
fn ttl_list(addrs: &[(IpAddr, u32)]) -> String {
    crate::dns::brief_list(addrs.iter().map(|(a, ttl)| format!("{a} (ttl {ttl}s)")))
}
