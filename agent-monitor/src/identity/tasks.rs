//! Tasks: one unit of work of an agent, with its own number (the kernel's grant key) and, while
//! `task start` grants last, its grants. Pure bookkeeping; the daemon writes the kernel maps.

use std::collections::HashMap;
use std::time::Duration;

use agent_monitor_common::TASK_NONE;

use crate::policy::{ExecRule, KernelTables, NetRule};

/// Task of processes that a selector made an agent and that no `task start --pid` moved.
pub const DEFAULT_TASK: &str = "default";
/// Task of processes that exec'd a selected executable whose sha256 no longer matches: still the
/// agent (its allowlist still binds them) but never granted anything.
pub const UNVERIFIED_TASK: &str = "unverified";

/// Longest TTL `task start` accepts: grants are meant to be short-lived.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a grant TTL was refused; the text says what is accepted. The humantime error is part of
/// the message (not a separate cause), so a chain printed with `{:#}` shows it once.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TtlError {
    #[error("--ttl {text:?}: {reason}; expected a duration such as 30s, 10m, 1h30m")]
    Syntax {
        text: String,
        reason: humantime::DurationError,
    },
    #[error("--ttl {0:?}: a grant must last longer than 0; use `task end` to revoke")]
    Zero(String),
    #[error("--ttl {0:?}: at most {max} (grants are short-lived)", max = humantime::format_duration(MAX_TTL))]
    TooLong(String),
    /// Over the control socket, in milliseconds.
    #[error("ttl_ms 0: a grant must last longer than 0; use `task end` to revoke")]
    ZeroMs,
    #[error(
        "ttl_ms {ms}: at most {max_ms} ({max}; grants are short-lived); omit the TTL for a grant \
         until `task end`",
        max = humantime::format_duration(MAX_TTL)
    )]
    TooLongMs { ms: u64, max_ms: u64 },
}

/// Parses a grant TTL such as `90s`, `10m`, `1h 30m` (humantime syntax).
pub fn parse_ttl(text: &str) -> Result<Duration, TtlError> {
    let d = humantime::parse_duration(text.trim()).map_err(|reason| TtlError::Syntax {
        text: text.to_string(),
        reason,
    })?;
    if d.is_zero() {
        return Err(TtlError::Zero(text.to_string()));
    }
    if d > MAX_TTL {
        return Err(TtlError::TooLong(text.to_string()));
    }
    Ok(d)
}

/// Checks a grant TTL that came over the control socket, in milliseconds. Any client may send
/// any number there, not only our CLI (which refuses with [`parse_ttl`]): without this check
/// `u64::MAX` saturated the expiry into a grant without end, reported as an 18-quintillion-ms TTL.
pub fn check_ttl_ms(ms: u64) -> Result<u64, TtlError> {
    let max_ms = u64::try_from(MAX_TTL.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(TtlError::ZeroMs);
    }
    if ms > max_ms {
        return Err(TtlError::TooLongMs { ms, max_ms });
    }
    Ok(ms)
}

/// What a task was granted by `task start`, until `expires_ns` (CLOCK_MONOTONIC).
#[derive(Clone)]
pub struct Grants {
    pub net: Vec<NetRule>,
    pub exec: Vec<ExecRule>,
    /// `u64::MAX`: until `task end`.
    pub expires_ns: u64,
    /// The entries written to the kernel, to remove them again.
    pub kernel: KernelTables,
}

#[derive(Clone)]
pub struct Task {
    pub agent: String,
    pub name: String,
    pub grants: Option<Grants>,
}

/// Task numbers as the identity directory needs them: allocate, look up, name. The daemon's grant
/// book owns the real [`Tasks`]; identity code sees only this.
pub trait TaskNumbers {
    /// The number of (agent, task), allocated on first use.
    fn number(&mut self, agent: &str, task: &str) -> u32;
    fn find(&self, agent: &str, task: &str) -> Option<u32>;
    fn get(&self, number: u32) -> Option<&Task>;
}

impl TaskNumbers for Tasks {
    fn number(&mut self, agent: &str, task: &str) -> u32 {
        Tasks::number(self, agent, task)
    }
    fn find(&self, agent: &str, task: &str) -> Option<u32> {
        Tasks::find(self, agent, task)
    }
    fn get(&self, number: u32) -> Option<&Task> {
        Tasks::get(self, number)
    }
}

/// Every task the daemon has numbered. Numbers start at 1 (`TASK_NONE` = 0 has no grants) and
/// are not reused while the daemon runs, so a stale kernel entry can never name another task.
#[derive(Default)]
pub struct Tasks {
    next: u32,
    by_name: HashMap<(String, String), u32>,
    tasks: HashMap<u32, Task>,
}

impl Tasks {
    /// The number of (agent, task), allocated on first use.
    pub fn number(&mut self, agent: &str, task: &str) -> u32 {
        if let Some(n) = self.by_name.get(&(agent.to_string(), task.to_string())) {
            return *n;
        }
        self.next = self.next.saturating_add(1).max(TASK_NONE + 1);
        let n = self.next;
        self.by_name
            .insert((agent.to_string(), task.to_string()), n);
        self.tasks.insert(
            n,
            Task {
                agent: agent.to_string(),
                name: task.to_string(),
                grants: None,
            },
        );
        n
    }

    /// Takes over number `number` for (agent, task), as a previous daemon left it in the pinned
    /// identity maps; later numbers are allocated above it. `false` if either is taken already.
    pub fn adopt(&mut self, agent: &str, task: &str, number: u32) -> bool {
        let key = (agent.to_string(), task.to_string());
        if number == TASK_NONE
            || self.by_name.contains_key(&key)
            || self.tasks.contains_key(&number)
        {
            return false;
        }
        self.skip_past(number);
        self.by_name.insert(key, number);
        self.tasks.insert(
            number,
            Task {
                agent: agent.to_string(),
                name: task.to_string(),
                grants: None,
            },
        );
        true
    }

    /// Never allocates `number` or below: a previous daemon's tags may still carry them.
    pub fn skip_past(&mut self, number: u32) {
        self.next = self.next.max(number);
    }

    pub fn find(&self, agent: &str, task: &str) -> Option<u32> {
        self.by_name
            .get(&(agent.to_string(), task.to_string()))
            .copied()
    }

    pub fn get(&self, number: u32) -> Option<&Task> {
        self.tasks.get(&number)
    }

    pub fn get_mut(&mut self, number: u32) -> Option<&mut Task> {
        self.tasks.get_mut(&number)
    }

    /// Tasks whose grants expired at `now_ns` (the kernel already refuses them).
    pub fn expired(&self, now_ns: u64) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.grants.as_ref().is_some_and(|g| g.expires_ns <= now_ns))
            .map(|(n, _)| *n)
            .collect();
        v.sort_unstable();
        v
    }

    /// Every task that has grants.
    pub fn granted(&self) -> impl Iterator<Item = (u32, &Task, &Grants)> + '_ {
        self.tasks
            .iter()
            .filter_map(|(n, t)| t.grants.as_ref().map(|g| (*n, t, g)))
    }

    /// Tasks of `agent`, by name.
    pub fn of_agent<'a>(&'a self, agent: &'a str) -> impl Iterator<Item = (u32, &'a Task)> + 'a {
        self.tasks
            .iter()
            .filter(move |(_, t)| t.agent == agent)
            .map(|(n, t)| (*n, t))
    }
}

/// Why `task narrow` was refused: it would widen the task.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NarrowError {
    /// `option` is `--keep-connect` or `--keep-exec`.
    #[error(
        "{option} {text:?} is not a grant of this task; narrowing keeps a subset of its grants"
    )]
    NotGranted { option: &'static str, text: String },
}

/// The narrowed form of `grants`: only the rules named in `keep_connect` / `keep_exec` (as written
/// when granted), ending no later than now. `new_expiry_ns` may only shorten the expiry. An error
/// names the first thing that would widen the task.
pub fn narrow(
    grants: &Grants,
    keep_connect: &[String],
    keep_exec: &[String],
    new_expiry_ns: Option<u64>,
) -> Result<(Vec<NetRule>, Vec<ExecRule>, u64), NarrowError> {
    let net = keep(&grants.net, keep_connect, NetRule::text, "--keep-connect")?;
    let exec = keep(&grants.exec, keep_exec, ExecRule::text, "--keep-exec")?;
    let expires_ns = new_expiry_ns.map_or(grants.expires_ns, |e| e.min(grants.expires_ns));
    Ok((net, exec, expires_ns))
}

/// The rules of `rules` whose text is in `wanted`; every wanted text must be one of them.
fn keep<R: Clone>(
    rules: &[R],
    wanted: &[String],
    text: fn(&R) -> &str,
    option: &'static str,
) -> Result<Vec<R>, NarrowError> {
    wanted
        .iter()
        .map(|k| {
            rules
                .iter()
                .find(|r| text(r) == k)
                .cloned()
                .ok_or_else(|| NarrowError::NotGranted {
                    option,
                    text: k.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_ttls_are_bounded() {
        assert_eq!(check_ttl_ms(1), Ok(1));
        assert_eq!(check_ttl_ms(604_800_000), Ok(604_800_000));
        let e = check_ttl_ms(u64::MAX).unwrap_err().to_string();
        assert!(
            e.starts_with("ttl_ms 18446744073709551615: at most 604800000 (7days;"),
            "{e}"
        );
        assert!(check_ttl_ms(604_800_001).is_err());
        assert!(
            check_ttl_ms(0)
                .unwrap_err()
                .to_string()
                .contains("longer than 0")
        );
    }

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_ttl("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_ttl("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_ttl(" 2d "), Ok(Duration::from_secs(2 * 86400)));
    }

    #[test]
    fn bad_ttls_say_what_is_expected() {
        for bad in ["", "10", "ten minutes", "-1s", "5x"] {
            let e = parse_ttl(bad).unwrap_err().to_string();
            assert!(e.contains("expected a duration"), "{bad:?}: {e}");
        }
        assert!(
            parse_ttl("0s")
                .unwrap_err()
                .to_string()
                .contains("longer than 0")
        );
        assert!(
            parse_ttl("8d")
                .unwrap_err()
                .to_string()
                .contains("at most 7days")
        );
    }

    #[test]
    fn numbers_are_stable_distinct_and_never_none() {
        let mut t = Tasks::default();
        let a = t.number("coder", "t1");
        let b = t.number("coder", "t2");
        let c = t.number("other", "t1");
        assert_ne!(a, TASK_NONE);
        assert!(a != b && b != c && a != c);
        assert_eq!(t.number("coder", "t1"), a);
        assert_eq!(t.find("other", "t1"), Some(c));
        assert_eq!(t.find("other", "t9"), None);
        assert_eq!(t.get(b).map(|x| x.name.as_str()), Some("t2"));
        assert_eq!(t.of_agent("coder").count(), 2);
    }

    #[test]
    fn narrowing_keeps_a_subset_and_never_extends() {
        let (net, exec) = crate::policy::parse_grants(
            &["10.0.0.1:443".into(), "127.0.0.1:80".into()],
            &["/usr/bin/make".into()],
        )
        .unwrap();
        let g = Grants {
            net,
            exec,
            expires_ns: 1_000,
            kernel: KernelTables::default(),
        };
        let (n, e, at) = narrow(&g, &["127.0.0.1:80".into()], &[], Some(500)).unwrap();
        assert_eq!((n.len(), e.len(), at), (1, 0, 500));
        assert_eq!(n[0].text(), "127.0.0.1:80");
        // A later expiry is capped at the current one.
        assert_eq!(narrow(&g, &[], &[], Some(5_000)).unwrap().2, 1_000);
        let err = narrow(&g, &["0.0.0.0/0:*".into()], &[], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a grant of this task"), "{err}");
        assert!(narrow(&g, &[], &["/bin/sh".into()], None).is_err());
    }

    #[test]
    fn expiry_lists_only_lapsed_grants() {
        let mut t = Tasks::default();
        let a = t.number("x", "a");
        let b = t.number("x", "b");
        for (n, at) in [(a, 100), (b, u64::MAX)] {
            t.get_mut(n).unwrap().grants = Some(Grants {
                net: vec![],
                exec: vec![],
                expires_ns: at,
                kernel: KernelTables::default(),
            });
        }
        assert!(t.expired(99).is_empty());
        assert_eq!(t.expired(100), vec![a]);
    }

    #[test]
    fn adopted_numbers_are_never_allocated_again() {
        let mut t = Tasks::default();
        assert!(t.adopt("a", "x", 7));
        assert!(!t.adopt("a", "x", 8), "same name twice");
        assert!(!t.adopt("b", "y", 7), "same number twice");
        assert_eq!(t.find("a", "x"), Some(7));
        t.skip_past(20);
        assert_eq!(t.number("a", "new"), 21);
        assert_eq!(t.number("a", "x"), 7);
    }
}
