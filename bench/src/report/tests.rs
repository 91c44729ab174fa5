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
        unix: None,
        egress: None,
        intercept: None,
        policy_size: vec![],
        files: None,
        ask: None,
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
