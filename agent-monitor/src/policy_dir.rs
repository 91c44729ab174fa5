//! Loading policy files from disk: the only I/O around the pure `policy` module.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::policy::{Issue, Policy, PolicySet};

/// Every problem found while loading, one per line when displayed.
#[derive(Debug, Error)]
pub struct LoadError {
    problems: Vec<LoadProblem>,
}

impl LoadError {
    #[cfg(test)]
    pub fn problems(&self) -> &[LoadProblem] {
        &self.problems
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// One problem. The I/O error is part of the message rather than a `source` because the list is
/// what gets reported.
#[derive(Debug, Error)]
pub enum LoadProblem {
    #[error("cannot read policy directory {}: {error}", path.display())]
    ReadDir { path: PathBuf, error: io::Error },
    #[error("cannot read policy file {}: {error}", path.display())]
    ReadFile { path: PathBuf, error: io::Error },
    #[error(transparent)]
    Policy(#[from] Issue),
    /// An approved file (`<agent>.approved.toml`) that is more than an agent and allow entries,
    /// or names an agent without a policy file.
    #[error("approved file {}: {why}", path.display())]
    Approved { path: PathBuf, why: String },
}

/// Files an operator reviews that add allow entries to one agent (ask mode's `always`).
pub const APPROVED_SUFFIX: &str = ".approved.toml";

fn is_approved_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(APPROVED_SUFFIX))
}

/// Loads every `*.toml` file of `dir` (other files are ignored), in name order. An empty directory
/// gives an empty set. All files are read and checked, so one run reports every problem.
pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadError> {
    let mut problems = Vec::new();
    let read_dir_problem = |error| LoadProblem::ReadDir {
        path: dir.to_path_buf(),
        error,
    };
    let entries = fs::read_dir(dir).map_err(|e| LoadError {
        problems: vec![read_dir_problem(e)],
    })?;
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                // fs::metadata follows symlinks, so a linked policy file counts; a `x.toml/` dir doesn't.
                let is_file = fs::metadata(&path).is_ok_and(|m| m.is_file());
                if is_file && path.extension().is_some_and(|ext| ext == "toml") {
                    files.push(path);
                }
            }
            Err(e) => problems.push(read_dir_problem(e)),
        }
    }
    files.sort();

    let mut policies = Vec::new();
    let mut approved = Vec::new();
    for path in &files {
        let into = if is_approved_file(path) {
            &mut approved
        } else {
            &mut policies
        };
        match load_file(path) {
            Ok(policy) => into.push((path, policy)),
            Err(mut file_problems) => problems.append(&mut file_problems),
        }
    }
    let mut policies: Vec<Policy> = policies.into_iter().map(|(_, p)| p).collect();
    for (path, extra) in approved {
        if let Err(why) = approved_shape(path) {
            problems.push(LoadProblem::Approved {
                path: path.clone(),
                why,
            });
            continue;
        }
        match policies.iter_mut().find(|p| p.agent() == extra.agent()) {
            Some(p) => p.absorb_approved(extra),
            None => problems.push(LoadProblem::Approved {
                path: path.clone(),
                why: format!(
                    "agent {:?} has no policy file in this directory; an approved file only adds \
                     allow entries to an agent defined elsewhere",
                    extra.agent()
                ),
            }),
        }
    }
    finish(policies, problems)
}

/// An approved file holds `agent` and `network.allow` / `exec.allow` only: mode, identity and DNS
/// settings stay in the agent's own file.
fn approved_shape(path: &Path) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("agent", _) => {}
            ("network" | "exec", toml::Value::Table(t)) if t.keys().all(|k| k == "allow") => {}
            // `always` approvals of unix sockets (ask mode, docs/ask.md).
            ("unix", toml::Value::Table(t)) if t.keys().all(|k| k == "allow") => {}
            _ => {
                return Err(format!(
                    "{key:?}: an approved file holds only `agent`, `network.allow` and \
                     `exec.allow`"
                ));
            }
        }
    }
    Ok(())
}

/// Loads one policy file, or every policy of a directory (`agent-monitor policy check PATH`).
pub fn load_path(path: &Path) -> Result<PolicySet, LoadError> {
    if path.is_dir() {
        return load_dir(path);
    }
    match load_file(path) {
        Ok(policy) => finish(vec![policy], Vec::new()),
        Err(problems) => Err(LoadError { problems }),
    }
}

fn load_file(path: &Path) -> Result<Policy, Vec<LoadProblem>> {
    let text = fs::read_to_string(path).map_err(|error| {
        vec![LoadProblem::ReadFile {
            path: path.to_path_buf(),
            error,
        }]
    })?;
    Policy::parse(&text, path)
        .map_err(|e| e.into_issues().into_iter().map(LoadProblem::from).collect())
}

/// Checks the files that parsed against each other, keeping the problems already found.
fn finish(policies: Vec<Policy>, mut problems: Vec<LoadProblem>) -> Result<PolicySet, LoadError> {
    match PolicySet::new(policies) {
        Ok(set) if problems.is_empty() => Ok(set),
        Ok(_) => Err(LoadError { problems }),
        Err(e) => {
            problems.extend(e.into_issues().into_iter().map(LoadProblem::from));
            Err(LoadError { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Mode;

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
    }

    fn write(dir: &Path, name: &str, text: &str) {
        if let Err(e) = fs::write(dir.join(name), text) {
            panic!("writing {name}: {e}");
        }
    }

    fn tempdir() -> tempfile::TempDir {
        match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        }
    }

    #[test]
    fn every_example_policy_parses() {
        let dir = examples_dir();
        let set = match load_dir(&dir) {
            Ok(set) => set,
            Err(e) => panic!("example policies in {} do not load:\n{e}", dir.display()),
        };
        let files = fs::read_dir(&dir)
            .expect("examples dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .count();
        assert!(files > 0, "no example policies found");
        assert_eq!(set.len(), files, "one agent per file");
        let coder = set.get("coder").expect("coder example");
        assert_eq!(coder.mode(), Mode::Enforce);
        assert_eq!(set.get("reviewer").map(Policy::mode), Some(Mode::Alert));
        // Examples must also fit the kernel tables.
        if let Err(e) = set.compile() {
            panic!("{e}");
        }
    }

    #[test]
    fn loads_toml_files_in_name_order_and_ignores_others() {
        let dir = tempdir();
        write(dir.path(), "b.toml", "agent = \"bravo\"\n");
        write(
            dir.path(),
            "a.toml",
            "agent = \"alpha\"\nmode = \"alert\"\n",
        );
        write(dir.path(), "README.md", "not a policy");
        write(dir.path(), "c.toml.bak", "garbage = [");
        if let Err(e) = fs::create_dir(dir.path().join("sub.toml")) {
            panic!("{e}");
        }
        let set = match load_dir(dir.path()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let names: Vec<_> = set.indexed().map(|(i, p)| (i, p.agent())).collect();
        assert_eq!(names, [(0, "alpha"), (1, "bravo")]);
    }

    #[test]
    fn empty_directory_is_an_empty_set() {
        let dir = tempdir();
        match load_dir(dir.path()) {
            Ok(set) => assert!(set.is_empty()),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_error_of_every_file_is_reported() {
        let dir = tempdir();
        write(dir.path(), "good.toml", "agent = \"good\"\n");
        write(
            dir.path(),
            "bad1.toml",
            "agent = \"bad1\"\n[network]\nallow = [\"10.0.0.1/8:443\", \"example..com:80\"]\n",
        );
        write(
            dir.path(),
            "bad2.toml",
            "agent = \"bad2\"\ncolour = \"red\"\n",
        );
        let err = load_dir(dir.path()).expect_err("errors");
        let msg = err.to_string();
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), 3, "{msg}");
        let d = dir.path().display();
        assert_eq!(
            lines[0],
            format!(
                "{d}/bad1.toml:3:10: network.allow[0] \"10.0.0.1/8:443\": host bits are set below the prefix; did you mean 10.0.0.0/8?"
            )
        );
        assert_eq!(
            lines[1],
            format!(
                "{d}/bad1.toml:3:28: network.allow[1] \"example..com:80\": host name has an empty label; expected labels separated by single dots"
            )
        );
        assert!(
            lines[2].starts_with(&format!("{d}/bad2.toml:2:1: unknown field `colour`")),
            "{msg}"
        );
        assert_eq!(err.problems().len(), 3);
    }

    #[test]
    fn duplicate_agents_across_files_are_reported_with_file_errors() {
        let dir = tempdir();
        write(dir.path(), "one.toml", "agent = \"coder\"\n");
        write(dir.path(), "two.toml", "# copy\nagent = \"coder\"\n");
        write(dir.path(), "three.toml", "agent = \"x\"\nmode = \"loud\"\n");
        let msg = load_dir(dir.path()).expect_err("errors").to_string();
        let d = dir.path().display();
        assert_eq!(
            msg,
            format!(
                "{d}/three.toml:2:8: mode \"loud\": expected \"enforce\", \"alert\" or \"ask\"\n\
                 agent \"coder\" is defined twice: at {d}/one.toml:1:9 and at {d}/two.toml:2:9"
            )
        );
    }

    #[test]
    fn unreadable_files_are_reported() {
        let dir = tempdir();
        if let Err(e) = fs::write(dir.path().join("bin.toml"), [0xff, 0xfe, 0x00]) {
            panic!("{e}");
        }
        write(dir.path(), "ok.toml", "agent = \"ok\"\n");
        let msg = load_dir(dir.path()).expect_err("errors").to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot read policy file {}/bin.toml: ",
                dir.path().display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempdir();
        let missing = dir.path().join("nope");
        let msg = load_dir(&missing).expect_err("error").to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot read policy directory {}: ",
                missing.display()
            )),
            "{msg}"
        );
        let msg = load_path(&missing).expect_err("error").to_string();
        assert!(
            msg.starts_with(&format!("cannot read policy file {}: ", missing.display())),
            "{msg}"
        );
    }

    #[test]
    fn load_path_takes_a_file_or_a_directory() {
        let dir = tempdir();
        write(dir.path(), "a.toml", "agent = \"a\"\n");
        write(dir.path(), "b.toml", "agent = \"b\"\n");
        let one = load_path(&dir.path().join("a.toml")).expect("file");
        assert_eq!(one.len(), 1);
        assert_eq!(one.index_of("a"), Some(0));
        let all = load_path(dir.path()).expect("dir");
        assert_eq!(all.len(), 2);
        write(dir.path(), "bad.conf", "agent = \"B\"\n");
        let msg = load_path(&dir.path().join("bad.conf"))
            .expect_err("error")
            .to_string();
        assert!(
            msg.ends_with(
                "bad.conf:1:9: agent \"B\": agent name must start with [a-z0-9], not 'B'"
            ),
            "{msg}"
        );
    }

    #[test]
    fn approved_files_add_allow_entries_to_their_agent() {
        let dir = tempdir();
        write(
            dir.path(),
            "coder.toml",
            "agent = \"coder\"\nmode = \"ask\"\n[network]\nallow = [\"10.0.0.1:443\"]\n",
        );
        write(dir.path(), "other.toml", "agent = \"other\"\n");
        write(
            dir.path(),
            "coder.approved.toml",
            "agent = \"coder\"\n[network]\nallow = [\n  # request 3, approved by uid 0 (root)\n  \"pypi.org:1-65535\",\n  \"192.0.2.7:443\",\n]\n[exec]\nallow = [\"/usr/bin/make\"]\n",
        );
        let set = match load_dir(dir.path()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(set.len(), 2, "the approved file is no agent of its own");
        let coder = set.get("coder").expect("coder");
        assert_eq!(coder.mode(), Mode::Ask, "the mode stays the agent's own");
        assert!(
            coder
                .check_connect("192.0.2.7".parse().unwrap(), 443)
                .allowed
        );
        assert!(
            coder
                .check_connect("10.0.0.1".parse().unwrap(), 443)
                .allowed
        );
        assert!(coder.check_name("pypi.org").allowed);
        assert!(coder.check_exec("/usr/bin/make").allowed);
        let other = set.get("other").expect("other");
        assert!(!other.check_exec("/usr/bin/make").allowed);
    }

    #[test]
    fn a_bad_approved_file_is_refused_whole() {
        let dir = tempdir();
        write(dir.path(), "coder.toml", "agent = \"coder\"\n");
        // More than allow entries: refused (the mode stays in the agent's own file).
        write(
            dir.path(),
            "coder.approved.toml",
            "agent = \"coder\"\nmode = \"alert\"\n",
        );
        let e = load_dir(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("holds only `agent`"), "{e}");
        // An agent with no policy file.
        write(dir.path(), "coder.approved.toml", "agent = \"ghost\"\n");
        let e = load_dir(dir.path()).err().expect("refused");
        assert!(
            e.to_string().contains("\"ghost\" has no policy file"),
            "{e}"
        );
        // A bad entry names the file and line.
        write(
            dir.path(),
            "coder.approved.toml",
            "agent = \"coder\"\n[exec]\nallow = [\"relative/path\"]\n",
        );
        let e = load_dir(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("coder.approved.toml:3"), "{e}");
    }
}
