//! The guard's bookkeeping: which inodes are marked under which names, which directories are
//! watched, and the judge that goes with them. A new plan is put in force without a window: new
//! marks first, then the judge is swapped, then the marks the new plan no longer needs go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::judge::{Denial, FileId, Judge};
use super::kernel::MarkTable;
use super::plan::{MAX_MARKS, Mark, Plan};

#[derive(Clone, Debug)]
struct Entry<W> {
    path: PathBuf,
    dir: bool,
    watch: Option<W>,
}

/// What putting a plan in force did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Inodes marked now.
    pub marked: usize,
    /// Marks removed (no longer denied to anyone).
    pub removed: usize,
    /// Agents with a `[files]` rule.
    pub agents: usize,
    pub problems: Vec<String>,
}

/// Generic over the kernel's watch handle `W` (the inotify watch descriptor; a number in tests).
pub struct Book<W> {
    judge: Judge,
    marked: HashMap<FileId, Entry<W>>,
    watched: HashMap<W, FileId>,
    /// New entries not marked because the book was full (reported once each time it fills).
    pub full: u64,
}

impl<W> Default for Book<W> {
    fn default() -> Self {
        Book {
            judge: Judge::default(),
            marked: HashMap::new(),
            watched: HashMap::new(),
            full: 0,
        }
    }
}

impl<W: Copy + Eq + std::hash::Hash> Book<W> {
    pub fn judge(&self) -> &Judge {
        &self.judge
    }

    /// Puts `plan` in force (see the module doc). A mark that fails is a problem reported, not a
    /// reason to keep the old plan: the policy is valid, the host is what it is.
    pub fn apply(&mut self, table: &mut impl MarkTable<Watch = W>, plan: Plan) -> Applied {
        let Plan {
            marks,
            mut judge,
            mut problems,
        } = plan;
        let mut marked = HashMap::new();
        for m in marks {
            match self.mark_one(table, &m, &mut judge) {
                Ok((id, entry)) => {
                    marked.insert(id, entry);
                }
                Err(e) => problems.push(format!("{}: cannot mark: {e}", m.path.display())),
            }
        }
        let mut removed = 0;
        for (id, old) in std::mem::take(&mut self.marked) {
            if marked.contains_key(&id) {
                continue;
            }
            match table.unmark(&old.path, old.dir, id) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => problems.push(format!("{}: cannot unmark: {e}", old.path.display())),
            }
            if let Some(wd) = old.watch {
                table.unwatch(wd);
            }
        }
        self.watched = marked
            .iter()
            .filter_map(|(id, e)| e.watch.map(|wd| (wd, *id)))
            .collect();
        self.marked = marked;
        self.judge = judge;
        Applied {
            marked: self.marked.len(),
            removed,
            agents: self.judge.agents(),
            problems,
        }
    }

    /// Marks `m` (watching it if a directory); the judge learns the inode actually marked, which
    /// differs from the plan's when the file was replaced since the walk.
    fn mark_one(
        &mut self,
        table: &mut impl MarkTable<Watch = W>,
        m: &Mark,
        judge: &mut Judge,
    ) -> std::io::Result<(FileId, Entry<W>)> {
        let id = table.mark(&m.path, m.dir)?;
        if id != m.id {
            for d in judge.denials(m.id).to_vec() {
                judge.add(id, d);
            }
        }
        let kept = self.marked.get(&id).and_then(|e| e.watch);
        let watch = match (m.dir, kept) {
            (false, _) => None,
            (true, Some(wd)) => Some(wd),
            (true, None) => Some(table.watch(&m.path)?),
        };
        Ok((
            id,
            Entry {
                path: m.path.clone(),
                dir: m.dir,
                watch,
            },
        ))
    }

    /// An entry `name` appeared in watched directory `wd`: it is denied to whoever the directory
    /// is denied to, and marked (a directory also watched). Returns a new directory and its
    /// denials, for the walker to list what it already holds.
    pub fn on_created(
        &mut self,
        table: &mut impl MarkTable<Watch = W>,
        wd: W,
        name: &std::ffi::OsStr,
    ) -> Result<Option<(PathBuf, Vec<Denial>)>, String> {
        let Some(dir_id) = self.watched.get(&wd).copied() else {
            return Ok(None);
        };
        let Some(dir) = self.marked.get(&dir_id) else {
            return Ok(None);
        };
        let path = dir.path.join(name);
        let denials = self.judge.denials(dir_id).to_vec();
        // lstat: no open, and a symlink names another file, judged on its own.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return Ok(None);
        };
        if meta.file_type().is_symlink() {
            return Ok(None);
        }
        let is_dir = meta.is_dir();
        self.add(table, &path, is_dir, &denials)?;
        Ok(is_dir.then_some((path, denials)))
    }

    /// What the walker found in a new directory.
    pub fn add_found(
        &mut self,
        table: &mut impl MarkTable<Watch = W>,
        marks: &[Mark],
        denials: &[Denial],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for m in marks {
            if self.marked.contains_key(&m.id) {
                continue;
            }
            if let Err(p) = self.add(table, &m.path, m.dir, denials) {
                problems.push(p);
            }
        }
        problems
    }

    fn add(
        &mut self,
        table: &mut impl MarkTable<Watch = W>,
        path: &Path,
        dir: bool,
        denials: &[Denial],
    ) -> Result<(), String> {
        if self.marked.len() >= MAX_MARKS {
            self.full += 1;
            return Err(format!(
                "{}: not marked, {MAX_MARKS} files and directories are marked already (it is \
                 still judged through its directory)",
                path.display()
            ));
        }
        let id = table
            .mark(path, dir)
            .map_err(|e| format!("{}: cannot mark: {e}", path.display()))?;
        for d in denials {
            self.judge.add(id, d.clone());
        }
        let watch = if dir {
            Some(
                table
                    .watch(path)
                    .map_err(|e| format!("{}: cannot watch: {e}", path.display()))?,
            )
        } else {
            None
        };
        if let Some(wd) = watch {
            self.watched.insert(wd, id);
        }
        self.marked.insert(
            id,
            Entry {
                path: path.to_path_buf(),
                dir,
                watch,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
