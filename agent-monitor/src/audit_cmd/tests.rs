//! `audit verify` against each kind of tampering.

use super::*;
use crate::output::chain::{Chain, Head};

/// `n` chained lines `{"n":i,...}` as the trail writer seals them, and the head after them.
fn trail(n: usize) -> (Vec<String>, Head) {
    let mut chain = Chain::after(Head::genesis());
    let lines = (0..n)
        .map(|i| {
            let mut buf = format!("{{\"n\":{i},\"agent_id\":\"coder\"}}\n").into_bytes();
            chain.seal(&mut buf, 0);
            String::from_utf8(buf).unwrap()
        })
        .collect();
    chain.commit();
    (lines, chain.head().clone())
}

fn file(name: &str, lines: &[String]) -> (PathBuf, Vec<u8>) {
    (PathBuf::from(name), lines.concat().into_bytes())
}

fn check(files: &[(PathBuf, Vec<u8>)]) -> Outcome {
    verify(files, &[])
}

/// Asserts a tampered verdict naming `at` and `kind`.
fn assert_finding(out: &Outcome, at: &str, kind: &str) {
    assert_eq!(out.code, EXIT_TAMPERED, "{out:?}");
    assert!(
        out.stderr.starts_with(&format!("{at}: {kind}")),
        "expected {at}: {kind}…, got {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn an_intact_trail_is_ok_and_names_its_head() {
    let (lines, head) = trail(5);
    let out = check(&[file("a", &lines)]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
    assert_eq!(
        out.stdout,
        format!("ok: 5 lines in 1 file(s), seq 0..4, head {}\n", head.hash)
    );
    let out = check(&[file("empty", &[])]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
}

#[test]
fn an_edited_line_is_named() {
    let (mut lines, _) = trail(6);
    lines[2] = lines[2].replace("coder", "other");
    assert_finding(&check(&[file("a", &lines)]), "a:3", "edited");
    // The last line has no successor to tell: still an edit.
    let (mut lines, _) = trail(6);
    lines[5] = lines[5].replace("\"n\":5", "\"n\":7");
    assert_finding(&check(&[file("a", &lines)]), "a:6", "edited");
    // Its chain field removed.
    let (mut lines, _) = trail(6);
    lines[3] = "{\"n\":3,\"agent_id\":\"coder\"}\n".into();
    assert_finding(&check(&[file("a", &lines)]), "a:4", "");
}

#[test]
fn a_deleted_line_is_named_where_the_gap_is() {
    let (mut lines, _) = trail(6);
    lines.remove(2);
    let out = check(&[file("a", &lines)]);
    assert_finding(&out, "a:3", "deleted");
    assert!(out.stderr.contains("1 line(s) missing"), "{}", out.stderr);
}

#[test]
fn an_inserted_line_is_named() {
    let (mut lines, _) = trail(6);
    lines.insert(3, "{\"n\":99,\"agent_id\":\"coder\"}\n".into());
    assert_finding(&check(&[file("a", &lines)]), "a:4", "inserted");
    // A forged line with a plausible chain field (seq right, hash made up).
    let (mut lines, _) = trail(6);
    let forged = lines[3].replace("\"n\":3", "\"n\":42");
    lines.insert(3, forged);
    assert_finding(&check(&[file("a", &lines)]), "a:4", "inserted");
    // A copy of an earlier line.
    let (mut lines, _) = trail(6);
    let copy = lines[1].clone();
    lines.insert(4, copy);
    assert_finding(&check(&[file("a", &lines)]), "a:5", "reordered");
}

#[test]
fn reordered_lines_are_named() {
    let (mut lines, _) = trail(6);
    lines.swap(2, 3);
    let out = check(&[file("a", &lines)]);
    assert_finding(&out, "a:3", "reordered");
    assert!(out.stderr.contains("which is at a:4"), "{}", out.stderr);
}

#[test]
fn a_truncated_last_line_is_named() {
    let (mut lines, _) = trail(4);
    let last = lines.pop().unwrap();
    lines.push(last[..last.len() / 2].to_string());
    assert_finding(&check(&[file("a", &lines)]), "a:4", "truncated");
    // Cut at the newline only: still the whole line, still intact.
    let (mut lines, _) = trail(4);
    let last = lines.pop().unwrap();
    lines.push(last.trim_end().to_string());
    assert_eq!(check(&[file("a", &lines)]).code, EXIT_INTACT);
}

#[test]
fn files_chain_across_rotation_in_any_order() {
    let (lines, _) = trail(9);
    let old = file("audit.jsonl.2", &lines[..3]);
    let mid = file("audit.jsonl.1", &lines[3..6]);
    let new = file("audit.jsonl", &lines[6..]);
    // As a shell glob lists them: the live file first.
    let out = check(&[new.clone(), mid.clone(), old.clone()]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
    assert!(
        out.stdout.contains("9 lines in 3 file(s), seq 0..8"),
        "{}",
        out.stdout
    );
    // A rotated file removed from the middle.
    assert_finding(
        &check(&[new.clone(), old.clone()]),
        "audit.jsonl:1",
        "deleted",
    );
    // The first line of a new file deleted.
    let cut = file("audit.jsonl", &lines[7..]);
    assert_finding(
        &check(&[old.clone(), mid.clone(), cut]),
        "audit.jsonl:1",
        "deleted",
    );
    // An edit in the last line of a rotated file.
    let mut edited = lines[3..6].to_vec();
    edited[2] = edited[2].replace("coder", "nobody");
    let mid = file("audit.jsonl.1", &edited);
    assert_finding(
        &check(&[old.clone(), mid, new.clone()]),
        "audit.jsonl.1:3",
        "edited",
    );
    // Older files rotated away: the chain starts later, and says so.
    let out = check(&[new]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
    assert!(
        out.stdout.contains("note: the chain starts at seq 6"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_chain_that_starts_anew_is_a_break() {
    let (a, _) = trail(3);
    let (b, _) = trail(2);
    let out = check(&[file("x", &[a, b].concat())]);
    assert_finding(&out, "x:4", "restarted");
}

#[test]
fn journald_heads_catch_removed_tails_and_recomputed_chains() {
    let (lines, head) = trail(6);
    let arg = |h: &Head| ChainHeadArg {
        seq: h.seq.unwrap(),
        hash: h.hash.clone(),
    };
    let out = verify(&[file("a", &lines)], &[arg(&head)]);
    assert_eq!(out.code, EXIT_INTACT, "{out:?}");
    // The last two lines removed: the chain itself is intact, the head is not there.
    let out = verify(&[file("a", &lines[..4])], &[arg(&head)]);
    assert_eq!(out.code, EXIT_TAMPERED, "{out:?}");
    assert!(
        out.stderr.starts_with("deleted: the trail ends at seq 3"),
        "{}",
        out.stderr
    );
    // Edited and the whole chain recomputed: only the head shows it.
    let mut chain = Chain::after(Head::genesis());
    let forged: Vec<String> = (0..6)
        .map(|i| {
            let who = if i == 2 { "nobody" } else { "coder" };
            let mut buf = format!("{{\"n\":{i},\"agent_id\":\"{who}\"}}\n").into_bytes();
            chain.seal(&mut buf, 0);
            String::from_utf8(buf).unwrap()
        })
        .collect();
    assert_eq!(check(&[file("a", &forged)]).code, EXIT_INTACT);
    let out = verify(&[file("a", &forged)], &[arg(&head)]);
    assert_finding(&out, "a:6", "rewritten");
    // A head older than the files given: a usage problem, not tampering.
    let out = verify(
        &[file("a", &lines[3..])],
        &[ChainHeadArg {
            seq: 1,
            hash: head.hash,
        }],
    );
    assert_eq!(out.code, EXIT_UNREADABLE, "{out:?}");
}
