//! Warnings about `[unix] allow` entries that someone other than root can redirect. The kernel
//! judges the name a caller gives, not the socket it resolves to (docs/unix-sockets.md): an
//! entry whose directory (as written, or where a symlink on it leads) another uid can write can
//! be made to lead to another socket (docker.sock, say) while the name stays on the list.
//! `policy check` prints these and the daemon logs them at start and on reload; they are
//! warnings, not errors: what the list allows is the operator's call, made knowingly.

use std::path::Path;

use crate::exec_lint::{Access, writable_location};
use crate::policy::PolicySet;

/// The warnings for one pathname entry; `access` answers for a path (None: it does not exist),
/// `resolved` is where the name leads once symlinks are followed (`exec_lint::resolve`).
pub fn entry_warnings(
    name: &str,
    resolved: Option<&Path>,
    access: &dyn Fn(&Path) -> Option<Access>,
) -> Vec<String> {
    if name.starts_with('@') {
        return Vec::new();
    }
    let path = Path::new(name);
    let mut out = Vec::new();
    // The socket file's own bits do not matter (writing it is connecting to it); who can
    // redirect a name is who can write a directory on the way, as written or, past a symlink
    // (root's `/var/run` → `/run` is fine), where it leads.
    let mut dirs = vec![path.parent().unwrap_or(path)];
    if let Some(r) = resolved.filter(|r| *r != path) {
        dirs.push(r.parent().unwrap_or(r));
    }
    for dir in dirs {
        if let Some(who) = writable_location(dir, true, access) {
            out.push(format!(
                "unix socket {name}: {who}, so someone other than root can put another socket (or a \
                 symlink to one) under this name, and the agent reaches it as the allowed name \
                 (docs/unix-sockets.md)"
            ));
        }
    }
    out
}

/// Every warning of every `[unix] allow` entry in the set, as `file:line: warning: …`.
pub fn warnings(set: &PolicySet) -> Vec<String> {
    let access = |p: &Path| crate::exec_lint::access_of(p);
    set.iter()
        .flat_map(|policy| {
            let rules = policy.unix().and_then(|u| u.allow()).unwrap_or_default();
            rules.iter().flat_map(move |rule| {
                let resolved = crate::exec_lint::resolve(Path::new(rule.name()));
                entry_warnings(rule.name(), resolved.as_deref(), &access)
                    .into_iter()
                    .map(move |w| {
                        format!(
                            "{}:{}: warning: {w}",
                            policy.origin().display(),
                            rule.line()
                        )
                    })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs<'a>(entries: &'a [(&'a str, u32, u32)]) -> impl Fn(&Path) -> Option<Access> + 'a {
        move |p: &Path| {
            entries
                .iter()
                .find(|(path, _, _)| Path::new(path) == p)
                .map(|&(_, uid, mode)| Access { uid, mode })
        }
    }

    #[test]
    fn a_socket_in_a_root_only_directory_is_quiet() {
        let access = fs(&[
            ("/", 0, 0o40755),
            ("/run", 0, 0o40755),
            ("/run/dbus", 0, 0o40755),
            ("/run/dbus/system_bus_socket", 0, 0o140666),
        ]);
        let w = entry_warnings("/run/dbus/system_bus_socket", None, &access);
        assert_eq!(w, Vec::<String>::new());
        assert_eq!(
            entry_warnings("@abstract", None, &access),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_users_runtime_directory_is_named_with_its_owner() {
        let access = fs(&[
            ("/", 0, 0o40755),
            ("/run", 0, 0o40755),
            ("/run/user", 0, 0o40755),
            ("/run/user/1000", 1000, 0o40700),
            ("/run/user/1000/bus", 1000, 0o140666),
        ]);
        let w = entry_warnings("/run/user/1000/bus", None, &access);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("uid 1000"), "{w:?}");
    }

    #[test]
    fn a_symlink_is_judged_where_it_leads() {
        // Root's /var/run → /run: quiet. A link into /tmp: /tmp is anyone's.
        let access = fs(&[
            ("/", 0, 0o40755),
            ("/var", 0, 0o40755),
            ("/var/run", 0, 0o755),
            ("/run", 0, 0o40755),
            ("/tmp", 0, 0o41777),
        ]);
        let quiet = entry_warnings(
            "/var/run/docker.sock",
            Some(Path::new("/run/docker.sock")),
            &access,
        );
        assert_eq!(quiet, Vec::<String>::new());
        let w = entry_warnings(
            "/var/run/docker.sock",
            Some(Path::new("/tmp/docker.sock")),
            &access,
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("/tmp is a sticky directory"), "{w:?}");
    }
}
