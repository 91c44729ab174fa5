//! `[dns]` of a policy: how many addresses the agent may hold learned from DNS answers at once,
//! and which names may answer with loopback, link-local, private or other non-public addresses.
//! Also how the shared learned-address map is divided between the agents of a set. Pure.

use agent_monitor_common::MAX_DNS_LEARNED;

use crate::policy::host::HostPattern;
use crate::policy::model::{Policy, PolicySet};

/// Learned addresses all agents together may hold: half the kernel map, because a reload copies
/// every learned address into the new bank of agent indices before the old bank goes. Held to by
/// construction (each agent's limit is a reservation), so neither another agent nor a reload can
/// find the map full.
pub const LEARNED_BUDGET: u32 = MAX_DNS_LEARNED / 2;
/// Limit of an agent that does not set `dns.max_learned`, unless the budget left over by the
/// explicit limits, shared among the agents without one, is smaller.
pub const DEFAULT_MAX_LEARNED: u32 = 4_096;

/// The agent's `[dns]` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// `dns.max_learned`, if written.
    pub(crate) max_learned: Option<u32>,
    /// `dns.private_answers`: names whose answers may carry non-public addresses (the opt-in
    /// against the DNS-rebinding protection), with the entries as written.
    pub(crate) private_answers: Vec<(HostPattern, String)>,
}

impl Policy {
    pub fn dns(&self) -> &DnsSettings {
        &self.dns
    }

    /// The `dns.private_answers` entry that lets `name` (normalised) answer with non-public
    /// addresses, if any.
    pub fn private_answers_for(&self, name: &str) -> Option<&str> {
        self.dns
            .private_answers
            .iter()
            .find(|(p, _)| p.matches(name))
            .map(|(_, text)| text.as_str())
    }
}

/// Why the agents of a set cannot be given their learned-address limits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the dns.max_learned limits add up to {total} ({}); all agents together may hold at most {budget} learned addresses (half the kernel map of {MAX_DNS_LEARNED}, the other half is the room a reload needs); lower them",
    .explicit.join(", "), budget = LEARNED_BUDGET
)]
pub struct LearnedBudgetError {
    pub total: u64,
    /// `agent (file): N` for every agent with an explicit limit.
    pub explicit: Vec<String>,
}

impl PolicySet {
    /// Each agent's learned-address limit, in kernel index order. An agent without host rules
    /// learns nothing and reserves nothing, unless it is in ask mode (an approved name is learned); an explicit `dns.max_learned` is reserved as written;
    /// the rest share what is left, at most `DEFAULT_MAX_LEARNED` each. The sum never exceeds
    /// `LEARNED_BUDGET`.
    pub fn learned_limits(&self) -> Result<Vec<u32>, LearnedBudgetError> {
        let resolves =
            |p: &Policy| !p.hosts().is_empty() || p.mode() == crate::policy::model::Mode::Ask;
        let explicit: u64 = self
            .iter()
            .filter(|p| resolves(p))
            .filter_map(|p| p.dns.max_learned)
            .map(u64::from)
            .sum();
        if explicit > u64::from(LEARNED_BUDGET) {
            return Err(LearnedBudgetError {
                total: explicit,
                explicit: self
                    .iter()
                    .filter(|p| resolves(p))
                    .filter_map(|p| {
                        p.dns
                            .max_learned
                            .map(|n| format!("{} ({}): {n}", p.agent(), p.defined_at()))
                    })
                    .collect(),
            });
        }
        let sharing = self
            .iter()
            .filter(|p| resolves(p) && p.dns.max_learned.is_none())
            .count() as u64;
        let share = (u64::from(LEARNED_BUDGET) - explicit)
            .checked_div(sharing)
            .unwrap_or(0)
            .min(u64::from(DEFAULT_MAX_LEARNED)) as u32;
        Ok(self
            .iter()
            .map(|p| match (resolves(p), p.dns.max_learned) {
                (false, _) => 0,
                (true, Some(n)) => n,
                (true, None) => share,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(agent: &str, hosts: bool, dns: &str) -> Policy {
        let allow = if hosts { "\"a.test:443\"" } else { "" };
        crate::policy::test_policy(
            agent,
            &format!("[network]\nallow = [{allow}]\n[dns]\n{dns}\n"),
        )
    }

    fn set(policies: Vec<Policy>) -> PolicySet {
        PolicySet::new(policies).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_reserve_at_most_the_default_each_and_never_more_than_the_budget() {
        let few = set(vec![policy("a", true, ""), policy("b", true, "")]);
        assert_eq!(
            few.learned_limits().unwrap(),
            [DEFAULT_MAX_LEARNED, DEFAULT_MAX_LEARNED]
        );
        // 100 resolving agents share the budget; agents without host rules reserve nothing.
        let mut many: Vec<Policy> = (0..100)
            .map(|i| policy(&format!("r{i:03}"), true, ""))
            .collect();
        many.push(policy("static", false, ""));
        let limits = set(many).learned_limits().unwrap();
        assert_eq!(limits[..100], [LEARNED_BUDGET / 100; 100]);
        assert_eq!(limits[100], 0, "no host rules, no reservation");
        assert!(limits.iter().map(|&n| u64::from(n)).sum::<u64>() <= u64::from(LEARNED_BUDGET));
    }

    #[test]
    fn explicit_limits_are_reserved_first_and_may_not_exceed_the_budget() {
        let s = set(vec![
            policy(
                "big",
                true,
                &format!("max_learned = {}", LEARNED_BUDGET - 100),
            ),
            policy("x", true, ""),
            policy("y", true, ""),
        ]);
        assert_eq!(s.learned_limits().unwrap(), [LEARNED_BUDGET - 100, 50, 50]);
        let s = set(vec![
            policy("a", true, &format!("max_learned = {LEARNED_BUDGET}")),
            policy("b", true, "max_learned = 1"),
        ]);
        let e = s.learned_limits().expect_err("over the budget").to_string();
        assert!(
            e.contains(&format!("add up to {}", LEARNED_BUDGET + 1)),
            "{e}"
        );
        assert!(
            e.contains("a (a.toml:1:9): 32768, b (b.toml:1:9): 1"),
            "{e}"
        );
    }

    #[test]
    fn private_answers_match_like_host_rules() {
        let p = policy(
            "a",
            true,
            "private_answers = [\"db.corp.test\", \"*.internal.test\"]",
        );
        assert_eq!(p.private_answers_for("db.corp.test"), Some("db.corp.test"));
        assert_eq!(
            p.private_answers_for("x.internal.test"),
            Some("*.internal.test")
        );
        assert_eq!(p.private_answers_for("internal.test"), None);
        assert_eq!(p.private_answers_for("a.test"), None);
    }

    #[test]
    fn bad_dns_settings_name_the_place() {
        let err = |dns: &str| {
            let text = format!("agent = \"a\"\n[dns]\n{dns}\n");
            Policy::parse(&text, Path::new("a.toml"))
                .expect_err(dns)
                .to_string()
        };
        let e = err("max_learned = 0");
        assert!(e.starts_with("a.toml:3:15: dns.max_learned \"0\""), "{e}");
        assert!(e.contains(&format!("expected 1-{LEARNED_BUDGET}")), "{e}");
        let e = err(&format!("max_learned = {}", LEARNED_BUDGET + 1));
        assert!(e.contains("expected 1-"), "{e}");
        let e = err("private_answers = [\"db.corp.test:5432\"]");
        assert!(
            e.starts_with("a.toml:3:20: dns.private_answers[0] \"db.corp.test:5432\""),
            "{e}"
        );
        assert!(e.contains("without a port"), "{e}");
        let e = err("private_answers = [\"a.*.test\"]");
        assert!(e.contains("'*' is only allowed as the first label"), "{e}");
        let e = err("max_learn = 5");
        assert!(e.contains("unknown field"), "{e}");
    }
}
