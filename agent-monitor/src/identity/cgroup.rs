//! The daemon's cgroup v2 subtree: `<cgroup2>/agent-monitor/<agent>/<task>`. A process placed there
//! is an agent process, and so is everything it starts: the kernel puts children in their parent's
//! cgroup, and moving out needs write access to another cgroup's `cgroup.procs`.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Where agent cgroups live.
pub struct AgentCgroups {
    base: PathBuf,
}

/// One (agent, task) cgroup.
#[derive(Clone, Debug)]
pub struct TaskCgroup {
    pub path: PathBuf,
    /// The kernel's cgroup id (the directory's inode on cgroup v2): the identity key in the maps.
    pub id: u64,
}

/// A task cgroup found in the tree.
#[derive(Clone, Debug)]
pub struct TaskDir {
    pub agent: String,
    pub task: String,
    pub path: PathBuf,
    pub id: u64,
}

impl AgentCgroups {
    pub fn new(cgroup2_root: &Path) -> anyhow::Result<Self> {
        let base = cgroup2_root.join("agent-monitor");
        std::fs::create_dir_all(&base)
            .with_context(|| format!("creating the agent cgroup tree {}", base.display()))?;
        Ok(AgentCgroups { base })
    }

    /// The cgroup every placed agent process lives below.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates (or finds) the cgroup of `task` of `agent`. Names are validated by the caller.
    pub fn task(&self, agent: &str, task: &str) -> anyhow::Result<TaskCgroup> {
        let path = self.base.join(agent).join(task);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        let id = std::fs::metadata(&path)
            .with_context(|| format!("reading cgroup {}", path.display()))?
            .ino();
        Ok(TaskCgroup { path, id })
    }

    /// Every `<agent>/<task>` cgroup under the tree now, with its id. The tree may be shared with
    /// other daemons (other pin directories): callers match ids against their own identity map.
    pub fn tasks(&self) -> Vec<TaskDir> {
        let subdirs = |p: &Path| -> Vec<(String, PathBuf, u64)> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter_map(|e| {
                            let m = e.metadata().ok()?;
                            m.is_dir().then(|| {
                                (
                                    e.file_name().to_string_lossy().into_owned(),
                                    e.path(),
                                    m.ino(),
                                )
                            })
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (agent, agent_path, _) in subdirs(&self.base) {
            for (task, path, id) in subdirs(&agent_path) {
                out.push(TaskDir {
                    agent: agent.clone(),
                    task,
                    path,
                    id,
                });
            }
        }
        out
    }

    /// Moves process `pid` (all its threads) into `cg`.
    pub fn place(&self, cg: &TaskCgroup, pid: u32) -> anyhow::Result<()> {
        let procs = cg.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", procs.display()))
    }

    /// Processes in `cg` now.
    pub fn processes(cg: &Path) -> Vec<u32> {
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// `daemon --uninstall`: removes every empty agent and task cgroup below `base`, deepest
    /// first. A cgroup that still holds processes is never touched (the kernel refuses to remove
    /// a populated cgroup anyway) and is named in [`Cleanup::left`] with its processes, and so is
    /// one that could not be removed for another reason. `base` itself stays: every daemon on
    /// the host attaches its agent-socket hooks there, also one of another pin directory.
    pub fn remove_empty_below(base: &Path) -> Cleanup {
        let mut cleanup = Cleanup::default();
        for dir in subdirectories(base) {
            prune(&dir, &mut cleanup);
        }
        cleanup
    }

    /// Removes `cg` if no process is left in it. Returns whether it is gone.
    pub fn remove_if_empty(cg: &Path) -> bool {
        if !Self::processes(cg).is_empty() {
            return false;
        }
        match std::fs::remove_dir(cg) {
            Ok(()) => {
                // The agent directory goes too once its last task is gone; failure means it still
                // has tasks.
                if let Some(parent) = cg.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(_) => false,
        }
    }
}

/// What `daemon --uninstall` did to the agent cgroups.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub removed: Vec<PathBuf>,
    /// Cgroups left in place, each with why (processes still in it, or the error).
    pub left: Vec<String>,
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `dir` and the cgroups below it that hold no process; returns whether `dir` is gone.
fn prune(dir: &Path, cleanup: &mut Cleanup) -> bool {
    let mut all_children_gone = true;
    for child in subdirectories(dir) {
        all_children_gone &= prune(&child, cleanup);
    }
    if !all_children_gone {
        // Its children say why; the parent of a kept cgroup cannot go.
        return false;
    }
    let pids = AgentCgroups::processes(dir);
    if !pids.is_empty() {
        let shown: Vec<String> = pids.iter().take(5).map(u32::to_string).collect();
        cleanup.left.push(format!(
            "{}: {} process(es) still in it (pid {}{}): an agent still runs there",
            dir.display(),
            pids.len(),
            shown.join(", "),
            if pids.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ));
        return false;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            cleanup.removed.push(dir.to_path_buf());
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            cleanup.left.push(format!("{}: {e}", dir.display()));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_removes_empty_cgroups_and_names_populated_ones() {
        // Plain directories stand in for cgroups: `cgroup.procs` lists the processes.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        for d in ["coder/t1", "coder/t2", "idle/default", "busy/t/sub"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::fs::write(base.join("coder/t2/cgroup.procs"), "41\n42\n").unwrap();
        let c = AgentCgroups::remove_empty_below(base);
        let mut removed: Vec<String> = c
            .removed
            .iter()
            .map(|p| p.strip_prefix(base).unwrap().display().to_string())
            .collect();
        removed.sort();
        assert_eq!(
            removed,
            [
                "busy",
                "busy/t",
                "busy/t/sub",
                "coder/t1",
                "idle",
                "idle/default"
            ]
        );
        assert_eq!(c.left.len(), 1, "{:?}", c.left);
        assert!(
            c.left[0].ends_with(
                "coder/t2: 2 process(es) still in it (pid 41, 42): an agent still runs there"
            ),
            "{:?}",
            c.left
        );
        assert!(base.join("coder/t2").exists() && base.exists());
    }
}
