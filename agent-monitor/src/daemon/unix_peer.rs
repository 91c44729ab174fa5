//! Unix connects judged on their listener's bound name (`syscalls/sys_exit_connect`): the
//! layout the kernel program needs, written at start, and its records turned into actions.

use super::*;
use crate::action::UnixTarget;

impl Monitor {
    pub(super) fn unix_peer_action(&mut self, u: &event::UnixPeerEvent) -> Action {
        let c = &u.connect;
        let (agent, task) = self.identity(&c.subject);
        let bound = u.bound.clone();
        let why = self.explain(&agent, c.verdict, c.subject.ktime_ns, move |p| {
            p.check_unix(&bound)
        });
        let exe = self.ident.exe(c.subject.pid).map(str::to_string);
        let object = Object::Unix(UnixTarget {
            path: c.name.clone(),
            send: c.send,
            sock_type: super::unix::unix_sock_type(c.sock_type),
        });
        Action {
            exe,
            enforcement: (c.verdict == Verdict::Denied).then_some("sigkill"),
            reason: peer_reason(&c.name, &u.bound, c.send, &why),
            ..self.action(&c.subject, agent, task, object, c.verdict)
        }
    }
}

/// The report's reason: the name given, where it led, and why that name is not allowed.
fn peer_reason(given: &str, bound: &str, send: bool, why: &str) -> String {
    let when = match send {
        false => "the name its listener bound, judged as the connect returned",
        true => "the name its receiver bound, judged after the datagram was delivered",
    };
    format!("{given} led to {bound} ({when}): {why}")
}

/// Writes the layout the peer tracepoint follows, from the running kernel's BTF. Without it (a
/// kernel whose BTF lacks a member): one line in the log, and unix connects stay judged by the
/// name given only.
pub(super) fn install_unix_peer_layout(kernel: &mut Kernel) {
    let layout = match crate::unix_peer::running_kernel_layout() {
        Ok(layout) => layout,
        Err(e) => {
            tracing::warn!(
                "unix connects are judged by the name given only, not by their listener's \
                 bound name: {e:#}"
            );
            agent_monitor_common::UnixPeerLayout::default()
        }
    };
    if let Err(e) = kernel.set_unix_peer_layout(&layout) {
        tracing::error!("unix peer layout: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reason_names_the_name_given_and_where_it_led() {
        let why = "/run/docker.sock is on the built-in list";
        let r = super::peer_reason("/tmp/ok.sock", "/run/docker.sock", false, why);
        assert!(r.starts_with("/tmp/ok.sock led to /run/docker.sock"), "{r}");
        assert!(r.contains("listener") && r.ends_with(why), "{r}");
        let r = super::peer_reason("/tmp/d", "/run/systemd/notify", true, why);
        assert!(r.contains("after the datagram was delivered"), "{r}");
    }
}
