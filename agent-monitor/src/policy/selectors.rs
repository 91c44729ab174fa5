//! Workload selectors (`[identity]` of a policy): which processes started outside `agent-monitor
//! run` are this agent. Validation of each selector and the conflict rule between policies. Pure.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use agent_monitor_common::{
    EXEC_PATH_LEN, SOURCE_CGROUP, SOURCE_EXECUTABLE, SOURCE_UID, SOURCE_UNIT,
};

use crate::policy::parse::{Issue, Location, Reason};

/// A selector value with where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub at: Location,
}

/// An executable selector: the exact file, and the sha256 it must have to be armed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executable {
    pub path: String,
    pub sha256: [u8; 32],
}

/// Every selector of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selectors {
    pub uids: Vec<At<u32>>,
    pub systemd_units: Vec<At<String>>,
    /// cgroup v2 paths relative to the cgroup v2 root, starting with `/`.
    pub cgroups: Vec<At<String>>,
    pub executables: Vec<At<Executable>>,
}

impl Selectors {
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty()
            && self.systemd_units.is_empty()
            && self.cgroups.is_empty()
            && self.executables.is_empty()
    }
}

/// Kind of selector, for messages and precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelectorKind {
    Uid,
    SystemdUnit,
    Cgroup,
    Executable,
}

impl SelectorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SelectorKind::Uid => "uid",
            SelectorKind::SystemdUnit => "systemd unit",
            SelectorKind::Cgroup => "cgroup",
            SelectorKind::Executable => "executable",
        }
    }

    /// The `SOURCE_*` value the kernel records for a process selected this way.
    pub fn source(self) -> u32 {
        match self {
            SelectorKind::Uid => SOURCE_UID,
            SelectorKind::SystemdUnit => SOURCE_UNIT,
            SelectorKind::Cgroup => SOURCE_CGROUP,
            SelectorKind::Executable => SOURCE_EXECUTABLE,
        }
    }
}

impl fmt::Display for SelectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's own cgroup subtree; a selector there would fight `run`'s placement.
pub const RESERVED_CGROUP: &str = "/agent-monitor";

/// A uid selector: any uid but root's. Root runs the daemon, PID 1 and the operator's shell; an
/// agent selected by uid 0 would be judged for all of them (and could kill the uninstall).
pub fn check_uid(uid: u32) -> Result<(), Reason> {
    if uid == 0 {
        return Err(Reason::RootUid);
    }
    Ok(())
}

/// Units that hold PID 1, the daemon or whole classes of host processes on every systemd host:
/// selecting one captures the host. (`policy check` and the daemon also compare the cgroups
/// selectors resolve to with PID 1's and the daemon's own, whatever their names.)
const HOST_UNITS: [(&str, &str); 7] = [
    ("-.slice", "every process (the root slice)"),
    ("init.scope", "PID 1"),
    (
        "system.slice",
        "every system service, the daemon among them",
    ),
    ("user.slice", "every login session"),
    ("user-0.slice", "root's login sessions"),
    ("user@0.service", "root's service manager"),
    ("agent-monitor.service", "the daemon"),
];

/// cgroups (below the root) that hold PID 1, the daemon or root's sessions on a systemd host; a
/// selector naming one of them or an ancestor captures what they hold.
const HOST_CGROUPS: [(&str, &str); 3] = [
    ("/init.scope", "PID 1"),
    ("/system.slice/agent-monitor.service", "the daemon"),
    ("/user.slice/user-0.slice", "root's login sessions"),
];

/// A unit selector that names a unit of the host itself (see `HOST_UNITS`).
pub fn check_unit_not_host(name: &str) -> Result<(), Reason> {
    match HOST_UNITS.iter().find(|(unit, _)| *unit == name) {
        Some((_, holds)) => Err(Reason::HostCgroup {
            what: "this unit",
            holds,
        }),
        None => Ok(()),
    }
}

/// A cgroup selector that is one of `HOST_CGROUPS` or an ancestor of one.
pub fn check_cgroup_not_host(path: &str) -> Result<(), Reason> {
    match HOST_CGROUPS.iter().find(|(cg, _)| contains(path, cg)) {
        Some((_, holds)) => Err(Reason::HostCgroup {
            what: "this cgroup",
            holds,
        }),
        None => Ok(()),
    }
}

/// Whether cgroup `outer` is `inner` or one of its ancestors (a process in `inner` is in `outer`).
pub fn contains(outer: &str, inner: &str) -> bool {
    outer == "/"
        || inner == outer
        || (inner.starts_with(outer) && inner.as_bytes().get(outer.len()) == Some(&b'/'))
}

/// A systemd unit name as systemd writes its cgroup directory: `name.service`, `name.scope`…
pub fn check_unit(name: &str) -> Result<(), Reason> {
    const SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];
    let stem = SUFFIXES.iter().find_map(|s| name.strip_suffix(s));
    let ok_chars = name.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'\\' | b'@' | b'-')
    });
    match stem {
        Some(stem) if !stem.is_empty() && ok_chars && name.len() <= 255 => {
            check_unit_not_host(name)
        }
        _ => Err(Reason::BadUnit),
    }
}

/// A cgroup v2 path below the root, in normal form, outside the daemon's own subtree.
pub fn check_cgroup(path: &str) -> Result<(), Reason> {
    if !path.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    if path == "/" {
        return Err(Reason::CgroupRoot);
    }
    if path.contains('\0') {
        return Err(Reason::NulByte);
    }
    if path
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Reason::NotNormalised);
    }
    if nested(path, RESERVED_CGROUP) {
        return Err(Reason::ReservedCgroup);
    }
    check_cgroup_not_host(path)
}

/// An executable selector's path: absolute, normal, no glob, fits the kernel key with its NUL.
pub fn check_executable_path(path: &str) -> Result<(), Reason> {
    if path.contains('\0') {
        return Err(Reason::NulByte);
    }
    if !path.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    if path.contains('*') {
        return Err(Reason::GlobInSelector);
    }
    if path.ends_with('/')
        || path
            .split('/')
            .skip(1)
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Reason::NotNormalised);
    }
    if path.len() + 1 > EXEC_PATH_LEN {
        return Err(Reason::PathTooLong {
            len: path.len(),
            max: EXEC_PATH_LEN - 1,
        });
    }
    Ok(())
}

/// 64 hex digits.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], Reason> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(Reason::BadSha256);
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).map_err(|_| Reason::BadSha256)?;
        out[i] = u8::from_str_radix(hex, 16).map_err(|_| Reason::BadSha256)?;
    }
    Ok(out)
}

/// Whether cgroup `a` is `b` or below it (or the other way round): a process in the deeper one
/// is in both.
pub fn nested(a: &str, b: &str) -> bool {
    let below =
        |x: &str, y: &str| x == y || (x.starts_with(y) && x.as_bytes().get(y.len()) == Some(&b'/'));
    below(a, b) || below(b, a)
}

/// One selector of one agent, flattened for the conflict check.
struct Claim<'a> {
    agent: &'a str,
    kind: SelectorKind,
    value: String,
    at: &'a Location,
}

/// Selectors of two different agents that could claim the same process: the same uid, the same
/// unit, the same executable, or cgroups where one contains the other. Each pair is an error
/// naming both places. (A uid and a cgroup selector can still both match one process; that is
/// resolved at run time by precedence and reported, since it cannot be known from the files.)
pub fn conflicts<'a>(agents: impl IntoIterator<Item = (&'a str, &'a Selectors)>) -> Vec<Issue> {
    let mut claims: Vec<Claim<'a>> = Vec::new();
    for (agent, s) in agents {
        for u in &s.uids {
            claims.push(Claim {
                agent,
                kind: SelectorKind::Uid,
                value: u.value.to_string(),
                at: &u.at,
            });
        }
        for u in &s.systemd_units {
            claims.push(Claim {
                agent,
                kind: SelectorKind::SystemdUnit,
                value: u.value.clone(),
                at: &u.at,
            });
        }
        for c in &s.cgroups {
            claims.push(Claim {
                agent,
                kind: SelectorKind::Cgroup,
                value: c.value.clone(),
                at: &c.at,
            });
        }
        for e in &s.executables {
            claims.push(Claim {
                agent,
                kind: SelectorKind::Executable,
                value: e.value.path.clone(),
                at: &e.at,
            });
        }
    }
    // Claims that can overlap meet under one key: their value, and for cgroups also each
    // ancestor of it (a cgroup overlaps exactly its ancestors, itself and its descendants). Keyed
    // then grouped by agent, so finding the pairs costs the claims and the pairs, not every pair of
    // claims (a policy may hold thousands of selectors).
    let mut by_key: HashMap<(SelectorKind, &str), Vec<(&str, Vec<usize>)>> = HashMap::new();
    for (i, c) in claims.iter().enumerate() {
        let groups = by_key.entry((c.kind, c.value.as_str())).or_default();
        match groups.iter_mut().find(|(agent, _)| *agent == c.agent) {
            Some((_, list)) => list.push(i),
            None => groups.push((c.agent, vec![i])),
        }
    }
    let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (j, b) in claims.iter().enumerate() {
        let mut keys = vec![b.value.as_str()];
        if b.kind == SelectorKind::Cgroup {
            keys.extend(b.value.match_indices('/').map(|(at, _)| &b.value[..at]));
        }
        for key in keys {
            for (agent, list) in by_key.get(&(b.kind, key)).into_iter().flatten() {
                if *agent != b.agent {
                    pairs.extend(list.iter().map(|&i| (i.min(j), i.max(j))));
                }
            }
        }
    }
    pairs
        .into_iter()
        .map(|(i, j)| {
            let (a, b) = (&claims[i], &claims[j]);
            Issue::SelectorConflict {
                kind: a.kind.as_str(),
                first_agent: a.agent.to_string(),
                first_value: a.value.clone(),
                first: a.at.clone(),
                second_agent: b.agent.to_string(),
                second_value: b.value.clone(),
                second: b.at.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn at(line: usize) -> Location {
        Location {
            origin: Path::new("p.toml").to_path_buf(),
            line_col: Some((line, 1)),
        }
    }

    fn sel<T>(value: T, line: usize) -> At<T> {
        At {
            value,
            at: at(line),
        }
    }

    #[test]
    fn unit_names() {
        for ok in [
            "coder-agent.service",
            "a@1.service",
            "run-r1.scope",
            "x.slice",
        ] {
            assert!(check_unit(ok).is_ok(), "{ok}");
        }
        for bad in ["coder", ".service", "a/b.service", "a b.service", ""] {
            assert!(check_unit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors_that_capture_the_host_are_refused() {
        assert_eq!(check_uid(0), Err(Reason::RootUid));
        assert!(check_uid(1001).is_ok());
        for unit in [
            "init.scope",
            "-.slice",
            "system.slice",
            "user.slice",
            "user-0.slice",
            "user@0.service",
            "agent-monitor.service",
        ] {
            assert!(
                matches!(check_unit(unit), Err(Reason::HostCgroup { .. })),
                "{unit}"
            );
        }
        for ok in [
            "user-1001.slice",
            "coder.service",
            "agent-monitor-x.service",
        ] {
            assert!(check_unit(ok).is_ok(), "{ok}");
        }
        for cg in [
            "/init.scope",
            "/system.slice",
            "/system.slice/agent-monitor.service",
            "/user.slice",
            "/user.slice/user-0.slice",
        ] {
            assert!(
                matches!(check_cgroup(cg), Err(Reason::HostCgroup { .. })),
                "{cg}"
            );
        }
        for ok in [
            "/system.slice/coder.service",
            "/user.slice/user-1001.slice",
            "/init.scopex",
        ] {
            assert!(check_cgroup(ok).is_ok(), "{ok}");
        }
        assert!(contains("/a", "/a/b") && contains("/", "/a") && !contains("/a/b", "/a"));
    }

    #[test]
    fn cgroup_paths() {
        assert!(check_cgroup("/agents/coder").is_ok());
        assert!(check_cgroup("/agent-monitorx").is_ok());
        assert_eq!(check_cgroup("agents"), Err(Reason::NotAbsolute));
        assert_eq!(check_cgroup("/"), Err(Reason::CgroupRoot));
        assert_eq!(check_cgroup("/a//b"), Err(Reason::NotNormalised));
        assert_eq!(check_cgroup("/a/../b"), Err(Reason::NotNormalised));
        assert_eq!(check_cgroup("/a/"), Err(Reason::NotNormalised));
        assert_eq!(
            check_cgroup("/agent-monitor/x/t"),
            Err(Reason::ReservedCgroup)
        );
    }

    #[test]
    fn executable_paths_and_digests() {
        assert!(check_executable_path("/opt/coder/bin/agent").is_ok());
        assert_eq!(check_executable_path("/opt/*"), Err(Reason::GlobInSelector));
        assert_eq!(check_executable_path("bin/x"), Err(Reason::NotAbsolute));
        assert_eq!(
            check_executable_path("/opt/./x"),
            Err(Reason::NotNormalised)
        );
        let d = parse_sha256(&"ab".repeat(32)).unwrap();
        assert_eq!(d, [0xab; 32]);
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn nesting_is_by_component() {
        assert!(nested("/a", "/a"));
        assert!(nested("/a", "/a/b"));
        assert!(nested("/a/b/c", "/a"));
        assert!(!nested("/a", "/ab"));
        assert!(!nested("/a/b", "/a/c"));
    }

    #[test]
    fn overlapping_selectors_of_two_agents_conflict() {
        let a = Selectors {
            uids: vec![sel(1001, 3)],
            cgroups: vec![sel("/agents".to_string(), 4)],
            systemd_units: vec![sel("bot.service".to_string(), 5)],
            executables: vec![sel(
                Executable {
                    path: "/opt/bot".into(),
                    sha256: [0; 32],
                },
                6,
            )],
        };
        let b = Selectors {
            uids: vec![sel(1001, 7), sel(1002, 8)],
            cgroups: vec![sel("/agents/coder".to_string(), 9)],
            systemd_units: vec![sel("bot.service".to_string(), 10)],
            executables: vec![sel(
                Executable {
                    path: "/opt/bot".into(),
                    sha256: [1; 32],
                },
                11,
            )],
        };
        let issues = conflicts([("a", &a), ("b", &b)]);
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(issues.len(), 4, "{text:#?}");
        assert!(text[0].starts_with("p.toml:7:1: uid selector \"1001\" of agent \"b\""));
        assert!(text[0].contains("p.toml:3:1"), "{}", text[0]);
        assert!(text.iter().any(|t| t.contains("\"/agents/coder\"")));
    }

    /// The keyed search finds exactly the pairs the pairwise definition finds, in the same order.
    #[test]
    fn keyed_conflicts_match_the_pairwise_definition() {
        let paths = [
            "/a", "/a/b", "/a/b/c", "/ab", "/a/bc", "/x", "/x/a", "/a/b/c/d",
        ];
        let agents = ["p", "q", "r"];
        let mut all: Vec<Selectors> = agents.iter().map(|_| Selectors::default()).collect();
        let mut line = 1;
        for (n, path) in paths.iter().enumerate() {
            for (k, s) in all.iter_mut().enumerate() {
                if (n + k) % 2 == 0 || n == 1 {
                    s.cgroups.push(sel(path.to_string(), line));
                    s.uids.push(sel(((n + k) % 4) as u32, line));
                    line += 1;
                }
            }
        }
        // A repeat within one agent never conflicts with itself.
        all[0].cgroups.push(sel("/a/b".to_string(), line));
        let found = conflicts(agents.iter().copied().zip(all.iter()));
        let mut want = Vec::new();
        let flat: Vec<(&str, SelectorKind, String, &Location)> = agents
            .iter()
            .zip(&all)
            .flat_map(|(agent, s)| {
                s.uids
                    .iter()
                    .map(move |u| (*agent, SelectorKind::Uid, u.value.to_string(), &u.at))
                    .chain(
                        s.cgroups
                            .iter()
                            .map(move |c| (*agent, SelectorKind::Cgroup, c.value.clone(), &c.at)),
                    )
            })
            .collect();
        for (i, a) in flat.iter().enumerate() {
            for b in &flat[i + 1..] {
                let overlap = match a.1 {
                    SelectorKind::Cgroup => nested(&a.2, &b.2),
                    _ => a.2 == b.2,
                };
                if a.0 != b.0 && a.1 == b.1 && overlap {
                    want.push(Issue::SelectorConflict {
                        kind: a.1.as_str(),
                        first_agent: a.0.to_string(),
                        first_value: a.2.clone(),
                        first: a.3.clone(),
                        second_agent: b.0.to_string(),
                        second_value: b.2.clone(),
                        second: b.3.clone(),
                    });
                }
            }
        }
        assert!(want.len() > 20, "only {} conflicts", want.len());
        assert_eq!(found, want);
    }

    #[test]
    fn same_agent_may_repeat_and_disjoint_agents_are_fine() {
        let a = Selectors {
            uids: vec![sel(1, 1), sel(1, 2)],
            cgroups: vec![sel("/x".to_string(), 3), sel("/x/y".to_string(), 4)],
            ..Default::default()
        };
        let b = Selectors {
            uids: vec![sel(2, 5)],
            cgroups: vec![sel("/xy".to_string(), 6)],
            ..Default::default()
        };
        assert!(conflicts([("a", &a), ("b", &b)]).is_empty());
    }
}
