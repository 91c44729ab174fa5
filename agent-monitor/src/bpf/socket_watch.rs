//! The `sys_enter_socket` watch: reports socket families the cgroup hooks never see (vsock,
//! packet…) for agents without `run`'s seccomp filter. Attaching any `syscalls/*` tracepoint sends
//! every syscall of every process on the host through the kernel's tracing slow path, so it is
//! attached only while such an agent can exist.

use std::fmt;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{TracePoint, links::FdLink},
};

use super::Kernel;
use super::pin::PinDir;

/// The program that reports socket families only `run`'s seccomp filter refuses, and its hook.
/// Not in `HOOKS`: it is loaded and pinned as a program at install, attached only while needed.
pub(super) const SOCKET_WATCH: &str = "agent_socket_syscall";
const SOCKET_WATCH_HOOK: (&str, &str) = ("syscalls", "sys_enter_socket");

/// Whether `sys_enter_socket` is watched, and why. `status` shows it as text (`Display`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketWatch {
    /// The kernel refused the program (this daemon's install or a previous daemon's): the watch
    /// cannot be turned on.
    Unavailable(String),
    /// Not attached. `was_on`: an earlier agent needed it and it has been detached since.
    Off { was_on: bool },
    /// Attached, for the reason given.
    On(String),
}

/// Before anything is loaded: not attached.
impl Default for SocketWatch {
    fn default() -> Self {
        SocketWatch::Off { was_on: false }
    }
}

impl SocketWatch {
    /// The watch as a previous daemon left it in the pin directory.
    pub(super) fn adopted(program_pinned: bool, link_pinned: bool) -> Self {
        match (program_pinned, link_pinned) {
            (false, _) => SocketWatch::Unavailable("the previous daemon could not load it".into()),
            (true, true) => SocketWatch::On("left attached by the previous daemon".into()),
            (true, false) => SocketWatch::Off { was_on: false },
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self, SocketWatch::On(_))
    }

    pub fn is_available(&self) -> bool {
        !matches!(self, SocketWatch::Unavailable(_))
    }
}

impl fmt::Display for SocketWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketWatch::Unavailable(why) => write!(f, "unavailable: {why}"),
            SocketWatch::Off { was_on: false } => {
                f.write_str("off: every agent so far runs under `run`'s seccomp filter")
            }
            SocketWatch::Off { was_on: true } => {
                f.write_str("off: every agent runs under `run`'s seccomp filter")
            }
            SocketWatch::On(why) => write!(f, "on: {why}"),
        }
    }
}

/// The entry `status` lists among what is attached while the watch is on.
pub(super) fn attached_entry() -> String {
    let (category, name) = SOCKET_WATCH_HOOK;
    format!("{SOCKET_WATCH} → tracepoint {category}/{name}")
}

/// Loads and pins the program (so a later daemon can attach it to these maps), unattached.
pub(super) fn load(ebpf: &mut Ebpf, pins: &PinDir) -> anyhow::Result<()> {
    let tp: &mut TracePoint = ebpf
        .program_mut(SOCKET_WATCH)
        .ok_or_else(|| anyhow!("program {SOCKET_WATCH} missing from the eBPF object"))?
        .try_into()?;
    tp.load().context("loading")?;
    tp.pin(pins.program(SOCKET_WATCH))
        .with_context(|| format!("pinning program {SOCKET_WATCH}"))
}

impl Kernel {
    /// Whether `sys_enter_socket` is watched, and why.
    pub fn socket_watch(&self) -> &SocketWatch {
        &self.mechanisms.socket_syscall_watch
    }

    /// Attaches (`Some(why)`) or detaches (`None`) the `sys_enter_socket` tracepoint that reports
    /// socket families the cgroup hooks never see (vsock, packet…) for agents without `run`'s
    /// seccomp filter. Attaching any `syscalls/*` tracepoint sends every syscall of every process
    /// on the host through the kernel's tracing slow path, so it is attached only while such an
    /// agent can exist. With pinning, the program is pinned at install and its link, while
    /// attached, is pinned too, so an adopting daemon finds the watch as it was and can change it.
    /// Idempotent; `why` is reported by `status` and the log.
    pub fn watch_socket_syscalls(&mut self, why: Option<&str>) -> anyhow::Result<()> {
        let entry = attached_entry();
        if !self.socket_watch().is_available() {
            if let Some(why) = why {
                tracing::warn!("cannot report other socket families ({why}): program refused");
            }
            return Ok(());
        }
        let pins = PinDir::new(&self.hooks.pin_root);
        let link_pin = pins.link(SOCKET_WATCH);
        let now = match (why, link_pin.exists()) {
            (Some(why), false) => {
                let (category, name) = SOCKET_WATCH_HOOK;
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
                SocketWatch::On(why.to_string())
            }
            (Some(why), true) => {
                if !self.mechanisms.attached.contains(&entry) {
                    self.mechanisms.attached.push(entry.clone());
                }
                SocketWatch::On(why.to_string())
            }
            (None, true) => {
                // The pin is the link's only holder: removing it detaches the program.
                std::fs::remove_file(&link_pin).with_context(|| format!("detaching {entry}"))?;
                self.mechanisms.attached.retain(|a| *a != entry);
                tracing::info!("detached {entry}: no agent without `run`'s filter");
                SocketWatch::Off { was_on: true }
            }
            (None, false) => SocketWatch::Off { was_on: false },
        };
        self.set_socket_watch(now);
        Ok(())
    }

    /// Records the watch's state (`status` shows its text).
    pub(super) fn set_socket_watch(&mut self, now: SocketWatch) {
        self.mechanisms.socket_syscall_watch = now;
    }
}

#[cfg(test)]
mod tests {
    use super::SocketWatch;

    #[test]
    fn status_carries_the_watch_as_its_text() {
        let m = crate::bpf::Mechanisms {
            socket_syscall_watch: SocketWatch::On("agent a has no `run` filter".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["socket_syscall_watch"], "on: agent a has no `run` filter");
    }

    #[test]
    fn status_shows_the_watch_as_before() {
        // `status` and the tests that read it see these texts.
        assert_eq!(
            SocketWatch::Off { was_on: false }.to_string(),
            "off: every agent so far runs under `run`'s seccomp filter"
        );
        assert_eq!(
            SocketWatch::Off { was_on: true }.to_string(),
            "off: every agent runs under `run`'s seccomp filter"
        );
        assert_eq!(
            SocketWatch::On("agents identified by [identity] selectors".into()).to_string(),
            "on: agents identified by [identity] selectors"
        );
        assert_eq!(
            SocketWatch::Unavailable("loading: EPERM".into()).to_string(),
            "unavailable: loading: EPERM"
        );
    }

    #[test]
    fn an_adopted_watch_is_what_the_pins_say() {
        let on = SocketWatch::adopted(true, true);
        assert!(on.is_on() && on.is_available());
        assert_eq!(on.to_string(), "on: left attached by the previous daemon");
        let off = SocketWatch::adopted(true, false);
        assert_eq!(off, SocketWatch::Off { was_on: false });
        assert!(!off.is_on() && off.is_available());
        // Without its program the watch cannot be attached, even if a link was left.
        for link in [false, true] {
            let gone = SocketWatch::adopted(false, link);
            assert!(!gone.is_available() && !gone.is_on());
            assert_eq!(
                gone.to_string(),
                "unavailable: the previous daemon could not load it"
            );
        }
    }
}
