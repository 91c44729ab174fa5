//! Start-up against policy size: how long `agent-monitor policy check` and a daemon start take as
//! one agent's allowlists grow to the kernel's capacity, and how quickly a set that does not fit
//! is refused (and that the refusal leaves nothing pinned).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::run::Env;
use crate::setups::{Daemon, DaemonConfig};

/// The load-time target: a policy of this many entries is checked and enforcing within
/// [`TARGET_CHECK_MS`] and [`TARGET_START_MS`].
pub const TARGET_ENTRIES: usize = 20_000;
pub const TARGET_CHECK_MS: f64 = 1_000.0;
pub const TARGET_START_MS: f64 = 3_000.0;

/// One policy size: half network entries (distinct IPv4 /32s), half exec entries (exact paths
/// under directories of 1,000 files each, which do not exist: the daemon still resolves each).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicySizeStep {
    pub network: usize,
    pub exec: usize,
    /// Wall time of `agent-monitor policy check` on the policy directory, per repetition.
    pub check_ms: Vec<f64>,
    /// Spawn of the daemon until its control socket answers (enforcement active), or until it
    /// exited when it refused the set.
    pub start_ms: Vec<f64>,
    /// CPU (user + system) the daemon used until then.
    pub start_cpu_ms: Vec<f64>,
    /// The set does not fit the kernel: `policy check` and the daemon refused it.
    pub refused: bool,
    /// After a refusal: the daemon left pins behind (it must not).
    pub left_pins: bool,
}

impl PolicySizeStep {
    pub fn entries(&self) -> usize {
        self.network + self.exec
    }
}

/// Entry counts measured: up to the capacity of one policy bank (32,768 network + 32,768 exec),
/// and the 70,000, which does not fit.
fn sizes(quick: bool) -> &'static [usize] {
    if quick {
        &[1_000, TARGET_ENTRIES, 65_536, 70_000]
    } else {
        &[1_000, 10_000, TARGET_ENTRIES, 40_000, 65_536, 70_000]
    }
}

fn write_policy(dir: &Path, entries: usize) -> anyhow::Result<(usize, usize)> {
    let network = entries / 2;
    let exec = entries - network;
    let mut text =
        String::from("agent = \"ambench-size\"\nmode = \"enforce\"\n[network]\nallow = [\n");
    for i in 0..network as u32 {
        let a = 0x0a00_0000 | i;
        text.push_str(&format!(
            "\"{}.{}.{}.{}:443\",\n",
            a >> 24,
            (a >> 16) & 255,
            (a >> 8) & 255,
            a & 255
        ));
    }
    text.push_str("]\n[exec]\nallow = [\n");
    for i in 0..exec {
        text.push_str(&format!(
            "\"/opt/agent-monitor-bench/bin{}/tool{i}\",\n",
            i / 1000
        ));
    }
    text.push_str("]\n");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("size.toml"), text)?;
    Ok((network, exec))
}

/// CPU time (user + system) process `pid` has used, in ms.
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 * 1000.0 / hz)
}

/// A daemon start that must be refused: waits for its exit and reports (time, whether pins
/// were left behind).
fn refused_start(env: &Env, cfg: &DaemonConfig, name: &str) -> anyhow::Result<(f64, f64, bool)> {
    let pin_dir = format!(
        "/sys/fs/bpf/agent-monitor-bench-{}-{name}",
        std::process::id()
    );
    let t = Instant::now();
    let child = Command::new(&env.bin)
        .arg("daemon")
        .arg("--policies")
        .arg(&cfg.policies)
        .arg("--json-log")
        .arg(cfg.dir.join(format!("{name}.jsonl")))
        .arg("--control-socket")
        .arg(cfg.dir.join(format!("{name}.sock")))
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-file")
        .arg(cfg.dir.join(format!("{name}.grants.json")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the daemon")?;
    let pid = child.id();
    // The CPU figure is read at exit through the rusage of the reaped child.
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if out.status.success() {
        bail!("the daemon accepted a policy set that does not fit the kernel");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("do not fit the kernel tables") {
        bail!("the daemon (pid {pid}) failed for another reason: {stderr}");
    }
    let left = Path::new(&pin_dir).exists();
    if left {
        let _ = Command::new(&env.bin)
            .args(["daemon", "--uninstall", "--pin-dir", &pin_dir])
            .output();
    }
    Ok((ms, children_cpu_ms(), left))
}

/// CPU of reaped children so far, in ms (for a daemon that exited before it could be sampled).
fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

pub fn measure(env: &Env, dir: &Path) -> anyhow::Result<Vec<PolicySizeStep>> {
    let reps = if env.plan.quick { 1 } else { 3 };
    let mut steps = Vec::new();
    for &entries in sizes(env.plan.quick) {
        crate::run::check_interrupt()?;
        let policies = dir.join(format!("policies-{entries}"));
        let (network, exec) = write_policy(&policies, entries)?;
        let cfg = DaemonConfig {
            policies: policies.clone(),
            ..env.daemon.clone()
        };
        let mut step = PolicySizeStep {
            network,
            exec,
            ..Default::default()
        };
        for rep in 0..reps {
            let t = Instant::now();
            let check = Command::new(&env.bin)
                .args(["policy", "check"])
                .arg(&policies)
                .output()
                .context("running agent-monitor policy check")?;
            step.check_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            let name = format!("size-{entries}-{rep}");
            if !check.status.success() {
                step.refused = true;
                let before = children_cpu_ms();
                let (ms, after, left) = refused_start(env, &cfg, &name)?;
                step.start_ms.push(ms);
                // Every child before it was reaped already; the difference is the daemon's.
                step.start_cpu_ms.push(after - before);
                step.left_pins |= left;
                continue;
            }
            let d = Daemon::start(&cfg, &name)?;
            step.start_cpu_ms.push(cpu_ms(d.pid())?);
            step.start_ms.push(d.startup.as_secs_f64() * 1000.0);
            drop(d);
            // Let the uninstall's work settle before the next start is timed.
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "bench: policy of {entries} entries: check {:?} ms, {} {:?} ms ({:?} ms CPU)",
            step.check_ms,
            if step.refused {
                "refused in"
            } else {
                "enforcing in"
            },
            step.start_ms,
            step.start_cpu_ms
        );
        steps.push(step);
    }
    Ok(steps)
}
