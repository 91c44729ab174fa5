//! The markdown report (docs/benchmarks.md) from one run's results.

use super::*;

pub(super) fn ring_capacity_line(o: &mut String) {
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

pub(super) fn policy_size_section(o: &mut String, steps: &[crate::policy_size::PolicySizeStep]) {
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

pub(super) fn us(ns: f64) -> String {
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

pub(super) fn dns_section(o: &mut String, dns: Option<&DnsLatency>) {
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
    crate::files::section(&mut o, r.files.as_ref(), us);
    ask_section(&mut o, r.ask.as_ref());
    crate::unix_bench::section(&mut o, r.unix.as_ref());
    egress_section(&mut o, r.egress.as_ref());
    crate::intercept_bench::section(&mut o, r.intercept.as_ref());

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

/// An ask-mode agent's allowed connect and exec against an enforce-mode agent's, and the release
/// of a held call after an approval.
pub(super) fn ask_section(o: &mut String, ask: Option<&crate::ask::AskLatency>) {
    let _ = writeln!(o, "## Ask mode (held calls in run)\n");
    let Some(a) = ask.filter(|a| !a.ask_connect.is_empty()) else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let med = |v: &[OpStats]| median_f(&v.iter().map(|x| x.median_ns as f64).collect::<Vec<_>>());
    let _ = writeln!(
        o,
        "{} repetitions, interleaved; in each, {} connects and {} fork+execs of `/bin/true`, all on \
         the list, by an enforce-mode agent and by an ask-mode agent with the same list (its \
         `run` holds each connect and exec, asks the daemon on the ask channel, and continues it \
         on the daemon's immediate allow). Medians over the repetitions.\n",
        a.ask_connect.len(),
        a.connects,
        a.execs
    );
    let _ = writeln!(
        o,
        "| action | enforce µs | ask µs | added by ask µs |\n|---|---:|---:|---:|"
    );
    for (what, e, k) in [
        ("connect (allowed)", &a.enforce_connect, &a.ask_connect),
        ("fork + exec (allowed)", &a.enforce_exec, &a.ask_exec),
    ] {
        let _ = writeln!(
            o,
            "| {what} | {} | {} | **{}** |",
            us(med(e)),
            us(med(k)),
            us(med(k) - med(e))
        );
    }
    let _ = writeln!(
        o,
        "\nFrom starting `agent-monitor approve ID --once` to the held connect's result (an upper \
         bound: includes the approve command's start-up): median **{:.1} ms** over {} approvals.\n",
        median_f(&a.release_ms),
        a.release_ms.len()
    );
}

/// A server-name rule's connections (judged in the kernel) against the direct path.
pub(super) fn egress_section(o: &mut String, e: Option<&crate::run::EgressCost>) {
    let _ = writeln!(o, "## Server-name rules\n");
    let Some(e) = e.filter(|e| !e.direct.is_empty()) else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let _ = writeln!(
        o,
        "{} repetitions, interleaved; in each, {} small requests (a new connection each: \
         ClientHello, 64 bytes there and back) and one {} MiB download, *direct* from an ordinary \
         process and *as an agent* with a `[[network.tls]]` rule for the server's name (the \
         daemon's default, `--server-names kernel`: the connect goes straight to the server and \
         the kernel's egress hook judges the ClientHello's server name; nothing relays the \
         bytes). Medians over the repetitions.\n",
        e.direct.len(),
        e.requests,
        e.mib
    );
    request_table(
        o,
        &[
            ("direct", &e.direct, &e.direct_download),
            (
                "as an agent, judged in the kernel",
                &e.through,
                &e.through_download,
            ),
        ],
    );
    let _ = writeln!(o);
    if !e.through_daemon_cpu_s.is_empty() {
        let _ = writeln!(
            o,
            "The daemon's CPU time (user + system) per GiB of the agent's downloads: **{:.2} s** \
             (median over the downloads; the daemon only reads the verdict's record).\n",
            median_f(&e.through_daemon_cpu_s) * 1024.0 / e.mib as f64
        );
    }
}
