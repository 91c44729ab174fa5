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
    pub(super) when: When,
}

/// When a hook is attached.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum When {
    /// From install on, for the life of the pins.
    Always,
    /// Only while a policy in force has a `[unix]` section (`Kernel::set_unix_hooks`): without
    /// one the program would judge nothing, yet every socket below it would run it. Loaded and
    /// pinned as a program at install, so a refusal shows at start and a later daemon can attach
    /// it to these maps.
    UnixRules,
    /// While the unix hooks are attached (`UnixRules`) **and** selectors put the agent-socket
    /// hooks at the root (`Kernel::set_unix_peer_hooks`): the listener's-bound-name tracepoints
    /// run for every process on the host, so they are attached only when agents without `run`'s
    /// supervisor (selector agents) can exist. Without selectors every agent is `run`'s, whose
    /// connector judges the resolved socket and whose processes outside pay nothing.
    UnixPeer,
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
        when: When::Always,
    },
    Hook {
        program: "agent_connect4",
        kind: HookKind::CgroupSockAddr("connect4", CgroupSockAddrAttachType::Connect4),
        required: true,
        scope: Scope::Host,
        when: When::Always,
    },
    Hook {
        program: "agent_connect6",
        kind: HookKind::CgroupSockAddr("connect6", CgroupSockAddrAttachType::Connect6),
        required: true,
        scope: Scope::Host,
        when: When::Always,
    },
    // DNS redirection: sendmsg (below) rewrites an agent's datagrams to port 53; without recvmsg
    // its resolver would reject replies from the proxy's address.
    Hook {
        program: "agent_recvmsg4",
        kind: HookKind::CgroupSockAddr("recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4),
        required: true,
        scope: Scope::Agents,
        when: When::Always,
    },
    Hook {
        program: "agent_recvmsg6",
        kind: HookKind::CgroupSockAddr("recvmsg6", CgroupSockAddrAttachType::UDPRecvMsg6),
        required: true,
        scope: Scope::Agents,
        when: When::Always,
    },
    // Only getpeername() on a redirected connected socket would show the proxy without these.
    Hook {
        program: "agent_getpeername4",
        kind: HookKind::CgroupSockAddr("getpeername4", CgroupSockAddrAttachType::GetPeerName4),
        required: false,
        scope: Scope::Agents,
        when: When::Always,
    },
    Hook {
        program: "agent_getpeername6",
        kind: HookKind::CgroupSockAddr("getpeername6", CgroupSockAddrAttachType::GetPeerName6),
        required: false,
        scope: Scope::Agents,
        when: When::Always,
    },
    Hook {
        program: "agent_sendmsg4",
        kind: HookKind::CgroupSockAddr("sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4),
        required: true,
        scope: Scope::Host,
        when: When::Always,
    },
    Hook {
        program: "agent_sendmsg6",
        kind: HookKind::CgroupSockAddr("sendmsg6", CgroupSockAddrAttachType::UDPSendMsg6),
        required: true,
        scope: Scope::Host,
        when: When::Always,
    },
    Hook {
        program: "agent_sock_create",
        kind: HookKind::CgroupSock("sock_create", CgroupSockAttachType::SockCreate),
        required: true,
        scope: Scope::Agents,
        when: When::Always,
    },
    // Source routes (IPv4 options, IPv6 routing headers) send a packet to its first hop rather
    // than the address the hooks above judged: dropped for agents' sockets.
    Hook {
        program: "agent_egress",
        kind: HookKind::CgroupSkb("egress", CgroupSkbAttachType::Egress),
        required: true,
        scope: Scope::Agents,
        when: When::Always,
    },
    Hook {
        program: "agent_fork",
        kind: HookKind::Tracepoint("sched", "sched_process_fork"),
        required: false,
        scope: Scope::Host,
        when: When::Always,
    },
    Hook {
        program: "agent_newtask",
        kind: HookKind::Tracepoint("task", "task_newtask"),
        required: false,
        scope: Scope::Host,
        when: When::Always,
    },
    Hook {
        program: "agent_exit",
        kind: HookKind::Tracepoint("sched", "sched_process_exit"),
        required: false,
        scope: Scope::Host,
        when: When::Always,
    }, // AF_UNIX connects and datagram sends (Linux 6.7; an older kernel refuses them and unix
    // sockets stay unjudged, shown in `status`). The kernel runs the programs of the socket's
    // cgroup: below the agents' cgroup they see the sockets agents create, and no other process
    // runs them (selectors move them to the root with the other agent-socket hooks). Attached
    // only while a policy in force has a `[unix]` section. See docs/unix-sockets.md.
    Hook {
        program: "agent_connect_unix",
        kind: HookKind::CgroupSockAddr("connect_unix", CgroupSockAddrAttachType::UnixConnect),
        required: false,
        scope: Scope::Agents,
        when: When::UnixRules,
    },
    Hook {
        program: "agent_sendmsg_unix",
        kind: HookKind::CgroupSockAddr("sendmsg_unix", CgroupSockAddrAttachType::UnixSendMsg),
        required: false,
        scope: Scope::Agents,
        when: When::UnixRules,
    },
    // The listener's bound name of each unix connect the hook above allowed by name, judged as
    // connect() returns (`agent-monitor-ebpf/src/unix_peer.rs`). A `syscalls/*` tracepoint
    // sends every syscall through the tracing slow path (see `socket_watch.rs`), and this one
    // runs on every connect() on the host: attached only while a policy has `[unix]` and
    // selectors exist (`When::UnixPeer`).
    Hook {
        program: "agent_unix_peer",
        kind: HookKind::Tracepoint("syscalls", "sys_exit_connect"),
        required: false,
        scope: Scope::Host,
        when: When::UnixPeer,
    },
    // The same for a connect io_uring issued inline in the caller's thread, which returns
    // through io_uring_enter, not connect(); only io_uring_enter calls run it.
    Hook {
        program: "agent_unix_uring",
        kind: HookKind::Tracepoint("syscalls", "sys_exit_io_uring_enter"),
        required: false,
        scope: Scope::Host,
        when: When::UnixPeer,
    },
    // The receiver's bound name of each named datagram send the hook allowed by name, judged at
    // delivery (Linux 6.6). Fires for every socket that gets data on the host (a non-unix one
    // returns after one read of the record): attached only while a policy has `[unix]` and
    // selectors exist (`When::UnixPeer`).
    Hook {
        program: "agent_unix_datagram",
        kind: HookKind::Tracepoint("sock", "sk_data_ready"),
        required: false,
        scope: Scope::Host,
        when: When::UnixPeer,
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
            let link = attach_pinned(&pins, hook, &to)
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

impl HookPlacement {
    /// Attaches (`on`) or detaches the hooks attached only `when` something needs them, where
    /// the agent-socket hooks sit now; a hook the kernel refused at install (no pinned program)
    /// is left out. Attaching pins the new link; detaching removes the pin, its only holder.
    /// Idempotent. Returns the programs that changed.
    pub(super) fn attach_on_demand(
        &mut self,
        when: When,
        on: bool,
        mechanisms: &mut Mechanisms,
    ) -> anyhow::Result<Vec<&'static str>> {
        let pins = PinDir::new(&self.pin_root);
        let mut changed = Vec::new();
        for hook in HOOKS.iter().filter(|h| h.when == when) {
            let pinned = pins.link(hook.program);
            if !pins.program(hook.program).exists() || pinned.exists() == on {
                continue;
            }
            let at = self
                .cgroups
                .scope_of(hook.scope, self.agent_hooks_host_wide)
                .to_path_buf();
            let entry = format!("{} → {}", hook.program, hook.kind.at(&at));
            if on {
                let link = attach_pinned(&pins, hook, &at)
                    .with_context(|| format!("attaching {entry}"))?;
                mechanisms
                    .links
                    .push(pin_link(link, hook.program, &pinned)?);
                mechanisms.attached.push(entry);
            } else {
                std::fs::remove_file(&pinned).with_context(|| format!("detaching {entry}"))?;
                mechanisms.links.retain(|l| l.program != hook.program);
                let prefix = format!("{} → ", hook.program);
                mechanisms.attached.retain(|a| !a.starts_with(&prefix));
            }
            changed.push(hook.program);
        }
        Ok(changed)
    }
}

/// Attaches the pinned program of `hook` to `cgroup` (a move, or an on-demand hook).
fn attach_pinned(pins: &PinDir, hook: &Hook, cgroup: &Path) -> anyhow::Result<FdLink> {
    let program = pins.program(hook.program);
    let opening = || format!("opening pinned program {}", program.display());
    match hook.kind {
        HookKind::CgroupSock(_, attach_type) => {
            let mut p = CgroupSock::from_pin(&program, attach_type).with_context(opening)?;
            attach_cgroup_sock(&mut p, cgroup)
        }
        HookKind::CgroupSockAddr(_, attach_type) => {
            let mut p = CgroupSockAddr::from_pin(&program, attach_type).with_context(opening)?;
            attach_cgroup_sock_addr(&mut p, cgroup)
        }
        HookKind::CgroupSkb(_, attach_type) => {
            let mut p = CgroupSkb::from_pin(&program, attach_type).with_context(opening)?;
            attach_cgroup_skb(&mut p, cgroup, attach_type)
        }
        HookKind::Tracepoint(category, name) if hook.when != When::Always => {
            let mut tp = TracePoint::from_pin(&program).with_context(opening)?;
            let id = tp.attach(category, name).context("attaching")?;
            tp.take_link(id)?.try_into().context(
                "the kernel gave a perf link, not a bpf_link (kernel < 5.15?): it cannot be pinned",
            )
        }
        HookKind::Tracepoint(..) | HookKind::RawTracepoint(_) => Err(anyhow!(
            "{} is not a cgroup hook: it has no pinned program to attach",
            hook.program
        )),
    }
}

/// What the hook table decides about each program (its name, hook, placement and when it is
/// attached), folded into the object hash: a daemon whose table differs treats the pins as
/// another build's and replaces them, rather than adopting links that sit where it would not
/// put them or programs it cannot move (unpinned).
pub(super) fn table_fingerprint() -> Vec<u64> {
    HOOKS
        .iter()
        .map(|h| {
            let text = format!(
                "{} {} {} {:?} {}",
                h.program,
                h.kind.at(Path::new("")),
                h.required,
                h.when,
                h.scope == Scope::Agents
            );
            super::pin::object_hash(text.as_bytes(), &[])
        })
        .collect()
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
            let p = load_cgroup_sock_addr(prog, hook, attach_type, pins)?;
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

/// Loads and pins the program of an on-demand hook (`When` other than `Always`) without
/// attaching it: `attach_on_demand` attaches it when it is needed.
pub(super) fn load_unattached(ebpf: &mut Ebpf, hook: &Hook, pins: &PinDir) -> anyhow::Result<()> {
    let prog = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
    match hook.kind {
        HookKind::CgroupSockAddr(_, attach_type) => {
            load_cgroup_sock_addr(prog, hook, attach_type, pins).map(|_| ())
        }
        HookKind::Tracepoint(..) => {
            let tp: &mut TracePoint = prog.try_into()?;
            tp.load().context("loading")?;
            pin_if_movable(hook, pins, |at| tp.pin(at))
        }
        _ => Err(anyhow!(
            "{}: only cgroup sock_addr hooks and tracepoints can be attached on demand",
            hook.program
        )),
    }
}

fn load_cgroup_sock_addr<'p>(
    prog: &'p mut aya::programs::Program,
    hook: &Hook,
    attach_type: CgroupSockAddrAttachType,
    pins: &PinDir,
) -> anyhow::Result<&'p mut CgroupSockAddr> {
    if matches!(
        attach_type,
        CgroupSockAddrAttachType::UnixConnect | CgroupSockAddrAttachType::UnixSendMsg
    ) {
        super::unix_hooks::check_context_layout()?;
    }
    let p: &mut CgroupSockAddr = prog.try_into()?;
    p.load().context("loading")?;
    pin_if_movable(hook, pins, |at| p.pin(at))?;
    Ok(p)
}

/// Pins an agent-socket hook's program, so that a later daemon can move it (`scope_agent_hooks`),
/// and an on-demand hook's, so that it can be attached later (`attach_on_demand`).
fn pin_if_movable(
    hook: &Hook,
    pins: &PinDir,
    pin: impl FnOnce(PathBuf) -> Result<(), PinError>,
) -> anyhow::Result<()> {
    if hook.scope == Scope::Agents || hook.when != When::Always {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_hooks_are_movable_cgroup_hooks() {
        // `attach_on_demand` attaches from a pinned program where the agent-socket hooks sit;
        // an on-demand tracepoint sits on the host (it is not a cgroup hook: nothing to move).
        for hook in HOOKS.iter().filter(|h| h.when != When::Always) {
            assert!(!hook.required, "{}", hook.program);
            match hook.kind {
                HookKind::CgroupSockAddr(..) => {
                    assert!(hook.scope == Scope::Agents, "{}", hook.program)
                }
                HookKind::Tracepoint(..) => assert!(hook.scope == Scope::Host, "{}", hook.program),
                _ => panic!("{} cannot be attached on demand", hook.program),
            }
        }
        assert_eq!(
            HOOKS
                .iter()
                .filter(
                    |h| h.when == When::UnixRules && matches!(h.kind, HookKind::CgroupSockAddr(..))
                )
                .count(),
            2
        );
        assert!(
            HOOKS
                .iter()
                .any(|h| h.program == "agent_unix_peer" && h.when == When::UnixPeer)
        );
    }

    #[test]
    fn the_fingerprint_names_every_hook_and_its_placement() {
        let print = table_fingerprint();
        assert_eq!(print.len(), HOOKS.len());
        assert_eq!(print, table_fingerprint());
        let distinct: std::collections::BTreeSet<u64> = print.iter().copied().collect();
        assert_eq!(distinct.len(), print.len());
    }
}
