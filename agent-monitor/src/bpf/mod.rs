//! The only module that talks to aya: loads and attaches the kernel programs (or adopts the ones a
//! previous daemon pinned), writes the identity and allowlist maps, reads the action ring buffer
//! and the loss counters.

mod pin;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use agent_monitor_common::{
    self as common, AgentSlot, COUNTERS, DAEMON_STATE_LEN, DnsProxy, ExecFileKey, ExecKey, Expiry,
    IdentityConfig, KernelOffsets, Learned, NetAllow, NetGrant, NetKey,
};
use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockAddrAttachType, CgroupSockAttachType, Lsm, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use tokio::io::unix::AsyncFd;

use crate::host::TracepointLayout;
use crate::identity::grant_state::KernelGrants;
use crate::policy::KernelTables;

pub use pin::DEFAULT_PIN_DIR;
use pin::{PinDir, PinLock};

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
    /// Whether `sys_enter_socket` is watched, and why (see `Kernel::watch_socket_syscalls`).
    pub socket_syscall_watch: String,
}

/// The program that reports socket families only `run`'s seccomp filter refuses, and its hook.
/// Not in `HOOKS`: it is loaded and pinned as a program at install, attached only while needed.
const SOCKET_WATCH: &str = "agent_socket_syscall";
const SOCKET_WATCH_HOOK: (&str, &str) = ("syscalls", "sys_enter_socket");

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

/// Entries in use of one kernel map, against its capacity.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Occupancy {
    pub map: String,
    pub used: u64,
    pub capacity: u64,
}

/// The kernel state: every map of the object by name (all pinned), the pinned links, and the
/// lock on the pin directory. One owner (the monitor task) holds it.
pub struct Kernel {
    maps: BTreeMap<String, Map>,
    pub mechanisms: Mechanisms,
    pub origin: Origin,
    /// Links of a previous build, kept attached until this build's programs enforce the same state.
    retiring: Vec<FdLink>,
    /// A fresh install until `keep_pins`: its pins go if the start fails. Before `_lock`, so
    /// they are removed while the directory is still locked.
    fresh: Option<pin::FreshInstall>,
    _lock: PinLock,
    /// The pin directory (the socket watch's program and link are pinned there on demand).
    pin_root: PathBuf,
    /// Where the cgroup hooks attach: the host's root, and the cgroup every `run` agent lives below.
    cgroups: HookCgroups,
    /// The agent-socket hooks (`Scope::Agents`) sit at the root now (see `scope_agent_hooks`).
    agent_hooks_host_wide: bool,
    /// The cgroup ids in `AGENT_CGROUPS` (this daemon is its only writer), so that removing one
    /// can tell whether its pre-filter bit is shared without walking the map key by key.
    agent_cgroup_ids: std::collections::HashSet<u64>,
}

/// The two cgroups a hook can be attached to.
#[derive(Clone)]
pub struct HookCgroups {
    /// The cgroup v2 root: every process on the host.
    pub root: PathBuf,
    /// `<root>/agent-monitor`: every process `run` places (an agent) and nothing else.
    pub agents: PathBuf,
}

struct Hook {
    program: &'static str,
    kind: HookKind,
    /// The daemon cannot do its job without it.
    required: bool,
    scope: Scope,
}

/// Which processes a hook must see.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Every process or socket on the host. The address hooks judge a socket by the cgroup of
    /// its creator, so an agent handed a socket made outside is still judged only from the root.
    Host,
    /// Only agents' own sockets: `sock_create` judges the creating task, and the DNS
    /// address-restoring hooks matter only on sockets whose sends were redirected. They sit below
    /// the agents' cgroup while every agent lives there, sparing every other `socket()` (and
    /// every `accept()` that asks for the peer) on the host a program run; at the root while
    /// selectors can make any process an agent.
    Agents,
}

/// How a program attaches. Every kind must end in a bpf_link (`FdLink`): that is what gets pinned
/// so the program stays attached when the daemon exits.
enum HookKind {
    Tracepoint(&'static str, &'static str),
    RawTracepoint(&'static str),
    CgroupSockAddr(&'static str, CgroupSockAddrAttachType),
    CgroupSock(&'static str, CgroupSockAttachType),
    CgroupSkb(&'static str, CgroupSkbAttachType),
}

const HOOKS: &[Hook] = &[
    Hook {
        program: "agent_exec",
        kind: HookKind::RawTracepoint("sched_process_exec"),
        required: true,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_connect4",
        kind: HookKind::CgroupSockAddr("connect4", CgroupSockAddrAttachType::Connect4),
        required: true,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_connect6",
        kind: HookKind::CgroupSockAddr("connect6", CgroupSockAddrAttachType::Connect6),
        required: true,
        scope: Scope::Host,
    },
    // DNS redirection: sendmsg (below) rewrites an agent's datagrams to port 53; without recvmsg
    // its resolver would reject replies from the proxy's address.
    Hook {
        program: "agent_recvmsg4",
        kind: HookKind::CgroupSockAddr("recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4),
        required: true,
        scope: Scope::Agents,
    },
    Hook {
        program: "agent_recvmsg6",
        kind: HookKind::CgroupSockAddr("recvmsg6", CgroupSockAddrAttachType::UDPRecvMsg6),
        required: true,
        scope: Scope::Agents,
    },
    // Only getpeername() on a redirected connected socket would show the proxy without these.
    Hook {
        program: "agent_getpeername4",
        kind: HookKind::CgroupSockAddr("getpeername4", CgroupSockAddrAttachType::GetPeerName4),
        required: false,
        scope: Scope::Agents,
    },
    Hook {
        program: "agent_getpeername6",
        kind: HookKind::CgroupSockAddr("getpeername6", CgroupSockAddrAttachType::GetPeerName6),
        required: false,
        scope: Scope::Agents,
    },
    Hook {
        program: "agent_sendmsg4",
        kind: HookKind::CgroupSockAddr("sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4),
        required: true,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_sendmsg6",
        kind: HookKind::CgroupSockAddr("sendmsg6", CgroupSockAddrAttachType::UDPSendMsg6),
        required: true,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_sock_create",
        kind: HookKind::CgroupSock("sock_create", CgroupSockAttachType::SockCreate),
        required: true,
        scope: Scope::Agents,
    },
    // Source routes (IPv4 options, IPv6 routing headers) send a packet to its first hop rather
    // than the address the hooks above judged: dropped for agents' sockets.
    Hook {
        program: "agent_egress",
        kind: HookKind::CgroupSkb("egress", CgroupSkbAttachType::Egress),
        required: true,
        scope: Scope::Agents,
    },
    Hook {
        program: "agent_fork",
        kind: HookKind::Tracepoint("sched", "sched_process_fork"),
        required: false,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_exit",
        kind: HookKind::Tracepoint("sched", "sched_process_exit"),
        required: false,
        scope: Scope::Host,
    },
];

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

impl Kernel {
    /// Adopts what a previous daemon pinned in `pin_dir`, or loads and pins everything. The address
    /// hooks attach at the root of the cgroup v2 tree so every socket on the host passes through
    /// them (non-agents leave after one lookup); the agent-socket hooks below `cgroups.agents`
    /// until `set_identity_config` turns selectors on.
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
        if !pins.has_state() {
            // Links without maps are the remains of an interrupted install: nothing to adopt.
            pins.remove_pins()?;
            // Armed first: an install that fails half-way takes its pins with it.
            let fresh = pin::FreshInstall::new(&pins, created_root);
            let (maps, mechanisms) = install(&pins, cgroups, layout, offsets, hash)?;
            return Ok(Kernel {
                maps,
                mechanisms,
                origin: Origin::Installed,
                retiring: Vec::new(),
                fresh: Some(fresh),
                _lock: lock,
                pin_root: pin_dir.to_path_buf(),
                cgroups: cgroups.clone(),
                agent_hooks_host_wide: false,
                agent_cgroup_ids: Default::default(),
            });
        }

        let old_maps = open_pinned_maps(&pins)?;
        let state = |i: u32| read_state(&old_maps, i).unwrap_or(0);
        let heartbeat = state(common::STATE_HEARTBEAT_UNIX_NS);
        let lost_now = counters_of(&old_maps)
            .map(|c| c[common::COUNTER_RECORDS_LOST as usize])
            .unwrap_or(0);
        let away_seconds = (heartbeat > 0).then(|| {
            let now = unix_ns();
            now.saturating_sub(heartbeat) as f64 / 1e9
        });
        let lost_while_away = lost_now.saturating_sub(state(common::STATE_LOST_AT_HEARTBEAT));
        let required_linked = HOOKS
            .iter()
            .filter(|h| h.required)
            .all(|h| pins.link(h.program).exists());

        if state(common::STATE_OBJECT_HASH) == hash && required_linked {
            let mut mechanisms = base_mechanisms(&pins);
            for hook in HOOKS {
                match adopt_link(&pins, hook.program) {
                    Ok(l) => mechanisms.links.push(l),
                    Err(e) => mechanisms.refused.push(format!("{}: {e:#}", hook.program)),
                }
            }
            // The probe loads a throw-away copy of the object (maps only) and one LSM program that
            // it unloads at once; nothing is attached.
            let mut probe = EbpfLoader::new()
                .load(PROGRAMS)
                .context("loading the eBPF object to probe BPF LSM")?;
            set_exec_mechanism(&mut probe, &mut mechanisms);
            let agent_hooks_host_wide = state(common::STATE_AGENT_HOOKS_HOST_WIDE) != 0;
            mechanisms.attached = HOOKS
                .iter()
                .filter(|h| pins.link(h.program).exists())
                .map(|h| {
                    let at = cgroups.scope_of(h.scope, agent_hooks_host_wide);
                    format!("{} → {} (adopted)", h.program, h.kind.at(at))
                })
                .collect();
            mechanisms.socket_syscall_watch = if !pins.program(SOCKET_WATCH).exists() {
                "unavailable: the previous daemon could not load it".into()
            } else if pins.link(SOCKET_WATCH).exists() {
                let (category, name) = SOCKET_WATCH_HOOK;
                mechanisms
                    .attached
                    .push(format!("{SOCKET_WATCH} → tracepoint {category}/{name}"));
                "on: left attached by the previous daemon".into()
            } else {
                "off: every agent so far runs under `run`'s seccomp filter".into()
            };
            return Ok(Kernel {
                mechanisms,
                origin: Origin::Adopted {
                    away_seconds,
                    lost_while_away,
                    replaced_build: false,
                },
                retiring: Vec::new(),
                fresh: None,
                _lock: lock,
                pin_root: pin_dir.to_path_buf(),
                cgroups: cgroups.clone(),
                agent_hooks_host_wide,
                agent_cgroup_ids: agent_cgroups_of(&old_maps)?
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
                maps: old_maps,
            });
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
        let identities = agent_cgroups_of(&old_maps).unwrap_or_default();
        let tags = tags_of(&old_maps);
        // Task grants too: the restarted daemon takes over those its state file still describes.
        let grants = task_grants_of(&old_maps).unwrap_or_default();
        drop(old_maps);
        pins.remove_pins()?;
        let (maps, mechanisms) = install(&pins, cgroups, layout, offsets, hash)?;
        let mut kernel = Kernel {
            maps,
            mechanisms,
            origin: Origin::Adopted {
                away_seconds,
                lost_while_away,
                replaced_build: true,
            },
            retiring,
            fresh: None,
            _lock: lock,
            pin_root: pin_dir.to_path_buf(),
            cgroups: cgroups.clone(),
            agent_hooks_host_wide: false,
            agent_cgroup_ids: Default::default(),
        };
        for (id, slot) in identities {
            kernel.add_agent_cgroup(id, slot)?;
        }
        for (tid, slot) in tags {
            kernel.tag_thread(tid, slot)?;
        }
        kernel.insert_task_grants(&grants)?;
        Ok(kernel)
    }

    /// Attaches (`Some(why)`) or detaches (`None`) the `sys_enter_socket` tracepoint that reports
    /// socket families the cgroup hooks never see (vsock, packet…) for agents without `run`'s
    /// seccomp filter. Attaching any `syscalls/*` tracepoint sends every syscall of every process
    /// on the host through the kernel's tracing slow path, so it is attached only while such an
    /// agent can exist. With pinning, the program is pinned at install and its link, while
    /// attached, is pinned too, so an adopting daemon finds the watch as it was and can change it.
    /// Idempotent; `why` is reported by `status` and the log.
    pub fn watch_socket_syscalls(&mut self, why: Option<&str>) -> anyhow::Result<()> {
        let (category, name) = SOCKET_WATCH_HOOK;
        let entry = format!("{SOCKET_WATCH} → tracepoint {category}/{name}");
        if self
            .mechanisms
            .socket_syscall_watch
            .starts_with("unavailable")
        {
            if let Some(why) = why {
                tracing::warn!("cannot report other socket families ({why}): program refused");
            }
            return Ok(());
        }
        let pins = PinDir::new(&self.pin_root);
        let link_pin = pins.link(SOCKET_WATCH);
        match (why, link_pin.exists()) {
            (Some(why), false) => {
                let mut tp = TracePoint::from_pin(pins.program(SOCKET_WATCH))
                    .with_context(|| format!("opening the pinned program {SOCKET_WATCH}"))?;
                let id = tp
                    .attach(category, name)
                    .with_context(|| format!("attaching {entry}"))?;
                let link: FdLink = tp.take_link(id)?.try_into().context(
                    "the kernel gave a perf link, not a bpf_link (kernel < 5.15?): it cannot be pinned",
                )?;
                link.pin(&link_pin)
                    .with_context(|| format!("pinning the link of {entry}"))?;
                self.mechanisms.attached.push(entry.clone());
                tracing::info!("attached {entry}: {why}");
                self.mechanisms.socket_syscall_watch = format!("on: {why}");
            }
            (Some(why), true) => {
                if !self.mechanisms.attached.contains(&entry) {
                    self.mechanisms.attached.push(entry.clone());
                }
                self.mechanisms.socket_syscall_watch = format!("on: {why}");
            }
            (None, true) => {
                // The pin is the link's only holder: removing it detaches the program.
                std::fs::remove_file(&link_pin).with_context(|| format!("detaching {entry}"))?;
                self.mechanisms.attached.retain(|a| *a != entry);
                self.mechanisms.socket_syscall_watch =
                    "off: every agent runs under `run`'s seccomp filter".into();
                tracing::info!("detached {entry}: no agent without `run`'s filter");
            }
            (None, false) => {
                self.mechanisms.socket_syscall_watch =
                    "off: every agent so far runs under `run`'s seccomp filter".into();
            }
        }
        Ok(())
    }

    /// The start succeeded: what a fresh install pinned stays when this daemon exits (enforcement
    /// outlives the daemon). Until then a failed start removes it (see `pin::FreshInstall`).
    pub fn keep_pins(&mut self) {
        if let Some(fresh) = &mut self.fresh {
            fresh.keep();
        }
    }

    /// Detaches the previous build's programs (see [`Kernel::open`]); call once this build's
    /// allowlists and identities are in place.
    pub fn retire_previous_build(&mut self) -> usize {
        let n = self.retiring.len();
        self.retiring.clear();
        n
    }

    fn map(&self, name: &str) -> anyhow::Result<&Map> {
        self.maps
            .get(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut Map> {
        self.maps
            .get_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// Adds allowlist entries (those of one bank; see the daemon's reload). Checks capacity
    /// against what is in the maps now, and on failure removes what it added: all or nothing.
    pub fn write_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        let used = self.occupancy()?;
        let used_of = |name: &str| used.iter().find(|o| o.map == name).map_or(0, |o| o.used);
        for (what, name, have, cap) in [
            (
                "network",
                "NET_ALLOW",
                tables.net.len(),
                common::MAX_NET_ENTRIES,
            ),
            (
                "exec",
                "EXEC_ALLOW",
                tables.exec.len(),
                common::MAX_EXEC_ENTRIES,
            ),
        ] {
            let now = used_of(name);
            if now + have as u64 > u64::from(cap) {
                bail!(
                    "the policies compile to {have} {what} allowlist entries; with the {now} in \
                     force the kernel map (capacity {cap}) cannot hold both during the swap"
                );
            }
        }
        let result = self.insert_allowlists(tables);
        if result.is_err() {
            let mut net: LpmTrie<_, NetKey, NetAllow> =
                LpmTrie::try_from(self.map_mut("NET_ALLOW")?)?;
            for (prefix_len, key, _) in &tables.net {
                let _ = net.remove(&Key::new(*prefix_len, *key));
            }
            let mut exec: LpmTrie<_, ExecKey, u32> =
                LpmTrie::try_from(self.map_mut("EXEC_ALLOW")?)?;
            for (prefix_len, key) in &tables.exec {
                let _ = exec.remove(&Key::new(*prefix_len, *key));
            }
        }
        result
    }

    fn insert_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetAllow> = LpmTrie::try_from(self.map_mut("NET_ALLOW")?)?;
        for (prefix_len, key, allow) in &tables.net {
            net.insert(&Key::new(*prefix_len, *key), allow, 0)
                .context("writing the network allowlist map")?;
        }
        let mut exec: LpmTrie<_, ExecKey, u32> = LpmTrie::try_from(self.map_mut("EXEC_ALLOW")?)?;
        for (i, (prefix_len, key)) in tables.exec.iter().enumerate() {
            exec.insert(&Key::new(*prefix_len, *key), i as u32, 0)
                .context("writing the exec allowlist map")?;
        }
        Ok(())
    }

    /// Removes every allowlist entry whose agent index `keep` rejects. Returns how many went.
    pub fn retain_allowlists(&mut self, keep: impl Fn(u32) -> bool) -> anyhow::Result<usize> {
        Ok(remove_trie_entries::<NetKey, NetAllow>(
            self.map_mut("NET_ALLOW")?,
            |k| !keep(k.agent),
            "network allowlist entry",
        )? + remove_trie_entries::<ExecKey, u32>(
            self.map_mut("EXEC_ALLOW")?,
            |k| !keep(k.agent),
            "exec allowlist entry",
        )? + remove_hash_entries::<ExecFileKey, u32>(
            self.map_mut("EXEC_FILES")?,
            |k| !keep(k.agent),
            "exec file-identity entry",
        )? + remove_hash_entries::<u32, DnsProxy>(
            self.map_mut("DNS_PROXY")?,
            |a| !keep(*a),
            "DNS proxy entry",
        )? + remove_hash_entries::<NetKey, Learned>(
            self.map_mut("DNS_LEARNED")?,
            |k| !keep(k.agent),
            "learned address",
        )?)
    }

    /// Adds and removes entries of the file-identity exec allowlist.
    pub fn update_exec_files(
        &mut self,
        add: &[(ExecFileKey, u32)],
        remove: &[ExecFileKey],
    ) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, u32> = HashMap::try_from(self.map_mut("EXEC_FILES")?)?;
        for key in remove {
            m.remove(key)
                .context("removing from the exec file-identity map")?;
        }
        for (key, rule) in add {
            m.insert(*key, *rule, 0)
                .context("writing the exec file-identity map (full?)")?;
        }
        Ok(())
    }

    /// Makes every task in cgroup `cgroup_id` an agent process, from the next syscall on; also
    /// rewrites an existing entry in one atomic update (reload).
    pub fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()> {
        // The pre-filter bit first: an entry whose bit is clear would never be looked up.
        let (word, bit) = common::agent_cgroup_filter_slot(cgroup_id);
        let mut f: Array<_, u64> = Array::try_from(self.map_mut("AGENT_CGROUP_FILTER")?)?;
        let old = f
            .get(&word, 0)
            .context("reading the agent-cgroup pre-filter")?;
        if old & bit == 0 {
            f.set(word, old | bit, 0)
                .context("writing the agent-cgroup pre-filter")?;
        }
        let mut m: HashMap<_, u64, AgentSlot> = HashMap::try_from(self.map_mut("AGENT_CGROUPS")?)?;
        m.insert(cgroup_id, slot, 0)
            .context("adding to the agent identity map (full?)")?;
        self.agent_cgroup_ids.insert(cgroup_id);
        Ok(())
    }

    /// Puts agent `id`'s allowlist index and mode in force (one atomic update per agent).
    pub fn set_agent_table(&mut self, id: u32, table: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map_mut("AGENT_TABLES")?)?;
        m.insert(id, table, 0)
            .with_context(|| format!("writing the agent table (capacity {})", common::MAX_AGENTS))
    }

    /// Stable ids with an entry in the agent table.
    pub fn agent_table_ids(&self) -> anyhow::Result<Vec<u32>> {
        let m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map("AGENT_TABLES")?)?;
        Ok(m.keys().filter_map(Result::ok).collect())
    }

    /// Forgets agent `id`: its processes fall back to "no allowlist, enforce" in the kernel.
    pub fn remove_agent_table(&mut self, id: u32) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map_mut("AGENT_TABLES")?)?;
        m.remove(&id).context("removing from the agent table")
    }

    pub fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        let mut m: HashMap<_, u64, AgentSlot> = HashMap::try_from(self.map_mut("AGENT_CGROUPS")?)?;
        m.remove(&cgroup_id)
            .context("removing from the agent identity map")?;
        self.agent_cgroup_ids.remove(&cgroup_id);
        // The bit goes only if no other entry shares it; after the entry, never before.
        let (word, bit) = common::agent_cgroup_filter_slot(cgroup_id);
        let shared = self
            .agent_cgroup_ids
            .iter()
            .any(|&id| common::agent_cgroup_filter_slot(id) == (word, bit));
        if !shared {
            let mut f: Array<_, u64> = Array::try_from(self.map_mut("AGENT_CGROUP_FILTER")?)?;
            let old = f
                .get(&word, 0)
                .context("reading the agent-cgroup pre-filter")?;
            f.set(word, old & !bit, 0)
                .context("writing the agent-cgroup pre-filter")?;
        }
        Ok(())
    }

    /// Every (cgroup id, slot) in the identity map: what a previous daemon left governed.
    pub fn agent_cgroups(&self) -> anyhow::Result<Vec<(u64, AgentSlot)>> {
        agent_cgroups_of(&self.maps)
    }

    /// Which selector kinds the kernel consults beyond the agent cgroups. With any, a process
    /// anywhere on the host can be an agent, so the agent-socket hooks go to the root first; with
    /// none, they return below the agents' cgroup afterwards.
    pub fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        let host_wide = config.selectors != 0;
        // A failed move still lets the selectors in: their agents are then judged by every
        // hook but the agent-socket ones, rather than by none.
        let moved = if host_wide {
            self.scope_agent_hooks(true)
        } else {
            Ok(())
        };
        let mut m: Array<_, IdentityConfig> = Array::try_from(self.map_mut("IDENTITY_CONFIG")?)?;
        m.set(0, config, 0)
            .context("writing the identity configuration map")?;
        if !host_wide {
            self.scope_agent_hooks(false)?;
        }
        moved
    }

    /// Moves the agent-socket hooks (`Scope::Agents`) to the cgroup root (`host_wide`) or below
    /// the agents' cgroup. Each program gets its new link before the old one goes (the pin is
    /// replaced by a rename), so no socket of an agent passes unjudged meanwhile. Idempotent.
    fn scope_agent_hooks(&mut self, host_wide: bool) -> anyhow::Result<()> {
        if self.agent_hooks_host_wide == host_wide {
            return Ok(());
        }
        let pins = PinDir::new(&self.pin_root);
        let to = self
            .cgroups
            .scope_of(Scope::Agents, host_wide)
            .to_path_buf();
        for hook in HOOKS.iter().filter(|h| h.scope == Scope::Agents) {
            let pinned = pins.link(hook.program);
            if !pinned.exists() {
                continue; // refused by the kernel at install: nothing to move
            }
            let program = pins.program(hook.program);
            let link = match hook.kind {
                HookKind::CgroupSock(_, attach_type) => {
                    let mut p = CgroupSock::from_pin(&program, attach_type)
                        .with_context(|| format!("opening pinned program {}", program.display()))?;
                    attach_cgroup_sock(&mut p, &to)
                }
                HookKind::CgroupSockAddr(_, attach_type) => {
                    let mut p = CgroupSockAddr::from_pin(&program, attach_type)
                        .with_context(|| format!("opening pinned program {}", program.display()))?;
                    attach_cgroup_sock_addr(&mut p, &to)
                }
                HookKind::CgroupSkb(_, attach_type) => {
                    let mut p = CgroupSkb::from_pin(&program, attach_type)
                        .with_context(|| format!("opening pinned program {}", program.display()))?;
                    attach_cgroup_skb(&mut p, &to, attach_type)
                }
                _ => continue,
            }
            .with_context(|| format!("moving {} to {}", hook.program, to.display()))?;
            // bpffs refuses dots in names.
            let moving = pins.link(&format!("{}_moving", hook.program));
            let _ = std::fs::remove_file(&moving); // left by a move a crash interrupted
            let state = pin_link(link, hook.program, &moving)?;
            // The old link's pin is its only holder: replacing it detaches the old attachment.
            std::fs::rename(&moving, &pinned)
                .with_context(|| format!("replacing the pinned link {}", pinned.display()))?;
            let from = self.cgroups.scope_of(Scope::Agents, !host_wide);
            let (old, new) = (hook.kind.at(from), hook.kind.at(&to));
            for a in &mut self.mechanisms.attached {
                if a.starts_with(&format!("{} → ", hook.program)) {
                    *a = format!("{} → {new}", hook.program);
                }
            }
            if let Some(l) = self
                .mechanisms
                .links
                .iter_mut()
                .find(|l| l.program == hook.program)
            {
                *l = state;
            }
            tracing::info!("moved {} from {old} to {new}", hook.program);
        }
        self.agent_hooks_host_wide = host_wide;
        let mut a: Array<_, u64> = Array::try_from(self.map_mut("DAEMON_STATE")?)?;
        a.set(common::STATE_AGENT_HOOKS_HOST_WIDE, u64::from(host_wide), 0)
            .context("writing where the agent-socket hooks are")
    }

    pub fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map_mut("UID_SELECTORS")?)?;
        m.insert(uid, slot, 0)
            .context("adding to the uid selector map (full?)")
    }

    /// Arms (or re-arms with another slot) the executable selector for the file `key`
    /// (device and inode, `agent` 0).
    pub fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, AgentSlot> =
            HashMap::try_from(self.map_mut("EXEC_SELECTORS")?)?;
        m.insert(key, slot, 0)
            .context("adding to the executable selector map (full?)")
    }

    pub fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, AgentSlot> =
            HashMap::try_from(self.map_mut("EXEC_SELECTORS")?)?;
        match m.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from the executable selector map"),
        }
    }

    /// Every per-thread tag: (thread id, identity).
    pub fn tags(&self) -> Vec<(u32, AgentSlot)> {
        tags_of(&self.maps)
    }

    pub fn uid_selectors(&self) -> anyhow::Result<Vec<u32>> {
        let m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map("UID_SELECTORS")?)?;
        Ok(m.keys().filter_map(Result::ok).collect())
    }

    /// Every uid selector entry with the identity it gives (a restarted daemon adopts the
    /// `run --user` bindings among them).
    pub fn uid_selector_entries(&self) -> anyhow::Result<Vec<(u32, AgentSlot)>> {
        let m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map("UID_SELECTORS")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    pub fn remove_uid_selector(&mut self, uid: u32) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map_mut("UID_SELECTORS")?)?;
        match m.remove(&uid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from the uid selector map"),
        }
    }

    /// Every armed executable selector: the file (device, inode) and the identity it gives.
    pub fn exec_selector_entries(&self) -> anyhow::Result<Vec<(ExecFileKey, AgentSlot)>> {
        let m: HashMap<_, ExecFileKey, AgentSlot> = HashMap::try_from(self.map("EXEC_SELECTORS")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    pub fn exec_selectors(&self) -> anyhow::Result<Vec<ExecFileKey>> {
        let m: HashMap<_, ExecFileKey, AgentSlot> = HashMap::try_from(self.map("EXEC_SELECTORS")?)?;
        Ok(m.keys().filter_map(Result::ok).collect())
    }

    /// Every task grant entry in the kernel, with its expiry.
    pub fn task_grants(&self) -> anyhow::Result<KernelGrants> {
        task_grants_of(&self.maps)
    }

    /// Removes every task grant entry whose task number `keep` rejects; returns how many went.
    pub fn retain_task_grants(&mut self, keep: impl Fn(u32) -> bool) -> anyhow::Result<usize> {
        Ok(remove_trie_entries::<NetKey, NetGrant>(
            self.map_mut("TASK_NET_GRANTS")?,
            |k| !keep(k.agent),
            "task network grant",
        )? + remove_trie_entries::<ExecKey, Expiry>(
            self.map_mut("TASK_EXEC_GRANTS")?,
            |k| !keep(k.agent),
            "task exec grant",
        )?)
    }

    /// Writes entries as read by [`Kernel::task_grants`] (an upgrade copies them over).
    fn insert_task_grants(&mut self, grants: &KernelGrants) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetGrant> =
            LpmTrie::try_from(self.map_mut("TASK_NET_GRANTS")?)?;
        for (prefix_len, key, grant) in &grants.net {
            net.insert(&Key::new(*prefix_len, *key), grant, 0)
                .context("copying a task network grant")?;
        }
        let mut exec: LpmTrie<_, ExecKey, Expiry> =
            LpmTrie::try_from(self.map_mut("TASK_EXEC_GRANTS")?)?;
        for (prefix_len, key, expiry) in &grants.exec {
            exec.insert(&Key::new(*prefix_len, *key), expiry, 0)
                .context("copying a task exec grant")?;
        }
        Ok(())
    }

    /// Tags thread `tid` as `slot` (a task switch of a selector-identified process).
    pub fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> = HashMap::try_from(self.map_mut("PROCESS_AGENTS")?)?;
        m.insert(tid, slot, 0)
            .context("tagging a process in PROCESS_AGENTS (full?)")
    }

    /// The tag of thread `tid`, if it has one.
    pub fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        let m = self.maps.get("PROCESS_AGENTS")?;
        let m: HashMap<_, u32, AgentSlot> = HashMap::try_from(m).ok()?;
        m.get(&tid, 0).ok()
    }

    /// Writes the grants of one task (entries keyed by the task number), valid until `expiry`.
    pub fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetGrant> =
            LpmTrie::try_from(self.map_mut("TASK_NET_GRANTS")?)?;
        for (prefix_len, key, allow) in &tables.net {
            let grant = NetGrant {
                expiry,
                allow: *allow,
                _pad: 0,
            };
            net.insert(&Key::new(*prefix_len, *key), grant, 0)
                .context("writing the task network grant map (full?)")?;
        }
        let mut exec: LpmTrie<_, ExecKey, Expiry> =
            LpmTrie::try_from(self.map_mut("TASK_EXEC_GRANTS")?)?;
        for (prefix_len, key) in &tables.exec {
            exec.insert(&Key::new(*prefix_len, *key), expiry, 0)
                .context("writing the task exec grant map (full?)")?;
        }
        Ok(())
    }

    /// Removes grant entries written by `set_task_grants`. Entries already gone are fine.
    pub fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetGrant> =
            LpmTrie::try_from(self.map_mut("TASK_NET_GRANTS")?)?;
        for (prefix_len, key, _) in &tables.net {
            match net.remove(&Key::new(*prefix_len, *key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a task network grant"),
            }
        }
        let mut exec: LpmTrie<_, ExecKey, Expiry> =
            LpmTrie::try_from(self.map_mut("TASK_EXEC_GRANTS")?)?;
        for (prefix_len, key) in &tables.exec {
            match exec.remove(&Key::new(*prefix_len, *key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a task exec grant"),
            }
        }
        Ok(())
    }

    /// Points agent `agent`'s port-53 traffic at its DNS proxy endpoint, and keeps every other
    /// agent away from that endpoint.
    pub fn set_dns_proxy(&mut self, agent: u32, ports: DnsProxy) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, DnsProxy> = HashMap::try_from(self.map_mut("DNS_PROXY")?)?;
        m.insert(agent, ports, 0)
            .context("writing the DNS proxy map")?;
        let mut owners: HashMap<_, u32, u32> = HashMap::try_from(self.map_mut("DNS_PROXY_PORTS")?)?;
        for (port, ipv6, tcp) in [
            (ports.udp4, false, false),
            (ports.tcp4, false, true),
            (ports.udp6, true, false),
            (ports.tcp6, true, true),
        ] {
            if port != 0 {
                owners
                    .insert(common::dns_proxy_port_key(port, ipv6, tcp), agent, 0)
                    .context("writing the DNS proxy port map")?;
            }
        }
        Ok(())
    }

    /// Allows `agent` to reach `addr` as `value` says (ports, expiry), learned from a DNS answer.
    pub fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
    ) -> anyhow::Result<()> {
        let mut m: HashMap<_, NetKey, Learned> = HashMap::try_from(self.map_mut("DNS_LEARNED")?)?;
        m.insert(learned_key(agent, addr), value, 0)
            .with_context(|| {
                format!(
                    "writing the learned-address map (full at {} entries?)",
                    common::MAX_DNS_LEARNED
                )
            })
    }

    pub fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()> {
        let mut m: HashMap<_, NetKey, Learned> = HashMap::try_from(self.map_mut("DNS_LEARNED")?)?;
        m.remove(&learned_key(agent, addr))
            .context("removing from the learned-address map")
    }

    /// The kernel's loss counters summed over CPUs, indexed by `COUNTER_*`.
    pub fn counters(&self) -> anyhow::Result<[u64; COUNTERS as usize]> {
        counters_of(&self.maps)
    }

    pub fn state(&self, slot: u32) -> anyhow::Result<u64> {
        read_state(&self.maps, slot)
    }

    pub fn set_state(&mut self, slot: u32, value: u64) -> anyhow::Result<()> {
        let mut a: Array<_, u64> = Array::try_from(self.map_mut("DAEMON_STATE")?)?;
        a.set(slot, value, 0)
            .with_context(|| format!("writing daemon state slot {slot}"))
    }

    /// Leaves the time and the loss counter in the pinned state, for the next daemon.
    pub fn heartbeat(&mut self) -> anyhow::Result<()> {
        let lost = self.counters()?[common::COUNTER_RECORDS_LOST as usize];
        self.set_state(common::STATE_LOST_AT_HEARTBEAT, lost)?;
        self.set_state(common::STATE_HEARTBEAT_UNIX_NS, unix_ns())
    }

    /// Entries in use of the maps that fill up, against their capacities.
    pub fn occupancy(&self) -> anyhow::Result<Vec<Occupancy>> {
        let count = |name: &str| -> anyhow::Result<u64> {
            let m = self.map(name)?;
            Ok(match m {
                Map::HashMap(_) if name == "AGENT_TABLES" => {
                    let h: HashMap<_, u32, AgentSlot> = HashMap::try_from(m)?;
                    h.keys().count() as u64
                }
                Map::HashMap(_) if name == "PROCESS_AGENTS" => {
                    let h: HashMap<_, u32, AgentSlot> = HashMap::try_from(m)?;
                    h.keys().count() as u64
                }
                Map::HashMap(_) if name == "EXEC_FILES" => {
                    let h: HashMap<_, ExecFileKey, u32> = HashMap::try_from(m)?;
                    h.keys().count() as u64
                }
                Map::HashMap(_) => {
                    let h: HashMap<_, u64, AgentSlot> = HashMap::try_from(m)?;
                    h.keys().count() as u64
                }
                Map::LpmTrie(_) if name == "NET_ALLOW" => {
                    let t: LpmTrie<_, NetKey, NetAllow> = LpmTrie::try_from(m)?;
                    t.keys().count() as u64
                }
                Map::LpmTrie(_) => {
                    let t: LpmTrie<_, ExecKey, u32> = LpmTrie::try_from(m)?;
                    t.keys().count() as u64
                }
                _ => 0,
            })
        };
        [
            ("AGENT_CGROUPS", common::MAX_AGENT_CGROUPS),
            ("AGENT_TABLES", common::MAX_AGENTS),
            ("NET_ALLOW", common::MAX_NET_ENTRIES),
            ("EXEC_ALLOW", common::MAX_EXEC_ENTRIES),
            ("EXEC_FILES", common::MAX_EXEC_ENTRIES),
            ("PROCESS_AGENTS", common::MAX_TAGGED_TASKS),
        ]
        .into_iter()
        .map(|(name, cap)| {
            // What the kernel was given (the tag map is sized at load, an adopted map by the
            // daemon that created it), else the built-in size.
            let capacity = match self.map(name)? {
                Map::HashMap(d) | Map::LpmTrie(d) => d.info().map(|i| i.max_entries()).ok(),
                _ => None,
            };
            Ok(Occupancy {
                map: name.to_string(),
                used: count(name)?,
                capacity: u64::from(capacity.unwrap_or(cap)),
            })
        })
        .collect()
    }

    /// Hands the ring buffer to its reader. Can be called once.
    pub fn take_actions(&mut self) -> anyhow::Result<ActionStream> {
        let m = self
            .maps
            .remove("ACTIONS")
            .ok_or_else(|| anyhow!("ring buffer ACTIONS missing or already taken"))?;
        let ring = RingBuf::try_from(m)?;
        // SAFETY: the RingBuf owns its fd and keeps it open for as long as the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("registering the ring buffer with tokio: {e}"))?;
        Ok(ActionStream { fd })
    }
}

impl HookKind {
    /// The hook as `status` shows it; `cgroup` is where a cgroup hook is attached.
    fn at(&self, cgroup: &Path) -> String {
        match self {
            HookKind::Tracepoint(category, name) => format!("tracepoint {category}/{name}"),
            HookKind::RawTracepoint(name) => format!("raw tracepoint {name}"),
            HookKind::CgroupSockAddr(hook, _) | HookKind::CgroupSock(hook, _) => {
                format!("cgroup/{hook} at {}", cgroup.display())
            }
            HookKind::CgroupSkb(hook, _) => format!("cgroup_skb/{hook} at {}", cgroup.display()),
        }
    }
}

impl HookCgroups {
    /// The cgroup a hook of `scope` is attached to.
    fn scope_of(&self, scope: Scope, agent_hooks_host_wide: bool) -> &Path {
        match scope {
            Scope::Agents if !agent_hooks_host_wide => &self.agents,
            _ => &self.root,
        }
    }
}

/// Every value patched into the object at load: part of what makes pinned programs "ours".
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

/// Removes the entries of hash map `map` whose key `stale` picks; returns how many went.
fn remove_hash_entries<K: aya::Pod, V: aya::Pod>(
    map: &mut Map,
    stale: impl Fn(&K) -> bool,
    what: &str,
) -> anyhow::Result<usize> {
    let mut h: HashMap<_, K, V> = HashMap::try_from(map)?;
    let keys: Vec<K> = h
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for k in &keys {
        h.remove(k)
            .with_context(|| format!("removing a stale {what}"))?;
    }
    Ok(keys.len())
}

/// [`remove_hash_entries`] for an LPM trie (`stale` sees the key's data).
fn remove_trie_entries<K: aya::Pod, V: aya::Pod>(
    map: &mut Map,
    stale: impl Fn(&K) -> bool,
    what: &str,
) -> anyhow::Result<usize> {
    let mut t: LpmTrie<_, K, V> = LpmTrie::try_from(map)?;
    let keys: Vec<Key<K>> = t
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(&k.data()))
        .collect();
    for k in &keys {
        t.remove(k)
            .with_context(|| format!("removing a stale {what}"))?;
    }
    Ok(keys.len())
}

/// Capacity of the per-thread tag map: at least `pid_max`, so every thread the kernel can have at
/// once fits and a fork flood cannot fill it (an untagged child would run ungoverned).
pub fn tag_capacity(pid_max: Option<u32>) -> u32 {
    pid_max.map_or(common::MAX_TAGGED_TASKS, |p| {
        p.max(common::MAX_TAGGED_TASKS)
    })
}

/// Loads the object, attaches every hook through a pinned link and pins every map by its name.
fn install(
    pins: &PinDir,
    cgroups: &HookCgroups,
    layout: &TracepointLayout,
    offsets: &KernelOffsets,
    hash: u64,
) -> anyhow::Result<(BTreeMap<String, Map>, Mechanisms)> {
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
    let mut mechanisms = base_mechanisms(pins);
    for hook in HOOKS {
        let at = cgroups.scope_of(hook.scope, false);
        match attach(&mut ebpf, hook, at, pins) {
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
    mechanisms.socket_syscall_watch = match load_socket_watch(&mut ebpf, pins) {
        Ok(()) => "off: every agent so far runs under `run`'s seccomp filter".into(),
        Err(e) => {
            tracing::warn!(program = SOCKET_WATCH, "kernel refused program: {e:#}");
            mechanisms.refused.push(format!("{SOCKET_WATCH}: {e:#}"));
            format!("unavailable: {e:#}")
        }
    };
    set_exec_mechanism(&mut ebpf, &mut mechanisms);
    let mut a: Array<_, u64> = Array::try_from(
        maps.get_mut("DAEMON_STATE")
            .ok_or_else(|| anyhow!("map DAEMON_STATE missing from the eBPF object"))?,
    )?;
    a.set(common::STATE_OBJECT_HASH, hash, 0)
        .context("writing the object hash")?;
    a.set(common::STATE_AGENT_HOOKS_HOST_WIDE, 0, 0)
        .context("writing where the agent-socket hooks are")?;
    Ok((maps, mechanisms))
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

fn adopt_link(pins: &PinDir, program: &str) -> anyhow::Result<LinkState> {
    let path = pins.link(program);
    let link = PinnedLink::from_pin(&path)
        .with_context(|| format!("no pinned link {}", path.display()))?;
    let info = FdLink::from(link)
        .info()
        .with_context(|| format!("reading link {}", path.display()))?;
    Ok(LinkState {
        program: program.to_string(),
        link_id: info.id(),
        program_id: info.program_id(),
    })
}

fn read_state(maps: &BTreeMap<String, Map>, slot: u32) -> anyhow::Result<u64> {
    let m = maps
        .get("DAEMON_STATE")
        .ok_or_else(|| anyhow!("map DAEMON_STATE missing"))?;
    let a: Array<_, u64> = Array::try_from(m)?;
    Ok(a.get(&slot, 0)?)
}

fn counters_of(maps: &BTreeMap<String, Map>) -> anyhow::Result<[u64; COUNTERS as usize]> {
    let m = maps
        .get("COUNTERS_MAP")
        .ok_or_else(|| anyhow!("map COUNTERS_MAP missing from the object"))?;
    let a: PerCpuArray<_, u64> = PerCpuArray::try_from(m)?;
    let mut out = [0u64; COUNTERS as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        // A map pinned by an older build may be shorter: its missing counters read as 0.
        *slot = a.get(&(i as u32), 0).map_or(0, |v| v.iter().sum());
    }
    Ok(out)
}

fn agent_cgroups_of(maps: &BTreeMap<String, Map>) -> anyhow::Result<Vec<(u64, AgentSlot)>> {
    let m = maps
        .get("AGENT_CGROUPS")
        .ok_or_else(|| anyhow!("map AGENT_CGROUPS missing"))?;
    let h: HashMap<_, u64, AgentSlot> = HashMap::try_from(m)?;
    Ok(h.iter().filter_map(Result::ok).collect())
}

/// Every task grant entry (prefix length, key, value) of the pinned grant tries.
fn task_grants_of(maps: &BTreeMap<String, Map>) -> anyhow::Result<KernelGrants> {
    let m = maps
        .get("TASK_NET_GRANTS")
        .ok_or_else(|| anyhow!("map TASK_NET_GRANTS missing"))?;
    let net: LpmTrie<_, NetKey, NetGrant> = LpmTrie::try_from(m)?;
    let net = net
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k.prefix_len(), k.data(), v))
        .collect();
    let m = maps
        .get("TASK_EXEC_GRANTS")
        .ok_or_else(|| anyhow!("map TASK_EXEC_GRANTS missing"))?;
    let exec: LpmTrie<_, ExecKey, Expiry> = LpmTrie::try_from(m)?;
    let exec = exec
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k.prefix_len(), k.data(), v))
        .collect();
    Ok(KernelGrants { net, exec })
}

/// Per-thread tags (issue 4) an upgrade carries into the new build's maps before the old programs
/// go, or tagged processes would fall out of their agent.
fn tags_of(maps: &BTreeMap<String, Map>) -> Vec<(u32, AgentSlot)> {
    maps.get("PROCESS_AGENTS")
        .and_then(|m| HashMap::<_, u32, AgentSlot>::try_from(m).ok())
        .map(|h| h.iter().filter_map(Result::ok).collect())
        .unwrap_or_default()
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

const _: () = assert!(common::STATE_AGENT_HOOKS_HOST_WIDE < DAEMON_STATE_LEN);

/// The kernel compares IPv4 destinations as `::ffff:a.b.c.d`.
fn learned_key(agent: u32, addr: IpAddr) -> NetKey {
    let addr = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    NetKey {
        agent,
        addr: addr.octets(),
    }
}

fn load_socket_watch(ebpf: &mut Ebpf, pins: &PinDir) -> anyhow::Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(SOCKET_WATCH)
        .ok_or_else(|| anyhow!("program {SOCKET_WATCH} missing from the eBPF object"))?
        .try_into()?;
    tp.load().context("loading")?;
    tp.pin(pins.program(SOCKET_WATCH))
        .with_context(|| format!("pinning program {SOCKET_WATCH}"))
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

fn attach(ebpf: &mut Ebpf, hook: &Hook, cgroup: &Path, pins: &PinDir) -> anyhow::Result<LinkState> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    let link: FdLink = match hook.kind {
        HookKind::Tracepoint(category, name) => {
            let tp: &mut TracePoint = prog.try_into()?;
            tp.load().context("loading")?;
            let id = tp.attach(category, name).context("attaching")?;
            tp.take_link(id)?.try_into().context(
                "the kernel gave a perf link, not a bpf_link (kernel < 5.15?): it cannot be pinned",
            )?
        }
        HookKind::RawTracepoint(name) => {
            let tp: &mut RawTracePoint = prog.try_into()?;
            tp.load().context("loading")?;
            let id = tp.attach(name).context("attaching")?;
            tp.take_link(id)?.into()
        }
        HookKind::CgroupSock(..) => {
            let p: &mut CgroupSock = prog.try_into()?;
            p.load().context("loading")?;
            if hook.scope == Scope::Agents {
                // So that a later daemon can move it (`Kernel::scope_agent_hooks`).
                p.pin(pins.program(hook.program))
                    .with_context(|| format!("pinning program {}", hook.program))?;
            }
            attach_cgroup_sock(p, cgroup)?
        }
        HookKind::CgroupSockAddr(..) => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load().context("loading")?;
            if hook.scope == Scope::Agents {
                p.pin(pins.program(hook.program))
                    .with_context(|| format!("pinning program {}", hook.program))?;
            }
            attach_cgroup_sock_addr(p, cgroup)?
        }
        HookKind::CgroupSkb(_, attach_type) => {
            let p: &mut CgroupSkb = prog.try_into()?;
            p.load().context("loading")?;
            if hook.scope == Scope::Agents {
                p.pin(pins.program(hook.program))
                    .with_context(|| format!("pinning program {}", hook.program))?;
            }
            attach_cgroup_skb(p, cgroup, attach_type)?
        }
    };
    pin_link(link, hook.program, &pins.link(hook.program))
}

fn open_cgroup(cgroup: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))
}

fn attach_cgroup_sock(p: &mut CgroupSock, cgroup: &Path) -> anyhow::Result<FdLink> {
    // With a bpf_link (kernel >= 5.7) the kernel always attaches as "multi" and rejects any flag,
    // so the mode must be Single (0) here; other programs on the same cgroup still run.
    let id = p
        .attach(open_cgroup(cgroup)?, CgroupAttachMode::Single)
        .context("attaching")?;
    p.take_link(id)?
        .try_into()
        .context("the kernel gave a legacy attachment, not a bpf_link: it cannot be pinned")
}

fn attach_cgroup_sock_addr(p: &mut CgroupSockAddr, cgroup: &Path) -> anyhow::Result<FdLink> {
    // As in `attach_cgroup_sock`.
    let id = p
        .attach(open_cgroup(cgroup)?, CgroupAttachMode::Single)
        .context("attaching")?;
    p.take_link(id)?
        .try_into()
        .context("the kernel gave a legacy attachment, not a bpf_link: it cannot be pinned")
}

fn attach_cgroup_skb(
    p: &mut CgroupSkb,
    cgroup: &Path,
    attach_type: CgroupSkbAttachType,
) -> anyhow::Result<FdLink> {
    // As in `attach_cgroup_sock`.
    let id = p
        .attach(open_cgroup(cgroup)?, attach_type, CgroupAttachMode::Single)
        .context("attaching")?;
    p.take_link(id)?
        .try_into()
        .context("the kernel gave a legacy attachment, not a bpf_link: it cannot be pinned")
}

/// Pins `link` at `path` and returns what `status` reports of it.
fn pin_link(link: FdLink, program: &str, path: &Path) -> anyhow::Result<LinkState> {
    let info = link.info().context("reading the new link")?;
    link.pin(path)
        .with_context(|| format!("pinning link {}", path.display()))?;
    Ok(LinkState {
        program: program.to_string(),
        link_id: info.id(),
        program_id: info.program_id(),
    })
}

/// Readiness-driven reader of the action ring buffer.
pub struct ActionStream {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl ActionStream {
    /// Waits until records are available, then hands each to `f`. Returns how many were read.
    pub async fn next_batch(&mut self, mut f: impl FnMut(&[u8])) -> anyhow::Result<usize> {
        let mut guard = self.fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            f(&item);
            n += 1;
        }
        guard.clear_ready();
        Ok(n)
    }

    /// Hands every record already in the ring to `f` without waiting for readiness: the kernel
    /// wakes the reader only for denials, alerts and a filling buffer, so the daemon also drains
    /// on a timer (and before it judges a DNS proxy report). Returns how many were read.
    pub fn drain_now(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let ring = self.fd.get_mut();
        let mut n = 0;
        while let Some(item) = ring.next() {
            f(&item);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_map_holds_every_thread_id_the_kernel_can_hand_out() {
        assert_eq!(tag_capacity(Some(4_194_304)), 4_194_304);
        assert_eq!(tag_capacity(Some(32_768)), common::MAX_TAGGED_TASKS);
        assert_eq!(tag_capacity(None), common::MAX_TAGGED_TASKS);
    }
}
