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
