//! The identity directory against an in-memory kernel and host: attribution, placements, the
//! process table, selectors across reloads and start-up tagging.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use agent_monitor_common::{self as common, AgentSlot, ExecFileKey, IdentityConfig};

use super::selectors::HostProcess;
use super::*;
use crate::identity::procfs::ProcessView;
use crate::identity::tables::IdentityTables;
use crate::identity::{Tasks, UNVERIFIED_TASK, agent_id};
use crate::policy::PolicySet;
use crate::policy::model::Policy;

/// One arming pass, the host asked in place (the daemon asks it off the event loop).
fn arm(
    dir: &mut IdentityDirectory,
    kernel: &mut FakeKernel,
    registry: &mut Tasks,
    cgroup_root: &Path,
) -> (crate::identity::selected::ArmReport, anyhow::Result<()>) {
    let probed = dir.arm_plan(cgroup_root).run();
    dir.arm_selectors(kernel, registry, &probed)
        .expect("probed from the selectors in force")
}

/// The kernel's identity tables, in memory.
#[derive(Default)]
struct FakeKernel {
    cgroups: BTreeMap<u64, AgentSlot>,
    tags: BTreeMap<u32, AgentSlot>,
    uids: BTreeMap<u32, AgentSlot>,
    files: HashMap<ExecFileKey, AgentSlot>,
    config: Option<IdentityConfig>,
    /// The agent cgroup map refuses inserts (full).
    full: bool,
}

impl IdentityTables for FakeKernel {
    fn agent_cgroups(&self) -> anyhow::Result<Vec<(u64, AgentSlot)>> {
        Ok(self.cgroups.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()> {
        anyhow::ensure!(!self.full, "adding to the agent identity map (full?)");
        self.cgroups.insert(cgroup_id, slot);
        Ok(())
    }
    fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        self.cgroups.remove(&cgroup_id);
        Ok(())
    }
    fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        self.tags.get(&tid).copied()
    }
    fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        self.tags.insert(tid, slot);
        Ok(())
    }
    fn tags(&self) -> Vec<(u32, AgentSlot)> {
        self.tags.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn uid_selectors(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.uids.keys().copied().collect())
    }
    fn exec_selectors(&self) -> anyhow::Result<Vec<ExecFileKey>> {
        Ok(self.files.keys().copied().collect())
    }
    fn uid_selector_entries(&self) -> anyhow::Result<Vec<(u32, AgentSlot)>> {
        Ok(self.uids.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        self.uids.insert(uid, slot);
        Ok(())
    }
    fn remove_uid_selector(&mut self, uid: u32) -> anyhow::Result<()> {
        self.uids.remove(&uid);
        Ok(())
    }
    fn exec_selector_entries(&self) -> anyhow::Result<Vec<(ExecFileKey, AgentSlot)>> {
        Ok(self.files.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()> {
        self.files.insert(key, slot);
        Ok(())
    }
    fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        self.files.remove(&key);
        Ok(())
    }
    fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        self.config = Some(config);
        Ok(())
    }
}

/// Processes of a pretend host: pid → (cgroup, uid, threads).
#[derive(Default)]
struct FakeHost {
    procs: HashMap<u32, (Option<String>, Option<u32>, Vec<u32>)>,
}

impl FakeHost {
    fn with(mut self, pid: u32, cgroup: &str, uid: u32) -> Self {
        self.procs
            .insert(pid, (Some(cgroup.to_string()), Some(uid), vec![pid]));
        self
    }
}

impl ProcessView for FakeHost {
    fn cgroup(&self, pid: u32) -> Option<String> {
        self.procs.get(&pid)?.0.clone()
    }
    fn uid(&self, pid: u32) -> Option<u32> {
        self.procs.get(&pid)?.1
    }
    fn args(&self, _pid: u32) -> Vec<String> {
        Vec::new()
    }
    fn threads(&self, pid: u32) -> Vec<u32> {
        self.procs.get(&pid).map_or_else(Vec::new, |p| p.2.clone())
    }
}

fn policies(texts: &[&str]) -> PolicySet {
    let all = texts
        .iter()
        .enumerate()
        .map(
            |(i, t)| match Policy::parse(t, Path::new(&format!("p{i}.toml"))) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            },
        )
        .collect();
    match PolicySet::new(all) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// A directory on a temporary cgroup root (plain directories stand in for cgroups).
fn directory() -> (tempfile::TempDir, IdentityDirectory) {
    let root = tempfile::tempdir().unwrap();
    let cgroups = crate::identity::AgentCgroups::new(root.path()).unwrap();
    (root, IdentityDirectory::new(cgroups))
}

fn slot(agent: &str, task: u32, source: u32) -> AgentSlot {
    AgentSlot {
        agent: agent_id(agent),
        mode: common::MODE_ENFORCE,
        task,
        source,
    }
}

const CODER_UID: &str =
    "agent = \"coder\"\n[identity]\nuids = [1001]\ncgroups = [\"/agents/coder\"]\n";
const OTHER: &str = "agent = \"other\"\n";

#[test]
fn a_process_in_a_run_cgroup_is_its_task_first() {
    let (_root, dir) = directory();
    let set = policies(&[CODER_UID, OTHER]);
    let mut registry = Tasks::default();
    let t1 = registry.number("coder", "t1");
    let mut kernel = FakeKernel::default();
    // Even a tag of another agent does not outrank the `run` cgroup.
    kernel
        .tags
        .insert(7, slot("other", 0, common::SOURCE_EXECUTABLE));
    let host = FakeHost::default().with(7, "/agent-monitor/coder/t1", 1001);
    let id = dir.identify(&kernel, &host, &set, &registry, 7).unwrap();
    assert!(id.in_run_cgroup);
    assert_eq!(id.slot, slot("coder", t1, common::SOURCE_RUN));
    assert_eq!(
        dir.names(&set, &registry, &id.slot),
        ("coder".to_string(), "t1".to_string())
    );
}

#[test]
fn a_tag_then_a_selected_cgroup_then_the_uid() {
    let (root, mut dir) = directory();
    std::fs::create_dir_all(root.path().join("agents/coder/job")).unwrap();
    let set = policies(&[CODER_UID, OTHER]);
    let mut registry = Tasks::default();
    let mut kernel = FakeKernel::default();
    dir.replace_selectors(&mut kernel, &set, &mut registry);
    let (report, config) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    config.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let default = registry.find("coder", "default").unwrap();
    let tagged = slot("other", 0, common::SOURCE_EXECUTABLE);
    kernel.tags.insert(10, tagged);
    let host = FakeHost::default()
        .with(10, "/agents/coder/job", 1001)
        .with(11, "/agents/coder/job", 0)
        .with(12, "/user.slice", 1001)
        .with(13, "/user.slice", 1000);
    let of = |pid| dir.identify(&kernel, &host, &set, &registry, pid);
    assert_eq!(of(10).unwrap().slot, tagged);
    assert_eq!(
        of(11).unwrap().slot,
        slot("coder", default, common::SOURCE_CGROUP)
    );
    assert_eq!(
        of(12).unwrap().slot,
        slot("coder", default, common::SOURCE_UID)
    );
    assert!(!of(12).unwrap().in_run_cgroup);
    // Neither selected nor placed; and a pid /proc no longer has.
    assert_eq!(of(13), None);
    assert_eq!(of(99), None);
}

#[test]
fn records_are_named_by_task_number_then_run_cgroup_then_index() {
    let (_root, mut dir) = directory();
    let set = policies(&[CODER_UID, OTHER]);
    let mut registry = Tasks::default();
    let build = registry.number("coder", "build");
    dir.add_task(500, "coder", "t1", "/x/coder/t1".into());
    let live = |i: u32| (i == 3).then(|| "other".to_string());
    // The task number names both (the index names the agent when it can).
    assert_eq!(
        dir.attribute(&registry, build, 0, 3, live),
        ("other".into(), "build".into())
    );
    assert_eq!(
        dir.attribute(&registry, build, 0, 9, live),
        ("coder".into(), "build".into())
    );
    // No number: the `run` cgroup it acted in.
    assert_eq!(
        dir.attribute(&registry, common::TASK_NONE, 500, 3, live),
        ("coder".into(), "t1".into())
    );
    // Nothing known: said so, never guessed.
    assert_eq!(
        dir.attribute(&registry, common::TASK_NONE, 501, 9, live),
        ("agent-index-9".into(), "none".into())
    );
    // Names of an identity: by policy, by live task, else the id in hex.
    let gone = slot("retired", common::TASK_NONE, 0);
    assert_eq!(
        dir.names(&set, &registry, &gone),
        (format!("agent-{:08x}", agent_id("retired")), "none".into())
    );
    dir.add_task(501, "retired", "t", "/x/retired/t".into());
    assert_eq!(dir.names(&set, &registry, &gone).0, "retired");
}

#[test]
fn chains_keep_an_exited_parent_until_pruned() {
    let (_root, mut dir) = directory();
    let host = FakeHost::default();
    dir.add_root(&host, 1, "/usr/bin/agent-monitor".into());
    dir.on_exec(&host, 1, "/bin/sh");
    dir.on_fork(1, 2, "sh");
    dir.on_fork(2, 3, "sh");
    dir.on_exit(2, 1_000);
    let pids = |d: &IdentityDirectory| d.chain(3, "sh").iter().map(|l| l.pid).collect::<Vec<_>>();
    assert_eq!(pids(&dir), [1, 2, 3]);
    assert_eq!(dir.chain(3, "sh")[0].exe, "/bin/sh");
    let keep = 60_000;
    dir.prune(1_000 + keep - 1, keep);
    assert_eq!(pids(&dir), [1, 2, 3], "pruned before KEEP_EXITED");
    dir.prune(1_000 + keep, keep);
    assert_eq!(pids(&dir), [3]);
    assert_eq!(dir.process_count(), 2);
    // A pid never seen is its own chain, named by its command.
    let unknown = dir.chain(77, "curl");
    assert_eq!((unknown.len(), unknown[0].exe.as_str()), (1, "curl"));
}

#[test]
fn a_placement_lives_from_place_to_exit() {
    let (root, mut dir) = directory();
    let mut kernel = FakeKernel::default();
    let s = slot("coder", 4, common::SOURCE_RUN);
    let cg = dir
        .enter_task_cgroup(&mut kernel, "coder", "t1", s, 42)
        .unwrap();
    assert_eq!(kernel.cgroups.get(&cg.id), Some(&s));
    assert_eq!(cg.path, root.path().join("agent-monitor/coder/t1"));
    assert_eq!(
        std::fs::read_to_string(cg.path.join("cgroup.procs")).unwrap(),
        "42"
    );
    assert_eq!(dir.task(cg.id).map(|t| t.task.as_str()), Some("t1"));
    dir.note_placement(42, cg.id, Some("no Landlock".into()));
    dir.note_placement(43, cg.id, None);
    let privileges = control::Privileges {
        uid: 1001,
        ..Default::default()
    };
    dir.note_privileges(42, Some(privileges.clone()));
    dir.note_privileges(99, Some(privileges.clone()));
    assert!(dir.placement(99).is_none(), "only placed pids are kept");
    let listed = dir.placements_in(cg.id);
    assert_eq!(listed.iter().map(|p| p.pid).collect::<Vec<_>>(), [42, 43]);
    assert_eq!(listed[0].privileges, Some(privileges));
    assert_eq!(listed[1].privileges, None);
    assert_eq!(dir.unscoped_in(cg.id), ["run 42: no Landlock"]);
    assert!(dir.placements_in(cg.id + 1).is_empty());
    // Exit: the pid may be reused, it is no longer a `run` that may report.
    dir.on_exit(42, 5);
    assert!(dir.placement(42).is_none());
    assert!(dir.unscoped_in(cg.id).is_empty());
    // The task lasts while a process is in its cgroup.
    assert!(dir.take_empty_tasks().is_empty());
    std::fs::write(cg.path.join("cgroup.procs"), "").unwrap();
    std::fs::remove_file(cg.path.join("cgroup.procs")).unwrap();
    let ended = dir.take_empty_tasks();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, cg.id);
    assert_eq!(dir.task_count(), 0);
    assert!(!cg.path.exists());
}

#[test]
fn a_full_identity_map_refuses_the_placement() {
    let (_root, mut dir) = directory();
    let mut kernel = FakeKernel {
        full: true,
        ..Default::default()
    };
    let s = slot("coder", 4, common::SOURCE_RUN);
    let e = dir
        .enter_task_cgroup(&mut kernel, "coder", "t1", s, 42)
        .unwrap_err();
    assert!(format!("{e:#}").contains("full"), "{e:#}");
    assert_eq!(dir.task_count(), 0);
    let procs = dir.cgroups().base().join("coder/t1/cgroup.procs");
    assert!(!procs.exists(), "the process never entered the cgroup");
}

#[test]
fn bindings_are_adopted_carried_and_outranked_across_reloads() {
    let (root, mut dir) = directory();
    let mut registry = Tasks::default();
    let mut kernel = FakeKernel::default();
    // A previous daemon left a binding for coder and one for an agent without a policy now.
    kernel
        .uids
        .insert(3003, slot("coder", 77, common::SOURCE_UID));
    kernel
        .uids
        .insert(4004, slot("gone", 78, common::SOURCE_UID));
    let v1 = policies(&[CODER_UID, OTHER]);
    dir.replace_selectors(&mut kernel, &v1, &mut registry);
    let (_report, config) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    config.unwrap();
    dir.remove_stale_selectors(&mut kernel).unwrap();
    let default = registry.find("coder", "default").unwrap();
    // Adopted, renumbered for this daemon; the other agent's entry is not a binding.
    assert_eq!(
        kernel.uids.get(&3003),
        Some(&slot("coder", default, common::SOURCE_UID))
    );
    assert!(!kernel.uids.contains_key(&4004));
    assert!(kernel.uids.contains_key(&1001));
    // `run --user` binds another uid to coder; a uid is one agent.
    assert_eq!(dir.may_bind("coder", 2002), Ok(true));
    dir.bind_uid(&mut kernel, &v1, &mut registry, "coder", 2002, 900)
        .unwrap();
    assert!(kernel.config.unwrap().selectors & common::SELECT_UIDS != 0);
    assert_eq!(dir.may_bind("coder", 2002), Ok(false));
    assert!(matches!(
        dir.may_bind("other", 2002),
        Err(crate::identity::uid_binding::BindRefused::Bound { .. })
    ));
    // Reload: other's new `uids` selector takes 2002; coder's selector of 1001 is gone.
    let v2 = policies(&[
        "agent = \"coder\"\n",
        "agent = \"other\"\n[identity]\nuids = [2002]\n",
    ]);
    dir.replace_selectors(&mut kernel, &v2, &mut registry);
    let (_report, config) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    config.unwrap();
    dir.remove_stale_selectors(&mut kernel).unwrap();
    let other_default = registry.find("other", "default").unwrap();
    assert_eq!(
        kernel.uids.get(&2002),
        Some(&slot("other", other_default, common::SOURCE_UID))
    );
    assert!(!kernel.uids.contains_key(&1001), "stale selector removed");
    assert!(kernel.uids.contains_key(&3003), "binding carried");
    assert_eq!(
        dir.selected.bound.keys().copied().collect::<Vec<_>>(),
        [3003]
    );
    // Reload without coder: its binding ends.
    let v3 = policies(&[OTHER]);
    dir.replace_selectors(&mut kernel, &v3, &mut registry);
    let _ = arm(&mut dir, &mut kernel, &mut registry, root.path());
    dir.remove_stale_selectors(&mut kernel).unwrap();
    assert!(dir.selected.bound.is_empty());
    assert!(kernel.uids.is_empty(), "{:?}", kernel.uids);
}

#[test]
fn selector_cgroups_go_when_unselected_but_run_tasks_stay() {
    let (root, mut dir) = directory();
    std::fs::create_dir_all(root.path().join("agents/coder")).unwrap();
    let mut registry = Tasks::default();
    let mut kernel = FakeKernel::default();
    dir.replace_selectors(&mut kernel, &policies(&[CODER_UID]), &mut registry);
    let _ = arm(&mut dir, &mut kernel, &mut registry, root.path());
    let selected_id = *kernel.cgroups.keys().next().expect("cgroup selector armed");
    let s = slot("coder", 4, common::SOURCE_RUN);
    let run = dir
        .enter_task_cgroup(&mut kernel, "coder", "t1", s, 42)
        .unwrap();
    dir.replace_selectors(&mut kernel, &policies(&[OTHER]), &mut registry);
    let _ = arm(&mut dir, &mut kernel, &mut registry, root.path());
    dir.remove_stale_selectors(&mut kernel).unwrap();
    assert!(!kernel.cgroups.contains_key(&selected_id));
    assert!(kernel.cgroups.contains_key(&run.id));
}

fn proc_(pid: u32, ppid: u32, exe: Option<ExecFileKey>) -> HostProcess {
    HostProcess {
        pid,
        ppid,
        cgroup: Some("/user.slice".into()),
        uid: Some(1000),
        exe,
    }
}

#[test]
fn running_processes_of_a_selected_file_and_their_descendants_are_tagged() {
    let (_root, dir) = directory();
    let set = policies(&[OTHER]);
    let registry = Tasks::default();
    let key = ExecFileKey {
        agent: 0,
        dev: 8,
        ino: 1234,
    };
    let mut kernel = FakeKernel::default();
    let selected = slot("other", 5, common::SOURCE_RUN);
    kernel.files.insert(key, selected);
    // Already an agent by a tag (a task switch): keeps it.
    let kept = slot("other", 9, common::SOURCE_TASK_SWITCH);
    kernel.tags.insert(30, kept);
    let mut inside_run = proc_(21, 10, None);
    inside_run.cgroup = Some("/agent-monitor/other/t1".into());
    let host_procs = vec![
        proc_(1, 0, None),
        proc_(10, 1, Some(key)),
        proc_(11, 10, None),
        proc_(12, 11, None),
        inside_run,
        proc_(22, 21, None),
        proc_(30, 1, Some(key)),
        proc_(40, 1, None),
    ];
    let mut host = FakeHost::default();
    host.procs.insert(10, (None, None, vec![10, 15]));
    for pid in [11, 12, 22, 30] {
        host.procs.insert(pid, (None, None, vec![pid]));
    }
    let mut passes = 0;
    let n = dir
        .tag_running_selected(&mut kernel, &host, &set, &registry, || {
            passes += 1;
            host_procs.clone()
        })
        .unwrap();
    let exec = AgentSlot {
        source: common::SOURCE_EXECUTABLE,
        ..selected
    };
    assert_eq!(n, 3);
    for tid in [10, 15, 11, 12] {
        assert_eq!(kernel.tags.get(&tid), Some(&exec), "thread {tid}");
    }
    assert_eq!(kernel.tags.get(&30), Some(&kept));
    for pid in [1, 21, 22, 40] {
        assert!(!kernel.tags.contains_key(&pid), "pid {pid} tagged");
    }
    // The second pass found nothing new and ended the walk.
    assert_eq!(passes, 2);
}

#[test]
fn no_executable_selector_means_no_walk() {
    let (_root, dir) = directory();
    let mut kernel = FakeKernel::default();
    let n = dir
        .tag_running_selected(
            &mut kernel,
            &FakeHost::default(),
            &policies(&[OTHER]),
            &Tasks::default(),
            || panic!("walked /proc for nothing"),
        )
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn a_selector_probe_is_applied_as_taken_and_dropped_after_a_reload() {
    let (root, mut dir) = directory();
    let mut registry = Tasks::default();
    let mut kernel = FakeKernel::default();
    dir.replace_selectors(&mut kernel, &policies(&[CODER_UID]), &mut registry);
    // The probe runs before the cgroup exists; arming by its answer does not look again.
    let before = dir.arm_plan(root.path()).run();
    std::fs::create_dir_all(root.path().join("agents/coder")).unwrap();
    let (report, _) = dir
        .arm_selectors(&mut kernel, &mut registry, &before)
        .expect("current");
    assert!(kernel.cgroups.is_empty(), "armed by what the probe saw");
    assert_eq!(report.waiting.len(), 1, "{report:?}");
    // The next probe sees it.
    let (report, _) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    assert_eq!(kernel.cgroups.len(), 1, "{report:?}");
    // A probe taken before a reload answers for selectors that are gone: not applied.
    let stale = dir.arm_plan(root.path()).run();
    dir.replace_selectors(&mut kernel, &policies(&[OTHER]), &mut registry);
    dir.remove_stale_selectors(&mut kernel).unwrap();
    let config_before = kernel.config;
    assert!(
        dir.arm_selectors(&mut kernel, &mut registry, &stale)
            .is_none()
    );
    assert!(
        kernel.cgroups.is_empty(),
        "no selector re-armed from the old set"
    );
    assert_eq!(kernel.config, config_before);
}

#[test]
fn a_changed_executable_is_read_by_the_probe_and_judged_on_the_loop() {
    let (root, mut dir) = directory();
    let bin = root.path().join("bot");
    std::fs::write(&bin, b"abc").unwrap();
    // sha256("abc")
    let set = policies(&[&format!(
        "agent = \"coder\"\n[identity]\nexecutables = [{{ path = \"{}\", sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\" }}]\n",
        bin.display()
    )]);
    let mut registry = Tasks::default();
    let mut kernel = FakeKernel::default();
    dir.replace_selectors(&mut kernel, &set, &mut registry);
    let (report, _) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    assert!(report.mismatches.is_empty(), "{report:?}");
    assert_eq!(kernel.files.len(), 1);
    // Unchanged: the probe reads nothing, arming reports nothing.
    let (report, _) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    assert!(
        report.armed.is_empty() && report.mismatches.is_empty(),
        "{report:?}"
    );
    // Replaced by other content: the probe reads it, the mismatch is reported, the new file is
    // keyed for task `unverified`.
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(&bin, b"abd").unwrap();
    let (report, _) = arm(&mut dir, &mut kernel, &mut registry, root.path());
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    let unverified = registry.find("coder", UNVERIFIED_TASK).unwrap();
    assert_eq!(kernel.files.len(), 1, "the old file's key went");
    assert!(kernel.files.values().all(|s| s.task == unverified));
}
