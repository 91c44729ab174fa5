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
    /// Start and end tasks of an agent, with short-lived grants (root or the --admin-group).
    #[command(subcommand)]
    Task(TaskCommand),
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Start (or extend) a task: grant it connects and execs beyond the agent's allowlist, for a
    /// limited time, to this task only. Other tasks of the agent never see these grants; the
    /// kernel stops honouring them at the TTL even if the daemon is busy.
    ///
    /// `--pid P` also moves process P (an agent process of AGENT) into the task: a `run` process
    /// changes cgroup, a selector-identified one is re-tagged. Its later children follow it.
    Start(TaskStartArgs),
    /// End a task: its grants are revoked at once. A process of the task may end its own task.
    End(TaskEndArgs),
}

#[derive(Debug, Args)]
pub struct TaskStartArgs {
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    #[arg(long, value_name = "ID")]
    pub task: String,
    /// Allow connects to ADDR[/PREFIX]:PORT (policy syntax), repeatable.
    #[arg(long, value_name = "ADDR")]
    pub allow_connect: Vec<String>,
    /// Allow exec of PATH (exact, or a prefix ending in *), repeatable.
    #[arg(long, value_name = "PATH")]
    pub allow_exec: Vec<String>,
    /// How long the grants last (30s, 10m, 1h30m); without it, until `task end`.
    #[arg(long, value_name = "DURATION", value_parser = crate::identity::tasks::parse_ttl)]
    pub ttl: Option<std::time::Duration>,
    /// Move this process (an agent process of AGENT) into the task.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct TaskEndArgs {
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    #[arg(long, value_name = "ID")]
    pub task: String,
    #[command(flatten)]
    pub socket: SocketArg,
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
    /// Members of this group may use the control socket like root (run, task start/end, status);
    /// the socket becomes root:GROUP 0660. Without it the socket is root-only.
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Trust domain of the agents' workload identities, spiffe://DOMAIN/agent/NAME (default: the
    /// host name, lower-cased).
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
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
    /// Run the command as this user (name or uid), with its groups, after placement and before
    /// exec. The agent then cannot leave its cgroup: that needs write access to root-owned
    /// cgroup.procs files.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Primary group for --user (default: the user's own).
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
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
    fn task_start_parses_grants_and_ttl() {
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "task",
            "start",
            "--agent",
            "coder",
            "--task",
            "t1",
            "--allow-connect",
            "10.0.0.1:443",
            "--allow-connect",
            "[::1]:80",
            "--ttl",
            "10m",
        ])
        .unwrap();
        let Command::Task(TaskCommand::Start(t)) = cli.command else {
            panic!()
        };
        assert_eq!(t.allow_connect.len(), 2);
        assert_eq!(t.ttl, Some(std::time::Duration::from_secs(600)));
        let bad = Cli::try_parse_from([
            "agent-monitor",
            "task",
            "start",
            "--agent",
            "a",
            "--task",
            "t",
            "--ttl",
            "soon",
        ]);
        assert!(bad.unwrap_err().to_string().contains("expected a duration"));
    }

    #[test]
    fn run_without_command_is_an_error() {
        assert!(Cli::try_parse_from(["agent-monitor", "run", "--agent", "x"]).is_err());
    }
}
