//! Which addresses in a DNS answer are not public, for the DNS-rebinding protection: a public name
//! the agent may resolve must not make a loopback, link-local, private or other local address
//! reachable unless the policy says that name may (`dns.private_answers`). Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not a public unicast address; `None` for a public one.
pub fn non_public(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            // ::ffff:a.b.c.d reaches the IPv4 address; judge that.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public_v4(v4);
            }
            non_public_v6(v6)
        }
    }
}

fn non_public_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [b0, b1, ..] = a.octets();
    Some(if a.is_loopback() {
        "loopback"
    } else if b0 == 0 {
        // 0.0.0.0/8: "this host"; a connect to 0.0.0.0 reaches the local host.
        "unspecified"
    } else if a.is_link_local() {
        "link-local"
    } else if a.is_private() {
        "private"
    } else if b0 == 100 && (b1 & 0xc0) == 64 {
        // RFC 6598 shared address space (carrier-grade NAT): not reachable from the Internet.
        "private"
    } else if a.is_multicast() {
        "multicast"
    } else if a.is_broadcast() || b0 >= 240 {
        "reserved"
    } else {
        return None;
    })
}

fn non_public_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s0 = a.segments()[0];
    Some(if a.is_loopback() {
        "loopback"
    } else if a.is_unspecified() {
        "unspecified"
    } else if (s0 & 0xffc0) == 0xfe80 {
        "link-local"
    } else if (s0 & 0xfe00) == 0xfc00 {
        // fc00::/7, unique local addresses (RFC 4193): the IPv6 private ranges.
        "private"
    } else if (s0 & 0xffc0) == 0xfec0 {
        // fec0::/10, deprecated site-local: still routed locally where configured.
        "private"
    } else if a.is_multicast() {
        "multicast"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        non_public(s.parse().expect("address"))
    }

    #[test]
    fn local_ipv4_ranges_are_classified() {
        for (a, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.3", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "private"),
            ("100.127.255.255", "private"),
            ("224.0.0.251", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "reserved"),
            ("240.0.0.1", "reserved"),
        ] {
            assert_eq!(class(a), Some(want), "{a}");
        }
    }

    #[test]
    fn public_ipv4_addresses_pass() {
        for a in [
            "1.1.1.1",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.0.1",
            "192.0.2.1",
            "223.255.255.255",
        ] {
            assert_eq!(class(a), None, "{a}");
        }
    }

    #[test]
    fn local_ipv6_ranges_are_classified_and_mapped_ipv4_is_judged_as_ipv4() {
        for (a, want) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fd00::1", "private"),
            ("fc00::1", "private"),
            ("fec0::1", "private"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.1.1", "link-local"),
        ] {
            assert_eq!(class(a), Some(want), "{a}");
        }
        for a in [
            "2606:4700::1111",
            "2001:db8::1",
            "::ffff:1.1.1.1",
            "fe00::1",
        ] {
            assert_eq!(class(a), None, "{a}");
        }
    }
}
