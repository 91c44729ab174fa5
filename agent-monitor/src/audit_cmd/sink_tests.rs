//! The trail's hash chain and size rotation as the sink writes them: checked with `audit verify`.

use std::path::PathBuf;

use std::fs::File;
use std::path::Path;

use crate::output::Sink as _;
use serde_json::{Map, Value};

use crate::audit_cmd::{EXIT_INTACT, verify};
use crate::output::json::{JsonSink, json_record};
use crate::output::rotate::Rotation;
use crate::output::tests::{connect_action, exec_action};

fn trail_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// A trail of a connect and an exec in a new directory.
fn two_actions() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut sink = JsonSink::open(&path).unwrap();
    sink.emit(&connect_action()).unwrap();
    sink.emit(&exec_action()).unwrap();
    drop(sink);
    (dir, path)
}

fn assert_intact(files: &[(PathBuf, Vec<u8>)]) -> crate::audit_cmd::Outcome {
    let out = verify(files, &[]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
    out
}

fn lines(files: &[(PathBuf, Vec<u8>)]) -> usize {
    files
        .iter()
        .map(|(_, b)| b.iter().filter(|&&c| c == b'\n').count())
        .sum()
}

#[test]
fn every_line_is_chained_and_the_existing_fields_stay() {
    let (dir, path) = two_actions();
    let text = std::fs::read_to_string(&path).unwrap();
    let plain = json_record(&connect_action()).unwrap();
    let first: Map<String, Value> = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for (k, v) in &plain {
        assert_eq!(first.get(k), Some(v), "{k}");
    }
    assert_eq!(first.len(), plain.len() + 1, "one field added: chain");
    assert_eq!(first["chain"]["seq"], 0);
    assert_intact(&trail_files(dir.path()));
}

#[test]
fn a_restarted_sink_continues_the_chain_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    for _ in 0..3 {
        let mut sink = JsonSink::open(&path).unwrap();
        sink.emit(&connect_action()).unwrap();
        sink.flush().unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["chain"]["seq"], 2);
    assert_intact(&trail_files(dir.path()));
}

#[test]
fn reopen_after_logrotate_continues_the_chain_into_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut sink = JsonSink::open(&path).unwrap();
    sink.emit(&connect_action()).unwrap();
    sink.flush().unwrap();
    // logrotate with dateext: a name the sink could not guess.
    std::fs::rename(&path, dir.path().join("audit.jsonl-20261206")).unwrap();
    sink.emit(&exec_action()).unwrap();
    sink.reopen().unwrap();
    sink.emit(&connect_action()).unwrap();
    drop(sink);
    let files = trail_files(dir.path());
    assert_eq!(lines(&files), 3);
    assert_intact(&files);
    // A daemon started after a rotation that left `audit.jsonl.1` goes on from there.
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    JsonSink::open(&path)
        .unwrap()
        .emit(&connect_action())
        .unwrap();
    let out = assert_intact(&trail_files(dir.path()));
    assert!(out.stdout.contains("seq 0..3"), "{}", out.stdout);
}

/// `actions` connects through a sink rotating at `max_size`, flushed every `burst` actions (as
/// the daemon flushes after each batch of kernel records); the files left.
fn flood(
    dir: &Path,
    max_size: u64,
    keep: u32,
    actions: usize,
    burst: usize,
) -> Vec<(PathBuf, Vec<u8>)> {
    let rotation = Rotation { max_size, keep };
    let mut sink = JsonSink::open_with(&dir.join("audit.jsonl"), Some(rotation), None).unwrap();
    for i in 0..actions {
        sink.emit(&connect_action()).unwrap();
        if i % burst == 0 {
            sink.flush().unwrap();
        }
    }
    drop(sink);
    trail_files(dir)
}

#[test]
fn a_flood_across_many_rotations_loses_no_line_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let files = flood(dir.path(), 64 * 1024, 1000, 5_000, 37);
    assert!(files.len() > 10, "{} files", files.len());
    for (p, b) in &files {
        assert!(b.len() <= 64 * 1024, "{} is {} bytes", p.display(), b.len());
    }
    assert_eq!(lines(&files), 5_000);
    assert_intact(&files);
}

#[test]
fn rotation_keeps_only_keep_files_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let files = flood(dir.path(), 4 * 1024, 2, 200, 1);
    assert_eq!(files.len(), 3, "the live file and two rotated ones");
    let out = assert_intact(&files);
    assert!(
        out.stdout.contains("note: the chain starts at seq"),
        "{}",
        out.stdout
    );
}

#[test]
fn policy_suggest_and_test_read_chained_lines() {
    let (_dir, path) = two_actions();
    let audit =
        crate::learn::audit::read_audit(std::io::BufReader::new(File::open(&path).unwrap()), &path)
            .unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.actions.len(), 2);
    assert_eq!(audit.actions[0].agent, "coder");
}
