//! What the daemon and the file-guard process say to each other on the guard's socket: one JSON
//! object per line each way. The daemon pushes the agents' `[files]` and the selectors in force;
//! the guard says who it is, then sends its reports (those it kept while no daemon was
//! connected first, with the count of those it could not keep). Also where the socket and the
//! single-instance lock of the guard of a pin directory live.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FileReport;
use super::plan::AgentFiles;
use super::roster::Roster;
use crate::policy::files::{FileRule, FileRules};
use crate::policy::model::Mode;

/// Bumped whenever a message changes shape. `Retire` and `Exit` keep their meaning across every
/// version: they are how a daemon replaces a guard of another build.
pub const PROTOCOL: u32 = 1;

/// Daemon → guard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: an internally tagged enum buffers its content, and buffered maps lose
// their integer keys (the roster's).
#[serde(rename_all = "snake_case")]
pub enum ToGuard {
    /// Put these agents' `[files]` in force (answered by a `Report` of `Applied`).
    Apply { agents: Vec<WireAgentFiles> },
    /// The selectors in force changed.
    Roster { roster: Roster },
    /// Give up the socket and the lock (a guard of this daemon's build is about to start) but
    /// keep the marks and keep answering until `Exit`; answered by `Retired`.
    Retire,
    /// Close the fanotify group and exit.
    Exit,
    /// This daemon takes held opens of ask-mode agents (`FileReport::Hold`) and decides them
    /// within `timeout_ms` (its `--ask-timeout`); sent after every connect.
    Asking { timeout_ms: u64 },
    /// The decision of a held open: allowed, or refused (EPERM).
    Decide { hold: u64, allow: bool },
    /// The task approvals of opens in force (the whole set, replacing the last one).
    Grants { grants: Vec<super::FileGrant> },
}

/// Guard → daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: an internally tagged enum buffers its content, and buffered maps lose
// their integer keys (the roster's).
#[serde(rename_all = "snake_case")]
pub enum FromGuard {
    /// First line on every connection.
    Hello {
        protocol: u32,
        build: String,
        pid: u32,
        /// Reports kept while no daemon was connected; they follow this line.
        queued: usize,
    },
    Report {
        report: FileReport,
    },
    /// Reports the guard could not keep (its queue was full while no daemon was connected, or
    /// its own loop fell behind): counted, never silently gone.
    Lost {
        count: u64,
    },
    Retired,
}

/// One agent's `[files]` on the wire (the policy's own types carry no serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireAgentFiles {
    pub agent: String,
    /// `enforce`, `alert` or `ask`.
    pub mode: String,
    pub deny_known_secrets: bool,
    /// Every rule, the built-in ones included: (pattern, line, builtin).
    pub deny: Vec<(String, usize, bool)>,
}

impl From<&AgentFiles> for WireAgentFiles {
    fn from(a: &AgentFiles) -> WireAgentFiles {
        WireAgentFiles {
            agent: a.agent.clone(),
            mode: match a.mode {
                Mode::Enforce => "enforce",
                Mode::Alert => "alert",
                Mode::Ask => "ask",
            }
            .into(),
            deny_known_secrets: a.rules.deny_known_secrets(),
            deny: a
                .rules
                .deny()
                .iter()
                .map(|r| (r.pattern().to_string(), r.line(), r.builtin()))
                .collect(),
        }
    }
}

impl WireAgentFiles {
    /// Back to the guard's own type; an unknown mode is enforce (the guard denies rather than
    /// lets through what it cannot read).
    pub fn into_agent_files(self) -> AgentFiles {
        let mode = match self.mode.as_str() {
            "alert" => Mode::Alert,
            "ask" => Mode::Ask,
            _ => Mode::Enforce,
        };
        AgentFiles {
            agent: self.agent,
            mode,
            rules: FileRules {
                deny: self
                    .deny
                    .into_iter()
                    .map(|(pattern, line, builtin)| FileRule {
                        pattern,
                        line,
                        builtin,
                    })
                    .collect(),
                deny_known_secrets: self.deny_known_secrets,
            },
        }
    }
}

/// This build, as a guard and a daemon compare it: the protocol, the version, and the
/// executable's size and modification time (a rebuilt or upgraded binary is another build).
pub fn this_build() -> String {
    use std::os::unix::fs::MetadataExt as _;
    let exe = std::fs::metadata("/proc/self/exe")
        .map(|m| format!("{}@{}.{}", m.size(), m.mtime(), m.mtime_nsec()))
        .unwrap_or_else(|_| "?".into());
    format!("{PROTOCOL}/{}/{exe}", env!("CARGO_PKG_VERSION"))
}

/// The socket and lock of the guard serving the pins in `pin_dir`, in the daemon's runtime
/// directory (that of the default control socket). A pin directory has at most one guard: the
/// enforcement that outlives the daemon is the pins' and the guard's together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardPaths {
    pub socket: PathBuf,
    pub lock: PathBuf,
}

impl GuardPaths {
    pub fn for_pin_dir(pin_dir: &Path) -> GuardPaths {
        let runtime = Path::new(crate::control::DEFAULT_SOCKET)
            .parent()
            .unwrap_or(Path::new("/run"));
        GuardPaths::in_dir(runtime, pin_dir)
    }

    fn in_dir(runtime: &Path, pin_dir: &Path) -> GuardPaths {
        // The pin directory's last name (for a reader of `ls`) and a hash of its whole path (two
        // pin directories never share a guard); short enough for a socket address (108 bytes).
        let name: String = pin_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let hash = pin_dir
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        let stem = format!("file-guard.{name}.{:08x}", hash as u32);
        GuardPaths {
            socket: runtime.join(format!("{stem}.sock")),
            lock: runtime.join(format!("{stem}.lock")),
        }
    }
}

/// `Verdict` has no `Deserialize` (only the daemon's sinks write it): its name on the wire.
pub mod verdict_name {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::action::Verdict;

    pub fn serialize<S: Serializer>(v: &Verdict, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Verdict, D::Error> {
        match String::deserialize(d)?.as_str() {
            "allowed" => Ok(Verdict::Allowed),
            "denied" => Ok(Verdict::Denied),
            "alert" => Ok(Verdict::Alert),
            other => Err(serde::de::Error::custom(format!(
                "unknown verdict {other:?}"
            ))),
        }
    }
}

/// One message as a line.
pub fn line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(message).expect("wire messages always serialize");
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Verdict;
    use crate::files::OpenReport;
    use crate::policy::Policy;

    #[test]
    fn agent_files_survive_the_wire_whole() {
        let text = "agent = \"coder\"\nmode = \"alert\"\n[files]\ndeny = [\"/etc/x\"]\n\
                    deny_known_secrets = true\n";
        let p = Policy::parse(text, Path::new("p.toml")).expect("valid");
        let a = AgentFiles {
            agent: "coder".into(),
            mode: p.mode(),
            rules: p.files().clone(),
        };
        let msg = ToGuard::Apply {
            agents: vec![WireAgentFiles::from(&a)],
        };
        let back: ToGuard = serde_json::from_slice(&line(&msg)).expect("parses");
        let ToGuard::Apply { agents } = back else {
            panic!("not apply")
        };
        let b = agents.into_iter().next().expect("one").into_agent_files();
        assert_eq!(b.agent, "coder");
        assert_eq!(b.mode, Mode::Alert);
        assert_eq!(b.rules, a.rules, "the built-in list is not added twice");
    }

    #[test]
    fn an_unknown_mode_is_enforced() {
        let w = WireAgentFiles {
            agent: "x".into(),
            mode: "later".into(),
            deny_known_secrets: false,
            deny: vec![],
        };
        assert_eq!(w.into_agent_files().mode, Mode::Enforce);
    }

    #[test]
    fn reports_keep_their_time_and_verdict() {
        let report = FileReport::Open(OpenReport {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_234_567),
            tid: 7,
            pid: 7,
            uid: 0,
            comm: "cat".into(),
            agent: "coder".into(),
            task: Some("t1".into()),
            verdict: Verdict::Alert,
            rule: "files.deny \"/etc/x\" (line 4)".into(),
            path: "/etc/x".into(),
            open_flags: "O_RDONLY".into(),
            file: (1, 2),
            held: None,
        });
        let msg = FromGuard::Report { report };
        let back: FromGuard = serde_json::from_slice(&line(&msg)).expect("parses");
        assert_eq!(back, msg);
    }

    #[test]
    fn ask_messages_survive_the_wire_whole() {
        for msg in [
            ToGuard::Asking { timeout_ms: 60_000 },
            ToGuard::Decide {
                hold: 3,
                allow: true,
            },
            ToGuard::Grants {
                grants: vec![crate::files::FileGrant {
                    agent: "coder".into(),
                    task: "t1".into(),
                    file: (1, 2),
                    until_ns: u64::MAX,
                }],
            },
        ] {
            let back: ToGuard = serde_json::from_slice(&line(&msg)).expect("parses");
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn each_pin_directory_has_its_own_short_socket() {
        let a = GuardPaths::in_dir(Path::new("/run/agent-monitor"), Path::new("/sys/fs/bpf/am"));
        let b = GuardPaths::in_dir(Path::new("/run/agent-monitor"), Path::new("/x/am"));
        assert_ne!(a.socket, b.socket);
        assert!(
            a.socket
                .display()
                .to_string()
                .starts_with("/run/agent-monitor/file-guard.am.")
        );
        let long = GuardPaths::in_dir(
            Path::new("/run/agent-monitor"),
            Path::new(&format!("/sys/fs/bpf/{}", "n".repeat(300))),
        );
        assert!(long.socket.as_os_str().len() < 108, "{:?}", long.socket);
    }
}
