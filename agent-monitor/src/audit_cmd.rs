//! `audit verify FILES…`: walks the hash chain of JSON audit trail files (see `output::chain`) and
//! reports the first line that was edited, deleted, inserted, reordered or cut short, by file and
//! line, or the head of an intact chain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{AuditCommand, ChainHeadArg, VerifyArgs};
use crate::output::chain::{GENESIS, link_hash, parse_line};
// Output into a closed pipe ends the command by SIGPIPE instead of std's panic (exit 101).
use crate::stdout::out as print;

/// The chain is intact (and matches every `--head`).
pub const EXIT_INTACT: u8 = 0;
/// A line was edited, deleted, inserted, reordered or cut short, or a `--head` does not match.
pub const EXIT_TAMPERED: u8 = 1;
/// A file could not be read (clap's usage errors exit 2 as well).
pub const EXIT_UNREADABLE: u8 = 2;

pub fn main(cmd: AuditCommand) -> ExitCode {
    match cmd {
        AuditCommand::Verify(args) => verify_cmd(args),
    }
}

fn verify_cmd(args: VerifyArgs) -> ExitCode {
    let mut files = Vec::with_capacity(args.files.len());
    for path in &args.files {
        match std::fs::read(path) {
            Ok(bytes) => files.push((path.clone(), bytes)),
            Err(e) => {
                eprintln!(
                    "agent-monitor audit verify: cannot read {}: {e}",
                    path.display()
                );
                return ExitCode::from(EXIT_UNREADABLE);
            }
        }
    }
    let outcome = verify(&files, &args.head);
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    ExitCode::from(outcome.code)
}

/// What `verify` prints and how it exits; built without I/O so tests can read it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// One line of a trail file.
struct Entry<'a> {
    file: &'a Path,
    /// 1-based.
    line: usize,
    record: Record<'a>,
}

enum Record<'a> {
    Chained {
        content: &'a str,
        seq: u64,
        hash: &'a str,
    },
    /// Not JSON or no chain field; `torn` if the file ends inside this line.
    Unchained { torn: bool },
}

impl Entry<'_> {
    fn seq(&self) -> Option<u64> {
        match self.record {
            Record::Chained { seq, .. } => Some(seq),
            Record::Unchained { .. } => None,
        }
    }

    /// This line is the one after (`seq`, `hash`) and its hash covers its content.
    fn follows(&self, seq: u64, hash: &str) -> bool {
        match self.record {
            Record::Chained {
                content,
                seq: s,
                hash: h,
            } => s == seq + 1 && h == link_hash(hash, s, content.as_bytes()),
            Record::Unchained { .. } => false,
        }
    }

    fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

fn entries<'a>(path: &'a Path, bytes: &'a [u8]) -> Vec<Entry<'a>> {
    let mut out = Vec::new();
    let mut pieces = bytes.split(|&b| b == b'\n').peekable();
    let mut line = 0;
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        if last && piece.is_empty() {
            break;
        }
        line += 1;
        let record = match std::str::from_utf8(piece).ok().and_then(parse_line) {
            Some((content, seq, hash)) => Record::Chained { content, seq, hash },
            None => Record::Unchained { torn: last },
        };
        out.push(Entry {
            file: path,
            line,
            record,
        });
    }
    out
}

/// Verifies `files` as one trail. They are put in chain order first (by the seq of their first
/// line: a shell glob lists `audit.jsonl` before `audit.jsonl.1`), so their order on the command
/// line does not matter.
pub fn verify(files: &[(PathBuf, Vec<u8>)], heads: &[ChainHeadArg]) -> Outcome {
    let mut per_file: Vec<Vec<Entry>> = files.iter().map(|(p, b)| entries(p, b)).collect();
    per_file.sort_by_key(|e| e.iter().find_map(Entry::seq).unwrap_or(u64::MAX));
    let all: Vec<Entry> = per_file.into_iter().flatten().collect();
    match walk(&all) {
        Err(finding) => Outcome {
            stdout: String::new(),
            stderr: format!("{finding}\n"),
            code: EXIT_TAMPERED,
        },
        Ok(None) => match heads.first() {
            None => Outcome {
                stdout: format!("ok: no lines in {} file(s)\n", files.len()),
                stderr: String::new(),
                code: EXIT_INTACT,
            },
            Some(head) => Outcome {
                stdout: String::new(),
                stderr: format!(
                    "deleted: the files have no lines, but journald recorded head seq {}\n",
                    head.seq
                ),
                code: EXIT_TAMPERED,
            },
        },
        Ok(Some((first, last))) => {
            let mut stdout = format!(
                "ok: {} lines in {} file(s), seq {}..{}, head {}\n",
                all.len(),
                files.len(),
                first,
                last.0,
                last.1
            );
            if first > 0 {
                stdout.push_str(&format!(
                    "note: the chain starts at seq {first}: the lines before it are not among \
                     these files (rotated away?)\n"
                ));
            }
            match check_heads(&all, heads, last.0) {
                Ok(()) => Outcome {
                    stdout,
                    stderr: String::new(),
                    code: EXIT_INTACT,
                },
                Err((code, finding)) => Outcome {
                    stdout: String::new(),
                    stderr: format!("{finding}\n"),
                    code,
                },
            }
        }
    }
}

/// Walks the chain; the first finding, or (first seq, (last seq, last hash)) if intact.
#[allow(clippy::type_complexity)]
fn walk<'a>(all: &[Entry<'a>]) -> Result<Option<(u64, (u64, &'a str))>, String> {
    let mut first = None;
    let mut prev: Option<(u64, &str)> = None;
    for (i, entry) in all.iter().enumerate() {
        let next = all.get(i + 1);
        let (content, seq, hash) = match entry.record {
            Record::Chained { content, seq, hash } => (content, seq, hash),
            Record::Unchained { torn: true } => {
                return Err(format!(
                    "{}: truncated: the file ends inside this line (cut short, or a torn write)",
                    entry.at()
                ));
            }
            Record::Unchained { torn: false } => {
                let inserted = match prev {
                    Some((s, h)) => next.is_some_and(|n| n.follows(s, h)),
                    None => false,
                };
                return Err(if inserted {
                    format!(
                        "{}: inserted: this line is not a chained record, and the next line \
                         follows the one before it",
                        entry.at()
                    )
                } else {
                    format!(
                        "{}: edited: this line is not a chained record (not JSON, or its chain \
                         field is gone)",
                        entry.at()
                    )
                });
            }
        };
        let Some((pseq, phash)) = prev else {
            if seq == 0 && hash != link_hash(GENESIS, 0, content.as_bytes()) {
                return Err(format!(
                    "{}: edited: the first line of the trail does not match its hash",
                    entry.at()
                ));
            }
            first = Some(seq);
            prev = Some((seq, hash));
            continue;
        };
        let expected = pseq + 1;
        if entry.follows(pseq, phash) {
            prev = Some((seq, hash));
            continue;
        }
        let finding = if seq == expected {
            if next.is_some_and(|n| n.follows(seq, hash)) {
                "edited: its content no longer matches its hash (the next line chains to that hash)"
                    .to_string()
            } else if next.is_some_and(|n| n.follows(pseq, phash)) {
                "inserted: this line is not in the chain; the next line follows the one before it"
                    .to_string()
            } else {
                format!("edited: does not match its hash (seq {seq})")
            }
        } else if seq > expected {
            match all[i + 1..].iter().find(|e| e.seq() == Some(expected)) {
                Some(later) => format!(
                    "reordered: seq {seq} comes before seq {expected}, which is at {}",
                    later.at()
                ),
                None => format!(
                    "deleted: {} line(s) missing before this line (seq {expected}..{} expected, \
                     found seq {seq})",
                    seq - expected,
                    seq - 1
                ),
            }
        } else if seq == 0 && hash == link_hash(GENESIS, 0, content.as_bytes()) {
            format!(
                "restarted: a new chain starts here after seq {pseq} (the daemon found no earlier \
                 line to continue from: the files before it were removed or moved)"
            )
        } else {
            format!("reordered: seq {seq} after seq {pseq} (a line moved down, or a copy inserted)")
        };
        return Err(format!("{}: {finding}", entry.at()));
    }
    Ok(first.zip(prev))
}

/// Every `--head` (seq and hash journald recorded) must be the hash of the line with that seq.
/// A failure carries its exit code: a head seq older than the files is a usage error.
fn check_heads(all: &[Entry], heads: &[ChainHeadArg], last: u64) -> Result<(), (u8, String)> {
    for head in heads {
        let found = all.iter().find_map(|e| match e.record {
            Record::Chained { seq, hash, .. } if seq == head.seq => Some((e, hash)),
            _ => None,
        });
        match found {
            Some((_, hash)) if hash == head.hash => {}
            Some((entry, hash)) => {
                return Err((
                    EXIT_TAMPERED,
                    format!(
                        "{}: rewritten: seq {} has hash {hash}, journald recorded {} (the chain was \
                     recomputed after an edit)",
                        entry.at(),
                        head.seq,
                        head.hash
                    ),
                ));
            }
            None if head.seq > last => {
                return Err((
                    EXIT_TAMPERED,
                    format!(
                        "deleted: the trail ends at seq {last}, but journald recorded head seq {} \
                     (lines at the end were removed)",
                        head.seq
                    ),
                ));
            }
            None => {
                return Err((
                    EXIT_UNREADABLE,
                    format!(
                        "seq {} is not in these files (give the file that holds it)",
                        head.seq
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "audit_cmd/tests.rs"]
mod tests;

/// The sink writing a chained, rotated trail, checked with `verify` (here, not beside the sink:
/// the in-process bench compiles the output modules without this one).
#[cfg(test)]
#[path = "audit_cmd/sink_tests.rs"]
mod sink_tests;
