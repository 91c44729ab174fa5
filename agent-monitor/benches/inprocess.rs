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

use agent_monitor_common as common;
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

/// The bytes of a record of `kind` as the kernel writes it (its kind's size), zeroed where the
/// bench does not care. Zeroed rather than listed, so fields added to the record do not break it.
fn record(kind: common::RecordKind) -> Vec<u8> {
    let mut r = vec![0u8; kind.record_size()];
    let header = common::RecordHeader {
        kind: kind as u32,
        verdict: common::VERDICT_ALLOWED,
        cgroup_id: 4242,
        ktime_ns: 1,
        pid: 1000,
        tid: 1000,
        uid: 1000,
        flags: 0,
        comm: *b"python\0\0\0\0\0\0\0\0\0\0",
        agent: 0,
        task: 0,
        source: 0,
        _pad: 0,
    };
    let at = size_of::<common::RecordHeader>();
    // SAFETY: `r` is at least a header and the kind's payload long; both are plain integers,
    // written unaligned.
    unsafe {
        std::ptr::write_unaligned(r.as_mut_ptr().cast(), header);
        match kind {
            common::RecordKind::Exec => {
                let p = r.as_mut_ptr().add(at).cast::<common::ExecPayload>();
                let mut payload: common::ExecPayload = std::mem::zeroed();
                let path = b"/usr/bin/git";
                payload.path[..path.len()].copy_from_slice(path);
                payload.path_len = path.len() as u32;
                std::ptr::write_unaligned(p, payload);
            }
            _ => std::ptr::write_unaligned(
                r.as_mut_ptr().add(at).cast(),
                common::NetPayload {
                    family: common::AF_INET,
                    port: 8080,
                    sock_type: 1,
                    addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
                },
            ),
        }
    }
    r
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
    let connect = record(common::RecordKind::Connect);
    let exec = record(common::RecordKind::Exec);
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
