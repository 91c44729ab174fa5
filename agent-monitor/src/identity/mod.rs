//! Agent identity: the cgroups that make a process an agent, selectors, tasks and their grants,
//! control-socket peers, and the process table that names the chain from an agent's root process to the acting one.

mod cgroup;
pub mod directory;
pub mod grant_state;
pub mod host_capture;
pub mod peer;
mod process;
pub mod procfs;
pub mod selected;
pub mod tables;
pub mod tasks;
pub mod uid_binding;

pub use cgroup::{AgentCgroups, TaskCgroup};
pub use directory::{IdentityDirectory, ProcessIdentity};
pub use peer::Peer;
pub use process::ProcessTable;
pub use tasks::{DEFAULT_TASK, TaskNumbers, Tasks, UNVERIFIED_TASK};

/// An agent's stable id in the kernel's identity maps: FNV-1a of its name. Stable across reloads
/// and restarts (what moves is the allowlist index the kernel looks up for it in `AGENT_TABLES`),
/// so identities the kernel copies (e.g. to a forked child) never go stale. Two agents of one
/// policy set with the same id are refused at load (see the daemon's `apply_policies`).
pub fn agent_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A task id that cannot be one (see [`check_task_id`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid task id {0:?}: expected 1-64 characters of A-Z a-z 0-9 _ - . not starting with '.'"
)]
pub struct InvalidTaskId(pub String);

/// Checks a task id: it becomes a cgroup directory name and a journald field value.
pub fn check_task_id(task: &str) -> Result<(), InvalidTaskId> {
    let ok_len = !task.is_empty() && task.len() <= 64;
    let ok_chars = task
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok_len && ok_chars && !task.starts_with('.') {
        Ok(())
    } else {
        Err(InvalidTaskId(task.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn agent_ids_are_stable_and_distinct() {
        use super::agent_id;
        // FNV-1a 32 reference values: the id must not change between releases.
        assert_eq!(agent_id(""), 0x811c_9dc5);
        assert_eq!(agent_id("a"), 0xe40c_292c);
        assert_ne!(agent_id("coder"), agent_id("coder2"));
    }

    #[test]
    fn task_ids() {
        use super::check_task_id as c;
        assert!(c("build-42").is_ok());
        assert!(c("T.1_a").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(c(bad).is_err(), "{bad:?} accepted");
        }
    }
}
