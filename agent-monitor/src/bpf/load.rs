//! Loading the kernel programs, or adopting what a previous daemon pinned: the same build's
//! programs are taken over as they are; another build's are replaced by this build's, attached
//! before the old ones detach (`retire_previous_build`), with identities, tags and task grants
//! carried over into the new maps.

use std::collections::BTreeMap;
use std::path::Path;

use agent_monitor_common::{
    self as common, AgentSlot, ExecKey, Expiry, KernelOffsets, NetGrant, NetKey,
};
use anyhow::Context as _;
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        Lsm,
        links::{FdLink, PinnedLink},
    },
};

use super::Kernel;
use super::hooks::{self, HOOKS, HookCgroups, HookPlacement, When};
use super::pin::{self, PinDir, PinLock};
use super::socket_watch::{self, SOCKET_WATCH, SocketWatch};
use super::tables::{
    Opener, Tables, counters_from, hash_entries, tag_capacity, trie_entries, unix_ns,
};
use super::unix_hooks::UnixHooks;
use crate::host::TracepointLayout;
use crate::identity::grant_state::KernelGrants;

/// The compiled kernel programs, embedded at build time (see build.rs).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-monitor"));

/// What is enforcing, as reported at start-up and by `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Mechanisms {
    /// How a denied exec is stopped.
    pub exec_enforcement: String,
    /// How a denied connect is stopped.
    pub connect_enforcement: String,
    /// Programs attached, as "program → hook".
    pub attached: Vec<String>,
    /// What the kernel refused, with its reason.
    pub refused: Vec<String>,
    /// The bpffs directory holding the pinned maps and links.
    pub pin_dir: String,
    /// One pinned link per attached program, with the kernel's ids.
    pub links: Vec<LinkState>,
    /// Whether `sys_enter_socket` is watched, and why (`status` shows its text).
    #[serde(serialize_with = "as_text")]
    pub socket_syscall_watch: SocketWatch,
    /// Whether the unix-socket hooks are attached, where, and why (`status` shows its text).
    #[serde(serialize_with = "as_text")]
    pub unix_socket_hooks: UnixHooks,
}

fn as_text<S: serde::Serializer, T: std::fmt::Display>(state: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(state)
}

/// A program attached through a pinned bpf_link.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinkState {
    pub program: String,
    pub link_id: u32,
    pub program_id: u32,
}

/// How this daemon came by its kernel state.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// Nothing was pinned: the programs were loaded and attached now.
    Installed,
    /// A previous daemon's pinned programs and maps were taken over; they kept enforcing meanwhile.
    Adopted {
        /// Seconds since the previous daemon's last heartbeat (None if it left none).
        away_seconds: Option<f64>,
        /// Kernel records lost (ring buffer full) since that heartbeat.
        lost_while_away: u64,
        /// The pinned programs came from another build: they were replaced by this build's,
        /// attached before the old ones were detached (no gap).
        replaced_build: bool,
    },
}

/// What ties this daemon to its pin directory.
pub(super) struct Tenure {
    /// Links of a previous build, kept attached until this build's programs enforce the same state.
    retiring: Vec<FdLink>,
    /// A fresh install until `keep_pins`: its pins go if the start fails. Before `_lock`, so
    /// they are removed while the directory is still locked.
    fresh: Option<pin::FreshInstall>,
    _lock: PinLock,
}

/// Removes the pinned programs and maps of `pin_dir`: enforcement stops. Refuses while a daemon
/// holds the directory.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let pins = PinDir::new(pin_dir);
    if !pin_dir.exists() {
        return Ok(Vec::new());
    }
    let _lock = pins
        .create_and_lock()
        .context("refusing to uninstall while a daemon runs on it; stop it first")?;
    pins.remove_all()
}

/// What one load of the object produced.
struct Installed {
    tables: Tables,
    mechanisms: Mechanisms,
}

/// What a previous daemon left in its maps, read before deciding to adopt or replace them.
struct Predecessor {
    maps: Opener,
}

impl Predecessor {
    fn state(&self, slot: u32) -> u64 {
        self.maps
            .view::<Array<&MapData, u64>>("DAEMON_STATE")
            .ok()
            .and_then(|a| a.get(&slot, 0).ok())
            .unwrap_or(0)
    }

    fn records_lost(&self) -> u64 {
        self.maps
            .view::<PerCpuArray<&MapData, u64>>("COUNTERS_MAP")
            .map_or(0, |c| {
                counters_from(&c)[common::COUNTER_RECORDS_LOST as usize]
            })
    }

    fn agent_cgroups(&self) -> Vec<(u64, AgentSlot)> {
        self.maps
            .view::<HashMap<&MapData, u64, AgentSlot>>("AGENT_CGROUPS")
            .map(|h| hash_entries(&h))
            .unwrap_or_default()
    }

    /// Per-thread tags (issue 4) an upgrade carries into the new build's maps before the old
    /// programs go, or tagged processes would fall out of their agent.
    fn tags(&self) -> Vec<(u32, AgentSlot)> {
        self.maps
            .view::<HashMap<&MapData, u32, AgentSlot>>("PROCESS_AGENTS")
            .map(|h| hash_entries(&h))
            .unwrap_or_default()
    }

    /// Task grants: the restarted daemon takes over those its state file still describes.
    fn task_grants(&self) -> KernelGrants {
        let net = self
            .maps
            .view::<LpmTrie<&MapData, NetKey, NetGrant>>("TASK_NET_GRANTS");
        let exec = self
            .maps
            .view::<LpmTrie<&MapData, ExecKey, Expiry>>("TASK_EXEC_GRANTS");
        match (net, exec) {
            (Ok(net), Ok(exec)) => KernelGrants {
                net: trie_entries(&net),
                exec: trie_entries(&exec),
            },
            _ => KernelGrants::default(),
        }
    }
}

impl Kernel {
    /// Adopts what a previous daemon pinned in `pin_dir`, or loads and pins everything. The address
    /// hooks attach at the root of the cgroup v2 tree so every socket on the host passes through
    /// them (non-agents leave after one lookup); the agent-socket hooks below `cgroups.agents`
    /// until `set_identity_config` turns selectors on. The unix-socket hooks are loaded and
    /// pinned, attached by `set_unix_hooks` when a policy needs them.
    pub fn open(
        pin_dir: &Path,
        cgroups: &HookCgroups,
        layout: &TracepointLayout,
        offsets: &KernelOffsets,
    ) -> anyhow::Result<Self> {
        let pins = PinDir::new(pin_dir);
        let created_root = !pin_dir.exists();
        let lock = pins.create_and_lock()?;
        let hash = pin::object_hash(PROGRAMS, &load_time_values(layout, offsets));
        let placement = |agent_hooks_host_wide| HookPlacement {
            pin_root: pin_dir.to_path_buf(),
            cgroups: cgroups.clone(),
            agent_hooks_host_wide,
        };
        if !pins.has_state() {
            // Links without maps are the remains of an interrupted install: nothing to adopt.
            pins.remove_pins()?;
            // Armed first: an install that fails half-way takes its pins with it.
            let fresh = pin::FreshInstall::new(&pins, created_root);
            let installed = install(&pins, cgroups, layout, offsets, hash)?;
            return Ok(Kernel::assemble(
                installed,
                Origin::Installed,
                placement(false),
                Tenure {
                    retiring: Vec::new(),
                    fresh: Some(fresh),
                    _lock: lock,
                },
            ));
        }

        let previous = Predecessor {
            maps: Opener::new(open_pinned_maps(&pins)?),
        };
        let heartbeat = previous.state(common::STATE_HEARTBEAT_UNIX_NS);
        let away_seconds = (heartbeat > 0).then(|| {
            let now = unix_ns();
            now.saturating_sub(heartbeat) as f64 / 1e9
        });
        let lost_while_away = previous
            .records_lost()
            .saturating_sub(previous.state(common::STATE_LOST_AT_HEARTBEAT));
        let required_linked = HOOKS
            .iter()
            .filter(|h| h.required)
            .all(|h| pins.link(h.program).exists());

        if previous.state(common::STATE_OBJECT_HASH) == hash && required_linked {
            let agent_hooks_host_wide = previous.state(common::STATE_AGENT_HOOKS_HOST_WIDE) != 0;
            let adopted = adopt(&pins, cgroups, agent_hooks_host_wide, previous)?;
            return Ok(Kernel::assemble(
                adopted,
                Origin::Adopted {
                    away_seconds,
                    lost_while_away,
                    replaced_build: false,
                },
                placement(agent_hooks_host_wide),
                Tenure {
                    retiring: Vec::new(),
                    fresh: None,
                    _lock: lock,
                },
            ));
        }

        // Another build's programs (or an incomplete set): attach ours, carry the identity map
        // over, and only then let the old links go, so that every moment some program enforces.
        let mut retiring = Vec::new();
        for name in pin::names(&pins.links()).unwrap_or_default() {
            match PinnedLink::from_pin(pins.link(&name)) {
                Ok(l) => retiring.push(FdLink::from(l)),
                Err(e) => tracing::warn!("old pinned link {name}: {e}"),
            }
        }
        let identities = previous.agent_cgroups();
        let tags = previous.tags();
        let grants = previous.task_grants();
        drop(previous);
        pins.remove_pins()?;
        let installed = install(&pins, cgroups, layout, offsets, hash)?;
        let mut kernel = Kernel::assemble(
            installed,
            Origin::Adopted {
                away_seconds,
                lost_while_away,
                replaced_build: true,
            },
            placement(false),
            Tenure {
                retiring,
                fresh: None,
                _lock: lock,
            },
        );
        for (id, slot) in identities {
            kernel.add_agent_cgroup(id, slot)?;
        }
        for (tid, slot) in tags {
            kernel.tag_thread(tid, slot)?;
        }
        kernel.tables.grants.copy_in(&grants)?;
        Ok(kernel)
    }

    fn assemble(parts: Installed, origin: Origin, hooks: HookPlacement, tenure: Tenure) -> Kernel {
        Kernel {
            tables: parts.tables,
            mechanisms: parts.mechanisms,
            origin,
            hooks,
            tenure,
        }
    }

    /// The start succeeded: what a fresh install pinned stays when this daemon exits (enforcement
    /// outlives the daemon). Until then a failed start removes it (see `pin::FreshInstall`).
    pub fn keep_pins(&mut self) {
        if let Some(fresh) = &mut self.tenure.fresh {
            fresh.keep();
        }
    }

    /// Detaches the previous build's programs (see [`Kernel::open`]); call once this build's
    /// allowlists and identities are in place.
    pub fn retire_previous_build(&mut self) -> usize {
        let n = self.tenure.retiring.len();
        self.tenure.retiring.clear();
        n
    }
}

/// Takes over the same build's pinned programs and maps as they are.
fn adopt(
    pins: &PinDir,
    cgroups: &HookCgroups,
    agent_hooks_host_wide: bool,
    previous: Predecessor,
) -> anyhow::Result<Installed> {
    let mut mechanisms = base_mechanisms(pins);
    for hook in HOOKS {
        if hook.when != When::Always && !pins.link(hook.program).exists() {
            // Detached while nothing needs it; without its program the kernel refused it.
            if !pins.program(hook.program).exists() {
                mechanisms.refused.push(format!(
                    "{}: not loaded (the kernel refused it when the programs were installed; \
                     that daemon's log says why)",
                    hook.program
                ));
            }
            continue;
        }
        match hooks::adopt_link(pins, hook.program) {
            Ok(l) => mechanisms.links.push(l),
            Err(e) => mechanisms.refused.push(format!("{}: {e:#}", hook.program)),
        }
    }
    mechanisms.unix_socket_hooks = UnixHooks::adopted(pins);
    // The probe loads a throw-away copy of the object (maps only) and one LSM program that
    // it unloads at once; nothing is attached.
    let mut probe = EbpfLoader::new()
        .load(PROGRAMS)
        .context("loading the eBPF object to probe BPF LSM")?;
    set_exec_mechanism(&mut probe, &mut mechanisms);
    mechanisms.attached = HOOKS
        .iter()
        .filter(|h| pins.link(h.program).exists())
        .map(|h| {
            let at = cgroups.scope_of(h.scope, agent_hooks_host_wide);
            format!("{} → {} (adopted)", h.program, h.kind.at(at))
        })
        .collect();
    let socket_watch = SocketWatch::adopted(
        pins.program(SOCKET_WATCH).exists(),
        pins.link(SOCKET_WATCH).exists(),
    );
    if socket_watch.is_on() {
        mechanisms.attached.push(socket_watch::attached_entry());
    }
    mechanisms.socket_syscall_watch = socket_watch;
    Ok(Installed {
        tables: Tables::open(previous.maps)?,
        mechanisms,
    })
}

/// Loads the object, attaches every hook through a pinned link and pins every map by its name.
fn install(
    pins: &PinDir,
    cgroups: &HookCgroups,
    layout: &TracepointLayout,
    offsets: &KernelOffsets,
    hash: u64,
) -> anyhow::Result<Installed> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("PROCESS_AGENTS", tag_capacity(crate::host::pid_max()))
        .override_global("FORK_CHILD_PID_OFFSET", &layout.fork_child_pid, true)
        .override_global("KERNEL_OFFSETS", offsets, true)
        .load(PROGRAMS)
        .context("loading the agent-monitor eBPF object")?;
    // Maps first: a crash before the links are pinned leaves maps without links, which the next
    // start recognises as an incomplete install.
    let mut maps = BTreeMap::new();
    let names: Vec<String> = ebpf.maps().map(|(n, _)| n.to_string()).collect();
    for name in names {
        // .rodata/.bss/.data hold the programs' globals; nothing outside them reads those.
        if name.starts_with('.') {
            continue;
        }
        let Some(map) = ebpf.take_map(&name) else {
            continue;
        };
        map.pin(pins.map(&name))
            .with_context(|| format!("pinning map {name} at {}", pins.map(&name).display()))?;
        maps.insert(name, map);
    }
    let mut tables = Tables::open(Opener::new(maps))?;
    let mut mechanisms = base_mechanisms(pins);
    let mut unix_refused = None;
    for hook in HOOKS {
        let at = cgroups.scope_of(hook.scope, false);
        if hook.when != When::Always {
            if let Err(e) = hooks::load_unattached(&mut ebpf, hook, pins) {
                tracing::warn!(program = hook.program, "kernel refused program: {e:#}");
                mechanisms.refused.push(format!("{}: {e:#}", hook.program));
                unix_refused.get_or_insert(format!("{}: {e:#}", hook.program));
            }
            continue;
        }
        match hooks::attach(&mut ebpf, hook, at, pins) {
            Ok(l) => {
                mechanisms
                    .attached
                    .push(format!("{} → {}", hook.program, hook.kind.at(at)));
                mechanisms.links.push(l);
            }
            Err(e) if hook.required => {
                return Err(e.context(format!("attaching required program {}", hook.program)));
            }
            Err(e) => {
                tracing::warn!(program = hook.program, "kernel refused program: {e:#}");
                mechanisms.refused.push(format!("{}: {e:#}", hook.program));
            }
        }
    }
    // Loaded (and pinned, so a later daemon can attach it to these maps) now so a refusal shows
    // at start; attached only while needed (it costs every syscall on the host, see
    // `Kernel::watch_socket_syscalls`).
    let socket_watch = match socket_watch::load(&mut ebpf, pins) {
        Ok(()) => SocketWatch::Off { was_on: false },
        Err(e) => {
            tracing::warn!(program = SOCKET_WATCH, "kernel refused program: {e:#}");
            mechanisms.refused.push(format!("{SOCKET_WATCH}: {e:#}"));
            SocketWatch::Unavailable(format!("{e:#}"))
        }
    };
    mechanisms.socket_syscall_watch = socket_watch;
    // One refused (the other loaded) still leaves a hook to attach: `refused` lists the other.
    let any_loaded = HOOKS.iter().any(|h| {
        h.when != When::Always
            && matches!(h.kind, hooks::HookKind::CgroupSockAddr(..))
            && pins.program(h.program).exists()
    });
    mechanisms.unix_socket_hooks = UnixHooks::installed(unix_refused.filter(|_| !any_loaded));
    set_exec_mechanism(&mut ebpf, &mut mechanisms);
    tables
        .state
        .set(common::STATE_OBJECT_HASH, hash)
        .context("writing the object hash")?;
    tables
        .state
        .set(common::STATE_AGENT_HOOKS_HOST_WIDE, 0)
        .context("writing where the agent-socket hooks are")?;
    Ok(Installed { tables, mechanisms })
}

fn set_exec_mechanism(ebpf: &mut Ebpf, mechanisms: &mut Mechanisms) {
    mechanisms.exec_enforcement = match probe_lsm(ebpf) {
        // This build judges exec at sched_process_exec only; an LSM path would give callers a
        // clean EPERM instead of a killed process.
        Ok(()) => "SIGKILL at sched_process_exec (BPF LSM is available on this host but this \
                   build does not use it yet)"
            .into(),
        Err(why) => {
            mechanisms.refused.push(format!(
                "BPF LSM bprm_check_security: {why} ({})",
                crate::host::lsm_context()
            ));
            "SIGKILL at sched_process_exec (BPF LSM unavailable)".into()
        }
    };
}

/// Every map pinned in `pins`, by name.
fn open_pinned_maps(pins: &PinDir) -> anyhow::Result<BTreeMap<String, Map>> {
    let mut maps = BTreeMap::new();
    for name in pin::names(&pins.maps()).context("listing pinned maps")? {
        let path = pins.map(&name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)
            .with_context(|| format!("pinned map {} has an unsupported type", path.display()))?;
        maps.insert(name, map);
    }
    Ok(maps)
}

/// Loads (and unloads) a do-nothing BPF LSM program: the kernel's own answer to "is BPF LSM
/// available", rather than a guess from /sys/kernel/security.
fn probe_lsm(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
    let prog: &mut Lsm = ebpf
        .program_mut("agent_lsm_probe")
        .ok_or("probe program missing from the eBPF object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load("bprm_check_security", &btf)
        .map_err(|e| format!("the kernel refused it: {e}"))?;
    prog.unload()
        .map_err(|e| format!("unloading the probe: {e}"))
}

/// Every value patched into the object at load, and the hook table's placement of each program:
/// part of what makes pinned programs "ours".
fn load_time_values(layout: &TracepointLayout, o: &KernelOffsets) -> Vec<u64> {
    [
        layout.fork_child_pid,
        o.bprm_file,
        o.bprm_filename,
        o.bprm_interp,
        o.file_inode,
        o.inode_ino,
        o.inode_sb,
        o.sb_dev,
        o.task_cred,
        o.cred_user_ns,
        o.user_ns_inum,
        o.init_user_ns,
        o.valid,
    ]
    .into_iter()
    .map(u64::from)
    .chain(hooks::table_fingerprint())
    .collect()
}

fn base_mechanisms(pins: &PinDir) -> Mechanisms {
    Mechanisms {
        connect_enforcement: "cgroup/connect4+connect6, sendmsg4+sendmsg6 and sock_create \
                              return EPERM"
            .into(),
        pin_dir: pins.root().display().to_string(),
        ..Default::default()
    }
}
