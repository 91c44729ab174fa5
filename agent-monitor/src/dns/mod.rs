//! DNS-aware allowlists, userspace half: a DNS proxy per agent on loopback (the kernel redirects
//! the agent's port-53 traffic to it), which judges the name asked against the agent's host rules,
//! forwards allowed queries upstream, and has the monitor install the answer's addresses into the
//! agent's kernel allowlist before the reply goes back.

pub mod learned;
pub mod message;
pub mod proxy;

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
    /// sent: the monitor answers on `installed`.
    Answered {
        allowed: bool,
        reason: String,
        rcode: String,
        addrs: Vec<(IpAddr, u32)>,
        cnames: Vec<String>,
        ports: Vec<PortRange>,
        installed: Option<oneshot::Sender<Result<(), String>>>,
    },
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
