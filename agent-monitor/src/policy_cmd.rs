//! `policy suggest` and `policy test`: read the trail and policy files, run the pure `learn`
//! module, print, and choose the exit status.

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::{SuggestArgs, TestArgs, Widen};
use crate::learn::audit::{Audit, Recorded, read_audit, unknown_kinds};
use crate::learn::render::{add_entries, add_request_rules, check, parse_document, skeleton};
use crate::learn::replay::{judge, replay, replay_policy};
use crate::learn::suggest::{Section, SuggestOptions, clean, suggest_for};
use crate::policy::Policy;
// Output into a closed pipe ends the command by SIGPIPE instead of std's panic (exit 101).
use crate::stdout::out as print;

/// Everything as intended: a complete suggestion, or a replay where everything is allowed.
const EXIT_OK: u8 = 0;
/// suggest: printed, but malformed lines are missing from it. test: some action is not allowed.
const EXIT_INCOMPLETE_OR_FINDINGS: u8 = 1;
/// Bad input; for suggest nothing was printed on stdout.
const EXIT_BAD_INPUT: u8 = 2;

/// What a command prints and how it exits; built without I/O so tests can read it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

impl Outcome {
    fn fail(mut stderr: String, message: &str) -> Outcome {
        stderr.push_str(message);
        stderr.push('\n');
        Outcome {
            stdout: String::new(),
            stderr,
            code: EXIT_BAD_INPUT,
        }
    }

    fn print(self) -> ExitCode {
        print!("{}", self.stdout);
        eprint!("{}", self.stderr);
        ExitCode::from(self.code)
    }
}

/// The audit trail named by `--events` could not be read at all (single bad lines are
/// [`crate::learn::audit::LineProblem`]s, not this).
#[derive(Debug, thiserror::Error)]
#[error("cannot read the audit trail {}: {source}", path.display())]
struct TrailError {
    path: std::path::PathBuf,
    source: std::io::Error,
}

fn read_trail(path: &Path) -> Result<Audit, TrailError> {
    File::open(path)
        .and_then(|f| read_audit(BufReader::new(f), path))
        .map_err(|source| TrailError {
            path: path.to_path_buf(),
            source,
        })
}

pub fn suggest_cmd(args: SuggestArgs) -> ExitCode {
    let audit = match read_trail(&args.events) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(String::new(), &e.to_string()).print(),
    };
    let existing = match &args.merge {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((text, path.as_path())),
            Err(e) => {
                let msg = format!(
                    "cannot read the policy to merge into {}: {e}",
                    path.display()
                );
                return Outcome::fail(String::new(), &msg).print();
            }
        },
    };
    let existing = existing.as_ref().map(|(t, p)| (t.as_str(), *p));
    suggest_outcome(&args, &audit, existing).print()
}

/// `policy suggest` on an already-read trail and (for `--merge`) policy text.
pub fn suggest_outcome(
    args: &SuggestArgs,
    audit: &Audit,
    existing: Option<(&str, &Path)>,
) -> Outcome {
    let mut err = String::new();
    for p in &audit.problems {
        let _ = writeln!(err, "{p}");
    }
    let origin = audit.origin.display();
    let selected: Vec<&Recorded> = audit.of(&args.agent, &args.task).collect();
    if selected.is_empty() {
        let mut agents: Vec<String> = audit
            .actions
            .iter()
            .map(|r| format!("{} (task {})", r.agent, r.task))
            .collect();
        agents.sort();
        agents.dedup();
        let tasks = match args.task.is_empty() {
            true => String::new(),
            false => format!(" in task(s) {}", args.task.join(", ")),
        };
        return Outcome::fail(
            err,
            &format!(
                "{origin}: no recorded action of agent {}{tasks}; the trail has: {}",
                args.agent,
                if agents.is_empty() {
                    "nothing".into()
                } else {
                    agents.join(", ")
                }
            ),
        );
    }
    for (kind, n) in unknown_kinds(selected.iter().copied()) {
        let _ = writeln!(
            err,
            "{origin}: {n} recorded `{kind}` action(s) skipped: this version does not know that kind, \
             so the suggestion does not cover them"
        );
    }

    let existing_policy = match existing {
        None => None,
        Some((text, path)) => match Policy::parse(text, path) {
            Ok(p) if p.agent() == args.agent => Some((p, text, path)),
            Ok(p) => {
                let msg = format!(
                    "{}: this is the policy of agent {}, not of {}",
                    p.defined_at(),
                    p.agent(),
                    args.agent
                );
                return Outcome::fail(err, &msg);
            }
            Err(e) => return Outcome::fail(err, &format!("{e}")),
        },
    };
    // When merging, only what the existing policy does not already allow is suggested.
    let wanted: Vec<&Recorded> = match &existing_policy {
        None => selected.clone(),
        Some((p, _, _)) => selected
            .iter()
            .copied()
            .filter(|r| judge(p, &r.what).is_some_and(|d| !d.allowed))
            .collect(),
    };
    let opts = SuggestOptions {
        widen_ports: args.widen.contains(&Widen::Ports),
        widen_cidr: args.widen.contains(&Widen::Cidr),
        widen_globs: args.widen.contains(&Widen::Globs),
        host_names: true,
        widen_paths: args.widen.contains(&Widen::Paths),
    };
    let suggestion = suggest_for(
        wanted.iter().copied(),
        &opts,
        existing_policy.as_ref().map(|(p, _, _)| p),
    );
    for n in &suggestion.not_suggested {
        let _ = writeln!(err, "{origin}:{}: {}: {}", n.line, clean(&n.what), n.why);
    }

    let (mut doc, out_origin) = match &existing_policy {
        Some((_, text, path)) => match parse_document(text, path) {
            Ok(d) => (d, path.to_path_buf()),
            Err(e) => return Outcome::fail(err, &e.to_string()),
        },
        None => (
            skeleton(&args.agent, &header(args, audit, &selected)),
            Path::new("<suggestion>").to_path_buf(),
        ),
    };
    let added = match add_entries(&mut doc, &suggestion.entries, &out_origin) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(err, &e.to_string()),
    };
    let added_rules = match add_request_rules(&mut doc, &suggestion.requests, &out_origin) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(err, &e.to_string()),
    };
    let text = doc.to_string();
    // The daemon must accept what we print, and it must allow what we were asked to allow.
    let policy = match check(&text, &out_origin) {
        Ok(p) => p,
        Err(e) => {
            return Outcome::fail(
                err,
                &format!("internal error: the suggestion does not parse:\n{e}\n{text}"),
            );
        }
    };
    let skipped: Vec<usize> = suggestion.not_suggested.iter().map(|n| n.line).collect();
    let missed: Vec<String> = replay_policy(&policy, wanted.iter().copied())
        .not_allowed
        .iter()
        .filter(|f| !skipped.contains(&f.record.line))
        .map(|f| format!("line {}: {}", f.record.line, f.record.what))
        .collect();
    if !missed.is_empty() {
        return Outcome::fail(
            err,
            &format!(
                "internal error: the suggestion would not allow {}",
                missed.join("; ")
            ),
        );
    }

    match existing_policy {
        Some((_, _, path)) if added.is_empty() && added_rules.is_empty() => {
            let _ = writeln!(
                err,
                "nothing to add: {} already allows every recorded action of {}",
                path.display(),
                args.agent
            );
        }
        Some((_, _, path)) => {
            let _ = writeln!(
                err,
                "added to {} ({} entries):",
                path.display(),
                added.len() + added_rules.len()
            );
            for e in &added {
                for line in e.comment() {
                    let _ = writeln!(err, "+     # {line}");
                }
                let _ = writeln!(err, "+ [{}] allow {:?}", e.section.key(), e.text);
            }
            for r in &added_rules {
                for line in r.comment() {
                    let _ = writeln!(err, "+     # {line}");
                }
                let _ = writeln!(err, "+ [[network.{}]] {}", r.table(), r.text());
            }
        }
        None => {
            let count = |s| added.iter().filter(|e| e.section == s).count();
            let _ = writeln!(
                err,
                "suggested {} network and {} exec entries from {} recorded actions of {}",
                count(Section::Network),
                count(Section::Exec),
                selected.len(),
                args.agent
            );
            if !added_rules.is_empty() {
                let count = |t| added_rules.iter().filter(|r| r.table() == t).count();
                let _ = writeln!(
                    err,
                    "suggested {} [[network.http]] and {} [[network.tls]] rules",
                    count("http"),
                    count("tls")
                );
            }
        }
    }
    Outcome {
        stdout: text,
        code: if audit.problems.is_empty() {
            EXIT_OK
        } else {
            EXIT_INCOMPLETE_OR_FINDINGS
        },
        stderr: err,
    }
}

/// The comment at the top of a fresh suggestion.
fn header(args: &SuggestArgs, audit: &Audit, selected: &[&Recorded]) -> Vec<String> {
    let tasks = match args.task.is_empty() {
        true => String::new(),
        false => format!(", tasks {}", args.task.join(", ")),
    };
    let mut lines = vec![
        format!(
            "Suggested by `agent-monitor policy suggest` from {} ({} recorded actions of agent {}{tasks}).",
            clean(&audit.origin.display().to_string()),
            selected.len(),
            args.agent
        ),
        "It allows exactly what was recorded; entries marked WIDENED allow more (--widen).".into(),
        "Review every entry (the comment above it says who did it, when, how often) before enforcing.".into(),
    ];
    if !audit.problems.is_empty() {
        lines.push(format!(
            "INCOMPLETE: {} malformed trail line(s) were not read (see the command's stderr).",
            audit.problems.len()
        ));
    }
    lines
}

pub fn test_cmd(args: TestArgs) -> ExitCode {
    let set = match crate::policy_dir::load_path(&args.policy) {
        Ok(s) => s,
        Err(e) => return Outcome::fail(String::new(), &e.to_string()).print(),
    };
    let audit = match read_trail(&args.events) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(String::new(), &e.to_string()).print(),
    };
    test_outcome(&set, &audit).print()
}

/// `policy test` on already-loaded policies and trail.
pub fn test_outcome(set: &crate::policy::PolicySet, audit: &Audit) -> Outcome {
    let mut out = Outcome::default();
    for p in &audit.problems {
        let _ = writeln!(out.stderr, "{p}");
    }
    let origin = audit.origin.display();
    let r = replay(set, &audit.actions);
    for f in &r.not_allowed {
        let _ = writeln!(out.stdout, "{origin}:{}: {f}", f.record.line);
    }
    for (kind, n) in &r.unknown_kinds {
        let _ = writeln!(
            out.stderr,
            "{origin}: {n} recorded `{kind}` action(s) not replayed: this version cannot judge that kind"
        );
    }
    // What a changed policy lets through that was stopped when recorded: worth a look, not a
    // failure.
    for (record, reason) in &r.now_allowed {
        let _ = writeln!(
            out.stderr,
            "{origin}:{}: agent {} task {}: {}: recorded as denied, would now be allowed by {reason}",
            record.line, record.agent, record.task, record.what
        );
    }
    let agents: Vec<&str> = set.iter().map(Policy::agent).collect();
    let others: u64 = r.other_agents.values().sum();
    let _ = writeln!(
        out.stderr,
        "replayed {} recorded action(s) of {}: {} not allowed{}",
        r.judged,
        agents.join(", "),
        r.not_allowed.len(),
        if others > 0 {
            format!("; {others} action(s) of other agents ignored")
        } else {
            String::new()
        }
    );
    out.code = if !audit.problems.is_empty() {
        let _ = writeln!(
            out.stderr,
            "{origin}: {} malformed line(s): the replay is incomplete",
            audit.problems.len()
        );
        EXIT_BAD_INPUT
    } else if r.judged == 0 && r.unknown_kinds.is_empty() {
        let _ = writeln!(
            out.stderr,
            "{origin}: nothing to replay: no recorded action of {}",
            agents.join(", ")
        );
        EXIT_BAD_INPUT
    } else if r.not_allowed.is_empty() {
        EXIT_OK
    } else {
        EXIT_INCOMPLETE_OR_FINDINGS
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::audit::tests::{connect_line, exec_line, read};
    use crate::policy::PolicySet;

    fn args(agent: &str) -> SuggestArgs {
        SuggestArgs {
            agent: agent.into(),
            events: "audit.jsonl".into(),
            task: Vec::new(),
            widen: Vec::new(),
            merge: None,
        }
    }

    fn workload() -> Vec<String> {
        vec![
            exec_line("coder", "rec", "/bin/sh", "2026-11-29T12:00:00Z"),
            exec_line("coder", "rec", "/usr/bin/python3", "2026-11-29T12:00:01Z"),
            connect_line("coder", "rec", "127.0.0.1", 8080, ""),
            exec_line("coder", "rec", "/bin/true", "2026-11-29T12:00:02Z"),
            exec_line("bystander", "x", "/usr/bin/id", "2026-11-29T12:00:02Z"),
        ]
    }

    fn set_of(text: &str) -> PolicySet {
        let p = Policy::parse(text, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        PolicySet::new(vec![p]).unwrap()
    }

    #[test]
    fn suggest_then_test_is_clean_and_a_new_action_is_found() {
        let audit = read(&workload().join("\n"));
        let out = suggest_outcome(&args("coder"), &audit, None);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stderr,
            "suggested 1 network and 3 exec entries from 4 recorded actions of coder\n"
        );
        assert!(out.stdout.starts_with("# Suggested by `agent-monitor policy suggest` from audit.jsonl (4 recorded actions of agent coder)."));
        let set = set_of(&out.stdout);
        let t = test_outcome(&set, &audit);
        assert_eq!(t.code, 0, "{t:?}");
        assert_eq!(t.stdout, "");
        assert!(t.stderr.contains("replayed 4 recorded action(s) of coder: 0 not allowed; 1 action(s) of other agents ignored"), "{}", t.stderr);

        let mut later = workload();
        later.push(connect_line("coder", "rec2", "127.0.0.1", 9999, ""));
        later.push(exec_line(
            "coder",
            "rec2",
            "/usr/bin/curl",
            "2026-11-29T13:00:00Z",
        ));
        let t = test_outcome(&set, &read(&later.join("\n")));
        assert_eq!(t.code, 1);
        let lines: Vec<&str> = t.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", t.stdout);
        assert!(
            lines[0].starts_with("audit.jsonl:6: agent coder task rec2: connect 127.0.0.1:9999"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("audit.jsonl:7: agent coder task rec2: exec /usr/bin/curl"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn malformed_lines_make_suggest_exit_1_and_test_exit_2() {
        let mut lines = workload();
        lines.insert(1, "not json".into());
        let audit = read(&lines.join("\n"));
        let out = suggest_outcome(&args("coder"), &audit, None);
        assert_eq!(out.code, 1);
        assert!(
            out.stderr.starts_with("audit.jsonl:2: not JSON ("),
            "{}",
            out.stderr
        );
        assert!(
            out.stdout
                .contains("# INCOMPLETE: 1 malformed trail line(s)")
        );
        let set = set_of(&out.stdout);
        let t = test_outcome(&set, &audit);
        assert_eq!(t.code, 2);
        assert!(
            t.stderr
                .contains("1 malformed line(s): the replay is incomplete")
        );
    }

    #[test]
    fn unknown_agent_is_bad_input_naming_what_is_there() {
        let audit = read(&workload().join("\n"));
        let out = suggest_outcome(&args("codr"), &audit, None);
        assert_eq!(out.code, 2);
        assert_eq!(out.stdout, "");
        assert_eq!(
            out.stderr,
            "audit.jsonl: no recorded action of agent codr; the trail has: bystander (task x), coder (task rec)\n"
        );
        let t = test_outcome(&set_of("agent = \"codr\"\n"), &audit);
        assert_eq!(t.code, 2);
    }

    #[test]
    fn merge_adds_only_the_missing_and_prints_the_difference() {
        let audit = read(&workload().join("\n"));
        let existing =
            "# mine\nagent = \"coder\"\nmode = \"alert\"\n[exec]\nallow = [\"/bin/*\"]\n";
        let mut a = args("coder");
        a.merge = Some("coder.toml".into());
        let out = suggest_outcome(&a, &audit, Some((existing, Path::new("coder.toml"))));
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout
                .starts_with("# mine\nagent = \"coder\"\nmode = \"alert\"\n"),
            "{}",
            out.stdout
        );
        let added: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("+ ["))
            .collect();
        assert_eq!(
            added,
            [
                "+ [network] allow \"127.0.0.1:8080\"",
                "+ [exec] allow \"/usr/bin/python3\""
            ]
        );
        assert!(out.stderr.starts_with("added to coder.toml (2 entries):\n"));
        // Merging again adds nothing.
        let again = suggest_outcome(
            &a,
            &audit,
            Some((out.stdout.as_str(), Path::new("coder.toml"))),
        );
        assert_eq!(again.stdout, out.stdout);
        assert_eq!(
            again.stderr,
            "nothing to add: coder.toml already allows every recorded action of coder\n"
        );
    }

    #[test]
    fn merge_refuses_another_agents_or_an_invalid_policy() {
        let audit = read(&workload().join("\n"));
        let out = suggest_outcome(
            &args("coder"),
            &audit,
            Some(("agent = \"other\"\n", Path::new("o.toml"))),
        );
        assert_eq!(out.code, 2);
        assert_eq!(
            out.stderr,
            "o.toml:1:9: this is the policy of agent other, not of coder\n"
        );
        let out = suggest_outcome(
            &args("coder"),
            &audit,
            Some(("agent = \"coder\"\nmode = \"loud\"\n", Path::new("c.toml"))),
        );
        assert_eq!(out.code, 2);
        assert_eq!(
            out.stderr,
            "c.toml:2:8: mode \"loud\": expected \"enforce\", \"alert\" or \"ask\"\n"
        );
    }

    #[test]
    fn requests_become_http_rules_and_test_replays_them() {
        use crate::action::Verdict;
        use crate::learn::requests::tests::request_line;
        let get = |path: &str| {
            request_line(
                "coder",
                "api.example.com",
                "api.example.com",
                443,
                "GET",
                path,
                Verdict::Allowed,
            )
        };
        let mut lines = workload();
        lines.extend((1..=3).map(|i| get(&format!("/v1/items/{i}"))));
        let audit = read(&lines.join("\n"));
        let mut a = args("coder");
        a.widen = vec![Widen::Paths];
        let out = suggest_outcome(&a, &audit, None);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout.contains(
                "[[network.http]]\nhost = \"api.example.com\"\nport = 443\nmethods = [\"GET\"]\n\
                 paths = [\"/v1/items/*\"]\n"
            ),
            "{}",
            out.stdout
        );
        assert!(
            out.stderr
                .contains("suggested 1 [[network.http]] and 0 [[network.tls]] rules"),
            "{}",
            out.stderr
        );
        let set = set_of(&out.stdout);
        let t = test_outcome(&set, &audit);
        assert_eq!(t.code, 0, "{t:?}");
        // A later trail with a write the suggestion does not allow.
        let mut later = lines.clone();
        later.push(request_line(
            "coder",
            "api.example.com",
            "api.example.com",
            443,
            "DELETE",
            "/v1/items/1",
            Verdict::Alert,
        ));
        // And a read that was refused when recorded, which the widened rule now allows.
        later.push(request_line(
            "coder",
            "api.example.com",
            "api.example.com",
            443,
            "GET",
            "/v1/items/9",
            Verdict::Denied,
        ));
        let t = test_outcome(&set, &read(&later.join("\n")));
        assert_eq!(t.code, 1, "{t:?}");
        assert!(
            t.stderr.contains(
                "audit.jsonl:10: agent coder task t-42: http api.example.com:443 GET /v1/items/9: \
                 recorded as denied, would now be allowed by rule \"http api.example.com:443 GET \
                 /v1/items/*\""
            ),
            "{}",
            t.stderr
        );
        assert!(
            t.stdout.starts_with(
                "audit.jsonl:9: agent coder task t-42: http api.example.com:443 DELETE /v1/items/1"
            ),
            "{}",
            t.stdout
        );
        assert!(
            t.stdout.contains("method DELETE not listed"),
            "{}",
            t.stdout
        );
    }

    #[test]
    fn task_filter_and_unknown_kinds() {
        let mut lines = workload();
        lines.push(exec_line(
            "coder",
            "other-task",
            "/usr/bin/id",
            "2026-11-29T12:00:02Z",
        ));
        lines.push(
            connect_line("coder", "rec", "10.0.0.1", 53, "").replace("\"connect\"", "\"dns\""),
        );
        let audit = read(&lines.join("\n"));
        let mut a = args("coder");
        a.task = vec!["rec".into()];
        let out = suggest_outcome(&a, &audit, None);
        assert_eq!(out.code, 0);
        assert!(!out.stdout.contains("/usr/bin/id"));
        assert!(
            out.stderr.contains("1 recorded `dns` action(s) skipped"),
            "{}",
            out.stderr
        );
        let set = set_of(&out.stdout);
        let t = test_outcome(&set, &audit);
        assert_eq!(t.code, 1, "the other task's exec is not allowed");
        assert!(t.stderr.contains("1 recorded `dns` action(s) not replayed"));
    }
}
