//! Reload apply and refusal, bank swaps and the questions about past generations, against an
//! in-memory kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use agent_monitor_common::{self as common, AgentSlot};

use super::*;

/// The allowlist maps as agent indices of their entries, the agent table, the live-bank slot,
/// and the order of the calls.
#[derive(Default)]
struct FakeKernel {
    live_bank: u32,
    allowlist_agents: Vec<u32>,
    agent_tables: BTreeMap<u32, AgentSlot>,
    calls: Vec<&'static str>,
    /// `write_allowlists` writes the first half of the entries (rounded up), then fails (a full map).
    fail_writes: bool,
}

impl AllowlistTables for FakeKernel {
    fn live_bank(&self) -> anyhow::Result<u32> {
        Ok(self.live_bank)
    }

    fn set_live_bank(&mut self, bank: u32) -> anyhow::Result<()> {
        self.calls.push("set_live_bank");
        self.live_bank = bank;
        Ok(())
    }

    fn write_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        self.calls.push("write_allowlists");
        let agents: Vec<u32> = (tables.net.iter().map(|e| e.1.agent))
            .chain(tables.exec.iter().map(|e| e.1.agent))
            .collect();
        if self.fail_writes {
            self.allowlist_agents
                .extend(&agents[..agents.len().div_ceil(2)]);
            anyhow::bail!("NET_ALLOW is full");
        }
        self.allowlist_agents.extend(agents);
        Ok(())
    }

    fn retain_allowlists(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize> {
        self.calls.push("retain_allowlists");
        let before = self.allowlist_agents.len();
        self.allowlist_agents.retain(|a| keep(*a));
        Ok(before - self.allowlist_agents.len())
    }

    fn set_agent_table(&mut self, id: u32, slot: AgentSlot) -> anyhow::Result<()> {
        self.calls.push("set_agent_table");
        self.agent_tables.insert(id, slot);
        Ok(())
    }

    fn agent_table_ids(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.agent_tables.keys().copied().collect())
    }

    fn remove_agent_table(&mut self, id: u32) -> anyhow::Result<()> {
        self.calls.push("remove_agent_table");
        self.agent_tables.remove(&id);
        Ok(())
    }
}

fn policy(text: &str) -> Policy {
    Policy::parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn set(policies: &[&str]) -> PolicySet {
    PolicySet::new(policies.iter().map(|t| policy(t)).collect()).expect("distinct agents")
}

const ALPHA_HTTPS: &str = "agent = \"alpha\"\n[network]\nallow = [\"10.0.0.0/8:443\"]\n";
const ALPHA_NOTHING: &str = "agent = \"alpha\"\n";
const BETA_EXEC: &str = "agent = \"beta\"\nmode = \"alert\"\n[exec]\nallow = [\"/usr/bin/git\"]\n";

/// Stages, writes and switches `set`; the switch ends at `now_ns`. The old bank is left for
/// the loop's timer (`retire_old_bank`).
fn apply(
    g: &mut Generations,
    k: &mut FakeKernel,
    set: PolicySet,
    now_ns: u64,
) -> Result<Switched, ReloadError> {
    let staged = g.stage(set, k)?;
    g.write(&staged, k, |_| Ok(()))?;
    g.switch(staged, k, || now_ns)
}

/// Generations with `policies` put in force (at 10) on a fresh kernel.
fn in_force(policies: &[&str]) -> (Generations, FakeKernel) {
    let mut g = Generations::new(Path::new("/p"));
    let mut k = FakeKernel::default();
    apply(&mut g, &mut k, set(policies), 10).unwrap();
    (g, k)
}

fn https(p: &Policy) -> Decision {
    p.check_connect("10.1.2.3".parse::<IpAddr>().unwrap(), 443)
}

#[test]
fn apply_puts_the_set_in_force_in_the_bank_not_in_use() {
    let mut g = Generations::new(Path::new("/etc/agent-monitor/policies"));
    let mut k = FakeKernel::default();
    apply(&mut g, &mut k, set(&[BETA_EXEC, ALPHA_HTTPS]), 10).unwrap();
    assert_eq!(k.live_bank, 1);
    assert_eq!(g.bank_base(), BANK_STRIDE);
    assert_eq!(g.live().len(), 2);
    // Agents by name: alpha is index 0, beta index 1, both in the new bank.
    assert_eq!(g.kernel_index("alpha"), Some(BANK_STRIDE));
    assert_eq!(g.kernel_index("beta"), Some(BANK_STRIDE + 1));
    assert_eq!(g.kernel_index("nobody"), None);
    let beta = k.agent_tables[&agent_id("beta")];
    assert_eq!(
        (beta.agent, beta.mode, beta.task),
        (BANK_STRIDE + 1, common::MODE_ALERT, common::TASK_NONE)
    );
    assert_eq!(
        k.agent_tables[&agent_id("alpha")].mode,
        common::MODE_ENFORCE
    );
    assert!(!k.allowlist_agents.is_empty());
    assert!(k.allowlist_agents.iter().all(|a| *a >= BANK_STRIDE));
}

#[test]
fn a_failed_write_keeps_the_old_set_and_clears_the_new_bank() {
    let (mut g, mut k) = in_force(&[ALPHA_HTTPS]);
    let live_entries = k.allowlist_agents.clone();
    let tables_before = k.agent_tables.clone();
    k.fail_writes = true;
    let err = apply(&mut g, &mut k, set(&[ALPHA_NOTHING, BETA_EXEC]), 20).unwrap_err();
    assert!(err.to_string().contains("NET_ALLOW is full"), "{err}");
    assert_eq!(g.live().len(), 1, "the old set stays in force");
    assert!(g.live().get("beta").is_none());
    assert_eq!(k.live_bank, 1, "the live bank did not flip");
    assert_eq!(k.agent_tables, tables_before, "no agent was switched");
    assert_eq!(
        k.allowlist_agents, live_entries,
        "partial entries removed, live kept"
    );
}

#[test]
fn a_failure_in_another_owners_entries_also_refuses_the_set() {
    let (mut g, mut k) = in_force(&[ALPHA_HTTPS]);
    let live_entries = k.allowlist_agents.clone();
    let staged = g.stage(set(&[ALPHA_NOTHING, BETA_EXEC]), &k).unwrap();
    let err = g
        .write(&staged, &mut k, |_| {
            anyhow::bail!("DNS_PROXY update failed")
        })
        .unwrap_err();
    assert!(matches!(err, ReloadError::Kernel(_)), "{err}");
    assert_eq!(k.allowlist_agents, live_entries);
    assert!(g.live().get("alpha").is_some_and(|p| https(p).allowed));
}

#[test]
fn a_set_the_agent_table_cannot_hold_is_refused_before_anything_is_written() {
    let g = Generations::new(Path::new("/p"));
    let k = FakeKernel::default();
    let too_many: Vec<Policy> = (0..=common::MAX_AGENTS)
        .map(|i| policy(&format!("agent = \"a{i}\"\n")))
        .collect();
    let err = g
        .stage(PolicySet::new(too_many).unwrap(), &k)
        .err()
        .expect("refused");
    assert_eq!(
        err.to_string(),
        format!(
            "{} agents: the kernel's agent table holds {}",
            common::MAX_AGENTS + 1,
            common::MAX_AGENTS
        )
    );
    assert!(k.calls.is_empty());
}

#[test]
fn bank_swaps_alternate_and_leave_no_entry_of_the_old_bank() {
    let mut g = Generations::new(Path::new("/p"));
    let mut k = FakeKernel::default();
    for (round, expected_bank) in [1, 0, 1, 0].into_iter().enumerate() {
        k.calls.clear();
        apply(&mut g, &mut k, set(&[ALPHA_HTTPS, BETA_EXEC]), round as u64).unwrap();
        assert_eq!(k.live_bank, expected_bank, "round {round}");
        let base = expected_bank * BANK_STRIDE;
        assert_eq!(g.bank_base(), base);
        // The switch leaves the old bank for the loop's timer, which fires after the grace.
        let due = g.retire_due().expect("the old bank waits");
        assert!(
            due > Instant::now() + SWAP_GRACE / 2,
            "about SWAP_GRACE from now"
        );
        let removed = g.retire_old_bank(&mut k).unwrap();
        assert_eq!(g.retire_due(), None);
        assert!(
            k.allowlist_agents
                .iter()
                .all(|a| (base..base + BANK_STRIDE).contains(a)),
            "round {round}: an entry of the old bank is left: {:?}",
            k.allowlist_agents
        );
        assert!(
            k.agent_tables
                .values()
                .all(|s| s.agent >= base && s.agent < base + 2)
        );
        if round > 0 {
            assert_eq!(removed, 2, "alpha's and beta's old entries");
        }
        // Agents switch before the live bank flips; the old bank goes only after that.
        let at = |c: &str| k.calls.iter().position(|x| *x == c).unwrap();
        assert!(at("set_agent_table") < at("set_live_bank"));
        assert!(
            at("set_live_bank")
                < k.calls
                    .iter()
                    .rposition(|x| *x == "retain_allowlists")
                    .unwrap()
        );
    }
}

#[test]
fn the_switch_keeps_the_old_bank_until_it_is_retired() {
    let (mut g, mut k) = in_force(&[ALPHA_HTTPS]);
    g.retire_old_bank(&mut k).unwrap();
    let old: Vec<u32> = k.allowlist_agents.clone();
    assert!(!old.is_empty());
    apply(&mut g, &mut k, set(&[ALPHA_HTTPS]), 20).unwrap();
    // A program that read alpha's old index just before the switch still finds its entries.
    assert!(old.iter().all(|a| k.allowlist_agents.contains(a)));
    assert!(g.retire_due().is_some());
    assert_eq!(g.retire_old_bank(&mut k).unwrap(), old.len());
    assert!(!old.iter().any(|a| k.allowlist_agents.contains(a)));
    // Nothing waits any more: a second retirement touches nothing.
    k.calls.clear();
    assert_eq!(g.retire_old_bank(&mut k).unwrap(), 0);
    assert!(k.calls.is_empty());
}

#[test]
fn a_reload_before_the_old_bank_is_retired_writes_into_an_emptied_bank() {
    // Bank 1 holds alpha's and beta's entries, then a reload to bank 0 leaves them waiting.
    let (mut g, mut k) = in_force(&[ALPHA_HTTPS, BETA_EXEC]);
    g.retire_old_bank(&mut k).unwrap();
    apply(&mut g, &mut k, set(&[ALPHA_HTTPS]), 20).unwrap();
    assert!(k.allowlist_agents.iter().any(|a| *a >= BANK_STRIDE));
    // The next reload goes to bank 1 before the timer fired: beta's old entries (at the index
    // alpha's successor set could reuse) must not live on in the new bank.
    apply(&mut g, &mut k, set(&[ALPHA_NOTHING]), 30).unwrap();
    let (_, mut fresh) = in_force(&[ALPHA_NOTHING]);
    fresh.allowlist_agents.sort_unstable();
    let mut in_new_bank: Vec<u32> = k
        .allowlist_agents
        .iter()
        .copied()
        .filter(|a| *a >= BANK_STRIDE)
        .collect();
    in_new_bank.sort_unstable();
    assert_eq!(
        in_new_bank, fresh.allowlist_agents,
        "only the new set's entries"
    );
    // The bank this switch left (0) waits for its own timer.
    assert!(g.retire_due().is_some());
    g.retire_old_bank(&mut k).unwrap();
    assert_eq!(k.allowlist_agents, fresh.allowlist_agents);
}

#[test]
fn an_agent_the_new_set_drops_loses_its_table_entry() {
    let mut g = Generations::new(Path::new("/p"));
    let mut k = FakeKernel::default();
    apply(&mut g, &mut k, set(&[ALPHA_HTTPS, BETA_EXEC]), 1).unwrap();
    apply(&mut g, &mut k, set(&[ALPHA_HTTPS]), 2).unwrap();
    assert!(k.agent_tables.contains_key(&agent_id("alpha")));
    assert!(
        !k.agent_tables.contains_key(&agent_id("beta")),
        "no entry: beta's processes are denied everything"
    );
}

#[test]
fn records_judged_before_a_reload_are_explained_by_the_set_then_in_force() {
    let mut g = Generations::new(Path::new("/p"));
    let mut k = FakeKernel::default();
    apply(&mut g, &mut k, set(&[ALPHA_HTTPS, BETA_EXEC]), 100).unwrap();
    g.started(false, 100);
    let old_alpha = g.kernel_index("alpha").unwrap();
    let old_beta = g.kernel_index("beta").unwrap();
    // The reload (switch finished at 200) drops beta and alpha's HTTPS rule.
    apply(&mut g, &mut k, set(&[ALPHA_NOTHING]), 200).unwrap();
    // An allowed connect judged at 150 by the old tables, read after the reload.
    let e = g.explain("alpha", true, 150, https);
    assert!(matches!(e, Explanation::Superseded(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "allowed by rule \"10.0.0.0/8:443\" (policy in force before a reload)"
    );
    // Judged after the switch, the same verdict disagrees with the set in force.
    let e = g.explain("alpha", true, 250, https);
    assert!(
        matches!(e, Explanation::Disagrees(ref d) if !d.allowed),
        "{e:?}"
    );
    // A denial the current set agrees with.
    assert!(matches!(
        g.explain("alpha", false, 250, https),
        Explanation::Agrees(_)
    ));
    // Indices of the previous bank still name their agents, a removed one included.
    assert_eq!(g.agent_at(old_alpha).as_deref(), Some("alpha"));
    assert_eq!(g.agent_at(old_beta).as_deref(), Some("beta"));
    assert_eq!(
        g.agent_at(g.kernel_index("alpha").unwrap()).as_deref(),
        Some("alpha")
    );
    assert_eq!(
        g.agent_at(g.bank_base() + 1),
        None,
        "no second agent in force"
    );
    assert_eq!(
        g.explain("gamma", true, 250, https),
        Explanation::UnknownAgent
    );
}

#[test]
fn after_adoption_records_before_the_switch_belong_to_the_predecessor() {
    let mut g = Generations::new(Path::new("/p"));
    // The predecessor's bank 1 is live.
    let mut k = FakeKernel {
        live_bank: 1,
        ..Default::default()
    };
    apply(&mut g, &mut k, set(&[ALPHA_NOTHING]), 500).unwrap();
    assert_eq!(
        k.live_bank, 0,
        "the start-up set goes to the bank the predecessor did not use"
    );
    g.started(true, 500);
    // The predecessor allowed it; its policy files may have changed since.
    let e = g.explain("alpha", true, 400, https);
    assert_eq!(e, Explanation::Predecessor);
    assert_eq!(
        e.to_string(),
        "judged by the policy in force before this daemon started"
    );
    assert!(matches!(
        g.explain("alpha", true, 600, https),
        Explanation::Disagrees(_)
    ));
    // The empty set the start-up apply replaced explains nothing.
    assert_eq!(g.agent_at(BANK_STRIDE), None);
}
