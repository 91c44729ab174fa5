//! Command-line interface: the daemon and its clients.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::control::DEFAULT_SOCKET;

/// Kernel-enforced allowlists for AI agents.
///
/// Every connect and exec of an agent process (and of everything it starts) is checked against
/// that agent's allowlist when it happens: blocked in the kernel in enforce mode, reported in alert
/// mode. Decisions go to journald (SYSLOG_IDENTIFIER=agent-monitor) and to a JSON audit trail.
#[derive(Debug, Parser)]
#[command(name = "agent-monitor", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the privileged daemon: load the kernel programs and the policies, serve the control socket.
    ///
    /// Needs root. Refuses to start if any policy file is invalid. The programs and maps are pinned
    /// in bpffs (--pin-dir): enforcement goes on when the daemon stops or dies, and a restarted
    /// daemon adopts them. `daemon --uninstall` removes them and so ends enforcement. SIGHUP
    /// reloads the policy directory.
    Daemon(DaemonArgs),
    /// Run a command as an agent: `agent-monitor run --agent coder -- python3 tool.py`.
    ///
    /// The daemon places this process in the agent's (agent, task) cgroup, then the command starts
    /// there; it and all its descendants are the agent. Exits with the command's status, or 128+N
    /// if a signal N killed it (137: killed, e.g. a denied exec). Exit 125: agent-monitor itself
    /// failed (daemon not running, no policy for the agent); 127: command not found.
    Run(RunArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show agents, their tasks and live processes, counters and what is enforcing.
    Status(StatusArgs),
    /// Re-read the daemon's policy directory and apply it to running agents too.
    ///
    /// All or nothing: if any file is invalid nothing changes, the error (file, line, reason) is
    /// printed and the exit status is 1. Same as sending SIGHUP to the daemon.
    Reload(SocketOnlyArgs),
    /// Show recent agent actions, and with --follow every new one as it happens.
    Events(EventsArgs),
}

#[derive(Debug, Args)]
pub struct SocketArg {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", env = "AGENT_MONITOR_SOCKET", default_value = DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Directory of policy files, one `*.toml` per agent.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/agent-monitor/policies"
    )]
    pub policies: PathBuf,
    /// Append every action (allowed ones too) as one JSON object per line to this file.
    #[arg(long, value_name = "PATH")]
    pub json_log: Option<PathBuf>,
    /// Also send allowed actions to journald (denials and alerts always go there).
    #[arg(long)]
    pub journal_allowed: bool,
    /// bpffs directory where programs, links and maps are pinned; a restarted daemon adopts what
    /// it finds there.
    #[arg(long, value_name = "DIR", default_value = crate::bpf::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Remove the pinned programs and maps of --pin-dir and exit: enforcement stops. Refused while
    /// a daemon runs on that directory.
    #[arg(long)]
    pub uninstall: bool,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Identical denials (same agent, task, action, object) within this many seconds reach journald
    /// once, then as one summary with the count; the JSON trail keeps every one. 0: no aggregation.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub storm_window: u64,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct SocketOnlyArgs {
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new actions as they happen (until interrupted).
    #[arg(long, short)]
    pub follow: bool,
    /// Only this agent's actions.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// One JSON object per line (the audit-trail format).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Agent to run as; a policy file for it must be loaded.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// Task id this run works on (default: a fresh id, `run-<pid>`).
    #[arg(long, value_name = "ID")]
    pub task: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file or a directory of them; exit 1 and name file, line and value on error.
    Check {
        /// A `*.toml` file or a directory.
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "run",
            "--agent",
            "coder",
            "--",
            "sh",
            "-c",
            "echo --agent",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.agent, "coder");
        assert_eq!(r.command, ["sh", "-c", "echo --agent"]);
    }

    #[test]
    fn run_without_command_is_an_error() {
        assert!(Cli::try_parse_from(["agent-monitor", "run", "--agent", "x"]).is_err());
    }
}
