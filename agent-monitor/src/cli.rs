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
    /// Needs root. Refuses to start if any policy file is invalid. Enforcement lasts while the
    /// daemon runs.
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
    /// DNS server the agents' DNS proxy forwards allowed queries to (default: the first
    /// `nameserver` of /etc/resolv.conf, port 53).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Seconds an address learned from a DNS answer stays allowed beyond the answer's TTL, so a
    /// connect right at the TTL's end still finds it.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub dns_grace: u64,
    /// Milliseconds the proxy waits for the upstream before answering SERVFAIL.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub dns_timeout_ms: u64,
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
