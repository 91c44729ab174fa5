//! The AF_UNIX hooks read the kernel's `struct bpf_sock_addr_kern` at fixed offsets (the
//! sock_addr context exposes no field for a unix address): checked here against the kernel's
//! BTF before they are loaded, so a kernel with another layout gets no unix hook (reported as
//! refused) rather than one that misreads.
//!
//! They are attached only while a policy in force has a `[unix]` section (`Kernel::set_unix_hooks`),
//! where the other agent-socket hooks sit: below the agents' cgroup, or at the root while
//! selectors can make any process an agent.

use std::fmt;

use agent_monitor_common as common;
use anyhow::{Context as _, ensure};

use super::Kernel;
use super::hooks::{HOOKS, Scope, When};
use super::pin::PinDir;

/// Whether the unix-socket hooks are attached, and why. `status` shows it as text (`Display`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum UnixHooks {
    /// The kernel refused the programs (kernel < 6.7, or a context layout the programs do not
    /// read): `[unix]` sections are not enforced.
    Unavailable(String),
    /// Loaded, not attached: no policy in force has a `[unix]` section.
    #[default]
    Off,
    /// Attached (where: `status`'s list of attached programs), for the reason given.
    On(String),
}

impl UnixHooks {
    /// After this daemon's install (nothing attached yet): `refused`, the kernel's first refusal.
    pub(super) fn installed(refused: Option<String>) -> Self {
        match refused {
            Some(why) => UnixHooks::Unavailable(why),
            None => UnixHooks::Off,
        }
    }

    /// As a previous daemon of the same build left them in `pins`.
    pub(super) fn adopted(pins: &PinDir) -> Self {
        let hooks = || HOOKS.iter().filter(|h| h.when == When::UnixRules);
        if !hooks().any(|h| pins.program(h.program).exists()) {
            return UnixHooks::Unavailable(
                "the kernel refused them when the programs were installed".into(),
            );
        }
        if hooks().any(|h| pins.link(h.program).exists()) {
            return UnixHooks::On("left attached by the previous daemon".into());
        }
        UnixHooks::Off
    }

    pub fn is_available(&self) -> bool {
        !matches!(self, UnixHooks::Unavailable(_))
    }
}

impl fmt::Display for UnixHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixHooks::Unavailable(why) => write!(f, "unavailable: {why}"),
            UnixHooks::Off => f.write_str("off: no policy in force has a [unix] section"),
            UnixHooks::On(why) => write!(f, "on: {why}"),
        }
    }
}

impl Kernel {
    /// Attaches (`Some(why)`) or detaches (`None`) `cgroup/connect_unix` and
    /// `cgroup/sendmsg_unix`. Attached only while a policy in force has a `[unix]` section
    /// (or an agent that lost its policy may still run: it is refused everything): otherwise
    /// they would judge nothing, yet every socket below them (every socket on the host while
    /// selectors put them at the root) would run them. They sit where the other agent-socket
    /// hooks sit, and move with them. Idempotent; a no-op when the kernel refused them.
    pub fn set_unix_hooks(&mut self, why: Option<&str>) -> anyhow::Result<()> {
        if !self.mechanisms.unix_socket_hooks.is_available() {
            return Ok(());
        }
        let changed =
            self.hooks
                .attach_on_demand(When::UnixRules, why.is_some(), &mut self.mechanisms)?;
        let at = self
            .hooks
            .cgroups
            .scope_of(Scope::Agents, self.hooks.agent_hooks_host_wide)
            .display()
            .to_string();
        for program in changed {
            // A tracepoint is not below a cgroup: the hook table says where each one is.
            let at = HOOKS
                .iter()
                .find(|h| h.program == program)
                .map_or(at.clone(), |h| h.kind.at(std::path::Path::new(&at)));
            match why {
                Some(why) => tracing::info!("attached {program} → {at}: {why}"),
                None => {
                    tracing::info!("detached {program}: no policy in force has a [unix] section")
                }
            }
        }
        self.mechanisms.unix_socket_hooks = match why {
            Some(why) => UnixHooks::On(why.to_string()),
            None => UnixHooks::Off,
        };
        self.set_unix_peer_hooks()
    }

    /// Attaches the listener's-bound-name tracepoints while the unix hooks are on and selectors
    /// put the agent-socket hooks at the root, detaches them otherwise (`When::UnixPeer`).
    /// Called when either changes.
    pub(super) fn set_unix_peer_hooks(&mut self) -> anyhow::Result<()> {
        let on = matches!(self.mechanisms.unix_socket_hooks, UnixHooks::On(_))
            && self.hooks.agent_hooks_host_wide;
        for program in self
            .hooks
            .attach_on_demand(When::UnixPeer, on, &mut self.mechanisms)?
        {
            match on {
                true => tracing::info!(
                    "attached {program}: a policy has [unix] and selectors can make agents \
                     without run's supervisor"
                ),
                false => tracing::info!(
                    "detached {program}: no [unix] section, or no selector (every agent is \
                     run's, judged on the resolved socket)"
                ),
            }
        }
        Ok(())
    }
}

impl Kernel {
    /// Writes where the peer tracepoint finds a connect's listener's bound name; `enabled` = 0
    /// leaves unix connects judged by name only.
    pub fn set_unix_peer_layout(&mut self, layout: &common::UnixPeerLayout) -> anyhow::Result<()> {
        Ok(self.tables.unix_peer.set_layout(layout)?)
    }
}

/// Fails unless `uaddr` and `uaddrlen` of `bpf_sock_addr_kern` sit where the program reads them.
pub(super) fn check_context_layout() -> anyhow::Result<()> {
    let btf = crate::btf::Btf::from_sys_fs()
        .context("the unix-socket hooks need the kernel's BTF to check their context layout")?;
    for (member, want) in [
        ("uaddr", common::SOCK_ADDR_KERN_UADDR),
        ("uaddrlen", common::SOCK_ADDR_KERN_UADDRLEN),
    ] {
        let got = btf
            .member_offset("bpf_sock_addr_kern", member)
            .with_context(|| format!("bpf_sock_addr_kern.{member} (kernel < 6.7?)"))?;
        ensure!(
            got == want,
            "bpf_sock_addr_kern.{member} is at byte {got} on this kernel; the unix-socket hooks \
             read it at {want}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{PinDir, UnixHooks};

    #[test]
    fn status_shows_the_unix_hooks_as_text() {
        let m = crate::bpf::Mechanisms {
            unix_socket_hooks: UnixHooks::On("[unix] sections of a".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["unix_socket_hooks"], "on: [unix] sections of a");
        assert_eq!(
            UnixHooks::default().to_string(),
            "off: no policy in force has a [unix] section"
        );
        let refused = UnixHooks::installed(Some("agent_connect_unix: loading: EINVAL".into()));
        assert!(!refused.is_available());
        assert_eq!(
            refused.to_string(),
            "unavailable: agent_connect_unix: loading: EINVAL"
        );
        assert_eq!(UnixHooks::installed(None), UnixHooks::Off);
    }

    /// A plain directory stands in for bpffs: the pins are files either way.
    #[test]
    fn adopted_unix_hooks_are_what_the_pins_say() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pins = PinDir::new(tmp.path());
        let _lock = pins.create_and_lock().expect("lock");
        assert!(
            !UnixHooks::adopted(&pins).is_available(),
            "no program pinned"
        );
        std::fs::write(pins.program("agent_connect_unix"), b"").unwrap();
        std::fs::write(pins.program("agent_sendmsg_unix"), b"").unwrap();
        assert_eq!(UnixHooks::adopted(&pins), UnixHooks::Off);
        std::fs::write(pins.link("agent_connect_unix"), b"").unwrap();
        assert_eq!(
            UnixHooks::adopted(&pins).to_string(),
            "on: left attached by the previous daemon"
        );
    }
}
