//! AF_UNIX connects and datagram sends (cgroup `connect_unix` / `sendmsg_unix`, Linux 6.7): the
//! allowlist key both sides build the same way, and the record payload.
//!
//! The name is judged as the caller gave it to the kernel (`sun_path`), in one canonical form:
//! - a pathname socket: the bytes before the first NUL (the kernel stops there too), the rest of
//!   `path` zero, `name_len` their count;
//! - an abstract socket: `path[0]` = 0 and the name's bytes after it (NULs included: they are
//!   part of an abstract name), `name_len` = 1 + the name's length.

/// `sizeof(sockaddr_un.sun_path)`.
pub const UNIX_PATH_LEN: usize = 108;
/// Entries of `UNIX_RULES` (both policy banks together).
pub const MAX_UNIX_ENTRIES: u32 = 8_192;
/// `UnixKey::name_len` of an agent's default entry (empty `path`): its value is what happens to
/// a socket no entry names. No default entry: the agent has no `[unix]` section, nothing is
/// judged or reported (today's behaviour).
pub const UNIX_DEFAULT_ENTRY: u32 = u32::MAX;
/// Values of `UNIX_RULES`, and `UnixPayload::rule` (0: no entry named the socket).
pub const UNIX_ALLOW: u32 = 1;
pub const UNIX_DENY: u32 = 2;
/// Offsets in the kernel's `struct bpf_sock_addr_kern` (the sock_addr program's real context)
/// of `uaddr` (the kernel's copy of the caller's sockaddr) and `uaddrlen` (6.7+). The daemon
/// checks them against the kernel's BTF before it attaches the unix hooks.
pub const SOCK_ADDR_KERN_UADDR: u32 = 8;
pub const SOCK_ADDR_KERN_UADDRLEN: u32 = 32;
/// Bytes of `bpf_sock_addr_kern` the program reads (up to and with `uaddrlen`).
pub const SOCK_ADDR_KERN_READ: usize = 40;

/// `UNIX_RULES` key: (allowlist index, socket name in canonical form).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixKey {
    pub agent: u32,
    pub name_len: u32,
    pub path: [u8; UNIX_PATH_LEN],
}

/// A unix connect or send: the socket named and how it was judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPayload {
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`.
    pub sock_type: u32,
    /// As in [`UnixKey`].
    pub name_len: u32,
    /// 1: a datagram send naming the socket (sendto/sendmsg); 0: a connect.
    pub send: u32,
    /// The entry that named the socket (`UNIX_ALLOW`, `UNIX_DENY`), or 0: the agent's default.
    pub rule: u32,
    pub path: [u8; UNIX_PATH_LEN],
    pub _pad: u32,
}

impl UnixKey {
    /// The key of `name` as a policy writes it: `@name` is abstract, anything else a pathname.
    /// `None` when it does not fit `sun_path`.
    pub fn of_name(agent: u32, name: &[u8]) -> Option<UnixKey> {
        let mut key = UnixKey {
            agent,
            name_len: 0,
            path: [0; UNIX_PATH_LEN],
        };
        let bytes: &[u8] = match name.first() {
            Some(b'@') => &name[1..],
            _ => name,
        };
        let start = usize::from(name.first() == Some(&b'@'));
        if start + bytes.len() > UNIX_PATH_LEN {
            return None;
        }
        key.path[start..start + bytes.len()].copy_from_slice(bytes);
        key.name_len = (start + bytes.len()) as u32;
        Some(key)
    }

    /// An agent's default entry.
    pub const fn default_entry(agent: u32) -> UnixKey {
        UnixKey {
            agent,
            name_len: UNIX_DEFAULT_ENTRY,
            path: [0; UNIX_PATH_LEN],
        }
    }
}

/// The canonical form of `sun_path` as the kernel received it: `len` bytes of it are the
/// caller's (`uaddrlen` minus the family). Bytes past the name are zeroed. Returns `name_len`.
/// The kernel program does the same with bounded loops.
pub fn canonical_sun_path(path: &mut [u8; UNIX_PATH_LEN], len: usize) -> u32 {
    let len = len.min(UNIX_PATH_LEN);
    let end = if path[0] == 0 {
        len
    } else {
        path[..len].iter().position(|&b| b == 0).unwrap_or(len)
    };
    for b in &mut path[end..] {
        *b = 0;
    }
    end as u32
}

const _: () = assert!(core::mem::size_of::<UnixKey>() == 8 + UNIX_PATH_LEN);
const _: () = assert!(core::mem::size_of::<UnixPayload>() == 128);

#[cfg(test)]
mod tests {
    use super::*;

    fn sun(bytes: &[u8]) -> [u8; UNIX_PATH_LEN] {
        let mut p = [0xaa; UNIX_PATH_LEN];
        p[..bytes.len()].copy_from_slice(bytes);
        p
    }

    #[test]
    fn pathname_ends_at_the_first_nul_and_the_rest_is_zeroed() {
        let mut p = sun(b"/run/docker.sock\0junk");
        let n = canonical_sun_path(&mut p, 21);
        assert_eq!(n, 16);
        let k = UnixKey::of_name(3, b"/run/docker.sock").expect("fits");
        assert_eq!((k.name_len, k.path), (n, p));
    }

    #[test]
    fn pathname_without_nul_ends_at_the_length_given() {
        let mut p = sun(b"/tmp/sockXYZ");
        assert_eq!(canonical_sun_path(&mut p, 9), 9);
        assert_eq!(&p[..10], b"/tmp/sock\0");
        assert!(p[9..].iter().all(|&b| b == 0));
    }

    #[test]
    fn abstract_names_keep_their_nuls_and_length() {
        let mut p = sun(b"\0name\0x");
        assert_eq!(canonical_sun_path(&mut p, 7), 7);
        let k = UnixKey::of_name(0, b"@name\0x").expect("fits");
        assert_eq!((k.name_len, k.path), (7, p));
        // "@name" and "@name\0" are different abstract sockets.
        let short = UnixKey::of_name(0, b"@name").expect("fits");
        assert_ne!(short, k);
        assert_eq!(short.name_len, 5);
    }

    #[test]
    fn names_longer_than_sun_path_do_not_fit() {
        assert!(UnixKey::of_name(0, &[b'a'; UNIX_PATH_LEN]).is_some());
        assert!(UnixKey::of_name(0, &[b'a'; UNIX_PATH_LEN + 1]).is_none());
        // An abstract name's leading NUL takes one byte of sun_path.
        let mut at = [b'a'; UNIX_PATH_LEN];
        at[0] = b'@';
        assert!(UnixKey::of_name(0, &at).is_some());
        let mut at = [b'a'; UNIX_PATH_LEN + 1];
        at[0] = b'@';
        assert!(UnixKey::of_name(0, &at).is_none());
    }
}
