//! The pure half of judging an agent's unix connect on the socket it resolves to
//! (unix_connect.rs does the I/O): reading the caller's `sockaddr_un` as the kernel reads it,
//! and the verdict on a resolved socket's identity (device, inode) against the identities of
//! the listed sockets (`allow`) or of the known daemons' sockets (`deny_known_daemons`).

use serde::{Deserialize, Serialize};

/// `offsetof(struct sockaddr_un, sun_path)` and `sizeof(struct sockaddr_un)`.
pub const SUN_PATH_OFFSET: usize = 2;
pub const SOCKADDR_UN_LEN: usize = 110;

/// What a connect's address names, as `unix_validate_addr` and `unix_mkname_bsd` read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixAddress {
    /// A pathname socket: the bytes up to the first NUL (or the end of the address).
    Path(Vec<u8>),
    /// An abstract name (after the leading NUL), NULs included.
    Abstract(Vec<u8>),
    /// Not something the supervisor judges: the kernel fails it itself (EINVAL: too short, too
    /// long, another family) or, on a datagram socket, AF_UNSPEC dissolves the association.
    NotJudged,
}

/// Reads an address of `len` bytes (the connect's `addrlen`); `bytes` holds what could be read
/// of it (at most [`SOCKADDR_UN_LEN`]).
pub fn parse_sockaddr_un(bytes: &[u8], len: usize) -> UnixAddress {
    if len <= SUN_PATH_OFFSET || len > SOCKADDR_UN_LEN || bytes.len() < len {
        return UnixAddress::NotJudged;
    }
    let family = u16::from_ne_bytes([bytes[0], bytes[1]]);
    if family != libc::AF_UNIX as u16 {
        return UnixAddress::NotJudged;
    }
    let path = &bytes[SUN_PATH_OFFSET..len];
    match path.first() {
        Some(0) => UnixAddress::Abstract(path[1..].to_vec()),
        _ => {
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            UnixAddress::Path(path[..end].to_vec())
        }
    }
}

/// A socket file's identity: what the kernel's lookup reaches, whatever name led there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketIdentity {
    pub device: u64,
    pub inode: u64,
}

/// Which resolved sockets pass, as identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityRule {
    /// `allow = [...]`: only these (the listed sockets, as they resolve now).
    Only(Vec<SocketIdentity>),
    /// `deny_known_daemons = true` alone: every socket but these.
    AllBut(Vec<SocketIdentity>),
}

impl IdentityRule {
    pub fn permits(&self, socket: SocketIdentity) -> bool {
        match self {
            IdentityRule::Only(ids) => ids.contains(&socket),
            IdentityRule::AllBut(ids) => !ids.contains(&socket),
        }
    }

    /// Why a socket this rule permits was allowed, for the report's REASON.
    pub fn allowance(&self) -> &'static str {
        match self {
            IdentityRule::Only(_) => "the socket it resolves to is one the [unix] allow list names",
            IdentityRule::AllBut(_) => {
                "the socket it resolves to is not a host daemon's socket (unix.deny_known_daemons)"
            }
        }
    }

    /// Why a socket this rule refuses was refused, in words for the report's REASON.
    pub fn refusal(&self) -> &'static str {
        match self {
            IdentityRule::Only(_) => {
                "the socket it resolves to is none of the sockets the [unix] allow list names"
            }
            IdentityRule::AllBut(_) => {
                "the socket it resolves to is a host daemon's socket (unix.deny_known_daemons)"
            }
        }
    }
}

/// An address's name as reports write it: a pathname as it is, an abstract name as `@name`.
pub fn display(address: &UnixAddress) -> String {
    match address {
        UnixAddress::Path(p) => String::from_utf8_lossy(p).into_owned(),
        UnixAddress::Abstract(n) => format!("@{}", String::from_utf8_lossy(n)),
        UnixAddress::NotJudged => String::new(),
    }
}

/// "stream", "dgram" or "seqpacket" for a socket's SO_TYPE, as the kernel hook's reports say.
pub fn sock_type_name(sock_type: i32) -> &'static str {
    match sock_type {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "other",
    }
}

/// The agent's ids as /proc/PID/status lists them, for the connect made on its behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCredentials {
    /// Real, effective, saved and file-system uid.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

/// The `Uid:`, `Gid:` and `Groups:` lines of /proc/PID/status.
pub fn parse_status_credentials(status: &str) -> Option<AgentCredentials> {
    let four = |key: &str| -> Option<[u32; 4]> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        let v: Vec<u32> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        v.try_into().ok()
    };
    let groups = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()
        .ok()?;
    Some(AgentCredentials {
        uids: four("Uid:")?,
        gids: four("Gid:")?,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(path: &[u8]) -> Vec<u8> {
        let mut v = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(path);
        v
    }

    #[test]
    fn pathnames_end_at_the_first_nul_or_the_length() {
        let a = addr(b"/run/docker.sock\0garbage");
        assert_eq!(
            parse_sockaddr_un(&a, a.len()),
            UnixAddress::Path(b"/run/docker.sock".to_vec())
        );
        // addrlen shorter than the string: the kernel cuts the name there.
        assert_eq!(
            parse_sockaddr_un(&a, 2 + 4),
            UnixAddress::Path(b"/run".to_vec())
        );
        let rel = addr(b"docker.sock");
        assert_eq!(
            parse_sockaddr_un(&rel, rel.len()),
            UnixAddress::Path(b"docker.sock".to_vec())
        );
    }

    #[test]
    fn abstract_names_keep_their_length_and_nuls() {
        let a = addr(b"\0eng\0ine");
        assert_eq!(
            parse_sockaddr_un(&a, a.len()),
            UnixAddress::Abstract(b"eng\0ine".to_vec())
        );
        assert_eq!(display(&parse_sockaddr_un(&a, 7)), "@eng\0");
        assert_eq!(display(&parse_sockaddr_un(&a, 6)), "@eng");
    }

    #[test]
    fn lengths_and_families_the_kernel_refuses_are_not_judged() {
        let a = addr(b"/x");
        assert_eq!(parse_sockaddr_un(&a, 2), UnixAddress::NotJudged);
        assert_eq!(parse_sockaddr_un(&a, 1), UnixAddress::NotJudged);
        let long = addr(&[b'a'; 200]);
        assert_eq!(parse_sockaddr_un(&long, 111), UnixAddress::NotJudged);
        assert_eq!(
            parse_sockaddr_un(&long, 110),
            UnixAddress::Path(vec![b'a'; 108])
        );
        let mut inet = addr(b"/x");
        inet[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr_un(&inet, 4), UnixAddress::NotJudged);
        // Fewer bytes readable than addrlen says: nothing judged (the kernel gives EFAULT).
        assert_eq!(parse_sockaddr_un(&a[..3], 4), UnixAddress::NotJudged);
    }

    #[test]
    fn identities_decide_not_names() {
        let docker = SocketIdentity {
            device: 22,
            inode: 900,
        };
        let listed = SocketIdentity {
            device: 22,
            inode: 5,
        };
        let only = IdentityRule::Only(vec![listed]);
        assert!(only.permits(listed));
        assert!(!only.permits(docker));
        assert!(!IdentityRule::Only(vec![]).permits(listed));
        let all_but = IdentityRule::AllBut(vec![docker]);
        assert!(!all_but.permits(docker));
        assert!(all_but.permits(listed));
        // Same inode number on another device is another socket.
        assert!(all_but.permits(SocketIdentity {
            device: 23,
            inode: 900
        }));
    }

    #[test]
    fn credentials_come_from_the_status_lines() {
        let status = "Name:\tcurl\nUid:\t1000\t1000\t1000\t1001\nGid:\t100\t100\t100\t100\nGroups:\t27 100 \n";
        let c = parse_status_credentials(status).unwrap();
        assert_eq!(c.uids, [1000, 1000, 1000, 1001]);
        assert_eq!(c.gids, [100; 4]);
        assert_eq!(c.groups, vec![27, 100]);
        let none = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n";
        assert_eq!(
            parse_status_credentials(none).unwrap().groups,
            Vec::<u32>::new()
        );
        assert_eq!(parse_status_credentials("Uid:\t1\n"), None);
    }

    #[test]
    fn sock_types_are_named_like_the_kernel_hook_names_them() {
        assert_eq!(sock_type_name(libc::SOCK_STREAM), "stream");
        assert_eq!(sock_type_name(libc::SOCK_SEQPACKET), "seqpacket");
        assert_eq!(sock_type_name(libc::SOCK_DGRAM), "dgram");
    }
}
