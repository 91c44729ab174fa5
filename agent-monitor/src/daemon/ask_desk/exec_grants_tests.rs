//! Exec approvals by file: what reaches the kernel, what the daemon allows without asking, and
//! when the entries go, against an in-memory kernel.

use agent_monitor_common::{EXEC_KEY_AGENT_BITS, ExecKey};

use super::*;

const S: u64 = 1_000_000_000;

#[derive(Default)]
struct FakeKernel {
    files: Vec<(ExecFileKey, FileGrant)>,
    names: Vec<(u32, ExecKey, Expiry)>,
}

impl ExecGrantTables for FakeKernel {
    fn set_file_grant(&mut self, key: ExecFileKey, grant: FileGrant) -> anyhow::Result<()> {
        self.files.retain(|(k, _)| *k != key);
        self.files.push((key, grant));
        Ok(())
    }
    fn remove_file_grant(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        self.files.retain(|(k, _)| *k != key);
        Ok(())
    }
    fn set_name_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        for (len, key) in &tables.exec {
            self.names.push((*len, *key, expiry));
        }
        Ok(())
    }
    fn remove_name_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        for (len, key) in &tables.exec {
            self.names
                .retain(|(l, k, _)| !(l == len && k.agent == key.agent && k.path == key.path));
        }
        Ok(())
    }
}

/// A binary (not a script) held as device `makedev(8, 1)`, inode `ino`.
fn binary(ino: u64) -> HeldFile {
    HeldFile {
        device: libc::makedev(8, 1),
        inode: ino,
        script: false,
    }
}

fn file_key(task: u32, ino: u64) -> ExecFileKey {
    ExecFileKey {
        agent: task,
        dev: kernel_dev(8, 1),
        ino,
    }
}

#[test]
fn a_held_file_is_approved_only_while_it_is_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool");
    std::fs::write(&path, b"\x7fELF....").unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    let text = path.to_str().unwrap();
    let held = held_file(text, meta.dev(), meta.ino()).unwrap();
    assert!(!held.script);
    assert_eq!((held.device, held.inode), (meta.dev(), meta.ino()));
    // Swapped after the hold: another inode at the same path.
    let other = dir.path().join("other");
    std::fs::write(&other, "#!/bin/sh\necho swapped\n").unwrap();
    std::fs::rename(&other, &path).unwrap();
    let e = held_file(text, meta.dev(), meta.ino()).unwrap_err();
    assert!(matches!(e, HeldFileError::Changed { .. }), "{e}");
    assert!(
        e.to_string().contains("changed since the call was held"),
        "{e}"
    );
    // The new file is a script.
    let now = std::fs::metadata(&path).unwrap();
    assert!(held_file(text, now.dev(), now.ino()).unwrap().script);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        held_file(text, now.dev(), now.ino()),
        Err(HeldFileError::Unreadable { .. })
    ));
    // A FIFO at the path (even one whose inode number matches) is refused at once, never
    // opened: opening it would wait for a writer.
    let fifo = std::ffi::CString::new(text).unwrap();
    // SAFETY: mkfifo(3) of a path in our own temporary directory.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let f = std::fs::metadata(&path).unwrap();
    assert!(matches!(
        held_file(text, f.dev(), f.ino()),
        Err(HeldFileError::NotRegular(_))
    ));
    std::fs::remove_file(&path).unwrap();
    // An empty file is not a script.
    std::fs::write(&path, b"").unwrap();
    let empty = std::fs::metadata(&path).unwrap();
    assert!(!held_file(text, empty.dev(), empty.ino()).unwrap().script);
}

#[test]
fn a_once_approval_is_a_file_grant_for_one_exec_and_never_covers_another_call() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    g.grant(&mut k, 7, 3, "/tmp/tool", binary(42), true, 5 * S)
        .unwrap();
    assert_eq!(k.files.len(), 1);
    let (key, grant) = k.files[0];
    assert_eq!(key, file_key(3, 42));
    assert_eq!(grant.uses, FILE_GRANT_ONCE);
    assert_eq!(grant.expiry.expires_ns, 5 * S);
    assert!(k.names.is_empty(), "no name grant for a binary");
    // Another call of the same file is asked again: the approval was for the held one.
    assert!(!g.covers(3, "/tmp/tool", libc::makedev(8, 1), 42, S));
    assert_eq!(g.next_due(), Some(5 * S));
}

#[test]
fn a_task_approval_covers_the_same_file_of_the_same_task_only() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    g.grant(&mut k, 8, 3, "/tmp/tool", binary(42), false, 60 * S)
        .unwrap();
    assert_eq!(k.files[0].1.uses, FILE_GRANT_UNTIL_EXPIRY);
    let dev = libc::makedev(8, 1);
    assert!(g.covers(3, "/tmp/tool", dev, 42, S));
    // The same file under another name (a hard link, a symlink) is the same file.
    assert!(g.covers(3, "/tmp/link", dev, 42, S));
    // Another file at the same path (swapped in after the approval) is not.
    assert!(!g.covers(3, "/tmp/tool", dev, 43, S));
    assert!(!g.covers(3, "/tmp/tool", libc::makedev(8, 2), 42, S));
    // Another task is not.
    assert!(!g.covers(4, "/tmp/tool", dev, 42, S));
    // Not after its expiry.
    assert!(!g.covers(3, "/tmp/tool", dev, 42, 60 * S));
}

#[test]
fn a_script_approval_is_a_script_only_name_grant() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    let script = HeldFile {
        script: true,
        ..binary(50)
    };
    g.grant(&mut k, 9, 3, "/tmp/build.sh", script, false, u64::MAX)
        .unwrap();
    assert!(k.files.is_empty(), "the kernel never sees a script's file");
    assert_eq!(k.names.len(), 1);
    let (len, key, expiry) = k.names[0];
    assert_eq!(key.agent, 3 | SCRIPT_NAME_GRANT);
    let path = b"/tmp/build.sh";
    assert_eq!(&key.path[..path.len()], path);
    // Exact: the path and its NUL.
    assert_eq!(len, EXEC_KEY_AGENT_BITS + 8 * (path.len() as u32 + 1));
    assert_eq!(expiry, Expiry::NEVER);
    assert_eq!(g.next_due(), None, "until task end");
    let dev = libc::makedev(8, 1);
    assert!(g.covers(3, "/tmp/build.sh", dev, 50, S));
    // The kernel judges a script by name: the daemon still asks for another file, or the
    // same file under another name.
    assert!(!g.covers(3, "/tmp/build.sh", dev, 51, S));
    assert!(!g.covers(3, "/tmp/other.sh", dev, 50, S));
}

#[test]
fn a_path_that_is_a_prefix_glob_is_not_approved_by_name() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    let script = HeldFile {
        script: true,
        ..binary(50)
    };
    let e = g
        .grant(&mut k, 9, 3, "/tmp/build*", script, false, u64::MAX)
        .unwrap_err();
    assert!(e.to_string().contains("not a path"), "{e}");
    assert!(k.names.is_empty());
    assert_eq!(g.len(), 0);
}

#[test]
fn grants_leave_the_kernel_at_expiry_and_at_task_end() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    g.grant(&mut k, 1, 3, "/tmp/a", binary(1), true, 5 * S)
        .unwrap();
    g.grant(&mut k, 2, 3, "/tmp/b", binary(2), false, u64::MAX)
        .unwrap();
    g.grant(&mut k, 3, 4, "/tmp/c", binary(3), false, 60 * S)
        .unwrap();
    assert_eq!(g.expire(&mut k, 5 * S - 1), 0);
    assert_eq!(g.expire(&mut k, 5 * S), 1);
    assert_eq!(k.files.len(), 2);
    assert_eq!(g.next_due(), Some(60 * S));
    assert_eq!(g.end_task(&mut k, 3), 1);
    assert_eq!(
        k.files.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        [file_key(4, 3)]
    );
    assert_eq!(g.of_task(4).count(), 1);
    assert_eq!(g.of_task(3).count(), 0);
}

#[test]
fn a_new_approval_of_the_same_file_replaces_the_old_entry() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    g.grant(&mut k, 1, 3, "/tmp/a", binary(1), true, 5 * S)
        .unwrap();
    g.grant(&mut k, 2, 3, "/tmp/a", binary(1), false, u64::MAX)
        .unwrap();
    assert_eq!(g.len(), 1);
    // The once approval's expiry does not take the task grant out of the kernel.
    assert_eq!(g.expire(&mut k, 5 * S), 0);
    assert_eq!(k.files.len(), 1);
    assert_eq!(k.files[0].1.uses, FILE_GRANT_UNTIL_EXPIRY);
}

#[test]
fn the_released_exec_names_its_approval_and_uses_up_a_once_script_grant() {
    let mut k = FakeKernel::default();
    let mut g = ExecGrants::default();
    let script = HeldFile {
        script: true,
        ..binary(50)
    };
    g.grant(&mut k, 5, 3, "/tmp/run.sh", script, true, 5 * S)
        .unwrap();
    g.grant(&mut k, 6, 3, "/tmp/tool", binary(42), true, 5 * S)
        .unwrap();
    let tool = SeenExec {
        task: 3,
        file_dev: kernel_dev(8, 1),
        file_ino: 42,
        path: "/tmp/tool",
        script: false,
    };
    let why = g.saw_exec(&mut k, &tool).expect("the file grant");
    assert!(why.contains("ask request 6"), "{why}");
    assert!(why.contains("inode 42"), "{why}");
    // The kernel removed the once file grant itself; the book keeps it to its expiry.
    assert_eq!(g.len(), 2);
    let run = SeenExec {
        task: 3,
        file_dev: kernel_dev(8, 1),
        file_ino: 1, // the interpreter
        path: "/tmp/run.sh",
        script: true,
    };
    let why = g.saw_exec(&mut k, &run).expect("the script grant");
    assert!(why.contains("ask request 5"), "{why}");
    assert!(k.names.is_empty(), "used up");
    assert_eq!(g.len(), 1);
    // Another task's exec is not one of these.
    let other = SeenExec { task: 4, ..tool };
    assert!(g.saw_exec(&mut k, &other).is_none());
}
