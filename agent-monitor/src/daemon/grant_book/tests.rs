//! Task grants start, narrow, end, expire and come back after a restart, against an in-memory
//! kernel and a state file in a temporary directory.

use std::path::{Path, PathBuf};

use agent_monitor_common::{ExecKey, NetGrant, NetKey};

use super::*;

const BOOT: &str = "0b1c4a1e-7d2f-4e5a-9c3b-111111111111";
const MS: u64 = 1_000_000;

/// The per-task grant maps.
#[derive(Default, Clone)]
struct FakeKernel {
    net: Vec<(u32, NetKey, NetGrant)>,
    exec: Vec<(u32, ExecKey, Expiry)>,
    /// Exec grants by file (ask approvals): only counted here.
    files: usize,
}

fn same_exec(a: &(u32, ExecKey), b: &(u32, ExecKey)) -> bool {
    a.0 == b.0 && a.1.agent == b.1.agent && a.1.path == b.1.path
}

impl GrantTables for FakeKernel {
    fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        for (len, key, allow) in &tables.net {
            self.net.retain(|(l, k, _)| !(l == len && k == key));
            let grant = NetGrant {
                expiry,
                allow: *allow,
                _pad: 0,
            };
            self.net.push((*len, *key, grant));
        }
        for (len, key) in &tables.exec {
            self.exec
                .retain(|(l, k, _)| !same_exec(&(*l, *k), &(*len, *key)));
            self.exec.push((*len, *key, expiry));
        }
        Ok(())
    }

    fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        for (len, key, _) in &tables.net {
            self.net.retain(|(l, k, _)| !(l == len && k == key));
        }
        for (len, key) in &tables.exec {
            self.exec
                .retain(|(l, k, _)| !same_exec(&(*l, *k), &(*len, *key)));
        }
        Ok(())
    }

    fn task_grants(&self) -> anyhow::Result<KernelGrants> {
        Ok(KernelGrants {
            net: self.net.clone(),
            exec: self.exec.clone(),
        })
    }

    fn retain_task_grants(&mut self, keep: &dyn Fn(u32) -> bool) -> anyhow::Result<usize> {
        let before = self.net.len() + self.exec.len();
        self.net.retain(|e| keep(e.1.agent));
        self.exec.retain(|e| keep(e.1.agent));
        Ok(before - self.net.len() - self.exec.len())
    }

    fn clear_exec_file_grants(&mut self) -> anyhow::Result<usize> {
        Ok(std::mem::take(&mut self.files))
    }
}

impl FakeKernel {
    /// (net, exec) entries of task `number`, with their expiries.
    fn of(&self, number: u32) -> (Vec<u64>, Vec<u64>) {
        (
            self.net
                .iter()
                .filter(|e| e.1.agent == number)
                .map(|e| e.2.expiry.expires_ns)
                .collect(),
            self.exec
                .iter()
                .filter(|e| e.1.agent == number)
                .map(|e| e.2.expires_ns)
                .collect(),
        )
    }
}

fn book_at(path: &Path, boot: &str) -> GrantBook {
    GrantBook::new(GrantStateFile::with_boot_id(
        path,
        Path::new("/sys/fs/bpf/agent-monitor-test"),
        Ok(boot.to_string()),
    ))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    book: GrantBook,
    kernel: FakeKernel,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    Setup {
        book: book_at(&path, BOOT),
        path,
        _dir: dir,
        kernel: FakeKernel::default(),
    }
}

/// Starts `task` of agent coder with the given grants at `now` ms; returns its number.
fn start(
    s: &mut Setup,
    task: &str,
    connect: &[&str],
    exec: &[&str],
    ttl_ms: Option<u64>,
    now_ms: u64,
) -> u32 {
    let n = s.book.number("coder", task);
    s.book
        .start(
            &mut s.kernel,
            n,
            task,
            &strings(connect),
            &strings(exec),
            ttl_ms,
            now_ms * MS,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    n
}

#[test]
fn start_writes_the_grants_and_adds_to_what_the_task_has() {
    let mut s = setup();
    let n = s.book.number("coder", "fix-1");
    let texts = s
        .book
        .start(
            &mut s.kernel,
            n,
            "fix-1",
            &strings(&["10.0.0.1:443"]),
            &[],
            Some(1_000),
            0,
        )
        .unwrap();
    assert_eq!(texts, ["connect 10.0.0.1:443"]);
    assert_eq!(s.kernel.of(n), (vec![1_000 * MS], vec![]));
    // A second start adds an exec grant; every grant of the task gets the new expiry.
    let texts = s
        .book
        .start(
            &mut s.kernel,
            n,
            "fix-1",
            &[],
            &strings(&["/usr/bin/make"]),
            None,
            10 * MS,
        )
        .unwrap();
    assert_eq!(texts, ["connect 10.0.0.1:443", "exec /usr/bin/make"]);
    assert_eq!(s.kernel.of(n), (vec![u64::MAX], vec![u64::MAX]));
    let reason = s
        .book
        .reason(n, |g| g.exec.first().map(|r| format!("exec {}", r.text())));
    assert_eq!(
        reason,
        "granted to task fix-1 by `task start`: exec /usr/bin/make"
    );
    assert_eq!(s.book.file_stats(), ("grant-state-file".to_string(), 2, 0));
}

#[test]
fn start_refuses_bad_input_without_touching_the_kernel() {
    let mut s = setup();
    let mut try_start = |task: &str, connect: &str, ttl_ms: Option<u64>| {
        let n = s.book.number("coder", task);
        let e = s
            .book
            .start(&mut s.kernel, n, task, &strings(&[connect]), &[], ttl_ms, 0)
            .unwrap_err();
        assert!(s.book.get(n).is_some_and(|t| t.grants.is_none()));
        e
    };
    let e = try_start("unverified", "10.0.0.1:443", None);
    assert!(matches!(e, GrantError::Unverified), "{e}");
    let e = try_start("t", "10.0.0.1:443", Some(0));
    assert!(e.to_string().contains("longer than 0"), "{e}");
    let e = try_start("t", "not an address", None);
    assert!(matches!(e, GrantError::Rules(_)), "{e}");
    assert!(s.kernel.net.is_empty() && s.kernel.exec.is_empty());
}

#[test]
fn narrow_keeps_a_subset_ending_no_later() {
    let mut s = setup();
    let n = start(
        &mut s,
        "t",
        &["10.0.0.1:443", "127.0.0.1:80"],
        &["/usr/bin/make"],
        Some(60_000),
        0,
    );
    let narrowed = s
        .book
        .narrow(
            &mut s.kernel,
            "coder",
            "t",
            &strings(&["127.0.0.1:80"]),
            &[],
            Some(5_000),
            1_000 * MS,
        )
        .unwrap();
    assert_eq!(narrowed.grants, ["connect 127.0.0.1:80"]);
    assert_eq!(narrowed.expires_ns, 6_000 * MS);
    assert_eq!(
        s.kernel.of(n),
        (vec![6_000 * MS], vec![]),
        "the rest left the kernel"
    );
    // Narrowing never widens: a later TTL keeps the earlier end, an unknown rule is refused.
    let later = s
        .book
        .narrow(
            &mut s.kernel,
            "coder",
            "t",
            &strings(&["127.0.0.1:80"]),
            &[],
            Some(600_000),
            2_000 * MS,
        )
        .unwrap();
    assert_eq!(later.expires_ns, 6_000 * MS);
    let e = s
        .book
        .narrow(
            &mut s.kernel,
            "coder",
            "t",
            &strings(&["0.0.0.0/0:*"]),
            &[],
            None,
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("not a grant of this task"), "{e}");
    assert_eq!(s.kernel.of(n).0.len(), 1);
    let e = s
        .book
        .narrow(&mut s.kernel, "coder", "nope", &[], &[], None, 0)
        .unwrap_err();
    assert_eq!(e.to_string(), "agent \"coder\" has no task \"nope\"");
    // Narrowing to nothing leaves no grants; narrowing again says so.
    s.book
        .narrow(&mut s.kernel, "coder", "t", &[], &[], None, 0)
        .unwrap();
    assert_eq!(s.kernel.of(n), (vec![], vec![]));
    let e = s
        .book
        .narrow(&mut s.kernel, "coder", "t", &[], &[], None, 0)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "task \"t\" of agent \"coder\" has no grants to narrow"
    );
}

#[test]
fn end_revokes_every_grant_of_the_task_only() {
    let mut s = setup();
    let a = start(&mut s, "a", &["10.0.0.1:443"], &["/usr/bin/make"], None, 0);
    let b = start(&mut s, "b", &["10.0.0.2:443"], &[], None, 0);
    assert_eq!(s.book.end(&mut s.kernel, "coder", "a").unwrap(), 2);
    assert_eq!(s.kernel.of(a), (vec![], vec![]));
    assert_eq!(s.kernel.of(b).0.len(), 1, "the other task keeps its grant");
    assert_eq!(
        s.book.reason(a, |_| None),
        "granted to task a by `task start` (grant since ended)"
    );
    assert_eq!(
        s.book.end(&mut s.kernel, "coder", "a").unwrap(),
        0,
        "nothing left"
    );
    let e = s.book.end(&mut s.kernel, "other", "a").unwrap_err();
    assert_eq!(e.to_string(), "agent \"other\" has no task \"a\"");
}

#[test]
fn expiry_removes_only_lapsed_grants() {
    let mut s = setup();
    let short = start(&mut s, "short", &["10.0.0.1:443"], &[], Some(1_000), 0);
    let long = start(&mut s, "long", &["10.0.0.2:443"], &[], Some(60_000), 0);
    s.book.expire(&mut s.kernel, 999 * MS);
    assert_eq!(s.kernel.of(short).0.len(), 1, "not yet");
    s.book.expire(&mut s.kernel, 1_000 * MS);
    assert_eq!(s.kernel.of(short), (vec![], vec![]));
    assert!(s.book.get(short).is_some_and(|t| t.grants.is_none()));
    assert_eq!(s.kernel.of(long).0.len(), 1);
}

#[test]
fn a_failed_state_file_write_is_counted_and_the_grant_stands() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the file's directory should be: every write fails.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let mut book = book_at(&blocker.join("grants.json"), BOOT);
    let mut kernel = FakeKernel::default();
    let n = book.number("coder", "t");
    book.start(
        &mut kernel,
        n,
        "t",
        &strings(&["10.0.0.1:443"]),
        &[],
        None,
        0,
    )
    .unwrap();
    assert_eq!(kernel.of(n).0.len(), 1);
    assert_eq!(book.file_stats(), ("grant-state-file".to_string(), 0, 1));
    book.end(&mut kernel, "coder", "t").unwrap();
    assert_eq!(book.file_stats().2, 2);
}

#[test]
fn the_state_file_round_trips_what_is_in_force() {
    let mut s = setup();
    start(
        &mut s,
        "fix-1",
        &["127.0.0.1:8080", "10.0.0.0/8:443"],
        &[],
        Some(5_000),
        0,
    );
    start(
        &mut s,
        "build",
        &[],
        &["/usr/bin/make", "/opt/tools/*"],
        None,
        0,
    );
    let _idle = s.book.number("coder", "idle");
    let text = std::fs::read_to_string(&s.path).unwrap();
    let got = grant_state::decode(
        &s.path,
        &text,
        BOOT,
        Path::new("/sys/fs/bpf/agent-monitor-test"),
    )
    .unwrap();
    let summary: Vec<_> = got
        .iter()
        .map(|r| (r.task.as_str(), r.net.len(), r.exec.len(), r.expires_ns))
        .collect();
    assert_eq!(
        summary,
        [("fix-1", 2, 0, 5_000 * MS), ("build", 0, 2, u64::MAX)]
    );
}

/// The grant book of a daemon started on the same pin directory after `s`'s stopped.
fn restart(s: &Setup, boot: &str) -> GrantBook {
    book_at(&s.path, boot)
}

/// A daemon that granted task fix-1 (a connect and an exec grant, 5 s from 0) and task build
/// (a connect grant without end), and a new daemon's book on the same file and kernel maps.
struct Restarted {
    _first: Setup,
    fix: u32,
    build: u32,
    kernel: FakeKernel,
    book: GrantBook,
}

fn restarted() -> Restarted {
    let mut s = setup();
    let fix = start(
        &mut s,
        "fix-1",
        &["10.0.0.1:443"],
        &["/usr/bin/make"],
        Some(5_000),
        0,
    );
    let build = start(&mut s, "build", &["10.0.0.2:443"], &[], None, 0);
    Restarted {
        fix,
        build,
        kernel: s.kernel.clone(),
        book: restart(&s, BOOT),
        _first: s,
    }
}

#[test]
fn a_restarted_daemon_recovers_the_grants_still_in_force() {
    let Restarted {
        _first: _s,
        fix,
        build,
        mut kernel,
        mut book,
    } = restarted();
    // The cgroup tree gave back "build" already (same number).
    assert!(book.adopt("coder", "build", build));
    book.recover(&mut kernel, true, 1_000 * MS).unwrap();
    let r = book.recovery();
    assert_eq!(
        (r.tasks, r.recovered, r.expired, r.revoked_entries),
        (2, 3, 0, 0)
    );
    assert!(r.why.is_empty(), "{:?}", r.why);
    assert_eq!(book.find("coder", "fix-1"), Some(fix));
    assert_eq!(
        book.reason(fix, |g| g.net.first().map(|r| r.text().to_string())),
        "granted to task fix-1 by `task start`: 10.0.0.1:443"
    );
    assert_eq!(kernel.of(fix), (vec![5_000 * MS], vec![5_000 * MS]));
    // Recovered grants can be ended as if this daemon had given them.
    assert_eq!(book.end(&mut kernel, "coder", "fix-1").unwrap(), 2);
    assert_eq!(kernel.of(fix), (vec![], vec![]));
    // A new task never takes a recovered number.
    assert!(book.number("coder", "new") > build.max(fix));
}

#[test]
fn grants_that_expired_while_no_daemon_ran_are_dropped() {
    let Restarted {
        _first: first,
        fix,
        build,
        mut kernel,
        mut book,
    } = restarted();
    book.recover(&mut kernel, true, 10_000 * MS).unwrap();
    let r = book.recovery();
    assert_eq!(
        (r.tasks, r.recovered, r.expired, r.revoked_entries),
        (1, 1, 2, 0)
    );
    assert_eq!(kernel.of(fix), (vec![], vec![]), "expired entries tidied");
    assert_eq!(kernel.of(build).0.len(), 1);
    // The file now describes only what is in force.
    let text = std::fs::read_to_string(&first.path).unwrap();
    assert!(!text.contains("fix-1") && text.contains("build"), "{text}");
}

#[test]
fn a_state_file_of_another_boot_recovers_nothing_and_revokes_everything() {
    let mut s = setup();
    let fix = start(&mut s, "fix-1", &["10.0.0.1:443"], &[], None, 0);
    let mut kernel = s.kernel.clone();
    let mut book = restart(&s, "another-boot-id");
    book.recover(&mut kernel, true, 1_000 * MS).unwrap();
    let r = book.recovery();
    assert_eq!((r.tasks, r.recovered, r.revoked_entries), (0, 0, 1));
    assert!(
        r.why.iter().any(|w| w.contains("another boot")),
        "{:?}",
        r.why
    );
    assert_eq!(
        kernel.of(fix),
        (vec![], vec![]),
        "nothing stays that `task end` could not end"
    );
    assert!(book.get(fix).is_none_or(|t| t.grants.is_none()));
}

#[test]
fn a_grant_the_kernel_no_longer_holds_exactly_is_not_brought_back() {
    let mut s = setup();
    let fix = start(
        &mut s,
        "fix-1",
        &["10.0.0.1:443", "10.0.0.2:443"],
        &[],
        None,
        0,
    );
    let mut kernel = s.kernel.clone();
    // Narrowed in the kernel after the file was last written (e.g. a failed write).
    kernel.net.pop();
    let mut book = restart(&s, BOOT);
    book.recover(&mut kernel, true, 1_000 * MS).unwrap();
    let r = book.recovery();
    assert_eq!((r.tasks, r.revoked_entries), (0, 1));
    assert!(
        r.why[0].contains("older than the kernel's grants"),
        "{:?}",
        r.why
    );
    assert_eq!(kernel.of(fix), (vec![], vec![]));
}

#[test]
fn a_fresh_install_removes_a_leftover_state_file() {
    let mut s = setup();
    start(&mut s, "fix-1", &["10.0.0.1:443"], &[], None, 0);
    assert!(s.path.exists());
    let mut book = restart(&s, BOOT);
    book.recover(&mut FakeKernel::default(), false, 0).unwrap();
    assert!(!s.path.exists(), "its grants went with the maps");
}

#[test]
fn a_refused_grant_reads_once_in_the_control_response_and_keeps_its_type() {
    // The control socket answers a refusal with `{:#}` of the anyhow error: the typed cause must
    // appear exactly once, and stay inspectable by type.
    let ttl: anyhow::Error = GrantError::from(tasks::check_ttl_ms(0).unwrap_err()).into();
    assert_eq!(
        format!("{ttl:#}"),
        "ttl_ms 0: a grant must last longer than 0; use `task end` to revoke"
    );
    assert!(matches!(
        ttl.downcast_ref::<GrantError>(),
        Some(GrantError::Ttl(tasks::TtlError::ZeroMs))
    ));
    let rule = crate::policy::parse_grants(&strings(&["not an address"]), &[]).unwrap_err();
    let rule: anyhow::Error = GrantError::from(rule).into();
    let text = format!("{rule:#}");
    assert_eq!(text, rule.to_string());
    assert!(
        text.starts_with("--allow-connect \"not an address\": "),
        "{text}"
    );
}

#[test]
fn a_restart_revokes_every_exec_grant_by_file() {
    let Restarted {
        _first: _s,
        mut kernel,
        mut book,
        ..
    } = restarted();
    // Ask approvals of execs are not in the state file: none is taken over.
    kernel.files = 2;
    book.recover(&mut kernel, true, 1_000 * MS).unwrap();
    assert_eq!(kernel.files, 0);
    assert_eq!(book.recovery().revoked_entries, 2);
}
