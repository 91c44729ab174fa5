//! Which agent a thread that opened a guarded file belongs to, as far as the guard thread can tell
//! without the daemon's event loop: `run`'s (agent, task) cgroups by their path, the cgroup and
//! systemd-unit selectors as resolved to cgroups, and the uid selectors and `run --user` bindings
//! (the kernel's order, less the per-thread tags of executable selectors: see docs/files.md).

use std::collections::HashMap;

use crate::identity::peer::run_cgroup_identity;
use crate::identity::procfs::ProcessView;
use crate::identity::selected::{ArmState, Selected};
use crate::policy::selectors::SelectorKind;

/// Who opened a guarded file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opener {
    pub agent: String,
    /// The task of a `run` agent (its cgroup's name); None for selector agents, whose task the
    /// daemon knows.
    pub task: Option<String>,
}

/// The selectors in force, copied from the identity directory whenever they change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Roster {
    /// (cgroup path below the root, depth, agent): a process at or below the cgroup.
    cgroups: Vec<(String, u32, String)>,
    /// uid → agent.
    uids: HashMap<u32, String>,
    /// Stable agent id (`identity::agent_id`) → agent, for the threads' tags.
    names: HashMap<u32, String>,
}

impl Roster {
    /// The armed cgroup (and unit) selectors and the active uid selectors and bindings;
    /// `agents` names the agents a thread's tag may stand for.
    pub fn from_selected<'a>(
        selected: &Selected,
        agents: impl IntoIterator<Item = &'a str>,
    ) -> Roster {
        let mut roster = Roster {
            names: agents
                .into_iter()
                .map(|a| (crate::identity::agent_id(a), a.to_string()))
                .collect(),
            ..Roster::default()
        };
        for a in &selected.all {
            match &a.state {
                ArmState::Cgroup(cg) => {
                    roster
                        .cgroups
                        .push((cg.rel.clone(), cg.level, a.agent.clone()));
                }
                ArmState::Active if a.kind == SelectorKind::Uid => {
                    if let Ok(uid) = a.value.parse::<u32>() {
                        roster.uids.insert(uid, a.agent.clone());
                    }
                }
                _ => {}
            }
        }
        for (uid, b) in &selected.bound {
            roster.uids.entry(*uid).or_insert_with(|| b.agent.clone());
        }
        roster
    }

    /// The agent of thread `tid` (None: outside every agent, or gone) and, for `run`'s agents,
    /// the task its cgroup names: read while the opener waits, because a short-lived opener has
    /// no cgroup left when the daemon looks. `tag` reads the thread's tag (the stable agent id an
    /// executable selector gave it).
    pub fn opener(
        &self,
        host: &impl ProcessView,
        tag: impl FnOnce(u32) -> Option<u32>,
        tid: u32,
    ) -> Option<Opener> {
        let cgroup = host.cgroup(tid);
        if let Some((agent, task)) = cgroup.as_deref().and_then(run_cgroup_identity) {
            return Some(Opener {
                agent: agent.to_string(),
                task: Some(task.to_string()),
            });
        }
        self.selected_agent(cgroup.as_deref(), host, tag, tid)
            .map(|agent| Opener { agent, task: None })
    }

    fn selected_agent(
        &self,
        cgroup: Option<&str>,
        host: &impl ProcessView,
        tag: impl FnOnce(u32) -> Option<u32>,
        tid: u32,
    ) -> Option<String> {
        if let Some(name) = tag(tid).and_then(|id| self.names.get(&id)) {
            return Some(name.clone());
        }
        if let Some(c) = cgroup
            && let Some((_, _, agent)) = self
                .cgroups
                .iter()
                .filter(|(rel, _, _)| c == rel || c.starts_with(&format!("{rel}/")))
                .max_by_key(|(_, level, _)| *level)
        {
            return Some(agent.clone());
        }
        if self.uids.is_empty() {
            return None;
        }
        host.uid(tid).and_then(|uid| self.uids.get(&uid).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host {
        cgroup: Option<&'static str>,
        uid: u32,
    }

    impl ProcessView for Host {
        fn cgroup(&self, _: u32) -> Option<String> {
            self.cgroup.map(str::to_string)
        }
        fn uid(&self, _: u32) -> Option<u32> {
            Some(self.uid)
        }
        fn args(&self, _: u32) -> Vec<String> {
            Vec::new()
        }
        fn threads(&self, _: u32) -> Vec<u32> {
            Vec::new()
        }
    }

    fn roster() -> Roster {
        let mut r = Roster::default();
        r.cgroups.push(("/agents".into(), 1, "outer".into()));
        r.cgroups.push(("/agents/inner".into(), 2, "inner".into()));
        r.uids.insert(1500, "by-uid".into());
        r.names
            .insert(crate::identity::agent_id("tagged"), "tagged".into());
        r
    }

    fn untagged(_: u32) -> Option<u32> {
        None
    }

    #[test]
    fn run_cgroups_come_first_then_the_tag_then_the_deepest_selected_cgroup_then_the_uid() {
        let r = roster();
        let tagged = |_| Some(crate::identity::agent_id("tagged"));
        let in_inner = Host {
            cgroup: Some("/agents/inner/x.scope"),
            uid: 1500,
        };
        assert_eq!(
            r.opener(&in_inner, tagged, 7).map(|o| o.agent).as_deref(),
            Some("tagged")
        );
        let in_run = Host {
            cgroup: Some("/agent-monitor/coder/t1"),
            uid: 1500,
        };
        assert_eq!(
            r.opener(&in_run, tagged, 7).map(|o| o.agent).as_deref(),
            Some("coder")
        );
        assert_eq!(
            r.opener(&in_run, tagged, 7).and_then(|o| o.task).as_deref(),
            Some("t1"),
            "the task is read with the agent, while the opener waits"
        );
        // A tag of an agent no policy names any more is no identity.
        assert_eq!(
            r.opener(&in_run, |_| Some(1), 7)
                .map(|o| o.agent)
                .as_deref(),
            Some("coder")
        );
        let run = Host {
            cgroup: Some("/agent-monitor/coder/t1"),
            uid: 1500,
        };
        assert_eq!(
            r.opener(&run, untagged, 7).map(|o| o.agent).as_deref(),
            Some("coder")
        );
        let inner = Host {
            cgroup: Some("/agents/inner/x.scope"),
            uid: 1500,
        };
        assert_eq!(
            r.opener(&inner, untagged, 7).map(|o| o.agent).as_deref(),
            Some("inner")
        );
        let outer = Host {
            cgroup: Some("/agents/innerx"),
            uid: 0,
        };
        assert_eq!(
            r.opener(&outer, untagged, 7).map(|o| o.agent).as_deref(),
            Some("outer")
        );
        let uid = Host {
            cgroup: Some("/user.slice"),
            uid: 1500,
        };
        assert_eq!(
            r.opener(&uid, untagged, 7).map(|o| o.agent).as_deref(),
            Some("by-uid")
        );
        let host = Host {
            cgroup: Some("/user.slice"),
            uid: 1000,
        };
        assert_eq!(r.opener(&host, untagged, 7).map(|o| o.agent), None);
        let gone = Host {
            cgroup: None,
            uid: 1000,
        };
        assert_eq!(
            Roster::default()
                .opener(&gone, untagged, 7)
                .map(|o| o.agent),
            None
        );
    }

    #[test]
    fn a_roster_survives_the_wire_whole() {
        // The file-guard process judges from the roster the daemon sent it as JSON.
        let r = roster();
        let message = super::super::wire::ToGuard::Roster { roster: r.clone() };
        let text = serde_json::to_string(&message).expect("serializes");
        let back = match serde_json::from_str(&text).expect("parses") {
            super::super::wire::ToGuard::Roster { roster } => roster,
            other => panic!("{other:?}"),
        };
        assert_eq!(back, r);
        let tagged = |_| Some(crate::identity::agent_id("tagged"));
        let host = Host {
            cgroup: Some("/user.slice"),
            uid: 1000,
        };
        assert_eq!(
            back.opener(&host, tagged, 7).map(|o| o.agent).as_deref(),
            Some("tagged")
        );
    }
}
