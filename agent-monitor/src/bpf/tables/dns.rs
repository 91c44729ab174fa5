//! DNS: each agent's proxy endpoint (and which agent owns each proxy port), and the addresses
//! learned from the answers it relayed.

use std::net::IpAddr;

use agent_monitor_common::server_name::{MAX_SNI_NAMES, SniNameKey, key_name};
use agent_monitor_common::{self as common, DnsProxy, Learned, NetKey};
use aya::maps::{HashMap, MapData};

use crate::egress::kernel_names::KernelName;

use super::{OpContext as _, Opener, TableError, remove_hash_entries};

pub struct DnsTables {
    proxy: HashMap<MapData, u32, DnsProxy>,
    /// Proxy port (see `common::dns_proxy_port_key`) → the agent it serves.
    proxy_ports: HashMap<MapData, u32, u32>,
    learned: HashMap<MapData, NetKey, Learned>,
    /// (agent, address, port, name) → until when: the server names the kernel passes.
    sni_names: HashMap<MapData, SniNameKey, u64>,
    /// The `sni_names` keys written for each (agent, address), so a rewrite removes the stale.
    written: std::collections::HashMap<(u32, [u8; 16]), Vec<SniNameKey>>,
}

impl DnsTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(DnsTables {
            proxy: maps.take("DNS_PROXY")?,
            proxy_ports: maps.take("DNS_PROXY_PORTS")?,
            learned: maps.take("DNS_LEARNED")?,
            sni_names: maps.take("SNI_NAMES")?,
            written: std::collections::HashMap::new(),
        })
    }

    /// Points agent `agent`'s port-53 traffic at its DNS proxy endpoint, and keeps every other
    /// agent away from that endpoint.
    pub fn set_proxy(&mut self, agent: u32, ports: DnsProxy) -> Result<(), TableError> {
        self.proxy
            .insert(agent, ports, 0)
            .op("writing the DNS proxy map")?;
        for key in proxy_port_keys(&ports) {
            self.proxy_ports
                .insert(key, agent, 0)
                .op("writing the DNS proxy port map")?;
        }
        Ok(())
    }

    /// Allows `agent` to reach `addr` as `value` says (ports, expiry), learned from a DNS answer.
    /// With `names`, the server names the kernel passes on connections to it: written before the
    /// address (a connect then never finds the address without its names), the stale ones
    /// removed after. A name that cannot be written leaves the address to the egress endpoint.
    pub fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
        names: &[KernelName],
    ) -> Result<(), TableError> {
        let key = learned_key(agent, addr);
        let mut value = *value;
        let mut keys = Vec::with_capacity(names.len());
        for n in names {
            let Some((name, len)) = key_name(n.name.as_bytes()) else {
                continue;
            };
            let k = SniNameKey {
                agent,
                port: n.port,
                len,
                addr: key.addr,
                name,
            };
            match self.sni_names.insert(k, n.expires_ns, 0) {
                Ok(()) => keys.push(k),
                Err(e) => {
                    tracing::warn!(
                        "writing the server-name map (full at {MAX_SNI_NAMES} entries?): {e}; \
                         connections to {addr} go through the egress endpoint"
                    );
                    value.kernel_sni = 0;
                }
            }
        }
        self.learned.insert(key, value, 0).op(format!(
            "writing the learned-address map (full at {} entries?)",
            common::MAX_DNS_LEARNED
        ))?;
        let stale = self.written.insert((agent, key.addr), keys.clone());
        for old in stale.unwrap_or_default() {
            if !keys.contains(&old) {
                let _ = self.sni_names.remove(&old);
            }
        }
        Ok(())
    }

    pub fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> Result<(), TableError> {
        let key = learned_key(agent, addr);
        self.learned
            .remove(&key)
            .op("removing from the learned-address map")?;
        for old in self.written.remove(&(agent, key.addr)).unwrap_or_default() {
            let _ = self.sni_names.remove(&old);
        }
        Ok(())
    }

    /// Removes the proxies and learned addresses of agent indices `keep` rejects.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, TableError> {
        self.written.retain(|(agent, _), _| keep(*agent));
        Ok(
            remove_hash_entries(&mut self.proxy, |a| !keep(*a), "DNS proxy entry")?
                + remove_hash_entries(&mut self.learned, |k| !keep(k.agent), "learned address")?
                + remove_hash_entries(&mut self.sni_names, |k| !keep(k.agent), "server name")?,
        )
    }
}

/// The kernel compares IPv4 destinations as `::ffff:a.b.c.d`.
pub(in crate::bpf) fn learned_key(agent: u32, addr: IpAddr) -> NetKey {
    let addr = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    NetKey {
        agent,
        addr: addr.octets(),
    }
}

/// The `DNS_PROXY_PORTS` keys of the endpoints `ports` has (a 0 port is none).
pub(super) fn proxy_port_keys(ports: &DnsProxy) -> Vec<u32> {
    [
        (ports.udp4, false, false),
        (ports.tcp4, false, true),
        (ports.udp6, true, false),
        (ports.tcp6, true, true),
    ]
    .into_iter()
    .filter(|(port, _, _)| *port != 0)
    .map(|(port, ipv6, tcp)| common::dns_proxy_port_key(port, ipv6, tcp))
    .collect()
}
