//! Unix-socket connects: what the cgroup `connect_unix` hook costs a process outside every agent
//! (nothing: it sits below the agents' cgroup) and an agent with a `[unix]` section (the name read, two hash lookups, a
//! record), against the bare kernel.

use std::fmt::Write as _;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::load::{OpStats, stats};
use crate::report::median;
use crate::run::{Env, check_interrupt, load, load_as};
use crate::setups::{Daemon, DaemonConfig};

/// The agent of this measurement: may connect to the bench socket, run the bench binary.
const UNIX_AGENT: &str = "unixbench";

/// Per repetition (interleaved): the same connect loop with no monitor, with the daemon running
/// but outside every agent, and as an agent whose `[unix]` list allows the socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UnixLatency {
    pub connects: usize,
    pub bare: Vec<OpStats>,
    pub outside_agent: Vec<OpStats>,
    pub agent_allowed: Vec<OpStats>,
}

/// The load generator: N times socket(AF_UNIX, SOCK_STREAM), connect(PATH), close().
pub fn connect(n: usize, path: &Path) -> anyhow::Result<OpStats> {
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= sa.sun_path.len() {
        bail!("{} is too long for sun_path", path.display());
    }
    for (d, s) in sa.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as u32;
    let mut times = Vec::with_capacity(n);
    // Per connect: succeeded, or the errno it failed with.
    let mut outcomes: Vec<Result<(), i32>> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: plain syscalls on a socket this loop owns; the address is a live local.
        let outcome = unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket(): {}", std::io::Error::last_os_error());
            }
            let r = libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len);
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            libc::close(fd);
            if r == 0 { Ok(()) } else { Err(e) }
        };
        times.push(t.elapsed().as_nanos() as u64);
        outcomes.push(outcome);
    }
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes.iter().filter(|o| **o == Err(libc::EPERM)).count();
    Ok(stats(times, ok, refused, n - ok - refused))
}

/// The phase: a listener in this process (outside every agent), three setups per repetition.
pub fn measure(env: &Env, dir: &Path) -> anyhow::Result<UnixLatency> {
    let p = &env.plan;
    let connects = p.connects;
    let reps = p.reps.min(5);
    let path = dir.join("unix-bench.sock");
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let policies = dir.join("unix-policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{UNIX_AGENT}.toml")),
        format!(
            "agent = \"{UNIX_AGENT}\"\nmode = \"enforce\"\n[exec]\nallow = [\"{}\"]\n\
             [unix]\nallow = [{:?}]\n",
            env.bench.display(),
            path.display().to_string()
        ),
    )?;
    let cfg = DaemonConfig {
        policies,
        ..env.daemon.clone()
    };
    let args = vec![
        "unix-connect".to_string(),
        "--n".into(),
        connects.to_string(),
        "--path".into(),
        path.display().to_string(),
    ];
    let mut out = UnixLatency {
        connects,
        ..UnixLatency::default()
    };
    for rep in 0..reps {
        check_interrupt()?;
        eprintln!("bench: unix connects rep {}/{reps}", rep + 1);
        out.bare.push(load(env, None, &args)?);
        let d = Daemon::start(&cfg, "unix")?;
        out.outside_agent.push(load(env, None, &args)?);
        out.agent_allowed.push(load_as(
            env,
            UNIX_AGENT,
            (&d, &format!("unix-{rep}")),
            &args,
        )?);
        drop(d);
        for (what, s) in [
            ("bare", out.bare.last()),
            ("outside", out.outside_agent.last()),
            ("agent", out.agent_allowed.last()),
        ] {
            if s.is_some_and(|s| s.ok != connects) {
                bail!("unix repetition {rep}: not every {what} connect succeeded: {s:?}");
            }
        }
    }
    Ok(out)
}

/// The report's section.
pub fn section(o: &mut String, u: Option<&UnixLatency>) {
    let Some(u) = u.filter(|u| !u.bare.is_empty()) else {
        return;
    };
    let med = |v: &[OpStats]| median(&v.iter().map(|s| s.median_ns).collect::<Vec<_>>());
    let (bare, outside, agent) = (med(&u.bare), med(&u.outside_agent), med(&u.agent_allowed));
    let pct = |x: f64| (x / bare - 1.0) * 100.0;
    let _ = writeln!(o, "\n## Unix-socket connects\n");
    let _ = writeln!(
        o,
        "{} connects of an AF_UNIX stream socket to a listener on a pathname socket, per \
         repetition ({} repetitions), median of the per-repetition medians. The cgroup \
         `connect_unix` hook sits below the agents' cgroup (no selectors here), so a process \
         outside every agent runs no cgroup program (with selectors it sits at the root); the \
         tracepoints that judge a connect's listener (`sys_exit_connect`, `sk_data_ready`, \
         `sys_exit_io_uring_enter`) are attached only while a policy has `[unix]` and \
         selectors are armed: not here.\n",
        u.connects,
        u.bare.len()
    );
    let _ = writeln!(o, "| setup | connect | vs bare kernel |\n|---|---:|---:|");
    let _ = writeln!(o, "| no monitor | {:.0} ns | |", bare);
    let _ = writeln!(
        o,
        "| outside every agent | {:.0} ns | {:+.1} % |",
        outside,
        pct(outside)
    );
    let _ = writeln!(
        o,
        "| agent, socket on its `[unix]` list | {:.0} ns | {:+.1} % |\n",
        agent,
        pct(agent)
    );
}
