//! What arming selectors learns from the host, looked up apart from the arming itself: systemd
//! units (`systemctl` or a search of the cgroup tree), cgroups, whether a cgroup holds a
//! protected process, and the sha256 of executables whose file changed. The look-up blocks
//! (processes, tree walks, whole-file reads), so the daemon runs it off the event loop and
//! hands the result back to [`super::Selected::arm_with`] on the loop, which writes the kernel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{
    ArmState, FileStamp, ResolvedCgroup, Selected, UnitError, Verified, resolve_cgroup,
    resolve_unit, stamp, verify_stamped,
};
use crate::policy::selectors::SelectorKind;

/// The questions one arming pass asks the host, taken from the selectors as they stand.
#[derive(Clone, Debug)]
pub struct ProbePlan {
    /// The [`Selected::generation`] the plan was taken from.
    generation: u64,
    cgroup_root: PathBuf,
    /// Systemd units of selectors still waiting for their cgroup.
    units: Vec<String>,
    /// cgroup paths of selectors still waiting for them.
    cgroups: Vec<String>,
    /// Executables: path, expected digest and the stamp of the file last read.
    files: Vec<(PathBuf, [u8; 32], Option<FileStamp>)>,
}

/// What the host said.
#[derive(Debug)]
pub struct Probed {
    generation: u64,
    units: HashMap<String, Result<Option<String>, UnitError>>,
    /// cgroup path → the cgroup (if it exists) and the protected process it holds (if any).
    cgroups: HashMap<String, Option<(ResolvedCgroup, Option<String>)>>,
    files: HashMap<PathBuf, FileProbe>,
}

/// An executable as the probe found it.
#[derive(Debug)]
pub(super) struct FileProbe {
    /// Its stamp now (none: it cannot be stat'ed).
    pub(super) now: Option<FileStamp>,
    /// Read and checked when the stamp differs from the plan's: the stamp of the file read and
    /// the verdict.
    pub(super) read: Option<(Option<FileStamp>, Verified)>,
}

impl Selected {
    /// The questions the next arming pass asks (cheap: no I/O).
    pub fn probe_plan(&self, cgroup_root: &Path) -> ProbePlan {
        let mut plan = ProbePlan {
            generation: self.generation,
            cgroup_root: cgroup_root.to_path_buf(),
            units: Vec::new(),
            cgroups: Vec::new(),
            files: Vec::new(),
        };
        for a in &self.all {
            match (&a.state, a.kind) {
                (ArmState::Waiting(_), SelectorKind::SystemdUnit) => {
                    plan.units.push(a.value.clone())
                }
                (ArmState::Waiting(_), SelectorKind::Cgroup) => plan.cgroups.push(a.value.clone()),
                (
                    ArmState::Executable {
                        path,
                        sha256,
                        stamp,
                        ..
                    },
                    _,
                ) => plan.files.push((path.clone(), *sha256, *stamp)),
                _ => {}
            }
        }
        plan
    }

    /// Whether `probed` answers the selectors as they stand (a reload replaced them since the
    /// plan was taken: its answers are about selectors that are gone).
    pub fn is_current(&self, probed: &Probed) -> bool {
        probed.generation == self.generation
    }
}

impl ProbePlan {
    /// Asks the host. Blocking: not for the event loop's thread.
    pub fn run(self) -> Probed {
        let root = &self.cgroup_root;
        let mut probed = Probed {
            generation: self.generation,
            units: HashMap::new(),
            cgroups: HashMap::new(),
            files: HashMap::new(),
        };
        let mut cgroups = self.cgroups;
        for unit in self.units {
            let found = resolve_unit(root, &unit);
            if let Ok(Some(rel)) = &found {
                cgroups.push(rel.clone());
            }
            probed.units.insert(unit, found);
        }
        for rel in cgroups {
            let cg = resolve_cgroup(root, &rel).map(|cg| {
                let holder = crate::identity::host_capture::holder_of(&cg.rel);
                (cg, holder)
            });
            probed.cgroups.insert(rel, cg);
        }
        for (path, sha256, last) in self.files {
            let now = stamp(&path).ok();
            let read = (now.is_none() || now != last).then(|| verify_stamped(&path, &sha256));
            probed.files.insert(path, FileProbe { now, read });
        }
        probed
    }
}

impl Probed {
    /// The cgroup of `unit`, as asked; `Ok(None)` also when it was not asked.
    pub(super) fn unit(&self, unit: &str) -> Result<Option<&str>, &UnitError> {
        match self.units.get(unit) {
            Some(Ok(rel)) => Ok(rel.as_deref()),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The cgroup `rel`, if it existed, and the protected process it held.
    pub(super) fn cgroup(&self, rel: &str) -> Option<&(ResolvedCgroup, Option<String>)> {
        self.cgroups.get(rel)?.as_ref()
    }

    pub(super) fn file(&self, path: &Path) -> Option<&FileProbe> {
        self.files.get(path)
    }
}
