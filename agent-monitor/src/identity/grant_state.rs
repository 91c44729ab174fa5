//! The task grants in force, kept in a small state file so that a restarted daemon takes them
//! over: the kernel maps hold only compiled entries keyed by task number, not the rules as
//! written (needed for `status` and `task narrow`) nor the task's name.
//!
//! The file is a cache of the kernel's truth, never a source of new grants: a restarted daemon
//! recovers a recorded task only if the kernel still holds exactly its entries with the recorded
//! expiry (see [`KernelGrants::holds_exactly`]), so a file older than the kernel (a write that
//! failed, a kill between the map update and the write) can only lose grants, never bring back
//! one that was ended or narrowed.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use agent_monitor_common::{ExecKey, Expiry, NetGrant, NetKey, TASK_NONE};
use serde::{Deserialize, Serialize};

use crate::identity::check_task_id;
use crate::identity::tasks::Tasks;
use crate::policy::{ExecRule, KernelTables, NetRule};

/// Where the daemon keeps its grant state unless `--state-file` says otherwise (the systemd
/// unit's RuntimeDirectory, preserved across restarts).
pub const DEFAULT_STATE_FILE: &str = "/run/agent-monitor/grants.json";
/// Where the kernel names this boot (a new UUID at every boot).
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// Format of the file; a file of another version is not trusted.
const VERSION: u32 = 1;

/// The file as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFile {
    pub version: u32,
    /// Expiries are CLOCK_MONOTONIC and task numbers live in pinned maps: both mean nothing in
    /// another boot.
    pub boot_id: String,
    /// The pin directory whose maps hold these grants.
    pub pin_dir: String,
    pub tasks: Vec<GrantRecord>,
}

/// One granted task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRecord {
    /// The task number that keys the kernel's grant entries.
    pub number: u32,
    pub agent: String,
    pub task: String,
    /// `--allow-connect` texts as granted (what `parse_grants` accepts).
    #[serde(default)]
    pub connect: Vec<String>,
    /// `--allow-exec` texts as granted.
    #[serde(default)]
    pub exec: Vec<String>,
    /// CLOCK_MONOTONIC ns at which the grants end; absent: until `task end`.
    #[serde(default)]
    pub expires_ns: Option<u64>,
}

/// A recorded task with its grants parsed again.
#[derive(Clone)]
pub struct Recorded {
    pub number: u32,
    pub agent: String,
    pub task: String,
    pub net: Vec<NetRule>,
    pub exec: Vec<ExecRule>,
    /// `u64::MAX`: until `task end` (as in [`crate::identity::tasks::Grants`]).
    pub expires_ns: u64,
}

impl Recorded {
    /// How many grants (rules) the task had.
    pub fn rules(&self) -> usize {
        self.net.len() + self.exec.len()
    }
}

/// Why a state file is not used. Each names the file and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot read it: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{path}: not a grant state file ({reason}); expected the JSON object \
         {{version, boot_id, pin_dir, tasks}} that agent-monitor daemon writes"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: format version {found}, expected {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path}: written during another boot (boot_id {found}, this boot is {expected}); \
         grant expiries and task numbers do not outlive a reboot"
    )]
    OtherBoot {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: belongs to pin directory {found}, expected {expected}")]
    OtherPinDir {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: task {number} ({agent}/{task}): {reason}")]
    BadRecord {
        path: PathBuf,
        number: u32,
        agent: String,
        task: String,
        reason: String,
    },
}

/// The records of every task of `tasks` that has grants, by task number.
pub fn records(tasks: &Tasks) -> Vec<GrantRecord> {
    let mut v: Vec<GrantRecord> = tasks
        .granted()
        .map(|(number, t, g)| GrantRecord {
            number,
            agent: t.agent.clone(),
            task: t.name.clone(),
            connect: g.net.iter().map(|r| r.text().to_string()).collect(),
            exec: g.exec.iter().map(|r| r.text().to_string()).collect(),
            expires_ns: (g.expires_ns != u64::MAX).then_some(g.expires_ns),
        })
        .collect();
    v.sort_by_key(|r| r.number);
    v
}

/// The file's text for `records`.
pub fn encode(boot_id: &str, pin_dir: &Path, records: Vec<GrantRecord>) -> String {
    let file = GrantFile {
        version: VERSION,
        boot_id: boot_id.to_string(),
        pin_dir: pin_dir.display().to_string(),
        tasks: records,
    };
    // Serialising plain strings and numbers cannot fail.
    let mut s = serde_json::to_string_pretty(&file).unwrap_or_default();
    s.push('\n');
    s
}

/// Reads back `text` (the contents of `path`), checks that it belongs to this boot and pin
/// directory and that every record is well-formed, and parses the grants again. All or nothing:
/// one bad record rejects the file.
pub fn decode(
    path: &Path,
    text: &str,
    boot_id: &str,
    pin_dir: &Path,
) -> Result<Vec<Recorded>, StateError> {
    let path_buf = || path.to_path_buf();
    let file: GrantFile = serde_json::from_str(text).map_err(|e| StateError::Corrupt {
        path: path_buf(),
        // serde_json's message ends with the line and column.
        reason: e.to_string(),
    })?;
    if file.version != VERSION {
        return Err(StateError::Version {
            path: path_buf(),
            found: file.version,
        });
    }
    if file.boot_id != boot_id {
        return Err(StateError::OtherBoot {
            path: path_buf(),
            found: file.boot_id,
            expected: boot_id.to_string(),
        });
    }
    let pin = pin_dir.display().to_string();
    if file.pin_dir != pin {
        return Err(StateError::OtherPinDir {
            path: path_buf(),
            found: file.pin_dir,
            expected: pin,
        });
    }
    let mut numbers = HashSet::new();
    let mut names = HashSet::new();
    file.tasks
        .into_iter()
        .map(|r| {
            let bad = |reason: String| StateError::BadRecord {
                path: path_buf(),
                number: r.number,
                agent: r.agent.clone(),
                task: r.task.clone(),
                reason,
            };
            if r.number == TASK_NONE {
                return Err(bad(format!("task number {TASK_NONE} is never granted")));
            }
            if r.agent.is_empty() {
                return Err(bad("empty agent name".into()));
            }
            check_task_id(&r.task).map_err(|e| bad(e.to_string()))?;
            if !numbers.insert(r.number) {
                return Err(bad("task number recorded twice".into()));
            }
            if !names.insert((r.agent.clone(), r.task.clone())) {
                return Err(bad("task recorded twice".into()));
            }
            if r.connect.is_empty() && r.exec.is_empty() {
                return Err(bad(
                    "no grants (tasks without grants are not recorded)".into()
                ));
            }
            let (net, exec) =
                crate::policy::parse_grants(&r.connect, &r.exec).map_err(|e| bad(e.to_string()))?;
            Ok(Recorded {
                number: r.number,
                agent: r.agent,
                task: r.task,
                net,
                exec,
                expires_ns: r.expires_ns.unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// This boot's id (`BOOT_ID_PATH`, through procfs).
pub fn boot_id() -> std::io::Result<String> {
    procfs::sys::kernel::random::boot_id()
        .map(|id| id.trim().to_string())
        .map_err(std::io::Error::other)
}

/// The file's contents; `None` if there is none.
pub fn read(path: &Path) -> Result<Option<String>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Replaces `path` by `text` atomically: a temporary file (mode 0600) in the same directory,
/// synced, then renamed over it, so a reader (the next daemon) sees the old or the new file,
/// never a half-written one. Creates the directory (0700) if missing.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let name = path
        .file_name()
        .map_or_else(|| "grants".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The pin directory of another daemon that `path` belongs to, if it is a readable state file
/// of one and that directory still exists: a daemon never overwrites or removes another install's
/// grants. A file whose pin directory is gone (uninstalled, or a reboot) is stale: anyone's.
pub fn other_owner(path: &Path, pin_dir: &Path) -> Option<String> {
    let text = read(path).ok()??;
    let owner = serde_json::from_str::<GrantFile>(&text).ok()?.pin_dir;
    (owner != pin_dir.display().to_string() && Path::new(&owner).exists()).then_some(owner)
}

/// Removes the file unless it belongs to another pin directory (see [`other_owner`]).
/// `Ok(true)` if removed.
pub fn remove_if_of(path: &Path, pin_dir: &Path) -> std::io::Result<bool> {
    if other_owner(path, pin_dir).is_some() {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// How the kernel's grant entries for a task differ from the recorded grants
/// (see [`KernelGrants::holds_exactly`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeldGrantsDiffer {
    #[error(
        "the kernel holds {held_net} network and {held_exec} exec entries for it, the recorded \
         grants compile to {recorded_net} and {recorded_exec}"
    )]
    Count {
        held_net: usize,
        held_exec: usize,
        recorded_net: usize,
        recorded_exec: usize,
    },
    #[error("a recorded network grant is not in the kernel")]
    NetMissing,
    #[error("a network grant's ports differ from the kernel's")]
    Ports,
    #[error("the kernel's expiry differs from the recorded one")]
    Expiry,
    #[error("a recorded exec grant is not in the kernel")]
    ExecMissing,
}

/// The task grant entries the kernel holds (read from the pinned maps).
#[derive(Clone, Default)]
pub struct KernelGrants {
    /// (prefix length, key whose `agent` is the task number, value).
    pub net: Vec<(u32, NetKey, NetGrant)>,
    pub exec: Vec<(u32, ExecKey, Expiry)>,
}

impl KernelGrants {
    /// `Ok` if the kernel holds for task `number` exactly the entries of `tables`, each until
    /// `expires_ns`; else what differs.
    pub fn holds_exactly(
        &self,
        number: u32,
        tables: &KernelTables,
        expires_ns: u64,
    ) -> Result<(), HeldGrantsDiffer> {
        let net: Vec<_> = self.net.iter().filter(|e| e.1.agent == number).collect();
        let exec: Vec<_> = self.exec.iter().filter(|e| e.1.agent == number).collect();
        if net.len() != tables.net.len() || exec.len() != tables.exec.len() {
            return Err(HeldGrantsDiffer::Count {
                held_net: net.len(),
                held_exec: exec.len(),
                recorded_net: tables.net.len(),
                recorded_exec: tables.exec.len(),
            });
        }
        for (len, key, allow) in &tables.net {
            let found = net
                .iter()
                .find(|(l, k, _)| l == len && k.addr == key.addr)
                .ok_or(HeldGrantsDiffer::NetMissing)?;
            if found.2.allow != *allow {
                return Err(HeldGrantsDiffer::Ports);
            }
            if found.2.expiry.expires_ns != expires_ns {
                return Err(HeldGrantsDiffer::Expiry);
            }
        }
        for (len, key) in &tables.exec {
            let found = exec
                .iter()
                .find(|(l, k, _)| l == len && k.path == key.path)
                .ok_or(HeldGrantsDiffer::ExecMissing)?;
            if found.2.expires_ns != expires_ns {
                return Err(HeldGrantsDiffer::Expiry);
            }
        }
        Ok(())
    }

    /// How many entries belong to task numbers `of` accepts.
    pub fn entries(&self, of: impl Fn(u32) -> bool) -> usize {
        self.net.iter().filter(|e| of(e.1.agent)).count()
            + self.exec.iter().filter(|e| of(e.1.agent)).count()
    }

    /// Distinct task numbers with entries.
    pub fn numbers(&self) -> HashSet<u32> {
        self.net
            .iter()
            .map(|e| e.1.agent)
            .chain(self.exec.iter().map(|e| e.1.agent))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tasks::Grants;

    const BOOT: &str = "0b1c4a1e-7d2f-4e5a-9c3b-111111111111";

    fn granted_tasks() -> Tasks {
        let mut t = Tasks::default();
        let a = t.number("coder", "fix-1");
        let _ = t.number("coder", "idle");
        let b = t.number("bot", "default");
        for (n, connect, exec, at) in [
            (a, vec!["127.0.0.1:8080", "10.0.0.0/8:443"], vec![], 5_000),
            (b, vec![], vec!["/usr/bin/make", "/opt/tools/*"], u64::MAX),
        ] {
            let connect: Vec<String> = connect.into_iter().map(String::from).collect();
            let exec: Vec<String> = exec.into_iter().map(String::from).collect();
            let (net, exec) = crate::policy::parse_grants(&connect, &exec).unwrap();
            t.get_mut(n).unwrap().grants = Some(Grants {
                net,
                exec,
                expires_ns: at,
                kernel: KernelTables::default(),
            });
        }
        t
    }

    fn file_text() -> String {
        encode(BOOT, Path::new("/sys/fs/bpf/am"), records(&granted_tasks()))
    }

    #[test]
    fn round_trip_keeps_texts_numbers_and_expiry() {
        let got = decode(
            Path::new("/run/g.json"),
            &file_text(),
            BOOT,
            Path::new("/sys/fs/bpf/am"),
        )
        .unwrap();
        assert_eq!(got.len(), 2, "the task without grants is not recorded");
        assert_eq!((got[0].number, got[0].agent.as_str()), (1, "coder"));
        assert_eq!(got[0].task, "fix-1");
        let texts: Vec<&str> = got[0].net.iter().map(NetRule::text).collect();
        assert_eq!(texts, ["127.0.0.1:8080", "10.0.0.0/8:443"]);
        assert_eq!(got[0].expires_ns, 5_000);
        assert_eq!(got[1].number, 3);
        let texts: Vec<&str> = got[1].exec.iter().map(ExecRule::text).collect();
        assert_eq!(texts, ["/usr/bin/make", "/opt/tools/*"]);
        assert_eq!(got[1].expires_ns, u64::MAX, "until task end");
        assert_eq!(got[1].rules(), 2);
        // "until task end" is written as an absent expiry, not as u64::MAX.
        assert!(file_text().contains("\"expires_ns\": null"));
    }

    #[test]
    fn another_boot_or_pin_dir_is_refused_by_name() {
        let e = decode(
            Path::new("/run/g.json"),
            &file_text(),
            "other-boot",
            Path::new("/sys/fs/bpf/am"),
        )
        .err()
        .unwrap();
        assert!(matches!(e, StateError::OtherBoot { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("/run/g.json: written during another boot"),
            "{msg}"
        );
        assert!(
            msg.contains(BOOT) && msg.contains("this boot is other-boot"),
            "{msg}"
        );

        let e = decode(
            Path::new("/run/g.json"),
            &file_text(),
            BOOT,
            Path::new("/sys/fs/bpf/elsewhere"),
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "/run/g.json: belongs to pin directory /sys/fs/bpf/am, expected /sys/fs/bpf/elsewhere"
        );
    }

    #[test]
    fn corrupt_files_say_where_and_what_was_expected() {
        let p = Path::new("/run/g.json");
        let pin = Path::new("/sys/fs/bpf/am");
        for (text, want) in [
            ("", "line 1 column 0"),
            ("{\"version\": 1, \"boot_id\": ", "EOF"),
            ("not json", "expected ident at line 1 column 2"),
            ("[]", "expected struct GrantFile"),
        ] {
            let e = decode(p, text, BOOT, pin).err().unwrap();
            let msg = e.to_string();
            assert!(matches!(e, StateError::Corrupt { .. }), "{text:?}: {msg}");
            assert!(
                msg.starts_with("/run/g.json: not a grant state file"),
                "{msg}"
            );
            assert!(msg.contains(want), "{text:?}: {msg}");
            assert!(msg.contains("expected the JSON object"), "{msg}");
        }
        // A typo'd field is an error, not a silently dropped grant.
        let typo = file_text().replace("\"connect\"", "\"conect\"");
        let msg = decode(p, &typo, BOOT, pin).err().unwrap().to_string();
        assert!(msg.contains("unknown field `conect`"), "{msg}");
        let v2 = file_text().replace("\"version\": 1", "\"version\": 2");
        assert_eq!(
            decode(p, &v2, BOOT, pin).err().unwrap().to_string(),
            "/run/g.json: format version 2, expected 1"
        );
    }

    #[test]
    fn bad_records_reject_the_whole_file() {
        let p = Path::new("/run/g.json");
        let pin = Path::new("/sys/fs/bpf/am");
        let with = |f: &dyn Fn(&mut Vec<GrantRecord>)| {
            let mut r = records(&granted_tasks());
            f(&mut r);
            decode(p, &encode(BOOT, pin, r), BOOT, pin)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let msg = with(&|r| r[0].connect[0] = "not-an-address".into());
        assert!(
            msg.starts_with(
                "/run/g.json: task 1 (coder/fix-1): --allow-connect \"not-an-address\""
            ),
            "{msg}"
        );
        assert!(with(&|r| r[1].number = 1).contains("task number recorded twice"));
        assert!(with(&|r| r[1].task = "a/b".into()).contains("invalid task id"));
        assert!(with(&|r| r[0].number = 0).contains("never granted"));
        assert!(
            with(&|r| {
                r[1].agent = "coder".into();
                r[1].task = "fix-1".into()
            })
            .contains("task recorded twice")
        );
        assert!(with(&|r| r[0].connect.clear()).contains("no grants"));
    }

    #[test]
    fn kernel_entries_must_match_exactly() {
        let (net, exec) = crate::policy::parse_grants(
            &["127.0.0.1:8080".into(), "10.0.0.0/8:443".into()],
            &["/usr/bin/make".into()],
        )
        .unwrap();
        let tables = crate::policy::compile_grants(7, "t", &net, &exec).unwrap();
        let expiry = Expiry { expires_ns: 900 };
        let in_kernel = |tables: &KernelTables, expires_ns| KernelGrants {
            net: tables
                .net
                .iter()
                .map(|(l, k, a)| {
                    let grant = NetGrant {
                        expiry: Expiry { expires_ns },
                        allow: *a,
                        _pad: 0,
                    };
                    (*l, *k, grant)
                })
                .collect(),
            exec: tables
                .exec
                .iter()
                .map(|(l, k)| (*l, *k, Expiry { expires_ns }))
                .collect(),
        };
        let k = in_kernel(&tables, expiry.expires_ns);
        assert_eq!(k.holds_exactly(7, &tables, 900), Ok(()));
        assert_eq!(k.numbers(), HashSet::from([7]));
        assert_eq!(k.entries(|n| n == 7), 3);
        assert_eq!(k.entries(|n| n != 7), 0);
        // Another task's entries do not count for task 8.
        assert!(k.holds_exactly(8, &tables, 900).is_err());
        // A narrowed expiry (the file is older than the kernel) is refused.
        let e = k.holds_exactly(7, &tables, 1_000).unwrap_err().to_string();
        assert!(e.contains("expiry differs"), "{e}");
        // A grant narrowed away or ended in the kernel after the file was written is refused.
        let (net1, _) = crate::policy::parse_grants(&["127.0.0.1:8080".into()], &[]).unwrap();
        let narrowed = crate::policy::compile_grants(7, "t", &net1, &[]).unwrap();
        let e = in_kernel(&narrowed, 900)
            .holds_exactly(7, &tables, 900)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the kernel holds 1 network and 0 exec entries"),
            "{e}"
        );
        assert!(
            KernelGrants::default()
                .holds_exactly(7, &tables, 900)
                .is_err()
        );
    }

    #[test]
    fn write_is_atomic_private_and_removal_respects_the_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/grants.json");
        write(&path, &file_text()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sub = std::fs::metadata(dir.path().join("sub")).unwrap();
        assert_eq!(sub.permissions().mode() & 0o777, 0o700);
        write(&path, "second").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some("second"));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["grants.json"], "no temporary file left behind");

        // Pin directories that exist (stand-ins: the test's own directories).
        let ours = dir.path().join("pins");
        std::fs::create_dir(&ours).unwrap();
        let other = dir.path();
        write(&path, &encode(BOOT, &ours, records(&granted_tasks()))).unwrap();
        let owner = other_owner(&path, other);
        assert_eq!(owner, Some(ours.display().to_string()));
        assert_eq!(other_owner(&path, &ours), None);
        assert!(!remove_if_of(&path, other).unwrap());
        assert!(path.exists(), "another pin directory's file is kept");
        assert!(remove_if_of(&path, &ours).unwrap());
        assert_eq!(read(&path).unwrap(), None);
        assert!(!remove_if_of(&path, &ours).unwrap());
        // The file of a pin directory that is gone is stale: anyone's.
        write(&path, &file_text()).unwrap();
        assert_eq!(other_owner(&path, other), None);
        assert!(remove_if_of(&path, other).unwrap());
    }
}
