//! DNS-aware allowlists, userspace half: a DNS proxy per agent on loopback (the kernel redirects
//! the agent's port-53 traffic to it), which judges the name asked against the agent's host rules,
//! forwards allowed queries upstream, and has the monitor install the answer's addresses into the
//! agent's kernel allowlist before the reply goes back.

pub mod learned;
pub mod message;
pub mod proxy;
pub mod scope;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use agent_monitor_common::PortRange;
use tokio::sync::oneshot;

/// What the proxy tells the monitor about one query.
#[derive(Debug)]
pub struct QueryReport {
    /// Kernel index of the agent whose endpoint received the query.
    pub agent: u32,
    /// Normalised name asked (empty when the message was unreadable).
    pub name: String,
    pub qtype: String,
    /// "udp" or "tcp".
    pub transport: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug)]
pub enum Outcome {
    /// Enforce mode, name not allowed: answered REFUSED, nothing forwarded.
    Refused { reason: String },
    /// More queries of this agent in flight than the proxy serves at once: SERVFAIL, not judged.
    Overloaded,
    /// The message could not be judged (unreadable, several questions, …): not forwarded.
    Malformed { reason: String },
    /// Upstream did not answer usably: the agent got SERVFAIL. `allowed` is the name's verdict.
    UpstreamFailed { allowed: bool, reason: String },
    /// Forwarded and answered. For an allowed name, `addrs` must be installed before the reply is
    /// sent: the monitor answers on `installed`, with the addresses to take out of the reply.
    Answered {
        allowed: bool,
        reason: String,
        rcode: String,
        addrs: Vec<(IpAddr, u32)>,
        cnames: Vec<String>,
        ports: Vec<PortRange>,
        installed: Option<oneshot::Sender<Result<Installed, InstallError>>>,
    },
    /// Ask mode, name off the list: the query is held until a decision (`docs/ask.md`). The
    /// monitor answers `reply` with the ports the name's addresses become reachable on when it is
    /// approved, `None` when it is denied (then the proxy refuses it as in enforce mode).
    Ask {
        reply: oneshot::Sender<Option<Vec<PortRange>>>,
    },
}

/// What the monitor did with an allowed answer's addresses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Addresses the agent may not reach (not learned: non-public without the policy's opt-in, or
    /// over the agent's limit), to be taken out of the reply (enforce mode; empty in alert mode).
    pub strip: Vec<IpAddr>,
    /// Some were over the agent's learned-address limit: if nothing is left, the reply is
    /// SERVFAIL (try again later) rather than REFUSED.
    pub limit_reached: bool,
}

/// Why an allowed answer's addresses could not be put in the agent's kernel allowlist (the agent
/// gets SERVFAIL).
#[derive(Clone, Debug, thiserror::Error)]
pub enum InstallError {
    #[error("the agent has no policy any more")]
    NoPolicy,
    /// The kernel map write failed; the error is shared with the proxy that waits for it.
    #[error("{0:#}")]
    Kernel(std::sync::Arc<anyhow::Error>),
}

/// Why an answer's address was withheld from an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Withheld {
    /// Loopback, link-local, private, … for a name without a `dns.private_answers` opt-in.
    NonPublic,
    /// The agent holds its `dns.max_learned` addresses already.
    Limit,
}

impl Withheld {
    /// The `WITHHELD` journald field and the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Withheld::NonPublic => "non-public",
            Withheld::Limit => "limit",
        }
    }
}

/// Minimum time between two withheld-address notices of one agent and kind: an agent that asks
/// in a loop must not flood journald. Every address is still counted (status, metrics), every
/// query still has its own `ACTION=dns` entry, and the next notice says how many went unsaid.
pub const NOTICE_INTERVAL_NS: u64 = 10_000_000_000;

/// Rate limit of withheld-address notices, per (agent, kind).
#[derive(Default)]
pub struct NoticeGate {
    last: std::collections::HashMap<(String, Withheld), (u64, u64)>,
}

impl NoticeGate {
    /// `Some(n)`: send a notice now; `n` earlier occurrences had none. `None`: counted only.
    pub fn admit(&mut self, agent: &str, kind: Withheld, now_ns: u64) -> Option<u64> {
        let (last, unsaid) = self.last.entry((agent.to_string(), kind)).or_insert((0, 0));
        if *last != 0 && now_ns.saturating_sub(*last) < NOTICE_INTERVAL_NS {
            *unsaid += 1;
            return None;
        }
        *last = now_ns.max(1);
        Some(std::mem::take(unsaid))
    }
}

/// At most 16 addresses, then how many more: an answer of thousands stays a readable line.
pub fn brief_list(addrs: impl IntoIterator<Item = String>) -> String {
    const SHOWN: usize = 16;
    let all: Vec<String> = addrs.into_iter().collect();
    let mut out = all
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > SHOWN {
        out.push_str(&format!(", … {} more", all.len() - SHOWN));
    }
    out
}

/// The upstream named by the first `nameserver` line of a resolv.conf, port 53.
pub fn upstream_from_resolv_conf(path: &Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    first_nameserver(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no usable `nameserver` line; pass --dns-upstream ADDR:PORT",
            path.display()
        )
    })
}

fn first_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        // A scoped IPv6 address (fe80::1%eth0) cannot be written as a SocketAddr: skipped.
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_rate_limited_per_agent_and_kind_and_count_what_went_unsaid() {
        let mut g = NoticeGate::default();
        let s = NOTICE_INTERVAL_NS;
        assert_eq!(g.admit("a", Withheld::Limit, 5), Some(0));
        assert_eq!(g.admit("a", Withheld::Limit, 6), None);
        assert_eq!(g.admit("a", Withheld::Limit, 7), None);
        assert_eq!(g.admit("a", Withheld::NonPublic, 7), Some(0));
        assert_eq!(g.admit("b", Withheld::Limit, 7), Some(0));
        assert_eq!(g.admit("a", Withheld::Limit, 5 + s), Some(2));
        assert_eq!(g.admit("a", Withheld::Limit, 6 + s), None);
    }

    #[test]
    fn brief_lists_stay_short() {
        let l = brief_list((0..20).map(|i| i.to_string()));
        assert!(l.ends_with("15, … 4 more"), "{l}");
        assert_eq!(brief_list(["a".to_string()]), "a");
    }

    #[test]
    fn first_usable_nameserver() {
        let text = "# generated\nsearch example.com\nnameserver fe80::1%eth0\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            first_nameserver(text),
            Some("10.255.255.53:53".parse().expect("addr"))
        );
        assert_eq!(
            first_nameserver("nameserver ::1\n"),
            Some("[::1]:53".parse().expect("addr"))
        );
        assert_eq!(first_nameserver("options ndots:1\n"), None);
    }
}
