//! `[unix]`: the raw TOML shape and its validation. Names are judged by the kernel exactly as
//! written, so an entry must be a name a caller would give: an absolute, normalised path, or
//! `@name` for an abstract socket.

use agent_monitor_common::UNIX_PATH_LEN;
use serde::Deserialize;
use toml::Spanned;

use super::{Issue, LineIndex, Reason};
use crate::policy::unix::{KNOWN_DAEMONS, UnixRule, UnixRules};

/// `[unix]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUnix {
    #[serde(default)]
    allow: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    deny_known_daemons: Option<Spanned<bool>>,
}

/// One socket name → the name the kernel is given, or why it can never match one.
pub(crate) fn parse_unix_name(text: &str) -> Result<String, Reason> {
    if text.contains('*') {
        return Err(Reason::UnixGlob);
    }
    if let Some(name) = text.strip_prefix('@') {
        if name.is_empty() {
            return Err(Reason::UnixAbstractEmpty);
        }
        // An abstract name may hold any byte (NULs too): only its length is limited.
        if name.len() + 1 > UNIX_PATH_LEN {
            return Err(Reason::PathTooLong {
                len: name.len() + 1,
                max: UNIX_PATH_LEN,
            });
        }
        return Ok(text.to_string());
    }
    if text.contains('\0') {
        return Err(Reason::NulByte);
    }
    if !text.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    if text.contains("//")
        || text.contains("/./")
        || text.contains("/../")
        || text.ends_with("/.")
        || text.ends_with("/..")
    {
        return Err(Reason::NotNormalised);
    }
    if text.ends_with('/') {
        return Err(Reason::TrailingSlash);
    }
    if text.len() > UNIX_PATH_LEN {
        return Err(Reason::PathTooLong {
            len: text.len(),
            max: UNIX_PATH_LEN,
        });
    }
    Ok(text.to_string())
}

/// Validates `[unix]`; every problem goes to `issues` with its place.
pub(crate) fn parse_unix(
    raw: Spanned<RawUnix>,
    lines: &LineIndex,
    issues: &mut Vec<Issue>,
) -> Option<UnixRules> {
    let section_at = raw.span().start;
    let raw = raw.into_inner();
    let deny_known_daemons = raw
        .deny_known_daemons
        .as_ref()
        .is_some_and(|d| *d.get_ref());
    if raw.allow.is_none() && !deny_known_daemons {
        issues.push(Issue::Value {
            at: lines.location(section_at),
            field: "unix".into(),
            value: String::new(),
            reason: Reason::UnixEmptySection,
        });
        return None;
    }
    let mut bad = false;
    let allow = raw.allow.map(|entries| {
        let mut rules = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let mut issue = |reason| {
                issues.push(Issue::Value {
                    at: lines.location(entry.span().start),
                    field: format!("unix.allow[{i}]"),
                    value: entry.get_ref().clone(),
                    reason,
                })
            };
            match parse_unix_name(entry.get_ref()) {
                Ok(name) if deny_known_daemons && KNOWN_DAEMONS.contains(&name.as_str()) => {
                    bad = true;
                    issue(Reason::UnixAllowsKnownDaemon);
                }
                Ok(name) => rules.push(UnixRule {
                    name,
                    line: lines.line_col(entry.span().start).0,
                }),
                Err(reason) => {
                    bad = true;
                    issue(reason);
                }
            }
        }
        rules
    });
    (!bad).then_some(UnixRules {
        allow,
        deny_known_daemons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_caller_would_give_are_accepted() {
        for ok in ["/run/user/1000/bus", "@my-abstract", "@a\0b", "/s"] {
            assert_eq!(parse_unix_name(ok), Ok(ok.to_string()));
        }
    }

    #[test]
    fn names_the_kernel_would_never_be_given_are_refused_with_why() {
        let cases = [
            ("run/docker.sock", Reason::NotAbsolute),
            ("/run/../run/docker.sock", Reason::NotNormalised),
            ("/run//docker.sock", Reason::NotNormalised),
            ("/run/./docker.sock", Reason::NotNormalised),
            ("/run/", Reason::TrailingSlash),
            ("/run/*.sock", Reason::UnixGlob),
            ("@", Reason::UnixAbstractEmpty),
            ("/a\0b", Reason::NulByte),
        ];
        for (text, want) in cases {
            assert_eq!(parse_unix_name(text), Err(want), "{text:?}");
        }
        let long = format!("/{}", "a".repeat(UNIX_PATH_LEN));
        assert_eq!(
            parse_unix_name(&long),
            Err(Reason::PathTooLong {
                len: UNIX_PATH_LEN + 1,
                max: UNIX_PATH_LEN
            })
        );
        let fits = format!("/{}", "a".repeat(UNIX_PATH_LEN - 1));
        assert!(parse_unix_name(&fits).is_ok());
        let abstract_long = format!("@{}", "a".repeat(UNIX_PATH_LEN));
        assert!(parse_unix_name(&abstract_long).is_err());
    }
}
