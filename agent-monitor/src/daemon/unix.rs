//! Unix connect records to actions: who did it and which socket, and why it was judged so.

use super::*;
use crate::action::UnixTarget;

impl Monitor {
    /// Says loudly when policies have `[unix]` sections that this kernel does not enforce (the
    /// unix hooks need Linux 6.7 and were refused or are not attached): they would read as if
    /// they did.
    pub(super) fn warn_unenforced_unix(&self) {
        let attached = self
            .kernel
            .mechanisms
            .links
            .iter()
            .any(|l| l.program == "agent_connect_unix");
        let with_unix: Vec<&str> = self
            .generations
            .live()
            .iter()
            .filter(|p| p.unix().is_some())
            .map(|p| p.agent())
            .collect();
        if !attached && !with_unix.is_empty() {
            tracing::error!(
                agents = with_unix.join(", "),
                "[unix] sections are NOT enforced: the unix-socket hooks (cgroup/connect_unix, \
                 Linux 6.7) are not attached on this kernel (see the refused programs above)"
            );
        }
    }

    pub(super) fn unix_action(&mut self, u: &event::UnixEvent) -> Action {
        let (agent, task) = self.identity(&u.subject);
        let mut reason = if u.rule == common::UNIX_RULE_IO_THREAD {
            "an io_uring worker thread of the agent made this connect: it never returns through \
             connect(), where the socket's listener would be judged, so a pathname connect by one \
             is refused for agents with [unix] (docs/unix-sockets.md)"
                .to_string()
        } else if u.name.is_empty() {
            "the socket's name could not be read in the kernel: nothing matches".to_string()
        } else {
            let name = u.name.clone();
            self.explain(&agent, u.verdict, u.subject.ktime_ns, move |p| {
                p.check_unix(&name)
            })
        };
        reason.push_str(" (judged on the name as given, before the kernel resolves it)");
        let exe = self.ident.exe(u.subject.pid).map(str::to_string);
        let object = Object::Unix(UnixTarget {
            path: u.name.clone(),
            send: u.send,
            sock_type: unix_sock_type(u.sock_type),
        });
        Action {
            exe,
            enforcement: (u.verdict == Verdict::Denied).then_some("eperm"),
            reason,
            ..self.action(&u.subject, agent, task, object, u.verdict)
        }
    }
}

/// A unix socket's type as reports name it.
pub(super) fn unix_sock_type(sock_type: u32) -> &'static str {
    match sock_type & 0xf {
        1 => "stream",
        2 => "dgram",
        5 => "seqpacket",
        _ => "other",
    }
}
