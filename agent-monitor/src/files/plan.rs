//! From the policies to the files to mark: each `[files]` rule expanded against the host (`~/`
//! for every home directory, `*` for every name), every existing match walked (a denied directory
//! covers its whole tree), each file and directory with its (device, inode) and the agents it is
//! denied to. Runs on the guard's walker thread: it opens directories, which the guard thread
//! itself must never do (see `guard.rs`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::judge::{Denial, FileId, Judge};
use crate::policy::files::FileRules;
use crate::policy::model::Mode;

/// Most inodes one plan marks. Directories are marked first: a file left unmarked in a marked
/// directory is still judged through its directory (`FAN_EVENT_ON_CHILD`), only its hard links
/// elsewhere are not.
pub const MAX_MARKS: usize = 50_000;
/// Deepest directory a walk descends into below a rule's match.
const MAX_DEPTH: usize = 32;

/// One agent's `[files]`, as the walker needs it.
#[derive(Clone, Debug)]
pub struct AgentFiles {
    pub agent: String,
    pub mode: Mode,
    pub rules: FileRules,
}

/// A file or directory to mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub path: PathBuf,
    pub id: FileId,
    pub dir: bool,
}

/// What the guard puts in force: the marks and the judge that goes with them.
#[derive(Debug, Default)]
pub struct Plan {
    pub marks: Vec<Mark>,
    pub judge: Judge,
    /// What could not be covered (too many files, unreadable directories), for the operator.
    pub problems: Vec<String>,
}

/// The plan for `agents` on a host whose home directories are `homes`.
pub fn plan(agents: &[AgentFiles], homes: &[String]) -> Plan {
    let modes = agents
        .iter()
        .filter(|a| !a.rules.is_empty())
        .map(|a| (Arc::from(a.agent.as_str()), a.mode))
        .collect();
    let mut judge = Judge::new(modes);
    let mut found: HashMap<FileId, Mark> = HashMap::new();
    let mut problems = Vec::new();
    for a in agents {
        let agent: Arc<str> = Arc::from(a.agent.as_str());
        for rule in a.rules.deny() {
            let denial = Denial {
                agent: agent.clone(),
                rule: Arc::from(rule.describe()),
            };
            for pattern in rule.absolute_patterns(homes) {
                for root in expand(&pattern) {
                    walk(
                        &root,
                        0,
                        &mut |mark| {
                            judge.add(mark.id, denial.clone());
                            found.entry(mark.id).or_insert(mark);
                        },
                        &mut problems,
                    );
                }
            }
        }
    }
    let mut marks: Vec<Mark> = found.into_values().collect();
    // Directories first, then by path: the same plan marks the same files in the same order.
    marks.sort_by(|a, b| b.dir.cmp(&a.dir).then_with(|| a.path.cmp(&b.path)));
    if marks.len() > MAX_MARKS {
        problems.push(format!(
            "{} files and directories are denied; only the first {MAX_MARKS} are marked (the \
             others are still judged through their directory, but their hard links elsewhere \
             are not)",
            marks.len()
        ));
        marks.truncate(MAX_MARKS);
    }
    Plan {
        marks,
        judge,
        problems,
    }
}

/// The existing paths an absolute pattern names, `*` matching any one name (symlinks followed
/// at the pattern's own components: `~/.kube/config` may be a link to the real file).
pub fn expand(pattern: &str) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/")];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for p in paths {
            if comp == "*" {
                let Ok(entries) = fs::read_dir(&p) else {
                    continue;
                };
                let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                names.sort();
                next.extend(names);
            } else {
                let candidate = p.join(comp);
                if fs::metadata(&candidate).is_ok() {
                    next.push(candidate);
                }
            }
        }
        paths = next;
    }
    paths
}

/// Everything at and below `path` (a directory that appeared in a denied tree).
pub fn tree(path: &Path) -> (Vec<Mark>, Vec<String>) {
    let mut marks = Vec::new();
    let mut problems = Vec::new();
    walk(path, 1, &mut |m| marks.push(m), &mut problems);
    (marks, problems)
}

/// `path` and, for a directory, everything below it (symlinks inside are not followed: a link
/// names another file, which is judged on its own).
fn walk(path: &Path, depth: usize, found: &mut impl FnMut(Mark), problems: &mut Vec<String>) {
    let meta = match if depth == 0 {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    } {
        Ok(m) => m,
        Err(_) => return,
    };
    if meta.file_type().is_symlink() {
        return;
    }
    let dir = meta.is_dir();
    found(Mark {
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
        dir,
    });
    if !dir {
        return;
    }
    if depth >= MAX_DEPTH {
        problems.push(format!(
            "{}: deeper than {MAX_DEPTH} levels; what lies below is judged through its \
             directory only when that directory is marked",
            path.display()
        ));
        return;
    }
    match fs::read_dir(path) {
        Ok(entries) => {
            for e in entries.flatten() {
                walk(&e.path(), depth + 1, found, problems);
            }
        }
        Err(e) => problems.push(format!("{}: cannot list: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn agent(name: &str, files: &str) -> AgentFiles {
        let text = format!("agent = \"{name}\"\n[files]\n{files}\n");
        let p = Policy::parse(&text, Path::new("t.toml")).expect("valid");
        AgentFiles {
            agent: name.into(),
            mode: p.mode(),
            rules: p.files().clone(),
        }
    }

    fn id(p: &Path) -> FileId {
        let m = fs::metadata(p).expect("stat");
        (m.dev(), m.ino())
    }

    #[test]
    fn a_denied_tree_is_marked_whole_and_judged_per_agent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        for d in ["home/dev/.aws/sso", "home/ops/.aws", "home/dev/project"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for f in [
            "home/dev/.aws/credentials",
            "home/dev/.aws/sso/token",
            "home/ops/.aws/config",
            "home/dev/project/.env",
            "home/dev/project/main.rs",
        ] {
            fs::write(root.join(f), "x").expect("write");
        }
        std::os::unix::fs::symlink("/etc/hostname", root.join("home/dev/.aws/link"))
            .expect("symlink");
        let r = root.display();
        let coder = agent(
            "coder",
            &format!(
                "deny = [\"{r}/home/*/.aws\", \"{r}/home/dev/project/.env\", \"{r}/missing\"]"
            ),
        );
        let other = agent("other", &format!("deny = [\"{r}/home/ops/.aws/config\"]"));
        let plan = plan(&[coder, other], &[]);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        let paths: Vec<String> = plan
            .marks
            .iter()
            .map(|m| {
                m.path
                    .strip_prefix(root)
                    .expect("under")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            paths,
            [
                "home/dev/.aws",
                "home/dev/.aws/sso",
                "home/ops/.aws",
                "home/dev/.aws/credentials",
                "home/dev/.aws/sso/token",
                "home/dev/project/.env",
                "home/ops/.aws/config",
            ],
            "directories first; the symlink inside is not followed; main.rs untouched"
        );
        let config = id(&root.join("home/ops/.aws/config"));
        let agents: Vec<&str> = plan
            .judge
            .denials(config)
            .iter()
            .map(|d| &*d.agent)
            .collect();
        assert_eq!(agents, ["coder", "other"]);
        assert!(
            !plan
                .judge
                .contains(id(&root.join("home/dev/project/main.rs")))
        );
        assert_eq!(plan.judge.agents(), 2);
    }

    #[test]
    fn home_entries_expand_for_every_home_given() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = tmp.path().join("u");
        fs::create_dir_all(home.join(".ssh")).expect("mkdir");
        fs::write(home.join(".ssh/id_ed25519"), "k").expect("write");
        fs::write(home.join(".netrc"), "machine x").expect("write");
        let a = agent("coder", "deny_known_secrets = true");
        let plan = plan(&[a], &[home.display().to_string()]);
        let mut names: Vec<String> = plan
            .marks
            .iter()
            .filter(|m| m.path.starts_with(&home))
            .map(|m| {
                m.path
                    .strip_prefix(&home)
                    .expect("under")
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        assert_eq!(names, [".netrc", ".ssh", ".ssh/id_ed25519"]);
        let key = id(&home.join(".ssh/id_ed25519"));
        assert_eq!(
            &*plan.judge.denials(key)[0].rule,
            "files.deny_known_secrets \"~/.ssh\""
        );
    }

    #[test]
    fn agents_without_rules_cost_nothing() {
        let a = agent("coder", "deny = []");
        let plan = plan(&[a], &["/nonexistent-home".into()]);
        assert!(plan.marks.is_empty());
        assert_eq!(plan.judge.agents(), 0);
    }
}
