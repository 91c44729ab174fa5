//! Selectors and uid bindings: arming them in the kernel, carrying them across reloads, tagging processes already running.

use super::*;
use crate::identity::directory::RoomAlarm;
use crate::identity::selected::Probed;

/// Runs a blocking walk of /proc so that it does not hold up the runtime's other tasks.
///
/// The walk's result is needed before the caller goes on: a reload (control request or SIGHUP)
/// answers only once the selectors are armed *and* the processes already running a selected
/// executable are tagged, and a placement's warnings are part of its reply. So the monitor waits
/// for it, in order, as before; what changes is where the waiting happens. On a worker thread of
/// the multi-threaded runtime, `block_in_place` first hands that worker's other tasks (control
/// connections, DNS proxies, the metrics server) to another worker; on the thread that drives
/// `block_on` (where the monitor runs today) it runs the walk with the runtime context left, so
/// the runtime's workers were never involved. Outside a runtime (unit tests) it just runs.
fn off_runtime<R>(walk: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(walk)
        }
        _ => walk(),
    }
}

impl Monitor {
    /// Selectors of the policies in force, armed from scratch (issue 4's `Selected::arm` is
    /// re-runnable): the new set's entries are written over the old (same stable ids), then kernel
    /// entries no selector of the new set owns — left by the previous policy or a previous
    /// daemon — are removed.
    pub(super) fn rearm_selectors(&mut self) {
        self.ident
            .replace_selectors(&mut self.kernel, self.generations.live(), &mut self.grants);
        // The reload answers once the new selectors are armed: the host is asked here, off the
        // runtime's workers (see `off_runtime`); the sweep's passes ask it on a blocking thread.
        let plan = self.ident.arm_plan(&self.cgroup_root);
        let probed = off_runtime(|| plan.run());
        self.arm_selectors(&probed);
        if let Err(e) = self.ident.remove_stale_selectors(&mut self.kernel) {
            tracing::error!("removing selectors of the previous policy: {e:#}");
        }
        match self.tag_running_selected() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                processes = n,
                "running processes of selected executables (and their descendants) are now their agent"
            ),
            Err(e) => tracing::error!("tagging running processes of selected executables: {e:#}"),
        }
    }

    /// Binds `uid` to `agent` for `run --user` (pid `pid`): checked by `place` before the
    /// placement (`arm` says whether it is new), armed before `run` forks its command. Returns the
    /// warnings for `run` (the uid's processes outside the agent, which are the agent now).
    pub(super) fn bind_uid(
        &mut self,
        agent: &str,
        uid: u32,
        pid: u32,
        arm: bool,
    ) -> anyhow::Result<Vec<String>> {
        if arm {
            self.ident.bind_uid(
                &mut self.kernel,
                self.generations.live(),
                &mut self.grants,
                agent,
                uid,
                pid,
            )?;
            tracing::info!(
                uid,
                agent,
                pid,
                "uid bound to the agent by `run --user`: every process of uid {uid} on this host is agent {agent}, whoever starts it"
            );
        }
        // A walk of /proc: off the runtime's workers (see `off_runtime`).
        let found = off_runtime(|| identity::uid_binding::outsiders(uid, agent));
        let warning =
            identity::uid_binding::outsiders_warning(uid, agent, "bound by `run --user`", &found);
        if let Some(w) = &warning {
            tracing::warn!(uid, agent, "{w}");
        }
        Ok(warning.into_iter().collect())
    }

    /// Tags the processes that already run a selected executable (see
    /// `IdentityDirectory::tag_running_selected`). Returns processes tagged.
    pub(super) fn tag_running_selected(&mut self) -> anyhow::Result<usize> {
        self.ident.tag_running_selected(
            &mut self.kernel,
            &LiveProcs,
            self.generations.live(),
            &self.grants,
            || off_runtime(identity::directory::host_snapshot),
        )
    }

    /// Arms what selectors can be armed, re-verifies changed executables, writes the kernel's
    /// selector configuration and reports what changed, by what the host said (`probed`). A
    /// probe taken before a reload replaced the selectors is dropped: the next sweep asks again.
    pub(super) fn arm_selectors(&mut self, probed: &Probed) {
        let Some((report, config)) =
            self.ident
                .arm_selectors(&mut self.kernel, &mut self.grants, probed)
        else {
            tracing::debug!("selector probe answered for replaced selectors: dropped");
            return;
        };
        if let Err(e) = config {
            tracing::error!("writing the selector configuration: {e:#}");
        }
        for a in report.armed {
            tracing::info!("selector armed: {a}");
        }
        for w in report.waiting {
            tracing::info!("selector waiting: {w}");
        }
        for r in report.restored {
            tracing::warn!("selector verified again: {r}");
        }
        for e in report.errors {
            tracing::error!("selector not armed: {e}");
        }
        for (agent, uid) in report.uids_armed {
            let found = off_runtime(|| identity::uid_binding::outsiders(uid, &agent));
            if let Some(w) =
                identity::uid_binding::outsiders_warning(uid, &agent, "a `uids` selector", &found)
            {
                tracing::warn!(uid, agent, "{w}");
            }
        }
        for (agent, m) in report.mismatches {
            tracing::error!(agent, "executable selector digest mismatch: {m}");
            let action = Action {
                time: SystemTime::now(),
                spiffe_id: self.spiffe_id(&agent),
                agent,
                task: UNVERIFIED_TASK.to_string(),
                verdict: Verdict::Alert,
                pid: std::process::id(),
                uid: 0,
                comm: "agent-monitor".into(),
                exe: None,
                object: Object::Identity,
                chain: Vec::new(),
                enforcement: None,
                reason: format!("executable selector digest mismatch: {m}"),
            };
            self.reporter.action(action);
        }
    }

    /// Room in the identity maps: each alarm once per episode (see `identity::directory::room`).
    pub(super) fn check_identity_room(&mut self) {
        let tag_capacity = Some(self.kernel.tag_capacity());
        let pid_max = crate::host::pid_max().map(u64::from);
        for alarm in self.ident.check_room(tag_capacity, pid_max) {
            match alarm {
                RoomAlarm::TasksNearlyFull { used, capacity } => tracing::warn!(
                    used,
                    capacity,
                    "the agent identity map is nearly full; new agent tasks will be refused when it is"
                ),
                RoomAlarm::PidMaxAboveTagRoom { pid_max, capacity } => tracing::error!(
                    pid_max,
                    capacity,
                    "kernel.pid_max was raised above the thread-tag map's capacity: a fork flood of a \
                     selector-identified agent could now fill it; restart after `agent-monitor daemon \
                     --uninstall` to resize"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::off_runtime;

    /// Wherever the monitor runs, a walk neither panics nor is skipped: on `block_on`'s thread
    /// and on a worker of the multi-threaded runtime, on a current-thread runtime (where
    /// `block_in_place` would panic) and outside any runtime.
    #[test]
    fn a_blocking_walk_runs_wherever_it_is_called() {
        assert_eq!(off_runtime(|| 1), 1);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        assert_eq!(multi.block_on(async { off_runtime(|| 2) }), 2);
        let on_worker = multi.block_on(async { tokio::spawn(async { off_runtime(|| 3) }).await });
        assert_eq!(on_worker.unwrap(), 3);
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(single.block_on(async { off_runtime(|| 4) }), 4);
    }
}
