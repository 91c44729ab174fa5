//! Root agents: `run` without `--user` keeps uid 0 but drops the capabilities that let the agent
//! leave or undo its confinement, sets no_new_privs, confines writes beneath /proc, /sys and /dev
//! with Landlock, and refuses clone3 and bpf; `status` says what each agent holds;
//! `--keep-capabilities` keeps everything, with a warning. Each refusal has its control: the same
//! root process outside every agent succeeds.
//!
//! Nothing here can hurt the host if a refusal failed: core_pattern is written with its current
//! value, the cgroup moved into is one the test made, the tmpfs is unmounted at once, the block
//! device is a loop device over a file of the test's, opened and closed without a write, and
//! the BPF program loaded is `return 0`.

use std::process::Command;

use agent_monitor_tests::*;
use serde_json::Value;

fn policy(agent: &str, exec: &[&str]) -> (String, String) {
    let exec: Vec<String> = exec.iter().map(|s| format!("{s:?}")).collect();
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\nallow = [{}]\n",
            exec.join(", ")
        ),
    )
}

fn errno(n: i32) -> String {
    format!("errno {n}")
}

/// Every route a capless uid 0 might take out; each prints `name ok` or `name errno N`, and the
/// status lines as `CapEff 000…`.
const ROUTES: &str = r#"import os, sys, ctypes, struct, socket, stat
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(name, f):
    try:
        f()
        print(name, 'ok', flush=True)
    except OSError as e:
        print(name, 'errno', e.errno, flush=True)
for l in open('/proc/self/status'):
    if l.startswith(('Cap', 'NoNewPrivs')):
        k, v = l.split(':', 1)
        print(k, v.strip(), flush=True)
def mount():
    if libc.mount(b'none', b'@MNT@', b'tmpfs', 0, None) != 0:
        raise OSError(ctypes.get_errno(), 'mount')
    libc.umount2(b'@MNT@', 0)
attempt('mount', mount)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr + bytes(128 - len(attr)))
    fd = libc.syscall(321, cmd, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), 'bpf')
    os.close(fd)
# BPF_PROG_LOAD of a socket filter `r0 = 0; exit`.
insns = ctypes.create_string_buffer(struct.pack('<BBhiBBhi', 0xb7, 0, 0, 0, 0x95, 0, 0, 0))
lic = ctypes.create_string_buffer(b'GPL')
attempt('prog_load', lambda: bpf(5, struct.pack('<IIQQ', 1, 2, ctypes.addressof(insns), ctypes.addressof(lic))))
# BPF_OBJ_GET of one of the daemon's pinned maps, read-write.
pin = ctypes.create_string_buffer(b'@PIN@')
attempt('pinned_map', lambda: bpf(7, struct.pack('<QII', ctypes.addressof(pin), 0, 0)))
def procs(cg):
    with open(cg + '/cgroup.procs', 'w') as f:
        f.write(str(os.getpid()))
if '@AGENT@' == '1':
    attempt('procs_root', lambda: procs('@ROOT@'))
def clone3(cg):
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    # struct clone_args: flags = CLONE_INTO_CGROUP, exit_signal = SIGCHLD, cgroup = fd
    args = ctypes.create_string_buffer(struct.pack('QQQQQQQQQQQ', 0x200000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, fd))
    pid = libc.syscall(435, args, 88)
    if pid == 0:
        os._exit(0)
    os.close(fd)
    if pid < 0:
        raise OSError(ctypes.get_errno(), 'clone3')
    os.waitpid(pid, 0)
attempt('clone3_into_cgroup', lambda: clone3('@TESTCG@'))
attempt('procs_test', lambda: procs('@TESTCG@'))
def core_pattern():
    v = open('/proc/sys/kernel/core_pattern').read()
    with open('/proc/sys/kernel/core_pattern', 'w') as f:
        f.write(v)
attempt('core_pattern', core_pattern)
def blockdev():
    fd = os.open('@BLK@', os.O_WRONLY)
    os.close(fd)
if '@BLK@':
    attempt('block_device', blockdev)
attempt('raw_socket', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
# IP source routing (LSRR via 10.9.9.9): a datagram judged for its destination would go to the
# first hop instead. Set only, never sent.
def lsrr():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([131, 7, 4]) + socket.inet_aton('10.9.9.9') + bytes([1]))
    s.close()
attempt('source_route', lsrr)
attempt('fork', lambda: os.waitpid(os.fork() or os._exit(0), 0))
# The daemon's own files: opened for appending (nothing written), a new file in the policy
# directory (removed at once), the control socket unlinked (agent only: the daemon needs it).
def append(path):
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
attempt('policy_append', lambda: append('@POLICY@'))
attempt('trail_append', lambda: append('@TRAIL@'))
def policy_create():
    with open('@POLICYDIR@/probe.txt', 'w') as f:
        f.write('x')
    os.unlink('@POLICYDIR@/probe.txt')
attempt('policy_create', policy_create)
if '@AGENT@' == '1':
    attempt('socket_unlink', lambda: os.unlink('@SOCKET@'))
def tmp_write():
    with open('@MNT@/written', 'w') as f:
        f.write('x')
attempt('tmp_write', tmp_write)
"#;

/// A loop device over a 1 MiB file of the test's, detached on drop: a block device nobody has
/// mounted (the kernel refuses writers of mounted ones to everyone), so the control can open it.
struct LoopDevice {
    path: String,
    _backing: tempfile::NamedTempFile,
}

impl LoopDevice {
    fn attach() -> Option<LoopDevice> {
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(1 << 20).unwrap();
        let out = Command::new("/usr/sbin/losetup")
            .args(["--find", "--show"])
            .arg(backing.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "no loop device ({}): block device check skipped",
                text(&out.stderr)
            );
            return None;
        }
        Some(LoopDevice {
            path: text(&out.stdout).trim().to_string(),
            _backing: backing,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/losetup")
            .args(["--detach", &self.path])
            .status();
    }
}

/// Any map the daemon pinned.
fn pinned_map(d: &Daemon) -> String {
    let maps = d.pin_dir.join("maps");
    let first = std::fs::read_dir(&maps)
        .unwrap_or_else(|e| panic!("{}: {e}", maps.display()))
        .flatten()
        .next()
        .expect("a pinned map");
    first.path().display().to_string()
}

fn script(d: &Daemon, mnt: &str, test_cg: &TestCgroup, blk: &str, agent: bool) -> String {
    ROUTES
        .replace("@MNT@", mnt)
        .replace("@PIN@", &pinned_map(d))
        .replace("@ROOT@", &cgroup2_root().display().to_string())
        .replace("@TESTCG@", &test_cg.path.display().to_string())
        .replace("@BLK@", blk)
        .replace("@AGENT@", if agent { "1" } else { "0" })
        .replace("@POLICYDIR@", &d.policies.display().to_string())
        .replace(
            "@POLICY@",
            &std::fs::read_dir(&d.policies)
                .unwrap()
                .flatten()
                .next()
                .expect("a policy file")
                .path()
                .display()
                .to_string(),
        )
        .replace("@TRAIL@", &d.json_log.display().to_string())
        .replace("@SOCKET@", &d.socket.display().to_string())
}

/// The placement of task `task` of `agent` in `status --json`, once `run` is placed.
fn placement(d: &Daemon, agent: &str, task: &str) -> Value {
    for _ in 0..100 {
        let s = d.status();
        let found = s["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["agent"] == agent)
            .flat_map(|a| a["tasks"].as_array().cloned().unwrap_or_default())
            .find(|t| t["task"] == task)
            .and_then(|t| t["placements"].get(0).cloned());
        if let Some(p) = found {
            return p;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no placement of {agent}/{task} in status: {:#}", d.status());
}

#[test]
fn root_agent_cannot_undo_its_confinement() {
    if !require_root("root_agent_cannot_undo_its_confinement") {
        return;
    }
    let agent = unique_agent("rootcaps");
    let d = Daemon::start(&[policy(&agent, &[PYTHON, "/bin/sleep"])]);
    let mnt = tempfile::tempdir().unwrap();
    let mnt_s = mnt.path().display().to_string();
    let test_cg = TestCgroup::new(&format!("am-caps-{}", std::process::id()), "target");
    let loop_device = LoopDevice::attach();
    let blk = loop_device
        .as_ref()
        .map(|l| l.path.clone())
        .unwrap_or_default();

    // Control: the same root process outside every agent takes every route.
    let outside = Command::new(PYTHON)
        .args(["-c", &script(&d, &mnt_s, &test_cg, &blk, false)])
        .output()
        .unwrap();
    for route in [
        "mount",
        "prog_load",
        "pinned_map",
        "clone3_into_cgroup",
        "procs_test",
        "core_pattern",
        "raw_socket",
        "source_route",
        "fork",
        "tmp_write",
        "policy_append",
        "trail_append",
        "policy_create",
    ] {
        assert_eq!(outcome(&outside, route), "ok", "control {route}");
    }
    if !blk.is_empty() {
        assert_eq!(outcome(&outside, "block_device"), "ok", "control {blk}");
    }

    let out = d.run(
        &agent,
        None,
        &[PYTHON, "-c", &script(&d, &mnt_s, &test_cg, &blk, true)],
    );
    // Capabilities: chown, dac_override, fowner, fsetid, setgid, setuid, net_bind_service,
    // sys_chroot in every set; nothing regained by exec (NoNewPrivs).
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(outcome(&out, set), "00000000000404db", "{set}");
    }
    assert_eq!(outcome(&out, "NoNewPrivs"), "1");
    assert_eq!(outcome(&out, "mount"), errno(libc::EPERM));
    // bpf(2) is refused by `run`'s filter (and reported, below).
    assert_eq!(outcome(&out, "prog_load"), errno(libc::EPERM));
    assert_eq!(outcome(&out, "pinned_map"), errno(libc::EPERM));
    // cgroup.procs: Landlock refuses the write beneath /sys.
    assert_eq!(outcome(&out, "procs_root"), errno(libc::EACCES));
    assert_eq!(outcome(&out, "procs_test"), errno(libc::EACCES));
    // clone3 fails as if the kernel had none; fork falls back to clone.
    assert_eq!(outcome(&out, "clone3_into_cgroup"), errno(libc::ENOSYS));
    assert_eq!(outcome(&out, "fork"), "ok");
    assert_eq!(outcome(&out, "core_pattern"), errno(libc::EACCES));
    if !blk.is_empty() {
        assert_eq!(outcome(&out, "block_device"), errno(libc::EACCES), "{blk}");
    }
    assert_eq!(outcome(&out, "raw_socket"), errno(libc::EPERM));
    assert_eq!(outcome(&out, "source_route"), errno(libc::EPERM));
    // The daemon's files: read-only in the agent's mount namespace; the socket cannot go.
    assert_eq!(outcome(&out, "policy_append"), errno(libc::EROFS));
    assert_eq!(outcome(&out, "trail_append"), errno(libc::EROFS));
    assert_eq!(outcome(&out, "policy_create"), errno(libc::EROFS));
    assert_eq!(outcome(&out, "socket_unlink"), errno(libc::EBUSY));
    assert!(d.socket.exists());
    // Ordinary root work goes on.
    assert_eq!(outcome(&out, "tmp_write"), "ok");
    let rec = d.wait_audit("refused bpf", |v| {
        v["action"] == "seccomp" && v["socket"] == "bpf"
    });
    assert_eq!(rec["verdict"], "denied", "{rec}");
    assert!(field(&rec, "reason").contains("root agent"), "{rec}");

    // status: what the agent holds, per placement.
    let held = d.spawn_run(&agent, "held", &[], &["/bin/sleep", "30"]);
    let p = placement(&d, &agent, "held");
    stop(held);
    let privileges = &p["privileges"];
    assert_eq!(privileges["uid"], 0, "{p}");
    assert_eq!(privileges["no_new_privs"], true, "{p}");
    assert_eq!(privileges["landlock_fs"], true, "{p}");
    assert_eq!(privileges["kept_all"], false, "{p}");
    let caps: Vec<&str> = privileges["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        caps.contains(&"cap_chown") && !caps.contains(&"cap_sys_admin"),
        "{p}"
    );
}

/// Ends a `run` the way an operator would: SIGTERM, which `run` forwards to its command.
fn stop(mut child: std::process::Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

#[test]
fn keep_capabilities_restores_root_and_warns() {
    if !require_root("keep_capabilities_restores_root_and_warns") {
        return;
    }
    let agent = unique_agent("keepcaps");
    let d = Daemon::start(&[policy(&agent, &[PYTHON])]);
    let mnt = tempfile::tempdir().unwrap();
    let script = format!(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         print('CapEff', [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\n\
         print('NoNewPrivs', [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])\n\
         rc = libc.mount(b'none', b'{0}', b'tmpfs', 0, None)\n\
         print('mount', 'ok' if rc == 0 else 'errno %d' % ctypes.get_errno())\n\
         rc == 0 and libc.umount2(b'{0}', 0)\n\
         import time; time.sleep(2)\n",
        mnt.path().display()
    );
    let child = d.spawn_run(
        &agent,
        "kept",
        &["--keep-capabilities"],
        &[PYTHON, "-c", &script],
    );
    let p = placement(&d, &agent, "kept");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(outcome(&out, "mount"), "ok");
    assert_eq!(outcome(&out, "NoNewPrivs"), "0");
    let eff = u64::from_str_radix(&outcome(&out, "CapEff"), 16).unwrap();
    assert_eq!(eff & (1 << 21), 1 << 21, "CAP_SYS_ADMIN kept: {eff:x}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WARNING: --keep-capabilities"),
        "run's warning: {stderr}"
    );
    assert_eq!(p["privileges"]["kept_all"], true, "{p}");
    assert_eq!(p["privileges"]["capabilities"][0], "all", "{p}");
    let e = wait_journal(&agent, "the --keep-capabilities notice", |e| {
        field(e, "MESSAGE_ID") == "9fae3a6167374aa4a33de186d13699a3"
    });
    assert_eq!(field(&e, "PRIORITY"), "4", "a warning: {e}");
    assert_eq!(field(&e, "TASK_ID"), "kept");
    assert!(field(&e, "MESSAGE").contains("every capability"), "{e}");
}

#[test]
fn status_text_names_each_agents_capabilities() {
    if !require_root("status_text_names_each_agents_capabilities") {
        return;
    }
    let agent = unique_agent("capstatus");
    let d = Daemon::start(&[policy(&agent, &["/bin/sleep"])]);
    let root = d.spawn_run(&agent, "root", &[], &["/bin/sleep", "30"]);
    let user = d.spawn_run(&agent, "user", &["--user", "nobody"], &["/bin/sleep", "30"]);
    let kept = d.spawn_run(
        &agent,
        "kept",
        &["--keep-capabilities"],
        &["/bin/sleep", "30"],
    );
    for t in ["root", "user", "kept"] {
        placement(&d, &agent, t);
    }
    let out = d.cli(&["status"]);
    for c in [root, user, kept] {
        stop(c);
    }
    let s = text(&out.stdout);
    let line = |task: &str| -> String {
        let mut lines = s
            .lines()
            .skip_while(|l| !l.contains(&format!("task {task}:")));
        lines.next();
        lines.next().unwrap_or_default().to_string()
    };
    let r = line("root");
    assert!(r.contains("uid 0, capabilities cap_chown,"), "{s}");
    assert!(
        r.contains("no_new_privs") && r.contains("landlock fs"),
        "{s}"
    );
    assert!(!r.contains("cap_sys_admin"), "{s}");
    let u = line("user");
    assert!(
        u.contains("uid 65534, capabilities none, no_new_privs"),
        "{s}"
    );
    let k = line("kept");
    assert!(
        k.contains("kept all capabilities (--keep-capabilities)"),
        "{s}"
    );
}

/// A `--user` agent keeps nothing: empty bounding set, no_new_privs (sudo and su cannot bring
/// root back).
#[test]
fn user_agent_keeps_no_capabilities_and_no_new_privs() {
    if !require_root("user_agent_keeps_no_capabilities_and_no_new_privs") {
        return;
    }
    let agent = unique_agent("usercaps");
    let d = Daemon::start(&[policy(&agent, &["/usr/bin/grep"])]);
    let out = d.run_with(
        &agent,
        &["--user", "nobody"],
        &[
            "/usr/bin/grep",
            "-E",
            "^(Cap|NoNewPrivs)",
            "/proc/self/status",
        ],
    );
    let s = text(&out.stdout);
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            s.lines()
                .any(|l| l.starts_with(set) && l.ends_with("0000000000000000")),
            "{set}: {s}"
        );
    }
    assert!(s.lines().any(|l| l.starts_with("NoNewPrivs:\t1")), "{s}");
}

/// A control request is judged by the process that connected. A root agent that connects to the
/// control socket, exits, and leaves the connection to a descendant would otherwise be read as
/// a pid without /proc, i.e. no agent's, and get the operator's requests (status, reload, grants).
/// Refused: the connecting process must still run. Control: the same request on a connection
/// whose process runs is answered (outside agents).
#[test]
fn a_control_connection_left_by_an_exited_agent_process_is_refused() {
    if !require_root("a_control_connection_left_by_an_exited_agent_process_is_refused") {
        return;
    }
    const HAND_DOWN: &str = r#"import socket, os, sys, time
pid = os.fork()
if pid == 0:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    if os.fork() == 0:
        time.sleep(1)
        s.settimeout(5)
        s.send(b'{"op":"status"}\n')
        print('handed', s.recv(4096).decode().strip(), flush=True)
        os._exit(0)
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(3)
"#;
    let agent = unique_agent("handed");
    let d = Daemon::start(&[policy(&agent, &[PYTHON])]);
    let socket = d.socket.to_str().unwrap();
    let out = d.run(&agent, None, &[PYTHON, "-c", HAND_DOWN, socket]);
    let handed = outcome(&out, "handed");
    assert!(handed.contains("\"result\":\"error\""), "{handed}");
    assert!(handed.contains("no longer runs"), "{handed}");
    // Control: a connection whose process still runs, outside agents, gets its answer.
    let out = Command::new(PYTHON)
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.send(b'{\"op\":\"status\"}\\n')\nprint('live', s.recv(64).decode().strip(), flush=True)\n",
            socket,
        ])
        .output()
        .unwrap();
    assert!(
        outcome(&out, "live").starts_with("{\"result\":\"status\""),
        "{}",
        text(&out.stdout)
    );
}
