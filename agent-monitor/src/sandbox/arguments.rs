//! Reading a held call's arguments out of the caller's memory: socket addresses, msghdr and
//! mmsghdr arrays, C strings and argv. Pure over a [`Memory`], so the decoding is tested
//! against a byte buffer; [`ProcessMemory`] is the real caller (process_vm_readv).
//!
//! What is read here is what the agent's memory held at the moment of reading: another thread
//! of the agent may change it before the kernel reads it. That is why the answer is only ever
//! "ask" or "nothing to ask": the kernel's cgroup and exec hooks judge the real call again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of a caller's address space.
pub trait Memory {
    /// Reads up to `buf.len()` bytes at `addr`; fewer when the range runs into unmapped memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize>;

    /// Exactly `buf.len()` bytes at `addr`, or an error.
    fn read_exact(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
        match self.read(addr, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            _ => Err(Unreadable { addr }),
        }
    }
}

/// A range of the caller's memory could not be read (unmapped, or the caller is gone): the
/// kernel fails the call itself (EFAULT), or judges whatever is there when it reads.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the caller's memory at {addr:#x} cannot be read")]
pub struct Unreadable {
    pub addr: u64,
}

/// The memory of process (thread) `pid`, read with process_vm_readv (root, or the caller's
/// parent with the same uid under no_new_privs: the kernel's ptrace access check).
pub struct ProcessMemory {
    pub pid: u32,
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the local iovec covers `buf`, which outlives the call; the remote range is
        // checked by the kernel in the other process.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// How wide the caller's pointers and `size_t`s are: 8 for the native ABI, 4 for i386, x32
/// and arm32 callers (their kernel entry points read the compat layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Native,
    Compat,
}

impl Width {
    fn bytes(self) -> usize {
        match self {
            Width::Native => 8,
            Width::Compat => 4,
        }
    }

    /// A pointer-sized word at `at` of `buf` (little- or big-endian as this machine).
    fn word(self, buf: &[u8], at: usize) -> u64 {
        match self {
            Width::Native => u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap_or_default()),
            Width::Compat => u64::from(u32::from_ne_bytes(
                buf[at..at + 4].try_into().unwrap_or_default(),
            )),
        }
    }

    /// Size of `struct msghdr` and offsets of msg_name, msg_namelen (compat_msghdr: seven
    /// 32-bit fields), and the size of `struct mmsghdr` (msghdr, unsigned msg_len, padding).
    fn msghdr(self) -> MsghdrLayout {
        match self {
            Width::Native => MsghdrLayout {
                size: 56,
                name: 0,
                namelen: 8,
                mmsg_size: 64,
            },
            Width::Compat => MsghdrLayout {
                size: 28,
                name: 0,
                namelen: 4,
                mmsg_size: 32,
            },
        }
    }
}

struct MsghdrLayout {
    size: usize,
    name: usize,
    namelen: usize,
    mmsg_size: usize,
}

/// Where a call sends to, read from its socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// An IPv4 or IPv6 address and port (IPv4-mapped IPv6 addresses as the IPv4 address: the
    /// kernel judges them as the same destination).
    Inet(IpAddr, u16),
    /// AF_UNSPEC: a connect's disconnect; a datagram of an IPv4 socket reads it as AF_INET
    /// (see [`sockaddr`]'s `unspec_is_inet`).
    Unspec,
    /// Another family (unix, netlink…), or an address too short for its family (the kernel
    /// fails it with EINVAL): nothing to ask.
    Other(u16),
}

/// Longest socket address read (sizeof(struct sockaddr_storage)).
const SOCKADDR_MAX: usize = 128;
const SOCKADDR_IN_LEN: usize = 16;
/// SIN6_LEN_RFC2133: the kernel accepts an IPv6 address without sin6_scope_id.
const SOCKADDR_IN6_LEN: usize = 24;

/// Decodes the socket address of `len` bytes at `addr`. `unspec_is_inet`: an AF_UNSPEC address
/// given to a datagram send on an IPv4 socket, which udp_sendmsg reads as AF_INET.
pub fn sockaddr(
    mem: &dyn Memory,
    addr: u64,
    len: u32,
    unspec_is_inet: bool,
) -> Result<Destination, Unreadable> {
    let len = (len as usize).min(SOCKADDR_MAX);
    if len < 2 {
        return Ok(Destination::Other(0));
    }
    let mut buf = [0u8; SOCKADDR_MAX];
    mem.read_exact(addr, &mut buf[..len])?;
    Ok(decode_sockaddr(&buf[..len], unspec_is_inet))
}

/// [`sockaddr`] over bytes already read.
pub fn decode_sockaddr(buf: &[u8], unspec_is_inet: bool) -> Destination {
    if buf.len() < 2 {
        return Destination::Other(0);
    }
    let family = u16::from_ne_bytes([buf[0], buf[1]]);
    let port = || u16::from_be_bytes([buf[2], buf[3]]);
    match i32::from(family) {
        libc::AF_INET | libc::AF_UNSPEC
            if buf.len() >= SOCKADDR_IN_LEN
                && (i32::from(family) == libc::AF_INET || unspec_is_inet) =>
        {
            let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
            Destination::Inet(IpAddr::V4(ip), port())
        }
        libc::AF_UNSPEC => Destination::Unspec,
        libc::AF_INET6 if buf.len() >= SOCKADDR_IN6_LEN => {
            let octets: [u8; 16] = buf[8..24].try_into().unwrap_or_default();
            let ip = Ipv6Addr::from(octets);
            let ip = match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            };
            Destination::Inet(ip, port())
        }
        _ => Destination::Other(family),
    }
}

/// The msg_name pointer and msg_namelen of the `struct msghdr` at `addr` (0: no address).
pub fn msghdr_name(mem: &dyn Memory, addr: u64, width: Width) -> Result<(u64, u32), Unreadable> {
    let layout = width.msghdr();
    let mut buf = [0u8; 56];
    mem.read_exact(addr, &mut buf[..layout.size])?;
    Ok(name_of(&buf, width))
}

fn name_of(buf: &[u8], width: Width) -> (u64, u32) {
    let layout = width.msghdr();
    let name = width.word(buf, layout.name);
    let len = u32::from_ne_bytes(
        buf[layout.namelen..layout.namelen + 4]
            .try_into()
            .unwrap_or_default(),
    );
    (name, len)
}

/// Most messages of one sendmmsg read (the kernel's own cap, UIO_MAXIOV).
pub const MMSG_MAX: u32 = 1024;

/// The (msg_name, msg_namelen) of each of the `vlen` (capped at [`MMSG_MAX`]) `struct mmsghdr`
/// at `addr`.
pub fn mmsghdr_names(
    mem: &dyn Memory,
    addr: u64,
    vlen: u32,
    width: Width,
) -> Result<Vec<(u64, u32)>, Unreadable> {
    let layout = width.msghdr();
    let n = vlen.min(MMSG_MAX) as usize;
    let mut buf = vec![0u8; n * layout.mmsg_size];
    mem.read_exact(addr, &mut buf)?;
    Ok(buf
        .chunks_exact(layout.mmsg_size)
        .map(|m| name_of(m, width))
        .collect())
}

/// Longest path read (PATH_MAX, with its NUL).
pub const PATH_MAX: usize = 4096;

/// The NUL-terminated string at `addr`, at most `max` bytes before the NUL. Reads page by page,
/// so a string that ends just before unmapped memory is read whole. None: longer than `max`.
pub fn c_string(mem: &dyn Memory, addr: u64, max: usize) -> Result<Option<Vec<u8>>, Unreadable> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() <= max {
        let chunk = (PAGE - at % PAGE) as usize;
        let mut buf = vec![0u8; chunk];
        let n = mem
            .read(at, &mut buf)
            .map_err(|_| Unreadable { addr: at })?;
        if n == 0 {
            return Err(Unreadable { addr: at });
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            return Ok((out.len() <= max).then_some(out));
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    Ok(None)
}

/// How much of an exec's argv is read for the question (the rest is cut, and the last kept
/// argument says so): enough for an operator to see what runs.
pub const ARGV_MAX_ARGS: usize = 64;
pub const ARGV_MAX_ARG: usize = 1024;

/// The argument strings of the NULL-terminated pointer array at `addr` (a NULL `addr`: none, as
/// the kernel reads it). Cut after [`ARGV_MAX_ARGS`] arguments or [`ARGV_MAX_ARG`] bytes of one,
/// marked with "…"; an unreadable argument reads as "?" (the kernel then fails the exec).
pub fn argv(mem: &dyn Memory, addr: u64, width: Width) -> Result<Vec<String>, Unreadable> {
    let mut out = Vec::new();
    if addr == 0 {
        return Ok(out);
    }
    let w = width.bytes();
    let mut ptrs = vec![0u8; (ARGV_MAX_ARGS + 1) * w];
    // The array may end just before unmapped memory: read what is there.
    let n = mem.read(addr, &mut ptrs).map_err(|_| Unreadable { addr })?;
    if n < w {
        return Err(Unreadable { addr });
    }
    for i in 0..(n / w) {
        let p = width.word(&ptrs, i * w);
        if p == 0 {
            return Ok(out);
        }
        if i == ARGV_MAX_ARGS {
            out.push("…".into());
            return Ok(out);
        }
        let arg = match c_string(mem, p, ARGV_MAX_ARG) {
            Ok(Some(s)) => String::from_utf8_lossy(&s).into_owned(),
            Ok(None) => {
                let mut buf = vec![0u8; ARGV_MAX_ARG];
                let n = mem.read(p, &mut buf).unwrap_or(0);
                format!("{}…", String::from_utf8_lossy(&buf[..n]))
            }
            Err(_) => "?".into(),
        };
        out.push(arg);
    }
    // The pointer array ran into unmapped memory before its NULL: the kernel fails the exec.
    Ok(out)
}

/// A byte buffer standing in for a caller's memory, starting at address `base`.
#[cfg(test)]
pub struct SliceMemory<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

#[cfg(test)]
impl Memory for SliceMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = addr
            .checked_sub(self.base)
            .filter(|&s| s < self.bytes.len() as u64)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))?
            as usize;
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }
}
