//! The host's processes as /proc tells them, read through the `procfs` crate: the one place the
//! daemon's identity code reads /proc. Every read is of a process that may exit at any moment, so
//! each answers "nothing" (None, empty) for a vanished process rather than an error.

use std::path::PathBuf;

use procfs::process::Process;

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// Every process now: (pid, parent pid). Processes that exit while being read are skipped.
pub fn processes() -> Vec<(u32, u32)> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| {
            let stat = p.stat().ok()?;
            Some((
                u32::try_from(stat.pid).ok()?,
                u32::try_from(stat.ppid).ok()?,
            ))
        })
        .collect()
}

/// Thread ids of process `pid` (empty if it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    process(pid)
        .and_then(|p| p.tasks().ok())
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| u32::try_from(t.tid).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup v2 path of `pid` (the `0::` line of /proc/PID/cgroup), e.g. `/agent-monitor/coder/t1`.
pub fn cgroup_v2(pid: u32) -> Option<String> {
    let cgroups = process(pid)?.cgroups().ok()?;
    cgroups
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
        .map(|c| c.pathname)
}

/// What /proc/PID/status says of who `pid` is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Real uid (the first `Uid:` field): whose process it is, as selectors and bindings see it.
    pub uid: u32,
    /// Supplementary groups (`Groups:`).
    pub groups: Vec<u32>,
}

pub fn credentials(pid: u32) -> Option<Credentials> {
    let status = process(pid)?.status().ok()?;
    Some(Credentials {
        uid: status.ruid,
        groups: status.groups,
    })
}

/// The executable `pid` runs (the target of /proc/PID/exe).
pub fn exe(pid: u32) -> Option<PathBuf> {
    process(pid)?.exe().ok()
}

/// The executable of `pid` as the process table names it: `?` when it cannot be read.
pub fn exe_name(pid: u32) -> String {
    exe(pid).map_or_else(|| "?".into(), |p| p.display().to_string())
}

/// The /proc/PID/exe link itself: opening or stat'ing it reaches the very file the process runs,
/// even one replaced or deleted since (what executable selectors compare).
pub fn exe_link(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/exe"))
}

/// The command name (`comm`) of `pid`.
pub fn comm(pid: u32) -> Option<String> {
    Some(process(pid)?.stat().ok()?.comm)
}

/// Whether `pid` exists and is not a zombie (a zombie keeps its pid but no longer its cgroup).
pub fn running(pid: u32) -> bool {
    process(pid).is_some_and(|p| p.is_alive())
}

/// Whether /proc has an entry for `pid` at all (a zombie has one).
pub fn exists(pid: u32) -> bool {
    process(pid).is_some_and(|p| p.stat().is_ok())
}

/// The first arguments of `pid` (argv[1..]): at most `MAX_ARGS`, each cut at `MAX_ARG_CHARS`.
/// Empty when the process is gone or has none. Read as bytes, not with procfs's `cmdline()`: that
/// one refuses a command line that is not UTF-8 (and drops empty arguments), where the chain
/// should still show the arguments, lossily.
pub fn args(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| args_from_cmdline(&b))
        .unwrap_or_default()
}

const MAX_ARGS: usize = 4;
const MAX_ARG_CHARS: usize = 80;

pub fn args_from_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .take(MAX_ARGS)
        .map(|a| {
            let s = String::from_utf8_lossy(a);
            if s.chars().count() > MAX_ARG_CHARS {
                let cut: String = s.chars().take(MAX_ARG_CHARS).collect();
                format!("{cut}…")
            } else {
                s.into_owned()
            }
        })
        .collect()
}

/// What the identity directory reads of a process, so attribution can be tested with a fake host.
pub trait ProcessView {
    fn cgroup(&self, pid: u32) -> Option<String>;
    fn uid(&self, pid: u32) -> Option<u32>;
    fn args(&self, pid: u32) -> Vec<String>;
    fn threads(&self, pid: u32) -> Vec<u32>;
}

/// The real host, through /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveProcs;

impl ProcessView for LiveProcs {
    fn cgroup(&self, pid: u32) -> Option<String> {
        cgroup_v2(pid)
    }
    fn uid(&self, pid: u32) -> Option<u32> {
        credentials(pid).map(|c| c.uid)
    }
    fn args(&self, pid: u32) -> Vec<String> {
        args(pid)
    }
    fn threads(&self, pid: u32) -> Vec<u32> {
        threads(pid)
    }
}

/// The parent pid and command name of `pid` (one read of /proc/PID/stat), for the process trees
/// of `agent-monitor top`.
pub fn parent_and_comm(pid: u32) -> Option<(u32, String)> {
    let stat = process(pid)?.stat().ok()?;
    Some((u32::try_from(stat.ppid).ok()?, stat.comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child whose command name has spaces and parentheses (`comm` is what the kernel puts in
    /// parentheses in /proc/PID/stat) is still listed with the right parent.
    #[test]
    fn parent_after_a_name_with_spaces_and_parentheses() {
        // The kernel names a process after the file it exec'd: a link with such a name.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a) b) c");
        std::os::unix::fs::symlink("/bin/sleep", &odd).unwrap();
        let mut child = std::process::Command::new(&odd)
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Until the exec is done the child is still a copy of this test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while comm(pid).as_deref() != Some("a) b) c") && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(comm(pid).as_deref(), Some("a) b) c"));
        let listed = processes();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            listed.contains(&(pid, std::process::id())),
            "{pid} not listed under {}",
            std::process::id()
        );
    }

    #[test]
    fn this_process_is_listed_with_its_parent_threads_and_cgroup() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(processes().contains(&(me, parent)));
        assert!(threads(me).contains(&me));
        assert!(running(me) && exists(me));
        let line = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let by_hand = line.lines().find_map(|l| l.strip_prefix("0::"));
        assert_eq!(cgroup_v2(me).as_deref(), by_hand);
        assert_eq!(
            credentials(me).map(|c| c.uid),
            Some(unsafe { libc::getuid() })
        );
        assert_eq!(exe(me), std::env::current_exe().ok());
        let groups = nix::unistd::getgroups().unwrap();
        let mut want: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
        want.sort();
        want.dedup();
        let mut got = credentials(me).unwrap().groups;
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_vanished_process_reads_as_nothing() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!running(pid) && !exists(pid));
        assert!(threads(pid).is_empty() && args(pid).is_empty());
        assert_eq!(cgroup_v2(pid), None);
        assert_eq!(credentials(pid), None);
        assert_eq!(exe_name(pid), "?");
        assert!(!processes().iter().any(|&(p, _)| p == pid));
    }

    #[test]
    fn cmdline_args_are_shortened() {
        let raw = b"/usr/bin/python3\0-c\0print(1)\0a\0b\0c\0";
        assert_eq!(args_from_cmdline(raw), ["-c", "print(1)", "a", "b"]);
        let long = format!("x\0{}\0", "y".repeat(100));
        let a = args_from_cmdline(long.as_bytes());
        assert_eq!(a[0].chars().count(), 81);
        assert!(args_from_cmdline(b"").is_empty());
        // Not UTF-8: kept, lossily.
        assert_eq!(args_from_cmdline(b"x\0a\xffb\0"), ["a\u{fffd}b"]);
    }
}
