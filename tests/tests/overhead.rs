//! What the daemon attaches only while it is needed, because it costs every process on the host:
//! the `sys_enter_socket` tracepoint (any `syscalls/*` tracepoint sends every syscall of every
//! process through the kernel's tracing slow path). Run one at a time (`--test-threads=1`).

use agent_monitor_tests::*;
use serde_json::Value;

const WATCH: &str = "tracepoint syscalls/sys_enter_socket";

fn watch_attached(status: &Value) -> bool {
    status["mechanisms"]["attached"]
        .as_array()
        .expect("status lists what is attached")
        .iter()
        .any(|a| a.as_str().unwrap_or("").contains(WATCH))
}

fn watch_state(status: &Value) -> String {
    status["mechanisms"]["socket_syscall_watch"]
        .as_str()
        .expect("status says whether socket() is watched")
        .to_string()
}

fn plain_policy(agent: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [{PYTHON:?}, \"/usr/bin/python3*\"]\n"
        ),
    )
}

/// Agents started by `run` carry its seccomp filter, so the tracepoint stays off; a process placed
/// by another control client (here python, no filter) turns it on before it becomes the agent,
/// and its vsock socket is reported.
#[test]
fn socket_watch_is_off_for_run_agents_and_on_for_a_foreign_placement() {
    if !require_root("socket_watch_is_off_for_run_agents_and_on_for_a_foreign_placement") {
        return;
    }
    let agent = unique_agent("watch");
    let d = Daemon::start(&[plain_policy(&agent)]);
    let s = d.status();
    assert!(!watch_attached(&s), "attached without need: {s}");
    assert!(watch_state(&s).starts_with("off"), "{s}");

    // A `run` agent: its filter refuses vsock; the watch stays off.
    let out = d.run(
        &agent,
        None,
        &[
            PYTHON,
            "-c",
            "import socket\ntry:\n socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n print('created')\nexcept OSError as e:\n print('errno', e.errno)",
        ],
    );
    assert_eq!(text(&out.stdout).trim(), "errno 1", "{}", text(&out.stderr));
    assert!(
        !watch_attached(&d.status()),
        "a `run` agent turned the watch on"
    );

    let place = format!(
        r#"import json, socket
c = socket.socket(socket.AF_UNIX)
c.connect({sock:?})
c.sendall((json.dumps({{'op': 'place', 'agent': {agent:?}, 'task': 'foreign'}}) + '\n').encode())
answer = c.makefile().readline()
assert 'placed' in answer, answer
c.close()
socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
print('created')
"#,
        sock = d.socket.display().to_string(),
    );
    let out = std::process::Command::new(PYTHON)
        .args(["-c", &place])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "created", "{}", text(&out.stderr));
    let s = d.status();
    assert!(
        watch_attached(&s),
        "foreign placement left the watch off: {s}"
    );
    let state = watch_state(&s);
    assert!(
        state.starts_with("on:") && state.contains("control client"),
        "{state}"
    );
    let rec = d.wait_audit("vsock socket of the foreign placement", |v| {
        v["action"] == "socket"
            && field(v, "socket").starts_with("vsock")
            && field(v, "task_id") == "foreign"
    });
    assert_eq!(field(&rec, "verdict"), "alert");
    assert!(
        d.log().contains("attached agent_socket_syscall"),
        "{}",
        d.log()
    );
}

/// Agents identified by selectors have no filter: the watch is on from the start, and says why.
#[test]
fn socket_watch_is_on_from_the_start_when_a_policy_has_selectors() {
    if !require_root("socket_watch_is_on_from_the_start_when_a_policy_has_selectors") {
        return;
    }
    let agent = unique_agent("watchsel");
    // A uid no one on this host uses: the selector is armed but catches nothing.
    let uid = 250_000 + std::process::id() % 50_000;
    let d = Daemon::start(&[identity_policy(
        &agent,
        &[],
        &[],
        &format!("uids = [{uid}]"),
    )]);
    let s = d.status();
    assert!(watch_attached(&s), "{s}");
    let state = watch_state(&s);
    assert!(
        state.starts_with("on:") && state.contains(&agent),
        "{state}"
    );
}

/// In alert mode `run`'s filter lets other socket families pass, for the watch to report them:
/// on from the start, naming the agent.
#[test]
fn socket_watch_is_on_from_the_start_when_a_policy_is_in_alert_mode() {
    if !require_root("socket_watch_is_on_from_the_start_when_a_policy_is_in_alert_mode") {
        return;
    }
    let agent = unique_agent("watchalert");
    let (name, text) = plain_policy(&agent);
    let d = Daemon::start(&[(name, text.replace("\"enforce\"", "\"alert\""))]);
    let s = d.status();
    assert!(watch_attached(&s), "{s}");
    let state = watch_state(&s);
    assert!(
        state.starts_with("on:") && state.contains("alert mode") && state.contains(&agent),
        "{state}"
    );
}

/// Where `program` is attached, as `status` reports it ("cgroup/… at <path>").
fn attached_at(status: &Value, program: &str) -> String {
    agent_monitor_tests::attached_at(status, program)
        .unwrap_or_else(|| panic!("{program} not attached: {status}"))
}

/// A root process in `cg` (outside the agents' cgroup) tries a raw socket: "ok" or "errno N".
fn raw_socket_in(cg: &TestCgroup) -> String {
    let out = std::process::Command::new(SH)
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {PYTHON} -c \"$0\"",
            cg.path.display()
        ))
        .arg(
            "import socket\ntry:\n socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()\n print('ok')\nexcept OSError as e:\n print('errno', e.errno)",
        )
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

/// The agent-socket hooks (sock_create, the DNS address-restoring recvmsg/getpeername, and the
/// egress program that drops agents' source-routed packets) sit
/// below `<cgroup2>/agent-monitor` while every agent lives there, so other processes' socket()
/// calls run no program; a reload that adds a selector moves them to the root before the selector
/// takes effect (the selected process's raw socket is refused), a restart keeps them where they
/// are, and a reload without selectors moves them back. Each move leaves one link per program.
#[test]
fn agent_socket_hooks_follow_the_selectors_between_agents_cgroup_and_root() {
    if !require_root("agent_socket_hooks_follow_the_selectors_between_agents_cgroup_and_root") {
        return;
    }
    let agent = unique_agent("scope");
    let selected = unique_agent("scopesel");
    let cg = TestCgroup::new(&format!("am-test-{selected}"), "worker");
    let agents_cgroup = cgroup2_root().join("agent-monitor").display().to_string();
    let root = cgroup2_root().display().to_string();
    let hooks = [
        ("agent_sock_create", "cgroup/sock_create"),
        ("agent_recvmsg4", "cgroup/recvmsg4"),
        ("agent_recvmsg6", "cgroup/recvmsg6"),
        ("agent_getpeername4", "cgroup/getpeername4"),
        ("agent_getpeername6", "cgroup/getpeername6"),
        ("agent_egress", "cgroup_skb/egress"),
    ];
    let assert_all_at = |d: &Daemon, at: &str, when: &str| {
        let s = &d.status();
        for (program, hook) in hooks {
            assert_eq!(
                attached_at(s, program),
                format!("{hook} at {at}"),
                "{when}: {s}\n{}",
                d.log()
            );
        }
        // The address hooks never move.
        assert_eq!(
            attached_at(s, "agent_connect4"),
            format!("cgroup/connect4 at {root}"),
            "{when}"
        );
        // One kernel link per pinned program: a move leaves no second attachment behind.
        let ids: Vec<u64> = s["mechanisms"]["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["program_id"].as_u64().unwrap())
            .collect();
        assert_eq!(kernel_links_of(&ids).len(), ids.len(), "{when}: {s}");
    };

    let mut d = Daemon::start(&[plain_policy(&agent)]);
    assert_all_at(&d, &agents_cgroup, "no selectors");
    // Still judged where agents live: a `run` agent's raw socket is refused.
    let out = d.run(
        &agent,
        None,
        &[
            PYTHON,
            "-c",
            "import socket\ntry:\n socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n print('ok')\nexcept OSError as e:\n print('errno', e.errno)",
        ],
    );
    assert_eq!(text(&out.stdout).trim(), "errno 1", "{}", text(&out.stderr));
    // Not an agent yet: the process in the test cgroup may (it is root).
    assert_eq!(raw_socket_in(&cg), "ok");

    let (name, body) = identity_policy(
        &selected,
        &[],
        &[PYTHON, SH],
        &format!("cgroups = [{:?}]", cg.rel),
    );
    d.write_policy(&name, &body);
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_all_at(&d, &root, "after a reload adding a cgroup selector");
    assert_eq!(
        raw_socket_in(&cg),
        "errno 1",
        "the selected process's raw socket passed: sock_create did not see it"
    );
    assert!(
        d.log().contains("moved agent_sock_create from"),
        "{}",
        d.log()
    );

    // A restart adopts the hooks where they are; meanwhile they keep refusing.
    d.kill9();
    assert_eq!(raw_socket_in(&cg), "errno 1", "while no daemon ran");
    d.spawn();
    assert_all_at(&d, &root, "after kill -9 and restart");
    assert_eq!(raw_socket_in(&cg), "errno 1", "after the restart");

    std::fs::remove_file(d.policies.join(&name)).unwrap();
    assert!(d.reload().status.success(), "reload failed: {}", d.log());
    assert_all_at(&d, &agents_cgroup, "after the selector went");
    assert_eq!(raw_socket_in(&cg), "ok", "no longer an agent");
}
