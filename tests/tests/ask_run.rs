//! Ask mode, `run`'s side (docs/ask-run.md): an ask-mode agent's connects, datagrams and execs
//! are held in `run`'s seccomp supervisor until `agent-monitor approve`/`deny` or the ask
//! timeout, and the kernel judges each released call again (the address or file swapped after
//! approval is refused). These tests need the daemon's side of ask mode (`mode = "ask"`,
//! `pending`, `approve`, `deny`, `--ask-timeout`). Run one at a time (`--test-threads=1`).

use std::io::BufRead as _;
use std::process::Child;
use std::time::{Duration, Instant};

use agent_monitor_tests::*;
use serde_json::Value;

fn ask_policy(agent: &str, net: &[&str], exec: &[&str]) -> (String, String) {
    mode_policy(agent, "ask", net, exec)
}

/// Every held request `pending --json` lists.
fn pending(d: &Daemon) -> Vec<Value> {
    pending_requests(d)
}

/// Waits (up to 10 s) for a held request of `agent` matching `pred`; returns its id.
fn wait_pending(d: &Daemon, agent: &str, what: &str, pred: impl Fn(&Value) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = pending(d);
        if let Some(r) = all
            .iter()
            .find(|r| r["agent"] == agent && pred(&r["action"]))
        {
            return r["id"].as_u64().expect("a request id");
        }
        if Instant::now() > deadline {
            panic!(
                "no held request {what} within 10 s; pending: {all:#?}\ndaemon log:\n{}",
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_connect(a: &Value, transport: &str, port: u16) -> bool {
    a["kind"] == "connect" && a["transport"] == transport && a["port"] == port
}

fn is_exec(a: &Value, path: &str) -> bool {
    a["kind"] == "exec" && a["path"] == path
}

/// The agent is still waiting: its `run` has not exited.

/// `run` of python connecting to 127.0.0.1:PORT as `agent`, task t1, not waited for.
fn spawn_py_connect(d: &Daemon, agent: &str, port: u16) -> Child {
    d.spawn_run(
        agent,
        "t1",
        &[],
        &[PYTHON, "-c", &py_connect("127.0.0.1", port)],
    )
}

fn approve_once(d: &Daemon, id: u64) {
    let out = d.cli(&["approve", &id.to_string(), "--once"]);
    assert!(
        out.status.success(),
        "approve {id} --once: {}",
        text(&out.stderr)
    );
}

#[test]
fn off_list_tcp_connect_is_held_until_approved_once() {
    if !require_root("off_list_tcp_connect_is_held_until_approved_once") {
        return;
    }
    let agent = unique_agent("ask-tcp");
    let server = CountingListener::bind("127.0.0.1:0");
    // Control: the same connect from outside any agent connects.
    let out = std::process::Command::new(PYTHON)
        .args(["-c", &py_connect("127.0.0.1", server.port)])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "connected");
    let d = Daemon::start(&[ask_policy(&agent, &[], &[PYTHON])]);
    let started = Instant::now();
    let mut child = spawn_py_connect(&d, &agent, server.port);
    let id = wait_pending(&d, &agent, "for the connect", |a| {
        is_connect(a, "tcp", server.port) && a["address"] == "127.0.0.1"
    });
    still_held(&mut child);
    approve_once(&d, id);
    let out = wait_released(child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "connected");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Once: the next run of the same connect is held again (and denied here).
    let mut child = spawn_py_connect(&d, &agent, server.port);
    let id2 = wait_pending(&d, &agent, "for the second connect", |a| {
        is_connect(a, "tcp", server.port)
    });
    assert_ne!(id, id2);
    still_held(&mut child);
    let out = d.cli(&["deny", &id2.to_string(), "--reason", "test"]);
    assert!(out.status.success(), "deny: {}", text(&out.stderr));
    let out = wait_released(child);
    assert_eq!(
        text(&out.stdout).trim(),
        "errno 1",
        "a denied connect is EPERM"
    );
}

#[test]
fn udp_datagram_is_held_until_approved() {
    if !require_root("udp_datagram_is_held_until_approved") {
        return;
    }
    let agent = unique_agent("ask-udp");
    let sink = UdpSink::bind("127.0.0.1:0");
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         try:\n  print('sent',s.sendto(b'hello',('127.0.0.1',{})))\n\
         except OSError as e:\n  print('errno',e.errno)",
        sink.port
    );
    let d = Daemon::start(&[ask_policy(&agent, &[], &[PYTHON])]);
    let mut child = d.spawn_run(&agent, "t1", &[], &[PYTHON, "-c", &script]);
    let id = wait_pending(&d, &agent, "for the datagram", |a| {
        is_connect(a, "udp", sink.port)
    });
    still_held(&mut child);
    assert_eq!(sink.received(), 0, "nothing left before the approval");
    approve_once(&d, id);
    let out = wait_released(child);
    assert_eq!(text(&out.stdout).trim(), "sent 5", "{}", text(&out.stderr));
    assert_eq!(sink.received(), 1);
}

/// An ask-mode agent running `sh -c "TOOL; echo rc=$?"` with TOOL a copy of /bin/true off its
/// list, held: (daemon, temp dir, TOOL, the agent's run, the request id). `control`:
/// first show TOOL runs outside agents.
fn held_exec(
    label: &str,
    control: bool,
) -> (Daemon, tempfile::TempDir, std::path::PathBuf, Child, u64) {
    let agent = unique_agent(label);
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("off-list-tool");
    std::fs::copy("/bin/true", &tool).unwrap();
    let tool_s = tool.display().to_string();
    let cmd = format!("{tool_s}; echo rc=$?");
    if control {
        let out = std::process::Command::new(SH)
            .args(["-c", &cmd])
            .output()
            .unwrap();
        assert_eq!(text(&out.stdout).trim(), "rc=0");
    }
    let d = Daemon::start(&[ask_policy(&agent, &[], &[SH])]);
    let child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &cmd]);
    let id = wait_pending(&d, &agent, "for the exec", |a| is_exec(a, &tool_s));
    (d, dir, tool, child, id)
}

#[test]
fn off_list_exec_is_held_until_approved() {
    if !require_root("off_list_exec_is_held_until_approved") {
        return;
    }
    let (d, dir, tool, mut child, id) = held_exec("ask-exec", true);
    let held = pending(&d)
        .into_iter()
        .find(|r| r["id"] == id)
        .expect("the request");
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&tool).unwrap();
    assert_eq!(held["action"]["inode"], meta.ino(), "{held:#}");
    still_held(&mut child);
    approve_once(&d, id);
    let out = wait_released(child);
    drop(dir);
    assert_eq!(text(&out.stdout).trim(), "rc=0", "{}", text(&out.stderr));
}

#[test]
fn exec_file_swapped_while_held_is_refused_by_the_kernel() {
    if !require_root("exec_file_swapped_while_held_is_refused_by_the_kernel") {
        return;
    }
    let (d, dir, tool, mut child, id) = held_exec("ask-swap", false);
    still_held(&mut child);
    // The request names the file run resolved (device, inode); another file takes its path
    // before the decision.
    let other = dir.path().join("other");
    std::fs::copy("/bin/true", &other).unwrap();
    std::fs::rename(&other, &tool).unwrap();
    // The daemon checks the file again before it writes the approval's entry: another inode at
    // the path, so the approval is refused and becomes a denial.
    let out = d.cli(&["approve", &id.to_string(), "--once"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains("changed since the call was held"),
        "approve of a swapped file: {said}"
    );
    let out = wait_released(child);
    assert_eq!(
        text(&out.stdout).trim(),
        "rc=126",
        "the swapped file ran: {}",
        text(&out.stderr)
    );
}

/// `sh -c 'echo $$ > CGROUP/cgroup.procs && exec TOOL'`: a process that joins the task's cgroup
/// without `run` (so without its seccomp filter: nothing holds or asks, the kernel alone judges
/// its exec with the task's grants) and execs TOOL. Its exit status.
fn exec_in_task_cgroup_without_run(
    cgroup: &std::path::Path,
    tool: &str,
) -> std::process::ExitStatus {
    let script = format!("echo $$ > {}/cgroup.procs && exec {tool}", cgroup.display());
    std::process::Command::new(SH)
        .args(["-c", &script])
        .status()
        .unwrap()
}

#[test]
fn exec_file_swapped_after_a_task_approval_is_refused_by_the_kernel() {
    if !require_root("exec_file_swapped_after_a_task_approval_is_refused_by_the_kernel") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::ExitStatusExt as _;
    let agent = unique_agent("ask-swap-after");
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("off-list-tool");
    std::fs::copy("/bin/true", &tool).unwrap();
    let tool_s = tool.display().to_string();
    // Control: TOOL runs outside agents.
    assert!(
        std::process::Command::new(&tool)
            .status()
            .unwrap()
            .success()
    );
    let go = dir.path().join("go");
    let go_c = std::ffi::CString::new(go.display().to_string()).unwrap();
    // SAFETY: mkfifo(3) of a path in our own temporary directory.
    assert_eq!(unsafe { libc::mkfifo(go_c.as_ptr(), 0o600) }, 0);
    let d = Daemon::start(&[ask_policy(&agent, &[], &[SH])]);
    // The agent runs TOOL, waits for the test, runs TOOL again.
    let cmd = format!(
        "{tool_s}; echo rc=$?; read x < {}; {tool_s}; echo rc2=$?",
        go.display()
    );
    let mut child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &cmd]);
    let id = wait_pending(&d, &agent, "for the exec", |a| is_exec(a, &tool_s));
    let out = d.cli(&["approve", &id.to_string(), "--task"]);
    assert!(
        out.status.success(),
        "approve --task: {}",
        text(&out.stderr)
    );
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "rc=0", "the approved exec did not run");
    let status = d.status().to_string();
    assert!(
        status.contains("approved by ask request"),
        "status lists the approval among the task's grants: {status}"
    );

    // The approval is a kernel grant of the task for that file: a process of the task that
    // `run` does not hold runs it, judged by the kernel alone (TOOL is not on the list).
    let cgroup = cgroup2_root().join(format!("agent-monitor/{agent}/t1"));
    let ran = exec_in_task_cgroup_without_run(&cgroup, &tool_s);
    assert!(
        ran.success(),
        "the approved file under the task grant: {ran:?}"
    );

    // Another file takes TOOL's path after the approval and the release.
    let held_inode = std::fs::metadata(&tool).unwrap().ino();
    let other = dir.path().join("other");
    std::fs::copy("/bin/true", &other).unwrap();
    std::fs::rename(&other, &tool).unwrap();
    let new_inode = std::fs::metadata(&tool).unwrap().ino();
    assert_ne!(held_inode, new_inode);
    // The kernel refuses it: the grant names the approved file, not the path (killed before its
    // first instruction, as an off-list exec of an ask-mode agent is).
    let refused = exec_in_task_cgroup_without_run(&cgroup, &tool_s);
    assert_eq!(
        refused.signal(),
        Some(libc::SIGKILL),
        "the swapped file under the task grant: {refused:?}\n{}",
        d.log()
    );
    // And `run` asks again for the new file instead of letting it through.
    std::fs::write(&go, "go\n").unwrap();
    let again = wait_pending(&d, &agent, "for the swapped file", |a| {
        is_exec(a, &tool_s) && a["inode"] == new_inode
    });
    assert_ne!(again, id);
    let out = d.cli(&["deny", &again.to_string()]);
    assert!(out.status.success(), "deny: {}", text(&out.stderr));
    let mut rest = String::new();
    stdout.read_line(&mut rest).unwrap();
    let out = wait_released(child);
    assert_eq!(rest.trim(), "rc2=126", "{}", text(&out.stderr));
}

/// A C agent whose second thread changes the connect's address while the connect is held:
/// the approval was for the first address; the kernel sees the second and refuses it.
const SWAP_ADDRESS: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static struct sockaddr_in addr;
static int second_port;
static void *swap(void *arg) {
    usleep(300000);
    addr.sin_port = htons(second_port);
    printf("swapped\n");
    fflush(stdout);
    return NULL;
}
int main(int argc, char **argv) {
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    second_port = atoi(argv[2]);
    pthread_t t;
    pthread_create(&t, NULL, swap, NULL);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int r = connect(s, (struct sockaddr *)&addr, sizeof addr);
    printf("%s %d\n", r == 0 ? "connected" : "errno", r == 0 ? 0 : errno);
    return 0;
}
"#;

#[test]
fn connect_address_swapped_while_held_is_refused_by_the_kernel() {
    if !require_root("connect_address_swapped_while_held_is_refused_by_the_kernel") {
        return;
    }
    let agent = unique_agent("ask-addr");
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "swap_address", SWAP_ADDRESS);
    let bin_s = bin.display().to_string();
    let first = CountingListener::bind("127.0.0.1:0");
    let second = CountingListener::bind("127.0.0.1:0");
    let d = Daemon::start(&[ask_policy(&agent, &[], &[&bin_s])]);
    let mut child = d.spawn_run(
        &agent,
        "t1",
        &[],
        &[&bin_s, &first.port.to_string(), &second.port.to_string()],
    );
    let id = wait_pending(&d, &agent, "for the first address", |a| {
        is_connect(a, "tcp", first.port)
    });
    // Wait for the swap to have happened in the agent's memory before approving.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "swapped");
    approve_once(&d, id);
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    let status = wait_released(child);
    assert_eq!(rest.trim(), "errno 1", "{}", text(&status.stderr));
    assert_eq!(second.accepted(), 0, "the swapped address was not reached");
}

#[test]
fn held_call_times_out_with_eperm() {
    if !require_root("held_call_times_out_with_eperm") {
        return;
    }
    let agent = unique_agent("ask-timeout");
    let port = listener_v4();
    let d = Daemon::start_with(
        &[ask_policy(&agent, &[], &[PYTHON])],
        &["--ask-timeout", "2s"],
    );
    let started = Instant::now();
    let child = spawn_py_connect(&d, &agent, port);
    wait_pending(&d, &agent, "for the connect", |a| {
        is_connect(a, "tcp", port)
    });
    let out = wait_released(child);
    assert_eq!(text(&out.stdout).trim(), "errno 1", "{}", text(&out.stderr));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
}

#[test]
fn on_list_actions_are_not_held() {
    if !require_root("on_list_actions_are_not_held") {
        return;
    }
    let agent = unique_agent("ask-onlist");
    let port = listener_v4();
    let allowed = format!("127.0.0.1:{port}");
    let d = Daemon::start(&[ask_policy(&agent, &[&allowed], &[PYTHON, SH, "/bin/true"])]);
    let script = format!(
        "{}\nimport subprocess\nprint('true', subprocess.call(['/bin/true']))",
        py_connect("127.0.0.1", port)
    );
    let started = Instant::now();
    let out = d.run(&agent, Some("t1"), &[PYTHON, "-c", &script]);
    assert_eq!(
        text(&out.stdout).trim(),
        "connected\ntrue 0",
        "{}",
        text(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(pending(&d).iter().all(|r| r["agent"] != agent.as_str()));
}

#[test]
fn daemon_gone_refuses_held_calls() {
    if !require_root("daemon_gone_refuses_held_calls") {
        return;
    }
    let agent = unique_agent("ask-restart");
    let port = listener_v4();
    let mut d = Daemon::start(&[ask_policy(&agent, &[], &[PYTHON])]);
    let child = spawn_py_connect(&d, &agent, port);
    wait_pending(&d, &agent, "for the connect", |a| {
        is_connect(a, "tcp", port)
    });
    d.kill9();
    let out = wait_released(child);
    // Never released unjudged: refused when the channel broke.
    assert_eq!(text(&out.stdout).trim(), "errno 1", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("held calls refused"),
        "{}",
        text(&out.stderr)
    );
}

/// `run` judges calls on the agent's own list itself, with the copy the daemon sends on the ask
/// channel; a reload that removes a rule reaches that copy, so the next such call is asked
/// again (not let through to the kernel's refusal).
#[test]
fn a_reload_reaches_runs_copy_of_the_allowlist() {
    if !require_root("a_reload_reaches_runs_copy_of_the_allowlist") {
        return;
    }
    let agent = unique_agent("ask-reload");
    let server = CountingListener::bind("127.0.0.1:0");
    let allowed = format!("127.0.0.1:{}", server.port);
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let go_c = std::ffi::CString::new(go.display().to_string()).unwrap();
    // SAFETY: mkfifo(3) of a path in our own temporary directory.
    assert_eq!(unsafe { libc::mkfifo(go_c.as_ptr(), 0o600) }, 0);
    let (name, on_list) = ask_policy(&agent, &[&allowed], &[PYTHON, SH]);
    let d = Daemon::start(&[(name.clone(), on_list)]);
    let connect = py_connect("127.0.0.1", server.port);
    let cmd = format!(
        "{PYTHON} -c \"$0\"; read x < {}; {PYTHON} -c \"$0\"",
        go.display()
    );
    let mut child = d.spawn_run(&agent, "t1", &[], &[SH, "-c", &cmd, &connect]);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected", "on the list: not held");
    assert!(pending(&d).iter().all(|r| r["agent"] != agent.as_str()));
    // The rule goes.
    let (_, off_list) = ask_policy(&agent, &[], &[PYTHON, SH]);
    d.write_policy(&name, &off_list);
    let out = d.reload();
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    std::fs::write(&go, "go\n").unwrap();
    let id = wait_pending(
        &d,
        &agent,
        "for the connect the reload took off the list",
        |a| is_connect(a, "tcp", server.port),
    );
    approve_once(&d, id);
    let mut rest = String::new();
    stdout.read_line(&mut rest).unwrap();
    let out = wait_released(child);
    assert_eq!(rest.trim(), "connected", "{}", text(&out.stderr));
}
