//! The egress relay's maps (its own object, see `bpf/egress_relay.rs`): the sockets of the
//! connections the kernel relays, by socket cookie, and each socket's peer.

use std::os::fd::AsRawFd;

use aya::maps::{HashMap, MapData, SockHash};

use super::{OpContext as _, Opener, TableError};

pub struct RelayTables {
    sockets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, u64>,
}

impl RelayTables {
    pub(in crate::bpf) fn open(maps: &mut Opener) -> Result<Self, TableError> {
        Ok(RelayTables {
            sockets: maps.take("RELAY_SOCKETS")?,
            peers: maps.take("RELAY_PEERS")?,
        })
    }

    /// The socket map, for attaching the stream verdict program to it.
    pub(in crate::bpf) fn sockets_fd(&self) -> &aya::maps::sock::SockMapFd {
        self.sockets.fd()
    }

    /// Each of `a` and `b` names the other as its peer. Written before either socket is in the
    /// socket map, so the verdict finds the peer of every chunk.
    pub fn set_peers(&mut self, a: u64, b: u64) -> Result<(), TableError> {
        self.peers.insert(a, b, 0).op("writing a relay peer")?;
        self.peers.insert(b, a, 0).op("writing a relay peer")
    }

    /// Adds `socket` (an established TCP socket) under `cookie`: from now on the kernel passes
    /// what it receives to its peer.
    pub fn insert_socket(&mut self, cookie: u64, socket: &impl AsRawFd) -> Result<(), TableError> {
        self.sockets
            .insert(cookie, socket.as_raw_fd(), 0)
            .op("adding a socket to the relay map")
    }

    /// Removes `cookie`'s socket (a closed socket has left on its own: not an error).
    pub fn remove_socket(&mut self, cookie: u64) {
        let _ = self.sockets.remove(&cookie);
    }

    /// Forgets the pair `a`, `b`.
    pub fn remove_peers(&mut self, a: u64, b: u64) {
        let _ = self.peers.remove(&a);
        let _ = self.peers.remove(&b);
    }
}
