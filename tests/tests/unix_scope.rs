//! Where the unix-socket hooks (`cgroup/connect_unix`, `cgroup/sendmsg_unix`) sit and when: below
//! the agents' cgroup, so a process outside every agent runs no program on its unix connects; at
//! the cgroup root while `[identity]` selectors can make any process an agent; and attached only
//! while a policy in force has a `[unix]` section. Each placement is checked by what processes
//! experience (an agent refused, a process outside every agent not) and by the kernel's own run
//! count of the program. Run one at a time (`--test-threads=1`): kernel state is shared.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use agent_monitor_tests::*;
use serde_json::Value;

/// Connects a unix stream socket to argv[1]: prints `ok` or `errno N`.
const PY_CONNECT: &str = r#"import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print('ok')
except OSError as e:
    print('errno', e.errno)
"#;

const REFUSED: &str = "errno 1";

/// A policy whose agent may run python3 and sh, with `unix` (a `[unix]` section's body, or
/// nothing: no section).
fn policy(agent: &str, unix: Option<&str>) -> (String, String) {
    let unix = unix.map(|u| format!("[unix]\n{u}\n")).unwrap_or_default();
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [\"/usr/bin/python3*\", {SH:?}, \"/usr/bin/sh\"]\n{unix}"
        ),
    )
}

fn allow(path: &Path) -> String {
    format!("allow = [{:?}]", path.display().to_string())
}

/// Two listening pathname sockets (`allowed.sock`, `other.sock`) in a directory everyone may
/// enter; connections are accepted and dropped by a thread until the test process ends.
struct Sockets {
    _dir: tempfile::TempDir,
    allowed: PathBuf,
    other: PathBuf,
}

impl Sockets {
    fn new() -> Sockets {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let mut paths = Vec::new();
        for name in ["allowed.sock", "other.sock"] {
            let path = dir.path().join(name);
            let listener = UnixListener::bind(&path).expect("binding a unix socket");
            std::thread::spawn(move || {
                for c in listener.incoming() {
                    drop(c);
                }
            });
            paths.push(path);
        }
        Sockets {
            allowed: paths[0].clone(),
            other: paths[1].clone(),
            _dir: dir,
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// python3 connecting to `path` from cgroup `cg` (a process outside the agents' cgroup).
fn connect_in(cg: &TestCgroup, path: &Path) -> String {
    let out = Command::new(SH)
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {PYTHON} -c \"$0\" \"$1\"",
            cg.path.display()
        ))
        .arg(PY_CONNECT)
        .arg(path)
        .output()
        .expect("running python3 in a test cgroup");
    text(&out.stdout).trim().to_string()
}

/// python3 connecting to `path` as a `run` agent.
fn connect_as(d: &Daemon, agent: &str, path: &Path) -> String {
    let out = d.run(agent, None, &[PYTHON, "-c", PY_CONNECT, path_str(path)]);
    let said = text(&out.stdout).trim().to_string();
    assert!(
        !said.is_empty(),
        "the agent printed nothing: {}",
        text(&out.stderr)
    );
    said
}

fn unix_hooks_state(status: &Value) -> String {
    status["mechanisms"]["unix_socket_hooks"]
        .as_str()
        .expect("status says whether the unix-socket hooks are attached")
        .to_string()
}

/// Both unix hooks are attached at `at` (and one kernel link each), or neither is (`None`).
fn assert_unix_hooks(d: &Daemon, at: Option<&str>, when: &str) {
    let s = d.status();
    for (program, hook) in [
        ("agent_connect_unix", "cgroup/connect_unix"),
        ("agent_sendmsg_unix", "cgroup/sendmsg_unix"),
    ] {
        assert_eq!(
            attached_at(&s, program),
            at.map(|at| format!("{hook} at {at}")),
            "{when}: {s}\n{}",
            d.log()
        );
        let id = u64::from(program_info(d, program).id());
        let links = kernel_links_of(&[id]).len();
        assert_eq!(
            links,
            usize::from(at.is_some()),
            "{when}: links of {program}"
        );
    }
    let state = unix_hooks_state(&s);
    let want = if at.is_some() { "on:" } else { "off:" };
    assert!(state.starts_with(want), "{when}: {state}");
}

/// The pinned (loaded, maybe unattached) program's kernel information.
fn program_info(d: &Daemon, program: &str) -> aya::programs::ProgramInfo {
    let pin = d.pin_dir.join("programs").join(program);
    aya::programs::ProgramInfo::from_pin(&pin)
        .unwrap_or_else(|e| panic!("no pinned program {}: {e}", pin.display()))
}

/// How many times the kernel ran `agent_connect_unix` (counted while `_stats` is held).
fn connect_unix_runs(d: &Daemon) -> u64 {
    program_info(d, "agent_connect_unix").run_count()
}

fn agents_cgroup() -> String {
    cgroup2_root().join("agent-monitor").display().to_string()
}

fn root_cgroup() -> String {
    cgroup2_root().display().to_string()
}

/// With only `run` agents the hooks sit below the agents' cgroup: a process outside every agent
/// connects to a socket off the agent's list and the kernel does not even run the program
/// (control: the agent's connect runs it and is refused). A reload adding a selector-identified
/// agent whose `[unix]` list refuses moves them to the root: that agent (a process in a cgroup
/// outside the agents' one) gets EPERM, the run agent still does, the outside process still
/// connects (now judged: not an agent). A kill -9 and restart keeps them at the root and
/// refusing; removing the selector brings them back.
#[test]
fn unix_hooks_sit_below_the_agents_and_move_to_the_root_for_selectors() {
    if !require_root("unix_hooks_sit_below_the_agents_and_move_to_the_root_for_selectors") {
        return;
    }
    let socks = Sockets::new();
    let agent = unique_agent("uscope");
    let selected = unique_agent("uscopesel");
    let selected_cg = TestCgroup::new(&format!("am-test-{selected}"), "worker");
    let outside_cg = TestCgroup::new(&format!("am-test-{agent}"), "outside");
    let mut d = Daemon::start(&[policy(&agent, Some(&allow(&socks.allowed)))]);
    assert_unix_hooks(&d, Some(&agents_cgroup()), "run agents only");

    // The kernel counts program runs only while someone holds a stats fd.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let before = connect_unix_runs(&d);
    assert_eq!(connect_in(&outside_cg, &socks.other), "ok");
    let out = Command::new(PYTHON)
        .args(["-c", PY_CONNECT, path_str(&socks.other)])
        .output()
        .expect("python3");
    assert_eq!(text(&out.stdout).trim(), "ok", "the test's own cgroup");
    assert_eq!(
        connect_unix_runs(&d),
        before,
        "a process outside every agent ran the unix hook"
    );
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED);
    assert_eq!(connect_as(&d, &agent, &socks.allowed), "ok");
    // Under `run` the supervisor judges the agent's pathname connects on the resolved socket
    // (refused ones never reach the kernel); the allowed one is made on the agent's own socket,
    // created in the agents' cgroup, so the hook there runs for it.
    assert!(
        connect_unix_runs(&d) >= before + 1,
        "the agent's connects did not run the unix hook"
    );
    // Not an agent yet.
    assert_eq!(connect_in(&selected_cg, &socks.other), "ok");

    let (name, body) = identity_policy(
        &selected,
        &[],
        &[PYTHON, "/usr/bin/python3*", SH],
        &format!("cgroups = [{:?}]", selected_cg.rel),
    );
    d.write_policy(&name, &format!("{body}[unix]\nallow = []\n"));
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_unix_hooks(
        &d,
        Some(&root_cgroup()),
        "after a reload adding a cgroup selector",
    );
    assert_eq!(
        connect_in(&selected_cg, &socks.other),
        REFUSED,
        "the selected agent's unix connect passed: the hook did not see its socket"
    );
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED);
    assert_eq!(connect_as(&d, &agent, &socks.allowed), "ok");
    // At the root the outside process runs the program, which lets it through.
    let before = connect_unix_runs(&d);
    assert_eq!(connect_in(&outside_cg, &socks.other), "ok");
    assert!(
        connect_unix_runs(&d) > before,
        "the root placement did not run the hook"
    );

    // A restart adopts them where they are; meanwhile they keep refusing.
    d.kill9();
    assert_eq!(connect_in(&selected_cg, &socks.other), REFUSED, "no daemon");
    d.spawn();
    assert_unix_hooks(&d, Some(&root_cgroup()), "after kill -9 and restart");
    assert_eq!(connect_in(&selected_cg, &socks.other), REFUSED, "restarted");
    assert_eq!(connect_in(&outside_cg, &socks.other), "ok", "restarted");

    std::fs::remove_file(d.policies.join(&name)).unwrap();
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_unix_hooks(&d, Some(&agents_cgroup()), "after the selector went");
    assert_eq!(
        connect_in(&selected_cg, &socks.other),
        "ok",
        "no longer an agent"
    );
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED);
    let before = connect_unix_runs(&d);
    assert_eq!(connect_in(&outside_cg, &socks.other), "ok");
    assert_eq!(
        connect_unix_runs(&d),
        before,
        "back below the agents' cgroup"
    );
}

/// Without a `[unix]` section in any policy the hooks are loaded but not attached (an agent's
/// unix connects are unjudged, as the policy says); a reload that adds one attaches them before
/// it is in force, a restart keeps them, and a reload that removes it detaches them again.
#[test]
fn unix_hooks_are_attached_only_while_a_policy_has_a_unix_section() {
    if !require_root("unix_hooks_are_attached_only_while_a_policy_has_a_unix_section") {
        return;
    }
    let socks = Sockets::new();
    let agent = unique_agent("uwhen");
    let mut d = Daemon::start(&[policy(&agent, None)]);
    assert_unix_hooks(&d, None, "no [unix] section");
    assert_eq!(connect_as(&d, &agent, &socks.other), "ok");

    let (name, body) = policy(&agent, Some(&allow(&socks.allowed)));
    d.write_policy(&name, &body);
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_unix_hooks(&d, Some(&agents_cgroup()), "after a reload adding [unix]");
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED);
    assert_eq!(connect_as(&d, &agent, &socks.allowed), "ok");

    d.kill9();
    d.spawn();
    assert_unix_hooks(&d, Some(&agents_cgroup()), "after kill -9 and restart");
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED, "restarted");

    let (name, body) = policy(&agent, None);
    d.write_policy(&name, &body);
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_unix_hooks(&d, None, "after a reload removing [unix]");
    assert_eq!(connect_as(&d, &agent, &socks.other), "ok");
    assert!(
        d.log().contains("detached agent_connect_unix"),
        "{}",
        d.log()
    );
}

/// A python agent loop connecting to `path` every 50 ms for `secs` seconds, one line per try.
const PY_CONNECT_LOOP: &str = r#"import socket, sys, time
end = time.time() + float(sys.argv[2])
while time.time() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
        print('ok', flush=True)
    except OSError as e:
        print('errno', e.errno, flush=True)
    s.close()
    time.sleep(0.05)
"#;

/// The program ids of the pinned links of the unix hooks, as `status` lists them.
fn unix_program_ids(status: &Value) -> Vec<u64> {
    status["mechanisms"]["links"]
        .as_array()
        .expect("status lists the pinned links")
        .iter()
        .filter(|l| {
            let p = l["program"].as_str().unwrap_or("");
            p == "agent_connect_unix" || p == "agent_sendmsg_unix"
        })
        .map(|l| l["program_id"].as_u64().unwrap())
        .collect()
}

/// An upgrade (pins of another build) replaces the attached unix hooks with the new build's,
/// attached where the old ones were before the old ones go: a running agent's connect to a
/// socket off its list is refused at every try through the stop, the time without a daemon and
/// the replacement, and no link of the old unix programs is left.
#[test]
fn an_upgrade_replaces_the_unix_hooks_without_a_gap() {
    if !require_root("an_upgrade_replaces_the_unix_hooks_without_a_gap") {
        return;
    }
    let socks = Sockets::new();
    let agent = unique_agent("uupgrade");
    let mut d = Daemon::start(&[policy(&agent, Some(&allow(&socks.allowed)))]);
    let old = unix_program_ids(&d.status());
    assert_eq!(old.len(), 2, "{}", d.status());
    let agent_loop = d.spawn_run(
        &agent,
        "up",
        &[],
        &[PYTHON, "-c", PY_CONNECT_LOOP, path_str(&socks.other), "5"],
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    d.restart_as_another_build();
    let out = agent_loop.wait_with_output().unwrap();
    let tries: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert!(tries.len() >= 40, "{tries:?} {}", text(&out.stderr));
    assert!(
        tries.iter().all(|t| t == REFUSED),
        "a connect off the list got through the upgrade: {tries:?}"
    );
    let st = d.status();
    assert_eq!(st["origin"]["replaced_build"], true, "{st:#}");
    assert_unix_hooks(&d, Some(&agents_cgroup()), "after the upgrade");
    let new = unix_program_ids(&st);
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "old {old:?} new {new:?}"
    );
    assert!(
        kernel_links_of(&old).is_empty(),
        "the old build's unix hooks are still attached"
    );
    assert_eq!(connect_as(&d, &agent, &socks.other), REFUSED);
    assert_eq!(connect_as(&d, &agent, &socks.allowed), "ok");
}
