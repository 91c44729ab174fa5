//! Glue between the monitor and the file guard (`crate::files`): puts each policy set's `[files]`
//! in force, keeps the guard's copy of the selectors current, and turns its reports into
//! `ACTION=open` actions, notices and counters.

use tokio::sync::mpsc;

use super::*;
use crate::action::FileOpen;
use crate::files::{AgentFiles, FileReport, GuardLink, Roster};

/// The guard, or why there is none, and what the monitor last told it.
pub(super) struct FileGuardState {
    guard: Result<GuardLink, String>,
    /// Taken by the event loop.
    pub(super) reports: Option<mpsc::Receiver<FileReport>>,
    /// None until the first push: a guard adopted from a previous daemon holds that daemon's.
    roster: Option<Roster>,
    /// Inodes marked by the last plan put in force.
    pub(super) marked: u64,
}

impl FileGuardState {
    /// Connects to the file-guard process of `pin_dir` (adopting one that outlived a previous
    /// daemon, or starting one). Without it the daemon still runs; a policy with `[files]` is
    /// then refused (see [`Self::check`]).
    pub(super) async fn start(pin_dir: &Path) -> FileGuardState {
        match GuardLink::start(pin_dir).await {
            Ok((guard, reports)) => FileGuardState {
                guard: Ok(guard),
                reports: Some(reports),
                roster: None,
                marked: 0,
            },
            Err(e) => {
                tracing::warn!("file guard not available: {e:#}");
                FileGuardState {
                    guard: Err(format!("{e:#}")),
                    reports: None,
                    roster: None,
                    marked: 0,
                }
            }
        }
    }

    /// A set with `[files]` rules needs the guard.
    pub(super) fn check(&self, set: &PolicySet) -> anyhow::Result<()> {
        if let Err(why) = &self.guard
            && let Some(p) = set.iter().find(|p| !p.files().is_empty())
        {
            bail!(
                "agent {:?} ({}) has [files] rules, but the file guard is not running: {why}",
                p.agent(),
                p.origin().display()
            );
        }
        Ok(())
    }

    /// Reports the guard could not hand over (queue full).
    pub(super) fn lost(&self) -> u64 {
        self.guard.as_ref().map_or(0, GuardLink::lost)
    }

    /// Tells the guard this daemon decides held opens of ask-mode agents within `timeout`.
    pub(super) fn set_asking(&self, timeout: Duration) {
        if let Ok(g) = &self.guard {
            g.set_asking(timeout);
        }
    }

    /// The task approvals of opens in force, whole.
    pub(super) fn set_grants(&self, grants: Vec<crate::files::FileGrant>) {
        if let Ok(g) = &self.guard {
            g.set_grants(grants);
        }
    }

    /// What answers the guard's held opens.
    pub(super) fn decider(&self) -> Option<crate::files::GuardDecider> {
        self.guard.as_ref().ok().map(GuardLink::decider)
    }
}

impl Monitor {
    /// Puts the live set's `[files]` in force (off the loop: the guard's walker lists and marks;
    /// the old marks stay until the new ones are in place).
    pub(super) fn apply_file_rules(&mut self) {
        self.sync_file_roster();
        let Ok(guard) = &self.files.guard else {
            return;
        };
        let agents = self
            .generations
            .live()
            .iter()
            .map(|p| AgentFiles {
                agent: p.agent().to_string(),
                mode: p.mode(),
                rules: p.files().clone(),
            })
            .collect();
        guard.apply(agents);
    }

    /// Hands the guard the selectors in force when they changed.
    pub(super) fn sync_file_roster(&mut self) {
        let Ok(guard) = &self.files.guard else {
            return;
        };
        let agents = self.generations.live().iter().map(|p| p.agent());
        let roster = Roster::from_selected(&self.ident.selected, agents);
        if self.files.roster.as_ref() != Some(&roster) {
            guard.set_roster(roster.clone());
            self.files.roster = Some(roster);
        }
    }

    pub(super) fn on_file_report(&mut self, report: FileReport) {
        match report {
            FileReport::Open(o) => {
                // The chain is the process's; a thread is reported as its process.
                let pid = if o.pid != 0 { o.pid } else { o.tid };
                // The guard's task was read while the opener waited; the pid may be gone by now.
                let task = o.task.clone().unwrap_or_else(|| {
                    self.identify(pid)
                        .map_or_else(|| "none".to_string(), |id| self.names(&id.slot).1)
                });
                let exe = self
                    .ident
                    .exe(pid)
                    .map(str::to_string)
                    .or_else(|| identity::procfs::exe(pid).map(|p| p.display().to_string()));
                let (dev, ino) = o.file;
                let mut reason = format!(
                    "{}: the agent may not open this file (judged by the file itself: device \
                     {}:{} inode {ino})",
                    o.rule,
                    libc::major(dev),
                    libc::minor(dev)
                );
                // Ask mode, decided by the guard itself (or allowed by a task approval).
                if let Some(why) = &o.held {
                    reason = format!("{reason}; {why}");
                }
                let action = Action {
                    // When the guard answered: a report it kept while no daemon ran comes later.
                    time: o.time,
                    chain: self.ident.chain(pid, &o.comm),
                    spiffe_id: self.spiffe_id(&o.agent),
                    agent: o.agent,
                    task,
                    verdict: o.verdict,
                    pid,
                    uid: o.uid,
                    comm: o.comm,
                    exe,
                    object: Object::Open(FileOpen {
                        path: o.path,
                        open_flags: o.open_flags,
                    }),
                    enforcement: (o.verdict == Verdict::Denied).then_some("eperm"),
                    reason,
                };
                self.reporter.action(action);
            }
            FileReport::Applied(a) => {
                self.files.marked = a.marked as u64;
                tracing::info!(
                    agents = a.agents,
                    marked = a.marked,
                    unmarked = a.removed,
                    "[files] in force: files and directories denied to agents are marked"
                );
                for p in a.problems {
                    tracing::warn!("[files]: {p}");
                }
            }
            FileReport::Problem(p) => tracing::warn!("{p}"),
            FileReport::Hold(h) => self.on_file_hold(h),
        }
    }
}
