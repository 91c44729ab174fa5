//! The cost of ask mode on `run`'s side (docs/ask-run.md): an ask-mode agent's allowed connect
//! and exec (held by `run`'s seccomp supervisor, asked on the ask channel, allowed at once by
//! the daemon) against the same allowed actions of an enforce-mode agent, interleaved; and the
//! time from `agent-monitor approve ID --once` to the held connect returning.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::load::OpStats;
use crate::run::{AGENT, Env, check_interrupt, load_as};
use crate::setups::{Daemon, DaemonConfig, Listener, wait_for};

/// The ask-mode agent: the same allowlist as [`AGENT`], in ask mode.
const ASK_AGENT: &str = "askbench";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AskLatency {
    pub connects: usize,
    pub execs: usize,
    /// Per repetition: the enforce-mode agent's allowed connects and execs…
    pub enforce_connect: Vec<OpStats>,
    pub enforce_exec: Vec<OpStats>,
    /// … and the ask-mode agent's, on the same allowlist.
    pub ask_connect: Vec<OpStats>,
    pub ask_exec: Vec<OpStats>,
    /// Per repetition: from starting `approve ID --once` to the held connect's agent printing
    /// its result (an upper bound: includes the approve command's own start-up), in ms.
    pub release_ms: Vec<f64>,
}

/// Measures ask mode; None (said on stderr) when the daemon does not take an ask-mode policy.
pub fn measure(env: &Env, dir: &Path) -> anyhow::Result<Option<AskLatency>> {
    let p = &env.plan;
    let reps = p.reps.min(5);
    let connects = p.connects.min(2000);
    let execs = p.execs.min(500);
    let off_list = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let policies = dir.join("ask-policies");
    std::fs::create_dir_all(&policies)?;
    let allow = format!(
        "[network]\nallow = [\"127.0.0.1:{}\"]\n[exec]\nallow = [\"{}\", \"/bin/true\"]\n",
        env.tcp_port,
        env.bench.display()
    );
    for (agent, mode) in [(AGENT, "enforce"), (ASK_AGENT, "ask")] {
        std::fs::write(
            policies.join(format!("{agent}.toml")),
            format!("agent = \"{agent}\"\nmode = \"{mode}\"\n{allow}"),
        )?;
    }
    let cfg = DaemonConfig {
        policies,
        ..env.daemon.clone()
    };
    let d = match Daemon::start(&cfg, "ask") {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "bench: ask mode NOT measured: the daemon refused the ask-mode policy: {e:#}"
            );
            return Ok(None);
        }
    };
    let _server = Listener::start(&env.bench, env.tcp_port)?;
    let _off_list_server = Listener::start(&env.bench, off_list)?;
    let s = |v: &dyn ToString| v.to_string();
    let connect = |to: u16, n: usize| {
        vec![
            s(&"connect"),
            s(&"--n"),
            s(&n),
            s(&"--port"),
            s(&env.tcp_port),
            s(&"--to"),
            format!("127.0.0.1:{to}"),
        ]
    };
    let exec = vec![
        s(&"exec"),
        s(&"--n"),
        s(&execs),
        s(&"--prog"),
        s(&"/bin/true"),
    ];
    let mut out = AskLatency {
        connects,
        execs,
        ..AskLatency::default()
    };
    for rep in 0..reps {
        check_interrupt()?;
        eprintln!("bench: ask mode rep {}/{reps}", rep + 1);
        let task = format!("ask-{rep}");
        let t = (&d, task.as_str());
        let ec: OpStats = load_as(env, AGENT, t, &connect(env.tcp_port, connects))?;
        let ac: OpStats = load_as(env, ASK_AGENT, t, &connect(env.tcp_port, connects))?;
        let ee: OpStats = load_as(env, AGENT, t, &exec)?;
        let ae: OpStats = load_as(env, ASK_AGENT, t, &exec)?;
        for (what, st, n) in [
            ("enforce connect", &ec, connects),
            ("ask connect", &ac, connects),
            ("enforce exec", &ee, execs),
            ("ask exec", &ae, execs),
        ] {
            if st.ok != n {
                bail!("ask repetition {rep}: {what}: {} of {n} succeeded", st.ok);
            }
        }
        out.enforce_connect.push(ec);
        out.ask_connect.push(ac);
        out.enforce_exec.push(ee);
        out.ask_exec.push(ae);
        out.release_ms.push(release(
            env,
            &d,
            &format!("ask-release-{rep}"),
            &connect(off_list, 1),
        )?);
    }
    Ok(Some(out))
}

/// One off-list connect of the ask-mode agent, held until we approve it once; the time from
/// starting `approve` to the agent's result line.
fn release(env: &Env, d: &Daemon, task: &str, args: &[String]) -> anyhow::Result<f64> {
    let mut agent = Command::new(&env.bin)
        .args([
            "run",
            "--agent",
            ASK_AGENT,
            "--task",
            task,
            "--control-socket",
        ])
        .arg(&d.socket)
        .arg("--")
        .arg(&env.bench)
        .arg("load")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the held connect")?;
    let mut id = None;
    wait_for(Duration::from_secs(10), Duration::from_millis(2), || {
        id = pending_id(env, d);
        id.is_some()
    });
    let Some(id) = id else {
        let _ = agent.kill();
        let _ = agent.wait();
        bail!("the off-list connect of {ASK_AGENT} was not held within 10 s");
    };
    let start = Instant::now();
    let approved = Command::new(&env.bin)
        .args(["approve", &id.to_string(), "--once", "--control-socket"])
        .arg(&d.socket)
        .output()?;
    if !approved.status.success() {
        let _ = agent.kill();
        let _ = agent.wait();
        bail!(
            "approve {id} --once failed: {}",
            String::from_utf8_lossy(&approved.stderr)
        );
    }
    let mut line = String::new();
    let stdout = agent.stdout.take().context("piped stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let status = agent.wait()?;
    let st: OpStats = serde_json::from_str(line.trim())
        .with_context(|| format!("the held connect printed {line:?} ({status})"))?;
    if st.ok != 1 {
        bail!("the approved connect did not connect: {line}");
    }
    Ok(ms)
}

/// The id of the first held request of [`ASK_AGENT`] in `pending --json`.
fn pending_id(env: &Env, d: &Daemon) -> Option<u64> {
    let out = Command::new(&env.bin)
        .args(["pending", "--json", "--control-socket"])
        .arg(&d.socket)
        .output()
        .ok()?;
    fn find(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m)
                if m.get("agent").and_then(|a| a.as_str()) == Some(ASK_AGENT) =>
            {
                m.get("id")?.as_u64()
            }
            serde_json::Value::Object(m) => m.values().find_map(find),
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| find(&v))
        .or_else(|| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .find_map(|v: serde_json::Value| find(&v))
        })
}
