//! When the unix-socket hooks are attached: only while something needs them, so that a host
//! whose policies have no `[unix]` section runs no unix-socket program at all. The kernel side
//! (attach, detach, where) is `Kernel::set_unix_hooks`; this is the daemon's decision.

use super::*;

/// Why the unix-socket hooks must be attached while `set` is in force and `running` names the
/// agents of the running tasks; `None` when nothing needs them. They are needed for every
/// agent whose policy has a `[unix]` section, and for a running agent that has no policy any
/// more: its processes are refused every action, unix connects included.
pub(super) fn unix_hooks_needed<'a>(
    set: &PolicySet,
    running: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let with_unix: Vec<&str> = set
        .iter()
        .filter(|p| p.unix().is_some())
        .map(|p| p.agent())
        .collect();
    if !with_unix.is_empty() {
        return Some(format!("[unix] sections of {}", with_unix.join(", ")));
    }
    let mut orphans: Vec<&str> = running
        .into_iter()
        .filter(|a| set.get(a).is_none())
        .collect();
    orphans.sort_unstable();
    orphans.dedup();
    if !orphans.is_empty() {
        return Some(format!(
            "running agents without a policy, refused everything: {}",
            orphans.join(", ")
        ));
    }
    None
}

impl Monitor {
    /// Before a switch to `staged`: attaches the unix-socket hooks if its `[unix]` sections need
    /// them, so they are in force from the switch on (agents without an entry pass unjudged
    /// until then). Never detaches: the set in force may still need them.
    pub(super) fn unix_hooks_before_switch(&mut self, staged: &PolicySet) {
        if let Some(why) = unix_hooks_needed(staged, []) {
            self.set_unix_hooks(Some(&why));
        }
    }

    /// After a switch: attaches or detaches the unix-socket hooks for the set now in force and
    /// the running tasks.
    pub(super) fn unix_hooks_after_switch(&mut self) {
        let why = unix_hooks_needed(
            self.generations.live(),
            self.ident.tasks().map(|(_, t)| t.agent.as_str()),
        );
        self.set_unix_hooks(why.as_deref());
    }

    /// A failure is logged, not fatal: the policies stay in force for every other action, and
    /// `warn_unenforced_unix` says that `[unix]` is not enforced.
    fn set_unix_hooks(&mut self, why: Option<&str>) {
        if let Err(e) = self.kernel.set_unix_hooks(why) {
            tracing::error!("unix-socket hooks: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::unix_hooks_needed;
    use crate::policy::{Policy, PolicySet};

    fn set(policies: &[&str]) -> PolicySet {
        PolicySet::new(
            policies
                .iter()
                .map(|t| Policy::parse(t, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}")))
                .collect(),
        )
        .expect("distinct agents")
    }

    const PLAIN: &str = "agent = \"plain\"\n[network]\nallow = []\n";
    const UNIX: &str = "agent = \"sockets\"\n[unix]\nallow = [\"/run/a.sock\"]\n";

    #[test]
    fn no_unix_section_and_no_orphan_needs_no_hook() {
        assert_eq!(unix_hooks_needed(&set(&[PLAIN]), ["plain"]), None);
        assert_eq!(unix_hooks_needed(&set(&[]), []), None);
    }

    #[test]
    fn a_unix_section_needs_the_hooks_and_names_its_agent() {
        let why = unix_hooks_needed(&set(&[PLAIN, UNIX]), []).expect("needed");
        assert!(why.contains("sockets") && !why.contains("plain"), "{why}");
        let why = unix_hooks_needed(
            &set(&["agent = \"d\"\nunix.deny_known_daemons = true\n"]),
            [],
        )
        .expect("needed");
        assert!(why.contains('d'), "{why}");
    }

    #[test]
    fn a_running_agent_without_a_policy_keeps_them_attached() {
        let why = unix_hooks_needed(&set(&[PLAIN]), ["plain", "gone", "gone"]).expect("needed");
        assert!(why.contains("gone") && !why.contains("plain"), "{why}");
        assert_eq!(why.matches("gone").count(), 1, "{why}");
    }
}
