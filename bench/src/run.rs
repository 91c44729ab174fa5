//! The benchmark run: overhead per setup (interleaved repetitions), event capacity, start-up time
//! (also against policy size), memory per tracked process. Collects everything into [`Results`] for the report.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::load::{OpStats, RateStats};
use crate::machine::Machine;
use crate::setups::{Auditd, Bpftrace, Daemon, DaemonConfig, Dnsmasq, Listener, wait_for};

/// The agent the benchmark runs as (unique, so it never meets another helper's policies).
pub const AGENT: &str = "ambench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    NoMonitor,
    OutsideAgent,
    AgentAllowed,
    AgentDenied,
    Auditd,
    Bpftrace,
}

impl Setup {
    pub const ALL: [Setup; 6] = [
        Setup::NoMonitor,
        Setup::OutsideAgent,
        Setup::AgentAllowed,
        Setup::AgentDenied,
        Setup::Auditd,
        Setup::Bpftrace,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Setup::NoMonitor => "no monitor",
            Setup::OutsideAgent => "agent-monitor, outside any agent",
            Setup::AgentAllowed => "agent-monitor, agent allowed",
            Setup::AgentDenied => "agent-monitor, agent denied",
            Setup::Auditd => "auditd (connect, execve rules)",
            Setup::Bpftrace => "bpftrace (printf per event)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Setup::NoMonitor => "none",
            Setup::OutsideAgent => "agent-monitor, outside",
            Setup::AgentAllowed => "agent-monitor, allowed",
            Setup::AgentDenied => "agent-monitor, denied",
            Setup::Auditd => "auditd",
            Setup::Bpftrace => "bpftrace",
        }
    }
}

/// How much to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    pub reps: usize,
    pub connects: usize,
    pub execs: usize,
    pub rates: Vec<u64>,
    pub rate_secs: f64,
    pub tracked: usize,
    pub startups: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 2,
                connects: 1000,
                execs: 150,
                rates: vec![1_000, 10_000, 100_000, 0],
                rate_secs: 1.5,
                tracked: 2_000,
                startups: 2,
            }
        } else {
            Plan {
                quick,
                // Agent-monitor's exec cost is ~1 % of a fork+exec, near this machine's
                // repetition-to-repetition drift: 25 repetitions of 1500 resolve it (15 of 1000
                // gave interquartile ranges of several points).
                reps: 25,
                connects: 5000,
                execs: 1500,
                rates: vec![1_000, 10_000, 50_000, 100_000, 200_000, 0],
                rate_secs: 4.0,
                tracked: 10_000,
                startups: 5,
            }
        }
    }
}

/// One setup's samples: per repetition, the median per-operation time of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Samples {
    pub connect_ns: Vec<u64>,
    pub exec_ns: Vec<u64>,
    /// Outcomes seen, summed over repetitions: (ok, refused, other).
    pub connect_outcomes: (usize, usize, usize),
    pub exec_outcomes: (usize, usize, usize),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CapacityStep {
    pub load: RateStats,
    /// connect records that reached the JSON trail.
    pub in_trail: u64,
    /// Records the kernel counted as lost (ring buffer full).
    pub kernel_lost: u64,
    /// Daemon CPU time per second of load, in % of one core.
    pub daemon_cpu_pct: f64,
    pub daemon_peak_rss_kib: u64,
    /// From the end of the load until the trail held every record (or gave up).
    pub drain_ms: u64,
    /// The daemon was stopped (SIGSTOP) for the whole load: what happens when it cannot keep up.
    #[serde(default)]
    pub daemon_stalled: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Memory {
    pub processes: usize,
    pub tracked: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub peak_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Criterion {
    pub id: String,
    pub median_ns: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub plan: Plan,
    pub machine: Machine,
    pub overhead: Vec<(Setup, Samples)>,
    pub capacity: Vec<CapacityStep>,
    pub startup_ms: Vec<f64>,
    pub memory: Option<Memory>,
    pub criterion: Vec<Criterion>,
    pub minutes: f64,
    /// What the daemon attached, from its start-up log ("program → hook").
    #[serde(default)]
    pub attached: Vec<String>,
    /// Per repetition, a DNS query loop straight to the upstream and through the agent's proxy.
    #[serde(default)]
    pub dns: Option<DnsLatency>,
    /// `policy check` and daemon start-up against the number of allowlist entries.
    #[serde(default)]
    pub policy_size: Vec<crate::policy_size::PolicySizeStep>,
    /// Opens of unrelated and marked files, outside agents and as an agent (`[files]`).
    #[serde(default)]
    pub files: Option<crate::files::FilesLatency>,
    /// An ask-mode agent's allowed connect and exec, and the release of a held call.
    #[serde(default)]
    pub ask: Option<crate::ask::AskLatency>,
    /// Per repetition, a unix-socket connect loop: bare, outside every agent, as an agent.
    #[serde(default)]
    pub unix: Option<crate::unix_bench::UnixLatency>,
    /// Per repetition, small requests and a download straight to a server and through the egress
    /// endpoint (a server-name rule).
    #[serde(default)]
    pub egress: Option<EgressCost>,
    /// Interception (HTTPS judged per request) against direct TLS, memory per connection through
    /// the endpoint, connects of an agent with request rules to destinations without them.
    #[serde(default)]
    pub intercept: Option<crate::intercept_bench::InterceptCost>,
}

/// Per repetition (interleaved): the same loads outside agents (direct) and as an agent with a
/// `[[network.tls]]` rule for the server's name (through the egress endpoint).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EgressCost {
    pub requests: usize,
    pub mib: u64,
    pub direct: Vec<OpStats>,
    pub through: Vec<OpStats>,
    pub direct_download: Vec<crate::egress::Download>,
    pub through_download: Vec<crate::egress::Download>,
    /// The daemon's CPU time (user + system, s) during each download through the endpoint: what
    /// passing the bytes costs it, whatever else the machine runs.
    #[serde(default)]
    pub through_daemon_cpu_s: Vec<f64>,
}

/// Per repetition (interleaved): the same query loop to the upstream directly (outside any agent)
/// and as an agent, whose queries the kernel redirects to the daemon's DNS proxy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsLatency {
    pub queries: usize,
    pub direct: Vec<OpStats>,
    pub proxied: Vec<OpStats>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops between measurements after Ctrl-C/SIGTERM, so the guards restore the machine.
pub(crate) fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the monitors started were stopped");
    }
    Ok(())
}

pub struct Env {
    pub plan: Plan,
    pub bin: PathBuf,
    pub bench: PathBuf,
    pub daemon: DaemonConfig,
    pub tcp_port: u16,
    pub udp_port: u16,
    pub deny_port: u16,
}

pub fn run(
    root: &Path,
    quick: bool,
    criterion_dir: Option<&Path>,
    only: &[String],
    dir: &Path,
) -> anyhow::Result<Results> {
    let phase = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let machine = Machine::describe();
    let plan = Plan::new(quick);
    let bin = root.join("target/release/agent-monitor");
    let bench = std::env::current_exe().context("locating the bench binary")?;
    std::fs::create_dir_all(dir)?;
    let tcp_port = free_port()?;
    let udp_port = tcp_port.wrapping_add(1);
    let deny_port = tcp_port.wrapping_add(2);
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{AGENT}.toml")),
        format!(
            "agent = \"{AGENT}\"\nmode = \"enforce\"\n[network]\nallow = [\"127.0.0.1:{tcp_port}\", \
             \"127.0.0.1:{udp_port}\"]\n[exec]\nallow = [\"{}\", \"/bin/true\"]\n",
            bench.display()
        ),
    )?;
    let env = Env {
        daemon: DaemonConfig {
            bin: bin.clone(),
            policies,
            dir: dir.to_path_buf(),
            extra: Vec::new(),
        },
        plan,
        bin,
        bench,
        tcp_port,
        udp_port,
        deny_port,
    };
    eprintln!(
        "bench: {} mode, machine: {} ({} cores), load average at start {:.2}",
        if quick { "quick" } else { "full" },
        machine.cpu,
        machine.cores,
        machine.load_start[0]
    );
    let overhead = if phase("overhead") {
        overhead(&env, dir)?
    } else {
        Vec::new()
    };
    let capacity = if phase("capacity") {
        capacity(&env)?
    } else {
        Vec::new()
    };
    let startup_ms = if phase("startup") {
        startup(&env)?
    } else {
        Vec::new()
    };
    let policy_size = if phase("policy_size") {
        crate::policy_size::measure(&env, dir)?
    } else {
        Vec::new()
    };
    let attached = attached_hooks(&env)?;
    let memory = if phase("memory") { memory(&env)? } else { None };
    let dns = if phase("dns") {
        Some(dns(&env, dir)?)
    } else {
        None
    };
    let files = if phase("files") {
        Some(crate::files::measure(&env, dir)?)
    } else {
        None
    };
    let ask = if phase("ask") {
        crate::ask::measure(&env, dir)?
    } else {
        None
    };
    let unix = if phase("unix") {
        Some(crate::unix_bench::measure(&env, dir)?)
    } else {
        None
    };
    let egress = if phase("egress") {
        Some(egress(&env, dir)?)
    } else {
        None
    };
    let intercept = if phase("intercept") {
        Some(crate::intercept_bench::measure(&env, dir)?)
    } else {
        None
    };
    let criterion = criterion_dir
        .map(read_criterion)
        .transpose()?
        .unwrap_or_default();
    let mut machine = machine;
    machine.finish();
    Ok(Results {
        plan: env.plan,
        machine,
        overhead,
        capacity,
        startup_ms,
        memory,
        criterion,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        attached,
        dns,
        policy_size,
        files,
        ask,
        unix,
        egress,
        intercept,
    })
}

const EGRESS_AGENT: &str = "egressbench";
const EGRESS_NAME: &str = "egress.ok.test";

fn egress(env: &Env, dir: &Path) -> anyhow::Result<EgressCost> {
    let p = &env.plan;
    let requests = if p.quick { 200 } else { 2000 };
    let mib = if p.quick { 64 } else { 1024 };
    let reps = p.reps.min(5);
    let listener = std::net::TcpListener::bind("127.0.0.3:0")?;
    let port = listener.local_addr()?.port();
    crate::egress::serve(listener);
    let upstream = Dnsmasq::start(
        dir,
        free_port()?,
        &[format!("--address=/{EGRESS_NAME}/127.0.0.3")],
    )?;
    let policies = dir.join("egress-policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{EGRESS_AGENT}.toml")),
        format!(
            "agent = \"{EGRESS_AGENT}\"\nmode = \"enforce\"\n[exec]\nallow = [\"{}\"]\n\
             [dns]\nprivate_answers = [\"{EGRESS_NAME}\"]\n\
             [[network.tls]]\nhost = \"{EGRESS_NAME}\"\nport = {port}\n",
            env.bench.display()
        ),
    )?;
    let cfg = DaemonConfig {
        policies,
        extra: vec![s("--dns-upstream"), format!("127.0.0.1:{}", upstream.port)],
        ..env.daemon.clone()
    };
    let d = Daemon::start(&cfg, "egress")?;
    let small = vec![
        s("egress-requests"),
        s("--n"),
        s(requests),
        s("--name"),
        s(EGRESS_NAME),
        s("--port"),
        s(port),
    ];
    let large = vec![
        s("egress-download"),
        s("--mib"),
        s(mib),
        s("--name"),
        s(EGRESS_NAME),
        s("--port"),
        s(port),
    ];
    let mut out = EgressCost {
        requests,
        mib,
        ..EgressCost::default()
    };
    for rep in 0..reps {
        check_interrupt()?;
        // Outside agents the name resolves through the host's resolver too (dnsmasq is not it):
        // the test name is only known upstream, so the direct loads connect by address.
        let direct: OpStats = load(env, None, &with_name(&small, "127.0.0.3"))?;
        let through: OpStats = load_as(env, EGRESS_AGENT, (&d, &format!("egress-{rep}")), &small)?;
        if direct.ok != requests || through.ok != requests {
            bail!(
                "egress repetition {rep}: {} of {requests} direct and {} of {requests} requests \
                 through the endpoint were answered",
                direct.ok,
                through.ok
            );
        }
        out.direct.push(direct);
        out.through.push(through);
        out.direct_download
            .push(load(env, None, &with_name(&large, "127.0.0.3"))?);
        let cpu = cpu_secs(d.pid())?;
        out.through_download.push(load_as(
            env,
            EGRESS_AGENT,
            (&d, &format!("egress-dl-{rep}")),
            &large,
        )?);
        out.through_daemon_cpu_s.push(cpu_secs(d.pid())? - cpu);
    }
    Ok(out)
}

/// `args` with the `--name` value replaced.
fn with_name(args: &[String], name: &str) -> Vec<String> {
    let mut out = args.to_vec();
    if let Some(i) = out.iter().position(|a| a == "--name") {
        out[i + 1] = name.to_string();
    }
    out
}

/// The programs a daemon attaches, as its log names them (`attached PROGRAM → HOOK`).
fn attached_hooks(env: &Env) -> anyhow::Result<Vec<String>> {
    let d = Daemon::start(&env.daemon, "hooks")?;
    let log = std::fs::read_to_string(&d.log).unwrap_or_default();
    Ok(log
        .lines()
        .filter_map(|l| l.split_once("attached ").map(|(_, a)| a.trim().to_string()))
        .collect())
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs the bench binary's `load …` (as agent [`AGENT`] through the daemon when `daemon` is given)
/// and parses its JSON line.
pub(crate) fn load<T: serde::de::DeserializeOwned>(
    env: &Env,
    daemon: Option<(&Daemon, &str)>,
    args: &[String],
) -> anyhow::Result<T> {
    match daemon {
        Some(d) => load_as(env, AGENT, d, args),
        None => run_load(Command::new(&env.bench), args),
    }
}

/// [`load`] as agent `agent`, in task `task` of daemon `d`.
pub(crate) fn load_as<T: serde::de::DeserializeOwned>(
    env: &Env,
    agent: &str,
    (d, task): (&Daemon, &str),
    args: &[String],
) -> anyhow::Result<T> {
    let mut c = Command::new(&env.bin);
    // `--keep-capabilities`: a root agent otherwise loses CAP_SYS_NICE, and the generator runs
    // SCHED_FIFO (on the last CPU) for repeatable numbers. The hooks, the seccomp filter and the
    // Landlock scope an agent pays for per action are the same either way.
    c.args([
        "run",
        "--agent",
        agent,
        "--task",
        task,
        "--keep-capabilities",
    ])
    .arg("--control-socket")
    .arg(&d.socket)
    .arg("--")
    .arg(&env.bench);
    run_load(c, args)
}

/// Runs `cmd load ARGS` and parses the JSON line the generator prints last.
fn run_load<T: serde::de::DeserializeOwned>(
    mut cmd: Command,
    args: &[String],
) -> anyhow::Result<T> {
    cmd.arg("load").args(args);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running a load generator")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("load generator {args:?} ({}) printed {text:?}", out.status))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn overhead(env: &Env, dir: &Path) -> anyhow::Result<Vec<(Setup, Samples)>> {
    let p = &env.plan;
    let mut samples: Vec<(Setup, Samples)> = Setup::ALL
        .iter()
        .map(|&s| (s, Samples::default()))
        .collect();
    // The server is a process of its own, outside any agent, for every setup: an agent's peers
    // are not the agent, and its accept() must not be counted as the agent's connect.
    let _server = Listener::start(&env.bench, env.tcp_port)?;
    for rep in 0..p.reps {
        // Interleaved, and each repetition starts at another setup, so drift and order effects
        // spread over all setups instead of landing on one.
        for i in 0..Setup::ALL.len() {
            check_interrupt()?;
            let setup = Setup::ALL[(i + rep) % Setup::ALL.len()];
            eprintln!(
                "bench: overhead rep {}/{}: {}",
                rep + 1,
                p.reps,
                setup.label()
            );
            let (c, e) = one_setup(env, dir, setup, rep)?;
            let slot = &mut samples.iter_mut().find(|(s, _)| *s == setup).unwrap().1;
            slot.connect_ns.push(c.median_ns);
            slot.exec_ns.push(e.median_ns);
            for (acc, st) in [
                (&mut slot.connect_outcomes, &c),
                (&mut slot.exec_outcomes, &e),
            ] {
                acc.0 += st.ok;
                acc.1 += st.refused;
                acc.2 += st.other;
            }
        }
    }
    Ok(samples)
}

fn one_setup(
    env: &Env,
    dir: &Path,
    setup: Setup,
    rep: usize,
) -> anyhow::Result<(OpStats, OpStats)> {
    let p = &env.plan;
    let connect = |to: Option<u16>| {
        vec![
            s("connect"),
            s("--realtime"),
            s("--n"),
            s(p.connects),
            s("--port"),
            s(env.tcp_port),
            s("--to"),
            format!("127.0.0.1:{}", to.unwrap_or(env.tcp_port)),
        ]
    };
    let exec = |prog: &str| {
        vec![
            s("exec"),
            s("--realtime"),
            s("--n"),
            s(p.execs),
            s("--prog"),
            s(prog),
        ]
    };
    let task = format!("overhead-{rep}");
    let r = match setup {
        Setup::NoMonitor => (
            load(env, None, &connect(None))?,
            load(env, None, &exec("/bin/true"))?,
        ),
        Setup::OutsideAgent => {
            let _d = Daemon::start(&env.daemon, "overhead")?;
            (
                load(env, None, &connect(None))?,
                load(env, None, &exec("/bin/true"))?,
            )
        }
        Setup::AgentAllowed => {
            let d = Daemon::start(&env.daemon, "overhead")?;
            let t = Some((&d, task.as_str()));
            (
                load(env, t, &connect(None))?,
                load(env, t, &exec("/bin/true"))?,
            )
        }
        Setup::AgentDenied => {
            let d = Daemon::start(&env.daemon, "overhead")?;
            let t = Some((&d, task.as_str()));
            (
                load(env, t, &connect(Some(env.deny_port)))?,
                load(env, t, &exec("/bin/false"))?,
            )
        }
        Setup::Auditd => {
            let _a = Auditd::start(dir)?;
            (
                load(env, None, &connect(None))?,
                load(env, None, &exec("/bin/true"))?,
            )
        }
        Setup::Bpftrace => {
            let _b = Bpftrace::start(dir)?;
            (
                load(env, None, &connect(None))?,
                load(env, None, &exec("/bin/true"))?,
            )
        }
    };
    Ok(r)
}

/// The agent of the DNS measurement: may resolve and reach one name, run the bench binary.
const DNS_AGENT: &str = "dnsbench";
const DNS_NAME: &str = "bench.ok.test";

fn dns(env: &Env, dir: &Path) -> anyhow::Result<DnsLatency> {
    let p = &env.plan;
    let queries = if p.quick { 300 } else { 2000 };
    let reps = p.reps.min(5);
    let upstream = Dnsmasq::start(
        dir,
        free_port()?,
        &[format!("--address=/{DNS_NAME}/127.0.0.3")],
    )?;
    let policies = dir.join("dns-policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{DNS_AGENT}.toml")),
        format!(
            "agent = \"{DNS_AGENT}\"\nmode = \"enforce\"\n[network]\nallow = [\"{DNS_NAME}:443\"]\n\
             [exec]\nallow = [\"{}\"]\n\
             # dnsmasq answers with a loopback address: opted in past the rebinding check.\n\
             [dns]\nprivate_answers = [\"{DNS_NAME}\"]\n",
            env.bench.display()
        ),
    )?;
    let cfg = DaemonConfig {
        policies,
        extra: vec![s("--dns-upstream"), format!("127.0.0.1:{}", upstream.port)],
        ..env.daemon.clone()
    };
    let d = Daemon::start(&cfg, "dns")?;
    let args = |server: String| {
        vec![
            s("dns"),
            s("--n"),
            s(queries),
            s("--server"),
            server,
            s("--name"),
            s(DNS_NAME),
        ]
    };
    let mut out = DnsLatency {
        queries,
        ..DnsLatency::default()
    };
    for rep in 0..reps {
        check_interrupt()?;
        let direct: OpStats = load(env, None, &args(format!("127.0.0.1:{}", upstream.port)))?;
        // Any address on port 53: the kernel sends it to the agent's proxy.
        let proxied: OpStats = load_as(
            env,
            DNS_AGENT,
            (&d, &format!("dns-{rep}")),
            &args(s("192.0.2.1:53")),
        )?;
        if direct.ok != queries || proxied.ok != queries {
            bail!(
                "DNS repetition {rep}: {} of {queries} direct and {} of {queries} proxied queries \
                 were answered",
                direct.ok,
                proxied.ok
            );
        }
        out.direct.push(direct);
        out.proxied.push(proxied);
    }
    Ok(out)
}

/// (utime + stime) of `pid` in seconds.
pub(crate) fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A `Vm*:` line of /proc/PID/status, in KiB.
fn vm_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))
}

fn count_connects(trail: &Path) -> u64 {
    std::fs::read_to_string(trail)
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"action\":\"connect\""))
                .count() as u64
        })
        .unwrap_or(0)
}

fn capacity(env: &Env) -> anyhow::Result<Vec<CapacityStep>> {
    let p = &env.plan;
    let mut steps = Vec::new();
    // The last step runs at full speed with the daemon stopped: the ring buffer fills and the
    // rest must be counted as lost, with every denial still enforced.
    let plan = p.rates.iter().map(|&r| (r, false)).chain([(0, true)]);
    for (i, (rate, stall)) in plan.enumerate() {
        check_interrupt()?;
        eprintln!(
            "bench: capacity at {}{}",
            if rate == 0 {
                "full speed".into()
            } else {
                format!("{rate}/s")
            },
            if stall { ", daemon stopped" } else { "" }
        );
        let d = Daemon::start(&env.daemon, "capacity")?;
        let cpu0 = cpu_secs(d.pid())?;
        let mut args = vec![
            s("rate"),
            s("--rate"),
            s(rate),
            s("--secs"),
            s(p.rate_secs),
            s("--port"),
            s(env.udp_port),
            s("--deny-port"),
            s(env.deny_port),
        ];
        let task = format!("capacity-{i}");
        let stats: RateStats = if stall {
            args.push(s("--wait-stdin"));
            stalled_load(env, &d, &task, &args)?
        } else {
            load(env, Some((&d, &task)), &args)?
        };
        let expected = stats.allowed_sent + stats.denied_sent;
        let t = Instant::now();
        // Drained when every record is in the trail, or when it stopped growing for a second.
        let mut last = (0, Instant::now());
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            let n = count_connects(&d.json);
            if n != last.0 {
                last = (n, Instant::now());
            }
            n >= expected || last.1.elapsed() > Duration::from_secs(1)
        });
        let drain_ms = t.elapsed().as_millis() as u64;
        let cpu = cpu_secs(d.pid())? - cpu0;
        let status = d.status(&env.bin)?;
        steps.push(CapacityStep {
            in_trail: count_connects(&d.json),
            kernel_lost: status["counters"]["lost_records"].as_u64().unwrap_or(0),
            daemon_cpu_pct: 100.0 * cpu / stats.secs,
            daemon_peak_rss_kib: vm_kib(d.pid(), "VmHWM")?,
            drain_ms,
            load: stats,
            daemon_stalled: stall,
        });
    }
    Ok(steps)
}

/// Runs the rate generator as an agent with the daemon stopped (SIGSTOP) while it runs: it is
/// placed first (placement needs the daemon), then the daemon stops, the load runs, and the
/// daemon continues.
fn stalled_load(env: &Env, d: &Daemon, task: &str, args: &[String]) -> anyhow::Result<RateStats> {
    let mut child =
        spawn_load_as(env, AGENT, task, d, args).context("starting the rate generator")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the rate generator did not start: {line:?}");
    }
    let pid = d.pid() as i32;
    // SAFETY: signalling our own child daemon.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut stdin = child.stdin.take().context("stdin")?;
    let result = writeln!(stdin, "go")
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            line.clear();
            out.read_line(&mut line)?;
            Ok(serde_json::from_str::<RateStats>(line.trim())?)
        });
    // SAFETY: as above; the daemon continues whatever happened.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let _ = child.wait();
    result.with_context(|| format!("rate generator with the daemon stopped printed {line:?}"))
}

/// Starts the bench binary's `load ARGS` as `agent` in `task` of daemon `d`, with its stdin and
/// stdout piped (generators that print `ready` and wait for the orchestrator).
pub(crate) fn spawn_load_as(
    env: &Env,
    agent: &str,
    task: &str,
    d: &Daemon,
    args: &[String],
) -> std::io::Result<std::process::Child> {
    Command::new(&env.bin)
        .args(["run", "--agent", agent, "--task", task, "--control-socket"])
        .arg(&d.socket)
        .arg("--")
        .arg(&env.bench)
        .arg("load")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
}

fn startup(env: &Env) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..env.plan.startups {
        check_interrupt()?;
        let d = Daemon::start(&env.daemon, "startup")?;
        v.push(d.startup.as_secs_f64() * 1000.0);
    }
    eprintln!("bench: start-up {v:?} ms");
    Ok(v)
}

fn memory(env: &Env) -> anyhow::Result<Option<Memory>> {
    check_interrupt()?;
    let n = env.plan.tracked;
    eprintln!("bench: memory with {n} processes in an agent");
    let d = Daemon::start(&env.daemon, "memory")?;
    let before = vm_kib(d.pid(), "VmRSS")?;
    let mut child = Command::new(&env.bin)
        .args([
            "run",
            "--agent",
            AGENT,
            "--task",
            "memory",
            "--control-socket",
        ])
        .arg(&d.socket)
        .arg("--")
        .arg(&env.bench)
        .args(["load", "spawn", "--n", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the process tree")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let result = if line.starts_with("ready") {
        let mut tracked = 0;
        wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
            tracked = d
                .status(&env.bin)
                .ok()
                .and_then(|s| s["counters"]["tracked_processes"].as_u64())
                .unwrap_or(0);
            tracked > n as u64
        });
        Some(Memory {
            processes: n,
            tracked,
            rss_before_kib: before,
            rss_after_kib: vm_kib(d.pid(), "VmRSS")?,
            peak_rss_kib: vm_kib(d.pid(), "VmHWM")?,
        })
    } else {
        eprintln!("bench: the process tree did not start: {line:?}");
        None
    };
    // Closing stdin ends the tree.
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = std::io::stderr().flush();
    Ok(result)
}

/// Medians of the criterion benches, from `target/criterion/**/new/{benchmark,estimates}.json`.
fn read_criterion(dir: &Path) -> anyhow::Result<Vec<Criterion>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("new/benchmark.json") {
                let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
                let est: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path.with_file_name("estimates.json"))?)?;
                out.push(Criterion {
                    id: b["full_id"].as_str().unwrap_or("?").to_string(),
                    median_ns: est["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN),
                });
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}
