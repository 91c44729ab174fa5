//! Which agent (and task) the current task is: the lookup order every hook uses, and the tagging
//! of processes that selectors make agents (at fork and exec, in the kernel, so there is no window).
//!
//! Order (cheapest and most specific first):
//! 1. `AGENT_CGROUPS[current cgroup]` — `run`'s (agent, task) cgroups, and a process sitting
//!    directly in a selected cgroup — if `AGENT_CGROUP_FILTER` says it may be there. With no
//!    selector configured this is the only lookup.
//! 2. `PROCESS_AGENTS[tid]` — tags set by executable/uid selectors and task switches.
//! 3. `AGENT_CGROUPS[ancestor at level l]` for each level holding a cgroup/unit selector, deepest
//!    first.
//! 4. `UID_SELECTORS[uid]`.
//!
//! Identities hold the agent's stable id (the daemon's `agent_id`, a hash of the name); what the
//! agent may do now is found through `AGENT_TABLES` (`in_force`), so a reload or a restarted daemon
//! never leaves an identity — least of all a tag the kernel copied at fork — pointing at old tables.

use agent_monitor_common::{
    AgentSlot, COUNTER_TAGS_FULL, IdentityConfig, MAX_SELECTOR_LEVEL, MODE_ENFORCE, NO_ALLOWLIST,
    SELECT_CGROUPS, SELECT_TAGS, SELECT_UIDS, agent_cgroup_filter_slot, source_is_tag,
};

use crate::maps::{
    AGENT_CGROUP_FILTER, AGENT_CGROUPS, AGENT_TABLES, IDENTITY_CONFIG, PROCESS_AGENTS,
    UID_SELECTORS, count,
};

/// The agent the current task belongs to, if any, with the current cgroup id (carried in records):
/// `agent` is the allowlist index in force and `mode` the agent's mode now.
#[inline(always)]
pub fn current_agent() -> Option<(u64, AgentSlot)> {
    current_identity().map(|(cgroup_id, raw)| (cgroup_id, in_force(&raw)))
}

/// What agent `raw` (an identity: stable id, task, source) may do now: the allowlist index and mode
/// of its entry in `AGENT_TABLES`. An id without an entry (its policy was removed) gets an index no
/// allowlist is written under, in enforce mode: fail closed.
#[inline(always)]
pub fn in_force(raw: &AgentSlot) -> AgentSlot {
    // SAFETY: copied out at once.
    match unsafe { AGENT_TABLES.get(&raw.agent) } {
        Some(t) => AgentSlot {
            agent: t.agent,
            mode: t.mode,
            task: raw.task,
            source: raw.source,
        },
        None => AgentSlot {
            agent: NO_ALLOWLIST,
            mode: MODE_ENFORCE,
            task: raw.task,
            source: raw.source,
        },
    }
}

/// The identity of the current task as stored (stable agent id, untranslated): what a tag copies.
#[inline(always)]
pub fn current_identity() -> Option<(u64, AgentSlot)> {
    // SAFETY: helper with no arguments.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    if maybe_agent_cgroup(cgroup_id) {
        // SAFETY: the value is copied out before any other map operation.
        if let Some(slot) = unsafe { AGENT_CGROUPS.get(&cgroup_id) } {
            return Some((cgroup_id, *slot));
        }
    }
    let config = config()?;
    if config.selectors == 0 {
        return None;
    }
    selected_agent(&config).map(|slot| (cgroup_id, slot))
}

/// Whether `cgroup_id` may be in `AGENT_CGROUPS`: its pre-filter bit is set.
#[inline(always)]
pub fn maybe_agent_cgroup(cgroup_id: u64) -> bool {
    let (word, bit) = agent_cgroup_filter_slot(cgroup_id);
    AGENT_CGROUP_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

/// The selector configuration, copied (absent only if the map is missing its one entry).
#[inline(always)]
pub fn config() -> Option<IdentityConfig> {
    IDENTITY_CONFIG.get(0).copied()
}

/// Steps 2–4 of the lookup order.
#[inline(always)]
fn selected_agent(config: &IdentityConfig) -> Option<AgentSlot> {
    if config.selectors & SELECT_TAGS != 0 {
        let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { PROCESS_AGENTS.get(&tid) } {
            return Some(*slot);
        }
    }
    if config.selectors & SELECT_CGROUPS != 0 {
        let mut level = MAX_SELECTOR_LEVEL;
        while level > 0 {
            level -= 1;
            if config.ancestor_levels & (1 << level) != 0 {
                // SAFETY: helper on the current task; returns 0 above the task's own depth.
                let id = unsafe {
                    aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id(level as i32)
                };
                if id != 0 {
                    // SAFETY: copied out at once.
                    if let Some(slot) = unsafe { AGENT_CGROUPS.get(&id) } {
                        return Some(*slot);
                    }
                }
            }
        }
    }
    if config.selectors & SELECT_UIDS != 0 {
        let uid = aya_ebpf::helpers::bpf_get_current_uid_gid() as u32;
        // SAFETY: copied out at once.
        if let Some(slot) = unsafe { UID_SELECTORS.get(&uid) } {
            return Some(*slot);
        }
    }
    None
}

/// Makes thread `tid` the agent `slot` (a tag). A full map is counted: the thread stays what it was.
#[inline(always)]
pub fn tag(tid: u32, slot: &AgentSlot) -> bool {
    if PROCESS_AGENTS.insert(&tid, slot, 0).is_err() {
        count(COUNTER_TAGS_FULL);
        return false;
    }
    true
}

/// At fork: a child of a tagged (or uid-selected) process carries the same tag, so it stays the
/// agent whatever uid or executable it later has. Cgroup identities need nothing: the kernel puts
/// the child in its parent's cgroup.
#[inline(always)]
pub fn inherit(child_tid: u32, parent: &AgentSlot) {
    if source_is_tag(parent.source) {
        tag(child_tid, parent);
    }
}

/// At exit of a thread: its tag goes (other threads of the process keep theirs).
#[inline(always)]
pub fn forget(tid: u32) {
    let _ = PROCESS_AGENTS.remove(&tid);
}
