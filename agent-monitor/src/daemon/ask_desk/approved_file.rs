//! `always` approvals: one entry appended to `<policy dir>/<agent>.approved.toml`, a reviewed file
//! the policy directory loader merges into the agent's allowlist (`policy_dir.rs`). Each entry
//! has a comment line saying who approved what and when; the file keeps an operator's edits and
//! comments (toml_edit). The caller reloads; a reload that fails puts the old text back.

use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Table, Value};

use crate::policy_dir::APPROVED_SUFFIX;

/// Which list the entry joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum List {
    Network,
    Exec,
    /// `[unix] allow`: a unix socket by its path (matched by identity, docs/unix-sockets.md).
    Unix,
}

impl List {
    fn table(self) -> &'static str {
        match self {
            List::Network => "network",
            List::Exec => "exec",
            List::Unix => "unix",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApprovedFileError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not TOML an entry can be added to: {why}", path.display())]
    Shape { path: PathBuf, why: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file's text before the change (`None`: it did not exist), to put back.
#[derive(Debug)]
pub(crate) struct Previous {
    pub(crate) path: PathBuf,
    text: Option<String>,
}

pub(crate) fn path(dir: &Path, agent: &str) -> PathBuf {
    dir.join(format!("{agent}{APPROVED_SUFFIX}"))
}

/// The file's text with `entry` added to `list` under `comment` (unchanged when already there).
pub(crate) fn with_entry(
    old: Option<&str>,
    agent: &str,
    list: List,
    entry: &str,
    comment: &str,
) -> Result<String, String> {
    let mut doc: DocumentMut = match old {
        Some(t) => t.parse().map_err(|e: toml_edit::TomlError| e.to_string())?,
        None => {
            let mut d = DocumentMut::new();
            d["agent"] = toml_edit::value(agent);
            d.decor_mut().set_prefix(format!(
                "# Approved through ask mode (`agent-monitor approve ID --always`): entries added \
                 to agent {agent}'s allowlist.\n# Reviewed file: edit or remove entries, then \
                 `agent-monitor reload`.\n"
            ));
            d
        }
    };
    match doc.get("agent").and_then(Item::as_str) {
        Some(a) if a == agent => {}
        other => return Err(format!("names agent {other:?}, not {agent:?}")),
    }
    let table = doc
        .entry(list.table())
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| format!("`{}` is not a table", list.table()))?;
    let array = table
        .entry("allow")
        .or_insert_with(|| Item::Value(Value::Array(Array::new())))
        .as_array_mut()
        .ok_or_else(|| format!("`{}.allow` is not an array", list.table()))?;
    if array.iter().any(|v| v.as_str() == Some(entry)) {
        return Ok(doc.to_string());
    }
    let mut v = Value::from(entry);
    let comment = comment.replace('\n', " ");
    v.decor_mut().set_prefix(format!("\n    # {comment}\n    "));
    array.push_formatted(v);
    array.set_trailing("\n");
    array.set_trailing_comma(true);
    Ok(doc.to_string())
}

/// Adds `entry` to the agent's approved file; returns what was there before.
pub(crate) fn append(
    dir: &Path,
    agent: &str,
    list: List,
    entry: &str,
    comment: &str,
) -> Result<Previous, ApprovedFileError> {
    let path = path(dir, agent);
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(ApprovedFileError::Read { path, source }),
    };
    let new = with_entry(old.as_deref(), agent, list, entry, comment).map_err(|why| {
        ApprovedFileError::Shape {
            path: path.clone(),
            why,
        }
    })?;
    write(&path, &new).map_err(|source| ApprovedFileError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(Previous { path, text: old })
}

/// Puts the text from before [`append`] back.
pub(crate) fn restore(previous: &Previous) -> std::io::Result<()> {
    match &previous.text {
        Some(t) => write(&previous.path, t),
        None => std::fs::remove_file(&previous.path),
    }
}

/// Written beside and renamed over, so a reload never reads half a file.
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
