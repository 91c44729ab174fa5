//! Decoding held calls from a byte buffer standing in for the caller's memory.

use super::*;
use crate::sandbox::arguments::{
    SliceMemory, argv, c_string, decode_sockaddr, mmsghdr_names, msghdr_name,
};

const BASE: u64 = 0x10_000;

/// A fake caller: memory from a buffer, one socket, one file.
struct Fake<'a> {
    mem: SliceMemory<'a>,
    socket: Option<SocketInfo>,
}

impl Caller for Fake<'_> {
    fn memory(&self) -> &dyn Memory {
        &self.mem
    }
    fn socket(&self, fd: i32) -> Option<SocketInfo> {
        (fd == 3).then_some(self.socket?)
    }
    fn exec_file(&self, dirfd: i32, path: &[u8], empty: bool, _nofollow: bool) -> Option<ExecFile> {
        let path = String::from_utf8_lossy(path).into_owned();
        match (dirfd, path.as_str(), empty) {
            (AT_FDCWD, "/opt/tool", false) => Some(ExecFile {
                path,
                device: 8,
                inode: 99,
            }),
            (5, "", true) => Some(ExecFile {
                path: "/memfd:x".into(),
                device: 1,
                inode: 2,
            }),
            _ => None,
        }
    }
}

fn fake(bytes: &[u8], socket: Option<SocketInfo>) -> Fake<'_> {
    Fake {
        mem: SliceMemory { base: BASE, bytes },
        socket,
    }
}

/// The question for a 64-bit caller.
fn native(caller: &Fake, name: &str, args: &[u64; 6]) -> Question {
    question(name, args, Width::Native, caller)
}

fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    b[2..4].copy_from_slice(&port.to_be_bytes());
    b[4..8].copy_from_slice(&ip);
    b
}

fn sockaddr_in6(ip: std::net::Ipv6Addr, port: u16) -> Vec<u8> {
    let mut b = vec![0u8; 28];
    b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    b[2..4].copy_from_slice(&port.to_be_bytes());
    b[8..24].copy_from_slice(&ip.octets());
    b
}

const TCP4: SocketInfo = SocketInfo {
    domain: libc::AF_INET,
    protocol: libc::IPPROTO_TCP,
};
const UDP4: SocketInfo = SocketInfo {
    domain: libc::AF_INET,
    protocol: libc::IPPROTO_UDP,
};

fn connect(transport: &str, ip: &str, port: u16) -> HeldAction {
    HeldAction::Connect {
        transport: transport.into(),
        address: ip.parse().unwrap(),
        port,
        host: None,
    }
}

fn ask_net(actions: Vec<HeldAction>) -> Question {
    Question::Ask {
        kind: HeldKind::Network,
        actions,
    }
}

#[test]
fn socket_addresses_decode_by_family() {
    assert_eq!(
        decode_sockaddr(&sockaddr_in([192, 0, 2, 1], 443), false),
        Destination::Inet("192.0.2.1".parse().unwrap(), 443)
    );
    let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
    assert_eq!(
        decode_sockaddr(&sockaddr_in6(v6, 53), false),
        Destination::Inet(v6.into(), 53)
    );
    // IPv4-mapped: the IPv4 address, as the kernel judges it.
    let mapped: std::net::Ipv6Addr = "::ffff:192.0.2.9".parse().unwrap();
    assert_eq!(
        decode_sockaddr(&sockaddr_in6(mapped, 80), false),
        Destination::Inet("192.0.2.9".parse().unwrap(), 80)
    );
    // sockaddr_in6 without scope id (24 bytes) is accepted by the kernel; 23 is not.
    assert!(matches!(
        decode_sockaddr(&sockaddr_in6(v6, 53)[..24], false),
        Destination::Inet(..)
    ));
    assert_eq!(
        decode_sockaddr(&sockaddr_in6(v6, 53)[..23], false),
        Destination::Other(libc::AF_INET6 as u16)
    );
    assert_eq!(
        decode_sockaddr(&sockaddr_in([1, 2, 3, 4], 1)[..15], false),
        Destination::Other(libc::AF_INET as u16)
    );
    let mut unix = vec![0u8; 20];
    unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    assert_eq!(decode_sockaddr(&unix, false), Destination::Other(1));
    let mut unspec = sockaddr_in([10, 0, 0, 1], 53);
    unspec[..2].copy_from_slice(&0u16.to_ne_bytes());
    assert_eq!(decode_sockaddr(&unspec, false), Destination::Unspec);
    assert_eq!(
        decode_sockaddr(&unspec, true),
        Destination::Inet("10.0.0.1".parse().unwrap(), 53)
    );
    assert_eq!(decode_sockaddr(&[2], false), Destination::Other(0));
}

#[test]
fn msghdr_names_decode_in_both_widths() {
    // struct msghdr (64-bit): name ptr @0, namelen @8.
    let mut native = vec![0u8; 56];
    native[..8].copy_from_slice(&0x1234_5678_9abc_u64.to_ne_bytes());
    native[8..12].copy_from_slice(&16u32.to_ne_bytes());
    let mem = SliceMemory {
        base: BASE,
        bytes: &native,
    };
    assert_eq!(
        msghdr_name(&mem, BASE, Width::Native).unwrap(),
        (0x1234_5678_9abc, 16)
    );
    // compat_msghdr: seven 32-bit fields.
    let mut compat = vec![0u8; 28];
    compat[..4].copy_from_slice(&0x8000u32.to_ne_bytes());
    compat[4..8].copy_from_slice(&28u32.to_ne_bytes());
    let mem = SliceMemory {
        base: BASE,
        bytes: &compat,
    };
    assert_eq!(
        msghdr_name(&mem, BASE, Width::Compat).unwrap(),
        (0x8000, 28)
    );
    // A native msghdr does not fit in 28 bytes: unreadable, not guessed.
    assert!(msghdr_name(&mem, BASE, Width::Native).is_err());
    // mmsghdr: 64 bytes each.
    let mut vec2 = vec![0u8; 128];
    vec2[64..72].copy_from_slice(&0x9000u64.to_ne_bytes());
    vec2[72..76].copy_from_slice(&16u32.to_ne_bytes());
    let mem = SliceMemory {
        base: BASE,
        bytes: &vec2,
    };
    assert_eq!(
        mmsghdr_names(&mem, BASE, 2, Width::Native).unwrap(),
        vec![(0, 0), (0x9000, 16)]
    );
    assert!(mmsghdr_names(&mem, BASE, 3, Width::Native).is_err());
}

#[test]
fn strings_and_argv_are_read_up_to_their_ends() {
    // Layout: argv pointers at BASE, strings after them.
    let mut bytes = vec![0u8; 256];
    let s1 = BASE + 64;
    let s2 = BASE + 80;
    bytes[..8].copy_from_slice(&s1.to_ne_bytes());
    bytes[8..16].copy_from_slice(&s2.to_ne_bytes());
    // bytes[16..24] = NULL
    bytes[64..69].copy_from_slice(b"make\0");
    bytes[80..84].copy_from_slice(b"all\0");
    let mem = SliceMemory {
        base: BASE,
        bytes: &bytes,
    };
    assert_eq!(
        argv(&mem, BASE, Width::Native).unwrap(),
        vec!["make".to_string(), "all".to_string()]
    );
    assert_eq!(argv(&mem, 0, Width::Native).unwrap(), Vec::<String>::new());
    assert_eq!(c_string(&mem, s1, 10).unwrap(), Some(b"make".to_vec()));
    // Longer than allowed: None, not cut silently.
    assert_eq!(c_string(&mem, s1, 3).unwrap(), None);
    // A string running into unmapped memory has no end: unreadable.
    let tail = [b'x'; 8];
    let mem = SliceMemory {
        base: BASE,
        bytes: &tail,
    };
    assert!(c_string(&mem, BASE, 100).is_err());
    // Compat argv: 32-bit pointers.
    let mut bytes = vec![0u8; 64];
    bytes[..4].copy_from_slice(&((BASE + 32) as u32).to_ne_bytes());
    bytes[32..35].copy_from_slice(b"sh\0");
    let mem = SliceMemory {
        base: BASE,
        bytes: &bytes,
    };
    assert_eq!(
        argv(&mem, BASE, Width::Compat).unwrap(),
        vec!["sh".to_string()]
    );
}

#[test]
fn an_overlong_argv_is_cut_and_says_so() {
    let n = arguments::ARGV_MAX_ARGS + 5;
    let mut bytes = vec![0u8; (n + 1) * 8 + 8];
    let s = BASE + ((n + 1) * 8) as u64;
    for i in 0..n {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&s.to_ne_bytes());
    }
    let at = (n + 1) * 8;
    bytes[at..at + 2].copy_from_slice(b"a\0");
    let mem = SliceMemory {
        base: BASE,
        bytes: &bytes,
    };
    let got = argv(&mem, BASE, Width::Native).unwrap();
    assert_eq!(got.len(), arguments::ARGV_MAX_ARGS + 1);
    assert_eq!(got.last().unwrap(), "…");
}

#[test]
fn connects_to_inet_addresses_are_asked_with_their_transport() {
    let addr = sockaddr_in([192, 0, 2, 1], 443);
    let mem = SliceMemory {
        base: BASE,
        bytes: &addr,
    };
    let fake = Fake {
        mem,
        socket: Some(TCP4),
    };
    let args = [3, BASE, 16, 0, 0, 0];
    assert_eq!(
        native(&fake, "connect", &args),
        ask_net(vec![connect("tcp", "192.0.2.1", 443)])
    );
    let fake = Fake {
        socket: Some(UDP4),
        ..fake
    };
    assert_eq!(
        native(&fake, "connect", &args),
        ask_net(vec![connect("udp", "192.0.2.1", 443)])
    );
    // A raw or ICMP socket: the kernel's to judge.
    let fake = Fake {
        socket: Some(SocketInfo {
            domain: libc::AF_INET,
            protocol: libc::IPPROTO_ICMP,
        }),
        ..fake
    };
    assert_eq!(native(&fake, "connect", &args), Question::Nothing);
    // Not a socket (fd 4): the kernel fails it.
    let fake = Fake {
        socket: Some(TCP4),
        ..fake
    };
    assert_eq!(
        native(&fake, "connect", &[4, BASE, 16, 0, 0, 0]),
        Question::Nothing
    );
    // Unreadable address: the kernel fails it (EFAULT) or judges what it reads.
    assert_eq!(
        native(&fake, "connect", &[3, 0x10, 16, 0, 0, 0]),
        Question::Nothing
    );
}

#[test]
fn unix_connects_and_unaddressed_sends_are_not_asked() {
    let mut unix = vec![0u8; 110];
    unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    unix[2..10].copy_from_slice(b"/run/x\0\0");
    let fake = fake(&unix, Some(TCP4));
    assert_eq!(
        native(&fake, "connect", &[3, BASE, 110, 0, 0, 0]),
        Question::Nothing
    );
    // sendto without an address (the filter already passes these): nothing.
    assert_eq!(
        native(&fake, "sendto", &[3, BASE, 10, 0, 0, 0]),
        Question::Nothing
    );
}

#[test]
fn datagrams_are_asked_and_tcp_sends_only_with_fast_open() {
    let addr = sockaddr_in([198, 51, 100, 4], 53);
    let fake = fake(&addr, Some(UDP4));
    let sendto = [3, 0, 10, 0, BASE, 16];
    assert_eq!(
        native(&fake, "sendto", &sendto),
        ask_net(vec![connect("udp", "198.51.100.4", 53)])
    );
    let fake = Fake {
        socket: Some(TCP4),
        ..fake
    };
    assert_eq!(native(&fake, "sendto", &sendto), Question::Nothing);
    let fast_open = [3, 0, 10, MSG_FASTOPEN, BASE, 16];
    assert_eq!(
        native(&fake, "sendto", &fast_open),
        ask_net(vec![connect("tcp", "198.51.100.4", 53)])
    );
}

#[test]
fn unspec_datagrams_of_ipv4_udp_read_as_ipv4() {
    let mut addr = sockaddr_in([203, 0, 113, 5], 123);
    addr[..2].copy_from_slice(&0u16.to_ne_bytes());
    let fake = fake(&addr, Some(UDP4));
    let sendto = [3, 0, 10, 0, BASE, 16];
    assert_eq!(
        native(&fake, "sendto", &sendto),
        ask_net(vec![connect("udp", "203.0.113.5", 123)])
    );
    // On a connect it disconnects: nothing to ask.
    assert_eq!(
        native(&fake, "connect", &[3, BASE, 16, 0, 0, 0]),
        Question::Nothing
    );
}

#[test]
fn sendmsg_and_sendmmsg_ask_each_distinct_destination() {
    // Memory: [mmsghdr x3 at BASE (192 bytes)] [sockaddr A at +256] [sockaddr B at +288]
    let mut bytes = vec![0u8; 320];
    let a = BASE + 256;
    let b = BASE + 288;
    for (i, name) in [a, b, a].into_iter().enumerate() {
        bytes[i * 64..i * 64 + 8].copy_from_slice(&name.to_ne_bytes());
        bytes[i * 64 + 8..i * 64 + 12].copy_from_slice(&16u32.to_ne_bytes());
    }
    bytes[256..272].copy_from_slice(&sockaddr_in([192, 0, 2, 1], 53));
    bytes[288..304].copy_from_slice(&sockaddr_in([192, 0, 2, 2], 53));
    let fake = fake(&bytes, Some(UDP4));
    assert_eq!(
        native(&fake, "sendmmsg", &[3, BASE, 3, 0, 0, 0]),
        ask_net(vec![
            connect("udp", "192.0.2.1", 53),
            connect("udp", "192.0.2.2", 53)
        ])
    );
    // The first mmsghdr starts with a msghdr: sendmsg reads the same bytes.
    assert_eq!(
        native(&fake, "sendmsg", &[3, BASE, 0, 0, 0, 0]),
        ask_net(vec![connect("udp", "192.0.2.1", 53)])
    );
    // A msghdr without a name: nothing.
    assert_eq!(
        native(&fake, "sendmsg", &[3, BASE + 192, 0, 0, 0, 0]),
        Question::Nothing
    );
}

#[test]
fn execs_are_asked_with_the_resolved_file_and_argv() {
    let mut bytes = vec![0u8; 128];
    bytes[..10].copy_from_slice(b"/opt/tool\0");
    let argv_at = BASE + 32;
    bytes[32..40].copy_from_slice(&(BASE + 64).to_ne_bytes());
    bytes[64..69].copy_from_slice(b"tool\0");
    bytes[96..103].copy_from_slice(b"/nope/\0");
    let fake = fake(&bytes, None);
    let want = Question::Ask {
        kind: HeldKind::Exec,
        actions: vec![HeldAction::Exec {
            path: "/opt/tool".into(),
            sha256: None,
            argv: vec!["tool".into()],
            device: Some(8),
            inode: Some(99),
        }],
    };
    assert_eq!(native(&fake, "execve", &[BASE, argv_at, 0, 0, 0, 0]), want);
    let at_fdcwd = AT_FDCWD as u32 as u64;
    assert_eq!(
        native(&fake, "execveat", &[at_fdcwd, BASE, argv_at, 0, 0, 0]),
        want
    );
    // A file that does not exist: the kernel fails it with ENOENT, nothing to ask.
    assert_eq!(
        native(&fake, "execve", &[BASE + 96, argv_at, 0, 0, 0, 0]),
        Question::Nothing
    );
    // fexecve: execveat(fd, "", …, AT_EMPTY_PATH).
    let empty = BASE + 9; // the NUL of "/opt/tool"
    assert!(matches!(
        native(&fake, "execveat", &[5, empty, argv_at, 0, AT_EMPTY_PATH, 0]),
        Question::Ask {
            kind: HeldKind::Exec,
            ..
        }
    ));
    // An empty path without AT_EMPTY_PATH: ENOENT.
    assert_eq!(
        native(&fake, "execveat", &[5, empty, argv_at, 0, 0, 0]),
        Question::Nothing
    );
}

/// The live caller, against this very process: its sockets and files as run would see them.
#[test]
fn a_live_caller_names_its_sockets_and_files() {
    let me = LiveCaller::new(std::process::id());
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    use std::os::fd::AsRawFd as _;
    assert_eq!(me.socket(udp.as_raw_fd()), Some(UDP4));
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert_eq!(me.socket(file.as_raw_fd()), None);
    let sh = me.exec_file(AT_FDCWD, b"/bin/sh", false, false).unwrap();
    let meta = std::fs::metadata("/bin/sh").unwrap();
    assert_eq!((sh.device, sh.inode), (meta.dev(), meta.ino()));
    assert_eq!(sh.path, "/bin/sh");
    assert_eq!(me.exec_file(AT_FDCWD, b"/no/such/file", false, false), None);
    // A directory is not something exec runs.
    assert_eq!(me.exec_file(AT_FDCWD, b"/tmp", false, false), None);
    let mut buf = [0u8; 4];
    let word = 0x6162_6364u32.to_ne_bytes();
    me.memory()
        .read_exact(word.as_ptr() as u64, &mut buf)
        .unwrap();
    assert_eq!(buf, word);
}
