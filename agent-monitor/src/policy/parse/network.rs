//! Network allowlist entries: `ADDR[/PREFIX]:PORTSPEC`.

use std::net::{Ipv4Addr, Ipv6Addr};

use agent_monitor_common::PortRange;

use super::Reason;
use crate::policy::host;
use crate::policy::model::prefix_mask;

/// `ADDR[/PREFIX]:PORTSPEC` → (network as IPv6, prefix length in IPv6 bits, ports).
pub(crate) fn parse_net(text: &str) -> Result<(Ipv6Addr, u8, PortRange), Reason> {
    if text.is_empty() {
        return Err(Reason::NetEmpty);
    }
    let (addr_text, bracketed, port_text) = match text.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']').ok_or(Reason::UnclosedBracket)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(Reason::JunkAfterBracket)?),
            };
            (inside, true, port)
        }
        // Any IPv6 address has at least two colons; a bare one cannot be told apart from its port.
        None if text.matches(':').count() > 1 => return Err(Reason::UnbracketedIpv6),
        None => match text.split_once(':') {
            Some((addr, port)) => (addr, false, Some(port)),
            None => (text, false, None),
        },
    };

    let (ip_text, prefix_text) = match addr_text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (addr_text, None),
    };
    let (net, prefix_len) = if bracketed {
        let ip: Ipv6Addr = ip_text.parse().map_err(|_| {
            if ip_text.parse::<Ipv4Addr>().is_ok() {
                Reason::BracketedIpv4
            } else {
                Reason::BadIpv6(ip_text.to_string())
            }
        })?;
        let len = parse_prefix(prefix_text, 128, "IPv6")?;
        let bits = u128::from(ip);
        if bits & !prefix_mask(len) != 0 {
            let network = Ipv6Addr::from(bits & prefix_mask(len));
            return Err(Reason::HostBitsSet {
                network: format!("[{network}/{len}]"),
            });
        }
        (ip, len)
    } else {
        let ip: Ipv4Addr = ip_text.parse().map_err(|_| {
            if looks_like_host_name(ip_text) {
                Reason::HostName
            } else {
                Reason::BadIpv4(ip_text.to_string())
            }
        })?;
        let len = parse_prefix(prefix_text, 32, "IPv4")?;
        let bits = u32::from(ip);
        let mask = match len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        };
        if bits & !mask != 0 {
            let network = Ipv4Addr::from(bits & mask);
            return Err(Reason::HostBitsSet {
                network: format!("{network}/{len}"),
            });
        }
        // One table serves both families: IPv4 lives at ::ffff:0:0/96.
        (ip.to_ipv6_mapped(), len + 96)
    };

    let ports = match port_text {
        None | Some("") => return Err(Reason::MissingPort),
        Some(spec) => parse_ports(spec)?,
    };
    Ok((net, prefix_len, ports))
}

/// Letters where an IPv4 address was expected: someone wrote a name like `example.com`.
fn looks_like_host_name(text: &str) -> bool {
    text.chars().any(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Prefix length after `/`; a missing prefix means a single address.
fn parse_prefix(text: Option<&str>, max: u8, family: &'static str) -> Result<u8, Reason> {
    let Some(text) = text else {
        return Ok(max);
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 18 {
        return Err(Reason::BadPrefix(text.to_string()));
    }
    let len: u64 = text
        .parse()
        .map_err(|_| Reason::BadPrefix(text.to_string()))?;
    match u8::try_from(len) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(Reason::PrefixTooLong { len, max, family }),
    }
}

/// Whether `text` is a valid `network.allow` entry, in address or host-name form.
pub(crate) fn valid_net_entry(text: &str) -> bool {
    if host::is_host_entry(text) {
        host::parse_host_entry(text, parse_ports).is_ok()
    } else {
        parse_net(text).is_ok()
    }
}

/// `N`, `LO-HI` or `*`.
pub(super) fn parse_ports(spec: &str) -> Result<PortRange, Reason> {
    if spec == "*" {
        return Ok(PortRange {
            lo: 0,
            hi: u16::MAX,
        });
    }
    let (lo, hi) = match spec.split_once('-') {
        Some((lo, hi)) => (parse_port(lo, spec)?, parse_port(hi, spec)?),
        None => {
            let port = parse_port(spec, spec)?;
            (port, port)
        }
    };
    if lo > hi {
        return Err(Reason::PortRangeReversed { lo, hi });
    }
    Ok(PortRange { lo, hi })
}

fn parse_port(text: &str, spec: &str) -> Result<u16, Reason> {
    // Digits only: `str::parse` would also take a leading '+'.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reason::BadPort(spec.to_string()));
    }
    match text.parse::<u16>() {
        Ok(0) => Err(Reason::PortZero),
        Ok(port) => Ok(port),
        Err(_) => Err(Reason::PortTooLarge(text.to_string())),
    }
}
