//! What the numbers were measured on: kernel, CPU, cores, memory, and how busy the machine was.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub distribution: String,
    /// 1, 5 and 15 minute load averages when the run started and ended.
    pub load_start: [f64; 3],
    pub load_end: [f64; 3],
    /// Share of all cores' time not idle over 2 s at the start, in % (from /proc/stat). The load
    /// average lags by minutes (it still counts the criterion benches run just before); this says
    /// what the machine was doing when the measuring began. Absent in older results.
    #[serde(default)]
    pub cpu_busy_start_pct: Option<f64>,
    /// Other agent-monitor daemons running during the run (their hooks sit at the cgroup root and
    /// cost every process one lookup, the "no monitor" floor included).
    pub other_daemons: usize,
    /// UTC, `date -u` style.
    pub date: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// (not idle, total) jiffies of all CPUs since boot: the `cpu` line of /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let text = read("/proc/stat");
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user and nice)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// % of all cores' time not idle over the next `over`.
fn cpu_busy_pct(over: std::time::Duration) -> Option<f64> {
    let (b0, t0) = cpu_times()?;
    std::thread::sleep(over);
    let (b1, t1) = cpu_times()?;
    (t1 > t0).then(|| 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64)
}

fn loadavg() -> [f64; 3] {
    let text = read("/proc/loadavg");
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// Processes whose command line is `…agent-monitor daemon …`.
fn daemons() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let mut args = cmd.split(|&b| b == 0);
            let first = args.next().unwrap_or_default();
            first.ends_with(b"/agent-monitor") && args.next() == Some(b"daemon")
        })
        .count()
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(f64::NAN, |kib| kib / 1024.0 / 1024.0);
        let distribution = read("/etc/os-release")
            .lines()
            .find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_default();
        let out = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        Machine {
            kernel: out("uname", &["-r"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_gib,
            distribution,
            load_start: loadavg(),
            load_end: [f64::NAN; 3],
            cpu_busy_start_pct: cpu_busy_pct(std::time::Duration::from_secs(2)),
            other_daemons: daemons(),
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }

    /// Notes the state at the end of the run.
    pub fn finish(&mut self) {
        self.load_end = loadavg();
        self.other_daemons = self.other_daemons.max(daemons());
    }

    /// Busy if more than 10 % of the cores' time was in use when measuring began (older results:
    /// a 1-minute load average above a quarter of a core), or another daemon's hooks were attached.
    pub fn busy(&self) -> bool {
        let cpu = match self.cpu_busy_start_pct {
            Some(pct) => pct > 10.0,
            None => self.load_start[0] > 0.25,
        };
        cpu || self.other_daemons > 0
    }

    /// What `busy` judged by, for the report.
    pub fn busy_evidence(&self) -> String {
        match self.cpu_busy_start_pct {
            Some(pct) => format!("{pct:.0} % of the cores' time in use when measuring began"),
            None => format!("load average {:.2} at start", self.load_start[0]),
        }
    }
}
