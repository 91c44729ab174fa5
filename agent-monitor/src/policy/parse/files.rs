//! `[files]` entries: absolute, normalised paths whose components may be `*`.

use serde::Deserialize;
use toml::Spanned;

use super::{Issue, LineIndex, Reason};
use crate::policy::files::{FileRule, FileRules};

/// Longest path the kernel resolves (PATH_MAX, terminating NUL included).
const PATH_MAX: usize = 4096;

/// `[files]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFiles {
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    deny_known_secrets: Option<Spanned<bool>>,
}

/// Checks one `files.deny` entry.
pub(crate) fn parse_file_entry(text: &str) -> Result<(), Reason> {
    if text.contains('\0') {
        return Err(Reason::NulByte);
    }
    if !text.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    if text == "/" {
        return Err(Reason::FileRoot);
    }
    if text.ends_with('/') {
        return Err(Reason::FileTrailingSlash);
    }
    if text.contains("//")
        || text.contains("/./")
        || text.contains("/../")
        || text.ends_with("/.")
        || text.ends_with("/..")
    {
        return Err(Reason::NotNormalised);
    }
    if text.split('/').any(|c| c.contains('*') && c != "*") {
        return Err(Reason::FilePartialGlob);
    }
    if text.len() >= PATH_MAX {
        return Err(Reason::PathTooLong {
            len: text.len(),
            max: PATH_MAX - 1,
        });
    }
    Ok(())
}

/// Validates `[files]`; problems are pushed to `issues` with their places.
pub(crate) fn parse_files(
    raw: Option<RawFiles>,
    lines: &LineIndex<'_>,
    issues: &mut Vec<Issue>,
) -> FileRules {
    let raw = raw.unwrap_or_default();
    let mut written = Vec::new();
    for (i, entry) in raw.deny.iter().enumerate() {
        match parse_file_entry(entry.get_ref()) {
            Ok(()) => written.push(FileRule {
                pattern: entry.get_ref().clone(),
                line: lines.line_col(entry.span().start).0,
                builtin: false,
            }),
            Err(reason) => issues.push(Issue::Value {
                at: lines.location(entry.span().start),
                field: format!("files.deny[{i}]"),
                value: entry.get_ref().clone(),
                reason,
            }),
        }
    }
    let known = raw.deny_known_secrets.is_some_and(|b| *b.get_ref());
    FileRules::new(written, known)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::Policy;

    #[test]
    fn good_entries() {
        for ok in [
            "/etc/shadow",
            "/root/.ssh",
            "/home/*/.aws",
            "/home/*/*/.env",
            "/srv/app/.env",
        ] {
            assert_eq!(parse_file_entry(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn bad_entries_say_what_was_expected() {
        let cases = [
            ("etc/shadow", Reason::NotAbsolute),
            ("/", Reason::FileRoot),
            ("/root/.ssh/", Reason::FileTrailingSlash),
            ("/root//.ssh", Reason::NotNormalised),
            ("/root/./.ssh", Reason::NotNormalised),
            ("/root/../etc", Reason::NotNormalised),
            ("/root/..", Reason::NotNormalised),
            ("/home/*dev/.aws", Reason::FilePartialGlob),
            ("/root/.ssh/id_*", Reason::FilePartialGlob),
            ("/a\0b", Reason::NulByte),
        ];
        for (text, reason) in cases {
            assert_eq!(parse_file_entry(text), Err(reason), "{text:?}");
        }
        let long = format!("/{}", "a".repeat(PATH_MAX));
        assert!(matches!(
            parse_file_entry(&long),
            Err(Reason::PathTooLong { .. })
        ));
    }

    #[test]
    fn the_section_parses_with_lines() {
        let text = "agent = \"coder\"\n[files]\ndeny = [\"/etc/shadow\",\n  \"/home/*/.aws\"]\ndeny_known_secrets = true\n";
        let p = Policy::parse(text, Path::new("p.toml")).expect("valid");
        let deny = p.files().deny();
        assert_eq!(deny[0].pattern(), "/etc/shadow");
        assert_eq!(deny[0].line(), 3);
        assert_eq!(deny[1].pattern(), "/home/*/.aws");
        assert_eq!(deny[1].line(), 4);
        assert!(deny[2].builtin());
        assert!(p.files().deny_known_secrets());
    }

    #[test]
    fn no_section_denies_nothing() {
        let p = Policy::parse("agent = \"coder\"\n", Path::new("p.toml")).expect("valid");
        assert!(p.files().is_empty());
        let off = "agent = \"coder\"\n[files]\ndeny_known_secrets = false\n";
        let p = Policy::parse(off, Path::new("p.toml")).expect("valid");
        assert!(p.files().is_empty());
    }

    #[test]
    fn errors_name_file_line_column() {
        let text = "agent = \"coder\"\n[files]\ndeny = [\"/ok\", \"relative/x\", \"/a/b*\"]\n";
        let err = Policy::parse(text, Path::new("p.toml")).expect_err("bad");
        let msg = err.to_string();
        assert_eq!(
            msg,
            "p.toml:3:16: files.deny[1] \"relative/x\": path must be absolute (start with /)\n\
             p.toml:3:30: files.deny[2] \"/a/b*\": '*' must be a whole path component, as in /home/*/.aws (any one name)"
        );
        let typo = "agent = \"coder\"\n[files]\ndenny = [\"/x\"]\n";
        let err = Policy::parse(typo, Path::new("p.toml")).expect_err("unknown key");
        assert!(
            err.to_string()
                .starts_with("p.toml:3:1: unknown field `denny`"),
            "{err}"
        );
        let wrong = "agent = \"coder\"\n[files]\ndeny_known_secrets = \"yes\"\n";
        let err = Policy::parse(wrong, Path::new("p.toml")).expect_err("type");
        assert!(err.to_string().starts_with("p.toml:3:22:"), "{err}");
    }
}
