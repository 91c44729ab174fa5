//! The file guard: agents may not open the files their `[files]` denies. A fanotify group with
//! inode marks on every denied file and directory makes the kernel ask before each open of
//! them; a dedicated thread answers from a snapshot (refused for an enforce agent, allowed and
//! reported for an alert agent, allowed at once for everyone else). See docs/files.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::action::Verdict;

mod book;
mod flags;
mod guard;
mod holds;
mod judge;
mod kernel;
mod link;
mod plan;
mod roster;
mod service;
mod wire;

pub use book::Applied;
pub use holds::{FileGrant, HeldOpen};
pub use judge::FileId;
pub use link::{GuardDecider, GuardLink};
pub use plan::AgentFiles;
pub use roster::Roster;
pub use service::{FileGuardArgs, main as guard_main, stop as stop_guard};

/// Reports waiting for the daemon's loop at most; more are counted as lost.
const REPORT_QUEUE: usize = 4096;

/// A judged open of a denied file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenReport {
    /// When the guard answered (a report kept while the daemon was down arrives later).
    pub time: std::time::SystemTime,
    pub tid: u32,
    /// 0 when the process was gone before it could be read.
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub agent: String,
    /// The task of a `run` agent, read while the opener waited (absent from an older guard's
    /// reports: the daemon then asks the opener's cgroup, which may be gone).
    #[serde(default)]
    pub task: Option<String>,
    #[serde(with = "wire::verdict_name")]
    pub verdict: Verdict,
    /// The rule that denies the file, as the reason names it.
    pub rule: String,
    /// The file's path as the kernel names it for the guard (readlink of the event's descriptor).
    pub path: String,
    /// What the opener asked for, as far as the guard could read it (see `flags.rs`).
    pub open_flags: String,
    pub file: FileId,
    /// For an ask-mode agent's open the guard decided itself (no daemon to ask, too many held,
    /// no decision in time) or let through by a task approval: why, as the report says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// What the guard tells the daemon.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "report", content = "of", rename_all = "snake_case")]
pub enum FileReport {
    Open(OpenReport),
    /// A plan was put in force.
    Applied(Applied),
    /// Something the operator should know (a file that could not be marked, an overflow).
    Problem(String),
    /// An ask-mode agent's open, held until the daemon decides (`FileGuard::decide`).
    Hold(HeldOpen),
}

/// The daemon's handle on the guard and walker threads. Dropping it stops both and closes the
/// fanotify group: every mark goes, opens are no longer judged (see docs/files.md, "When the
/// daemon is down").
pub struct FileGuard {
    commands: mpsc::Sender<guard::Command>,
    walker: mpsc::Sender<guard::WalkJob>,
    wake: Arc<guard::Wake>,
    threads: Vec<JoinHandle<()>>,
    lost: Arc<AtomicU64>,
}

impl FileGuard {
    /// Creates the fanotify group and starts the threads; reports arrive on the returned
    /// receiver. `tags` reads the executable selectors' per-thread tags (None: such agents are
    /// judged as outside every agent, see docs/files.md).
    pub fn start(
        tags: Option<crate::bpf::ThreadTags>,
    ) -> anyhow::Result<(FileGuard, tokio::sync::mpsc::Receiver<FileReport>)> {
        use anyhow::Context as _;
        let kernel = kernel::Kernel::new()
            .context("creating the fanotify group (FAN_CLASS_CONTENT; needs CAP_SYS_ADMIN)")?;
        let wake = Arc::new(guard::Wake::new().context("creating the file guard's eventfd")?);
        let (tx, rx) = tokio::sync::mpsc::channel(REPORT_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let reports = guard::Reports {
            tx,
            lost: lost.clone(),
        };
        let (commands, command_rx) = mpsc::channel();
        let (walker, walk_rx) = mpsc::channel();
        let guard_thread = {
            let (wake, walker, reports) = (wake.clone(), walker.clone(), reports.clone());
            std::thread::Builder::new()
                .name("file-guard".into())
                .spawn(move || guard::run(kernel, command_rx, wake, walker, reports, tags))
                .context("starting the file guard thread")?
        };
        let walker_thread = {
            let (wake, commands) = (wake.clone(), commands.clone());
            std::thread::Builder::new()
                .name("file-walker".into())
                .spawn(move || guard::walk(walk_rx, commands, wake, reports))
                .context("starting the file walker thread")?
        };
        Ok((
            FileGuard {
                commands,
                walker,
                wake,
                threads: vec![guard_thread, walker_thread],
                lost,
            },
            rx,
        ))
    }

    /// Puts the agents' `[files]` in force: listed and marked off the daemon's loop; the outcome
    /// arrives as [`FileReport::Applied`]. Until then the previous marks and judge stay.
    pub fn apply(&self, agents: Vec<AgentFiles>) {
        let _ = self.walker.send(guard::WalkJob::Policies(agents));
    }

    /// The selectors in force changed.
    pub fn set_roster(&self, roster: Roster) {
        if self.commands.send(guard::Command::Roster(roster)).is_ok() {
            self.wake.ring();
        }
    }

    /// The executable selectors' tag map, (re)opened from its pin (a new daemon may have pinned
    /// a new one).
    pub fn set_tags(&self, tags: Option<crate::bpf::ThreadTags>) {
        if self.commands.send(guard::Command::Tags(tags)).is_ok() {
            self.wake.ring();
        }
    }

    /// The daemon's decision of a held open.
    pub fn decide(&self, hold: u64, allow: bool) {
        self.command(guard::Command::Decide { hold, allow });
    }

    /// A daemon that takes held opens is connected, with this ask timeout: ask-mode agents'
    /// opens of denied files are held (until the timeout and a margin at most).
    pub fn set_asking(&self, timeout: std::time::Duration) {
        self.command(guard::Command::Asking(Some(timeout)));
    }

    /// The daemon went away (or another one replaced it): every held open is denied now, and
    /// until a daemon says it takes them again none is held.
    pub fn daemon_gone(&self) {
        self.command(guard::Command::Asking(None));
    }

    /// The task approvals of opens in force (the whole set).
    pub fn set_grants(&self, grants: Vec<FileGrant>) {
        self.command(guard::Command::Grants(grants));
    }

    fn command(&self, c: guard::Command) {
        if self.commands.send(c).is_ok() {
            self.wake.ring();
        }
    }

    /// Reports the daemon's loop did not take in time.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = self.walker.send(guard::WalkJob::Stop);
        let _ = self.commands.send(guard::Command::Stop);
        self.wake.ring();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `policy check`: `files.deny` entries that name nothing on this host now. Valid, but worth a
/// look: a typo denies nothing, and a file created there later is covered only when a denied
/// directory holds it (the guard marks what exists, and what appears in denied directories).
pub fn check_warnings(set: &crate::policy::PolicySet) -> Vec<String> {
    let mut out = Vec::new();
    for p in set {
        for rule in p.files().deny().iter().filter(|r| !r.builtin()) {
            if plan::expand(rule.pattern()).is_empty() {
                out.push(format!(
                    "{}:{}: warning: files.deny {:?} of agent {:?} names nothing on this host \
                     now; it is denied once it exists at the next reload, or at once if a \
                     denied directory holds it",
                    p.origin().display(),
                    rule.line(),
                    rule.pattern(),
                    p.agent()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::{Policy, PolicySet};

    #[test]
    fn check_warns_of_entries_that_name_nothing() {
        let text = "agent = \"coder\"\n[files]\ndeny = [\"/etc\", \"/nonexistent-am-test/*/.env\"]\n\
                    deny_known_secrets = true\n";
        let p = Policy::parse(text, Path::new("p.toml")).expect("valid");
        let set = PolicySet::new(vec![p]).expect("set");
        let w = super::check_warnings(&set);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("p.toml:3: warning: files.deny \"/nonexistent-am-test/*/.env\""),
            "{w:?}"
        );
    }
}
