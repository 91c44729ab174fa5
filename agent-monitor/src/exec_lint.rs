//! Warnings about exec rules that are valid but open a bypass the kernel cannot close: a rule
//! whose file or directory someone other than root can write (then anything can run under the
//! allowed name), and rules that allow an interpreter or the dynamic loader (then any code can
//! run without a further exec). `policy check` prints them and the daemon logs them at start.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::policy::PolicySet;

/// Who may write a path: its owner's uid and its permission bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub uid: u32,
    pub mode: u32,
}

/// Programs that run code they are given (an allowed one is a universal exec), by file name:
/// exact names, and prefixes for versioned names (`python3.11`, `ld-linux-x86-64.so.2`).
const INTERPRETERS: [&str; 9] = [
    "sh", "bash", "dash", "zsh", "ksh", "fish", "env", "busybox", "node",
];
const INTERPRETER_PREFIXES: [&str; 8] = [
    "python", "perl", "ruby", "php", "lua", "tclsh", "ld-linux", "ld-musl",
];

fn is_interpreter(name: &str) -> bool {
    INTERPRETERS.contains(&name)
        || name == "ld.so"
        || INTERPRETER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The warnings for one exec rule as written (`/usr/bin/git`, `/opt/tools/*`). `access` answers
/// for a path (None: it does not exist); `resolved` is the file an exact rule names once symlinks
/// are followed.
pub fn rule_warnings(
    rule: &str,
    resolved: Option<&str>,
    access: &dyn Fn(&Path) -> Option<Access>,
) -> Vec<String> {
    let glob = rule.ends_with('*');
    let rule_path = rule.trim_end_matches('*');
    let mut out = Vec::new();
    // A glob's files live in the directory its prefix names; an exact rule's file is itself.
    let start = if glob {
        match rule_path.rfind('/') {
            Some(i) => &rule_path[..i.max(1)],
            None => rule_path,
        }
    } else {
        rule_path
    };
    let mut path = Some(Path::new(start));
    while let Some(p) = path {
        if let Some(a) = access(p) {
            let writable_by_others = a.mode & 0o022 != 0 && a.mode & 0o1000 == 0;
            if a.uid != 0 || writable_by_others {
                out.push(format!(
                    "{} is writable by {}: whoever can write it can run any program as \"{rule}\"",
                    p.display(),
                    if a.uid != 0 {
                        format!("its owner (uid {})", a.uid)
                    } else {
                        "group or others".to_string()
                    }
                ));
                break;
            }
        }
        path = p.parent();
    }
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let names = [Some(name(rule_path)), resolved.map(name)];
    if !glob && names.iter().flatten().any(|n| is_interpreter(n)) {
        out.push(format!(
            "\"{rule}\" is an interpreter or loader: the agent can run any code through it \
             without another exec (allow it only if the agent needs it)"
        ));
    }
    if glob {
        let prefix = name(rule_path);
        // `python3*` covers python3.11; `p*` covers perl and python.
        let covers = |n: &str| {
            n.starts_with(&prefix) || (INTERPRETER_PREFIXES.contains(&n) && prefix.starts_with(n))
        };
        let examples: Vec<&str> = INTERPRETERS
            .iter()
            .chain(INTERPRETER_PREFIXES.iter())
            .copied()
            .filter(|n| covers(n))
            .take(3)
            .collect();
        if !examples.is_empty() {
            out.push(format!(
                "\"{rule}\" may allow interpreters (such as {}): the agent could run any code \
                 through them",
                examples.join(", ")
            ));
        }
    }
    out
}

/// Warnings for every exec rule of every policy, each prefixed with `file:line: warning:`.
pub fn warnings(set: &PolicySet) -> Vec<String> {
    // Rules share directories (thousands of files under one): each path is looked at once.
    let seen: RefCell<HashMap<PathBuf, Option<Access>>> = RefCell::default();
    let access = |p: &Path| {
        if let Some(known) = seen.borrow().get(p) {
            return *known;
        }
        let found = std::fs::symlink_metadata(p).ok().map(|m| Access {
            uid: m.uid(),
            // A symlink's own bits mean nothing (always 0777); who owns it is what counts.
            mode: if m.file_type().is_symlink() {
                0o755
            } else {
                m.mode()
            },
        });
        seen.borrow_mut().insert(p.to_path_buf(), found);
        found
    };
    let mut out = Vec::new();
    for policy in set {
        for rule in policy.exec() {
            let resolved = (!rule.prefix_glob())
                .then(|| std::fs::canonicalize(rule.path()).ok())
                .flatten()
                .map(|p| p.display().to_string());
            for w in rule_warnings(rule.text(), resolved.as_deref(), &access) {
                out.push(format!(
                    "{}:{}: warning: {w}",
                    policy.origin().display(),
                    rule.line()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(mode: u32) -> Option<Access> {
        Some(Access { uid: 0, mode })
    }

    #[test]
    fn root_owned_tool_is_fine() {
        let access = |_: &Path| root(0o755);
        assert!(rule_warnings("/usr/bin/git", None, &access).is_empty());
        assert!(rule_warnings("/opt/tools/lint-*", None, &access).is_empty());
    }

    #[test]
    fn writable_directories_are_named() {
        let access = |p: &Path| match p.to_str() {
            Some("/home/agent/bin") => Some(Access {
                uid: 1000,
                mode: 0o755,
            }),
            Some("/srv/shared") => root(0o777),
            Some("/tmp") => root(0o1777),
            _ => root(0o755),
        };
        let w = rule_warnings("/home/agent/bin/*", None, &access);
        assert!(
            w[0].contains("/home/agent/bin is writable by its owner (uid 1000)"),
            "{w:?}"
        );
        let w = rule_warnings("/srv/shared/tool", None, &access);
        assert!(
            w[0].contains("/srv/shared is writable by group or others"),
            "{w:?}"
        );
        // The sticky bit keeps others from replacing a root-owned file.
        assert!(rule_warnings("/tmp/x", None, &access).is_empty());
    }

    #[test]
    fn interpreters_are_named() {
        let access = |_: &Path| root(0o755);
        for p in [
            "/bin/sh",
            "/usr/bin/python3.11",
            "/usr/bin/env",
            "/lib64/ld-linux-x86-64.so.2",
        ] {
            let w = rule_warnings(p, None, &access);
            assert!(w.iter().any(|w| w.contains("interpreter")), "{p}: {w:?}");
        }
        // Through a symlink: the file it names decides.
        let w = rule_warnings("/usr/local/bin/tool", Some("/usr/bin/perl5.36"), &access);
        assert!(w.iter().any(|w| w.contains("interpreter")), "{w:?}");
        let w = rule_warnings("/usr/bin/python3*", None, &access);
        assert!(
            w.iter().any(|w| w.contains("may allow interpreters")),
            "{w:?}"
        );
        let w = rule_warnings("/usr/bin/*", None, &access);
        assert!(
            w.iter().any(|w| w.contains("may allow interpreters")),
            "{w:?}"
        );
        assert!(rule_warnings("/usr/bin/git*", None, &access).is_empty());
    }
}
