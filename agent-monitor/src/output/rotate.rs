//! Size-based rotation of the JSON audit trail (`--json-log-max-size`, `--json-log-keep`): before
//! a write burst would take the file past its limit, `audit.jsonl` becomes `audit.jsonl.1` (`.1`
//! becomes `.2`, …; the oldest beyond `keep` is removed) and a new `audit.jsonl` is opened. The
//! rotation happens between two writes of whole lines, so every line is in exactly one file and
//! the hash chain goes on from the last line of the old file to the first of the new one.

use std::io;
use std::path::{Path, PathBuf};

use clap::Args;

/// Daemon flags of the JSON trail's own rotation.
#[derive(Clone, Debug, Args)]
pub struct RotationArgs {
    /// Rotate the --json-log file when it would grow past SIZE (bytes, or with a K, M or G
    /// suffix: 64M). 0, the default: never; the package's logrotate configuration rotates it
    /// instead (weekly or at 100M, then SIGUSR1). Use one or the other, not both: both name the
    /// rotated file PATH.1. A file may pass SIZE by one write burst (at most 1024 actions).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub json_log_max_size: u64,
    /// With --json-log-max-size: how many rotated files to keep (PATH.1 the newest … PATH.N the
    /// oldest); older ones are removed. 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub json_log_keep: u32,
}

impl RotationArgs {
    /// The rotation to apply, if any.
    pub fn rotation(&self) -> Option<Rotation> {
        (self.json_log_max_size > 0).then_some(Rotation {
            max_size: self.json_log_max_size,
            keep: self.json_log_keep,
        })
    }
}

/// `64M` → 64 MiB. Binary units: K = 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes, optionally with K, M or G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        other => return Err(format!("{s:?}: unknown unit {other:?} (K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// When and how far to rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub max_size: u64,
    /// Rotated files kept, at least 1.
    pub keep: u32,
}

impl Rotation {
    /// A file of `len` bytes should be rotated before `incoming` more bytes are written. An empty
    /// file never is (a burst larger than the limit goes into a file of its own).
    pub fn due(&self, len: u64, incoming: u64) -> bool {
        len > 0 && len.saturating_add(incoming) > self.max_size
    }

    /// Shifts `path.1 … path.(keep-1)` up by one (removing `path.keep`) and renames `path` to
    /// `path.1`. The caller opens a new `path`.
    pub fn rotate(&self, path: &Path) -> io::Result<()> {
        let numbered = |n: u32| -> PathBuf {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        ignore_missing(std::fs::remove_file(numbered(self.keep)))?;
        for n in (1..self.keep).rev() {
            ignore_missing(std::fs::rename(numbered(n), numbered(n + 1)))?;
        }
        std::fs::rename(path, numbered(1))
    }
}

/// The predecessor of `path` after a rotation (`path.1`), where the chain goes on from when
/// `path` itself is new.
pub fn previous_file(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("5mib"), Ok(5 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("10T").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn due_only_when_the_burst_would_pass_the_limit() {
        let r = Rotation {
            max_size: 100,
            keep: 2,
        };
        assert!(!r.due(0, 500), "an empty file takes any burst");
        assert!(!r.due(60, 40));
        assert!(r.due(60, 41));
        assert!(r.due(100, 1));
    }

    #[test]
    fn rotate_shifts_and_keeps_only_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let r = Rotation {
            max_size: 1,
            keep: 2,
        };
        for content in ["a", "b", "c"] {
            std::fs::write(&path, content).unwrap();
            r.rotate(&path).unwrap();
            assert!(!path.exists());
        }
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).ok();
        assert_eq!(read("audit.jsonl.1").as_deref(), Some("c"));
        assert_eq!(read("audit.jsonl.2").as_deref(), Some("b"));
        assert_eq!(read("audit.jsonl.3"), None, "beyond keep: removed");
        assert_eq!(previous_file(&path), dir.path().join("audit.jsonl.1"));
    }
}
