use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;

use super::*;
use crate::policy::model::Mode;

/// Marks by (device, inode) as the real table would, from the real files of a temporary tree.
#[derive(Default)]
struct FakeTable {
    marks: BTreeMap<FileId, bool>,
    watches: BTreeMap<u32, PathBuf>,
    next: u32,
    /// Every mark and unmark in order, to check that no moment left a file unmarked.
    log: Vec<String>,
}

impl MarkTable for FakeTable {
    type Watch = u32;

    fn mark(&mut self, path: &Path, dir: bool) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        let id = (m.dev(), m.ino());
        self.marks.insert(id, dir);
        self.log.push(format!("mark {}", path.display()));
        Ok(id)
    }
    fn unmark(&mut self, path: &Path, _dir: bool, id: FileId) -> std::io::Result<bool> {
        self.log.push(format!("unmark {}", path.display()));
        Ok(self.marks.remove(&id).is_some())
    }
    fn watch(&mut self, path: &Path) -> std::io::Result<u32> {
        self.next += 1;
        self.watches.insert(self.next, path.to_path_buf());
        Ok(self.next)
    }
    fn unwatch(&mut self, wd: u32) {
        self.watches.remove(&wd);
    }
}

fn id(p: &Path) -> FileId {
    let m = std::fs::metadata(p).expect("stat");
    (m.dev(), m.ino())
}

fn plan_for(paths: &[&Path], agent: &str) -> Plan {
    let mut modes = std::collections::HashMap::new();
    modes.insert(Arc::from(agent), Mode::Enforce);
    let mut judge = Judge::new(modes);
    let mut marks = Vec::new();
    for p in paths {
        let (found, _) = super::super::plan::tree(p);
        for m in found {
            judge.add(
                m.id,
                Denial {
                    agent: Arc::from(agent),
                    rule: Arc::from(format!("deny {}", p.display())),
                },
            );
            marks.push(m);
        }
    }
    Plan {
        marks,
        judge,
        problems: Vec::new(),
    }
}

#[test]
fn a_reload_marks_the_new_before_it_unmarks_the_old() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, keep) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("k"),
    );
    for f in [&a, &b, &keep] {
        std::fs::write(f, "secret").expect("write");
    }
    let mut table = FakeTable::default();
    let mut book = Book::default();
    let first = book.apply(&mut table, plan_for(&[&a, &keep], "coder"));
    assert_eq!((first.marked, first.removed, first.agents), (2, 0, 1));
    table.log.clear();
    let second = book.apply(&mut table, plan_for(&[&b, &keep], "coder"));
    assert_eq!((second.marked, second.removed), (2, 1));
    let unmark_a = table.log.iter().position(|l| l.starts_with("unmark"));
    let last_mark = table.log.iter().rposition(|l| l.starts_with("mark "));
    assert!(
        unmark_a > last_mark,
        "every mark precedes every unmark: {:?}",
        table.log
    );
    assert_eq!(
        table.marks.keys().copied().collect::<BTreeSet<_>>(),
        [id(&b), id(&keep)].into_iter().collect()
    );
    assert!(book.judge().contains(id(&keep)));
    assert!(!book.judge().contains(id(&a)));
    // The same plan again removes nothing.
    let again = book.apply(&mut table, plan_for(&[&b, &keep], "coder"));
    assert_eq!(again.removed, 0);
}

#[test]
fn an_entry_created_in_a_denied_directory_is_marked_and_denied() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join(".aws");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut table = FakeTable::default();
    let mut book = Book::default();
    book.apply(&mut table, plan_for(&[&dir], "coder"));
    let (&wd, _) = table
        .watches
        .iter()
        .next()
        .expect("the directory is watched");

    std::fs::write(dir.join("credentials"), "k").expect("write");
    let new_dir = book
        .on_created(&mut table, wd, OsStr::new("credentials"))
        .expect("marked");
    assert_eq!(new_dir, None, "a file needs no walk");
    let file = id(&dir.join("credentials"));
    assert!(table.marks.contains_key(&file));
    assert_eq!(&*book.judge().denials(file)[0].agent, "coder");

    std::fs::create_dir(dir.join("sso")).expect("mkdir");
    std::fs::write(dir.join("sso/token"), "t").expect("write");
    let (path, denials) = book
        .on_created(&mut table, wd, OsStr::new("sso"))
        .expect("marked")
        .expect("a directory is walked");
    assert_eq!(path, dir.join("sso"));
    assert_eq!(table.watches.len(), 2, "the new directory is watched too");
    let (found, _) = super::super::plan::tree(&path);
    assert!(book.add_found(&mut table, &found, &denials).is_empty());
    assert!(book.judge().contains(id(&dir.join("sso/token"))));

    // A name gone before it was looked at, and an unknown watch, change nothing.
    assert_eq!(
        book.on_created(&mut table, wd, OsStr::new("gone")),
        Ok(None)
    );
    assert_eq!(book.on_created(&mut table, 999, OsStr::new("x")), Ok(None));
}

#[test]
fn a_plan_without_marks_removes_every_mark_and_watch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("d");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("f"), "x").expect("write");
    let mut table = FakeTable::default();
    let mut book = Book::default();
    book.apply(&mut table, plan_for(&[&dir], "coder"));
    assert_eq!(table.marks.len(), 2);
    let off = book.apply(&mut table, Plan::default());
    assert_eq!((off.marked, off.removed, off.agents), (0, 2, 0));
    assert!(table.marks.is_empty() && table.watches.is_empty());
}
