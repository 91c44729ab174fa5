//! `cargo xtask test --systemd`: the Debian package under a real systemd as PID 1.
//!
//! Boots a Debian 12 root file system (debootstrap, cached in /var/cache/agent-monitor-xtask) with
//! `systemd-nspawn --boot`, installs target/debian/agent-monitor_*.deb with dpkg and checks what an
//! operator relies on through systemctl and journalctl inside the container:
//! READY only once enforcement is active, denials in the container's journal with their fields,
//! `systemctl reload`, restart / SIGKILL / package upgrade without an unenforced moment, the
//! watchdog, the unit's sandboxing score, and that removal keeps enforcement while purge ends it.
//! Also journal forwarding with systemd-journal-upload as docs/operation.md shows it
//! ([`journal_upload`]).
//!
//! What the container is given, and why:
//! - its own bpffs instance (a fresh `mount -t bpf`, bound at /sys/fs/bpf): the pins of the
//!   container's daemon must not meet those of daemons on the host, and they vanish with it;
//! - tracefs read-only (the daemon reads tracepoint formats; systemd does not mount it in
//!   containers);
//! - a pure cgroup v2 tree (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`; the host's hybrid layout has
//!   its v2 tree at /sys/fs/cgroup/unified): the daemon attaches its address hooks at the root of
//!   the container's tree, so they see the container's sockets only;
//! - all capabilities, and bpf/perf_event_open, the three Landlock calls and fanotify_init/mark
//!   added to nspawn's system call allow-list (its default list refuses Landlock, and `run`
//!   refuses to start a root agent it cannot confine; it refuses fanotify too, and without it the
//!   file guard cannot start).
//!
//! The programs run in the host kernel, so the shared privileged-test lock is held while the
//! container runs.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{package, run_cmd, setup};

mod journal_upload;

const ROOTFS_CACHE: &str = "/var/cache/agent-monitor-xtask/bookworm-rootfs-journal-remote";
/// What the root file system holds beyond minbase; the cache is rebuilt when this changes.
const ROOTFS_PACKAGES: &str =
    "systemd,systemd-sysv,dbus,libseccomp2,procps,logrotate,systemd-journal-remote";
const MIRROR: &str = "http://deb.debian.org/debian";
const LOCK: &str = "/tmp/am-privtest.lock";

/// Journal message ids (packaging/agent-monitor.catalog).
const MSG_ACTION_DENIED: &str = "5d59276407424888bc69e2683d35856b";
const MSG_ENFORCEMENT_ACTIVE: &str = "3649d9819dc3408b9b41c358453489f7";

/// Loopback listeners in the container (systemd socket units: up whatever the daemon does).
const PORT_GRANTED_ON_RELOAD: u16 = 7777;
const PORT_NEVER_ALLOWED: u16 = 7778;

const POLICY_BEFORE_RELOAD: &str = r#"agent = "tester"
mode = "enforce"

[network]
allow = []

[exec]
allow = ["/usr/bin/bash", "/bin/bash", "/usr/bin/sleep", "/bin/sleep"]
"#;

const POLICY_AFTER_RELOAD: &str = r#"agent = "tester"
mode = "enforce"

[network]
allow = ["127.0.0.1:7777"]

[exec]
allow = ["/usr/bin/bash", "/bin/bash", "/usr/bin/sleep", "/bin/sleep"]
"#;

/// A bash snippet that tries one TCP connect and prints CONNECTED or FAILED with the error.
fn connect_probe(port: u16) -> String {
    format!(
        "if out=$( (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>&1 ); then echo CONNECTED; \
         else echo \"FAILED $out\"; fi"
    )
}

pub fn run(root: &Path) -> Result<()> {
    setup::require_root("boot a systemd container")?;
    setup::install_packages(&["debootstrap", "systemd-container"])?;
    let started = Instant::now();
    let deb = package::package(root)?;
    let rootfs = cached_rootfs()?;

    let work = root.join("target/systemd-test");
    let machine = work.join("root");
    let bpffs = work.join("bpffs");
    unmount_if_mounted(&bpffs)?;
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(&bpffs)?;
    run_cmd(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&rootfs)
            .arg(&machine),
    )?;
    fs::copy(&deb, machine.join("root/agent-monitor.deb"))?;
    journal_upload::prepare(&machine, &work)?;

    println!("systemd-test: waiting for {LOCK}");
    let wait_from = Instant::now();
    let lock = fs::File::create(LOCK).with_context(|| format!("opening {LOCK}"))?;
    lock.lock().with_context(|| format!("locking {LOCK}"))?;
    let locked_at = Instant::now();
    let waited = locked_at.duration_since(wait_from);

    let result = (|| {
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        let container = Container::boot(&work, &machine, &bpffs)?;
        let result = checks(&container);
        if result.is_err() {
            let _ = container.dump_diagnostics();
        }
        container.shut_down();
        result
    })();
    // Unmounting the private bpffs drops any pin the container's daemon left: its programs detach.
    let unmounted = unmount_if_mounted(&bpffs);
    drop(lock);
    let passed = result?;
    unmounted?;
    println!(
        "systemd-test: {} checks; {:.0} s in all: {:.0} s waiting for {LOCK}, {:.0} s holding it \
         (boot, install, checks, power-off)",
        passed.len(),
        started.elapsed().as_secs_f64(),
        waited.as_secs_f64(),
        locked_at.elapsed().as_secs_f64()
    );
    println!("{} passed, 0 failed", passed.len());
    Ok(())
}

/// The debootstrapped root file system, built once (about a minute) and reused.
fn cached_rootfs() -> Result<PathBuf> {
    let cache = PathBuf::from(ROOTFS_CACHE);
    let stamp = cache.join(".agent-monitor-rootfs");
    let wanted = format!("bookworm minbase {ROOTFS_PACKAGES}\n");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        println!("systemd-test: root file system {ROOTFS_CACHE}: cached");
        return Ok(cache);
    }
    let partial = cache.with_extension("partial");
    for dir in [&cache, &partial] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    fs::create_dir_all(partial.parent().unwrap())?;
    run_cmd(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={ROOTFS_PACKAGES}")])
            .arg("bookworm")
            .arg(&partial)
            .arg(MIRROR),
    )?;
    fs::write(partial.join(".agent-monitor-rootfs"), &wanted)?;
    fs::rename(&partial, &cache)?;
    Ok(cache)
}

fn unmount_if_mounted(dir: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let dir = dir.to_string_lossy();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*dir))
    {
        run_cmd(Command::new("umount").arg(&*dir))?;
    }
    Ok(())
}

struct Container {
    nspawn: std::cell::RefCell<Child>,
    /// The container's PID 1 (systemd), as the host sees it.
    leader: u32,
    console: PathBuf,
    machine: PathBuf,
}

impl Container {
    fn boot(work: &Path, machine: &Path, bpffs: &Path) -> Result<Container> {
        let console = work.join("console.log");
        let log = fs::File::create(&console)?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["--boot", "--register=no", "--keep-unit", "--quiet"])
            .arg("--directory")
            .arg(machine)
            .args(["--machine=am-systemd-test", "--capability=all"])
            .arg("--system-call-filter=bpf perf_event_open landlock_create_ruleset landlock_add_rule landlock_restrict_self fanotify_init fanotify_mark")
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            .arg("--bind-ro=/sys/kernel/tracing")
            .arg("--console=read-only")
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::echo(&cmd);
        let child = cmd.spawn().context("starting systemd-nspawn")?;
        let nspawn_pid = child.id();
        let mut container = Container {
            nspawn: std::cell::RefCell::new(child),
            leader: 0,
            console,
            machine: machine.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        container.leader = loop {
            if let Some(pid) = child_named(nspawn_pid, "systemd") {
                break pid;
            }
            if let Some(status) = container.nspawn.borrow_mut().try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}) before systemd started:\n{}",
                    fs::read_to_string(&container.console).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("no systemd in the container after 30 s");
            }
            sleep(Duration::from_millis(100));
        };
        // `--wait` returns once boot has finished (running or degraded); before systemd serves
        // its bus it fails at once, hence the loop.
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let out = container.exec(&["systemctl", "is-system-running", "--wait"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break state;
            }
            if Instant::now() > deadline {
                bail!("the container's systemd did not finish booting in 60 s ({state:?})");
            }
            sleep(Duration::from_millis(300));
        };
        println!(
            "systemd-test: container booted (systemd is PID 1, host pid {}): {state}",
            container.leader
        );
        Ok(container)
    }

    /// Runs `args` in all the container's namespaces; returns its output whatever the status.
    fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .stdin(Stdio::null());
        cmd.output().context("running nsenter")
    }

    /// `sh -c script` in the container; a non-zero exit is an error with its output.
    fn sh(&self, script: &str) -> Result<String> {
        let out = self.exec(&["sh", "-c", script])?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!(
                "in the container, `{script}` failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// Runs `command` in a transient unit of the container's systemd (so that it lives in the
    /// container's cgroup tree) and waits for it.
    fn transient(&self, command: &[&str]) -> Result<Output> {
        let mut argv = vec![
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "--collect",
            "--",
        ];
        argv.extend_from_slice(command);
        self.exec(&argv)
    }

    /// Runs bash `script` as agent "tester" (`agent-monitor run`) in a transient unit of the
    /// container's systemd, so that it lives in the container's cgroup tree; returns its output.
    fn agent(&self, script: &str) -> Result<String> {
        let out = self.transient(&[
            "agent-monitor",
            "run",
            "--agent",
            "tester",
            "--",
            "/usr/bin/bash",
            "-c",
            script,
        ])?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string())
    }

    /// The same bash `script` outside any agent (the control), also in the container's tree.
    fn non_agent(&self, script: &str) -> Result<String> {
        let out = self.transient(&["/usr/bin/bash", "-c", script])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn unit_property(&self, property: &str) -> Result<String> {
        self.sh(&format!(
            "systemctl show -P {property} agent-monitor.service"
        ))
    }

    /// Waits until the unit is active with a main pid other than `not_pid`; returns the new pid.
    fn wait_active(&self, not_pid: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let state = self.unit_property("ActiveState")?;
            let pid = self.unit_property("MainPID")?;
            if state == "active" && pid != not_pid && pid != "0" {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent-monitor.service not active again within {within:?} (state {state}, main pid {pid})"
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// Journal entries of the container matching `matches`, as field maps.
    fn journal(&self, matches: &[&str]) -> Result<Vec<HashMap<String, String>>> {
        let mut args = vec!["journalctl", "--no-pager", "-o", "export"];
        args.extend_from_slice(matches);
        let out = self.exec(&args)?;
        Ok(parse_export(&String::from_utf8_lossy(&out.stdout)))
    }

    fn dump_diagnostics(&self) -> Result<()> {
        eprintln!("--- systemctl status agent-monitor ---");
        let out = self.exec(&["systemctl", "status", "--no-pager", "-l", "agent-monitor"])?;
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("--- journalctl -u agent-monitor (last 60) ---");
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-n",
            "60",
            "-u",
            "agent-monitor",
        ])?;
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        Ok(())
    }

    fn shut_down(&self) {
        let mut child = self.nspawn.borrow_mut();
        // SIGTERM to nspawn asks the container's systemd to power off.
        unsafe_kill(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(200));
        }
        eprintln!("systemd-test: container did not power off in 30 s; killing systemd-nspawn");
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

/// The first child of `parent` whose comm is `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
}

/// journalctl's export format: `FIELD=value` lines, entries separated by an empty line. Binary
/// fields (a name line followed by a length-prefixed blob) do not occur in what we read; a line
/// without `=` is skipped.
fn parse_export(text: &str) -> Vec<HashMap<String, String>> {
    let mut entries = Vec::new();
    let mut entry = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            if !entry.is_empty() {
                entries.push(std::mem::take(&mut entry));
            }
        } else if let Some((k, v)) = line.split_once('=') {
            entry.insert(k.to_string(), v.to_string());
        }
    }
    if !entry.is_empty() {
        entries.push(entry);
    }
    entries
}

fn pass(passed: &mut Vec<String>, check: &str, detail: &str) {
    println!("systemd-test: ok: {check}: {detail}");
    passed.push(check.to_string());
}

/// The pids of running file guards (`agent-monitor file-guard`), one a line; procps is not in
/// the minimal container.
const FILE_GUARD_PIDS: &str = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null \
    | grep -q '^[^ ]* file-guard ' && basename $p; done; true";

fn checks(c: &Container) -> Result<Vec<String>> {
    let mut passed = Vec::new();

    // Listeners that stay up whatever the daemon does.
    c.sh(&format!(
        "for p in {PORT_GRANTED_ON_RELOAD} {PORT_NEVER_ALLOWED}; do
           printf '[Socket]\\nListenStream=127.0.0.1:%s\\nAccept=yes\\n' $p > /etc/systemd/system/am-listen-$p.socket
           printf '[Service]\\nExecStart=/bin/true\\nStandardInput=socket\\n' > /etc/systemd/system/am-listen-$p@.service
         done
         systemctl daemon-reload
         systemctl start am-listen-{PORT_GRANTED_ON_RELOAD}.socket am-listen-{PORT_NEVER_ALLOWED}.socket"
    ))?;

    // Install: enabled, started, READY.
    let install = c.sh("dpkg -i /root/agent-monitor.deb 2>&1")?;
    let active = c.unit_property("ActiveState")?;
    let enabled = c.sh("systemctl is-enabled agent-monitor.service")?;
    if active != "active" || enabled != "enabled" {
        bail!("after dpkg -i the unit is {active}/{enabled}:\n{install}");
    }
    pass(
        &mut passed,
        "install enables and starts the unit",
        &format!("{active}, {enabled}"),
    );

    let catalog = c.sh(&format!("journalctl --list-catalog {MSG_ACTION_DENIED}"))?;
    if !catalog.contains(MSG_ACTION_DENIED) {
        bail!("the journal catalog does not know {MSG_ACTION_DENIED}: {catalog}");
    }
    let man = c.sh("ls /usr/share/man/man1 | grep -c '^agent-monitor'")?;
    pass(
        &mut passed,
        "catalog and man pages installed",
        &format!("catalog entry {MSG_ACTION_DENIED}, {man} man pages"),
    );

    // A policy, reloaded: an agent is denied, the same connect outside agents works.
    fs::write(
        c.machine.join("etc/agent-monitor/policies/tester.toml"),
        POLICY_BEFORE_RELOAD,
    )?;
    c.sh("systemctl reload agent-monitor.service")?;
    sleep(Duration::from_secs(1));
    let probe = connect_probe(PORT_NEVER_ALLOWED);
    let control = c.non_agent(&probe)?;
    if control != "CONNECTED" {
        bail!("control: a non-agent connect to 127.0.0.1:{PORT_NEVER_ALLOWED} gave {control:?}");
    }
    let denied = c.agent(&probe)?;
    if !denied.contains("FAILED") || !denied.contains("Operation not permitted") {
        bail!("agent connect to 127.0.0.1:{PORT_NEVER_ALLOWED} was not denied: {denied:?}");
    }
    pass(
        &mut passed,
        "agent denied, non-agent control connects",
        &denied,
    );

    // The denial, with its fields, in the container's journal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let denial = loop {
        let found = c
            .journal(&[
                &format!("MESSAGE_ID={MSG_ACTION_DENIED}"),
                "AGENT_ID=tester",
            ])?
            .into_iter()
            .find(|e| e.get("DEST_PORT").map(String::as_str) == Some("7778"));
        if let Some(e) = found {
            break e;
        }
        if Instant::now() > deadline {
            bail!(
                "no denial of agent tester to port {PORT_NEVER_ALLOWED} in the container's journal"
            );
        }
        sleep(Duration::from_millis(300));
    };
    for (field, want) in [
        ("SYSLOG_IDENTIFIER", Some("agent-monitor")),
        ("ACTION", None),
        ("VERDICT", None),
        ("DEST_ADDR", Some("127.0.0.1")),
        ("PID", None),
        ("EXE", None),
        ("_SYSTEMD_UNIT", Some("agent-monitor.service")),
    ] {
        let got = denial.get(field);
        match (got, want) {
            (None, _) => bail!("denial entry lacks {field}: {denial:?}"),
            (Some(g), Some(w)) if g != w => bail!("denial entry has {field}={g}, want {w}"),
            _ => {}
        }
    }
    pass(
        &mut passed,
        "denial in the container's journal with its fields",
        &format!(
            "ACTION={} VERDICT={} DEST={}:{} EXE={} unit={}",
            denial["ACTION"],
            denial["VERDICT"],
            denial["DEST_ADDR"],
            denial["DEST_PORT"],
            denial["EXE"],
            denial["_SYSTEMD_UNIT"]
        ),
    );

    // systemctl reload applies a new policy.
    let granted_probe = connect_probe(PORT_GRANTED_ON_RELOAD);
    let before = c.agent(&granted_probe)?;
    if !before.contains("Operation not permitted") {
        bail!("before the reload, agent connect to {PORT_GRANTED_ON_RELOAD} gave {before:?}");
    }
    let pid_before_reload = c.unit_property("MainPID")?;
    fs::write(
        c.machine.join("etc/agent-monitor/policies/tester.toml"),
        POLICY_AFTER_RELOAD,
    )?;
    c.sh("systemctl reload agent-monitor.service")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let out = c.agent(&granted_probe)?;
        if out == "CONNECTED" || Instant::now() > deadline {
            break out;
        }
        sleep(Duration::from_millis(300));
    };
    if after != "CONNECTED" {
        bail!("after systemctl reload, agent connect to {PORT_GRANTED_ON_RELOAD} gave {after:?}");
    }
    if c.unit_property("MainPID")? != pid_before_reload {
        bail!("systemctl reload restarted the daemon");
    }
    pass(
        &mut passed,
        "systemctl reload applies a new policy",
        "7777 denied before, allowed after, same main pid",
    );

    // READY only once enforcing: a start from nothing pinned; right when `systemctl start`
    // returns (Type=notify: after READY=1) an agent is already denied, and the daemon's
    // "enforcement active" entry precedes systemd's "Started".
    c.sh("systemctl stop agent-monitor.service && agent-monitor daemon --uninstall")?;
    let cursor = c.sh("journalctl -n0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'")?;
    c.sh("systemctl start agent-monitor.service")?;
    let right_after = c.agent(&probe)?;
    if !right_after.contains("Operation not permitted") {
        bail!("right after `systemctl start` returned, the agent was not denied: {right_after:?}");
    }
    let since = format!("--after-cursor={cursor}");
    let entries = c.journal(&[&since])?;
    let active_at = entries
        .iter()
        .position(|e| e.get("MESSAGE_ID").map(String::as_str) == Some(MSG_ENFORCEMENT_ACTIVE));
    let started_at = entries.iter().position(|e| {
        e.get("_PID").map(String::as_str) == Some("1")
            && e.get("UNIT").map(String::as_str) == Some("agent-monitor.service")
            && e.get("JOB_TYPE").map(String::as_str) == Some("start")
            && e.get("JOB_RESULT").map(String::as_str) == Some("done")
    });
    match (active_at, started_at) {
        (Some(a), Some(s)) if a < s => {}
        _ => bail!(
            "journal order: enforcement active at {active_at:?}, systemd's Started at {started_at:?}"
        ),
    }
    // And a daemon that cannot enforce never reports READY.
    c.sh("printf 'agent = \"broken\"\\nmode = \"enforce\"\\n[network]\\nallow = [\"not an address\"]\\n' > /etc/agent-monitor/policies/broken.toml")?;
    let refused = c.exec(&["systemctl", "restart", "agent-monitor.service"])?;
    let state = c.unit_property("ActiveState")?;
    if refused.status.success() || state == "active" {
        bail!("with an invalid policy, `systemctl restart` succeeded (state {state})");
    }
    c.sh("rm /etc/agent-monitor/policies/broken.toml && systemctl reset-failed agent-monitor.service; systemctl start agent-monitor.service")?;
    pass(
        &mut passed,
        "READY only when enforcement is active",
        &format!(
            "agent denied the moment `systemctl start` returned; enforcement-active entry before systemd's Started; invalid policy: start failed, unit {state}"
        ),
    );

    // restart, SIGKILL (Restart=always) and a package upgrade while an agent keeps connecting.
    c.sh(&format!(
        "systemd-run --unit=am-connect-loop --quiet -p StandardOutput=file:/root/connect-loop.log -- \
         agent-monitor run --agent tester -- /usr/bin/bash -c 'while :; do {}; sleep 0.05; done'",
        connect_probe(PORT_NEVER_ALLOWED)
    ))?;
    sleep(Duration::from_secs(2));
    let pid0 = c.unit_property("MainPID")?;
    let guard0 = c.sh(FILE_GUARD_PIDS)?;
    c.sh("systemctl restart agent-monitor.service")?;
    let pid1 = c.wait_active(&pid0, Duration::from_secs(30))?;
    // KillMode=process: the file guard outlives the restart and the new daemon adopts it.
    let guard1 = c.sh(FILE_GUARD_PIDS)?;
    let adopted = c.sh(&format!(
        "journalctl -b -u agent-monitor.service _PID={pid1} -o cat | grep -c 'file guard (pid {guard0}) adopted' || true"
    ))?;
    if guard0.is_empty()
        || guard0.contains(char::is_whitespace)
        || guard1 != guard0
        || adopted == "0"
    {
        bail!(
            "the file guard did not outlive `systemctl restart`: pid(s) {guard0:?} -> {guard1:?}, adopted lines: {adopted}"
        );
    }
    sleep(Duration::from_secs(1));
    let restarts_before = c.unit_property("NRestarts")?;
    c.sh("systemctl kill -s KILL agent-monitor.service")?;
    let pid2 = c.wait_active(&pid1, Duration::from_secs(30))?;
    let restarts_after = c.unit_property("NRestarts")?;
    sleep(Duration::from_secs(1));
    c.sh("dpkg -i /root/agent-monitor.deb >/dev/null 2>&1")?;
    let pid3 = c.wait_active(&pid2, Duration::from_secs(30))?;
    sleep(Duration::from_secs(2));
    c.sh("systemctl stop am-connect-loop.service")?;
    let log = fs::read_to_string(c.machine.join("root/connect-loop.log"))?;
    let attempts = log.lines().count();
    let connected = log.lines().filter(|l| l.contains("CONNECTED")).count();
    let denied = log
        .lines()
        .filter(|l| l.contains("Operation not permitted"))
        .count();
    if connected > 0 || attempts < 20 || denied != attempts {
        bail!(
            "connect loop across restart/kill/upgrade: {attempts} attempts, {connected} connected, {denied} denied:\n{log}"
        );
    }
    if restarts_after.parse::<u32>()? <= restarts_before.parse::<u32>()? {
        bail!("SIGKILL did not count a restart (NRestarts {restarts_before} -> {restarts_after})");
    }
    pass(
        &mut passed,
        "restart, kill -s KILL and package upgrade never leave the agent unenforced",
        &format!(
            "{attempts} connect attempts, all denied, 0 connected; main pid {pid0} -> {pid1} (restart; file guard {guard0} kept and adopted) -> {pid2} (KILL, NRestarts {restarts_before} -> {restarts_after}) -> {pid3} (dpkg -i upgrade)"
        ),
    );

    // The watchdog: a stopped daemon is killed and replaced; enforcement holds meanwhile.
    c.sh("mkdir -p /etc/systemd/system/agent-monitor.service.d && \
          printf '[Service]\\nWatchdogSec=3s\\nTimeoutAbortSec=5s\\n' > /etc/systemd/system/agent-monitor.service.d/test-watchdog.conf && \
          systemctl daemon-reload && systemctl restart agent-monitor.service")?;
    c.sh(&format!(
        "systemd-run --unit=am-hang-loop --quiet -p StandardOutput=file:/root/hang-loop.log -- \
         agent-monitor run --agent tester -- /usr/bin/bash -c 'while :; do {}; sleep 0.05; done'",
        connect_probe(PORT_NEVER_ALLOWED)
    ))?;
    sleep(Duration::from_secs(1));
    let hung = c.unit_property("MainPID")?;
    let cursor = c.sh("journalctl -n0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'")?;
    let hung_at = Instant::now();
    c.sh(&format!("kill -STOP {hung}"))?;
    sleep(Duration::from_secs(1));
    // A new agent cannot be placed while the daemon hangs: `run` must fail, not run unconfined.
    let new_agent = c.agent(&probe)?;
    let replaced = c.wait_active(&hung, Duration::from_secs(30))?;
    let took = hung_at.elapsed();
    sleep(Duration::from_secs(1));
    c.sh("systemctl stop am-hang-loop.service")?;
    let text = c.sh(&format!(
        "journalctl --no-pager -u agent-monitor.service --after-cursor='{cursor}'"
    ))?;
    if !text.contains("Watchdog timeout") {
        bail!("no watchdog timeout in the journal after SIGSTOP:\n{text}");
    }
    let log = fs::read_to_string(c.machine.join("root/hang-loop.log"))?;
    let attempts = log.lines().count();
    let denied = log
        .lines()
        .filter(|l| l.contains("Operation not permitted"))
        .count();
    if attempts < 20 || denied != attempts || new_agent.contains("CONNECTED") {
        bail!(
            "while the daemon hung: {attempts} attempts, {denied} denied; a new agent: {new_agent:?}"
        );
    }
    c.sh("rm /etc/systemd/system/agent-monitor.service.d/test-watchdog.conf && systemctl daemon-reload && systemctl restart agent-monitor.service")?;
    pass(
        &mut passed,
        "watchdog fires when the daemon hangs",
        &format!(
            "SIGSTOP pid {hung}: \"Watchdog timeout\", replaced by pid {replaced} after {:.1} s (WatchdogSec=3s drop-in); a running agent: {attempts} connects, all denied; a new `agent-monitor run` meanwhile fails closed: {new_agent:?}",
            took.as_secs_f64()
        ),
    );

    // Log rotation as shipped: logrotate renames the trail and signals the daemon (SIGUSR1),
    // which reopens it (same pid) and the next action lands in the new file.
    let before_rotation = c.unit_property("MainPID")?;
    c.sh("logrotate --force /etc/logrotate.d/agent-monitor")?;
    let rotated = c.sh("wc -l < /var/log/agent-monitor/audit.jsonl.1")?;
    let after_rotation = c.wait_active("0", Duration::from_secs(30))?;
    sleep(Duration::from_secs(1));
    let denied_after = c.agent(&probe)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        let text = fs::read_to_string(c.machine.join("var/log/agent-monitor/audit.jsonl"))
            .unwrap_or_default();
        if text.contains("\"dest_port\":7778") || Instant::now() > deadline {
            break text;
        }
        sleep(Duration::from_millis(300));
    };
    if !denied_after.contains("Operation not permitted") || !fresh.contains("7778") {
        bail!("after logrotate: agent {denied_after:?}; new audit.jsonl:\n{fresh}");
    }
    if after_rotation != before_rotation {
        bail!(
            "logrotate: the daemon was replaced (pid {before_rotation} -> {after_rotation}) instead of reopening its trail on SIGUSR1"
        );
    }
    let how = "the daemon reopened its trail on SIGUSR1 (same pid)";
    pass(
        &mut passed,
        "logrotate rotates the audit trail",
        &format!(
            "audit.jsonl.1 has {rotated} lines; {how}; the next denial is in the new audit.jsonl"
        ),
    );

    // The sandboxing score, with the options that cost exposure (docs/operation.md records it).
    let report = c.sh("systemd-analyze security --no-pager agent-monitor.service 2>&1")?;
    let Some(security) = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    else {
        bail!("systemd-analyze security: {report}");
    };
    for line in report.lines().filter(|l| l.starts_with('✗')) {
        println!("systemd-test:   {line}");
    }
    pass(&mut passed, "systemd-analyze security", security);

    let upload = journal_upload::check(c)?;
    pass(&mut passed, "journal forwarding as documented", &upload);

    // Removal keeps enforcement and says so; purge ends it.
    c.sh(&format!(
        "systemd-run --unit=am-survivor --quiet -p StandardOutput=file:/root/survivor.log -- \
         agent-monitor run --agent tester -- /usr/bin/bash -c 'while :; do {}; sleep 0.2; done'",
        connect_probe(PORT_NEVER_ALLOWED)
    ))?;
    sleep(Duration::from_secs(1));
    let removed = c.sh("dpkg -r agent-monitor 2>&1")?;
    let state = c.unit_property("ActiveState")?;
    let pins = c.sh("ls /sys/fs/bpf/agent-monitor | wc -l")?;
    if state == "active" || !removed.contains("enforcement stays in place") || pins == "0" {
        bail!("after dpkg -r: unit {state}, {pins} pins, said:\n{removed}");
    }
    fs::write(c.machine.join("root/survivor.log"), "")?;
    sleep(Duration::from_secs(2));
    let after_remove = fs::read_to_string(c.machine.join("root/survivor.log"))?;
    if after_remove.is_empty()
        || after_remove
            .lines()
            .any(|l| !l.contains("Operation not permitted"))
    {
        bail!("after dpkg -r, the running agent's connects: {after_remove:?}");
    }
    // Installing again after a removal enables and starts it again (it adopts the pins).
    c.sh("dpkg -i /root/agent-monitor.deb >/dev/null 2>&1")?;
    let reinstalled = c.unit_property("ActiveState")?;
    let reenabled = c.sh("systemctl is-enabled agent-monitor.service || true")?;
    if reinstalled != "active" || reenabled != "enabled" {
        bail!("dpkg -i after dpkg -r: unit {reinstalled}/{reenabled}");
    }
    // Purging the installed package (what `apt purge` does) ends enforcement.
    let purged = c.sh("dpkg --purge agent-monitor 2>&1")?;
    let pins_after = c.sh("ls /sys/fs/bpf/agent-monitor 2>/dev/null | wc -l")?;
    fs::write(c.machine.join("root/survivor.log"), "")?;
    sleep(Duration::from_secs(2));
    let after_purge = fs::read_to_string(c.machine.join("root/survivor.log"))?;
    c.sh("systemctl stop am-survivor.service")?;
    if pins_after != "0" || !after_purge.contains("CONNECTED") {
        bail!(
            "after dpkg --purge: {pins_after} pins, agent connects {after_purge:?}; said:\n{purged}"
        );
    }
    pass(
        &mut passed,
        "remove keeps enforcement (and says so), reinstall restarts, purge ends it",
        &format!(
            "dpkg -r: unit {state}, {pins} pins kept, running agent still denied; dpkg -i again: {reinstalled}, {reenabled}; dpkg --purge: pins gone, the same agent connects"
        ),
    );
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_format_is_split_into_entries() {
        let text = "__CURSOR=a\nMESSAGE=one=two\nAGENT_ID=x\n\n__CURSOR=b\nMESSAGE=three\n\n";
        let entries = parse_export(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["MESSAGE"], "one=two");
        assert_eq!(entries[1]["__CURSOR"], "b");
    }
}
