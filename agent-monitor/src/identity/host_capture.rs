//! Selectors that would capture the host on this machine: a cgroup or unit whose cgroup holds PID 1
//! or the daemon (or the operator's `policy check`), an executable selector naming PID 1's or the
//! daemon's own binary, a uid selector naming the operator's uid. The pure checks (uid 0, the
//! well-known systemd units) are in `policy::selectors`; these need the host, so `policy check`
//! runs them before anything is loaded, and the daemon at start and at every reload (a refused
//! reload keeps the old policy in force).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::policy::PolicySet;
use crate::policy::selectors::contains;

/// A process that no selector may capture, as the host shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protected {
    /// "PID 1 (systemd)", "the daemon (pid 812)", …
    pub what: String,
    /// Its cgroup v2 path below the root.
    pub cgroup: Option<String>,
    /// Its executable: (device, inode) and a path to name it by.
    pub exe: Option<((u64, u64), String)>,
    /// Its real uid.
    pub uid: Option<u32>,
}

impl Protected {
    /// Process `pid` as procfs shows it now (fields it cannot read stay empty).
    pub fn of(pid: u32, what: &str) -> Protected {
        use crate::identity::procfs;
        let comm = procfs::comm(pid).unwrap_or_default();
        let cgroup = procfs::cgroup_v2(pid);
        let exe_link = procfs::exe_link(pid);
        let exe = std::fs::metadata(&exe_link).ok().map(|m| {
            let name = procfs::exe(pid).unwrap_or(exe_link).display().to_string();
            ((m.dev(), m.ino()), name)
        });
        let uid = procfs::credentials(pid).map(|c| c.uid);
        Protected {
            what: format!("{what} (pid {pid}, {comm})"),
            cgroup,
            exe,
            uid,
        }
    }

    /// PID 1 and this process (the daemon, or the operator's `policy check`).
    pub fn host(this: &str) -> Vec<Protected> {
        vec![
            Protected::of(1, "PID 1"),
            Protected::of(std::process::id(), this),
        ]
    }
}

/// Which protected process (PID 1, the daemon) cgroup `rel` holds, if any: a unit or cgroup that
/// appears only after the policy was loaded is checked again when it is armed.
pub fn holder_of(rel: &str) -> Option<String> {
    Protected::host("the daemon")
        .into_iter()
        .find(|p| p.cgroup.as_deref().is_some_and(|own| contains(rel, own)))
        .map(|p| p.what)
}

/// What the checks need to know about the host beyond the protected processes.
pub trait HostView {
    /// The cgroup (below the root) of a systemd unit, if it has one now.
    fn unit_cgroup(&self, unit: &str) -> Option<String>;
    /// (device, inode) of a file.
    fn file_key(&self, path: &str) -> Option<(u64, u64)>;
}

/// The live host: units resolved as the daemon arms them, files by `stat`.
pub struct LiveHost<'a> {
    pub cgroup_root: &'a Path,
}

impl HostView for LiveHost<'_> {
    fn unit_cgroup(&self, unit: &str) -> Option<String> {
        crate::identity::selected::resolve_unit(self.cgroup_root, unit)
            .ok()
            .flatten()
    }

    fn file_key(&self, path: &str) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
}

/// One line per selector of `set` that would capture a protected process, `file:line:col: …`.
pub fn issues(set: &PolicySet, protected: &[Protected], host: &dyn HostView) -> Vec<String> {
    let mut out = Vec::new();
    for p in set {
        let s = p.selectors();
        let agent = p.agent();
        let cgroup_hits = |cg: &str| -> Vec<String> {
            protected
                .iter()
                .filter(|pr| pr.cgroup.as_deref().is_some_and(|own| contains(cg, own)))
                .map(|pr| {
                    format!(
                        "{} (cgroup {})",
                        pr.what,
                        pr.cgroup.as_deref().unwrap_or("?")
                    )
                })
                .collect()
        };
        for c in &s.cgroups {
            let hits = cgroup_hits(&c.value);
            if !hits.is_empty() {
                out.push(format!(
                    "{}: cgroup selector {:?} of agent {agent:?} would capture {}: expected a cgroup that holds only the agent's processes",
                    c.at,
                    c.value,
                    hits.join(" and ")
                ));
            }
        }
        for u in &s.systemd_units {
            let Some(cg) = host.unit_cgroup(&u.value) else {
                continue;
            };
            let hits = cgroup_hits(&cg);
            if !hits.is_empty() {
                out.push(format!(
                    "{}: systemd unit selector {:?} of agent {agent:?} (cgroup {cg}) would capture {}: expected a unit that runs only the agent",
                    u.at,
                    u.value,
                    hits.join(" and ")
                ));
            }
        }
        for e in &s.executables {
            let Some(key) = host.file_key(&e.value.path) else {
                continue;
            };
            for pr in protected {
                if let Some((k, name)) = &pr.exe
                    && *k == key
                {
                    out.push(format!(
                        "{}: executable selector {:?} of agent {agent:?} is the binary of {} ({name}): expected the agent's own program",
                        e.at, e.value.path, pr.what
                    ));
                }
            }
        }
        for u in &s.uids {
            for pr in protected {
                if pr.uid == Some(u.value) {
                    out.push(format!(
                        "{}: uid selector {} of agent {agent:?} is the uid of {}: expected the agent's own dedicated uid",
                        u.at, u.value, pr.what
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use std::collections::HashMap;

    struct Fake {
        units: HashMap<&'static str, &'static str>,
        files: HashMap<&'static str, (u64, u64)>,
    }

    impl HostView for Fake {
        fn unit_cgroup(&self, unit: &str) -> Option<String> {
            self.units.get(unit).map(|s| s.to_string())
        }
        fn file_key(&self, path: &str) -> Option<(u64, u64)> {
            self.files.get(path).copied()
        }
    }

    fn set(identity: &str) -> PolicySet {
        let p = Policy::parse(
            &format!("agent = \"a\"\n[identity]\n{identity}\n"),
            Path::new("a.toml"),
        )
        .unwrap();
        PolicySet::new(vec![p]).unwrap()
    }

    fn host() -> (Vec<Protected>, Fake) {
        let protected = vec![
            Protected {
                what: "PID 1 (pid 1, init)".into(),
                cgroup: Some("/".into()),
                exe: Some(((8, 1), "/sbin/init".into())),
                uid: Some(0),
            },
            Protected {
                what: "the daemon (pid 9, agent-monitor)".into(),
                cgroup: Some("/ops/daemons/am".into()),
                exe: Some(((8, 2), "/usr/bin/agent-monitor".into())),
                uid: Some(0),
            },
            Protected {
                what: "this policy check (pid 10, agent-monitor)".into(),
                cgroup: Some("/sessions/s1".into()),
                exe: Some(((8, 2), "/usr/bin/agent-monitor".into())),
                uid: Some(1000),
            },
        ];
        let fake = Fake {
            units: HashMap::from([("ops.slice", "/ops"), ("coder.service", "/ops/coder")]),
            files: HashMap::from([("/usr/local/bin/am", (8, 2)), ("/opt/coder/agent", (8, 3))]),
        };
        (protected, fake)
    }

    const SUM: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn selectors_holding_a_protected_process_are_named() {
        let (protected, fake) = host();
        let text = format!(
            "cgroups = [\"/ops/daemons\", \"/ops/coder\"]\nsystemd_units = [\"ops.slice\", \"coder.service\"]\nexecutables = [{{ path = \"/usr/local/bin/am\", sha256 = \"{SUM}\" }}, {{ path = \"/opt/coder/agent\", sha256 = \"{SUM}\" }}]\nuids = [1000, 1001]"
        );
        let found = issues(&set(&text), &protected, &fake);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found[0].starts_with("a.toml:3:12: cgroup selector \"/ops/daemons\""));
        assert!(found[0].contains("the daemon (pid 9, agent-monitor) (cgroup /ops/daemons/am)"));
        assert!(
            found[1].contains("systemd unit selector \"ops.slice\""),
            "{}",
            found[1]
        );
        assert!(found[1].contains("(cgroup /ops)"));
        // One file, two protected processes run it.
        assert!(found[2].contains("is the binary of the daemon"));
        assert!(found[3].contains("is the binary of this policy check"));
        assert!(found[4].contains("uid selector 1000"), "{}", found[4]);
    }

    #[test]
    fn selectors_beside_the_protected_processes_pass() {
        let (protected, fake) = host();
        let text = format!(
            "cgroups = [\"/ops/coder\"]\nsystemd_units = [\"coder.service\", \"absent.service\"]\nexecutables = [{{ path = \"/opt/coder/agent\", sha256 = \"{SUM}\" }}]\nuids = [1001]"
        );
        assert!(issues(&set(&text), &protected, &fake).is_empty());
    }
}
