//! The decision for one open of a guarded file: which agent opened it, whether that agent's
//! `[files]` denies this file (by device and inode, or by a denied directory it lies in), and
//! what the agent's mode makes of it. Pure: the guard thread feeds it what the kernel said.

use std::collections::HashMap;
use std::sync::Arc;

use crate::policy::model::Mode;

/// A file as the kernel knows it: (device, inode). Names do not matter: hard links and bind
/// mounts of a file share it.
pub type FileId = (u64, u64);

/// One agent's reason to refuse a file: the agent and the rule, as a report names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub agent: Arc<str>,
    pub rule: Arc<str>,
}

/// What to answer the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ruling {
    /// Outside every agent, or not a file this agent's `[files]` names: allowed, not reported.
    Allow,
    /// Enforce mode: the open fails with EPERM; reported.
    Deny { agent: Arc<str>, rule: Arc<str> },
    /// Alert mode: the open proceeds; reported.
    Alert { agent: Arc<str>, rule: Arc<str> },
    /// Ask mode: the open waits for the daemon's decision (see `holds.rs`); refused without one.
    Ask { agent: Arc<str>, rule: Arc<str> },
}

/// Every guarded file and directory with the agents it is denied to, and each agent's mode: the
/// snapshot the guard thread judges from, replaced whole at each reload.
#[derive(Clone, Debug, Default)]
pub struct Judge {
    modes: HashMap<Arc<str>, Mode>,
    denied: HashMap<FileId, Vec<Denial>>,
}

impl Judge {
    pub fn new(modes: HashMap<Arc<str>, Mode>) -> Judge {
        Judge {
            modes,
            denied: HashMap::new(),
        }
    }

    /// Records that `id` is denied by `denial` (once per agent: the first rule names it).
    pub fn add(&mut self, id: FileId, denial: Denial) {
        let list = self.denied.entry(id).or_default();
        if !list.iter().any(|d| d.agent == denial.agent) {
            list.push(denial);
        }
    }

    pub fn denials(&self, id: FileId) -> &[Denial] {
        self.denied.get(&id).map_or(&[], Vec::as_slice)
    }

    #[cfg(test)]
    pub fn contains(&self, id: FileId) -> bool {
        self.denied.contains_key(&id)
    }

    /// Whether any agent has a `[files]` rule (no rule: no marks, no events).
    pub fn agents(&self) -> usize {
        self.modes.len()
    }

    /// The ruling for an open of `file` by `agent` (None: outside every agent). `ancestors`
    /// gives the directories the file was opened in, nearest first; it is asked only when the
    /// file itself is not denied to the agent (a file created in a denied directory after the
    /// guard marked it).
    pub fn judge(
        &self,
        agent: Option<&str>,
        file: FileId,
        ancestors: impl FnOnce() -> Vec<FileId>,
    ) -> Ruling {
        let Some(agent) = agent else {
            return Ruling::Allow;
        };
        let Some((name, mode)) = self.modes.get_key_value(agent) else {
            return Ruling::Allow;
        };
        let for_agent = |id: FileId| {
            self.denials(id)
                .iter()
                .find(|d| *d.agent == *agent)
                .map(|d| d.rule.clone())
        };
        let rule = for_agent(file).or_else(|| ancestors().into_iter().find_map(for_agent));
        match (rule, mode) {
            (None, _) => Ruling::Allow,
            (Some(rule), Mode::Enforce) => Ruling::Deny {
                agent: name.clone(),
                rule,
            },
            (Some(rule), Mode::Alert) => Ruling::Alert {
                agent: name.clone(),
                rule,
            },
            // Held: the guard thread keeps the event and goes on answering others.
            (Some(rule), Mode::Ask) => Ruling::Ask {
                agent: name.clone(),
                rule,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge() -> Judge {
        let mut modes = HashMap::new();
        modes.insert(Arc::from("coder"), Mode::Enforce);
        modes.insert(Arc::from("watcher"), Mode::Alert);
        modes.insert(Arc::from("free"), Mode::Enforce);
        modes.insert(Arc::from("asker"), Mode::Ask);
        let mut j = Judge::new(modes);
        let deny = |agent: &str, rule: &str| Denial {
            agent: Arc::from(agent),
            rule: Arc::from(rule),
        };
        j.add(
            (1, 10),
            deny("coder", "files.deny \"/etc/shadow\" (line 3)"),
        );
        j.add(
            (1, 10),
            deny("watcher", "files.deny_known_secrets \"/etc/shadow\""),
        );
        j.add((1, 10), deny("coder", "a second rule for the same file"));
        j.add((2, 20), deny("coder", "files.deny \"/root/.aws\" (line 4)"));
        j
    }

    #[test]
    fn outside_every_agent_is_allowed_without_looking_further() {
        let j = judge();
        let ruling = j.judge(None, (1, 10), || panic!("no ancestors needed"));
        assert_eq!(ruling, Ruling::Allow);
        let ruling = j.judge(Some("no-files-rules"), (1, 10), || panic!("none"));
        assert_eq!(ruling, Ruling::Allow);
    }

    #[test]
    fn enforce_denies_alert_reports_with_the_rule() {
        let j = judge();
        assert_eq!(
            j.judge(Some("coder"), (1, 10), Vec::new),
            Ruling::Deny {
                agent: "coder".into(),
                rule: "files.deny \"/etc/shadow\" (line 3)".into()
            }
        );
        assert_eq!(
            j.judge(Some("watcher"), (1, 10), Vec::new),
            Ruling::Alert {
                agent: "watcher".into(),
                rule: "files.deny_known_secrets \"/etc/shadow\"".into()
            }
        );
        assert_eq!(j.denials((1, 10)).len(), 2, "one denial per agent");
    }

    #[test]
    fn ask_mode_holds_what_it_denies_and_nothing_else() {
        let mut j = judge();
        j.add(
            (1, 10),
            Denial {
                agent: Arc::from("asker"),
                rule: Arc::from("files.deny \"/etc/shadow\" (line 2)"),
            },
        );
        assert_eq!(
            j.judge(Some("asker"), (1, 10), Vec::new),
            Ruling::Ask {
                agent: "asker".into(),
                rule: "files.deny \"/etc/shadow\" (line 2)".into()
            }
        );
        assert_eq!(j.judge(Some("asker"), (2, 20), Vec::new), Ruling::Allow);
    }

    #[test]
    fn a_file_is_judged_for_its_own_agent_only() {
        let j = judge();
        // /root/.aws is denied to coder, not to watcher or free.
        assert_eq!(j.judge(Some("watcher"), (2, 20), Vec::new), Ruling::Allow);
        assert_eq!(j.judge(Some("free"), (2, 20), Vec::new), Ruling::Allow);
    }

    #[test]
    fn a_new_file_in_a_denied_directory_is_denied_by_the_directory() {
        let j = judge();
        let ruling = j.judge(Some("coder"), (2, 99), || vec![(2, 20), (2, 2)]);
        assert_eq!(
            ruling,
            Ruling::Deny {
                agent: "coder".into(),
                rule: "files.deny \"/root/.aws\" (line 4)".into()
            }
        );
        assert_eq!(
            j.judge(Some("coder"), (3, 1), || vec![(3, 2), (3, 3)]),
            Ruling::Allow
        );
    }
}
