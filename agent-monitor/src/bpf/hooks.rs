//! Where each kernel program attaches and how: the hook table, attaching through pinned
//! bpf_links, and moving the agent-socket hooks between the agents' cgroup and the root.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockAddrAttachType, CgroupSockAttachType, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};

use super::load::{LinkState, Mechanisms};
use super::pin::PinDir;

/// The two cgroups a hook can be attached to.
#[derive(Clone)]
pub struct HookCgroups {
    /// The cgroup v2 root: every process on the host.
    pub root: PathBuf,
    /// `<root>/agent-monitor`: every process `run` places (an agent) and nothing else.
    pub agents: PathBuf,
}

pub(super) struct Hook {
    pub(super) program: &'static str,
    pub(super) kind: HookKind,
    /// The daemon cannot do its job without it.
    pub(super) required: bool,
    pub(super) scope: Scope,
}

/// Which processes a hook must see.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Scope {
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
pub(super) enum HookKind {
    Tracepoint(&'static str, &'static str),
    RawTracepoint(&'static str),
    CgroupSockAddr(&'static str, CgroupSockAddrAttachType),
    CgroupSock(&'static str, CgroupSockAttachType),
    CgroupSkb(&'static str, CgroupSkbAttachType),
}

pub(super) const HOOKS: &[Hook] = &[
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
    }, // AF_UNIX connects and datagram sends (Linux 6.7; an older kernel refuses them and unix
    // sockets stay unjudged, shown in `status`). At the root, like the inet address hooks: the
    // kernel runs the programs of the socket's cgroup. See docs/unix-sockets.md.
    Hook {
        program: "agent_connect_unix",
        kind: HookKind::CgroupSockAddr("connect_unix", CgroupSockAddrAttachType::UnixConnect),
        required: false,
        scope: Scope::Host,
    },
    Hook {
        program: "agent_sendmsg_unix",
        kind: HookKind::CgroupSockAddr("sendmsg_unix", CgroupSockAddrAttachType::UnixSendMsg),
        required: false,
        scope: Scope::Host,
    },
];

/// Where the cgroup hooks are now: the pin directory holding their programs and links, the two
/// cgroups they can sit in, and which one the agent-socket hooks use.
pub(super) struct HookPlacement {
    pub(super) pin_root: PathBuf,
    pub(super) cgroups: HookCgroups,
    /// The agent-socket hooks (`Scope::Agents`) sit at the root now (see `scope_agent_hooks`).
    pub(super) agent_hooks_host_wide: bool,
}

impl HookPlacement {
    /// Moves the agent-socket hooks (`Scope::Agents`) to the cgroup root (`host_wide`) or below
    /// the agents' cgroup. Each program gets its new link before the old one goes (the pin is
    /// replaced by a rename), so no socket of an agent passes unjudged meanwhile. Idempotent.
    /// Returns whether anything moved.
    pub(super) fn scope_agent_hooks(
        &mut self,
        host_wide: bool,
        mechanisms: &mut Mechanisms,
    ) -> anyhow::Result<bool> {
        if self.agent_hooks_host_wide == host_wide {
            return Ok(false);
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
            for a in &mut mechanisms.attached {
                if a.starts_with(&format!("{} → ", hook.program)) {
                    *a = format!("{} → {new}", hook.program);
                }
            }
            if let Some(l) = mechanisms
                .links
                .iter_mut()
                .find(|l| l.program == hook.program)
            {
                *l = state;
            }
            tracing::info!("moved {} from {old} to {new}", hook.program);
        }
        self.agent_hooks_host_wide = host_wide;
        Ok(true)
    }
}

impl HookKind {
    /// The hook as `status` shows it; `cgroup` is where a cgroup hook is attached.
    pub(super) fn at(&self, cgroup: &Path) -> String {
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
    pub(super) fn scope_of(&self, scope: Scope, agent_hooks_host_wide: bool) -> &Path {
        match scope {
            Scope::Agents if !agent_hooks_host_wide => &self.agents,
            _ => &self.root,
        }
    }
}

pub(super) fn adopt_link(pins: &PinDir, program: &str) -> anyhow::Result<LinkState> {
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

pub(super) fn attach(
    ebpf: &mut Ebpf,
    hook: &Hook,
    cgroup: &Path,
    pins: &PinDir,
) -> anyhow::Result<LinkState> {
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
            pin_if_movable(hook, pins, |at| p.pin(at))?;
            attach_cgroup_sock(p, cgroup)?
        }
        HookKind::CgroupSockAddr(_, attach_type) => {
            if matches!(
                attach_type,
                CgroupSockAddrAttachType::UnixConnect | CgroupSockAddrAttachType::UnixSendMsg
            ) {
                super::unix_hooks::check_context_layout()?;
            }
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load().context("loading")?;
            pin_if_movable(hook, pins, |at| p.pin(at))?;
            attach_cgroup_sock_addr(p, cgroup)?
        }
        HookKind::CgroupSkb(_, attach_type) => {
            let p: &mut CgroupSkb = prog.try_into()?;
            p.load().context("loading")?;
            pin_if_movable(hook, pins, |at| p.pin(at))?;
            attach_cgroup_skb(p, cgroup, attach_type)?
        }
    };
    pin_link(link, hook.program, &pins.link(hook.program))
}

/// Pins an agent-socket hook's program, so that a later daemon can move it (`scope_agent_hooks`).
fn pin_if_movable(
    hook: &Hook,
    pins: &PinDir,
    pin: impl FnOnce(PathBuf) -> Result<(), PinError>,
) -> anyhow::Result<()> {
    if hook.scope == Scope::Agents {
        pin(pins.program(hook.program))
            .with_context(|| format!("pinning program {}", hook.program))?;
    }
    Ok(())
}

fn open_cgroup(cgroup: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))
}

// With a bpf_link (kernel >= 5.7) the kernel always attaches as "multi" and rejects any flag,
// so the mode must be Single (0) here; other programs on the same cgroup still run.

pub(super) fn attach_cgroup_sock(p: &mut CgroupSock, cgroup: &Path) -> anyhow::Result<FdLink> {
    let id = p.attach(open_cgroup(cgroup)?, CgroupAttachMode::Single);
    pinnable(p.take_link(id.context("attaching")?)?)
}

fn attach_cgroup_sock_addr(p: &mut CgroupSockAddr, cgroup: &Path) -> anyhow::Result<FdLink> {
    let id = p.attach(open_cgroup(cgroup)?, CgroupAttachMode::Single);
    pinnable(p.take_link(id.context("attaching")?)?)
}

fn attach_cgroup_skb(
    p: &mut CgroupSkb,
    cgroup: &Path,
    attach_type: CgroupSkbAttachType,
) -> anyhow::Result<FdLink> {
    let id = p.attach(open_cgroup(cgroup)?, attach_type, CgroupAttachMode::Single);
    pinnable(p.take_link(id.context("attaching")?)?)
}

/// A cgroup attachment as a bpf_link: the only kind that can be pinned.
fn pinnable<L>(link: L) -> anyhow::Result<FdLink>
where
    L: TryInto<FdLink>,
    L::Error: std::error::Error + Send + Sync + 'static,
{
    link.try_into()
        .context("the kernel gave a legacy attachment, not a bpf_link: it cannot be pinned")
}

/// Pins `link` at `path` and returns what `status` reports of it.
pub(super) fn pin_link(link: FdLink, program: &str, path: &Path) -> anyhow::Result<LinkState> {
    let info = link.info().context("reading the new link")?;
    link.pin(path)
        .with_context(|| format!("pinning link {}", path.display()))?;
    Ok(LinkState {
        program: program.to_string(),
        link_id: info.id(),
        program_id: info.program_id(),
    })
}
