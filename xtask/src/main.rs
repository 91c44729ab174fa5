//! Developer and CI tasks for agent-monitor: `cargo xtask setup | build | run | test | package | bench`.
//!
//! Everything CI does lives here (`.ci/run` only calls `cargo xtask test`), so a developer reproduces
//! CI with the same command.
//!
//! About journald: `run` and `test` need a journald, because the daemon reports to it and the
//! privileged tests read back what it recorded with `journalctl`. On machines without systemd as
//! PID 1 (containers, CI runners) we start `/lib/systemd/systemd-journald` ourselves, detached, and
//! deliberately leave it running when we exit: it is the machine's log, not ours. Entries written
//! during a run stay queryable afterwards, other tools on the machine may already be sending to the
//! socket we brought up, a daemon started with `cargo xtask run` keeps a working sink, and the next
//! run simply reuses it.

mod bench;
mod journald;
mod package;
mod setup;
mod systemd_test;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI tasks for agent-monitor",
    after_help = "Most tasks need root: installing packages, mounting bpffs/tracefs, loading eBPF \
                  programs and starting journald."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install and mount what building and testing need (idempotent)
    ///
    /// Checks, and only if missing installs: nightly rust-src, bpf-linker 0.10.0, the Debian
    /// packages the tests use (systemd, curl, python3, iproute2, procps, coreutils). Mounts tracefs
    /// at /sys/kernel/tracing and bpffs at /sys/fs/bpf if absent. Prints one line per step.
    Setup,
    /// Setup, then build the release binaries and the privileged test crate
    ///
    /// `cargo build --release` (default members; agent-monitor's build.rs builds the eBPF object),
    /// then `cargo build --release -p agent-monitor-tests --tests`.
    Build,
    /// Setup, build, then run the daemon in the foreground on policies/
    ///
    /// Makes sure journald runs (starting /lib/systemd/systemd-journald if its socket is absent),
    /// then execs `target/release/agent-monitor daemon --policies policies/ --json-log
    /// /var/log/agent-monitor/audit.jsonl DAEMON_ARGS...`.
    Run {
        /// Extra arguments for `agent-monitor daemon` (after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "DAEMON_ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Setup, build, unit tests, then the privileged end-to-end tests (what CI runs)
    ///
    /// Runs `cargo test --release`, makes sure journald runs (starting it if its socket is absent,
    /// and leaving it running), then `cargo test --release -p agent-monitor-tests --
    /// --test-threads=1` with AGENT_MONITOR_BIN and AGENT_MONITOR_POLICIES set, and last the
    /// Debian package under a real systemd as PID 1 (what --systemd runs alone; about a minute,
    /// two the first time).
    Test {
        /// Run only the test under real systemd: build the .deb, boot a Debian 12 container with
        /// systemd-nspawn (root file system from debootstrap, cached in
        /// /var/cache/agent-monitor-xtask), install the package and check the unit through
        /// systemctl and journalctl: READY, denials in the journal, reload, restart and SIGKILL
        /// without an unenforced moment, the watchdog, removal and purge. Needs root; about a
        /// minute once the root file system is cached (debootstrap adds about a minute).
        #[arg(long)]
        systemd: bool,
    },
    /// Build the Debian package: target/debian/agent-monitor_VERSION_ARCH.deb
    ///
    /// Builds the release binary, stages the binary, the systemd unit (ExecStart=/usr/bin/...), the
    /// journald catalog, man pages and bash/zsh/fish completions generated from the binary's own
    /// command line, the example policies, a logrotate file and the maintainer scripts
    /// (packaging/deb/), then `dpkg-deb --build`.
    Package,
    /// Measure overhead and capacity against auditd and bpftrace; write docs/benchmarks.md
    ///
    /// Needs root. Installs auditd and bpftrace (apt) if missing, builds, runs the criterion
    /// benches of the in-process paths, then `agent-monitor-bench run`: per-operation overhead
    /// of connect and fork+exec in six setups (interleaved repetitions), event capacity, start-up
    /// time and memory per tracked process. Writes docs/benchmarks.md, docs/benchmarks.svg and
    /// docs/benchmarks.json, and stops everything it started (auditd and its rules, bpftrace,
    /// daemons). About 10 minutes; `--quick` takes 2–3.
    Bench {
        /// Fewer repetitions and shorter runs, for development.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build(&root)
        }
        Task::Run { args } => {
            setup::setup()?;
            build(&root)?;
            journald::ensure_running()?;
            let mut daemon = Command::new(daemon_bin(&root));
            daemon
                .current_dir(&root)
                .arg("daemon")
                .arg("--policies")
                .arg(root.join("policies"))
                .args(["--json-log", "/var/log/agent-monitor/audit.jsonl"])
                .args(args);
            echo(&daemon);
            let err = daemon.exec();
            Err(err).with_context(|| format!("starting {}", daemon_bin(&root).display()))
        }
        Task::Bench { quick } => bench::bench(&root, quick),
        Task::Package => package::package(&root).map(|_| ()),
        Task::Test { systemd: true } => {
            setup::setup()?;
            systemd_test::run(&root)
        }
        Task::Test { systemd: false } => {
            setup::setup()?;
            build(&root)?;
            run_cmd(cargo(&root).args(["test", "--release"]))?;
            journald::ensure_running()?;
            run_cmd(
                cargo(&root)
                    .args(["test", "--release", "-p", "agent-monitor-tests", "--tests"])
                    .args(["--", "--test-threads=1"])
                    .env("AGENT_MONITOR_BIN", daemon_bin(&root))
                    .env("AGENT_MONITOR_POLICIES", root.join("policies")),
            )?;
            systemd_test::run(&root)
        }
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

fn daemon_bin(root: &Path) -> PathBuf {
    root.join("target/release/agent-monitor")
}

fn build(root: &Path) -> Result<()> {
    // Default members; agent-monitor's build.rs builds and embeds the eBPF object.
    run_cmd(cargo(root).args(["build", "--release"]))?;
    run_cmd(cargo(root).args(["build", "--release", "-p", "agent-monitor-tests", "--tests"]))
}

/// The cargo that runs us (`$CARGO`), in the workspace root.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn echo(cmd: &Command) {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    println!(
        "+ {} {}",
        cmd.get_program().to_string_lossy(),
        args.join(" ")
    );
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error naming the command.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    if !status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!(
            "`{} {}` failed ({status})",
            cmd.get_program().to_string_lossy(),
            args.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_daemon_args_through() {
        for argv in [
            &["xtask", "run", "--", "--journal-allowed", "-v"][..],
            &["xtask", "run", "--journal-allowed", "-v"][..],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Task::Run { args } = cli.command else {
                panic!("{argv:?} did not parse as run");
            };
            assert_eq!(args, ["--journal-allowed", "-v"], "{argv:?}");
        }
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"), "{}", root.display());
    }
}
