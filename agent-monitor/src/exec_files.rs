//! The files exact exec rules name, as (device, inode): resolved with `stat` at start and again on
//! every sweep, so the kernel can judge the file that runs rather than the name it was asked by,
//! and an upgraded binary (a new inode) is picked up within a sweep.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;

use agent_monitor_common::{ExecFileKey, kernel_dev};

use crate::policy::PolicySet;

/// Resolved (agent, device, inode) → the exact rule path that names it.
#[derive(Default)]
pub struct ExecFiles {
    resolved: HashMap<ExecFileKey, String>,
}

/// What changed since the last resolution, for the kernel map.
pub struct Change {
    pub add: Vec<(ExecFileKey, u32)>,
    pub remove: Vec<ExecFileKey>,
}

/// Resolves every exact rule of every agent. A path that does not exist (yet) names no file;
/// exec of that name is still judged by name.
fn resolve_all(policies: &PolicySet) -> HashMap<ExecFileKey, String> {
    let mut out = HashMap::new();
    for (agent, policy) in policies.indexed() {
        for rule in policy.exec().iter().filter(|r| !r.prefix_glob()) {
            // Follows symlinks: /bin/sh → dash is allowed as the file dash.
            let Ok(meta) = std::fs::metadata(rule.path()) else {
                continue;
            };
            let dev = meta.dev();
            // The kernel keeps i_sb->s_dev as MKDEV(major, minor).
            let key = ExecFileKey {
                agent,
                dev: kernel_dev(libc::major(dev), libc::minor(dev)),
                ino: meta.ino(),
            };
            out.entry(key).or_insert_with(|| rule.path().to_string());
        }
    }
    out
}

impl ExecFiles {
    /// Re-resolves and returns what the kernel map must change.
    pub fn refresh(&mut self, policies: &PolicySet) -> Change {
        let now = resolve_all(policies);
        let remove = self
            .resolved
            .keys()
            .filter(|k| !now.contains_key(k))
            .copied()
            .collect();
        let add = now
            .keys()
            .filter(|k| !self.resolved.contains_key(k))
            .map(|k| (*k, 1))
            .collect();
        self.resolved = now;
        Change { add, remove }
    }

    /// The exact rule path whose file is (dev, ino) for this agent, if any.
    pub fn rule_for(&self, agent: u32, dev: u32, ino: u64) -> Option<&str> {
        self.resolved
            .get(&ExecFileKey { agent, dev, ino })
            .map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.resolved.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::Policy;

    #[test]
    fn resolves_exact_rules_to_files_and_tracks_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "x").unwrap();
        let text = format!(
            "agent = \"t\"\n[exec]\nallow = [{:?}, {:?}, \"/nonexistent/x\"]\n",
            a.display().to_string(),
            format!("{}/*", dir.path().display())
        );
        let set = PolicySet::new(vec![Policy::parse(&text, Path::new("t.toml")).unwrap()]).unwrap();
        let mut files = ExecFiles::default();
        let c = files.refresh(&set);
        assert_eq!(c.add.len(), 1, "only the existing exact rule names a file");
        assert!(c.remove.is_empty());
        let meta = std::fs::metadata(&a).unwrap();
        let dev = kernel_dev(libc::major(meta.dev()), libc::minor(meta.dev()));
        assert_eq!(
            files.rule_for(0, dev, meta.ino()),
            Some(a.to_str().unwrap())
        );
        assert_eq!(files.rule_for(1, dev, meta.ino()), None);
        // Replaced the way package managers do: a new file renamed over the old one.
        let b = dir.path().join("b");
        std::fs::write(&b, "y").unwrap();
        std::fs::rename(&b, &a).unwrap();
        let c = files.refresh(&set);
        assert_eq!((c.add.len(), c.remove.len()), (1, 1));
        assert_eq!(files.len(), 1);
    }
}
