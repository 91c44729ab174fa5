//! Exec approvals in the kernel. A `once` or `task` approval of a held exec becomes an exec grant
//! of the task keyed by the file `run` held (device, inode), so the kernel allows that file and
//! not another one put at its path later. A script is the exception: when the kernel judges an
//! exec (`sched_process_exec`) it holds the interpreter's file, no longer the script's, so a
//! script's approval is a grant of its name that allows it as a script only
//! (`SCRIPT_NAME_GRANT`), never as a program. This book knows every such grant and its expiry,
//! to take it out of the kernel again (at its expiry, at `task end`, after the released exec of
//! a `once` script grant) and to say why the kernel allowed an exec. Pure apart from
//! [`held_file`]: the kernel is an [`ExecGrantTables`].

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;

use agent_monitor_common::{
    ExecFileKey, Expiry, FILE_GRANT_ONCE, FILE_GRANT_UNTIL_EXPIRY, FileGrant, SCRIPT_NAME_GRANT,
    kernel_dev,
};

use crate::policy::KernelTables;

/// The kernel's exec grant maps as this book writes them. Implemented by `crate::bpf::Kernel`
/// and by an in-memory fake in the tests.
pub(crate) trait ExecGrantTables {
    fn set_file_grant(&mut self, key: ExecFileKey, grant: FileGrant) -> anyhow::Result<()>;
    /// Removes one; one already gone (a `once` grant the kernel used) is fine.
    fn remove_file_grant(&mut self, key: ExecFileKey) -> anyhow::Result<()>;
    /// Writes name grants (the task exec grant trie), each until `expiry`.
    fn set_name_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()>;
    fn remove_name_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()>;
}

impl ExecGrantTables for crate::bpf::Kernel {
    fn set_file_grant(&mut self, key: ExecFileKey, grant: FileGrant) -> anyhow::Result<()> {
        self.set_exec_file_grant(key, grant)
    }
    fn remove_file_grant(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        self.remove_exec_file_grant(key)
    }
    fn set_name_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        self.set_task_grants(tables, expiry)
    }
    fn remove_name_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        self.remove_task_grants(tables)
    }
}

/// The file of a held exec as the daemon finds it at the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldFile {
    /// `st_dev` (user space encoding) and `st_ino`.
    pub(crate) device: u64,
    pub(crate) inode: u64,
    /// Starts with `#!`: the kernel runs its interpreter and judges the script by name.
    pub(crate) script: bool,
}

/// Why a held exec cannot be approved by file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeldFileError {
    #[error("the held exec's file {path} cannot be read now: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the file at {path} changed since the call was held (device {device} inode {inode}, now \
         device {now_device} inode {now_inode})"
    )]
    Changed {
        path: String,
        device: u64,
        inode: u64,
        now_device: u64,
        now_inode: u64,
    },
    #[error("{0} is not a regular file now")]
    NotRegular(String),
    #[error("the held exec names no file (device and inode); only --always can approve it")]
    NoFile,
    #[error("{0} is not a path an exec grant can name exactly")]
    NotExact(String),
}

/// Checks that `path` is the file `run` held (`device`, `inode`); a file swapped in while the
/// call waited is refused. Whether it is a script is read from an open file checked again, so
/// what is checked is what is read. Nothing but the held (regular) file is opened, and that
/// without blocking: a FIFO or a device the agent put at the path cannot stall the daemon.
pub(crate) fn held_file(path: &str, device: u64, inode: u64) -> Result<HeldFile, HeldFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let unreadable = |source| HeldFileError::Unreadable {
        path: path.to_string(),
        source,
    };
    let changed = |meta: &std::fs::Metadata| HeldFileError::Changed {
        path: path.to_string(),
        device,
        inode,
        now_device: meta.dev(),
        now_inode: meta.ino(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if (meta.dev(), meta.ino()) != (device, inode) {
        return Err(changed(&meta));
    }
    // `run` holds execs of regular files only; an inode number the file system reused is not it.
    if !meta.is_file() {
        return Err(HeldFileError::NotRegular(path.to_string()));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if (meta.dev(), meta.ino()) != (device, inode) {
        return Err(changed(&meta));
    }
    let mut magic = [0u8; 2];
    let script = file.read_exact(&mut magic).is_ok() && magic == *b"#!";
    Ok(HeldFile {
        device,
        inode,
        script,
    })
}

/// What a grant is in the kernel.
#[derive(Clone)]
enum Kind {
    /// `TASK_EXEC_FILE_GRANTS` entry.
    File(ExecFileKey),
    /// A script-only name entry in the task exec grant trie.
    Script(KernelTables),
}

struct Entry {
    /// The request the approval decided.
    id: u64,
    task: u32,
    path: String,
    file: HeldFile,
    once: bool,
    expires_ns: u64,
    kind: Kind,
}

impl Entry {
    fn same_kernel_entry(&self, other: &Kind) -> bool {
        match (&self.kind, other) {
            (Kind::File(a), Kind::File(b)) => a == b,
            (Kind::Script(a), Kind::Script(b)) => a
                .exec
                .iter()
                .zip(&b.exec)
                .all(|(x, y)| x.0 == y.0 && x.1.agent == y.1.agent && x.1.path == y.1.path),
            _ => false,
        }
    }

    fn remove(&self, kernel: &mut impl ExecGrantTables) -> anyhow::Result<()> {
        match &self.kind {
            Kind::File(key) => kernel.remove_file_grant(*key),
            Kind::Script(tables) => kernel.remove_name_grants(tables),
        }
    }

    fn describe(&self) -> String {
        format!(
            "exec {} (device {} inode {}{}), approved by ask request {}{}",
            self.path,
            self.file.device,
            self.file.inode,
            if self.file.script { ", a script" } else { "" },
            self.id,
            if self.once { " for one exec" } else { "" }
        )
    }
}

/// The released exec a record reports, as [`ExecGrants::saw_exec`] needs it.
pub(crate) struct SeenExec<'a> {
    pub(crate) task: u32,
    /// Kernel encoding of the device of the file that ran, and its inode.
    pub(crate) file_dev: u32,
    pub(crate) file_ino: u64,
    pub(crate) path: &'a str,
    /// Set for a script (the program that ran is its interpreter).
    pub(crate) script: bool,
}

/// Every exec grant an ask approval wrote, until it leaves the kernel.
#[derive(Default)]
pub(crate) struct ExecGrants {
    entries: Vec<Entry>,
}

impl ExecGrants {
    /// Writes the kernel entry approving request `id`: task `task` may exec `file` (held at
    /// `path`) until `expires_ns`, or once. An earlier grant of the same kernel entry is
    /// replaced (the kernel's write overwrites it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn grant(
        &mut self,
        kernel: &mut impl ExecGrantTables,
        id: u64,
        task: u32,
        path: &str,
        file: HeldFile,
        once: bool,
        expires_ns: u64,
    ) -> anyhow::Result<()> {
        let expiry = Expiry { expires_ns };
        let kind = if file.script {
            let (_, rules) = crate::policy::parse_grants(&[], &[path.to_string()])?;
            if rules.iter().any(|r| r.prefix_glob()) {
                return Err(HeldFileError::NotExact(path.to_string()).into());
            }
            let mut tables = crate::policy::compile_grants(task, "", &[], &rules)?;
            for (_, key) in &mut tables.exec {
                key.agent |= SCRIPT_NAME_GRANT;
            }
            kernel.set_name_grants(&tables, expiry)?;
            Kind::Script(tables)
        } else {
            let key = ExecFileKey {
                agent: task,
                dev: kernel_dev(libc::major(file.device), libc::minor(file.device)),
                ino: file.inode,
            };
            let grant = FileGrant {
                expiry,
                uses: if once {
                    FILE_GRANT_ONCE
                } else {
                    FILE_GRANT_UNTIL_EXPIRY
                },
                _pad: 0,
            };
            kernel.set_file_grant(key, grant)?;
            Kind::File(key)
        };
        self.entries.retain(|e| !e.same_kernel_entry(&kind));
        self.entries.push(Entry {
            id,
            task,
            path: path.to_string(),
            file,
            once,
            expires_ns,
            kind,
        });
        Ok(())
    }

    /// Whether a grant of task `task` already allows an exec of `path` resolved to (`device`,
    /// `inode`) at `now_ns`, without asking: the same file (and for a script, the same name).
    /// A `once` grant never does: it is its own request's.
    pub(crate) fn covers(
        &self,
        task: u32,
        path: &str,
        device: u64,
        inode: u64,
        now_ns: u64,
    ) -> bool {
        self.entries.iter().any(|e| {
            e.task == task
                && !e.once
                && now_ns < e.expires_ns
                && (e.file.device, e.file.inode) == (device, inode)
                && (!e.file.script || e.path == path)
        })
    }

    /// The earliest expiry, CLOCK_MONOTONIC ns.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.entries
            .iter()
            .map(|e| e.expires_ns)
            .filter(|&t| t != u64::MAX)
            .min()
    }

    /// Removes the grants whose time is over (the kernel refuses them already); returns how
    /// many went.
    pub(crate) fn expire(&mut self, kernel: &mut impl ExecGrantTables, now_ns: u64) -> usize {
        self.remove_where(kernel, |e| e.expires_ns <= now_ns)
    }

    /// `task end`: removes every grant of task `task`; returns how many went.
    pub(crate) fn end_task(&mut self, kernel: &mut impl ExecGrantTables, task: u32) -> usize {
        self.remove_where(kernel, |e| e.task == task)
    }

    /// An exec the kernel allowed by a task grant: says which approval allowed it, if one of
    /// these did. A `once` script grant is removed here (the kernel removed a `once` file grant
    /// itself as it allowed the exec; its entry here goes at its expiry, so a new approval of
    /// the same file in the meantime is not taken out by this record).
    pub(crate) fn saw_exec(
        &mut self,
        kernel: &mut impl ExecGrantTables,
        seen: &SeenExec,
    ) -> Option<String> {
        let at = self.entries.iter().position(|e| {
            e.task == seen.task
                && match &e.kind {
                    Kind::File(key) => (key.dev, key.ino) == (seen.file_dev, seen.file_ino),
                    Kind::Script(_) => seen.script && e.path == seen.path,
                }
        })?;
        let reason = self.entries[at].describe();
        if self.entries[at].once && matches!(self.entries[at].kind, Kind::Script(_)) {
            let e = self.entries.swap_remove(at);
            if let Err(why) = e.remove(kernel) {
                tracing::warn!("removing a used once approval's kernel entry: {why:#}");
            }
        }
        Some(reason)
    }

    /// The grants of task `task` as `status` shows them, with their expiry.
    pub(crate) fn of_task(&self, task: u32) -> impl Iterator<Item = (String, u64)> + '_ {
        self.entries
            .iter()
            .filter(move |e| e.task == task)
            .map(|e| (e.describe(), e.expires_ns))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn remove_where(
        &mut self,
        kernel: &mut impl ExecGrantTables,
        gone: impl Fn(&Entry) -> bool,
    ) -> usize {
        let (out, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(gone);
        self.entries = keep;
        for e in &out {
            if let Err(why) = e.remove(kernel) {
                tracing::warn!("removing the kernel entry of ask request {}: {why:#}", e.id);
            }
        }
        out.len()
    }
}

#[cfg(test)]
#[path = "exec_grants_tests.rs"]
mod tests;
