//! The only module that talks to aya: loads and attaches the kernel programs, writes the identity
//! and allowlist maps, reads the action ring buffer and the loss counters.

use std::net::IpAddr;
use std::path::Path;

use agent_monitor_common::{
    self as common, AgentSlot, COUNTERS, DnsProxy, ExecFileKey, ExecKey, Expiry, IdentityConfig,
    KernelOffsets, Learned, NetAllow, NetGrant, NetKey,
};
use anyhow::{Context as _, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, RawTracePoint, TracePoint,
        trace_point::TracePointLinkId,
    },
};
use tokio::io::unix::AsyncFd;

use crate::host::TracepointLayout;
use crate::policy::KernelTables;

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
    /// Whether `sys_enter_socket` is watched, and why (see `Kernel::watch_socket_syscalls`).
    pub socket_syscall_watch: String,
}

/// The program that reports socket families only `run`'s seccomp filter refuses, and its hook.
const SOCKET_WATCH: &str = "agent_socket_syscall";
const SOCKET_WATCH_HOOK: (&str, &str) = ("syscalls", "sys_enter_socket");

/// The loaded programs and their maps. One owner (the monitor task) holds it.
pub struct Kernel {
    ebpf: Ebpf,
    pub mechanisms: Mechanisms,
    /// The `sys_enter_socket` link while it is attached.
    socket_watch: Option<TracePointLinkId>,
}

struct Hook {
    program: &'static str,
    kind: HookKind,
    /// The daemon cannot do its job without it.
    required: bool,
    /// A cgroup hook that only concerns sockets agents created: attached at the agents' scope
    /// (see `Kernel::load`) rather than the root.
    agent_sockets: bool,
}

enum HookKind {
    Tracepoint(&'static str, &'static str),
    RawTracepoint(&'static str),
    CgroupSockAddr(&'static str),
    CgroupSock(&'static str),
}

const HOOKS: &[Hook] = &[
    Hook {
        program: "agent_exec",
        kind: HookKind::RawTracepoint("sched_process_exec"),
        required: true,
        agent_sockets: false,
    },
    Hook {
        program: "agent_connect4",
        kind: HookKind::CgroupSockAddr("connect4"),
        required: true,
        agent_sockets: false,
    },
    Hook {
        program: "agent_connect6",
        kind: HookKind::CgroupSockAddr("connect6"),
        required: true,
        agent_sockets: false,
    },
    // DNS redirection: sendmsg (below) rewrites an agent's datagrams to port 53; without recvmsg
    // its resolver would reject replies from the proxy's address.
    Hook {
        program: "agent_recvmsg4",
        kind: HookKind::CgroupSockAddr("recvmsg4"),
        required: true,
        agent_sockets: true,
    },
    Hook {
        program: "agent_recvmsg6",
        kind: HookKind::CgroupSockAddr("recvmsg6"),
        required: true,
        agent_sockets: true,
    },
    // Only getpeername() on a redirected connected socket would show the proxy without these.
    Hook {
        program: "agent_getpeername4",
        kind: HookKind::CgroupSockAddr("getpeername4"),
        required: false,
        agent_sockets: true,
    },
    Hook {
        program: "agent_getpeername6",
        kind: HookKind::CgroupSockAddr("getpeername6"),
        required: false,
        agent_sockets: true,
    },
    Hook {
        program: "agent_sendmsg4",
        kind: HookKind::CgroupSockAddr("sendmsg4"),
        required: true,
        agent_sockets: false,
    },
    Hook {
        program: "agent_sendmsg6",
        kind: HookKind::CgroupSockAddr("sendmsg6"),
        required: true,
        agent_sockets: false,
    },
    Hook {
        program: "agent_sock_create",
        kind: HookKind::CgroupSock("sock_create"),
        required: true,
        agent_sockets: true,
    },
    Hook {
        program: "agent_fork",
        kind: HookKind::Tracepoint("sched", "sched_process_fork"),
        required: false,
        agent_sockets: false,
    },
    Hook {
        program: "agent_exit",
        kind: HookKind::Tracepoint("sched", "sched_process_exit"),
        required: false,
        agent_sockets: false,
    },
];

impl Kernel {
    /// Loads every program. The verdict hooks (connect, sendmsg) attach at the root of the cgroup
    /// v2 tree, so every socket on the host passes through them (non-agents leave after one
    /// lookup): a socket keeps its creator's cgroup, and an agent handed a socket made outside
    /// must still be judged when it connects. The hooks that only concern sockets agents create
    /// (sock_create, and the DNS address restoring recvmsg/getpeername, which also runs at every
    /// accept() on the host) attach at `agent_scope`: the cgroup every agent process lives below
    /// (the root when selectors can make any process an agent). A socket belongs to its
    /// creator's cgroup, so they see the same agent sockets and spare every other process a
    /// program run per socket(), accept() and unconnected UDP receive.
    pub fn load(
        cgroup_root: &Path,
        agent_scope: &Path,
        layout: &TracepointLayout,
        offsets: &KernelOffsets,
    ) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global("FORK_CHILD_PID_OFFSET", &layout.fork_child_pid, true)
            .override_global("KERNEL_OFFSETS", offsets, true)
            .load(PROGRAMS)
            .context("loading the agent-monitor eBPF object")?;
        let cgroup = std::fs::File::open(cgroup_root)
            .with_context(|| format!("opening cgroup v2 root {}", cgroup_root.display()))?;
        let scope = std::fs::File::open(agent_scope)
            .with_context(|| format!("opening cgroup {}", agent_scope.display()))?;
        let at = |f: &std::fs::File| {
            if std::ptr::eq(f, &scope) && agent_scope != cgroup_root {
                format!("cgroup {}", agent_scope.display())
            } else {
                "the cgroup v2 root".to_string()
            }
        };
        let mut mechanisms = Mechanisms {
            connect_enforcement: "cgroup/connect4+connect6, sendmsg4+sendmsg6 and sock_create \
                                  return EPERM"
                .into(),
            ..Default::default()
        };
        for hook in HOOKS {
            let target = if hook.agent_sockets { &scope } else { &cgroup };
            match attach(&mut ebpf, hook, target, &at(target)) {
                Ok(at) => mechanisms.attached.push(format!("{} → {at}", hook.program)),
                Err(e) if hook.required => {
                    return Err(e.context(format!("attaching required program {}", hook.program)));
                }
                Err(e) => {
                    tracing::warn!(program = hook.program, "kernel refused program: {e:#}");
                    mechanisms.refused.push(format!("{}: {e:#}", hook.program));
                }
            }
        }
        // Loaded now so a refusal shows at start; attached only while needed (it costs every
        // syscall on the host, see watch_socket_syscalls).
        mechanisms.socket_syscall_watch = match load_socket_watch(&mut ebpf) {
            Ok(()) => "off: every agent so far runs under `run`'s seccomp filter".into(),
            Err(e) => {
                tracing::warn!(program = SOCKET_WATCH, "kernel refused program: {e:#}");
                mechanisms.refused.push(format!("{SOCKET_WATCH}: {e:#}"));
                format!("unavailable: {e:#}")
            }
        };
        mechanisms.exec_enforcement = match probe_lsm(&mut ebpf) {
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
        Ok(Kernel {
            ebpf,
            mechanisms,
            socket_watch: None,
        })
    }

    /// Attaches (`Some(why)`) or detaches (`None`) the `sys_enter_socket` tracepoint that reports
    /// socket families the cgroup hooks never see (vsock, packet…) for agents without `run`'s
    /// seccomp filter. Attaching any `syscalls/*` tracepoint sends every syscall of every process
    /// on the host through the kernel's tracing slow path, so it is attached only while such an
    /// agent can exist. Idempotent; `why` is reported by `status` and the log.
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
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(SOCKET_WATCH)
            .ok_or_else(|| anyhow!("program {SOCKET_WATCH} missing from the eBPF object"))?
            .try_into()?;
        match (why, self.socket_watch.take()) {
            (Some(why), link) => {
                let link = match link {
                    Some(link) => link,
                    None => {
                        let link = tp
                            .attach(category, name)
                            .with_context(|| format!("attaching {entry}"))?;
                        self.mechanisms.attached.push(entry.clone());
                        tracing::info!("attached {entry}: {why}");
                        link
                    }
                };
                self.socket_watch = Some(link);
                self.mechanisms.socket_syscall_watch = format!("on: {why}");
            }
            (None, Some(link)) => {
                tp.detach(link)
                    .with_context(|| format!("detaching {entry}"))?;
                self.mechanisms.attached.retain(|a| *a != entry);
                self.mechanisms.socket_syscall_watch =
                    "off: every agent runs under `run`'s seccomp filter".into();
                tracing::info!("detached {entry}: no agent without `run`'s filter");
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Writes the compiled allowlists. Called once at start, before any agent exists.
    pub fn install_allowlists(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        for (what, have, cap) in [
            ("network", tables.net.len(), common::MAX_NET_ENTRIES),
            ("exec", tables.exec.len(), common::MAX_EXEC_ENTRIES),
        ] {
            if have > cap as usize {
                anyhow::bail!(
                    "the policies compile to {have} {what} allowlist entries; the kernel map holds {cap}"
                );
            }
        }
        let mut net: LpmTrie<_, NetKey, NetAllow> =
            LpmTrie::try_from(map(&mut self.ebpf, "NET_ALLOW")?)?;
        for (prefix_len, key, allow) in &tables.net {
            net.insert(&Key::new(*prefix_len, *key), allow, 0)
                .context("writing the network allowlist map")?;
        }
        let mut exec: LpmTrie<_, ExecKey, u32> =
            LpmTrie::try_from(map(&mut self.ebpf, "EXEC_ALLOW")?)?;
        for (i, (prefix_len, key)) in tables.exec.iter().enumerate() {
            exec.insert(&Key::new(*prefix_len, *key), i as u32, 0)
                .context("writing the exec allowlist map")?;
        }
        Ok(())
    }

    /// Adds and removes entries of the file-identity exec allowlist.
    pub fn update_exec_files(
        &mut self,
        add: &[(ExecFileKey, u32)],
        remove: &[ExecFileKey],
    ) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, "EXEC_FILES")?)?;
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

    /// Makes every task in cgroup `cgroup_id` an agent process, from the next syscall on.
    pub fn add_agent_cgroup(&mut self, cgroup_id: u64, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u64, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "AGENT_CGROUPS")?)?;
        m.insert(cgroup_id, slot, 0)
            .context("adding to the agent identity map (full?)")
    }

    pub fn remove_agent_cgroup(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        let mut m: HashMap<_, u64, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "AGENT_CGROUPS")?)?;
        m.remove(&cgroup_id)
            .context("removing from the agent identity map")
    }

    /// Which selector kinds the kernel consults beyond the agent cgroups.
    pub fn set_identity_config(&mut self, config: IdentityConfig) -> anyhow::Result<()> {
        let mut m: Array<_, IdentityConfig> =
            Array::try_from(map(&mut self.ebpf, "IDENTITY_CONFIG")?)?;
        m.set(0, config, 0)
            .context("writing the identity configuration map")
    }

    pub fn set_uid_selector(&mut self, uid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "UID_SELECTORS")?)?;
        m.insert(uid, slot, 0)
            .context("adding to the uid selector map (full?)")
    }

    /// Arms (or re-arms with another slot) the executable selector for the file `key`
    /// (device and inode, `agent` 0).
    pub fn set_exec_selector(&mut self, key: ExecFileKey, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "EXEC_SELECTORS")?)?;
        m.insert(key, slot, 0)
            .context("adding to the executable selector map (full?)")
    }

    pub fn remove_exec_selector(&mut self, key: ExecFileKey) -> anyhow::Result<()> {
        let mut m: HashMap<_, ExecFileKey, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "EXEC_SELECTORS")?)?;
        match m.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from the executable selector map"),
        }
    }

    /// Tags thread `tid` as `slot` (a task switch of a selector-identified process).
    pub fn tag_thread(&mut self, tid: u32, slot: AgentSlot) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, AgentSlot> =
            HashMap::try_from(map(&mut self.ebpf, "PROCESS_AGENTS")?)?;
        m.insert(tid, slot, 0)
            .context("tagging a process in PROCESS_AGENTS (full?)")
    }

    /// The tag of thread `tid`, if it has one.
    pub fn thread_tag(&self, tid: u32) -> Option<AgentSlot> {
        let m = self.ebpf.map("PROCESS_AGENTS")?;
        let m: HashMap<_, u32, AgentSlot> = HashMap::try_from(m).ok()?;
        m.get(&tid, 0).ok()
    }

    /// Writes the grants of one task (entries keyed by the task number), valid until `expiry`.
    pub fn set_task_grants(&mut self, tables: &KernelTables, expiry: Expiry) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetGrant> =
            LpmTrie::try_from(map(&mut self.ebpf, "TASK_NET_GRANTS")?)?;
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
            LpmTrie::try_from(map(&mut self.ebpf, "TASK_EXEC_GRANTS")?)?;
        for (prefix_len, key) in &tables.exec {
            exec.insert(&Key::new(*prefix_len, *key), expiry, 0)
                .context("writing the task exec grant map (full?)")?;
        }
        Ok(())
    }

    /// Removes grant entries written by `set_task_grants`. Entries already gone are fine.
    pub fn remove_task_grants(&mut self, tables: &KernelTables) -> anyhow::Result<()> {
        let mut net: LpmTrie<_, NetKey, NetGrant> =
            LpmTrie::try_from(map(&mut self.ebpf, "TASK_NET_GRANTS")?)?;
        for (prefix_len, key, _) in &tables.net {
            match net.remove(&Key::new(*prefix_len, *key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a task network grant"),
            }
        }
        let mut exec: LpmTrie<_, ExecKey, Expiry> =
            LpmTrie::try_from(map(&mut self.ebpf, "TASK_EXEC_GRANTS")?)?;
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
        let mut m: HashMap<_, u32, DnsProxy> =
            HashMap::try_from(map(&mut self.ebpf, "DNS_PROXY")?)?;
        m.insert(agent, ports, 0)
            .context("writing the DNS proxy map")?;
        let mut owners: HashMap<_, u32, u32> =
            HashMap::try_from(map(&mut self.ebpf, "DNS_PROXY_PORTS")?)?;
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
        let mut m: HashMap<_, NetKey, Learned> =
            HashMap::try_from(map(&mut self.ebpf, "DNS_LEARNED")?)?;
        m.insert(learned_key(agent, addr), value, 0)
            .with_context(|| {
                format!(
                    "writing the learned-address map (full at {} entries?)",
                    common::MAX_DNS_LEARNED
                )
            })
    }

    pub fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()> {
        let mut m: HashMap<_, NetKey, Learned> =
            HashMap::try_from(map(&mut self.ebpf, "DNS_LEARNED")?)?;
        m.remove(&learned_key(agent, addr))
            .context("removing from the learned-address map")
    }

    /// The kernel's loss counters summed over CPUs, indexed by `COUNTER_*`.
    pub fn counters(&self) -> anyhow::Result<[u64; COUNTERS as usize]> {
        let m = self
            .ebpf
            .map("COUNTERS_MAP")
            .ok_or_else(|| anyhow!("map COUNTERS_MAP missing from the object"))?;
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(m)?;
        let mut out = [0u64; COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = a.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Hands the ring buffer to its reader. Can be called once.
    pub fn take_actions(&mut self) -> anyhow::Result<ActionStream> {
        let m = self
            .ebpf
            .take_map("ACTIONS")
            .ok_or_else(|| anyhow!("ring buffer ACTIONS missing or already taken"))?;
        let ring = RingBuf::try_from(m)?;
        // SAFETY: the RingBuf owns its fd and keeps it open for as long as the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("registering the ring buffer with tokio: {e}"))?;
        Ok(ActionStream { fd })
    }
}

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

fn load_socket_watch(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(SOCKET_WATCH)
        .ok_or_else(|| anyhow!("program {SOCKET_WATCH} missing from the eBPF object"))?
        .try_into()?;
    tp.load().context("loading")
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

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn attach(
    ebpf: &mut Ebpf,
    hook: &Hook,
    cgroup: &std::fs::File,
    at_name: &str,
) -> anyhow::Result<String> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    match hook.kind {
        HookKind::Tracepoint(category, name) => {
            let tp: &mut TracePoint = prog.try_into()?;
            tp.load().context("loading")?;
            tp.attach(category, name).context("attaching")?;
            Ok(format!("tracepoint {category}/{name}"))
        }
        HookKind::RawTracepoint(name) => {
            let tp: &mut RawTracePoint = prog.try_into()?;
            tp.load().context("loading")?;
            tp.attach(name).context("attaching")?;
            Ok(format!("raw tracepoint {name}"))
        }
        HookKind::CgroupSock(at) => {
            let p: &mut CgroupSock = prog.try_into()?;
            p.load().context("loading")?;
            p.attach(cgroup, CgroupAttachMode::Single)
                .context("attaching")?;
            Ok(format!("cgroup/{at} at {at_name}"))
        }
        HookKind::CgroupSockAddr(at) => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load().context("loading")?;
            // With a bpf_link (kernel >= 5.7) the kernel always attaches as "multi" and rejects any
            // flag, so the mode must be Single (0) here; other programs on the root still run.
            p.attach(cgroup, CgroupAttachMode::Single)
                .context("attaching")?;
            Ok(format!("cgroup/{at} at {at_name}"))
        }
    }
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
