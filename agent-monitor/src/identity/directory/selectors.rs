//! Selectors and uid bindings in the directory: replacing them at a reload (bindings carried
//! over), arming them in the kernel, removing what no selector owns any more, and tagging the
//! processes that already ran a selected executable when it was armed.

use std::collections::HashMap;
use std::path::Path;

use agent_monitor_common::{self as common, AgentSlot, ExecFileKey};

use super::IdentityDirectory;
use crate::identity::selected::{ArmReport, ProbePlan, Probed, Selected};
use crate::identity::tables::IdentityTables;
use crate::identity::uid_binding::{self, Binding, Bindings, Owner};
use crate::identity::{DEFAULT_TASK, TaskNumbers, UNVERIFIED_TASK, agent_id, procfs};
use crate::policy::PolicySet;

/// A process on the host as one pass of start-up tagging sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProcess {
    pub pid: u32,
    pub ppid: u32,
    /// cgroup v2 path below the root.
    pub cgroup: Option<String>,
    /// Real uid.
    pub uid: Option<u32>,
    /// The file it runs, as executable selectors key it.
    pub exe: Option<ExecFileKey>,
}

/// Every process on the host now. Blocking (a walk of /proc): not for the event loop's thread.
pub fn host_snapshot() -> Vec<HostProcess> {
    procfs::processes()
        .into_iter()
        .map(|(pid, ppid)| HostProcess {
            pid,
            ppid,
            cgroup: procfs::cgroup_v2(pid),
            uid: procfs::credentials(pid).map(|c| c.uid),
            exe: crate::identity::selected::stamp(&procfs::exe_link(pid))
                .ok()
                .map(|st| st.selector_key()),
        })
        .collect()
}

/// One pass of start-up tagging: the processes of `procs` that run a selected executable
/// (`files`), and their descendants, parents first, with the identity each gets. `done` were
/// tagged by earlier passes; `free` says whether a process may take a selector's identity (it
/// has none, or only a uid one, which an executable selector outranks).
pub fn plan_tags(
    procs: &[HostProcess],
    files: &HashMap<ExecFileKey, AgentSlot>,
    done: &HashMap<u32, AgentSlot>,
    free: impl Fn(&HostProcess) -> bool,
) -> HashMap<u32, AgentSlot> {
    let mut found: HashMap<u32, AgentSlot> = HashMap::new();
    for p in procs {
        if done.contains_key(&p.pid) || !free(p) {
            continue;
        }
        if let Some(slot) = p.exe.as_ref().and_then(|key| files.get(key)) {
            found.insert(
                p.pid,
                AgentSlot {
                    source: common::SOURCE_EXECUTABLE,
                    ..*slot
                },
            );
        }
    }
    // Descendants, parents first: repeat until no untagged child of a tagged one is left.
    loop {
        let mut more = Vec::new();
        for p in procs {
            if found.contains_key(&p.pid) || done.contains_key(&p.pid) {
                continue;
            }
            let parent = found.get(&p.ppid).or_else(|| done.get(&p.ppid));
            if let Some(slot) = parent
                && free(p)
            {
                more.push((p.pid, *slot));
            }
        }
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    found
}

/// A bound uid's identity: the agent's `default` task, as numbered now.
fn binding_slot(policies: &PolicySet, registry: &mut impl TaskNumbers, agent: &str) -> AgentSlot {
    AgentSlot {
        agent: agent_id(agent),
        mode: policies
            .get(agent)
            .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value()),
        task: registry.number(agent, DEFAULT_TASK),
        source: common::SOURCE_UID,
    }
}

impl IdentityDirectory {
    /// Replaces the selectors with those of `policies` (issue 4's `Selected::arm` is re-runnable:
    /// the new set's entries are written over the old, same stable ids). Tags of task switches
    /// keep the kernel looking at tags; uid bindings are carried over (see
    /// [`Self::carried_bindings`]). The caller then arms them and removes stale entries.
    pub fn replace_selectors(
        &mut self,
        kernel: &mut impl IdentityTables,
        policies: &PolicySet,
        registry: &mut impl TaskNumbers,
    ) {
        let mut selected = Selected::from_policies(policies, |agent| AgentSlot {
            agent: agent_id(agent),
            mode: policies
                .get(agent)
                .map_or(common::MODE_ENFORCE, |p| p.mode().kernel_value()),
            task: registry.number(agent, DEFAULT_TASK),
            source: common::SOURCE_RUN,
        });
        selected.tags_in_use = self.selected.tags_in_use || !kernel.tags().is_empty();
        selected.bound = self.carried_bindings(kernel, policies, registry, &selected);
        selected.generation = self.selected.generation + 1;
        self.selected = selected;
    }

    /// The uid bindings that stay under the policies of `next` (see `identity::uid_binding` for
    /// their lifetime): this daemon's, and at the first apply those a previous daemon left in the
    /// pinned map (every uid entry no `uids` selector claims, for an agent that has a policy).
    /// Each kept binding is rewritten for the agent's `default` task as numbered now.
    pub fn carried_bindings(
        &mut self,
        kernel: &mut impl IdentityTables,
        policies: &PolicySet,
        registry: &mut impl TaskNumbers,
        next: &Selected,
    ) -> Bindings {
        let mut candidates = std::mem::take(&mut self.selected.bound);
        if !self.bindings_adopted {
            self.bindings_adopted = true;
            match kernel.uid_selector_entries() {
                Ok(entries) => {
                    for (uid, slot) in entries {
                        let Some(p) = policies.iter().find(|p| agent_id(p.agent()) == slot.agent)
                        else {
                            continue;
                        };
                        candidates.entry(uid).or_insert(Binding {
                            agent: p.agent().to_string(),
                            slot,
                            origin: "a previous daemon (adopted from the pinned uid map)".into(),
                        });
                    }
                }
                Err(e) => tracing::error!("reading the pinned uid map: {e:#}"),
            }
        }
        let mut kept = Bindings::new();
        for (uid, mut b) in candidates {
            if policies.get(&b.agent).is_none() {
                tracing::warn!(
                    uid,
                    agent = b.agent,
                    "uid binding ended: the agent has no policy any more; processes of uid {uid} are no agent's now"
                );
                continue;
            }
            if let Some(Owner::Selector { agent, at }) = next.uid_owner(uid) {
                if agent != b.agent {
                    tracing::warn!(
                        uid,
                        "uid {uid} was bound to agent {} by {}; the `uids` selector of agent {agent} at {at} outranks the binding: its processes are agent {agent} now",
                        b.agent,
                        b.origin
                    );
                }
                continue;
            }
            // Bindings give the `default` task, as a selector does; re-numbered for this daemon.
            b.slot = binding_slot(policies, registry, &b.agent);
            if let Err(e) = kernel.set_uid_selector(uid, b.slot) {
                tracing::error!(uid, agent = b.agent, "rewriting the uid binding: {e:#}");
            }
            kept.insert(uid, b);
        }
        kept
    }

    /// Binds `uid` to `agent` (`run --user` of pid `pid`) in the kernel and in the directory.
    pub fn bind_uid(
        &mut self,
        kernel: &mut impl IdentityTables,
        policies: &PolicySet,
        registry: &mut impl TaskNumbers,
        agent: &str,
        uid: u32,
        pid: u32,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let slot = binding_slot(policies, registry, agent);
        kernel
            .set_uid_selector(uid, slot)
            .with_context(|| format!("binding uid {uid} to agent {agent}"))?;
        self.selected.bound.insert(
            uid,
            Binding {
                agent: agent.to_string(),
                slot,
                origin: format!("`run --user` (pid {pid})"),
            },
        );
        kernel.set_identity_config(self.selected.config())
    }

    /// Whether `agent` may bind `uid` (see [`uid_binding::may_bind`]).
    pub fn may_bind(&self, agent: &str, uid: u32) -> Result<bool, uid_binding::BindRefused> {
        uid_binding::may_bind(agent, uid, self.selected.uid_owner(uid))
    }

    /// Arms what selectors can be armed, re-verifies changed executables and writes the kernel's
    /// selector configuration. Returns what changed, and whether the configuration was written.
    /// `probed` is what the host said about the selectors (see [`Selected::probe_plan`]); `None`
    /// when it answered about selectors a reload has replaced since, and nothing is done.
    pub fn arm_selectors(
        &mut self,
        kernel: &mut impl IdentityTables,
        registry: &mut impl TaskNumbers,
        probed: &Probed,
    ) -> Option<(ArmReport, anyhow::Result<()>)> {
        if !self.selected.is_current(probed) {
            return None;
        }
        let report = self.selected.arm_with(kernel, probed, |agent| AgentSlot {
            agent: agent_id(agent),
            mode: common::MODE_ENFORCE,
            task: registry.number(agent, UNVERIFIED_TASK),
            source: common::SOURCE_EXECUTABLE,
        });
        let config = kernel.set_identity_config(self.selected.config());
        Some((report, config))
    }

    /// What the next arming pass asks the host (run it with [`ProbePlan::run`], off the loop).
    pub fn arm_plan(&self, cgroup_root: &Path) -> ProbePlan {
        self.selected.probe_plan(cgroup_root)
    }

    /// Removes kernel selector entries no selector of the current set owns (left by the previous
    /// policy or a previous daemon); the cgroups of `run` tasks are not selectors'.
    pub fn remove_stale_selectors(&self, kernel: &mut impl IdentityTables) -> anyhow::Result<()> {
        let armed = self.selected.kernel_keys();
        for uid in kernel.uid_selectors()? {
            if !armed.uids.contains(&uid) {
                kernel.remove_uid_selector(uid)?;
            }
        }
        for key in kernel.exec_selectors()? {
            if !armed.files.contains(&key) {
                kernel.remove_exec_selector(key)?;
            }
        }
        for (id, slot) in kernel.agent_cgroups()? {
            let selector = matches!(slot.source, common::SOURCE_CGROUP | common::SOURCE_UNIT);
            if selector && !armed.cgroups.contains(&id) && !self.tasks.contains_key(&id) {
                kernel.remove_agent_cgroup(id)?;
            }
        }
        Ok(())
    }

    /// The kernel tags at exec and fork only, so a process that already runs a selected
    /// executable (or descends from one) when the selector is armed — daemon start, reload — is
    /// found here and tagged, every thread. Repeated until a pass finds nothing new: a child
    /// forked before its parent was tagged is caught by the next pass, one forked after inherits
    /// the tag in the kernel. Processes with an identity already keep it (except a uid one, which
    /// an executable selector outranks, as at exec). `snapshot` lists the host's processes (a
    /// blocking /proc walk: the caller decides where it runs). Returns processes tagged.
    pub fn tag_running_selected(
        &self,
        kernel: &mut impl IdentityTables,
        host: &impl procfs::ProcessView,
        policies: &PolicySet,
        registry: &impl TaskNumbers,
        mut snapshot: impl FnMut() -> Vec<HostProcess>,
    ) -> anyhow::Result<usize> {
        let files: HashMap<ExecFileKey, AgentSlot> =
            kernel.exec_selector_entries()?.into_iter().collect();
        if files.is_empty() {
            return Ok(0);
        }
        let mut done: HashMap<u32, AgentSlot> = HashMap::new();
        for _pass in 0..5 {
            let procs = snapshot();
            let found = {
                let kernel = &*kernel;
                plan_tags(&procs, &files, &done, |p| {
                    self.identify_in(
                        kernel,
                        policies,
                        registry,
                        p.pid,
                        p.cgroup.as_deref(),
                        || p.uid,
                    )
                    .is_none_or(|id| id.slot.source == common::SOURCE_UID)
                })
            };
            if found.is_empty() {
                break;
            }
            for (pid, slot) in found {
                for tid in host.threads(pid) {
                    kernel.tag_thread(tid, slot)?;
                }
                done.insert(pid, slot);
            }
        }
        Ok(done.len())
    }
}
