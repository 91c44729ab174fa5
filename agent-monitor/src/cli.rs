//! Command-line interface: the daemon and its clients.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::control::DEFAULT_SOCKET;

/// Kernel-enforced allowlists for AI agents.
///
/// Every connect and exec of an agent process (and of everything it starts) is checked against
/// that agent's allowlist when it happens: blocked in the kernel in enforce mode, reported in alert
/// mode. Decisions go to journald and to a JSON audit trail. Query journald by the fields journald
/// sets itself, never by SYSLOG_IDENTIFIER alone (any process can write that):
/// `journalctl _UID=0 _EXE=/usr/bin/agent-monitor AGENT_ID=coder VERDICT=denied`;
/// `agent-monitor status` prints the exact query for the running daemon.
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
    /// reloads the policy directory; SIGUSR1 reopens the JSON trail (after logrotate renamed it).
    Daemon(DaemonArgs),
    /// Run a command as an agent: `agent-monitor run --agent coder -- python3 tool.py`.
    ///
    /// The daemon places this process in the agent's (agent, task) cgroup, then the command starts
    /// there; it and all its descendants are the agent. They may trace, read or signal only
    /// processes of their own task (a Landlock domain; attempts on others are refused and
    /// reported; without Landlock ABI 6 `run` warns and goes on). Exits with the command's status, or 128+N
    /// if a signal N killed it (137: killed, e.g. a denied exec). Exit 125: agent-monitor itself
    /// failed (daemon not running, no policy for the agent); 127: command not found.
    Run(RunArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show agents, their tasks and live processes, counters and what is enforcing, and the
    /// journalctl query that selects only this daemon's journald entries.
    Status(StatusArgs),
    /// Re-read the daemon's policy directory and apply it to running agents too.
    ///
    /// All or nothing: if any file is invalid nothing changes, the error (file, line, reason) is
    /// printed and the exit status is 1. Same as sending SIGHUP to the daemon.
    Reload(SocketOnlyArgs),
    /// Show recent agent actions, and with --follow every new one as it happens.
    ///
    /// Read from the daemon itself (control socket), not from journald: only what the daemon
    /// recorded shows, never an entry another process wrote to journald.
    Events(EventsArgs),
    /// Start and end tasks of an agent, with short-lived grants (root or the --admin-group).
    #[command(subcommand)]
    Task(TaskCommand),
    /// Work with the JSON audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write man pages or shell completions generated from this command line (for packaging).
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
    /// The local CA that signs the certificates agents see on intercepted HTTPS connections
    /// (hosts with `[[network.http]]` method/path rules; docs/http-interception.md).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Show the held requests of ask-mode agents, oldest first (root or the --admin-group).
    ///
    /// An agent with `mode = "ask"` waits while its DNS query, connect or exec off its list (or
    /// its open of a file its [files] denies) is held; decide with `approve ID` or `deny ID` before the daemon's --ask-timeout denies it.
    /// With --follow, every new request and every decision is shown as it happens.
    Pending(crate::ask_cmd::PendingArgs),
    /// Approve a held request: --once (this call), --task [--ttl D] (a grant of its task) or
    /// --always (appended to the agent's `<agent>.approved.toml`, then reloaded).
    ///
    /// The approval's kernel entry is written first, then the held call is released and the
    /// kernel judges it again. Never from inside an agent (not even as root). An open of a
    /// denied file takes --once or --task only (the policy cannot allow a file despite
    /// files.deny).
    Approve(crate::ask_cmd::ApproveArgs),
    /// Deny a held request: the agent's call fails (EPERM; a DNS query gets REFUSED).
    Deny(crate::ask_cmd::DenyArgs),
    /// A live console: agents, tasks and their processes, a feed of actions, counters, and the
    /// held requests of ask-mode agents, with keys to approve (once, for the task, always) or deny.
    ///
    /// Root or the daemon's --admin-group, outside every agent. Needs an interactive terminal
    /// (also over ssh: `ssh -t HOST agent-monitor top`).
    Top(crate::console::TopArgs),
    /// The file-guard process the daemon starts (docs/files.md): holds the fanotify marks of
    /// `[files]` while the daemon is down.
    #[command(hide = true)]
    FileGuard(crate::files::FileGuardArgs),
}

/// Packaging helpers: `cargo xtask package` calls these, so the man pages and completions always
/// describe the binary they ship with.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// One man page per command and subcommand (agent-monitor.1, agent-monitor-run.1, ...).
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// The completion script for one shell, written into DIR under the shell's usual file name.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
        /// Directory to write the script into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
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
    /// Narrow a task: keep only some of its grants and/or end them sooner. A process of the task
    /// may narrow its own task (never widen it).
    Narrow(TaskNarrowArgs),
}

#[derive(Debug, Args)]
pub struct TaskNarrowArgs {
    /// Agent whose task this is.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// Task id.
    #[arg(long, value_name = "ID")]
    pub task: String,
    /// Keep this connect grant (as it was granted); repeatable. Grants not kept are revoked.
    #[arg(long, value_name = "ADDR")]
    pub keep_connect: Vec<String>,
    /// Keep this exec grant (as it was granted); repeatable.
    #[arg(long, value_name = "PATH")]
    pub keep_exec: Vec<String>,
    /// End the kept grants within this duration (never later than they would have).
    #[arg(long, value_name = "DURATION", value_parser = crate::identity::tasks::parse_ttl)]
    pub ttl: Option<std::time::Duration>,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Args)]
pub struct TaskStartArgs {
    /// Agent whose task this is; a policy file for it must be loaded.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// Task id (1-64 of A-Z a-z 0-9 _ - .); `run --task ID` joins it.
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
    /// Agent whose task this is.
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// Task id.
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
    /// Append every action (allowed ones too) as one JSON object per line to this file. Every
    /// line ends in a `chain` field (seq and hash) linking it to the line before, across
    /// rotations; `agent-monitor audit verify` checks it.
    #[arg(long, value_name = "PATH")]
    pub json_log: Option<PathBuf>,
    #[command(flatten)]
    pub trail: crate::output::rotate::RotationArgs,
    #[command(flatten)]
    pub otlp: crate::output::otlp::OtlpArgs,
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
    /// File where the daemon keeps the task grants in force (rewritten atomically on every
    /// change), so that a restarted daemon takes them over instead of revoking them: the pinned
    /// kernel maps keep the grants but not their rules as written or their task's name.
    #[arg(
        long,
        value_name = "PATH",
        default_value = crate::identity::grant_state::DEFAULT_STATE_FILE
    )]
    pub state_file: PathBuf,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Identical denials (same agent, task, action, object) within this many seconds reach journald
    /// once, then as one summary with the count; the JSON trail keeps every one. 0: no aggregation.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub storm_window: u64,
    /// Members of this group may use the control socket like root (run, task start/end, status);
    /// the socket becomes root:GROUP 0660. Without it the socket is root-only.
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Trust domain of the agents' workload identities, spiffe://DOMAIN/agent/NAME (default: the
    /// host name, lower-cased).
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
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
    #[command(flatten)]
    pub intercept: crate::intercept::InterceptArgs,
    #[command(flatten)]
    pub ask: crate::ask_cmd::AskDaemonArgs,
    /// How the bytes of a connection admitted by a `[[network.tls]]` rule pass: `splice`
    /// (splice(2) through pipes, driven by the daemon) or `kernel` (a sockmap whose sk_skb
    /// verdict program passes them inside the kernel, without waking the daemon per chunk;
    /// measured slower than splice on loopback, see docs/egress.md). Where the kernel refuses the
    /// program, or its map is full, connections are spliced (logged).
    #[arg(long, value_enum, value_name = "HOW", default_value = "splice")]
    pub egress_relay: crate::egress::RelayChoice,
    /// Where the server name of a connection is judged when every name its address was learned
    /// from has only `[[network.tls]]` rules: `kernel` (the connection goes straight to the
    /// server; the kernel judges its ClientHello where its packets leave, and drops its data if
    /// refused, then the daemon closes it) or `endpoint` (redirected to the egress endpoint,
    /// which judges and relays; bytes and duration are counted). Port 80 (plain HTTP, judged by
    /// its `Host`), addresses of names with `[[network.http]]` rules, and sockets an agent did
    /// not create always go to the endpoint. See docs/egress.md.
    #[arg(long, value_enum, value_name = "WHERE", default_value = "kernel")]
    pub server_names: crate::egress::ServerNameCheck,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of JSON audit trail files and name the first line that was edited,
    /// deleted, inserted, reordered or cut short.
    ///
    /// Give the live file and its rotated files, in any order (`audit.jsonl*`; compressed ones
    /// uncompressed first): they are checked as one chain, in the order of their sequence
    /// numbers. Anyone who can write the files can also recompute the chain, so check it against
    /// a head the daemon wrote to journald (`journalctl MESSAGE_ID=858ddc9a713a495cbbc0227a5b02e866
    /// -o verbose` shows AUDIT_CHAIN_SEQ and AUDIT_CHAIN_HASH; see docs/operation.md) with
    /// `--head SEQ:HASH`. Exit 0: intact (and every head matches); 1: tampered, the first broken
    /// line is named on stderr as FILE:LINE: what; 2: a file could not be read, or bad usage.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The trail files (the live one and its rotated predecessors).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A chain head the daemon wrote to journald, `SEQ:HASH`: the line with that seq must have
    /// that hash, and the trail must reach it (repeatable).
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_chain_head)]
    pub head: Vec<ChainHeadArg>,
}

/// `--head SEQ:HASH` of `audit verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHeadArg {
    pub seq: u64,
    pub hash: String,
}

fn parse_chain_head(s: &str) -> Result<ChainHeadArg, String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or("expected SEQ:HASH (AUDIT_CHAIN_SEQ:AUDIT_CHAIN_HASH)")?;
    let seq = seq.parse().map_err(|e| format!("seq {seq:?}: {e}"))?;
    let hash = hash.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("hash {hash:?}: expected 64 hex digits"));
    }
    Ok(ChainHeadArg { seq, hash })
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
    /// Run the command as this user (name or uid), with its groups, after placement and before
    /// exec. The agent then cannot leave its cgroup: that needs write access to root-owned
    /// cgroup.procs files. The uid is bound to the agent first: every process of that uid on the
    /// host is then this agent, whoever starts it (cron, sshd, systemd, su…), across reloads and
    /// restarts, until the agent's policy is removed. Refused for root and for a uid selected by
    /// or bound to another agent; the uid should be the agent's own, dedicated one.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Primary group for --user (default: the user's own).
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
    /// Keep every capability of root (and no no_new_privs). Without it a root agent (no --user)
    /// keeps uid 0 but only chown, dac_override, fowner, fsetid, setuid, setgid,
    /// net_bind_service and sys_chroot, cannot write beneath /proc, /sys or /dev nor the
    /// daemon's own files, cannot mount or use clone3 or bpf, and no exec gives anything back; a
    /// --user agent keeps nothing. With it the
    /// agent can undo its own confinement and everyone else's: `run` warns on stderr and the
    /// daemon logs a warning notice.
    #[arg(long)]
    pub keep_capabilities: bool,
    #[command(flatten)]
    pub socket: SocketArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file or a directory of them; exit 1 and name file, line and value on error.
    ///
    /// Also checks that the policies fit the kernel's maps (allowlist entries, port ranges per
    /// entry, agents, selectors), as the daemon does before it loads anything; give it the whole
    /// policy directory, since the limits are for all agents together.
    Check {
        /// A `*.toml` file or a directory.
        path: PathBuf,
    },
    /// Suggest a policy for an agent from what it did, as recorded in the JSON audit trail.
    ///
    /// Record by running the agent in alert mode with an empty allowlist (`mode = "alert"`, no
    /// entries) and the daemon's `--json-log`; then suggest from that trail. The policy printed on
    /// stdout allows exactly the recorded connects (as ADDR:PORT; host names where the trail names
    /// them and the policy format takes them, else in the comment) and the recorded programs (exact
    /// paths), nothing more; `--widen` is the only way to allow more, and each widened entry says
    /// so. Every entry has a comment: how often and when it was seen, by which tasks and process
    /// chains, and with which verdicts: actions recorded as denied are suggested too (the agent
    /// tried them), their comment says `denied`. The suggested mode is enforce (the comment above
    /// `mode` says so). Review before use.
    ///
    /// Requests recorded through interception (`ACTION=http` with `HTTP_METHOD`) become
    /// `[[network.http]]` rules: per host and port, the exact normalised paths grouped by the
    /// methods seen with them (`--widen paths` makes prefixes); another name on a port with
    /// request rules becomes a `[[network.tls]]` rule (docs/learning.md).
    ///
    /// With `--merge FILE`, the entries the existing policy does not already allow are appended
    /// to it, keeping its comments and layout (and its mode); the merged policy goes to stdout and
    /// the difference (the added entries, each with its comment) to stderr.
    ///
    /// stderr also names every malformed trail line (file:line: what was expected) and what could
    /// not be suggested. Exit 0: suggestion from every line; 1: printed, but some lines were
    /// malformed and are not in it; 2: nothing printed (unreadable trail or merge file, no
    /// recorded action of the agent).
    Suggest(SuggestArgs),
    /// Replay recorded actions through the daemon's evaluator and list those POLICY would not allow.
    ///
    /// Every connect and exec of POLICY's agent(s) in the trail is judged exactly as the daemon
    /// judges it; an open (a file `[files]` denies) is judged by its recorded name; a request
    /// interception judged (`ACTION=http`) by interception's own matcher on its server name,
    /// `Host`, method and path; a connect to a learned address on a port with request rules as
    /// redirected to the egress endpoint. Each one not
    /// allowed is printed with its trail line (file:line: what, by which
    /// process chain, why). Exit 0: all allowed; 1: some would be denied (or, for an alert-mode
    /// policy, reported); 2: bad input (unreadable or invalid policy or trail, malformed trail
    /// lines: the replay is then incomplete and says so, or no action of POLICY's agents in it).
    Test(TestArgs),
}

/// How `policy suggest --widen` may go beyond what was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Widen {
    /// Several ports of one destination become one range, lowest to highest.
    Ports,
    /// Several addresses of one IPv4 /24 (IPv6 /64) with the same ports become that network.
    Cidr,
    /// Several programs of one directory become `DIR/*`.
    Globs,
    /// `[[network.http]]` paths become prefixes (`DIR/*`), per host, port and methods seen
    /// (methods are never widened): a segment that looks like an identifier (all digits, a hex
    /// hash of 7+ characters, a UUID, a 20+ character token of letters and digits) and all that
    /// follows it becomes `*` (`/repos/acme/pulls/123/files` → `/repos/acme/pulls/*`); 3 or more
    /// distinct entries directly under one directory become `DIR/*`. Never `/*`: an identifier
    /// as the first segment, and entries directly under `/`, stay exact.
    Paths,
}

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// The agent to suggest a policy for (its `agent_id` in the trail).
    #[arg(long, value_name = "NAME")]
    pub agent: String,
    /// The JSON audit trail (the daemon's `--json-log` file).
    #[arg(long, value_name = "AUDIT.jsonl")]
    pub events: PathBuf,
    /// Only actions of this task (repeat for several; default: every task).
    #[arg(long, value_name = "ID")]
    pub task: Vec<String>,
    /// Allow more than was recorded, in these ways only (repeat or separate with commas).
    #[arg(long, value_name = "HOW", value_delimiter = ',')]
    pub widen: Vec<Widen>,
    /// An existing policy of the agent to add to; the difference goes to stderr.
    #[arg(long, value_name = "EXISTING.toml")]
    pub merge: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// A policy file, or a directory of them (each agent's actions against its own policy).
    pub policy: PathBuf,
    /// The JSON audit trail to replay.
    #[arg(long, value_name = "AUDIT.jsonl")]
    pub events: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print where the CA certificate and the agents' bundle are, and the certificate's SHA-256
    /// fingerprint (compare with `openssl x509 -noout -fingerprint -sha256 -in FILE`).
    Show(CaDirArg),
    /// Replace the CA with a new one (root), then ask the daemon to reload, which re-reads it.
    ///
    /// Agents started afterwards get the new CA in their bundle. Running agents that already read
    /// the bundle trust only the old CA and fail TLS on intercepted hosts until restarted.
    Rotate(CaRotateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CaDirArg {
    /// The daemon's CA directory (its --ca-dir).
    #[arg(long, value_name = "DIR", default_value = crate::intercept::ca::DEFAULT_CA_DIR)]
    pub ca_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CaRotateArgs {
    #[command(flatten)]
    pub dir: CaDirArg,
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
    fn suggest_takes_repeated_and_comma_separated_widenings() {
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "policy",
            "suggest",
            "--agent",
            "coder",
            "--events",
            "a.jsonl",
            "--widen",
            "ports,cidr",
            "--widen",
            "globs",
            "--task",
            "t1",
            "--task",
            "t2",
        ])
        .unwrap();
        let Command::Policy(PolicyCommand::Suggest(s)) = cli.command else {
            panic!()
        };
        assert_eq!(s.widen, [Widen::Ports, Widen::Cidr, Widen::Globs]);
        assert_eq!(s.task, ["t1", "t2"]);
        assert!(s.merge.is_none());
        assert!(
            Cli::try_parse_from([
                "agent-monitor",
                "policy",
                "suggest",
                "--agent",
                "a",
                "--events",
                "e",
                "--widen",
                "everything"
            ])
            .is_err()
        );
    }

    #[test]
    fn run_without_command_is_an_error() {
        assert!(Cli::try_parse_from(["agent-monitor", "run", "--agent", "x"]).is_err());
    }

    #[test]
    fn audit_verify_takes_files_and_heads() {
        let hash = "ab".repeat(32);
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "audit",
            "verify",
            "--head",
            &format!("41:{}", hash.to_uppercase()),
            "a.jsonl",
            "a.jsonl.1",
        ])
        .unwrap();
        let Command::Audit(AuditCommand::Verify(v)) = cli.command else {
            panic!()
        };
        assert_eq!(v.files.len(), 2);
        assert_eq!(v.head, [ChainHeadArg { seq: 41, hash }]);
        for bad in ["41", "x:ab", "41:abc"] {
            let r = Cli::try_parse_from(["agent-monitor", "audit", "verify", "--head", bad, "a"]);
            assert!(r.is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["agent-monitor", "audit", "verify"]).is_err());
    }

    #[test]
    fn daemon_trail_and_otlp_flags_have_sane_defaults() {
        let cli = Cli::try_parse_from(["agent-monitor", "daemon"]).unwrap();
        let Command::Daemon(d) = cli.command else {
            panic!()
        };
        assert_eq!(d.trail.rotation(), None, "no size rotation by default");
        assert_eq!(d.trail.json_log_keep, 10);
        assert!(d.otlp.config().is_none());
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "daemon",
            "--json-log-max-size",
            "64M",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
        ])
        .unwrap();
        let Command::Daemon(d) = cli.command else {
            panic!()
        };
        assert_eq!(d.trail.rotation().unwrap().max_size, 64 << 20);
        let otlp = d.otlp.config().unwrap();
        assert_eq!(otlp.endpoint.to_string(), "http://127.0.0.1:4318/v1/logs");
        assert_eq!(otlp.queue, 8192);
        assert_eq!(otlp.actions, crate::output::otlp::OtlpActions::All);
        let cli = Cli::try_parse_from([
            "agent-monitor",
            "daemon",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--otlp-actions",
            "denied-and-alerts",
        ])
        .unwrap();
        let Command::Daemon(d) = cli.command else {
            panic!()
        };
        assert_eq!(
            d.otlp.config().unwrap().actions,
            crate::output::otlp::OtlpActions::DeniedAndAlerts
        );
        for bad in [
            &["--json-log-keep", "0"][..],
            &["--otlp-actions", "all"],
            &[
                "--otlp-endpoint",
                "http://c:4318",
                "--otlp-actions",
                "denied",
            ],
            &["--otlp-endpoint", "https://c:4318"],
        ] {
            let args = ["agent-monitor", "daemon"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }
}
