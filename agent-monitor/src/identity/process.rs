//! Agent processes the daemon knows of, from the kernel's fork/exec/exit records, so each action can
//! name the chain of processes from the agent's root to the actor.

use std::collections::HashMap;

use crate::action::ChainLink;

/// Longest chain reported; deeper ancestry is cut at the root end.
const MAX_CHAIN: usize = 32;

#[derive(Clone, Debug)]
struct Proc {
    parent: Option<u32>,
    exe: String,
    /// First arguments of its last exec (argv[1..], shortened).
    args: Vec<String>,
    /// Monotonic ns of its exit. Exited processes are kept a while: a daemonised grandchild's
    /// actions are reported after its parent is gone, and the chain must still name that parent.
    exited_at: Option<u64>,
}

/// pid → (parent, executable) for agent processes.
#[derive(Default)]
pub struct ProcessTable {
    procs: HashMap<u32, Proc>,
}

impl ProcessTable {
    /// A process that became an agent without being forked by one (the `run` client).
    pub fn add_root(&mut self, pid: u32, exe: String, args: Vec<String>) {
        self.procs.insert(
            pid,
            Proc {
                parent: None,
                exe,
                args,
                exited_at: None,
            },
        );
    }

    pub fn on_fork(&mut self, parent: u32, child: u32, parent_comm: &str) {
        let (exe, args) = self
            .procs
            .get(&parent)
            .map(|p| (p.exe.clone(), p.args.clone()))
            .unwrap_or_else(|| (parent_comm.to_string(), Vec::new()));
        self.procs.entry(parent).or_insert_with(|| Proc {
            parent: None,
            exe: exe.clone(),
            args: args.clone(),
            exited_at: None,
        });
        self.procs.insert(
            child,
            Proc {
                parent: Some(parent),
                exe,
                args,
                exited_at: None,
            },
        );
    }

    pub fn on_exec(&mut self, pid: u32, path: &str, args: Vec<String>) {
        self.procs
            .entry(pid)
            .and_modify(|p| {
                p.exe = path.to_string();
                p.args = args.clone();
            })
            .or_insert_with(|| Proc {
                parent: None,
                exe: path.to_string(),
                args,
                exited_at: None,
            });
    }

    /// `now_ns`: monotonic time of the exit (the kernel's record time).
    pub fn on_exit(&mut self, pid: u32, now_ns: u64) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.exited_at = Some(now_ns);
        }
    }

    /// Forgets processes that exited more than `keep_ns` before `now_ns`.
    pub fn prune(&mut self, now_ns: u64, keep_ns: u64) {
        self.procs.retain(|_, p| {
            p.exited_at
                .is_none_or(|t| now_ns.saturating_sub(t) < keep_ns)
        });
    }

    pub fn exe(&self, pid: u32) -> Option<&str> {
        self.procs.get(&pid).map(|p| p.exe.as_str())
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// Root first, `pid` last. A pid never seen gives a chain of itself, named `fallback`.
    pub fn chain(&self, pid: u32, fallback: &str) -> Vec<ChainLink> {
        let mut out = Vec::new();
        let mut cur = Some(pid);
        while let Some(p) = cur {
            if out.len() == MAX_CHAIN || out.iter().any(|l: &ChainLink| l.pid == p) {
                break;
            }
            match self.procs.get(&p) {
                Some(proc) => {
                    out.push(ChainLink {
                        pid: p,
                        exe: proc.exe.clone(),
                        args: proc.args.clone(),
                    });
                    cur = proc.parent;
                }
                None => {
                    if out.is_empty() {
                        out.push(ChainLink {
                            pid: p,
                            exe: fallback.to_string(),
                            args: Vec::new(),
                        });
                    }
                    break;
                }
            }
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pids(c: &[ChainLink]) -> Vec<u32> {
        c.iter().map(|l| l.pid).collect()
    }

    #[test]
    fn chain_follows_forks_and_execs() {
        let mut t = ProcessTable::default();
        t.add_root(10, "/usr/bin/agent-monitor".into(), vec![]);
        t.on_exec(10, "/usr/bin/python3", vec!["tool.py".into()]);
        t.on_fork(10, 11, "python3");
        t.on_exec(11, "/bin/sh", vec!["-c".into(), "curl x".into()]);
        t.on_fork(11, 12, "sh");
        t.on_exec(12, "/usr/bin/curl", vec![]);
        let c = t.chain(12, "curl");
        assert_eq!(pids(&c), vec![10, 11, 12]);
        assert_eq!(c[0].exe, "/usr/bin/python3");
        assert_eq!(c[2].exe, "/usr/bin/curl");
        assert_eq!(c[1].args, ["-c", "curl x"]);
    }

    #[test]
    fn forked_child_inherits_exe_until_it_execs() {
        let mut t = ProcessTable::default();
        t.add_root(1, "/bin/sh".into(), vec![]);
        t.on_fork(1, 2, "sh");
        assert_eq!(t.exe(2), Some("/bin/sh"));
    }

    #[test]
    fn unknown_pid_is_its_own_chain() {
        let t = ProcessTable::default();
        let c = t.chain(99, "mystery");
        assert_eq!(pids(&c), vec![99]);
        assert_eq!(c[0].exe, "mystery");
    }

    #[test]
    fn exited_parents_stay_in_the_chain_until_pruned() {
        let mut t = ProcessTable::default();
        t.add_root(1, "/bin/sh".into(), vec![]);
        t.on_fork(1, 2, "sh");
        t.on_fork(2, 3, "sh");
        t.on_exit(2, 1_000);
        // The daemonised grandchild still names its vanished parent.
        assert_eq!(pids(&t.chain(3, "sh")), vec![1, 2, 3]);
        t.prune(1_500, 1_000);
        assert_eq!(t.len(), 3);
        t.prune(2_000, 1_000);
        assert_eq!(t.len(), 2);
        assert_eq!(pids(&t.chain(3, "sh")), vec![3]);
    }

    #[test]
    fn cycles_and_depth_are_bounded() {
        let mut t = ProcessTable::default();
        t.on_fork(1, 2, "a");
        t.on_fork(2, 1, "b"); // pid reuse can make a loop
        assert!(t.chain(1, "x").len() <= 2);
        let mut t = ProcessTable::default();
        t.add_root(0, "/r".into(), vec![]);
        for p in 1..100 {
            t.on_fork(p - 1, p, "x");
        }
        assert_eq!(t.chain(99, "x").len(), MAX_CHAIN);
    }
}
