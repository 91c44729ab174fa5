//! The file guard's cost (`[files]`, docs/files.md): open()+close() of an unrelated file and of a
//! file an agent's policy denies (marked), by an ordinary process and by an agent, without a
//! daemon (the bare kernel) and with one.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::load::OpStats;
use crate::run::{Env, check_interrupt};
use crate::setups::{Daemon, DaemonConfig, wait_for};

const FILES_AGENT: &str = "filesbench";

/// N times open(PATH, O_RDONLY) then close(); `refused` counts EPERM.
pub fn open_loop(n: usize, path: &str) -> anyhow::Result<OpStats> {
    let c = std::ffi::CString::new(path)?;
    let (mut times, mut ok, mut refused, mut other) = (Vec::with_capacity(n), 0, 0, 0);
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: a NUL-terminated path; the descriptor is closed at once.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
        times.push(t.elapsed().as_nanos() as u64);
        match fd {
            0.. => ok += 1,
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) => {
                refused += 1
            }
            _ => other += 1,
        }
    }
    Ok(crate::load::stats(times, ok, refused, other))
}

/// Per scenario (label), one [`OpStats`] per repetition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FilesLatency {
    pub opens: usize,
    pub rows: Vec<(String, Vec<OpStats>)>,
}

impl FilesLatency {
    fn push(&mut self, label: &str, s: OpStats) {
        match self.rows.iter_mut().find(|(l, _)| l == label) {
            Some((_, v)) => v.push(s),
            None => self.rows.push((label.to_string(), vec![s])),
        }
    }
}

pub fn measure(env: &Env, dir: &Path) -> anyhow::Result<FilesLatency> {
    let p = &env.plan;
    let opens = if p.quick { 2_000 } else { 20_000 };
    let reps = p.reps.min(5);
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    let unrelated = files.join("unrelated");
    let marked = files.join("marked");
    std::fs::write(&unrelated, "u")?;
    std::fs::write(&marked, "m")?;
    let args = |f: &Path| {
        vec![
            "open".to_string(),
            "--n".into(),
            opens.to_string(),
            "--path".into(),
            f.display().to_string(),
        ]
    };
    let mut out = FilesLatency {
        opens,
        ..FilesLatency::default()
    };
    for _ in 0..reps {
        check_interrupt()?;
        out.push(
            "no daemon: unrelated file",
            crate::run::load(env, None, &args(&unrelated))?,
        );
        out.push(
            "no daemon: the file to be marked",
            crate::run::load(env, None, &args(&marked))?,
        );
    }
    let policies = dir.join("files-policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join(format!("{FILES_AGENT}.toml")),
        format!(
            "agent = \"{FILES_AGENT}\"\nmode = \"enforce\"\n[exec]\nallow = [\"{}\"]\n\
             [files]\ndeny = [\"{}\"]\n",
            env.bench.display(),
            marked.display()
        ),
    )?;
    let cfg = DaemonConfig {
        policies,
        ..env.daemon.clone()
    };
    let d = Daemon::start(&cfg, "files")?;
    let applied = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        std::fs::read_to_string(&d.log).is_ok_and(|l| l.contains("[files] in force"))
    });
    if !applied {
        bail!("[files] not in force after 10 s; see {}", d.log.display());
    }
    for rep in 0..reps {
        check_interrupt()?;
        out.push(
            "daemon: unrelated file, outside agents",
            crate::run::load(env, None, &args(&unrelated))?,
        );
        let host: OpStats = crate::run::load(env, None, &args(&marked))?;
        let task = format!("files-{rep}");
        let agent_unrelated: OpStats =
            crate::run::load_as(env, FILES_AGENT, (&d, &task), &args(&unrelated))?;
        let agent_marked: OpStats =
            crate::run::load_as(env, FILES_AGENT, (&d, &task), &args(&marked))?;
        if host.ok != opens || agent_marked.refused != opens {
            bail!(
                "files repetition {rep}: {} of {opens} host opens of the marked file succeeded, \
                 {} of {opens} agent opens were refused",
                host.ok,
                agent_marked.refused
            );
        }
        out.push("daemon: marked file, outside agents (allowed)", host);
        out.push("daemon: unrelated file, agent", agent_unrelated);
        out.push(
            "daemon: marked file, agent (denied, reported)",
            agent_marked,
        );
    }
    Ok(out)
}

/// The report's section.
pub fn section(o: &mut String, f: Option<&FilesLatency>, us: impl Fn(f64) -> String) {
    let _ = writeln!(o, "## File guard (`[files]`)\n");
    let Some(f) = f.filter(|f| !f.rows.is_empty()) else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let _ = writeln!(
        o,
        "{} open()+close() per repetition; medians over the repetitions. A marked file's opens \
         wait for the daemon's file guard thread to answer (fanotify permission event); every \
         other open pays nothing.\n",
        f.opens
    );
    let _ = writeln!(o, "| open of | median µs | p99 µs |\n|---|---:|---:|");
    for (label, v) in &f.rows {
        let med = |g: fn(&OpStats) -> u64| {
            crate::report::median_f(&v.iter().map(|x| g(x) as f64).collect::<Vec<_>>())
        };
        let _ = writeln!(
            o,
            "| {label} | {} | {} |",
            us(med(|x| x.median_ns)),
            us(med(|x| x.p99_ns))
        );
    }
    let _ = writeln!(o);
}
