//! The request-rule warnings `policy check` prints (`policy/request_lint.rs`: network entries
//! that do not do what they seem next to `[[network.http]]`/`[[network.tls]]` rules), also logged
//! by the daemon, so an operator who only reads the journal sees them: each once per load of a
//! policy set (start, and every reload that changes it), as a warning notice naming file:line.

use crate::output::journald::message_id;
use crate::output::notice::{Level, Notice};
use crate::policy::PolicySet;

/// Remembers the set whose warnings were last logged.
#[derive(Default)]
pub struct RequestWarnings {
    logged_for: Option<PolicySet>,
}

impl RequestWarnings {
    /// The notices to send for `set` now that it is in force: one per warning, unless `set` is
    /// the one whose warnings were logged last (a reload that changed nothing).
    pub fn for_load(&mut self, set: &PolicySet) -> Vec<Notice> {
        if self.logged_for.as_ref() == Some(set) {
            return Vec::new();
        }
        self.logged_for = Some(set.clone());
        set.iter()
            .flat_map(|policy| {
                let file = policy.origin().display().to_string();
                crate::policy::request_lint::policy_warnings(policy)
                    .into_iter()
                    .map(move |(line, warning)| {
                        Notice::new(
                            message_id::POLICY_REQUEST_WARNING,
                            Level::Warning,
                            format!("{file}:{line}: warning: {warning}"),
                        )
                        .field("POLICY_FILE", &file)
                        .field("POLICY_LINE", line)
                        .field("AGENT", policy.agent())
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PolicySet {
        let policy = crate::policy::Policy::parse(text, std::path::Path::new("/p/a.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        PolicySet::new(vec![policy]).expect("a valid set")
    }

    const WARNED: &str = r#"agent = "a"
[network]
allow = ["example.org:443"]

[[network.tls]]
host = "pypi.org"
port = 443
"#;

    #[test]
    fn each_warning_is_logged_once_per_changed_load_with_its_place() {
        let mut log = RequestWarnings::default();
        let first = log.for_load(&set(WARNED));
        assert_eq!(first.len(), 1, "{first:?}");
        let n = &first[0];
        assert_eq!(n.level, Level::Warning);
        assert!(
            n.message
                .starts_with("/p/a.toml:3: warning: network.allow \"example.org:443\""),
            "{}",
            n.message
        );
        assert!(n.fields.contains(&("POLICY_LINE", "3".to_string())));
        // A reload of the same policy says nothing again; a changed one says it again.
        assert!(log.for_load(&set(WARNED)).is_empty());
        let changed = WARNED.replace("pypi.org", "files.pythonhosted.org");
        assert_eq!(log.for_load(&set(&changed)).len(), 1);
        // A policy without such entries gives none.
        assert!(log.for_load(&set("agent = \"a\"\n")).is_empty());
    }
}
