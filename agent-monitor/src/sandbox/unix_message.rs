//! The pure half of a named datagram send judged on the resolved socket (unix_send.rs does the
//! I/O): reading the caller's `struct msghdr`, its iovecs and its control messages out of its
//! memory the way the kernel reads them (`____sys_sendmsg`, `__scm_send`), and saying precisely
//! what is not supported. Over a [`Memory`], so it is tested against a byte buffer.

use super::arguments::{Memory, Width};

/// Most iovecs one message may have (UIO_MAXIOV); more: EMSGSIZE, as the kernel answers.
pub const IOV_MAX: u64 = 1024;
/// Most descriptors one message may carry (SCM_MAX_FD); more: EINVAL, as the kernel answers.
pub const SCM_MAX_FD: usize = 253;
/// Most descriptors of the agent's passed on: the connector's channel carries the caller's
/// socket, root, cwd and the payload beside them, in one message of at most [`SCM_MAX_FD`].
pub const PASSED_FDS_MAX: usize = SCM_MAX_FD - 4;
/// Most control bytes read (the kernel's own bound is `net.core.optmem_max`, 20–128 KiB): above
/// it, ENOBUFS, as the kernel answers above its bound.
pub const CONTROL_MAX: u64 = 64 * 1024;
/// Largest datagram the supervisor copies (the kernel's bound is the socket's SO_SNDBUF − 32,
/// which a root agent can raise to 2 GiB with SO_SNDBUFFORCE): above it, refused and reported.
pub const PAYLOAD_MAX: u64 = 8 * 1024 * 1024;

/// The fields of a `struct msghdr` (or `compat_msghdr`) a send reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub name: u64,
    pub namelen: u32,
    pub iov: u64,
    pub iovlen: u64,
    pub control: u64,
    pub controllen: u64,
}

impl Header {
    /// The send names an address: the kernel reads one only from a non-NULL msg_name with a
    /// non-zero length (`__copy_msghdr` zeroes the length of a NULL name).
    pub fn names_an_address(&self) -> bool {
        self.name != 0 && self.namelen != 0
    }
}

/// Field offsets of `struct msghdr` (native: pointers and size_t of 8 bytes, int msg_namelen
/// padded to 8) and of `compat_msghdr` (seven 32-bit fields).
struct Layout {
    size: usize,
    namelen: usize,
    iov: usize,
    iovlen: usize,
    control: usize,
    controllen: usize,
    /// sizeof(struct iovec)
    iovec: usize,
    /// sizeof(struct cmsghdr) and the alignment of CMSG_ALIGN
    cmsghdr: usize,
    cmsg_align: usize,
}

fn layout(width: Width) -> Layout {
    match width {
        Width::Native => Layout {
            size: 56,
            namelen: 8,
            iov: 16,
            iovlen: 24,
            control: 32,
            controllen: 40,
            iovec: 16,
            cmsghdr: 16,
            cmsg_align: 8,
        },
        Width::Compat => Layout {
            size: 28,
            namelen: 4,
            iov: 8,
            iovlen: 12,
            control: 16,
            controllen: 20,
            iovec: 8,
            cmsghdr: 12,
            cmsg_align: 4,
        },
    }
}

fn word(width: Width, buf: &[u8], at: usize) -> u64 {
    match width {
        Width::Native => u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap_or_default()),
        Width::Compat => u64::from(u32_at(buf, at)),
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default())
}

/// Why a named send is not performed: an errno the kernel would answer itself, or something the
/// supervisor does not support (refused with EPERM and reported, never passed through).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the caller's memory at {0:#x} cannot be read")]
    Fault(u64),
    #[error("{0} iovecs, more than UIO_MAXIOV")]
    TooManyIovecs(u64),
    #[error("an iovec of {0} bytes (negative as ssize_t)")]
    BadIovecLength(u64),
    #[error("a control message whose length does not fit the control buffer")]
    BadControl,
    #[error("{0} bytes of control data, more than {CONTROL_MAX}")]
    ControlTooLong(u64),
    #[error("more than {SCM_MAX_FD} descriptors in SCM_RIGHTS")]
    TooManyFds,
    /// Not supported: refused (EPERM) and reported with this reason.
    #[error("{0}")]
    Unsupported(String),
}

impl MessageError {
    /// The errno the call fails with.
    pub fn errno(&self) -> i32 {
        match self {
            MessageError::Fault(_) => libc::EFAULT,
            MessageError::TooManyIovecs(_) => libc::EMSGSIZE,
            MessageError::BadIovecLength(_) | MessageError::BadControl => libc::EINVAL,
            MessageError::TooManyFds => libc::EINVAL,
            MessageError::ControlTooLong(_) => libc::ENOBUFS,
            MessageError::Unsupported(_) => libc::EPERM,
        }
    }

    /// A refusal of the supervisor's (reported), not the kernel's own answer.
    pub fn reported(&self) -> bool {
        matches!(self, MessageError::Unsupported(_))
    }
}

fn fault(addr: u64) -> impl Fn(super::arguments::Unreadable) -> MessageError {
    move |_| MessageError::Fault(addr)
}

/// The `struct msghdr` at `addr`.
pub fn read_header(mem: &dyn Memory, addr: u64, width: Width) -> Result<Header, MessageError> {
    let l = layout(width);
    let mut buf = [0u8; 56];
    mem.read_exact(addr, &mut buf[..l.size])
        .map_err(fault(addr))?;
    Ok(Header {
        name: word(width, &buf, 0),
        namelen: u32_at(&buf, l.namelen),
        iov: word(width, &buf, l.iov),
        iovlen: word(width, &buf, l.iovlen),
        control: word(width, &buf, l.control),
        controllen: word(width, &buf, l.controllen),
    })
}

/// One stretch of the payload in the caller's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub len: u64,
}

/// The iovecs of `header`, checked as the kernel checks them (`import_iovec`).
pub fn read_iovecs(
    mem: &dyn Memory,
    header: &Header,
    width: Width,
) -> Result<Vec<Segment>, MessageError> {
    if header.iovlen > IOV_MAX {
        return Err(MessageError::TooManyIovecs(header.iovlen));
    }
    let l = layout(width);
    let n = header.iovlen as usize;
    let mut buf = vec![0u8; n * l.iovec];
    mem.read_exact(header.iov, &mut buf)
        .map_err(fault(header.iov))?;
    let half = l.iovec / 2;
    buf.chunks_exact(l.iovec)
        .map(|v| {
            let (base, len) = (word(width, v, 0), word(width, v, half));
            // ssize_t: a length with the sign bit set is EINVAL (compat lengths are unsigned
            // 32-bit and cannot be).
            if width == Width::Native && len > i64::MAX as u64 {
                return Err(MessageError::BadIovecLength(len));
            }
            Ok(Segment { base, len })
        })
        .collect()
}

/// The total length of `segments`.
pub fn payload_len(segments: &[Segment]) -> u64 {
    segments
        .iter()
        .map(|s| s.len)
        .fold(0u64, u64::saturating_add)
}

/// Copies the payload out of the caller's memory (at most [`PAYLOAD_MAX`] bytes, checked by the
/// caller first).
pub fn read_payload(mem: &dyn Memory, segments: &[Segment]) -> Result<Vec<u8>, MessageError> {
    let mut out = Vec::with_capacity(payload_len(segments).min(PAYLOAD_MAX) as usize);
    for s in segments.iter().filter(|s| s.len > 0) {
        let at = out.len();
        out.resize(at + s.len as usize, 0);
        mem.read_exact(s.base, &mut out[at..])
            .map_err(fault(s.base))?;
    }
    Ok(out)
}

/// What the control data of a send carries, of what a unix socket reads (SOL_SOCKET only:
/// `__scm_send` skips the other levels).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Control {
    /// SCM_RIGHTS: the caller's descriptor numbers, in order.
    pub fds: Vec<i32>,
}

const SCM_RIGHTS: i32 = 1;
const SCM_CREDENTIALS: i32 = 2;

/// Reads and checks the control data of `header` as `__scm_send` walks it (CMSG_FIRSTHDR,
/// CMSG_NXTHDR, CMSG_OK). SCM_CREDENTIALS and every other SOL_SOCKET type are not supported.
pub fn read_control(
    mem: &dyn Memory,
    header: &Header,
    width: Width,
) -> Result<Control, MessageError> {
    let mut control = Control::default();
    if header.controllen == 0 {
        return Ok(control);
    }
    if header.controllen > CONTROL_MAX {
        return Err(MessageError::ControlTooLong(header.controllen));
    }
    let mut buf = vec![0u8; header.controllen as usize];
    mem.read_exact(header.control, &mut buf)
        .map_err(fault(header.control))?;
    parse_control(&buf, width, &mut control)?;
    Ok(control)
}

fn parse_control(buf: &[u8], width: Width, control: &mut Control) -> Result<(), MessageError> {
    let l = layout(width);
    let align = |n: usize| n.div_ceil(l.cmsg_align) * l.cmsg_align;
    let mut at = 0usize;
    // CMSG_FIRSTHDR: none when the buffer cannot hold one header.
    while at + l.cmsghdr <= buf.len() {
        let len = word(width, buf, at);
        let level = u32_at(buf, at + l.cmsghdr - 8) as i32;
        let kind = u32_at(buf, at + l.cmsghdr - 4) as i32;
        // CMSG_OK
        if len < l.cmsghdr as u64 || len > (buf.len() - at) as u64 {
            return Err(MessageError::BadControl);
        }
        let len = len as usize;
        if level == libc::SOL_SOCKET {
            match kind {
                SCM_RIGHTS => {
                    let data = &buf[at + l.cmsghdr..at + len];
                    for fd in data.chunks_exact(4) {
                        control.fds.push(u32_at(fd, 0) as i32);
                    }
                    if control.fds.len() > SCM_MAX_FD {
                        return Err(MessageError::TooManyFds);
                    }
                }
                SCM_CREDENTIALS => {
                    return Err(MessageError::Unsupported(
                        "SCM_CREDENTIALS in a named datagram send: the send is made for the \
                         agent by a root process, which must not pass credentials the agent \
                         chose (docs/unix-sockets.md)"
                            .into(),
                    ));
                }
                other => {
                    return Err(MessageError::Unsupported(format!(
                        "control message SOL_SOCKET type {other} in a named datagram send is \
                         not supported"
                    )));
                }
            }
        }
        // CMSG_NXTHDR
        at += align(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::arguments::Unreadable;

    /// A caller's memory: one mapped range from `base`.
    struct Bytes {
        base: u64,
        data: Vec<u8>,
    }

    impl Memory for Bytes {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(off) = addr.checked_sub(self.base) else {
                return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
            };
            let off = off as usize;
            if off >= self.data.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
            }
            let n = buf.len().min(self.data.len() - off);
            buf[..n].copy_from_slice(&self.data[off..off + n]);
            Ok(n)
        }
    }

    const BASE: u64 = 0x1000;

    fn put64(d: &mut [u8], at: usize, v: u64) {
        d[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn put32(d: &mut [u8], at: usize, v: u32) {
        d[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    /// A native msghdr at BASE with two iovecs at +0x100 ("hello " and "world" at +0x200 and
    /// +0x300), a name at +0x80 and `control` at +0x400.
    fn native_message(control: &[u8]) -> Bytes {
        let mut d = vec![0u8; 0x400 + control.len().max(0x400)];
        put64(&mut d, 0, BASE + 0x80);
        put32(&mut d, 8, 12);
        put64(&mut d, 16, BASE + 0x100);
        put64(&mut d, 24, 2);
        put64(
            &mut d,
            32,
            if control.is_empty() { 0 } else { BASE + 0x400 },
        );
        put64(&mut d, 40, control.len() as u64);
        put64(&mut d, 0x100, BASE + 0x200);
        put64(&mut d, 0x108, 6);
        put64(&mut d, 0x110, BASE + 0x300);
        put64(&mut d, 0x118, 5);
        d[0x200..0x206].copy_from_slice(b"hello ");
        d[0x300..0x305].copy_from_slice(b"world");
        d[0x400..0x400 + control.len()].copy_from_slice(control);
        Bytes {
            base: BASE,
            data: d,
        }
    }

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        put64(&mut c, 0, 16 + data.len() as u64);
        put32(&mut c, 8, level as u32);
        put32(&mut c, 12, kind as u32);
        c.extend_from_slice(data);
        while c.len() % 8 != 0 {
            c.push(0);
        }
        c
    }

    fn fds(list: &[i32]) -> Vec<u8> {
        list.iter().flat_map(|f| f.to_ne_bytes()).collect()
    }

    #[test]
    fn a_native_header_its_iovecs_and_payload_are_read_as_the_kernel_reads_them() {
        let mem = native_message(&[]);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        assert_eq!(h.name, BASE + 0x80);
        assert_eq!(h.namelen, 12);
        assert!(h.names_an_address());
        let segs = read_iovecs(&mem, &h, Width::Native).unwrap();
        assert_eq!(payload_len(&segs), 11);
        assert_eq!(read_payload(&mem, &segs).unwrap(), b"hello world");
        assert_eq!(
            read_control(&mem, &h, Width::Native).unwrap(),
            Control::default()
        );
    }

    #[test]
    fn a_null_name_or_a_zero_length_names_no_address() {
        let h = Header {
            name: 0,
            namelen: 12,
            ..Header::default()
        };
        assert!(!h.names_an_address());
        let h = Header {
            name: BASE,
            namelen: 0,
            ..Header::default()
        };
        assert!(!h.names_an_address());
    }

    #[test]
    fn a_compat_header_has_seven_32_bit_fields() {
        let mut d = vec![0u8; 0x200];
        let words = [BASE as u32 + 0x80, 20, BASE as u32 + 0x100, 1, 0, 0, 0];
        for (i, w) in words.iter().enumerate() {
            put32(&mut d, i * 4, *w);
        }
        put32(&mut d, 0x100, BASE as u32 + 0x180);
        put32(&mut d, 0x104, 3);
        d[0x180..0x183].copy_from_slice(b"abc");
        let mem = Bytes {
            base: BASE,
            data: d,
        };
        let h = read_header(&mem, BASE, Width::Compat).unwrap();
        assert_eq!((h.name, h.namelen, h.iovlen), (BASE + 0x80, 20, 1));
        let segs = read_iovecs(&mem, &h, Width::Compat).unwrap();
        assert_eq!(read_payload(&mem, &segs).unwrap(), b"abc");
    }

    #[test]
    fn sizes_the_kernel_refuses_get_its_errno() {
        let mem = native_message(&[]);
        let mut h = read_header(&mem, BASE, Width::Native).unwrap();
        h.iovlen = IOV_MAX + 1;
        let e = read_iovecs(&mem, &h, Width::Native).unwrap_err();
        assert_eq!(e.errno(), libc::EMSGSIZE);
        assert!(!e.reported());
        h.iovlen = 2;
        h.iov = 0xdead_0000;
        assert_eq!(
            read_iovecs(&mem, &h, Width::Native).unwrap_err(),
            MessageError::Fault(0xdead_0000)
        );
        let h = Header {
            controllen: CONTROL_MAX + 1,
            ..h
        };
        assert_eq!(
            read_control(&mem, &h, Width::Native).unwrap_err().errno(),
            libc::ENOBUFS
        );
        let _ = Unreadable { addr: 0 };
    }

    #[test]
    fn a_negative_iovec_length_is_einval() {
        let mut mem = native_message(&[]);
        put64(&mut mem.data, 0x108, u64::MAX);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        assert_eq!(
            read_iovecs(&mem, &h, Width::Native).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn scm_rights_descriptors_are_collected_across_messages() {
        let mut c = cmsg(libc::SOL_SOCKET, SCM_RIGHTS, &fds(&[3, 4]));
        // Another level: skipped, as __scm_send skips it.
        c.extend(cmsg(libc::SOL_IP, 8, &[1, 0, 0, 0]));
        c.extend(cmsg(libc::SOL_SOCKET, SCM_RIGHTS, &fds(&[7])));
        let mem = native_message(&c);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        assert_eq!(
            read_control(&mem, &h, Width::Native).unwrap().fds,
            vec![3, 4, 7]
        );
    }

    #[test]
    fn credentials_and_unknown_types_are_refused_and_reported() {
        let creds = cmsg(libc::SOL_SOCKET, SCM_CREDENTIALS, &[0u8; 12]);
        let mem = native_message(&creds);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        let e = read_control(&mem, &h, Width::Native).unwrap_err();
        assert!(e.reported());
        assert_eq!(e.errno(), libc::EPERM);
        assert!(e.to_string().contains("SCM_CREDENTIALS"));
        let other = cmsg(libc::SOL_SOCKET, 0x4f, &[0u8; 4]);
        let mem = native_message(&other);
        assert!(
            read_control(&mem, &h, Width::Native)
                .unwrap_err()
                .reported()
        );
    }

    #[test]
    fn a_control_length_past_the_buffer_is_einval_and_too_many_fds_too() {
        let mut c = cmsg(libc::SOL_SOCKET, SCM_RIGHTS, &fds(&[3]));
        put64(&mut c, 0, 64);
        let mem = native_message(&c);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        assert_eq!(
            read_control(&mem, &h, Width::Native).unwrap_err(),
            MessageError::BadControl
        );
        let many: Vec<i32> = (0..(SCM_MAX_FD as i32 + 1)).collect();
        let c = cmsg(libc::SOL_SOCKET, SCM_RIGHTS, &fds(&many));
        let mem = native_message(&c);
        let h = read_header(&mem, BASE, Width::Native).unwrap();
        assert_eq!(
            read_control(&mem, &h, Width::Native).unwrap_err(),
            MessageError::TooManyFds
        );
    }

    #[test]
    fn a_compat_control_message_has_a_12_byte_header() {
        let mut c = vec![0u8; 12];
        put32(&mut c, 0, 16);
        put32(&mut c, 4, libc::SOL_SOCKET as u32);
        put32(&mut c, 8, SCM_RIGHTS as u32);
        c.extend(fds(&[9]));
        let mut control = Control::default();
        parse_control(&c, Width::Compat, &mut control).unwrap();
        assert_eq!(control.fds, vec![9]);
    }
}
