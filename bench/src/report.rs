//! docs/benchmarks.md, written entirely from [`Results`]: nothing in it is typed by hand.

use std::fmt::Write as _;

use crate::load::OpStats;
use crate::run::{DnsLatency, Results, Samples, Setup};

pub fn median(v: &[u64]) -> f64 {
    let mut v: Vec<u64> = v.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0,
    }
}

pub fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Connect,
    Exec,
}

impl Op {
    fn samples(self, s: &Samples) -> &[u64] {
        match self {
            Op::Connect => &s.connect_ns,
            Op::Exec => &s.exec_ns,
        }
    }
}

fn samples(r: &Results, setup: Setup) -> Option<&Samples> {
    r.overhead.iter().find(|(s, _)| *s == setup).map(|(_, s)| s)
}

/// Median per-operation time of `setup`, ns.
pub fn median_ns(r: &Results, setup: Setup, op: Op) -> f64 {
    samples(r, setup).map_or(f64::NAN, |s| median(op.samples(s)))
}

/// Per repetition, the overhead of `setup` over the floor measured in the same repetition, in %.
/// Pairing within a repetition cancels the drift between repetitions (on a busy machine the
/// fork+exec floor moved by 10 % over a run). Empty if the repetitions do not pair up.
pub fn paired_pct(r: &Results, setup: Setup, op: Op) -> Vec<f64> {
    let (Some(floor), Some(ours)) = (samples(r, Setup::NoMonitor), samples(r, setup)) else {
        return Vec::new();
    };
    let (floor, ours) = (op.samples(floor), op.samples(ours));
    if floor.len() != ours.len() {
        return Vec::new();
    }
    ours.iter()
        .zip(floor)
        .map(|(&o, &f)| 100.0 * (o as f64 / f as f64 - 1.0))
        .collect()
}

/// Overhead of `setup` over the unmonitored floor, in %: the median of the paired
/// per-repetition overheads (the ratio of the medians if they do not pair up).
pub fn overhead_pct(r: &Results, setup: Setup, op: Op) -> f64 {
    let paired = paired_pct(r, setup, op);
    if paired.is_empty() {
        let floor = median_ns(r, Setup::NoMonitor, op);
        100.0 * (median_ns(r, setup, op) / floor - 1.0)
    } else {
        median_f(&paired)
    }
}

/// First and third quartile of `v` (nearest rank).
pub fn quartiles(v: &[f64]) -> Option<(f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (!v.is_empty()).then(|| (at(0.25), at(0.75)))
}

/// How many times auditd's overhead exceeds `setup`'s. Infinite when `setup` is not measurably
/// above the floor.
pub fn times_less_than_auditd(r: &Results, setup: Setup, op: Op) -> f64 {
    let ours = overhead_pct(r, setup, op);
    let theirs = overhead_pct(r, Setup::Auditd, op);
    if ours <= 0.0 {
        f64::INFINITY
    } else {
        theirs / ours
    }
}

pub struct Target {
    pub what: String,
    pub measured: String,
    pub held: bool,
}

/// The highest rate at which every action reached the trail and the generator kept up.
pub fn capacity_zero_loss(r: &Results) -> Option<f64> {
    r.capacity
        .iter()
        .filter(|c| {
            let sent = c.load.allowed_sent + c.load.denied_sent;
            !c.daemon_stalled && c.in_trail >= sent && c.kernel_lost == 0
        })
        .map(|c| c.load.achieved_rate)
        .max_by(f64::total_cmp)
}

pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let pct = |v: f64| format!("{v:+.1} %");
    for (op, name) in [(Op::Connect, "connect"), (Op::Exec, "exec")] {
        let o = overhead_pct(r, Setup::OutsideAgent, op);
        t.push(Target {
            what: format!("outside any agent, {name}: ≤ 1 % overhead"),
            measured: pct(o),
            held: o <= 1.0,
        });
    }
    for (op, name, limit) in [(Op::Connect, "connect", 10.0), (Op::Exec, "exec", 5.0)] {
        let o = overhead_pct(r, Setup::AgentAllowed, op);
        t.push(Target {
            what: format!("an agent's allowed {name}: ≤ {limit} % overhead"),
            measured: pct(o),
            held: o <= limit,
        });
    }
    for (op, name) in [(Op::Connect, "connect"), (Op::Exec, "exec")] {
        let x = times_less_than_auditd(r, Setup::AgentAllowed, op);
        t.push(Target {
            what: format!("≥ 10× less overhead than auditd, agent's allowed {name}"),
            measured: if x.is_infinite() {
                format!(
                    "auditd {}, agent-monitor not above the floor",
                    pct(overhead_pct(r, Setup::Auditd, op))
                )
            } else {
                format!("{x:.1}×")
            },
            held: x >= 10.0,
        });
    }
    let max_rate = r
        .capacity
        .iter()
        .find(|c| c.load.target_rate == 100_000 && !c.daemon_stalled);
    t.push(Target {
        what: "100 k agent actions/s, zero loss".into(),
        measured: match max_rate {
            Some(c) => format!(
                "{:.0}/s achieved, {} of {} in the trail, {} lost in the kernel",
                c.load.achieved_rate,
                c.in_trail,
                c.load.allowed_sent + c.load.denied_sent,
                c.kernel_lost
            ),
            None => "not measured".into(),
        },
        held: max_rate.is_some_and(|c| {
            c.in_trail >= c.load.allowed_sent + c.load.denied_sent
                && c.kernel_lost == 0
                && c.load.achieved_rate >= 95_000.0
        }),
    });
    t.push(Target {
        what: "peak RSS ≤ 64 MiB with 10 k tracked processes".into(),
        measured: match &r.memory {
            Some(m) => format!(
                "{:.1} MiB with {} tracked",
                m.peak_rss_kib as f64 / 1024.0,
                m.tracked
            ),
            None => "not measured".into(),
        },
        held: r
            .memory
            .as_ref()
            .is_some_and(|m| m.peak_rss_kib <= 64 * 1024 && m.tracked >= 10_000),
    });
    t.extend(policy_size_targets(r));
    t.extend(crate::intercept_bench::targets(r));
    t
}

/// The load-time target (20,000 entries checked and enforcing quickly) and the refusal of a set
/// that does not fit; none for a run that did not measure policy sizes (older results).
fn policy_size_targets(r: &Results) -> Vec<Target> {
    use crate::policy_size::{TARGET_CHECK_MS, TARGET_ENTRIES, TARGET_START_MS};
    let mut t = Vec::new();
    if r.policy_size.is_empty() {
        return t;
    }
    let at_target = r
        .policy_size
        .iter()
        .find(|s| s.entries() == TARGET_ENTRIES && !s.refused);
    t.push(Target {
        what: format!(
            "a {TARGET_ENTRIES}-entry policy: `policy check` ≤ {:.0} s, daemon enforcing ≤ {:.0} s",
            TARGET_CHECK_MS / 1000.0,
            TARGET_START_MS / 1000.0
        ),
        measured: match at_target {
            Some(s) => format!(
                "check {:.0} ms, enforcing in {:.0} ms",
                median_f(&s.check_ms),
                median_f(&s.start_ms)
            ),
            None => "not measured".into(),
        },
        held: at_target.is_some_and(|s| {
            median_f(&s.check_ms) <= TARGET_CHECK_MS && median_f(&s.start_ms) <= TARGET_START_MS
        }),
    });
    if let Some(s) = r.policy_size.iter().find(|s| s.refused) {
        t.push(Target {
            what: "a policy set over the kernel's capacity is refused before anything is pinned"
                .into(),
            measured: format!(
                "{} entries refused in {:.0} ms{}",
                s.entries(),
                median_f(&s.start_ms),
                if s.left_pins {
                    ", **pins left**"
                } else {
                    ", nothing pinned"
                }
            ),
            held: !s.left_pins,
        });
    }
    t
}

/// How many records the ring buffer holds while the daemon does not read, from the record
/// format itself (each kind reserves its own size).
mod markdown;

pub use markdown::markdown;
#[cfg(test)]
use markdown::*;

#[cfg(test)]
mod tests;

/// The request-latency and download-rate table of an egress measurement, one row a path (its
/// name, its request stats and its downloads, each column the median over the repetitions). A
/// caller adds its own rows after it, and the blank line that ends the table.
pub fn request_table(o: &mut String, rows: &[(&str, &[OpStats], &[crate::egress::Download])]) {
    let med = |v: &[OpStats], f: fn(&OpStats) -> u64| median(&v.iter().map(f).collect::<Vec<_>>());
    let _ = writeln!(
        o,
        "| path | request median µs | request p99 µs | download MiB/s |\n|---|---:|---:|---:|"
    );
    for (path, stats, downloads) in rows {
        let _ = writeln!(
            o,
            "| {path} | {} | {} | {:.0} |",
            markdown::us(med(stats, |x| x.median_ns)),
            markdown::us(med(stats, |x| x.p99_ns)),
            median_f(&downloads.iter().map(|d| d.mib_per_s).collect::<Vec<_>>())
        );
    }
}
