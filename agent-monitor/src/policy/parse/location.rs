//! Places in a policy file (file, line, column) for error messages.

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in a policy file: `policies/coder.toml:7:3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub origin: PathBuf,
    /// 1-based line and column (in characters); `None` when the problem has no position.
    pub line_col: Option<(usize, usize)>,
}

impl Location {
    /// Location of byte `offset` of `text`. Scans `text` up to `offset`: for one place; a file's
    /// many entries go through a [`LineIndex`].
    pub fn at(origin: &Path, text: &str, offset: usize) -> Location {
        Location {
            origin: origin.to_path_buf(),
            line_col: Some(line_col(text, offset)),
        }
    }

    pub fn line(&self) -> usize {
        self.line_col.map_or(0, |(line, _)| line)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin.display())?;
        if let Some((line, col)) = self.line_col {
            write!(f, ":{line}:{col}")?;
        }
        Ok(())
    }
}

/// 1-based line and column of byte `offset`; works on bytes so a bad offset cannot panic.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let col = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, col)
}

/// Where each line of a text starts, so that the line and column of each of a file's entries is
/// found by a binary search rather than a scan from the top (a scan per entry made a 20,000-entry
/// policy take seconds to parse).
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    origin: &'a Path,
    /// Byte offset of the start of each line; `starts[0] == 0`.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str, origin: &'a Path) -> LineIndex<'a> {
        let starts = std::iter::once(0)
            .chain(
                text.bytes()
                    .enumerate()
                    .filter(|&(_, b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        LineIndex {
            text,
            origin,
            starts,
        }
    }

    /// 1-based line and column (in characters) of byte `offset`, as [`line_col`] computes them.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The last line starting at or before `offset`.
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line.saturating_sub(1)];
        let col = self.text.as_bytes()[start..offset]
            .iter()
            .filter(|&&b| b & 0xC0 != 0x80)
            .count()
            + 1;
        (line.max(1), col)
    }

    pub(crate) fn location(&self, offset: usize) -> Location {
        Location {
            origin: self.origin.to_path_buf(),
            line_col: Some(self.line_col(offset)),
        }
    }
}
