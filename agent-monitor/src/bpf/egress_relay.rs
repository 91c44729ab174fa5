//! The egress relay in the kernel: a sockmap (`RELAY_SOCKETS`) with a stream verdict program that
//! sends what one socket of a pair receives out of the other (`agent-monitor-ebpf/src/
//! relay_main.rs`). Its own small object, loaded by the egress endpoint at start and never pinned:
//! the sockets it holds belong to this daemon and go with it. `egress/kernel_relay.rs` decides
//! when a connection's sockets go in and drives their end.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Mutex;

use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};

use super::tables::relay::RelayTables;
use super::tables::{Opener, TableError};

/// The relay's compiled program and maps, embedded at build time (see build.rs).
static RELAY_PROGRAM: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-relay"));

const VERDICT: &str = "egress_relay";

/// Why the relay could not be set up on this kernel (the endpoint then splices).
#[derive(Debug, thiserror::Error)]
pub enum RelayLoadError {
    #[error("loading the egress relay object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("egress relay map: {0}")]
    Table(#[from] TableError),
    #[error("egress relay program {VERDICT} missing from its object")]
    Missing,
    #[error("the kernel refused the sk_skb stream verdict program: {0}")]
    Program(#[from] aya::programs::ProgramError),
}

/// Why one connection's sockets did not go into the relay (it is spliced instead).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("the kernel relay holds its maximum of {0} connections")]
    Full(u32),
    #[error("a socket is no longer established (its peer ended its stream)")]
    NotEstablished,
    #[error("reading a socket's cookie: {0}")]
    Cookie(#[source] std::io::Error),
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Two sockets in the relay, by their cookies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pairing {
    pub first: u64,
    pub second: u64,
}

/// The loaded relay; shared by the endpoint's connections.
pub struct EgressRelay {
    state: Mutex<RelayState>,
    capacity: u32,
}

struct RelayState {
    tables: RelayTables,
    pairs: u32,
    /// Holds the program, attached to `RELAY_SOCKETS` (dropping it detaches).
    _object: Ebpf,
}

impl EgressRelay {
    /// Loads the object with room for `connections` pairs and attaches its verdict program.
    pub fn load(connections: u32) -> Result<EgressRelay, RelayLoadError> {
        let sockets = connections.saturating_mul(2).max(2);
        let mut object = EbpfLoader::new()
            .map_max_entries("RELAY_SOCKETS", sockets)
            .map_max_entries("RELAY_PEERS", sockets)
            .load(RELAY_PROGRAM)?;
        let mut maps = BTreeMap::new();
        for name in ["RELAY_SOCKETS", "RELAY_PEERS"] {
            if let Some(map) = object.take_map(name) {
                maps.insert(name.to_string(), map);
            }
        }
        let tables = RelayTables::open(&mut Opener::new(maps))?;
        let program: &mut SkSkb = object
            .program_mut(VERDICT)
            .ok_or(RelayLoadError::Missing)?
            .try_into()
            .map_err(aya::programs::ProgramError::from)?;
        program.load()?;
        let map_fd = tables
            .sockets_fd()
            .try_clone()
            .map_err(aya::programs::ProgramError::IOError)?;
        program.attach(&map_fd)?;
        Ok(EgressRelay {
            state: Mutex::new(RelayState {
                tables,
                pairs: 0,
                _object: object,
            }),
            capacity: connections,
        })
    }

    /// The most connections the relay holds at once.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Puts `first` and then `second` (established TCP sockets) into the relay: from then on the
    /// kernel passes what each receives out of the other. Bytes already waiting in a socket's
    /// receive queue are passed on at its next arrival (or when the caller pokes it, see
    /// `egress/kernel_relay.rs`). On an error nothing stays in the maps.
    pub fn pair(&self, first: &impl AsFd, second: &impl AsFd) -> Result<Pairing, PairError> {
        let pairing = Pairing {
            first: cookie(first)?,
            second: cookie(second)?,
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.pairs >= self.capacity {
            return Err(PairError::Full(self.capacity));
        }
        let done = (|| {
            state.tables.set_peers(pairing.first, pairing.second)?;
            state
                .tables
                .insert_socket(pairing.first, &first.as_fd().as_raw_fd())?;
            state
                .tables
                .insert_socket(pairing.second, &second.as_fd().as_raw_fd())
        })();
        match done {
            Ok(()) => {
                state.pairs += 1;
                Ok(pairing)
            }
            Err(e) => {
                state.tables.remove_socket(pairing.first);
                state.tables.remove_socket(pairing.second);
                state.tables.remove_peers(pairing.first, pairing.second);
                Err(e.into())
            }
        }
    }

    /// Forgets a pair whose sockets are closed (closing took them out of the socket map).
    pub fn unpair(&self, pairing: Pairing) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.tables.remove_socket(pairing.first);
        state.tables.remove_socket(pairing.second);
        state.tables.remove_peers(pairing.first, pairing.second);
        state.pairs = state.pairs.saturating_sub(1);
    }
}

/// The kernel's cookie of a socket (`SO_COOKIE`): what the verdict program keys on.
fn cookie(socket: &impl AsFd) -> Result<u64, PairError> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PairError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(value)
}
