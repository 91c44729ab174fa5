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

/// Validates `[unix]` (`text`: the file, to place a problem with the whole section); every
/// problem goes to `issues` with its place.
pub(crate) fn parse_unix(
    raw: RawUnix,
    text: &str,
    lines: &LineIndex,
    issues: &mut Vec<Issue>,
) -> Option<UnixRules> {
    // The section has no span of its own (a dotted `unix.key` has no table to carry one).
    let section_at = text
        .find("[unix]")
        .or_else(|| text.find("unix."))
        .unwrap_or(0);
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

    fn parse(text: &str) -> Result<crate::policy::Policy, String> {
        crate::policy::Policy::parse(text, std::path::Path::new("p/a.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_unix_section_parses_into_rules() {
        let p = parse("agent = \"a\"\n[unix]\nallow = [\"/run/user/1000/bus\", \"@x\"]\n")
            .expect("valid");
        let u = p.unix().expect("section");
        let names: Vec<&str> = u.allow().expect("allow").iter().map(|r| r.name()).collect();
        assert_eq!(names, ["/run/user/1000/bus", "@x"]);
        assert_eq!(u.allow().expect("allow")[1].line(), 3);
        assert!(!u.deny_known_daemons());
        let p = parse("agent = \"a\"\nunix.deny_known_daemons = true\n").expect("dotted key");
        assert!(p.unix().expect("section").deny_known_daemons());
        assert_eq!(parse("agent = \"a\"\n").expect("valid").unix(), None);
        let p = parse("agent = \"a\"\n[unix]\nallow = []\n").expect("valid");
        assert!(!p.check_unix("/tmp/any.sock").allowed);
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let err = parse("agent = \"a\"\n[unix]\nallow = [\n  \"/ok\",\n  \"rel.sock\",\n]\n")
            .expect_err("relative");
        assert_eq!(
            err,
            "p/a.toml:5:3: unix.allow[1] \"rel.sock\": path must be absolute (start with /)"
        );
        let err = parse("agent = \"a\"\n[unix]\ndeny_known_daemons = false\n").expect_err("empty");
        assert!(
            err.starts_with("p/a.toml:2:1: unix \"\": [unix] says nothing"),
            "{err}"
        );
        let err = parse(
            "agent = \"a\"\n[unix]\ndeny_known_daemons = true\nallow = [\"/var/run/docker.sock\"]\n",
        )
        .expect_err("conflict");
        assert!(err.starts_with("p/a.toml:4:10: unix.allow[0]"), "{err}");
        assert!(err.contains("deny_known_daemons"), "{err}");
        let err = parse("agent = \"a\"\n[unix]\nallow = [\"/a\"]\ndeny = [\"/b\"]\n")
            .expect_err("unknown key");
        assert!(err.starts_with("p/a.toml:4:1:"), "{err}");
    }
}
