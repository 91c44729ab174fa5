//! Warnings about exec rules that are valid but open a bypass the kernel cannot close: a rule
//! whose file or directory someone other than root can write or create (then anything can run
//! under the allowed name) — world-writable sticky directories such as `/tmp`, `/var/tmp` and
//! `/dev/shm` included, a file that does not exist yet, and symlinks that lead into such places —
//! rules that allow an interpreter or the dynamic loader (then any code can run without a
//! further exec), and rules that allow agent-monitor itself. `policy check` prints them and the
//! daemon logs them at start and on reload. They are warnings, not errors: the kernel enforces
//! such a rule exactly as written; what it allows is the operator's call, made knowingly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

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

/// Who other than root can put a program at `path`, as a sentence naming the culprit, or None.
/// With `any_name`, `path` is a glob's directory and every new name in it counts (a sticky bit
/// does not help: it keeps others from replacing entries, not from creating them). Without,
/// `path` is one file: a sticky directory keeps a root-owned file that exists in place, but the
/// name is anyone's once the file is gone (and `/tmp`, `/var/tmp`, `/dev/shm` are emptied), so
/// it is named too. `access` answers for a path (None: it does not exist).
pub fn writable_location(
    path: &Path,
    any_name: bool,
    access: &dyn Fn(&Path) -> Option<Access>,
) -> Option<String> {
    let writable = |a: Access| a.mode & 0o022 != 0;
    let sticky = |a: Access| a.mode & 0o1000 != 0;
    // Whether everything from here down to `path` exists.
    let mut below_missing = false;
    // The entry of the directory being looked at that leads to `path`.
    let mut child: Option<&Path> = None;
    let mut current = Some(path);
    while let Some(p) = current {
        let leaf = p == path;
        match access(p) {
            None => below_missing = true,
            Some(a) if a.uid != 0 => {
                return Some(format!(
                    "{} is writable by its owner (uid {})",
                    p.display(),
                    a.uid
                ));
            }
            Some(a) if writable(a) && sticky(a) && (!leaf || any_name) => {
                let sticky_dir = format!(
                    "{} is a sticky directory anyone can write (like /tmp)",
                    p.display()
                );
                return Some(match child {
                    _ if leaf => format!("{sticky_dir}: anyone can create a new file there"),
                    _ if below_missing => format!(
                        "{} does not exist, and {sticky_dir}: anyone can create it",
                        path.display()
                    ),
                    Some(c) => format!(
                        "{sticky_dir}: {} is root's now, but anyone can create it once it is gone",
                        c.display()
                    ),
                    None => sticky_dir,
                });
            }
            Some(a) if writable(a) => {
                return Some(if below_missing {
                    format!(
                        "{} does not exist, and {} is writable by group or others",
                        path.display(),
                        p.display()
                    )
                } else {
                    format!("{} is writable by group or others", p.display())
                });
            }
            Some(_) => {}
        }
        child = Some(p);
        current = p.parent();
    }
    None
}

/// The warnings for one exec rule as written (`/usr/bin/git`, `/opt/tools/*`). `resolved` is the
/// file an exact rule names once symlinks are followed (also when it does not exist: see
/// [`resolve`]); `daemon_exe` is agent-monitor's own binary; `access` answers for a path (None:
/// it does not exist).
pub fn rule_warnings(
    rule: &str,
    resolved: Option<&str>,
    daemon_exe: Option<&str>,
    access: &dyn Fn(&Path) -> Option<Access>,
) -> Vec<String> {
    let glob = rule.ends_with('*');
    let rule_path = rule.trim_end_matches('*');
    let mut out = Vec::new();
    let run_as = format!("whoever can write it can run any program as \"{rule}\"");
    // A glob's files live in the directory its prefix names; an exact rule's file is itself.
    if glob {
        let dir = match rule_path.rfind('/') {
            Some(i) => &rule_path[..i.max(1)],
            None => rule_path,
        };
        if let Some(w) = writable_location(Path::new(dir), true, access) {
            out.push(format!("{w}: {run_as}"));
        }
    } else if let Some(w) = writable_location(Path::new(rule_path), false, access) {
        out.push(format!("{w}: {run_as}"));
    } else if let Some(target) = resolved.filter(|r| *r != rule_path) {
        // The kernel allows the name, so whoever can put a file at the symlink's target runs it.
        if let Some(w) = writable_location(Path::new(target), false, access) {
            out.push(format!(
                "{rule_path} is a symlink to {target}, and {w}: {run_as}"
            ));
        }
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
    if let Some(me) = daemon_exe {
        let allows_me = if glob {
            me.starts_with(rule_path)
        } else {
            rule_path == me || resolved == Some(me)
        };
        if allows_me {
            out.push(format!(
                "\"{rule}\" allows agent-monitor itself ({me}): run by a root agent, it writes \
                 journald entries with the daemon's trusted fields (_UID=0, _EXE) and can start \
                 or stop daemons"
            ));
        }
    }
    out
}

/// Warnings about the entries below a glob's directory `dir` that the glob's `prefix` (the text
/// before `*`) covers: a symlink the glob allows by name whose target someone other than root
/// can write or create, and a subdirectory others can write (the glob covers everything below
/// it). `entries` are (path, symlink target resolved with [`resolve`], access of the entry).
pub fn glob_entry_warnings(
    rule: &str,
    entries: &[(PathBuf, Option<PathBuf>, Access)],
    access: &dyn Fn(&Path) -> Option<Access>,
) -> Vec<String> {
    let prefix = rule.trim_end_matches('*');
    let run_as = format!("whoever can write it can run any program as \"{rule}\"");
    let mut out = Vec::new();
    for (path, target, own) in entries {
        if !path.to_string_lossy().starts_with(prefix) {
            continue;
        }
        match target {
            Some(target) => {
                // A directory target: everything below it matches the glob by name.
                let any_name = access(target).is_some_and(|a| a.mode & 0o170000 == 0o040000);
                if let Some(w) = writable_location(target, any_name, access) {
                    out.push(format!(
                        "{} is a symlink to {}, and {w}: {run_as}",
                        path.display(),
                        target.display()
                    ));
                }
            }
            None if own.mode & 0o170000 == 0o040000 => {
                if let Some(w) = writable_location(path, true, &|p: &Path| {
                    if p == path { Some(*own) } else { None }
                }) {
                    out.push(format!("{w}: {run_as}"));
                }
            }
            None => {}
        }
    }
    out
}

/// `path` with every symlink followed, also when the final file (or a directory on the way) does
/// not exist yet: the missing rest is kept as written. `None` if a link cannot be read or the
/// links loop (more than 40, as the kernel allows).
pub fn resolve(path: &Path) -> Option<PathBuf> {
    let mut hops = 0;
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .rev()
        .collect();
    let mut done = PathBuf::from("/");
    while let Some(name) = pending.pop() {
        if name == ".." {
            done.pop();
            continue;
        }
        let next = done.join(&name);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let link = std::fs::read_link(&next).ok()?;
                if link.is_absolute() {
                    done = PathBuf::from("/");
                }
                pending.extend(
                    link.components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some("..".into()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev(),
                );
            }
            _ => done = next,
        }
    }
    Some(done)
}

/// How far the scan below a glob's directory goes: symlinks and subdirectories are looked for
/// this deep, among at most this many entries (a glob over a huge tree is checked in part; the
/// warning says so).
const GLOB_SCAN_DEPTH: usize = 3;
const GLOB_SCAN_ENTRIES: usize = 10_000;

pub(crate) fn access_of(p: &Path) -> Option<Access> {
    std::fs::symlink_metadata(p).ok().map(|m| Access {
        uid: m.uid(),
        // A symlink's own bits mean nothing (always 0777); who owns it is what counts.
        mode: if m.file_type().is_symlink() {
            0o755
        } else {
            m.mode()
        },
    })
}

/// The entries below `dir` that the glob's `prefix` covers, for [`glob_entry_warnings`], and
/// whether the scan stopped early.
fn scan_glob_dir(dir: &Path, prefix: &str) -> (Vec<(PathBuf, Option<PathBuf>, Access)>, bool) {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            if out.len() >= GLOB_SCAN_ENTRIES {
                return (out, true);
            }
            let path = entry.path();
            if !path.to_string_lossy().starts_with(prefix) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let own = Access {
                uid: meta.uid(),
                mode: meta.mode(),
            };
            if meta.file_type().is_symlink() {
                out.push((path.clone(), resolve(&path), own));
            } else if meta.is_dir() {
                out.push((path.clone(), None, own));
                if depth + 1 < GLOB_SCAN_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
    }
    (out, false)
}

/// Warnings for every exec rule of every policy, each prefixed with `file:line: warning:`.
pub fn warnings(set: &PolicySet) -> Vec<String> {
    // Rules share directories (thousands of files under one): each path is looked at once,
    // and each glob's directory scanned once.
    let seen: RefCell<HashMap<PathBuf, Option<Access>>> = RefCell::default();
    let access = |p: &Path| {
        if let Some(known) = seen.borrow().get(p) {
            return *known;
        }
        let found = access_of(p);
        seen.borrow_mut().insert(p.to_path_buf(), found);
        found
    };
    #[allow(clippy::type_complexity)]
    let mut scanned: HashMap<
        (String, String),
        (Vec<(PathBuf, Option<PathBuf>, Access)>, bool),
    > = HashMap::new();
    let daemon_exe = std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .map(|p| p.display().to_string());
    let mut out = Vec::new();
    for policy in set {
        for rule in policy.exec() {
            let resolved = (!rule.prefix_glob())
                .then(|| resolve(Path::new(rule.path())))
                .flatten()
                .map(|p| p.display().to_string());
            let mut found = rule_warnings(
                rule.text(),
                resolved.as_deref(),
                daemon_exe.as_deref(),
                &access,
            );
            if rule.prefix_glob() {
                let prefix = rule.text().trim_end_matches('*');
                let dir = &prefix[..prefix.rfind('/').unwrap_or(0).max(1)];
                let (entries, cut) = scanned
                    .entry((dir.to_string(), prefix.to_string()))
                    .or_insert_with(|| scan_glob_dir(Path::new(dir), prefix));
                found.extend(glob_entry_warnings(rule.text(), entries, &access));
                if *cut {
                    found.push(format!(
                        "{dir} holds more than {GLOB_SCAN_ENTRIES} entries: only those were \
                         checked for symlinks and subdirectories others can write"
                    ));
                }
            }
            for w in found {
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

    const DIR: u32 = 0o040000;
    const FILE: u32 = 0o100000;

    /// A host with the usual world-writable sticky directories; everything else root's 0755, and
    /// only the paths in `missing` absent.
    fn host<'a>(missing: &'a [&'a str]) -> impl Fn(&Path) -> Option<Access> + 'a {
        move |p: &Path| match p.to_str()? {
            m if missing.contains(&m) => None,
            "/tmp" | "/var/tmp" | "/dev/shm" => root(DIR | 0o1777),
            "/home/agent/bin" => Some(Access {
                uid: 1000,
                mode: DIR | 0o755,
            }),
            "/srv/shared" => root(DIR | 0o777),
            _ => root(0o755),
        }
    }

    fn lint(
        rule: &str,
        resolved: Option<&str>,
        access: &dyn Fn(&Path) -> Option<Access>,
    ) -> Vec<String> {
        rule_warnings(rule, resolved, None, access)
    }

    #[test]
    fn root_owned_tool_is_fine() {
        let access = host(&[]);
        assert!(lint("/usr/bin/git", None, &access).is_empty());
        assert!(lint("/opt/tools/lint-*", None, &access).is_empty());
        assert!(lint("/usr/bin/git", Some("/usr/lib/git-core/git"), &access).is_empty());
    }

    #[test]
    fn writable_directories_are_named() {
        let access = host(&[]);
        let w = lint("/home/agent/bin/*", None, &access);
        assert!(
            w[0].contains("/home/agent/bin is writable by its owner (uid 1000)"),
            "{w:?}"
        );
        let w = lint("/srv/shared/tool", None, &access);
        assert!(
            w[0].contains("/srv/shared is writable by group or others"),
            "{w:?}"
        );
    }

    #[test]
    fn globs_in_sticky_world_writable_directories_are_named() {
        let access = host(&[]);
        for (rule, dir) in [
            ("/tmp/*", "/tmp"),
            ("/var/tmp/*", "/var/tmp"),
            ("/dev/shm/*", "/dev/shm"),
            ("/tmp/build-*", "/tmp"),
        ] {
            let w = lint(rule, None, &access);
            assert!(
                w[0].starts_with(&format!(
                    "{dir} is a sticky directory anyone can write (like /tmp): anyone can create a new file there:"
                )),
                "{rule}: {w:?}"
            );
            assert!(
                w[0].contains(&format!("run any program as \"{rule}\"")),
                "{w:?}"
            );
        }
        // Below a root-owned directory inside /tmp the glob's own directory decides first.
        let w = lint("/tmp/tools/*", None, &access);
        assert!(
            w[0].starts_with(
                "/tmp is a sticky directory anyone can write (like /tmp): /tmp/tools is root's now, but anyone can create it once it is gone"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn exact_rules_under_sticky_directories_are_named() {
        // Not there yet: the first agent to create it runs it.
        let access = host(&["/tmp/runner", "/dev/shm/a", "/dev/shm/a/b"]);
        let w = lint("/tmp/runner", None, &access);
        assert!(
            w[0].starts_with(
                "/tmp/runner does not exist, and /tmp is a sticky directory anyone can write"
            ),
            "{w:?}"
        );
        let w = lint("/dev/shm/a/b", None, &access);
        assert!(
            w[0].starts_with("/dev/shm/a/b does not exist, and /dev/shm"),
            "{w:?}"
        );
        // There and root's: kept in place by the sticky bit, but only while it exists.
        let access = host(&[]);
        let w = lint("/tmp/x", None, &access);
        assert!(
            w[0].contains("/tmp/x is root's now, but anyone can create it once it is gone"),
            "{w:?}"
        );
        // A missing file in a root-only directory is fine.
        let access = host(&["/opt/tool"]);
        assert!(lint("/opt/tool", None, &access).is_empty());
        // A missing file in a non-sticky writable directory.
        let access = host(&["/srv/shared/tool"]);
        let w = lint("/srv/shared/tool", None, &access);
        assert!(
            w[0].starts_with(
                "/srv/shared/tool does not exist, and /srv/shared is writable by group or others"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn exact_rules_through_symlinks_into_writable_places_are_named() {
        let access = host(&["/tmp/tool"]);
        let w = lint("/usr/local/bin/tool", Some("/tmp/tool"), &access);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "/usr/local/bin/tool is a symlink to /tmp/tool, and /tmp/tool does not exist, and /tmp is a sticky directory"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn globs_over_symlinks_into_writable_places_are_named() {
        let access = host(&["/tmp/payload"]);
        let entries = [
            // Allowed by name through the glob; its target anyone can create.
            (
                PathBuf::from("/opt/tools/run"),
                Some(PathBuf::from("/tmp/payload")),
                Access {
                    uid: 0,
                    mode: 0o777,
                },
            ),
            // A symlinked directory: everything below it matches the glob.
            (
                PathBuf::from("/opt/tools/scratch"),
                Some(PathBuf::from("/dev/shm")),
                Access {
                    uid: 0,
                    mode: 0o777,
                },
            ),
            // A link to a root-owned tool is fine.
            (
                PathBuf::from("/opt/tools/git"),
                Some(PathBuf::from("/usr/bin/git")),
                Access {
                    uid: 0,
                    mode: 0o777,
                },
            ),
            // A subdirectory others can write.
            (
                PathBuf::from("/opt/tools/drop"),
                None,
                Access {
                    uid: 0,
                    mode: DIR | 0o1777,
                },
            ),
            // A root-only subdirectory is fine; a file is not looked at.
            (
                PathBuf::from("/opt/tools/lib"),
                None,
                Access {
                    uid: 0,
                    mode: DIR | 0o755,
                },
            ),
            (
                PathBuf::from("/opt/tools/bin"),
                None,
                Access {
                    uid: 0,
                    mode: FILE | 0o755,
                },
            ),
        ];
        let w = glob_entry_warnings("/opt/tools/*", &entries, &access);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("/opt/tools/run is a symlink to /tmp/payload, and /tmp/payload does not exist, and /tmp is a sticky"), "{w:?}");
        assert!(
            w[1].starts_with(
                "/opt/tools/scratch is a symlink to /dev/shm, and /dev/shm is a sticky directory"
            ),
            "{w:?}"
        );
        assert!(
            w[2].starts_with("/opt/tools/drop is a sticky directory"),
            "{w:?}"
        );
        // Only entries the glob's prefix covers count.
        assert!(glob_entry_warnings("/opt/tools/g*", &entries, &access).is_empty());
    }

    #[test]
    fn resolve_follows_links_to_files_that_do_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink(d.join("missing/file"), d.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub/../abs", d.join("rel")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink("loop", d.join("loop")).unwrap();
        assert_eq!(resolve(&d.join("abs")), Some(d.join("missing/file")));
        assert_eq!(resolve(&d.join("rel")), Some(d.join("missing/file")));
        assert_eq!(resolve(&d.join("plain")), Some(d.join("plain")));
        assert_eq!(resolve(&d.join("loop")), None);
    }

    #[test]
    fn agent_monitor_itself_is_named() {
        let access = host(&[]);
        let me = Some("/usr/local/bin/agent-monitor");
        for rule in [
            "/usr/local/bin/agent-monitor",
            "/usr/local/bin/*",
            "/usr/local/bin/agent*",
        ] {
            let w = rule_warnings(rule, None, me, &access);
            assert!(
                w.iter().any(|w| w.contains("allows agent-monitor itself")),
                "{rule}: {w:?}"
            );
        }
        let w = rule_warnings(
            "/usr/bin/am",
            Some("/usr/local/bin/agent-monitor"),
            me,
            &access,
        );
        assert!(
            w.iter().any(|w| w.contains("allows agent-monitor itself")),
            "{w:?}"
        );
        assert!(rule_warnings("/usr/bin/git", None, me, &access).is_empty());
    }

    #[test]
    fn interpreters_are_named() {
        let access = host(&[]);
        for p in [
            "/bin/sh",
            "/usr/bin/python3.11",
            "/usr/bin/env",
            "/lib64/ld-linux-x86-64.so.2",
        ] {
            let w = lint(p, None, &access);
            assert!(w.iter().any(|w| w.contains("interpreter")), "{p}: {w:?}");
        }
        // Through a symlink: the file it names decides.
        let w = lint("/usr/local/bin/tool", Some("/usr/bin/perl5.36"), &access);
        assert!(w.iter().any(|w| w.contains("interpreter")), "{w:?}");
        let w = lint("/usr/bin/python3*", None, &access);
        assert!(
            w.iter().any(|w| w.contains("may allow interpreters")),
            "{w:?}"
        );
        let w = lint("/usr/bin/*", None, &access);
        assert!(
            w.iter().any(|w| w.contains("may allow interpreters")),
            "{w:?}"
        );
        assert!(lint("/usr/bin/git*", None, &access).is_empty());
    }
}
