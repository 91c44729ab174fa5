//! A dedicated uid *is* its agent: uids bound to an agent by `run --user` (beside the `uids`
//! selectors of the policies), the rule that decides whether a uid may be bound, and the processes
//! of a uid that run outside the agent when it is bound or selected (they are the agent from then
//! on, and the operator is told which).
//!
//! A binding is an entry of the kernel's uid selector map, like a `uids` selector: every hook looks
//! the current real uid up there, so a process that *becomes* the uid (cron, sshd, su, `systemd-run
//! --uid`, a setuid without exec) is the agent from its next action on, and is tagged at its next
//! exec so it stays the agent if it changes uid again.
//!
//! Lifetime: a binding outlives the `run` that made it (a job the agent scheduled runs later, as
//! the uid). It stays across reloads while the agent has a policy, and across daemon restarts (the
//! pinned map keeps it; the new daemon adopts every uid entry no policy selector claims, for the
//! agent it names, if that agent still has a policy). It ends when the agent's policy is removed,
//! when a policy's `uids` selector claims the uid (the policy file outranks a binding; a warning
//! says so), or with `daemon --uninstall`.

use std::collections::BTreeMap;

use agent_monitor_common::AgentSlot;

/// One uid bound to an agent by `run --user`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub agent: String,
    /// The identity its processes get (the agent's `default` task, source uid).
    pub slot: AgentSlot,
    /// How it came: "`run --user` (pid 812)", "adopted from the previous daemon".
    pub origin: String,
}

/// Bound uids, by uid.
pub type Bindings = BTreeMap<u32, Binding>;

/// Who already owns a uid, for the binding rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner<'a> {
    /// A `uids` selector of a policy: agent and `file:line:col`.
    Selector { agent: &'a str, at: &'a str },
    /// A binding.
    Bound(&'a Binding),
}

/// Why a uid may not be bound to an agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindRefused {
    #[error(
        "`run --user` of uid 0 (root) is refused: binding root would make the daemon, PID 1 \
         and the operator's shell the agent; give the agent its own dedicated uid (or run it \
         as root without --user)"
    )]
    Root,
    #[error(
        "uid {uid} is agent {holder:?}'s (its `uids` selector at {at}): a uid is one agent; \
         give agent {agent:?} a dedicated uid of its own"
    )]
    Selected {
        uid: u32,
        holder: String,
        at: String,
        agent: String,
    },
    #[error(
        "uid {uid} is bound to agent {holder:?} ({origin}): a uid is one agent; give agent \
         {agent:?} a dedicated uid of its own"
    )]
    Bound {
        uid: u32,
        holder: String,
        origin: String,
        agent: String,
    },
}

/// Whether `agent` may bind `uid`, given its current owner: `Ok(true)` when it is to be armed,
/// `Ok(false)` when the agent already holds it, `Err` (it says why) when it may not.
pub fn may_bind(agent: &str, uid: u32, owner: Option<Owner<'_>>) -> Result<bool, BindRefused> {
    if uid == 0 {
        return Err(BindRefused::Root);
    }
    let holder = owner.as_ref().map(|o| match o {
        Owner::Selector { agent, .. } => *agent,
        Owner::Bound(b) => b.agent.as_str(),
    });
    if holder == Some(agent) {
        return Ok(false);
    }
    match owner {
        None => Ok(true),
        Some(Owner::Selector { agent: other, at }) => Err(BindRefused::Selected {
            uid,
            holder: other.to_string(),
            at: at.to_string(),
            agent: agent.to_string(),
        }),
        Some(Owner::Bound(b)) => Err(BindRefused::Bound {
            uid,
            holder: b.agent.clone(),
            origin: b.origin.clone(),
            agent: agent.to_string(),
        }),
    }
}

/// A process of a uid that runs outside the agent: pid, command name, cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outsider {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
}

/// Processes whose real uid is `uid` and that are not in one of `agent`'s own `run` cgroups.
pub fn outsiders(uid: u32, agent: &str) -> Vec<Outsider> {
    let mut out = Vec::new();
    use crate::identity::procfs;
    for (pid, _) in procfs::processes() {
        if procfs::credentials(pid).map(|c| c.uid) != Some(uid) {
            continue;
        }
        let cgroup = procfs::cgroup_v2(pid).unwrap_or_default();
        if crate::identity::peer::run_cgroup_identity(&cgroup).is_some_and(|(a, _)| a == agent) {
            continue;
        }
        let comm = procfs::comm(pid).unwrap_or_default();
        out.push(Outsider { pid, comm, cgroup });
    }
    out
}

/// The warning for processes of `uid` outside `agent` (None when there are none), naming a few
/// and saying what the model makes of them.
pub fn outsiders_warning(uid: u32, agent: &str, how: &str, found: &[Outsider]) -> Option<String> {
    const NAMED: usize = 5;
    if found.is_empty() {
        return None;
    }
    let named: Vec<String> = found
        .iter()
        .take(NAMED)
        .map(|o| format!("pid {} {} (cgroup {})", o.pid, o.comm, o.cgroup))
        .collect();
    Some(format!(
        "uid {uid} ({how}) also runs {} process(es) outside agent {agent}: {}{}; a uid is its \
         agent, so they are agent {agent} from now on: their connects and execs are judged by its \
         allowlist (refused in enforce mode unless allowed) and reported as {agent}. Give the \
         agent a uid nothing else uses",
        found.len(),
        named.join(", "),
        if found.len() > NAMED { ", …" } else { "" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(agent: &str) -> Binding {
        Binding {
            agent: agent.into(),
            slot: AgentSlot {
                agent: 1,
                mode: 0,
                task: 0,
                source: 0,
            },
            origin: "`run --user` (pid 7)".into(),
        }
    }

    #[test]
    fn a_uid_is_one_agent() {
        assert_eq!(may_bind("a", 1001, None), Ok(true));
        assert!(
            may_bind("a", 0, None)
                .unwrap_err()
                .to_string()
                .contains("root")
        );
        let mine = binding("a");
        assert_eq!(may_bind("a", 1001, Some(Owner::Bound(&mine))), Ok(false));
        let theirs = binding("b");
        let e = may_bind("a", 1001, Some(Owner::Bound(&theirs)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bound to agent \"b\" (`run --user` (pid 7))"),
            "{e}"
        );
        let sel = Owner::Selector {
            agent: "b",
            at: "b.toml:3:9",
        };
        let e = may_bind("a", 1001, Some(sel)).unwrap_err().to_string();
        assert!(
            e.contains("agent \"b\"'s (its `uids` selector at b.toml:3:9)"),
            "{e}"
        );
        let own = Owner::Selector {
            agent: "a",
            at: "a.toml:3:9",
        };
        assert_eq!(may_bind("a", 1001, Some(own)), Ok(false));
    }

    #[test]
    fn the_warning_names_a_few_processes_and_the_consequence() {
        assert_eq!(outsiders_warning(7, "a", "bound", &[]), None);
        let many: Vec<Outsider> = (1..=7)
            .map(|pid| Outsider {
                pid,
                comm: "sleep".into(),
                cgroup: "/user.slice".into(),
            })
            .collect();
        let w = outsiders_warning(1001, "coder", "bound by `run --user`", &many).unwrap();
        assert!(w.starts_with("uid 1001 (bound by `run --user`) also runs 7 process(es) outside agent coder: pid 1 sleep (cgroup /user.slice)"), "{w}");
        assert!(w.contains("pid 5 sleep") && !w.contains("pid 6 sleep") && w.contains(", …;"));
        assert!(w.contains("they are agent coder from now on"));
    }

    #[test]
    fn this_process_is_an_outsider_of_its_uid() {
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        assert!(
            outsiders(me, "nobody-agent")
                .iter()
                .any(|o| o.pid == std::process::id())
        );
    }
}
