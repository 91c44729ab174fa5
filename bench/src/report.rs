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
fn ring_capacity_line(o: &mut String) {
    use agent_monitor_common::{ACTIONS_RING_BYTES, RecordKind, ring_bytes};
    let per_ring = |kind: RecordKind| ACTIONS_RING_BYTES as usize / ring_bytes(kind.record_size());
    let _ = writeln!(
        o,
        "Ring buffer: {} MiB. A connect record takes {} bytes in it and an exec record {}, so it \
         holds {} connect or {} exec records while the daemon does not read (each kind reserves \
         only its own size; before issue 14 every record took 648 bytes: {} of any kind).\n",
        ACTIONS_RING_BYTES / (1024 * 1024),
        ring_bytes(RecordKind::Connect.record_size()),
        ring_bytes(RecordKind::Exec.record_size()),
        per_ring(RecordKind::Connect),
        per_ring(RecordKind::Exec),
        ACTIONS_RING_BYTES as usize / ring_bytes(640),
    );
}

fn policy_size_section(o: &mut String, steps: &[crate::policy_size::PolicySizeStep]) {
    let _ = writeln!(o, "## Start-up against policy size\n");
    if steps.is_empty() {
        let _ = writeln!(o, "Not measured.\n");
        return;
    }
    let _ = writeln!(
        o,
        "One agent whose policy holds N allowlist entries: half network (distinct IPv4 \
         addresses), half exec (exact paths, resolved by the daemon). `policy check` is timed on \
         the policy directory; the daemon from spawn until its control socket answers \
         (enforcement active), with the CPU it used until then. One policy set may fill half of \
         each allowlist map (32,768 network and 32,768 exec entries), since a reload or restart \
         writes the new set beside the one in force; a larger set is refused by both before \
         anything is loaded. Medians over the repetitions.\n"
    );
    let _ = writeln!(
        o,
        "| entries (network + exec) | `policy check` | daemon | daemon CPU |\n|---|---:|---:|---:|"
    );
    for s in steps {
        let _ = writeln!(
            o,
            "| {} ({} + {}) | {:.0} ms{} | {} {:.0} ms{} | {:.0} ms |",
            s.entries(),
            s.network,
            s.exec,
            median_f(&s.check_ms),
            if s.refused { ", refused" } else { "" },
            if s.refused {
                "refused in"
            } else {
                "enforcing in"
            },
            median_f(&s.start_ms),
            match (s.refused, s.left_pins) {
                (true, true) => ", **pins left**",
                (true, false) => ", nothing pinned",
                _ => "",
            },
            median_f(&s.start_cpu_ms)
        );
    }
    let _ = writeln!(o);
}

fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1000.0)
}

/// Added latency of the DNS proxy per repetition: proxied minus direct, at the median and at p99.
pub fn dns_added_ns(d: &DnsLatency) -> (Vec<f64>, Vec<f64>) {
    d.direct
        .iter()
        .zip(&d.proxied)
        .map(|(a, b)| {
            (
                b.median_ns as f64 - a.median_ns as f64,
                b.p99_ns as f64 - a.p99_ns as f64,
            )
        })
        .unzip()
}

fn dns_section(o: &mut String, dns: Option<&DnsLatency>) {
    let _ = writeln!(o, "## DNS proxy latency\n");
    let Some(d) = dns.filter(|d| !d.direct.is_empty()) else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let med = |v: &[OpStats], f: fn(&OpStats) -> u64| {
        median_f(&v.iter().map(|x| f(x) as f64).collect::<Vec<_>>())
    };
    let (added_median, added_p99) = dns_added_ns(d);
    let _ = writeln!(
        o,
        "{} repetitions, interleaved; in each, {} type-A queries for an allowed name over one \
         connected UDP socket, one at a time: *direct* from an ordinary process to the upstream \
         (dnsmasq on loopback), *through the proxy* from an agent asking `192.0.2.1:53`, which the \
         kernel redirects to the daemon's proxy; the proxy judges the name, forwards it to the same \
         dnsmasq and writes the answer's address into the agent's kernel allowlist before it \
         replies. Medians over the repetitions.\n",
        d.direct.len(),
        d.queries
    );
    let _ = writeln!(o, "| path | median µs | p99 µs |\n|---|---:|---:|");
    let _ = writeln!(
        o,
        "| direct to the upstream | {} | {} |",
        us(med(&d.direct, |x| x.median_ns)),
        us(med(&d.direct, |x| x.p99_ns))
    );
    let _ = writeln!(
        o,
        "| through the proxy | {} | {} |",
        us(med(&d.proxied, |x| x.median_ns)),
        us(med(&d.proxied, |x| x.p99_ns))
    );
    let _ = writeln!(
        o,
        "| **added by the proxy** | **{}** | **{}** |\n",
        us(median_f(&added_median)),
        us(median_f(&added_p99))
    );
}

pub fn markdown(r: &Results, command: &str) -> String {
    let m = &r.machine;
    let p = &r.plan;
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `{command}` on {} in {:.1} minutes; every number, table and the chart below \
         come from that run (raw data: [`benchmarks.json`](benchmarks.json)). Do not edit by \
         hand: re-run the command.{}\n",
        m.date,
        r.minutes,
        if p.quick {
            " **This was a `--quick` run** (fewer repetitions, shorter runs): read it as a smoke \
             test, not as the published numbers."
        } else {
            ""
        }
    );
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| kernel | {} |", m.kernel);
    let _ = writeln!(o, "| distribution | {} |", m.distribution);
    let _ = writeln!(o, "| CPU | {} |", m.cpu);
    let _ = writeln!(o, "| cores | {} |", m.cores);
    let _ = writeln!(o, "| memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(
        o,
        "| load average at start | {:.2} {:.2} {:.2} |",
        m.load_start[0], m.load_start[1], m.load_start[2]
    );
    let _ = writeln!(
        o,
        "| load average at end | {:.2} {:.2} {:.2} |",
        m.load_end[0], m.load_end[1], m.load_end[2]
    );
    if let Some(pct) = m.cpu_busy_start_pct {
        let _ = writeln!(
            o,
            "| CPU in use when measuring began (2 s sample, all cores) | {pct:.1} % |"
        );
    }
    let _ = writeln!(
        o,
        "| other agent-monitor daemons running | {} |\n",
        m.other_daemons
    );
    if m.busy() {
        let _ = writeln!(
            o,
            "**The machine was busy during this run** ({}{}): other \
             work competed for the {} cores, so the overheads below carry that noise; small \
             percentages in particular are not resolved.\n",
            m.busy_evidence(),
            if m.other_daemons > 0 {
                format!(
                    ", and {} other agent-monitor daemon(s) had their hooks attached, which the \
                     \"no monitor\" floor also pays",
                    m.other_daemons
                )
            } else {
                String::new()
            },
            m.cores
        );
    } else {
        let _ = writeln!(o, "The machine was quiet at the start of the run.\n");
    }
    let _ = writeln!(o, "Reproduce (as root, from the repository root):\n");
    let _ = writeln!(o, "```sh\n{command}\n```\n");
    let _ = writeln!(
        o,
        "It installs what it needs (auditd and bpftrace through apt, criterion through Cargo), \
         builds, measures, writes this file, `benchmarks.svg` and `benchmarks.json`, and leaves \
         the machine as it found it: auditd stopped and its rules removed, audit settings \
         restored, bpftrace and every daemon it started stopped. `cargo xtask bench --quick` is \
         a short version for development.\n"
    );

    let _ = writeln!(o, "## Targets\n");
    let _ = writeln!(o, "| target | measured | held |\n|---|---|---|");
    for t in targets(r) {
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            t.what,
            t.measured,
            if t.held { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(o);
    let overhead_missed = targets(r).iter().take(6).any(|t| !t.held);
    if overhead_missed
        && r.attached
            .iter()
            .any(|a| a.contains("tracepoint syscalls/"))
    {
        let _ = writeln!(
            o,
            "Where an overhead target is missed, first suspect the `syscalls/*` tracepoint the \
             daemon attaches (see the note under the overhead table): it puts every syscall of \
             every process on the tracing slow path, and the connect operation makes four. Then \
             the noise: a busy machine, and the interquartile ranges in the table.\n"
        );
    }

    let _ = writeln!(o, "## Overhead per operation\n");
    let _ = writeln!(
        o,
        "{} interleaved repetitions; in each, every setup runs {} loopback TCP connects and {} \
         fork+exec of a trivial program, and the repetition's median per-operation time is \
         kept. Shown: the median over repetitions, and the overhead against the unmonitored \
         floor: the median of the per-repetition overheads, each against the floor measured in \
         the same repetition, with their interquartile range in brackets (how well this run \
         resolves small differences). The load generators run as SCHED_FIFO (priority 10) on the \
         last CPU, with the children they fork, so other work on the machine does not preempt \
         the timed loops and a child runs where its parent waits; the monitors' own processes \
         (agent-monitor's daemon, auditd, bpftrace) and the connect server run at normal \
         priority, unpinned.\n",
        p.reps, p.connects, p.execs
    );
    let _ = writeln!(o, "![overhead by setup](benchmarks.svg)\n");
    let _ = writeln!(
        o,
        "| setup | connect µs | connect overhead | exec µs | exec overhead | outcomes (connect; exec) |\n|---|---:|---:|---:|---:|---|"
    );
    for &setup in &Setup::ALL {
        let Some(s) = samples(r, setup) else { continue };
        let ov = |op| {
            if setup == Setup::NoMonitor {
                return "floor".to_string();
            }
            let spread = quartiles(&paired_pct(r, setup, op))
                .map(|(q1, q3)| format!(" ({q1:+.1} … {q3:+.1})"))
                .unwrap_or_default();
            format!("{:+.1} %{spread}", overhead_pct(r, setup, op))
        };
        let out = |(ok, refused, other): (usize, usize, usize), what: &str| {
            let mut v = vec![format!("{ok} ok")];
            if refused > 0 {
                v.push(format!("{refused} {what}"));
            }
            if other > 0 {
                v.push(format!("{other} other"));
            }
            v.join(", ")
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {}; {} |",
            setup.label(),
            us(median(&s.connect_ns)),
            ov(Op::Connect),
            us(median(&s.exec_ns)),
            ov(Op::Exec),
            out(s.connect_outcomes, "EPERM"),
            out(s.exec_outcomes, "killed")
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "- *connect*: `socket()`, `connect()` to a listener on 127.0.0.1 (a process of its own, \
         outside any agent, the same in every setup: an agent's peers are not the agent), \
         `close()` with `SO_LINGER` 0 (an RST, so no TIME_WAIT piles up across runs). The denied \
         setup connects to a port the agent may not reach: the kernel answers `EPERM` before any \
         packet, which is why it can be cheaper than the floor.\n\
         - *exec*: `fork()`, `execv(\"/bin/true\")`, `waitpid()`. Denied: `/bin/false`, which the \
         policy does not list, killed by `SIGKILL` before its first instruction.\n\
         - *outside any agent*: the daemon runs with its programs attached; the load generator \
         is an ordinary process (one identity lookup per hook).\n\
         - *agent allowed / denied*: the load generator runs through `agent-monitor run` as agent \
         `{}`; every connect and exec is judged, recorded and written to the JSON trail.\n\
         - *auditd*: `auditd -n` with `-a always,exit -F arch=b64 -S connect` and `-S execve`, \
         backlog 8192 (auditd's packaged default). System-wide, as deployed.\n\
         - *bpftrace*: `bpftrace -e '{}'`, output to a file. System-wide, as an engineer would \
         write it.\n",
        crate::run::AGENT,
        crate::setups::BPFTRACE_SCRIPT.replace('\n', " ")
    );

    if !r.attached.is_empty() {
        let _ = writeln!(
            o,
            "What the daemon attached (from its log): {}.\n",
            r.attached
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let syscall_tracepoints: Vec<&String> = r
        .attached
        .iter()
        .filter(|a| a.contains("tracepoint syscalls/"))
        .collect();
    if !syscall_tracepoints.is_empty() {
        let _ = writeln!(
            o,
            "Note: {} attaches a `syscalls/*` tracepoint. While any syscall tracepoint is \
             attached, the kernel sends **every syscall of every process on the host** through its \
             tracing slow path, agent or not, whatever the program does first. That is a cost \
             outside agents pay on every syscall (the connect operation here makes four), and \
             the same mechanism behind most of bpftrace's connect overhead.\n",
            syscall_tracepoints
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else if !r.attached.is_empty() {
        let _ = writeln!(
            o,
            "No `syscalls/*` tracepoint was attached: the daemon attaches its \
             `sys_enter_socket` watch (reports socket families only `run`'s seccomp filter \
             refuses) only while an agent without that filter can exist: a policy with \
             `[identity]` selectors, a policy in alert mode, or a process placed by another \
             control client. Any syscall tracepoint would put every syscall of every process on \
             the host on the kernel's tracing slow path.\n"
        );
    }
    let _ = writeln!(o, "## Event capacity\n");
    let _ = writeln!(
        o,
        "The agent calls `connect()` on a UDP socket at a fixed rate for {} s (each call is an \
         agent action: judged in the kernel, recorded, written to the JSON trail); one call in \
         1000 goes to a denied port, to check enforcement under load. A fresh daemon per rate. \
         *in trail*: connect records in the JSON trail once it stopped growing. *lost*: records \
         the kernel could not queue (ring buffer full), counted per CPU and reported by `status`. \
         *CPU*: daemon CPU time per second of load, % of one core.\n",
        p.rate_secs
    );
    let _ = writeln!(
        o,
        "| target rate | achieved | actions | in trail | lost (kernel) | denied → EPERM | daemon CPU | daemon peak RSS | drain |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in &r.capacity {
        let sent = c.load.allowed_sent + c.load.denied_sent;
        let _ = writeln!(
            o,
            "| {} | {:.0}/s | {} | {} | {} | {}/{} | {:.0} % | {:.1} MiB | {} ms |",
            match (c.load.target_rate, c.daemon_stalled) {
                (0, true) => "full speed, daemon stopped".to_string(),
                (0, false) => "full speed".to_string(),
                (rate, _) => format!("{rate}/s"),
            },
            c.load.achieved_rate,
            sent,
            c.in_trail,
            c.kernel_lost,
            c.load.denied_eperm,
            c.load.denied_sent,
            c.daemon_cpu_pct,
            c.daemon_peak_rss_kib as f64 / 1024.0,
            c.drain_ms
        );
    }
    let _ = writeln!(o);
    let all_delivered = r
        .capacity
        .iter()
        .filter(|c| !c.daemon_stalled)
        .all(|c| c.in_trail >= c.load.allowed_sent + c.load.denied_sent && c.kernel_lost == 0);
    match capacity_zero_loss(r) {
        Some(rate) if all_delivered => {
            let _ = writeln!(
                o,
                "Every measured rate delivered every action to the trail, up to the load \
                 generator's full speed of **{rate:.0} actions/s** (one thread): the capacity is \
                 at least that, and this run did not reach the point of loss. Past it, records \
                 that do not fit the ring buffer are counted as lost (`lost_records` in \
                 `status`, a warning in the log), and enforcement does not depend on them: the \
                 verdict is taken before the record is queued (see the EPERM column).\n"
            );
        }
        Some(rate) => {
            let _ = writeln!(
                o,
                "Highest measured rate with every action in the trail: **{rate:.0} actions/s**. \
                 Above it, what does not fit the ring buffer is counted as lost (never silently), \
                 and enforcement is unaffected: the verdict is taken before the record is queued \
                 (see the EPERM column).\n"
            );
        }
        None => {
            let _ = writeln!(o, "No measured rate delivered every action to the trail.\n");
        }
    }

    ring_capacity_line(&mut o);
    if let Some(c) = r.capacity.iter().find(|c| c.daemon_stalled) {
        let sent = c.load.allowed_sent + c.load.denied_sent;
        let accounted = c.in_trail + c.kernel_lost;
        let _ = writeln!(
            o,
            "Beyond capacity, forced: the last row stops the daemon (SIGSTOP) while the agent \
             acts at full speed, so nothing is read. {} records fit the ring buffer and reached \
             the trail once the daemon continued; the kernel counted {} as lost; {} + {} = \
             {accounted} of {sent} actions: {}. Every denial was still enforced ({}/{} got \
             EPERM): the verdict does not wait for the daemon.\n",
            c.in_trail,
            c.kernel_lost,
            c.in_trail,
            c.kernel_lost,
            if accounted >= sent {
                "every action is accounted for, none dropped silently"
            } else {
                "**some actions are unaccounted for**"
            },
            c.load.denied_eperm,
            c.load.denied_sent
        );
    }
    let _ = writeln!(o, "## Start-up and memory\n");
    let _ = writeln!(
        o,
        "- Start-up to enforcement active (spawn of `agent-monitor daemon` until its control \
         socket answers; the socket is bound after every program is attached and the allowlists \
         written), median of {}: **{:.0} ms** (runs: {}).",
        r.startup_ms.len(),
        median_f(&r.startup_ms),
        r.startup_ms
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match &r.memory {
        Some(mem) => {
            let per = (mem.rss_after_kib as f64 - mem.rss_before_kib as f64) * 1024.0
                / mem.processes as f64;
            let _ = writeln!(
                o,
                "- {} sleeping processes in one agent ({} in the daemon's process table): daemon \
                 RSS {:.1} MiB before, {:.1} MiB with them, peak {:.1} MiB; **{:.0} bytes per \
                 tracked process**.\n",
                mem.processes,
                mem.tracked,
                mem.rss_before_kib as f64 / 1024.0,
                mem.rss_after_kib as f64 / 1024.0,
                mem.peak_rss_kib as f64 / 1024.0,
                per
            );
        }
        None => {
            let _ = writeln!(
                o,
                "- Memory per tracked process: not measured (see the run's log).\n"
            );
        }
    }

    policy_size_section(&mut o, &r.policy_size);
    dns_section(&mut o, r.dns.as_ref());

    let _ = writeln!(o, "## In-process paths (criterion)\n");
    if r.criterion.is_empty() {
        let _ = writeln!(o, "Not run.\n");
    } else {
        let _ = writeln!(
            o,
            "`cargo bench -p agent-monitor --bench inprocess`; median time per call.\n"
        );
        let _ = writeln!(o, "| bench | median |\n|---|---:|");
        for c in &r.criterion {
            let _ = writeln!(
                o,
                "| {} | {} |",
                c.id,
                if c.median_ns >= 1000.0 {
                    format!("{:.2} µs", c.median_ns / 1000.0)
                } else {
                    format!("{:.0} ns", c.median_ns)
                }
            );
        }
        let _ = writeln!(o);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::RateStats;
    use crate::machine::Machine;
    use crate::run::{CapacityStep, Plan};

    fn results(overhead: Vec<(Setup, Vec<u64>, Vec<u64>)>, capacity: Vec<CapacityStep>) -> Results {
        Results {
            plan: Plan::new(true),
            machine: Machine::describe(),
            overhead: overhead
                .into_iter()
                .map(|(s, c, e)| {
                    (
                        s,
                        Samples {
                            connect_ns: c,
                            exec_ns: e,
                            ..Samples::default()
                        },
                    )
                })
                .collect(),
            capacity,
            startup_ms: vec![],
            memory: None,
            criterion: vec![],
            minutes: 0.0,
            attached: vec![],
            dns: None,
            policy_size: vec![],
        }
    }

    fn step(rate: u64, sent: u64, in_trail: u64, lost: u64) -> CapacityStep {
        CapacityStep {
            load: RateStats {
                target_rate: rate,
                achieved_rate: rate as f64,
                secs: 1.0,
                allowed_sent: sent,
                allowed_ok: sent,
                denied_sent: 0,
                denied_eperm: 0,
            },
            in_trail,
            kernel_lost: lost,
            daemon_cpu_pct: 0.0,
            daemon_peak_rss_kib: 0,
            drain_ms: 0,
            daemon_stalled: false,
        }
    }

    #[test]
    fn medians_of_odd_even_and_empty() {
        assert_eq!(median(&[3, 1, 2]), 2.0);
        assert_eq!(median(&[4, 1, 3, 2]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median_f(&[2.0, 1.0]), 1.5);
    }

    #[test]
    fn overhead_is_against_the_floor_median() {
        let r = results(
            vec![
                (Setup::NoMonitor, vec![100, 200, 100], vec![1000]),
                (Setup::AgentAllowed, vec![105, 210, 104], vec![1010]),
                (Setup::Auditd, vec![150, 300, 150], vec![1300]),
            ],
            vec![],
        );
        assert!((overhead_pct(&r, Setup::AgentAllowed, Op::Connect) - 5.0).abs() < 1e-9);
        assert!((overhead_pct(&r, Setup::AgentAllowed, Op::Exec) - 1.0).abs() < 1e-9);
        assert!((times_less_than_auditd(&r, Setup::AgentAllowed, Op::Connect) - 10.0).abs() < 1e-9);
        assert!((times_less_than_auditd(&r, Setup::AgentAllowed, Op::Exec) - 30.0).abs() < 1e-9);
    }

    #[test]
    fn unpaired_samples_fall_back_to_the_ratio_of_medians() {
        let r = results(
            vec![
                (Setup::NoMonitor, vec![100, 100, 900], vec![1000]),
                (Setup::Auditd, vec![120], vec![1000]),
            ],
            vec![],
        );
        assert!(paired_pct(&r, Setup::Auditd, Op::Connect).is_empty());
        assert!((overhead_pct(&r, Setup::Auditd, Op::Connect) - 20.0).abs() < 1e-9);
        assert_eq!(quartiles(&[4.0, 1.0, 3.0, 2.0, 5.0]), Some((2.0, 4.0)));
        assert_eq!(quartiles(&[]), None);
    }

    #[test]
    fn no_measurable_overhead_beats_auditd_by_any_factor() {
        let r = results(
            vec![
                (Setup::NoMonitor, vec![100], vec![100]),
                (Setup::AgentAllowed, vec![99], vec![100]),
                (Setup::Auditd, vec![150], vec![150]),
            ],
            vec![],
        );
        assert!(times_less_than_auditd(&r, Setup::AgentAllowed, Op::Connect).is_infinite());
    }

    #[test]
    fn capacity_is_the_highest_rate_without_loss() {
        let r = results(
            vec![],
            vec![
                step(1_000, 1_000, 1_000, 0),
                step(100_000, 100_000, 100_000, 0),
                step(200_000, 200_000, 150_000, 50_000),
            ],
        );
        assert_eq!(capacity_zero_loss(&r), Some(100_000.0));
        let held: Vec<bool> = targets(&r).iter().map(|t| t.held).collect();
        // The 100k target (second to last) holds; memory was not measured.
        assert_eq!(held[held.len() - 2..], [true, false]);
    }

    #[test]
    fn policy_size_target_and_table_come_from_the_steps() {
        use crate::policy_size::PolicySizeStep;
        let step = |entries: usize, check: f64, start: f64, refused: bool| PolicySizeStep {
            network: entries / 2,
            exec: entries - entries / 2,
            check_ms: vec![check],
            start_ms: vec![start],
            start_cpu_ms: vec![start / 2.0],
            refused,
            left_pins: false,
        };
        let mut r = results(vec![], vec![]);
        r.policy_size = vec![
            step(1_000, 10.0, 900.0, false),
            step(20_000, 150.0, 1_200.0, false),
            step(70_000, 250.0, 300.0, true),
        ];
        let t = targets(&r);
        let load = t
            .iter()
            .find(|t| t.what.starts_with("a 20000-entry policy"))
            .expect("load-time target");
        assert!(load.held, "{}", load.measured);
        assert_eq!(load.measured, "check 150 ms, enforcing in 1200 ms");
        let refused = t
            .iter()
            .find(|t| t.what.contains("over the kernel's capacity"))
            .expect("refusal target");
        assert!(refused.held);
        let md = markdown(&r, "cargo xtask bench");
        assert!(
            md.contains("| 20000 (10000 + 10000) | 150 ms | enforcing in 1200 ms | 600 ms |"),
            "{md}"
        );
        assert!(
            md.contains("| 70000 (35000 + 35000) | 250 ms, refused | refused in 300 ms, nothing pinned | 150 ms |"),
            "{md}"
        );
        // Too slow: the target is missed, and a run without the phase says so.
        r.policy_size[1].start_ms = vec![3_500.0];
        assert!(
            !targets(&r)
                .iter()
                .any(|t| t.what.starts_with("a 20000") && t.held)
        );
        r.policy_size.clear();
        assert!(markdown(&r, "x").contains("## Start-up against policy size\n\nNot measured."));
    }

    #[test]
    fn report_names_the_command_and_marks_quick_runs() {
        let r = results(vec![(Setup::NoMonitor, vec![100], vec![100])], vec![]);
        let md = markdown(&r, "cargo xtask bench --quick");
        assert!(md.contains("```sh\ncargo xtask bench --quick\n```"), "{md}");
        assert!(md.contains("`--quick` run"), "{md}");
        assert!(md.contains("| cores |"), "{md}");
    }
    #[test]
    fn dns_added_latency_is_proxied_minus_direct_per_repetition() {
        let op = |median_ns, p99_ns| crate::load::OpStats {
            n: 10,
            median_ns,
            mean_ns: median_ns,
            p90_ns: p99_ns,
            p99_ns,
            ok: 10,
            refused: 0,
            other: 0,
        };
        let d = crate::run::DnsLatency {
            queries: 10,
            direct: vec![op(30_000, 60_000), op(40_000, 50_000)],
            proxied: vec![op(110_000, 200_000), op(100_000, 90_000)],
        };
        assert_eq!(
            dns_added_ns(&d),
            (vec![80_000.0, 60_000.0], vec![140_000.0, 40_000.0])
        );
        let mut o = String::new();
        dns_section(&mut o, Some(&d));
        assert!(
            o.contains("| **added by the proxy** | **70.0** | **90.0** |"),
            "{o}"
        );
        let mut none = String::new();
        dns_section(&mut none, None);
        assert!(none.contains("Not measured"));
    }
}
