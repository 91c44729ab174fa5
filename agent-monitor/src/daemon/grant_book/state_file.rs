//! The grant state file: where the grants in force are kept for a restarted daemon, and how
//! writing it went.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::identity::grant_state;
use crate::identity::tasks::Tasks;
use crate::output::FailureThrottle;

/// Why the grant state file cannot be used, read or written. I/O errors are shared (`Arc`) so
/// the reason this boot cannot use the file is kept once and given to every load and save.
#[derive(Clone, Debug, thiserror::Error)]
pub(in crate::daemon) enum StateFileError {
    /// A second daemon (on a private pin directory) left at the default path.
    #[error(
        "{} holds the grants of the daemon on pin directory {owner}; give this one its own \
         --state-file",
        path.display()
    )]
    OtherOwner { path: PathBuf, owner: String },
    #[error("reading {}: {reason}", grant_state::BOOT_ID_PATH)]
    BootId { reason: Arc<std::io::Error> },
    #[error(
        "no grant state file {} (first start with --state-file, or it was removed)",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error(transparent)]
    State(#[from] grant_state::StateError),
    #[error("{reason}")]
    Write { reason: Arc<std::io::Error> },
}

/// The grant state file (see [`grant_state`]) and how writing it went. A failed write never fails
/// the grant change (the kernel is the truth): it is counted (`status`, metrics: sink
/// `grant-state-file`), logged once per burst, and at worst a restarted daemon revokes grants it
/// could have kept.
pub(in crate::daemon) struct GrantStateFile {
    path: PathBuf,
    pin_dir: PathBuf,
    /// This boot's id (written into the file), or why the file cannot be used at all.
    boot_id: Result<String, StateFileError>,
    written: u64,
    failed: u64,
    throttle: FailureThrottle,
}

impl GrantStateFile {
    const SINK: &'static str = "grant-state-file";

    pub(in crate::daemon) fn new(path: &Path, pin_dir: &Path) -> Self {
        let boot_id = match grant_state::other_owner(path, pin_dir) {
            // A second daemon (on a private pin directory) left at the default path must not
            // clobber the first one's grants: it keeps none across restarts instead.
            Some(owner) => {
                let why = StateFileError::OtherOwner {
                    path: path.to_path_buf(),
                    owner,
                };
                tracing::warn!("{why}");
                Err(why)
            }
            None => grant_state::boot_id().map_err(|e| StateFileError::BootId {
                reason: Arc::new(e),
            }),
        };
        Self::with_boot_id(path, pin_dir, boot_id)
    }

    /// A file for this boot (`Err`: why none can be used).
    pub(super) fn with_boot_id(
        path: &Path,
        pin_dir: &Path,
        boot_id: Result<String, StateFileError>,
    ) -> Self {
        GrantStateFile {
            path: path.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            boot_id,
            written: 0,
            failed: 0,
            throttle: FailureThrottle::default(),
        }
    }

    /// The predecessor's records, or why there are none to use.
    pub(super) fn load(&self) -> Result<Vec<grant_state::Recorded>, StateFileError> {
        let boot_id = self.boot_id.as_ref().map_err(Clone::clone)?;
        match grant_state::read(&self.path)? {
            Some(text) => Ok(grant_state::decode(
                &self.path,
                &text,
                boot_id,
                &self.pin_dir,
            )?),
            None => Err(StateFileError::Missing {
                path: self.path.clone(),
            }),
        }
    }

    /// Rewrites the file with the grants in force in `tasks`.
    pub(super) fn save(&mut self, tasks: &Tasks) {
        let now = Instant::now();
        let result = self.boot_id.clone().and_then(|boot_id| {
            let text = grant_state::encode(&boot_id, &self.pin_dir, grant_state::records(tasks));
            grant_state::write(&self.path, &text).map_err(|e| StateFileError::Write {
                reason: Arc::new(e),
            })
        });
        match result {
            Ok(()) => {
                self.written += 1;
                if let Some(n) = self.throttle.success(now) {
                    tracing::warn!(
                        path = %self.path.display(),
                        unreported_failures = n,
                        total_failed = self.failed,
                        "grant state file written again; failures since the last report: {n}"
                    );
                }
            }
            Err(e) => {
                self.failed += 1;
                if let Some(n) = self.throttle.failure(now, 1) {
                    tracing::warn!(
                        path = %self.path.display(),
                        failures_since_last_report = n,
                        total_failed = self.failed,
                        "cannot write the grant state file (the grants stay in force; a restarted \
                         daemon would revoke them): {e}"
                    );
                }
            }
        }
    }

    /// After a fresh install: the maps hold no grants, so a file left by an earlier daemon of
    /// this pin directory describes none.
    pub(super) fn remove_leftover(&self) {
        match grant_state::remove_if_of(&self.path, &self.pin_dir) {
            Ok(true) => tracing::info!(
                "removed the grant state file {} left by an earlier daemon (its grants went with \
                 its pinned maps)",
                self.path.display()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot remove the stale grant state file {}: {e}",
                self.path.display()
            ),
        }
    }

    /// (sink name, written, failed) for `status` and the metrics.
    pub(super) fn stats(&self) -> (String, u64, u64) {
        (Self::SINK.to_string(), self.written, self.failed)
    }
}
