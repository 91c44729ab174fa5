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
            // Forms that carry an IPv4 address a translator or relay on the path then reaches:
            // NAT64's well-known prefix 64:ff9b::/96 and 6to4's 2002::/16 (RFC 6052, 3056).
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return non_public_v4(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return non_public_v4(embedded(s[1], s[2]));
            }
            // 64:ff9b:1::/48 is for NAT64 inside one network (RFC 8215): local by purpose.
            if s[..3] == [0x64, 0xff9b, 1] {
                return Some("private");
            }
            non_public_v6(v6)
        }
    }
}

/// The addresses of this host's own interfaces (getifaddrs): a public name answering one of
/// them makes every service listening on the wildcard address reachable, which is what
/// rebinding protection is for, even where the address itself is public.
pub fn host_addresses() -> std::collections::HashSet<IpAddr> {
    let mut out = std::collections::HashSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                    out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                    out.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs gave us, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// `non_public`, or "this host" for an address of one of its own interfaces.
pub fn non_public_here(
    addr: IpAddr,
    host: &std::collections::HashSet<IpAddr>,
) -> Option<&'static str> {
    let canon = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    non_public(addr).or_else(|| host.contains(&canon).then_some("this host"))
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
    fn the_hosts_own_addresses_are_this_host() {
        let host = host_addresses();
        assert!(host.contains(&"127.0.0.1".parse().unwrap()), "{host:?}");
        let own: IpAddr = "1.1.1.1".parse().unwrap();
        let here = std::collections::HashSet::from([own]);
        assert_eq!(non_public_here(own, &here), Some("this host"));
        assert_eq!(
            non_public_here("::ffff:1.1.1.1".parse().unwrap(), &here),
            Some("this host")
        );
        assert_eq!(non_public_here("1.0.0.1".parse().unwrap(), &here), None);
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
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("2002:7f00:1::1", "loopback"),
            ("2002:c0a8:101::", "private"),
            ("64:ff9b:1::1.1.1.1", "private"),
        ] {
            assert_eq!(class(a), Some(want), "{a}");
        }
        for a in [
            "2606:4700::1111",
            "2001:db8::1",
            "::ffff:1.1.1.1",
            "64:ff9b::101:101",
            "2002:101:101::1",
            "fe00::1",
        ] {
            assert_eq!(class(a), None, "{a}");
        }
    }
}
