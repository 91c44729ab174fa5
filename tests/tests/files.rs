//! `[files]` on the real kernel: a real daemon, real programs (cat, python3) as agents, opens of
//! denied files refused with EPERM (or, alert mode, let through) and reported; the same opens
//! outside every agent untouched. Run one at a time (`--test-threads=1`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

const CAT: &str = "/usr/bin/cat";

fn quoted(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy that lets the agent run cat and python3 and denies `deny`.
fn files_policy(agent: &str, mode: &str, deny: &[&Path], extra: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = {mode:?}\n[exec]\nallow = [{CAT:?}, {PYTHON:?}]\n\
             [files]\ndeny = [{}]\n{extra}",
            quoted(deny)
        ),
    )
}

/// Waits until the daemon has put `n` plans of `[files]` in force (the guard marks off the loop).
fn wait_files_applied(d: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches("[files] in force").count() < n {
        assert!(
            Instant::now() < deadline,
            "[files] not in force after 10 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

fn cat_as_agent(d: &Daemon, agent: &str, file: &Path) -> std::process::Output {
    d.run(agent, Some("t1"), &[CAT, &file.display().to_string()])
}

fn assert_eperm(out: &std::process::Output, what: &str) {
    assert!(
        !out.status.success() && text(&out.stderr).contains("Operation not permitted"),
        "{what}: expected EPERM; status {:?}, stdout {:?}, stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `cat FILE` as the agent succeeds; returns what it printed.
fn assert_agent_reads(d: &Daemon, agent: &str, file: &Path, what: &str) -> String {
    let out = cat_as_agent(d, agent, file);
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The audit record of an open of `file` (waited for).
fn open_record(d: &Daemon, file: &Path) -> Value {
    let path = file.display().to_string();
    d.wait_audit(&format!("an open of {path}"), |v| {
        is(v, "action", "open") && is(v, "file_path", &path)
    })
}

/// A directory of secrets under /tmp.
fn secrets() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("credentials");
    std::fs::write(&secret, "TOPSECRET\n").expect("write secret");
    (dir, secret)
}

/// A daemon whose agent (named after `label`, in `mode`) may not open the one secret file.
fn guarded(label: &str, mode: &str) -> (String, tempfile::TempDir, PathBuf, Daemon) {
    let agent = unique_agent(label);
    let (dir, secret) = secrets();
    let d = Daemon::start(&[files_policy(&agent, mode, &[&secret], "")]);
    wait_files_applied(&d, 1);
    (agent, dir, secret, d)
}

/// The control: a process outside every agent reads `file`.
fn assert_host_reads(file: &Path) -> String {
    let host = Command::new(CAT).arg(file).output().expect("cat");
    assert!(
        host.status.success(),
        "host cat of {} failed: {}",
        file.display(),
        text(&host.stderr)
    );
    text(&host.stdout)
}

#[test]
fn denied_file_read_fails_eperm_and_is_reported_and_the_host_still_reads_it() {
    if !require_root("denied_file_read_fails_eperm_and_is_reported_and_the_host_still_reads_it") {
        return;
    }
    let (agent, _dir, secret, d) = guarded("filesdeny", "enforce");

    let out = cat_as_agent(&d, &agent, &secret);
    assert_eperm(&out, "cat of the denied file as the agent");
    assert!(!text(&out.stdout).contains("TOPSECRET"));

    let path = secret.display().to_string();
    let rec = open_record(&d, &secret);
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "enforcement"), "eperm");
    assert_eq!(field(&rec, "agent_id"), agent);
    assert_eq!(field(&rec, "task_id"), "t1");
    assert_eq!(field(&rec, "comm"), "cat");
    assert!(
        field(&rec, "open_flags").starts_with("O_RDONLY"),
        "open_flags: {rec}"
    );
    assert!(
        field(&rec, "reason").contains(&format!("files.deny {path:?}")),
        "reason names the rule: {rec}"
    );
    let e = wait_journal(&agent, "denied open", |e| {
        is(e, "ACTION", "open") && is(e, "FILE_PATH", &path)
    });
    assert_eq!(field(&e, "VERDICT"), "denied");
    assert!(field(&e, "OPEN_FLAGS").starts_with("O_RDONLY"), "{e}");

    // Control: the same file, the same program, outside every agent.
    assert_eq!(assert_host_reads(&secret), "TOPSECRET\n");
    // And an agent may still read what its policy does not name.
    let other = secret.with_file_name("notes");
    std::fs::write(&other, "fine\n").expect("write");
    assert_agent_reads(&d, &agent, &other, "unrelated file");
}

#[test]
fn alert_mode_lets_the_open_through_and_reports_it() {
    if !require_root("alert_mode_lets_the_open_through_and_reports_it") {
        return;
    }
    let (agent, _dir, secret, d) = guarded("filesalert", "alert");
    let read = assert_agent_reads(&d, &agent, &secret, "alert mode refused");
    assert_eq!(read, "TOPSECRET\n");
    let rec = open_record(&d, &secret);
    assert_eq!(field(&rec, "verdict"), "alert");
    assert!(rec["enforcement"].is_null(), "{rec}");
}

/// Tries every route to a file; prints `NAME ok` or `NAME errno N`.
const PY_ROUTES: &str = r#"
import ctypes, os, sys
secret, link, bound = sys.argv[1:4]
def probe(name, fn):
    try:
        fn()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, "errno", e.errno, flush=True)
def read(p):
    with open(p) as f:
        f.read()
def opath_reopen():
    fd = os.open(secret, os.O_PATH)
    try:
        read(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
def openat2():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = OpenHow(os.O_RDONLY, 0, 0)
    fd = libc.syscall(437, ctypes.c_int(-100), secret.encode(), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "openat2")
    os.close(fd)
probe("direct", lambda: read(secret))
probe("hardlink", lambda: read(link))
probe("bindmount", lambda: read(bound))
probe("opath_reopen", opath_reopen)
probe("openat2", openat2)
probe("write", lambda: os.close(os.open(secret, os.O_WRONLY)))
"#;

/// What `PY_ROUTES` tries.
const ROUTES: [&str; 6] = [
    "direct",
    "hardlink",
    "bindmount",
    "opath_reopen",
    "openat2",
    "write",
];

/// Unmounts a bind mount when the test ends, also when it fails.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> BindMount {
        std::fs::write(target, "").expect("mount point");
        let out = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount --bind: {}", text(&out.stderr));
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[test]
fn every_route_to_the_file_is_judged_by_the_file_itself() {
    if !require_root("every_route_to_the_file_is_judged_by_the_file_itself") {
        return;
    }
    let (agent, dir, secret, d) = guarded("filesroutes", "enforce");
    // Made after the daemon marked the file: other names for the same inode.
    let elsewhere = tempfile::tempdir_in(dir.path().parent().expect("/tmp")).expect("tempdir");
    let link = elsewhere.path().join("innocent-looking");
    std::fs::hard_link(&secret, &link).expect("hard link");
    let bound = elsewhere.path().join("bound");
    let _mount = BindMount::new(&secret, &bound);
    let args = [
        secret.display().to_string(),
        link.display().to_string(),
        bound.display().to_string(),
    ];

    let out = d.run(
        &agent,
        Some("t1"),
        &[PYTHON, "-c", PY_ROUTES, &args[0], &args[1], &args[2]],
    );
    for route in ROUTES {
        assert_eq!(outcome(&out, route), "errno 1", "{route} as the agent");
    }
    let link_path = args[1].clone();
    d.wait_audit("the hard link's open, under its own name", |v| {
        is(v, "action", "open") && is(v, "file_path", &link_path) && is(v, "verdict", "denied")
    });
    let rec = d.wait_audit("a write open", |v| {
        is(v, "action", "open") && field(v, "open_flags").starts_with("O_WRONLY")
    });
    assert_eq!(field(&rec, "verdict"), "denied");

    // Control: every route works outside every agent.
    let host = Command::new(PYTHON)
        .args(["-c", PY_ROUTES, &args[0], &args[1], &args[2]])
        .output()
        .expect("python3");
    for route in ROUTES {
        assert_eq!(outcome(&host, route), "ok", "{route} outside every agent");
    }
}

#[test]
fn files_created_later_in_a_denied_directory_are_denied() {
    if !require_root("files_created_later_in_a_denied_directory_are_denied") {
        return;
    }
    let agent = unique_agent("filesnew");
    let tmp = tempfile::tempdir().expect("tempdir");
    let denied = tmp.path().join(".aws");
    std::fs::create_dir(&denied).expect("mkdir");
    let d = Daemon::start(&[files_policy(&agent, "enforce", &[&denied], "")]);
    wait_files_applied(&d, 1);

    // A file, a directory tree, and a tree made elsewhere and moved in, all after the marks.
    let new_file = denied.join("credentials");
    std::fs::write(&new_file, "k\n").expect("write");
    std::fs::create_dir_all(denied.join("sso/cache")).expect("mkdir");
    let deep = denied.join("sso/cache/token.json");
    std::fs::write(&deep, "t\n").expect("write");
    let outside = tmp.path().join("staging");
    std::fs::create_dir_all(outside.join("inner")).expect("mkdir");
    std::fs::write(outside.join("inner/key"), "m\n").expect("write");
    std::fs::rename(&outside, denied.join("moved")).expect("rename into the denied directory");
    let moved = denied.join("moved/inner/key");
    // The guard marks new directories as inotify reports them (docs/files.md, the race).
    std::thread::sleep(Duration::from_millis(300));

    for f in [&new_file, &deep, &moved] {
        assert_eperm(&cat_as_agent(&d, &agent, f), &f.display().to_string());
        assert_host_reads(f);
    }
    assert_eq!(field(&open_record(&d, &deep), "verdict"), "denied");
}

/// A user whose home directory is a temporary tree (the known-secrets list covers every home in
/// /etc/passwd); removed when the test ends.
struct FakeUser {
    name: String,
    home: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeUser {
    fn new() -> FakeUser {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("amf{}", std::process::id());
        let home = dir.path().join(&name);
        std::fs::create_dir(&home).expect("mkdir home");
        let out = Command::new("useradd")
            .args([
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--home-dir",
            ])
            .arg(&home)
            .arg(&name)
            .output()
            .expect("useradd");
        assert!(out.status.success(), "useradd: {}", text(&out.stderr));
        FakeUser {
            name,
            home,
            _dir: dir,
        }
    }
}

impl Drop for FakeUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

#[test]
fn deny_known_secrets_covers_every_home_and_the_hosts_own() {
    if !require_root("deny_known_secrets_covers_every_home_and_the_hosts_own") {
        return;
    }
    let user = FakeUser::new();
    let h = &user.home;
    for d in [".aws", ".ssh", ".config/gh", ".kube"] {
        std::fs::create_dir_all(h.join(d)).expect("mkdir");
    }
    let secrets = [
        h.join(".aws/credentials"),
        h.join(".ssh/id_ed25519"),
        h.join(".config/gh/hosts.yml"),
        h.join(".kube/config"),
        h.join(".netrc"),
    ];
    for s in &secrets {
        std::fs::write(s, "secret\n").expect("write");
    }
    let notes = h.join("notes.txt");
    std::fs::write(&notes, "fine\n").expect("write");
    let agent = unique_agent("filesknown");
    let d = Daemon::start(&[files_policy(
        &agent,
        "enforce",
        &[],
        "deny_known_secrets = true\n",
    )]);
    wait_files_applied(&d, 1);
    for s in secrets.iter().chain([&PathBuf::from("/etc/shadow")]) {
        assert_eperm(&cat_as_agent(&d, &agent, s), &s.display().to_string());
        assert_host_reads(s);
    }
    assert_agent_reads(&d, &agent, &notes, "notes.txt");
    let rec = open_record(&d, &secrets[1]);
    assert!(
        field(&rec, "reason").contains("files.deny_known_secrets \"~/.ssh\""),
        "{rec}"
    );
}

#[test]
fn a_reload_moves_the_denial_and_a_bad_reload_keeps_it() {
    if !require_root("a_reload_moves_the_denial_and_a_bad_reload_keeps_it") {
        return;
    }
    let (agent, dir, first, d) = guarded("filesreload", "enforce");
    let second = dir.path().join("second");
    std::fs::write(&second, "two\n").expect("write");
    assert_eperm(
        &cat_as_agent(&d, &agent, &first),
        "first, before the reload",
    );

    let (name, text_) = files_policy(&agent, "enforce", &[&second], "");
    d.write_policy(&name, &text_);
    let out = d.reload();
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    wait_files_applied(&d, 2);
    assert_agent_reads(&d, &agent, &first, "first after the reload");
    assert_eperm(
        &cat_as_agent(&d, &agent, &second),
        "second, after the reload",
    );

    d.write_policy(
        &name,
        &format!("agent = {agent:?}\n[files]\ndeny = [\"relative\"]\n"),
    );
    let out = d.reload();
    assert!(!out.status.success(), "a bad policy must be refused");
    assert!(
        text(&out.stderr).contains("files.deny[0] \"relative\""),
        "the refusal names the entry: {}",
        text(&out.stderr)
    );
    assert_eperm(
        &cat_as_agent(&d, &agent, &second),
        "second, after a refused reload",
    );
}

#[test]
fn an_agent_known_by_its_executable_selector_is_denied_too() {
    if !require_root("an_agent_known_by_its_executable_selector_is_denied_too") {
        return;
    }
    let agent = unique_agent("filesexe");
    let (dir, secret) = secrets();
    let bot = dir.path().join("bot");
    std::fs::copy("/bin/bash", &bot).expect("copy bash");
    let identity = format!(
        "[identity]\nexecutables = [{{ path = {:?}, sha256 = {:?} }}]\n",
        bot.display().to_string(),
        sha256_hex(&bot)
    );
    let d = Daemon::start(&[files_policy(&agent, "enforce", &[&secret], &identity)]);
    wait_files_applied(&d, 1);
    d.wait_selector_verified();
    // A shell builtin reads the file: no exec, the selected program itself opens it.
    let script = format!(
        "read line < {:?} && echo \"read $line\"",
        secret.display().to_string()
    );
    let out = Command::new(&bot)
        .args(["-c", &script])
        .output()
        .expect("bot");
    assert!(
        !out.status.success() && text(&out.stderr).contains("Operation not permitted"),
        "the selected program read the file: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let rec = open_record(&d, &secret);
    assert_eq!(field(&rec, "agent_id"), agent);
    assert_eq!(field(&rec, "verdict"), "denied");
    // Control: the same script in an unselected bash.
    let host = Command::new("/bin/bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    assert_eq!(
        text(&host.stdout),
        "read TOPSECRET\n",
        "{}",
        text(&host.stderr)
    );
}
