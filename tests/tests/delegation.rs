//! Delegation to services outside the agent, and selectors that would capture the host, on the
//! real kernel: a uid bound by `run --user` is the agent wherever its processes start (a root
//! helper outside the agent that becomes the uid, as cron, sshd or su do, is judged as the agent);
//! a uid is one agent; uid 0 and selectors that hold the daemon are refused; the warnings appear.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use std::process::{Command, Output};

use agent_monitor_tests::*;
use serde_json::Value;

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

/// Python: `c(port)` connects to 127.0.0.1:port and returns `ok` or `errnoN`.
const PY_C: &str = "import socket\ndef c(p):\n  s=socket.socket()\n  try:\n    s.connect(('127.0.0.1',p)); return 'ok'\n  except OSError as e:\n    return 'errno%d'%e.errno\n";

const ID: &str = "/usr/bin/id";
const RUNUSER: &str = "/usr/sbin/runuser";

fn stdout_of(out: &Output) -> String {
    text(&out.stdout).trim().to_string()
}

/// A system user of this test alone (a uid nothing else on the host runs as), removed at drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn new(label: &str) -> TestUser {
        let uid = 260_000 + (std::process::id() % 20_000) * 2 + u32::from(label == "b");
        let name = format!("amt{label}{}", std::process::id());
        let out = Command::new("/usr/sbin/useradd")
            .args([
                "--system",
                "--no-create-home",
                "--no-user-group",
                "--gid",
                "65534",
            ])
            .args([
                "--shell",
                "/usr/sbin/nologin",
                "--uid",
                &uid.to_string(),
                &name,
            ])
            .output()
            .expect("running useradd");
        assert!(out.status.success(), "useradd: {}", text(&out.stderr));
        TestUser {
            name,
            uid,
            gid: 65534,
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/userdel").arg(&self.name).output();
    }
}

/// `agent-monitor run --user USER --agent AGENT -- CMD…`, waited for.
fn run_as(d: &Daemon, agent: &str, user: &str, cmd: &[&str]) -> Output {
    Command::new(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args(["--agent", agent, "--user", user, "--"])
        .args(cmd)
        .output()
        .unwrap()
}

/// A root helper outside every agent that becomes `uid` and execs CMD, as cron, sshd or su do
/// (setgroups, setgid, setuid, exec).
fn cron_like(uid: u32, gid: u32, cmd: &[&str]) -> Output {
    let script = format!(
        "import os,sys\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\nos.execv(sys.argv[1], sys.argv[1:])"
    );
    Command::new(PYTHON)
        .args(["-c", &script])
        .args(cmd)
        .output()
        .unwrap()
}

fn denied_exec(d: &Daemon, agent: &str, uid: u32, exe: &str) -> Value {
    d.wait_audit("denied exec", |v| {
        is(v, "agent_id", agent)
            && is(v, "action", "exec")
            && is(v, "verdict", "denied")
            && is(v, "exe", exe)
            && v["uid"] == uid
    })
}

#[test]
fn a_uid_bound_by_run_user_is_the_agent_wherever_its_processes_start() {
    if !require_root("a_uid_bound_by_run_user_is_the_agent_wherever_its_processes_start") {
        return;
    }
    let agent = unique_agent("bound");
    let user = TestUser::new("a");
    let (allowed, forbidden) = (listener_v4(), listener_v4());
    let d = Daemon::start(&[identity_policy(
        &agent,
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
        "",
    )]);
    // Before the binding the uid is nobody's: the cron-like route runs anything.
    let out = cron_like(user.uid, user.gid, &[ID, "-u"]);
    assert_eq!(
        stdout_of(&out),
        user.uid.to_string(),
        "{}",
        text(&out.stderr)
    );

    let out = run_as(&d, &agent, &user.name, &[PYTHON, "-c", "print('placed')"]);
    assert_eq!(stdout_of(&out), "placed", "{}", text(&out.stderr));
    let status = d.status();
    let sel = status["agents"][0]["selectors"].to_string();
    assert!(
        sel.contains(&format!("uid {}: bound by `run --user`", user.uid)),
        "{sel}"
    );

    // `run` has exited; the uid is still the agent. A root helper outside the agent that
    // becomes the uid and execs (cron, sshd): the exec is judged as the agent and killed.
    let out = cron_like(user.uid, user.gid, &[ID, "-u"]);
    assert_eq!(out.status.code(), None, "killed, not run: {out:?}");
    let rec = denied_exec(&d, &agent, user.uid, ID);
    assert_eq!(field(&rec, "task_id"), "default");
    // A real one: runuser (PAM, fork, setuid, exec), as su does.
    let out = Command::new(RUNUSER)
        .args(["-u", &user.name, "--", ID, "-g"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(stdout_of(&out).is_empty(), "{out:?}");
    // setpriv (setresuid, then exec in the same process).
    let out = Command::new("/usr/bin/setpriv")
        .args([
            &format!("--reuid={}", user.uid),
            &format!("--regid={}", user.gid),
            "--clear-groups",
            "--",
            ID,
            "-G",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed, not run: {out:?}");
    // An allowed program as the uid, started outside: its connects are judged as the agent;
    // and a setuid without exec is caught from the next action on.
    let script = format!("{PY_C}print(c({allowed}), c({forbidden}))\n",);
    let out = cron_like(user.uid, user.gid, &[PYTHON, "-c", &script]);
    assert_eq!(stdout_of(&out), "ok errno1", "{}", text(&out.stderr));
    let setuid_only = format!(
        "import os\n{PY_C}before=c({forbidden})\nos.setgroups([]); os.setgid({}); os.setuid({})\nprint(before, c({forbidden}))",
        user.gid, user.uid
    );
    let out = Command::new(PYTHON)
        .args(["-c", &setuid_only])
        .output()
        .unwrap();
    assert_eq!(stdout_of(&out), "ok errno1", "{}", text(&out.stderr));
    let rec = d.wait_audit("denied connect of the uid outside", |v| {
        is(v, "agent_id", &agent)
            && is(v, "action", "connect")
            && is(v, "verdict", "denied")
            && v["dest_port"] == forbidden
            && v["uid"] == user.uid
    });
    assert_eq!(field(&rec, "task_id"), "default");

    // Control: the same programs as another uid outside the agent are not judged.
    let out = cron_like(65534, 65534, &[ID, "-u"]);
    assert_eq!(stdout_of(&out), "65534", "{}", text(&out.stderr));
    let out = cron_like(65534, 65534, &[PYTHON, "-c", &script]);
    assert_eq!(stdout_of(&out), "ok ok", "{}", text(&out.stderr));
}

#[test]
fn a_uid_is_one_agent_and_never_root() {
    if !require_root("a_uid_is_one_agent_and_never_root") {
        return;
    }
    let (a, b, c) = (
        unique_agent("one-a"),
        unique_agent("one-b"),
        unique_agent("one-c"),
    );
    let bound = TestUser::new("a");
    let selected = TestUser::new("b");
    let d = Daemon::start(&[
        identity_policy(&a, &[], &[PYTHON], ""),
        identity_policy(&b, &[], &[PYTHON], ""),
        identity_policy(&c, &[], &[PYTHON], &format!("uids = [{}]", selected.uid)),
    ]);
    let ran = [PYTHON, "-c", "print('ran')"];
    let out = run_as(&d, &a, &bound.name, &ran);
    assert_eq!(stdout_of(&out), "ran", "{}", text(&out.stderr));
    // The same agent again: fine.
    let out = run_as(&d, &a, &bound.name, &ran);
    assert_eq!(stdout_of(&out), "ran", "{}", text(&out.stderr));
    // Another agent: refused before anything runs, naming the holder.
    let out = run_as(&d, &b, &bound.name, &ran);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(stdout_of(&out).is_empty(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("uid {} is bound to agent {a:?}", bound.uid)),
        "{err}"
    );
    // A uid a policy selects for another agent: refused, naming the selector.
    let out = run_as(&d, &a, &selected.name, &ran);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("agent {c:?}'s (its `uids` selector at")),
        "{err}"
    );
    // Root: refused.
    let out = run_as(&d, &a, "root", &ran);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        text(&out.stderr).contains("uid 0 (root) is refused"),
        "{out:?}"
    );
    // Control: without --user, root runs the agent as before.
    let out = d.run(&a, None, &ran);
    assert_eq!(stdout_of(&out), "ran", "{}", text(&out.stderr));
}

#[test]
fn a_run_user_binding_survives_reload_and_restart() {
    if !require_root("a_run_user_binding_survives_reload_and_restart") {
        return;
    }
    let agent = unique_agent("keep");
    let user = TestUser::new("a");
    let policy = identity_policy(&agent, &[], &[PYTHON], "");
    let mut d = Daemon::start(std::slice::from_ref(&policy));
    let out = run_as(&d, &agent, &user.name, &[PYTHON, "-c", "pass"]);
    assert!(out.status.success(), "{out:?}");
    let out = d.reload();
    assert!(out.status.success(), "{out:?}");
    let out = cron_like(user.uid, user.gid, &[ID, "-u"]);
    assert_eq!(out.status.code(), None, "after reload: {out:?}");
    d.stop();
    d.spawn();
    let sel = d.status()["agents"][0]["selectors"].to_string();
    assert!(sel.contains("adopted from the pinned uid map"), "{sel}");
    let out = cron_like(user.uid, user.gid, &[ID, "-u"]);
    assert_eq!(out.status.code(), None, "after restart: {out:?}");
    // The agent's policy goes: the binding ends with it.
    std::fs::remove_file(d.policies.join(&policy.0)).unwrap();
    d.write_policy(
        "other.toml",
        &identity_policy(&unique_agent("other"), &[], &[], "").1,
    );
    let out = d.reload();
    assert!(out.status.success(), "{out:?}");
    let out = cron_like(user.uid, user.gid, &[ID, "-u"]);
    assert_eq!(stdout_of(&out), user.uid.to_string(), "{out:?}");
}

#[test]
fn run_user_warns_about_the_uids_processes_outside_the_agent() {
    if !require_root("run_user_warns_about_the_uids_processes_outside_the_agent") {
        return;
    }
    let agent = unique_agent("warnuid");
    let user = TestUser::new("a");
    let d = Daemon::start(&[identity_policy(&agent, &[], &[PYTHON], "")]);
    // A process of the uid started outside the agent, before the binding.
    let mut outside = Command::new("/usr/bin/setpriv")
        .args([
            &format!("--reuid={}", user.uid),
            &format!("--regid={}", user.gid),
            "--clear-groups",
            "--",
            "/usr/bin/sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = run_as(&d, &agent, &user.name, &[PYTHON, "-c", "pass"]);
    let _ = outside.kill();
    let _ = outside.wait();
    assert!(out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    let want = format!("pid {} sleep", outside.id());
    assert!(err.contains("agent-monitor run: warning: uid"), "{err}");
    assert!(err.contains(&want), "{err}");
    assert!(
        err.contains(&format!("they are agent {agent} from now on")),
        "{err}"
    );
    assert!(d.log().contains(&want), "{}", d.log());
}

/// Writes one policy into a fresh directory and returns it (kept alive by the TempDir).
fn policy_dir(policy: &(String, String)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(&policy.0), &policy.1).unwrap();
    dir
}

/// `agent-monitor daemon` on the policies in `dir`: it must refuse to start before it loads
/// anything (no pins left behind).
fn daemon_refuses(dir: &std::path::Path) -> Output {
    let pins = private_pin_dir();
    let out = Command::new(binary())
        .args(["daemon", "--policies"])
        .arg(dir)
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--control-socket")
        .arg(dir.join("s.sock"))
        .arg("--state-file")
        .arg(dir.join("g.json"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(!pins.exists(), "nothing was loaded: {out:?}");
    out
}

#[test]
fn selectors_that_capture_the_host_are_refused_by_policy_check_and_the_daemon() {
    if !require_root("selectors_that_capture_the_host_are_refused_by_policy_check_and_the_daemon") {
        return;
    }
    let agent = unique_agent("host");
    // uid 0: refused by `policy check` with file:line:col, and by the daemon at start.
    let root = identity_policy(&agent, &[], &[], "uids = [0]");
    let dir = policy_dir(&root);
    let out = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:8:9: identity.uids[0] \"0\": uid 0 is root",
            root.0
        )),
        "{err}"
    );
    let out = daemon_refuses(dir.path());
    assert!(text(&out.stderr).contains("uid 0 is root"), "{out:?}");

    // The daemon's own binary as an executable selector: host-dependent, refused by `policy
    // check` (it is this check's binary too) and by a reload, which keeps the old policy.
    let exe = binary();
    let own = identity_policy(
        &agent,
        &[],
        &[],
        &format!(
            "executables = [{{ path = {:?}, sha256 = {:?} }}]",
            exe.display().to_string(),
            sha256_hex(&exe)
        ),
    );
    let dir = policy_dir(&own);
    let out = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("is the binary of this `policy check`"),
        "{out:?}"
    );
    let out = daemon_refuses(dir.path());
    assert!(
        text(&out.stderr).contains("is the binary of the daemon"),
        "{out:?}"
    );
    let allowed = listener_v4();
    let d = Daemon::start(&[identity_policy(
        &agent,
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
        "",
    )]);
    d.write_policy(&own.0, &own.1);
    let out = d.reload();
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("the previous policy stays in force"), "{err}");
    assert!(err.contains("is the binary of the daemon"), "{err}");
    // The old policy is in force: its allowlist still answers.
    let out = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &format!("{PY_C}print(c({allowed}))")],
    );
    assert_eq!(stdout_of(&out), "ok", "{}", text(&out.stderr));
}

#[test]
fn allowing_programs_that_hand_work_to_services_warns() {
    if !require_root("allowing_programs_that_hand_work_to_services_warns") {
        return;
    }
    let agent = unique_agent("deleg");
    let p = identity_policy(&agent, &[], &["/usr/bin/*", "/usr/bin/systemd-run"], "");
    let dir = policy_dir(&p);
    let out = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "valid, with warnings: {out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("\"/usr/bin/*\" allows")
            && err.contains("hand work to a service outside the agent"),
        "{err}"
    );
    assert!(
        err.contains("\"/usr/bin/systemd-run\" (systemd-run) hands work to systemd"),
        "{err}"
    );
    let d = Daemon::start(std::slice::from_ref(&p));
    assert!(
        d.log()
            .contains("\"/usr/bin/systemd-run\" (systemd-run) hands work to systemd"),
        "{}",
        d.log()
    );
}

#[test]
fn a_cgroup_selector_holding_the_daemon_is_refused_on_the_host() {
    if !require_root("a_cgroup_selector_holding_the_daemon_is_refused_on_the_host") {
        return;
    }
    let agent = unique_agent("hostcg");
    // Declared before the daemon so they are removed after the daemon is gone.
    let cg = TestCgroup::new(&format!("am-test-{agent}"), "daemon");
    let beside = TestCgroup::new(&format!("am-test-{agent}"), "work");
    let top = format!("/am-test-{agent}");
    let allowed = listener_v4();
    let d = Daemon::start(&[identity_policy(
        &agent,
        &[format!("127.0.0.1:{allowed}")],
        &[PYTHON],
        "",
    )]);
    // The daemon now lives below `top`, as it would below a slice on a systemd host.
    std::fs::write(cg.path.join("cgroup.procs"), d.pid().to_string()).unwrap();
    let bad = identity_policy(&agent, &[], &[], &format!("cgroups = [{top:?}]"));
    d.write_policy(&bad.0, &bad.1);
    let out = d.reload();
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("the previous policy stays in force"), "{err}");
    assert!(
        err.contains(&format!(
            "cgroup selector {top:?} of agent {agent:?} would capture the daemon (pid {}",
            d.pid()
        )),
        "{err}"
    );
    assert!(err.contains(&format!("(cgroup {})", cg.rel)), "{err}");
    let out = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &format!("{PY_C}print(c({allowed}))")],
    );
    assert_eq!(stdout_of(&out), "ok", "{}", text(&out.stderr));
    // Control: a selector one level down, beside the daemon, is accepted.
    let good = identity_policy(&agent, &[], &[], &format!("cgroups = [{:?}]", beside.rel));
    d.write_policy(&good.0, &good.1);
    let out = d.reload();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_uid_selector_warns_about_the_uids_processes_outside_the_agent() {
    if !require_root("a_uid_selector_warns_about_the_uids_processes_outside_the_agent") {
        return;
    }
    let agent = unique_agent("warnsel");
    let user = TestUser::new("a");
    let mut outside = Command::new("/usr/bin/setpriv")
        .args([
            &format!("--reuid={}", user.uid),
            &format!("--regid={}", user.gid),
            "--clear-groups",
            "--",
            "/usr/bin/sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let want = format!("pid {} sleep", outside.id());
    let p = identity_policy(&agent, &[], &[], &format!("uids = [{}]", user.uid));
    let dir = policy_dir(&p);
    let out = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "valid, with a warning: {out:?}");
    assert!(
        err.contains(&format!("{}:8:9: warning: uid {}", p.0, user.uid)),
        "{err}"
    );
    assert!(err.contains(&want), "{err}");
    let d = Daemon::start(std::slice::from_ref(&p));
    let log = d.log();
    let _ = outside.kill();
    let _ = outside.wait();
    assert!(log.contains(&want), "{log}");
    assert!(
        log.contains(&format!("they are agent {agent} from now on")),
        "{log}"
    );
}
