//! `cargo xtask bench`: install what the benchmarks compare against, build, run the criterion
//! benches, then hand over to `agent-monitor-bench run`, which measures and writes
//! docs/benchmarks.{md,svg,json}.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::{cargo, journald, run_cmd, setup};

/// auditd and bpftrace are what the numbers are compared with.
const PACKAGES: &[&str] = &["auditd", "bpftrace"];

pub fn bench(root: &Path, quick: bool) -> Result<()> {
    setup::require_root("run the benchmarks (they load eBPF programs, audit rules, bpftrace)")?;
    setup::setup()?;
    let installed = setup::install_packages(PACKAGES)?;
    if installed.contains(&"auditd") {
        keep_auditd_service_off()?;
    }
    run_cmd(cargo(root).args(["build", "--release"]))?;
    run_cmd(cargo(root).args(["build", "--release", "-p", "agent-monitor-bench"]))?;
    // Stale results of renamed benches would otherwise reach the report.
    let criterion = root.join("target/criterion");
    let _ = std::fs::remove_dir_all(&criterion);
    let mut benches = cargo(root);
    benches.args(["bench", "-p", "agent-monitor", "--bench", "inprocess", "--"]);
    if quick {
        benches.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
    } else {
        benches.args(["--warm-up-time", "1", "--measurement-time", "3"]);
    }
    run_cmd(&mut benches)?;
    // Denials go to journald; without it they would count as sink failures.
    journald::ensure_running()?;
    let mut run = Command::new(root.join("target/release/agent-monitor-bench"));
    run.arg("run")
        .arg("--root")
        .arg(root)
        .arg("--criterion")
        .arg(&criterion)
        .args([
            "--command",
            if quick {
                "cargo xtask bench --quick"
            } else {
                "cargo xtask bench"
            },
        ]);
    if quick {
        run.arg("--quick");
    }
    run_cmd(&mut run)
}

/// On a systemd host the auditd package starts and enables its service; the benchmark starts its
/// own auditd only while it measures, so the one the install brought up is stopped again.
fn keep_auditd_service_off() -> Result<()> {
    if Path::new("/run/systemd/system").is_dir() {
        run_cmd(Command::new("systemctl").args(["disable", "--now", "auditd"]))?;
    }
    Ok(())
}
