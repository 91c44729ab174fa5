//! Arming selectors on this host: cgroup paths and systemd units resolved to cgroup ids and tree
//! levels, executables verified by sha256 (and re-verified when the file changes).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use agent_monitor_common::{
    AgentSlot, ExecFileKey, IdentityConfig, MAX_SELECTOR_LEVEL, SELECT_CGROUPS, SELECT_EXECUTABLES,
    SELECT_TAGS, SELECT_UIDS, kernel_dev,
};
use sha2::{Digest as _, Sha256};

use crate::identity::tables::IdentityTables;
use crate::identity::uid_binding::{Bindings, Owner};
use crate::policy::PolicySet;
use crate::policy::selectors::{SelectorKind, nested};

mod probe;
pub use probe::{ProbePlan, Probed};

/// A cgroup a selector names, as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCgroup {
    /// Path below the cgroup v2 root, starting with `/`.
    pub rel: String,
    /// cgroup id (the directory's inode on cgroup v2).
    pub id: u64,
    /// Depth below the root (root = 0): the `bpf_get_current_ancestor_cgroup_id` level.
    pub level: u32,
}

/// Depth of a cgroup path below the root: `/a/b` is 2.
pub fn level_of(rel: &str) -> u32 {
    rel.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// The cgroup `rel` (below `root`), if it exists now.
pub fn resolve_cgroup(root: &Path, rel: &str) -> Option<ResolvedCgroup> {
    let path = root.join(rel.trim_start_matches('/'));
    let meta = std::fs::metadata(&path).ok()?;
    meta.is_dir().then(|| ResolvedCgroup {
        rel: rel.to_string(),
        id: meta.ino(),
        level: level_of(rel),
    })
}

/// The cgroup of a systemd unit. With systemd as PID 1 it is asked (`systemctl show -p
/// ControlGroup`); otherwise (containers, this CI) the cgroup v2 tree is searched for a directory
/// named after the unit, which is where systemd (or a delegate) keeps it. `Err` when the unit has
/// more than one candidate; `Ok(None)` when it has none yet (not started: retried every sweep).
pub fn resolve_unit(root: &Path, unit: &str) -> Result<Option<String>, UnitError> {
    if Path::new("/run/systemd/system").is_dir() {
        let out = std::process::Command::new("systemctl")
            .args(["show", "--property=ControlGroup", "--value", unit])
            .output()
            .map_err(UnitError::Systemctl)?;
        let cg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return Ok((!cg.is_empty()).then_some(cg));
    }
    let mut found = Vec::new();
    search(root, root, unit, 0, &mut found);
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(UnitError::Ambiguous {
            unit: unit.to_string(),
            cgroups: found.join(", "),
        }),
    }
}

/// Why a systemd unit selector's cgroup could not be told.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("running systemctl: {0}")]
    Systemctl(#[source] std::io::Error),
    #[error(
        "unit {unit} matches several cgroups ({cgroups}); name it with a `cgroups` selector instead"
    )]
    Ambiguous { unit: String, cgroups: String },
}

/// Depth-limited walk; agent-monitor's own tree is skipped (it cannot hold units).
fn search(root: &Path, dir: &Path, name: &str, depth: u32, found: &mut Vec<String>) {
    const MAX_DEPTH: u32 = 8;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let rel = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
        if rel == crate::policy::selectors::RESERVED_CGROUP {
            continue;
        }
        if e.file_name() == name {
            found.push(rel);
        } else if depth < MAX_DEPTH {
            search(root, &path, name, depth + 1, found);
        }
    }
}

/// What identifies a file's content cheaply: when any of these change, the digest is re-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

pub fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    Ok(FileStamp::of(&std::fs::metadata(path)?))
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// The executable-selector key of this file as the kernel sees it (`i_sb->s_dev`, `i_ino`).
    pub fn selector_key(&self) -> ExecFileKey {
        ExecFileKey {
            agent: 0,
            dev: kernel_dev(libc::major(self.dev), libc::minor(self.dev)),
            ino: self.ino,
        }
    }
}

/// The identity and the sha256 of one opened file: both from the same open, so a file swapped
/// between a `stat` and a read cannot pair one file's inode with another's digest.
fn stamped_sha256(path: &Path) -> std::io::Result<(FileStamp, [u8; 32])> {
    let mut f = std::fs::File::open(path)?;
    let stamp = FileStamp::of(&f.metadata()?);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok((stamp, h.finalize().into()))
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Verification state of one executable selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verified {
    /// The file has the policy's digest: processes exec'ing it become the agent in task `default`.
    Match,
    /// It does not (or cannot be read): they become the agent in task `unverified`, never granted.
    Mismatch(String),
    /// Not armed: another agent's selector names the same file (by another path).
    Refused(String),
}

/// Checks `path` against `want` (the error text says what was found), with the identity of the
/// file that was read (none when it could not be opened).
fn verify_stamped(path: &Path, want: &[u8; 32]) -> (Option<FileStamp>, Verified) {
    match stamped_sha256(path) {
        Ok((stamp, got)) if &got == want => (Some(stamp), Verified::Match),
        Ok((stamp, got)) => (
            Some(stamp),
            Verified::Mismatch(format!(
                "sha256 of {} is {}, the policy expects {}",
                path.display(),
                hex(&got),
                hex(want)
            )),
        ),
        Err(e) => (
            None,
            Verified::Mismatch(format!("cannot read {}: {e}", path.display())),
        ),
    }
}

/// One selector of one agent, as armed (or waiting) on this host.
pub struct Armed {
    pub agent: String,
    pub kind: SelectorKind,
    /// uid, unit name, cgroup path or executable path, as in the policy.
    pub value: String,
    /// Where the policy says so (`file:line:col`).
    pub at: String,
    pub slot: AgentSlot,
    pub state: ArmState,
}

pub enum ArmState {
    /// In the kernel.
    Active,
    /// A cgroup or unit whose cgroup does not exist yet (or could not be armed); retried every
    /// sweep. The text is the last reason reported, so it is reported once.
    Waiting(String),
    /// An executable: armed, with the result of its last digest check.
    Executable {
        path: PathBuf,
        sha256: [u8; 32],
        stamp: Option<FileStamp>,
        verified: Verified,
    },
    /// Resolved to a cgroup (the id is in `AGENT_CGROUPS`).
    Cgroup(ResolvedCgroup),
}

/// What changed in one pass, for the daemon to report.
#[derive(Debug, Default)]
pub struct ArmReport {
    pub armed: Vec<String>,
    pub waiting: Vec<String>,
    /// (agent, message): digest mismatches, loud.
    pub mismatches: Vec<(String, String)>,
    /// A digest that matches again.
    pub restored: Vec<String>,
    pub errors: Vec<String>,
    /// (agent, uid) of `uids` selectors armed in this pass (their processes outside the agent
    /// are reported).
    pub uids_armed: Vec<(String, u32)>,
}

/// Keys of the selector maps the armed selectors own (see `Selected::kernel_keys`).
#[derive(Debug, Default)]
pub struct KernelKeys {
    pub uids: Vec<u32>,
    pub cgroups: Vec<u64>,
    pub files: Vec<ExecFileKey>,
}

/// Every selector of every policy, the uids `run --user` bound, and the kernel configuration they
/// imply.
#[derive(Default)]
pub struct Selected {
    pub all: Vec<Armed>,
    /// Some process was re-tagged by `task start --pid`: the kernel must look at tags.
    pub tags_in_use: bool,
    /// uids bound to an agent by `run --user` (entries of the same kernel map as `uids` selectors).
    pub bound: Bindings,
    /// Which set of selectors this is (one more at each reload): a host probe taken from an
    /// earlier set is not applied to this one.
    pub generation: u64,
}

const NOT_CHECKED: &str = "not checked yet";

impl Selected {
    /// Builds the list from the policies. `slot_for(agent)` gives the kernel slot of the agent's
    /// `default` task.
    pub fn from_policies(
        policies: &PolicySet,
        mut slot_for: impl FnMut(&str) -> AgentSlot,
    ) -> Selected {
        let mut all = Vec::new();
        for p in policies.iter() {
            let s = p.selectors();
            if s.is_empty() {
                continue;
            }
            let base = slot_for(p.agent());
            let mut push = |kind: SelectorKind, value: String, at: String, state: ArmState| {
                all.push(Armed {
                    agent: p.agent().to_string(),
                    kind,
                    value,
                    at,
                    slot: AgentSlot {
                        source: kind.source(),
                        ..base
                    },
                    state,
                });
            };
            let waiting = || ArmState::Waiting(String::new());
            for u in &s.uids {
                push(
                    SelectorKind::Uid,
                    u.value.to_string(),
                    u.at.to_string(),
                    waiting(),
                );
            }
            for u in &s.systemd_units {
                push(
                    SelectorKind::SystemdUnit,
                    u.value.clone(),
                    u.at.to_string(),
                    waiting(),
                );
            }
            for c in &s.cgroups {
                push(
                    SelectorKind::Cgroup,
                    c.value.clone(),
                    c.at.to_string(),
                    waiting(),
                );
            }
            for e in &s.executables {
                push(
                    SelectorKind::Executable,
                    e.value.path.clone(),
                    e.at.to_string(),
                    ArmState::Executable {
                        path: PathBuf::from(&e.value.path),
                        sha256: e.value.sha256,
                        stamp: None,
                        verified: Verified::Mismatch(NOT_CHECKED.into()),
                    },
                );
            }
        }
        Selected {
            all,
            tags_in_use: false,
            bound: Bindings::new(),
            generation: 0,
        }
    }

    /// Who holds `uid` now: a policy's `uids` selector, or a binding.
    pub fn uid_owner(&self, uid: u32) -> Option<Owner<'_>> {
        let value = uid.to_string();
        self.all
            .iter()
            .find(|a| a.kind == SelectorKind::Uid && a.value == value)
            .map(|a| Owner::Selector {
                agent: &a.agent,
                at: &a.at,
            })
            .or_else(|| self.bound.get(&uid).map(Owner::Bound))
    }

    /// Arms what can be armed now and re-checks executables whose file changed (size, times or
    /// inode: a periodic check, every sweep), by what the host said (`probed`, taken from these
    /// selectors by [`Self::probe_plan`]: see [`Self::is_current`]); writes the kernel, does no
    /// other I/O. Called at start, before the control socket opens, at each reload and after
    /// every sweep's probe. `unverified_slot(agent)` is the grantless slot a mismatching
    /// executable's processes get.
    pub fn arm_with(
        &mut self,
        kernel: &mut impl IdentityTables,
        probed: &Probed,
        mut unverified_slot: impl FnMut(&str) -> AgentSlot,
    ) -> ArmReport {
        let mut report = ArmReport::default();
        // cgroups armed so far, for the nesting check of units resolved at run time.
        let mut taken: Vec<(String, String)> = self
            .all
            .iter()
            .filter_map(|a| match &a.state {
                ArmState::Cgroup(c) => Some((a.agent.clone(), c.rel.clone())),
                _ => None,
            })
            .collect();
        // Files armed so far: two agents' selectors may name one file by two paths (a hard link).
        let mut files: Vec<(String, ExecFileKey)> = self
            .all
            .iter()
            .filter_map(|a| match &a.state {
                ArmState::Executable {
                    stamp: Some(st),
                    verified,
                    ..
                } if !matches!(verified, Verified::Refused(_)) => {
                    Some((a.agent.clone(), st.selector_key()))
                }
                _ => None,
            })
            .collect();
        for a in &mut self.all {
            let what = format!(
                "{} selector {:?} of agent {} ({})",
                a.kind, a.value, a.agent, a.at
            );
            match (&mut a.state, a.kind) {
                (ArmState::Waiting(_), SelectorKind::Uid) => {
                    let uid: u32 = a.value.parse().unwrap_or(u32::MAX);
                    match kernel.set_uid_selector(uid, a.slot) {
                        Ok(()) => {
                            a.state = ArmState::Active;
                            report.armed.push(what);
                            report.uids_armed.push((a.agent.clone(), uid));
                        }
                        Err(e) => report.errors.push(format!("{what}: {e:#}")),
                    }
                }
                (ArmState::Waiting(last), SelectorKind::Cgroup | SelectorKind::SystemdUnit) => {
                    let mut once = |list: &mut Vec<String>, why: String| {
                        if *last != why {
                            list.push(format!("{what}: {why}"));
                            *last = why;
                        }
                    };
                    let rel = if a.kind == SelectorKind::SystemdUnit {
                        match probed.unit(&a.value) {
                            Ok(rel) => rel.map(str::to_string),
                            Err(e) => {
                                once(&mut report.errors, e.to_string());
                                continue;
                            }
                        }
                    } else {
                        Some(a.value.clone())
                    };
                    let Some((cg, holder)) = rel.as_deref().and_then(|r| probed.cgroup(r)).cloned()
                    else {
                        once(
                            &mut report.waiting,
                            "its cgroup does not exist yet; armed when it appears".into(),
                        );
                        continue;
                    };
                    if let Some(who) = holder {
                        once(
                            &mut report.errors,
                            format!(
                                "cgroup {} holds {who}: not armed (a selector must not capture the host)",
                                cg.rel
                            ),
                        );
                        continue;
                    }
                    if let Some((other, rel)) = taken
                        .iter()
                        .find(|(other, rel)| *other != a.agent && nested(rel, &cg.rel))
                    {
                        once(
                            &mut report.errors,
                            format!(
                                "cgroup {} overlaps cgroup {rel} of agent {other}: not armed (a process would match two agents)",
                                cg.rel
                            ),
                        );
                        continue;
                    }
                    if cg.level >= MAX_SELECTOR_LEVEL {
                        once(
                            &mut report.errors,
                            format!(
                                "cgroup {} is {} levels deep; selectors reach {} levels",
                                cg.rel,
                                cg.level,
                                MAX_SELECTOR_LEVEL - 1
                            ),
                        );
                        continue;
                    }
                    match kernel.add_agent_cgroup(cg.id, a.slot) {
                        Ok(()) => {
                            report.armed.push(format!(
                                "{what}: cgroup {} (id {}, level {})",
                                cg.rel, cg.id, cg.level
                            ));
                            taken.push((a.agent.clone(), cg.rel.clone()));
                            a.state = ArmState::Cgroup(cg);
                        }
                        Err(e) => once(&mut report.errors, format!("{e:#}")),
                    }
                }
                (
                    ArmState::Executable {
                        path,
                        sha256: _,
                        stamp: last_stamp,
                        verified,
                    },
                    _,
                ) => {
                    let Some(file) = probed.file(path) else {
                        continue;
                    };
                    if file.now.is_some() && file.now == *last_stamp {
                        continue;
                    }
                    // Not read: the probe saw this stamp as the last one read; the next pass does.
                    let Some((read, result)) = file.read.clone() else {
                        continue;
                    };
                    // The kernel matches the file that runs (device, inode): a replaced file is a
                    // new key, the old one goes.
                    if let Some(old) = last_stamp.take()
                        && read.is_none_or(|r| r.selector_key() != old.selector_key())
                        && let Err(e) = kernel.remove_exec_selector(old.selector_key())
                    {
                        report.errors.push(format!("{what}: {e:#}"));
                    }
                    *last_stamp = read;
                    let slot = match result {
                        Verified::Match => a.slot,
                        Verified::Mismatch(_) | Verified::Refused(_) => AgentSlot {
                            source: a.slot.source,
                            ..unverified_slot(&a.agent)
                        },
                    };
                    if let Some(r) = read {
                        let key = r.selector_key();
                        if let Some((other, _)) =
                            files.iter().find(|(o, k)| *o != a.agent && *k == key)
                        {
                            let why = format!(
                                "the same file is selected by agent {other}: not armed (a process would match two agents)"
                            );
                            report.errors.push(format!("{what}: {why}"));
                            *verified = Verified::Refused(why);
                            continue;
                        }
                        if let Err(e) = kernel.set_exec_selector(key, slot) {
                            report.errors.push(format!("{what}: {e:#}"));
                            continue;
                        }
                        files.push((a.agent.clone(), key));
                    }
                    match (&result, &*verified) {
                        (Verified::Mismatch(m) | Verified::Refused(m), _) => report.mismatches.push((
                            a.agent.clone(),
                            format!(
                                "{what}: {m}; processes exec'ing it become task `unverified`, which is never granted anything"
                            ),
                        )),
                        (Verified::Match, Verified::Mismatch(m)) if m != NOT_CHECKED => report
                            .restored
                            .push(format!("{what}: sha256 matches again")),
                        (Verified::Match, _) => {
                            report.armed.push(format!("{what}: sha256 verified"))
                        }
                    }
                    *verified = result;
                }
                _ => {}
            }
        }
        report
    }

    /// The kernel entries the armed selectors own: what a re-arm keeps, everything else of the
    /// selector maps is stale.
    pub fn kernel_keys(&self) -> KernelKeys {
        let mut k = KernelKeys {
            uids: self.bound.keys().copied().collect(),
            ..KernelKeys::default()
        };
        for a in &self.all {
            match (&a.state, a.kind) {
                (ArmState::Active, SelectorKind::Uid) => {
                    if let Ok(uid) = a.value.parse() {
                        k.uids.push(uid);
                    }
                }
                (ArmState::Cgroup(cg), _) => k.cgroups.push(cg.id),
                (
                    ArmState::Executable {
                        stamp: Some(st),
                        verified,
                        ..
                    },
                    _,
                ) if !matches!(verified, Verified::Refused(_)) => k.files.push(st.selector_key()),
                _ => {}
            }
        }
        k
    }

    /// The kernel's view: which selector kinds are armed, and at which cgroup levels.
    pub fn config(&self) -> IdentityConfig {
        let mut c = IdentityConfig::default();
        for a in &self.all {
            match (&a.state, a.kind) {
                (ArmState::Cgroup(cg), _) => {
                    c.selectors |= SELECT_CGROUPS;
                    c.ancestor_levels |= 1 << cg.level;
                }
                (ArmState::Active, SelectorKind::Uid) => c.selectors |= SELECT_UIDS | SELECT_TAGS,
                (ArmState::Executable { .. }, _) => c.selectors |= SELECT_EXECUTABLES | SELECT_TAGS,
                _ => {}
            }
        }
        if self.tags_in_use {
            c.selectors |= SELECT_TAGS;
        }
        if !self.bound.is_empty() {
            c.selectors |= SELECT_UIDS | SELECT_TAGS;
        }
        c
    }

    /// The agent a process in cgroup `cgroup` (path below the root) belongs to by a cgroup or
    /// unit selector: the deepest armed selector cgroup containing it, as the kernel looks.
    pub fn by_cgroup(&self, cgroup: &str) -> Option<AgentSlot> {
        self.all
            .iter()
            .filter_map(|a| match &a.state {
                ArmState::Cgroup(cg)
                    if cgroup == cg.rel || cgroup.starts_with(&format!("{}/", cg.rel)) =>
                {
                    Some((cg.level, a.slot))
                }
                _ => None,
            })
            .max_by_key(|(level, _)| *level)
            .map(|(_, slot)| slot)
    }

    pub fn by_uid(&self, uid: u32) -> Option<AgentSlot> {
        self.all
            .iter()
            .find(|a| {
                a.kind == SelectorKind::Uid
                    && matches!(a.state, ArmState::Active)
                    && a.value == uid.to_string()
            })
            .map(|a| a.slot)
            .or_else(|| self.bound.get(&uid).map(|b| b.slot))
    }

    /// One line per selector of `agent`, for `status`.
    pub fn describe(&self, agent: &str) -> Vec<String> {
        self.all
            .iter()
            .filter(|a| a.agent == agent)
            .map(|a| {
                let state = match &a.state {
                    ArmState::Active => "armed".to_string(),
                    ArmState::Waiting(why) => format!("waiting: {why}"),
                    ArmState::Cgroup(cg) => format!("armed: cgroup {} (id {})", cg.rel, cg.id),
                    ArmState::Executable {
                        verified: Verified::Match,
                        ..
                    } => "armed: sha256 verified".to_string(),
                    ArmState::Executable {
                        verified: Verified::Mismatch(m),
                        ..
                    } => format!("UNVERIFIED: {m}"),
                    ArmState::Executable {
                        verified: Verified::Refused(m),
                        ..
                    } => format!("NOT ARMED: {m}"),
                };
                format!("{} {}: {state}", a.kind, a.value)
            })
            .chain(
                self.bound
                    .iter()
                    .filter(|(_, b)| b.agent == agent)
                    .map(|(uid, b)| format!("uid {uid}: bound by {}", b.origin)),
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level_of("/a"), 1);
        assert_eq!(level_of("/a/b/c"), 3);
    }

    #[test]
    fn digest_match_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        // sha256("abc")
        let want = crate::policy::selectors::parse_sha256(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )
        .unwrap();
        assert_eq!(verify_stamped(&f, &want).1, Verified::Match);
        let s1 = stamp(&f).unwrap();
        std::fs::write(&f, b"abd").unwrap();
        assert!(
            matches!(verify_stamped(&f, &want).1, Verified::Mismatch(m) if m.contains("policy expects ba78"))
        );
        assert_ne!(stamp(&f).unwrap(), s1);
        assert!(
            matches!(verify_stamped(&dir.path().join("nope"), &want).1, Verified::Mismatch(m) if m.contains("cannot read"))
        );
    }

    #[test]
    fn unit_found_by_directory_name_once() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("system.slice/bot.service")).unwrap();
        std::fs::create_dir_all(root.path().join("other.slice/x.service")).unwrap();
        if Path::new("/run/systemd/system").is_dir() {
            return; // systemd hosts ask systemctl instead
        }
        assert_eq!(
            resolve_unit(root.path(), "bot.service").unwrap(),
            Some("/system.slice/bot.service".into())
        );
        assert_eq!(resolve_unit(root.path(), "none.service").unwrap(), None);
        std::fs::create_dir_all(root.path().join("user.slice/bot.service")).unwrap();
        assert!(
            resolve_unit(root.path(), "bot.service")
                .unwrap_err()
                .to_string()
                .contains("several")
        );
    }
}
