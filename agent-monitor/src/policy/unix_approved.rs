//! `[unix] allow` entries of an approved file (`<agent>.approved.toml`, written by ask mode's
//! `always` approvals of unix sockets) joining the agent's own `[unix]` section.

use crate::policy::unix::UnixRules;

/// Adds the approved file's `[unix] allow` names to the agent's `allow` list, each name once.
/// Only an agent that has an `allow` list gains them: for one with only
/// `unix.deny_known_daemons` an allow list would refuse every other socket, so ask mode does not
/// write such entries for it (docs/ask.md) and hand-written ones change nothing.
pub fn absorb(own: &mut Option<UnixRules>, approved: Option<UnixRules>) {
    let Some(extra) = approved.and_then(|a| a.allow) else {
        return;
    };
    let Some(list) = own.as_mut().and_then(|u| u.allow.as_mut()) else {
        return;
    };
    for rule in extra {
        if !list.iter().any(|r| r.name == rule.name) {
            list.push(rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::unix::UnixRule;

    fn rules(allow: Option<&[&str]>) -> Option<UnixRules> {
        Some(UnixRules {
            allow: allow.map(|a| {
                a.iter()
                    .map(|n| UnixRule {
                        name: n.to_string(),
                        line: 1,
                    })
                    .collect()
            }),
            deny_known_daemons: allow.is_none(),
        })
    }

    fn names(u: &Option<UnixRules>) -> Option<Vec<String>> {
        u.as_ref()?
            .allow()
            .map(|a| a.iter().map(|r| r.name().to_string()).collect())
    }

    #[test]
    fn approved_names_join_the_allow_list_once() {
        let mut own = rules(Some(&["/run/a.sock"]));
        absorb(&mut own, rules(Some(&["/run/b.sock", "/run/a.sock"])));
        assert_eq!(
            names(&own),
            Some(vec!["/run/a.sock".to_string(), "/run/b.sock".to_string()])
        );
        absorb(&mut own, None);
        assert_eq!(names(&own).map(|n| n.len()), Some(2));
    }

    #[test]
    fn an_agent_without_an_allow_list_is_not_given_one() {
        let mut known_only = rules(None);
        absorb(&mut known_only, rules(Some(&["/run/b.sock"])));
        assert_eq!(names(&known_only), None);
        assert!(known_only.unwrap().deny_known_daemons());
        let mut none = None;
        absorb(&mut none, rules(Some(&["/run/b.sock"])));
        assert!(none.is_none());
    }
}
