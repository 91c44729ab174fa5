//! The README and the manual checked against the repository and the CLI: every relative link
//! resolves (the file, and the heading after `#`), and every `agent-monitor` command line they
//! show names subcommands and options the CLI has. A renamed file, heading or option fails here
//! instead of in a newcomer's terminal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .to_path_buf()
}

/// The documents a reader follows: the README, the manual, the examples' README.
fn documents() -> Vec<PathBuf> {
    let root = repo();
    let mut docs = vec![root.join("README.md"), root.join("policies/README.md")];
    let mut manual: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ is readable")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    manual.sort();
    docs.extend(manual);
    docs
}

/// Lines outside fenced code blocks, with their 1-based numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors a document offers: one per heading (a repeated heading gets `-1`, `-2`, …).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, line) in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let base = slug(heading.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while !out.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    out
}

/// `[text](target)` link targets, with line numbers; code spans are skipped.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose(text) {
        let mut in_code = false;
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'`' => in_code = !in_code,
                b']' if !in_code && bytes.get(i + 1) == Some(&b'(') => {
                    if let Some(end) = line[i + 2..].find(')') {
                        out.push((n, line[i + 2..i + 2 + end].to_string()));
                        i += 2 + end;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves_to_a_file_and_heading() {
    let mut broken = Vec::new();
    let docs = documents();
    assert!(docs.len() > 5, "found the manual: {docs:?}");
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(path)
            };
            let place = format!("{}:{line}: {target}", doc.display());
            if !file.exists() {
                broken.push(format!("{place}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let target_text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&target_text).contains(anchor) {
                    broken.push(format!("{place}: no heading with this anchor"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Command lines in code: fenced blocks (with `\` continuations joined) and inline code spans.
fn command_texts(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let (n, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
            joined.push_str(line.trim_end_matches('\\'));
            joined.push(' ');
            if line.ends_with('\\') {
                pending = Some((n, joined));
            } else {
                out.push((n, joined));
            }
        } else {
            out.extend(
                line.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|span| (i + 1, span.to_string())),
            );
        }
    }
    out
}

/// Every `agent-monitor SUBCOMMAND… --option` in `text`, checked against the CLI: the words that
/// name subcommands are followed down the tree, and each `--option` after them must be one the
/// last subcommand takes. A command position followed by a word that is not a subcommand
/// (`agent-monitor AGENT_ID=coder` in a journalctl match) is not a command line and is skipped.
fn check_commands(cli: &clap::Command, text: &str, line: usize, problems: &mut Vec<String>) {
    let words: Vec<&str> = text.split_whitespace().collect();
    for (at, word) in words.iter().enumerate() {
        let at_command = word.trim_start_matches(['(', '[']);
        if !(at_command == "agent-monitor" || at_command.ends_with("/agent-monitor")) {
            continue;
        }
        // `cargo … -p agent-monitor`: the package, not the command.
        if at > 0 && matches!(words[at - 1], "-p" | "--package") {
            continue;
        }
        let mut cmd = cli;
        let mut path = vec!["agent-monitor".to_string()];
        let mut rest = words[at + 1..].iter();
        let mut first = true;
        for &raw in rest.by_ref() {
            let w = raw.trim_matches(|c| matches!(c, '[' | ']' | '(' | ')' | '…' | ',' | '.'));
            if w == "--" || matches!(w, "|" | ";" | "&&" | "||" | "#" | ">" | "<") {
                break;
            }
            if let Some(option) = w.strip_prefix("--") {
                let option = option.split('=').next().unwrap_or_default();
                if option.is_empty() {
                    break;
                }
                let known =
                    option == "help" || cmd.get_arguments().any(|a| a.get_long() == Some(option));
                if !known {
                    problems.push(format!(
                        "line {line}: `{}` has no option --{option} (in {text:?})",
                        path.join(" ")
                    ));
                }
            } else if let Some(sub) = cmd.find_subcommand(w) {
                path.push(w.to_string());
                cmd = sub;
            } else if first {
                break;
            }
            first = false;
        }
    }
}

#[test]
fn every_agent_monitor_command_in_the_docs_names_real_subcommands_and_options() {
    let mut cli = crate::cli::Cli::command();
    cli.build();
    let mut problems = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{doc:?}: {e}"));
        let mut here = Vec::new();
        for (line, code) in command_texts(&text) {
            check_commands(&cli, &code, line, &mut here);
        }
        problems.extend(here.into_iter().map(|p| format!("{}: {p}", doc.display())));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_command_check_catches_a_renamed_option_and_follows_subcommands() {
    let mut cli = crate::cli::Cli::command();
    cli.build();
    let mut problems = Vec::new();
    for fine in [
        "agent-monitor task start --agent a --task t --ttl 5m",
        "journalctl _EXE=/usr/bin/agent-monitor AGENT_ID=coder",
        "cargo bench -p agent-monitor --bench inprocess",
        "target/release/agent-monitor run --agent a -- /bin/sh --norc",
    ] {
        check_commands(&cli, fine, 1, &mut problems);
    }
    assert!(problems.is_empty(), "{problems:?}");
    let renamed = "agent-monitor task start --agent a --allow-net x";
    check_commands(&cli, renamed, 2, &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("`agent-monitor task start` has no option --allow-net"));
}

#[test]
fn anchors_follow_github_slugs() {
    let a = anchors("# Agent policies\n## `network.allow`\n## Log rotation\n## Log rotation\n");
    for want in [
        "agent-policies",
        "networkallow",
        "log-rotation",
        "log-rotation-1",
    ] {
        assert!(a.contains(want), "{want} in {a:?}");
    }
    assert_eq!(
        links("see [x](a.md#b) and `[y](not-a-link)`"),
        vec![(1, "a.md#b".to_string())]
    );
}
