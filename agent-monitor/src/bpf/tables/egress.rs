//! Request rules: the egress endpoint's port, each agent's request-rule ports, and the flows the
//! kernel redirected (read by the endpoint when it accepts one).

use agent_monitor_common::server_name::SniFlow;
use agent_monitor_common::{EgressFlow, NetAllow, PortRange};
use aya::maps::{Array, HashMap, MapData};

use super::{OpContext as _, Opener, TableError, remove_hash_entries};

pub struct EgressTables {
    endpoint: Array<MapData, u32>,
    ports: HashMap<MapData, u32, NetAllow>,
    flows: HashMap<MapData, u32, EgressFlow>,
    /// `[0]`: server names are judged in the kernel (`SNI_CONFIG`).
    sni_config: Array<MapData, u32>,
    /// Connections whose first bytes the kernel judges, or refused (`SNI_FLOWS`).
    sni_flows: HashMap<MapData, u64, SniFlow>,
}

impl EgressTables {
    pub(super) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(EgressTables {
            endpoint: maps.take("EGRESS_ENDPOINT")?,
            ports: maps.take("EGRESS_PORTS")?,
            // An LRU map; aya's HashMap handle reads both kinds.
            flows: maps.take("EGRESS_FLOWS")?,
            sni_config: maps.take("SNI_CONFIG")?,
            sni_flows: maps.take("SNI_FLOWS")?,
        })
    }

    /// Where redirected connects go (0: nowhere; the kernel then refuses them).
    pub fn set_endpoint(&mut self, port: u16) -> Result<(), TableError> {
        self.endpoint
            .set(0, u32::from(port), 0)
            .op("writing the egress endpoint map")
    }

    /// Agent `agent`'s connects to learned addresses on `ports` go to the endpoint.
    pub fn set_ports(&mut self, agent: u32, ports: &[u16]) -> Result<(), TableError> {
        // Written once per index (a reload writes a fresh bank; `retain` drops the old one), so
        // an index without request rules never had an entry.
        if ports.is_empty() {
            return Ok(());
        }
        let mut value = NetAllow {
            count: 0,
            ranges: [PortRange::default(); agent_monitor_common::MAX_PORT_RANGES],
        };
        for (slot, port) in value.ranges.iter_mut().zip(ports) {
            *slot = PortRange {
                lo: *port,
                hi: *port,
            };
            value.count += 1;
        }
        self.ports
            .insert(agent, value, 0)
            .op("writing the egress port map")
    }

    /// The flow the kernel redirected as `token`.
    pub fn flow(&self, token: u32) -> Option<EgressFlow> {
        self.flows.get(&token, 0).ok()
    }

    /// Whether connects with server-name rules only have their names judged in the kernel (else
    /// every connect with request rules goes to the endpoint).
    pub fn set_server_names_in_kernel(&mut self, on: bool) -> Result<(), TableError> {
        self.sni_config
            .set(0, u32::from(on), 0)
            .op("writing the server-name switch")
    }

    /// Forgets the kernel-judged connection `cookie` (closed, or gone).
    pub fn remove_sni_flow(&mut self, cookie: u64) -> Result<(), TableError> {
        match self.sni_flows.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).op("removing a server-name flow"),
        }
    }

    /// The cookies of the connections the kernel holds for server-name judging.
    pub fn sni_flow_cookies(&self) -> Vec<u64> {
        self.sni_flows.keys().filter_map(Result::ok).collect()
    }

    /// Removes the port entries of agent indices `keep` rejects.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, TableError> {
        remove_hash_entries(&mut self.ports, |a| !keep(*a), "egress port entry")
    }
}
