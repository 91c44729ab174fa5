//! Criterion benches of the daemon's per-record paths: policy evaluation, decoding a kernel
//! record, formatting the JSON audit line and the journald fields.
//!
//! agent-monitor is a binary crate, so the pure modules are compiled into this bench by path
//! (they only refer to each other through `crate::`). That keeps the daemon a single binary and
//! leaves its `main.rs` alone.

// `cargo bench` compiles the modules with cfg(test) but without their #[test] functions: their test
// helpers and imports look unused here.
#![allow(dead_code, unused_imports)]

#[path = "../src/action.rs"]
mod action;
#[path = "../src/event.rs"]
mod event;
#[path = "../src/output/mod.rs"]
mod output;
#[path = "../src/policy/mod.rs"]
mod policy;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use agent_monitor_common::{self as common, ActionRecord};
use criterion::{Criterion, criterion_group, criterion_main};

use action::{Action, Verdict};

/// A policy of realistic size: 40 network rules, 40 exec rules.
fn policy() -> policy::Policy {
    let mut net: Vec<String> = (0..40).map(|i| format!("\"10.{i}.0.0/16:443\"")).collect();
    net.push("\"127.0.0.1:8080\"".into());
    let mut exec: Vec<String> = (0..40).map(|i| format!("\"/opt/tool{i}/bin/*\"")).collect();
    exec.push("\"/usr/bin/git\"".into());
    let text = format!(
        "agent = \"bench\"\nmode = \"enforce\"\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
        net.join(", "),
        exec.join(", ")
    );
    policy::Policy::parse(&text, Path::new("bench.toml")).expect("bench policy parses")
}

fn record(kind: u32) -> Vec<u8> {
    // SAFETY: ActionRecord is plain integers and arrays of them: all zeroes is a valid value.
    // Zeroed rather than listed, so fields added to the record do not break the bench.
    let mut r: ActionRecord = unsafe { std::mem::zeroed() };
    r.kind = kind;
    r.verdict = common::VERDICT_ALLOWED;
    r.cgroup_id = 4242;
    r.ktime_ns = 1;
    r.pid = 1000;
    r.tid = 1000;
    r.uid = 1000;
    r.family = common::AF_INET;
    r.port = 8080;
    r.sock_type = 1;
    r.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
    r.comm[..6].copy_from_slice(b"python");
    let path = b"/usr/bin/git";
    r.path[..path.len()].copy_from_slice(path);
    r.path_len = path.len() as u32;
    // SAFETY: ActionRecord is plain integers without padding; viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts((&r as *const ActionRecord).cast::<u8>(), size_of_val(&r)) }
        .to_vec()
}

/// The unit tests' fully populated connect (three-process chain), as an allowed action: the
/// common case on the per-record path. (Bench targets are compiled with cfg(test).)
fn action() -> Action {
    Action {
        verdict: Verdict::Allowed,
        enforcement: None,
        ..output::tests::connect_action()
    }
}

fn benches(c: &mut Criterion) {
    let p = policy();
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let far = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    c.bench_function("policy/check_connect allowed", |b| {
        b.iter(|| p.check_connect(black_box(local), black_box(8080)))
    });
    c.bench_function("policy/check_connect denied", |b| {
        b.iter(|| p.check_connect(black_box(far), black_box(443)))
    });
    c.bench_function("policy/check_exec allowed", |b| {
        b.iter(|| p.check_exec(black_box("/usr/bin/git")))
    });
    c.bench_function("policy/decision to_string", |b| {
        let d = p.check_connect(local, 8080);
        b.iter(|| black_box(&d).to_string())
    });
    let connect = record(common::KIND_CONNECT);
    let exec = record(common::KIND_EXEC);
    c.bench_function("decode/connect record", |b| {
        b.iter(|| event::decode(black_box(&connect)))
    });
    c.bench_function("decode/exec record", |b| {
        b.iter(|| event::decode(black_box(&exec)))
    });
    let a = action();
    c.bench_function("output/json_line", |b| {
        b.iter(|| output::json::json_line(black_box(&a)))
    });
    c.bench_function("output/journald fields", |b| {
        b.iter(|| output::journald::journal_fields(black_box(&a)))
    });
}

criterion_group!(inprocess, benches);
criterion_main!(inprocess);
