//! Warnings about exec rules that allow programs whose purpose is to hand work to a service running
//! outside the agent: job schedulers, service managers, D-Bus, remote shells, privilege brokers,
//! container engines, terminal multiplexer servers. The work they hand over is done by that
//! service's processes, which the agent's hooks judge only when they run as the agent's own
//! dedicated uid (`run --user`, a `uids` selector: the uid is the agent). `policy check` prints them;
//! the daemon logs them at start and at every reload.

use std::path::Path;

use crate::policy::PolicySet;

/// Program names and the service each hands work to.
const DELEGATORS: &[(&str, &str)] = &[
    ("at", "the at daemon (atd)"),
    ("batch", "the at daemon (atd)"),
    ("crontab", "cron"),
    ("systemd-run", "systemd (PID 1 or the user's manager)"),
    ("systemctl", "systemd (PID 1 or the user's manager)"),
    ("run0", "systemd (PID 1)"),
    ("machinectl", "systemd-machined"),
    ("busctl", "D-Bus services"),
    ("dbus-send", "D-Bus services"),
    ("gdbus", "D-Bus services"),
    ("qdbus", "D-Bus services"),
    ("ssh", "an SSH server (sshd, also on localhost)"),
    ("slogin", "an SSH server (sshd, also on localhost)"),
    ("rsh", "a remote shell server"),
    ("sudo", "another user's identity (sudo)"),
    ("sudoedit", "another user's identity (sudo)"),
    ("su", "another user's identity (su)"),
    ("pkexec", "polkit"),
    ("doas", "another user's identity (doas)"),
    ("docker", "the container engine's daemon"),
    (
        "podman",
        "the container engine (podman, its service or conmon)",
    ),
    ("nerdctl", "containerd"),
    ("ctr", "containerd"),
    ("crictl", "the container runtime"),
    ("kubectl", "a Kubernetes cluster"),
    ("lxc", "the LXD/Incus daemon"),
    ("incus", "the Incus daemon"),
    ("virsh", "libvirtd"),
    (
        "tmux",
        "a tmux server (an existing one runs outside the agent)",
    ),
    (
        "screen",
        "a screen session (an existing one runs outside the agent)",
    ),
];

/// Where the delegating programs live on common distributions.
const BIN_DIRS: [&str; 6] = [
    "/usr/bin",
    "/usr/sbin",
    "/bin",
    "/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
];

/// The service `name` hands work to, if it is a delegating program.
fn service_of(name: &str) -> Option<&'static str> {
    DELEGATORS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, service)| *service)
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

const CONSEQUENCE: &str = "work it hands over runs in that service's processes, judged as this \
    agent only when they run as the agent's own dedicated uid (`run --user`, a `uids` selector); \
    otherwise unjudged and unreported (allow it only if the agent needs it)";

/// The warnings for one exec rule as written. `resolved` is the file an exact rule names once
/// symlinks are followed; `exists` answers whether a path exists (a glob warns about the
/// delegating programs present under it, or by name when its directory cannot be read).
pub fn rule_warnings(
    rule: &str,
    resolved: Option<&str>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(prefix) = rule.strip_suffix('*') {
        let (dir, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i.max(1)], &prefix[i + 1..]),
            None => return out,
        };
        // A glob matches every path with its prefix, subdirectories included: a program counts
        // if it exists under the glob's own directory or in a standard one the glob covers. A
        // directory that cannot be seen is judged by the names alone.
        let dir_known = exists(Path::new(dir));
        let present = |name: &str| {
            std::iter::once(format!("{}/{name}", dir.trim_end_matches('/')))
                .chain(BIN_DIRS.iter().map(|d| format!("{d}/{name}")))
                .any(|p| p.starts_with(prefix) && exists(Path::new(&p)))
        };
        let covered: Vec<&str> = DELEGATORS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| present(n) || (!dir_known && n.starts_with(name_prefix)))
            .collect();
        if !covered.is_empty() {
            let shown: Vec<&str> = covered.iter().take(6).copied().collect();
            out.push(format!(
                "\"{rule}\" allows {} program(s) that hand work to a service outside the agent \
                 ({}{}): the {CONSEQUENCE}",
                covered.len(),
                shown.join(", "),
                if covered.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        return out;
    }
    let names = [Some(file_name(rule)), resolved.map(file_name)];
    if let Some((name, service)) = names
        .iter()
        .flatten()
        .find_map(|n| service_of(n).map(|s| (*n, s)))
    {
        out.push(format!(
            "\"{rule}\" ({name}) hands work to {service}, outside the agent: the {CONSEQUENCE}"
        ));
    }
    out
}

/// Warnings for every exec rule of every policy, each prefixed with `file:line: warning:`.
pub fn warnings(set: &PolicySet) -> Vec<String> {
    let exists = |p: &Path| p.exists();
    let mut out = Vec::new();
    for policy in set {
        for rule in policy.exec() {
            let resolved = (!rule.prefix_glob())
                .then(|| std::fs::canonicalize(rule.path()).ok())
                .flatten()
                .map(|p| p.display().to_string());
            for w in rule_warnings(rule.text(), resolved.as_deref(), &exists) {
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

    fn on_disk(files: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p: &Path| files.iter().any(|f| Path::new(f) == p)
    }

    #[test]
    fn exact_rules_for_delegating_programs_warn() {
        let none = on_disk(&[]);
        for rule in [
            "/usr/bin/at",
            "/usr/bin/systemd-run",
            "/usr/bin/ssh",
            "/usr/bin/sudo",
            "/bin/su",
            "/usr/bin/docker",
            "/usr/bin/tmux",
            "/usr/bin/busctl",
        ] {
            let w = rule_warnings(rule, None, &none);
            assert_eq!(w.len(), 1, "{rule}: {w:?}");
            assert!(w[0].contains("outside the agent"), "{}", w[0]);
        }
        assert!(rule_warnings("/usr/bin/git", None, &none).is_empty());
        assert!(rule_warnings("/usr/bin/sshd-keygen", None, &none).is_empty());
        // Allowed under another name: the file it resolves to decides.
        let w = rule_warnings("/usr/local/bin/remote", Some("/usr/bin/ssh"), &none);
        assert!(w[0].contains("(ssh) hands work to an SSH server"), "{w:?}");
    }

    #[test]
    fn globs_warn_for_the_delegating_programs_they_cover() {
        let disk = on_disk(&[
            "/usr/bin",
            "/usr/bin/ssh",
            "/usr/bin/systemctl",
            "/usr/bin/su",
            "/opt/tools",
            "/",
            "/usr",
        ]);
        let w = rule_warnings("/usr/bin/*", None, &disk);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("allows 3 program(s)"), "{}", w[0]);
        assert!(w[0].contains("systemctl, ssh, su"), "{}", w[0]);
        let w = rule_warnings("/usr/bin/s*", None, &disk);
        assert!(w[0].contains("allows 3 program(s)"), "{w:?}");
        assert!(rule_warnings("/usr/bin/git*", None, &disk).is_empty());
        // Nothing delegating in that directory.
        assert!(rule_warnings("/opt/tools/*", None, &disk).is_empty());
        // A glob reaches into subdirectories.
        let w = rule_warnings("/usr/*", None, &disk);
        assert!(w[0].contains("allows 3 program(s)"), "{w:?}");
        let w = rule_warnings("/*", None, &disk);
        assert!(w[0].contains("allows 3 program(s)"), "{w:?}");
        // A directory that cannot be read: by name.
        let w = rule_warnings("/nowhere/ss*", None, &disk);
        assert!(w[0].contains("(ssh)"), "{w:?}");
    }
}
