//! `[unix]`: which AF_UNIX sockets an agent may connect to (or send datagrams to), by the name
//! the caller gives the kernel; an abstract socket as `@name`. Pure: the model, its verdicts, the
//! built-in list of host daemons, and its kernel entries (`UNIX_RULES`).
//!
//! No section: unix sockets are not judged (the behaviour before `[unix]` existed). `allow = [...]`:
//! only those, everything else refused. Only `deny_known_daemons = true`: every socket except
//! [`KNOWN_DAEMONS`]. The kernel matches exact names (docs/unix-sockets.md says why and what that
//! covers).

use agent_monitor_common::{UNIX_ALLOW, UNIX_DENY, UNIX_PATH_LEN, UnixKey};

use crate::policy::evaluate::{Decision, NO_RULE_MATCHES};
use crate::policy::model::Policy;

/// The root daemons and credential agents an agent should not talk to, switched on with
/// `deny_known_daemons = true`. Both spellings where `/var/run` is a link to `/run`: the kernel
/// judges the name as written. Sockets with per-user or random names (ssh-agent's
/// `/tmp/ssh-XXXX/agent.PID`, `$XDG_RUNTIME_DIR/...`) cannot be listed by exact name: use
/// `allow = [...]`, which refuses them with everything else.
pub const KNOWN_DAEMONS: &[&str] = &[
    // Container engines: one request runs a container with the host's root file system.
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/docker/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/var/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
    "/run/cri-dockerd.sock",
    "/var/run/cri-dockerd.sock",
    "/run/buildkit/buildkitd.sock",
    "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/incus/unix.socket",
    // Virtual machines.
    "/run/libvirt/libvirt-sock",
    "/var/run/libvirt/libvirt-sock",
    "/run/libvirt/virtqemud-sock",
    // The system bus (polkit, systemd, NetworkManager, …) and systemd's own sockets.
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/systemd/notify",
    "/run/systemd/userdb/io.systemd.Multiplexer",
    // Package and snap managers.
    "/run/snapd.socket",
    "/run/snapd-snap.socket",
    // A system-wide ssh-agent some hosts run under a fixed name.
    "/run/ssh-agent.socket",
];

/// One `[unix] allow` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixRule {
    /// The name as the kernel is given it; abstract names keep their `@`.
    pub(crate) name: String,
    pub(crate) line: usize,
}

impl UnixRule {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn line(&self) -> usize {
        self.line
    }
}

/// An agent's `[unix]` section, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixRules {
    /// `None`: no `allow` key, so only the known daemons are refused.
    pub(crate) allow: Option<Vec<UnixRule>>,
    pub(crate) deny_known_daemons: bool,
}

impl UnixRules {
    pub fn allow(&self) -> Option<&[UnixRule]> {
        self.allow.as_deref()
    }

    pub fn deny_known_daemons(&self) -> bool {
        self.deny_known_daemons
    }

    /// Whether this agent may connect (or send) to the socket `name` (`@name` abstract), as the
    /// kernel decides it.
    pub fn check(&self, name: &str) -> Decision {
        match &self.allow {
            Some(rules) => match rules.iter().find(|r| r.name == name) {
                Some(r) => allowed_by(&r.name),
                None => not_allowed(NO_RULE_MATCHES),
            },
            None if self.deny_known_daemons && KNOWN_DAEMONS.contains(&name) => {
                not_allowed(KNOWN_DAEMON)
            }
            None => allowed_by(NOT_A_KNOWN_DAEMON),
        }
    }

    /// The kernel entries under allowlist index `agent`: the default entry, then one per name.
    pub fn kernel_entries(&self, agent: u32) -> Vec<(UnixKey, u32)> {
        let mut out = Vec::new();
        let default = if self.allow.is_some() {
            UNIX_DENY
        } else {
            UNIX_ALLOW
        };
        out.push((UnixKey::default_entry(agent), default));
        let named: Vec<(&str, u32)> = match &self.allow {
            Some(rules) => rules
                .iter()
                .map(|r| (r.name.as_str(), UNIX_ALLOW))
                .collect(),
            None if self.deny_known_daemons => {
                KNOWN_DAEMONS.iter().map(|n| (*n, UNIX_DENY)).collect()
            }
            None => Vec::new(),
        };
        for (name, rule) in named {
            // Validation guarantees the fit.
            if let Some(key) = UnixKey::of_name(agent, name.as_bytes())
                && !out.iter().any(|(k, _)| *k == key)
            {
                out.push((key, rule));
            }
        }
        out
    }
}

fn allowed_by(reason: &str) -> Decision {
    Decision {
        allowed: true,
        reason: reason.to_string(),
    }
}

fn not_allowed(reason: &str) -> Decision {
    Decision {
        allowed: false,
        reason: reason.to_string(),
    }
}

/// Why a known daemon's socket is refused, in `Decision::reason`.
pub const KNOWN_DAEMON: &str = "a host daemon's socket (unix.deny_known_daemons)";
/// How a socket that is not a known daemon's passes `deny_known_daemons`.
pub const NOT_A_KNOWN_DAEMON: &str = "not a known daemon's socket (unix.deny_known_daemons)";

impl Policy {
    /// `[unix]`, if the policy has it.
    pub fn unix(&self) -> Option<&UnixRules> {
        self.unix.as_ref()
    }

    /// The verdict on a unix connect or send to `name`; no `[unix]` section allows everything.
    pub fn check_unix(&self, name: &str) -> Decision {
        match &self.unix {
            Some(rules) => rules.check(name),
            None => allowed_by("no [unix] section: unix sockets are not judged"),
        }
    }
}

/// Whether `policy suggest` may write `name` as a `[unix] allow` entry; why not, in words. A host
/// daemon's socket is never suggested: giving an agent docker.sock is a decision for a person.
pub fn suggestable(name: &str) -> Result<(), String> {
    if KNOWN_DAEMONS.contains(&name) {
        return Err(
            "a host daemon's socket (the deny_known_daemons list); not suggested: add \
                    it by hand if the agent must have it"
                .into(),
        );
    }
    crate::policy::parse::parse_unix_name(name)
        .map(drop)
        .map_err(|reason| format!("cannot be a [unix] entry: {reason}"))
}

/// A socket name from the kernel (`sun_path` in `UnixKey`'s canonical form) as reports and policies
/// write it: a pathname as it is, an abstract name as `@name`.
pub fn unix_name_display(path: &[u8; UNIX_PATH_LEN], name_len: u32) -> String {
    let len = (name_len as usize).min(UNIX_PATH_LEN);
    match path.first() {
        Some(0) if len > 0 => format!("@{}", String::from_utf8_lossy(&path[1..len])),
        _ => String::from_utf8_lossy(&path[..len]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: Option<&[&str]>, deny_known_daemons: bool) -> UnixRules {
        UnixRules {
            allow: allow.map(|a| {
                a.iter()
                    .map(|n| UnixRule {
                        name: n.to_string(),
                        line: 1,
                    })
                    .collect()
            }),
            deny_known_daemons,
        }
    }

    #[test]
    fn an_allow_list_refuses_everything_else() {
        let r = rules(Some(&["/run/user/1000/bus", "@ok"]), false);
        assert!(r.check("/run/user/1000/bus").allowed);
        assert!(r.check("@ok").allowed);
        for other in [
            "/var/run/docker.sock",
            "/tmp/x",
            "@other",
            "run/user/1000/bus",
            "@",
        ] {
            assert!(!r.check(other).allowed, "{other}");
        }
        // The name as written: a symlink or a relative spelling is another name.
        assert!(!r.check("/run/user/1000/./bus").allowed);
    }

    #[test]
    fn deny_known_daemons_alone_refuses_only_the_list() {
        let r = rules(None, true);
        assert!(!r.check("/var/run/docker.sock").allowed);
        assert!(!r.check("/run/dbus/system_bus_socket").allowed);
        assert!(r.check("/run/user/1000/bus").allowed);
        assert!(r.check("@anything").allowed);
    }

    #[test]
    fn kernel_entries_carry_the_default_then_each_name_once() {
        let r = rules(Some(&["/a", "@b", "/a"]), false);
        let e = r.kernel_entries(7);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0], (UnixKey::default_entry(7), UNIX_DENY));
        assert_eq!(e[1].1, UNIX_ALLOW);
        assert_eq!(e[1].0, UnixKey::of_name(7, b"/a").expect("fits"));
        assert_eq!(e[2].0.path[0], 0, "abstract");
        let d = rules(None, true).kernel_entries(1);
        assert_eq!(d[0].1, UNIX_ALLOW);
        assert_eq!(d.len(), 1 + KNOWN_DAEMONS.len());
        assert!(d[1..].iter().all(|(_, v)| *v == UNIX_DENY));
    }

    #[test]
    fn kernel_names_display_as_policies_write_them() {
        let k = UnixKey::of_name(0, b"@name").expect("fits");
        assert_eq!(unix_name_display(&k.path, k.name_len), "@name");
        let k = UnixKey::of_name(0, b"/run/docker.sock").expect("fits");
        assert_eq!(unix_name_display(&k.path, k.name_len), "/run/docker.sock");
        assert_eq!(unix_name_display(&k.path, 0), "");
    }

    #[test]
    fn every_known_daemon_fits_and_is_an_absolute_normal_name() {
        for n in KNOWN_DAEMONS {
            assert!(
                n.starts_with('/') && !n.contains("//") && !n.contains("/."),
                "{n}"
            );
            assert!(UnixKey::of_name(0, n.as_bytes()).is_some(), "{n}");
        }
    }

    #[test]
    fn a_set_compiles_each_unix_agent_under_its_index_and_rebases_with_the_bank() {
        let parse = |text: &str, file: &str| {
            Policy::parse(text, std::path::Path::new(file)).unwrap_or_else(|e| panic!("{e}"))
        };
        let set = crate::policy::PolicySet::new(vec![
            parse("agent = \"b\"\n[unix]\nallow = [\"/s\"]\n", "b.toml"),
            parse("agent = \"a\"\n", "a.toml"),
        ])
        .expect("set");
        let tables = set.compile().expect("fits");
        // "a" is index 0 and has no [unix]: nothing of it; "b" is index 1.
        assert_eq!(
            tables.unix,
            [
                (UnixKey::default_entry(1), UNIX_DENY),
                (UnixKey::of_name(1, b"/s").expect("fits"), UNIX_ALLOW)
            ]
        );
        let moved = tables.rebased(4096);
        assert!(moved.unix.iter().all(|(k, _)| k.agent == 4097));
    }
}
