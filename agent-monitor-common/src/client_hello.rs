//! Finding the server name (SNI) in the first TLS record an agent sends, without a parser library:
//! the kernel (the egress hook, `agent-monitor-ebpf/src/server_name.rs`) copies the first data
//! packet of an agent's connection into a per-CPU buffer of [`HELLO_BUF`] bytes and judges the
//! connection by the name, so the daemon no longer relays the bytes.
//!
//! Written for the eBPF verifier: every read is `buf[i & (HELLO_BUF - 1)]` after checking `i`
//! against a bound, every loop has a constant trip count, nothing can panic, and everything is
//! `#[inline(always)]`. It refuses more than a general parser would (anything odd is
//! [`HelloScan::Malformed`]) and never names a host a well-formed hello does not carry.
//!
//! Checked on kernel 6.18: the egress program calling [`scan`] on a per-CPU buffer, then copying
//! the name it found and [`lowercase_words`], passes the verifier. What it took, and what callers
//! must keep: no branch per byte inside the byte loops, and positions the verifier could know exactly
//! are made opaque (`opaque`, the volatile reads) where many paths meet, else it walks the rest
//! once per path and gives up (1M instructions).

/// Size of the buffer the kernel copies a ClientHello into (a power of two, so indices can be
/// masked into it). A first record larger than this is refused.
pub const HELLO_BUF: usize = 16384;
const MASK: u32 = (HELLO_BUF - 1) as u32;
/// TLS record header: type, version, length.
const RECORD_HEADER: u32 = 5;
/// Handshake message header: type, length (24 bits).
const HANDSHAKE_HEADER: u32 = 4;
/// Extensions walked at most (constant loop bound); a hello with more is refused.
const MAX_EXTENSIONS: u32 = 128;
/// Longest DNS name; also the bound of the name loops.
const MAX_NAME: u32 = 255;
const EXT_SERVER_NAME: u32 = 0;
/// `encrypted_client_hello` (RFC 9849): the SNI in sight is only the outer, public name.
const EXT_ECH: u32 = 0xfe0d;

/// What the first bytes an agent sent on a connection show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloScan {
    /// The first TLS record is not all there yet: `total` bytes (header included) are needed.
    Incomplete {
        total: u32,
    },
    /// The host_name of the server_name extension: at `buf[offset..offset + len]`.
    ServerName {
        offset: u32,
        len: u32,
    },
    NoServerName,
    /// An encrypted_client_hello extension (0xfe0d) is present (whatever SNI the outer hello has).
    Encrypted,
    /// Not a TLS handshake record carrying a ClientHello (first byte not 0x16, a record version
    /// other than 3.0..3.4, or handshake type not 1).
    NotTls,
    /// A handshake record that is not a well-formed ClientHello: lengths that do not add up (also
    /// a ClientHello longer than its record, i.e. fragmented over records, or not alone in it),
    /// more than 128 extensions, two server_name extensions, a server_name list that is not one
    /// host_name, an empty name, one longer than 255 bytes or with a byte outside printable ASCII.
    Malformed,
    /// The first record does not fit in [`HELLO_BUF`].
    TooLarge,
}

/// `buf[i]`, `i` masked into the buffer. The mask is what proves to the verifier that the read
/// stays in the buffer: it does not follow the bounds checks through LLVM's rewrites, and LLVM
/// drops a mask it finds redundant (`i` already checked against a length ≤ [`HELLO_BUF`]), so `i`
/// is read back through a volatile load that LLVM cannot see through.
#[inline(always)]
fn byte(buf: &[u8; HELLO_BUF], i: u32) -> u8 {
    // SAFETY: a volatile read of a local.
    let i = unsafe { core::ptr::read_volatile(&i) };
    buf[(i & MASK) as usize]
}

/// `i` (which must be below [`HELLO_BUF`]) as the verifier sees any index into the buffer: in
/// `0..HELLO_BUF`, no more precise. Paths that differ only in where they found something then
/// look alike to it, and it verifies what follows once, not once per path.
#[inline(always)]
fn opaque(i: u32) -> u32 {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&i) & MASK }
}

/// The byte at `i`, if `i < end`.
#[inline(always)]
fn u8_at(buf: &[u8; HELLO_BUF], end: u32, i: u32) -> Option<u32> {
    if i < end {
        Some(u32::from(byte(buf, i)))
    } else {
        None
    }
}

/// The big-endian u16 at `i`, if it ends by `end`.
#[inline(always)]
fn u16_at(buf: &[u8; HELLO_BUF], end: u32, i: u32) -> Option<u32> {
    Some((u8_at(buf, end, i)? << 8) | u8_at(buf, end, i + 1)?)
}

/// The big-endian u24 at `i`, if it ends by `end`.
#[inline(always)]
fn u24_at(buf: &[u8; HELLO_BUF], end: u32, i: u32) -> Option<u32> {
    Some((u8_at(buf, end, i)? << 16) | u16_at(buf, end, i + 1)?)
}

/// Reads the first TLS record of `buf` (`len` bytes valid; more than [`HELLO_BUF`] counts as
/// [`HELLO_BUF`]) and finds its ClientHello's server name.
#[inline(always)]
pub fn scan(buf: &[u8; HELLO_BUF], len: u32) -> HelloScan {
    let len = if len > HELLO_BUF as u32 {
        HELLO_BUF as u32
    } else {
        len
    };
    match u8_at(buf, len, 0) {
        Some(0x16) => {}
        Some(_) => return HelloScan::NotTls,
        None => {
            return HelloScan::Incomplete {
                total: RECORD_HEADER,
            };
        }
    }
    let (Some(major), Some(minor), Some(record_len)) =
        (u8_at(buf, len, 1), u8_at(buf, len, 2), u16_at(buf, len, 3))
    else {
        return HelloScan::Incomplete {
            total: RECORD_HEADER,
        };
    };
    if major != 3 || minor > 4 {
        return HelloScan::NotTls;
    }
    let total = RECORD_HEADER + record_len;
    if total > HELLO_BUF as u32 {
        return HelloScan::TooLarge;
    }
    if len < total {
        return HelloScan::Incomplete { total };
    }
    match u8_at(buf, total, RECORD_HEADER) {
        Some(1) => {}
        Some(_) => return HelloScan::NotTls,
        None => return HelloScan::Malformed,
    }
    // The ClientHello fills its record exactly: a longer one continues in the next record
    // (fragmented), which the kernel does not see.
    match u24_at(buf, total, RECORD_HEADER + 1) {
        Some(n) if RECORD_HEADER + HANDSHAKE_HEADER + n == total => {}
        _ => return HelloScan::Malformed,
    }
    match body(buf, total) {
        Some(found) => found,
        None => HelloScan::Malformed,
    }
}

/// The ClientHello body, from client_version to the end of the extensions, which must end at
/// `end`. `None`: malformed.
#[inline(always)]
fn body(buf: &[u8; HELLO_BUF], end: u32) -> Option<HelloScan> {
    // client_version(2), random(32).
    let mut at = RECORD_HEADER + HANDSHAKE_HEADER + 2 + 32;
    let session_id = u8_at(buf, end, at)?;
    if session_id > 32 {
        return None;
    }
    at += 1 + session_id;
    let suites = u16_at(buf, end, at)?;
    if suites < 2 || suites & 1 != 0 {
        return None;
    }
    at += 2 + suites;
    let compression = u8_at(buf, end, at)?;
    if compression < 1 {
        return None;
    }
    at += 1 + compression;
    if at == end {
        return Some(HelloScan::NoServerName);
    }
    if at + 2 + u16_at(buf, end, at)? != end {
        return None;
    }
    at += 2;
    // Where the server_name extension's data starts (0: none yet). Only noted in the walk and
    // read after it, through `opaque`: a name parsed inside the walk, or a position the verifier
    // knows exactly, would make it verify the rest of the walk once per extension the name could
    // have been found at.
    let mut server_name = 0;
    for _ in 0..MAX_EXTENSIONS {
        if at == end {
            break;
        }
        let kind = u16_at(buf, end, at)?;
        let size = u16_at(buf, end, at + 2)?;
        let next = at + 4 + size;
        if next > end {
            return None;
        }
        if kind == EXT_ECH {
            return Some(HelloScan::Encrypted);
        }
        if kind == EXT_SERVER_NAME {
            // A list length, a name type and a name length at least, so `at + 4 < end`, which
            // `opaque` needs.
            if server_name != 0 || size < 5 {
                return None;
            }
            server_name = opaque(at + 4);
        }
        at = next;
    }
    if at != end {
        return None; // more than MAX_EXTENSIONS
    }
    if server_name == 0 {
        return Some(HelloScan::NoServerName);
    }
    let size = u16_at(buf, end, server_name - 2)?;
    let (offset, len) = host_name(buf, server_name, server_name + size)?;
    Some(HelloScan::ServerName { offset, len })
}

/// The server_name extension's body `[at, end)`: a list holding exactly one host_name entry
/// (RFC 6066 allows one name per type and defines only host_name). Its offset and length.
#[inline(always)]
fn host_name(buf: &[u8; HELLO_BUF], at: u32, end: u32) -> Option<(u32, u32)> {
    if at + 2 + u16_at(buf, end, at)? != end || u8_at(buf, end, at + 2)? != 0 {
        return None;
    }
    let len = u16_at(buf, end, at + 3)?;
    let offset = at + 5;
    if len == 0 || len > MAX_NAME || offset + len != end {
        return None;
    }
    // Printable ASCII only: host names travel as A-labels, and anything else cannot be a name
    // the daemon wrote (nor is it UTF-8 the daemon's own parser would read the same way). Bit
    // arithmetic, no branch per byte: every branch inside a loop multiplies what the verifier
    // walks through. `offset + k < end`, checked above through `offset + len == end`.
    let mut bad = 0;
    for k in 0..MAX_NAME {
        if k >= len {
            break;
        }
        let b = u32::from(byte(buf, offset + k));
        // Bit 8 set: b < 0x21 (b + 0xdf has no carry into it) or b > 0x7e (b + 0x81 has).
        bad |= (!(b + 0xdf) | (b + 0x81)) & 0x100;
    }
    if bad != 0 {
        return None;
    }
    Some((offset, len))
}

/// ASCII-lowercases `name` eight bytes at a time, without a branch: the kernel's copy of a
/// server name (printable ASCII, as [`scan`] checked, then zeros) becomes the server-name map's
/// key in 32 steps, not 256 (each step of a loop is a step the verifier walks). For bytes below
/// 0x80 no sum carries into the next byte: bit 7 of `b + 0x3f` set and of `b + 0x25` clear
/// exactly for `A..=Z`.
#[inline(always)]
pub fn lowercase_words(name: &mut [u8; 256]) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    for w in 0..32usize {
        let mut word = [0u8; 8];
        word.copy_from_slice(&name[w * 8..w * 8 + 8]);
        let x = u64::from_le_bytes(word);
        let upper = (x + 0x3f * ONES) & !(x + 0x25 * ONES) & (0x80 * ONES);
        name[w * 8..w * 8 + 8].copy_from_slice(&(x | (upper >> 2)).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{boxed::Box, vec, vec::Vec};

    use super::*;

    /// Extensions of a hello: type and data.
    type Extensions = Vec<(u16, Vec<u8>)>;

    /// A ClientHello built field by field, so each test can break one thing.
    struct Hello {
        handshake_type: u8,
        session_id: usize,
        suites: Vec<u8>,
        compression: Vec<u8>,
        /// `None`: the hello ends after compression_methods.
        extensions: Option<Extensions>,
    }

    impl Hello {
        fn with(extensions: Extensions) -> Self {
            Hello {
                handshake_type: 1,
                session_id: 32,
                suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                extensions: Some(extensions),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut body = vec![3, 3];
            body.extend((0..32).map(|i| i as u8)); // random
            body.push(self.session_id as u8);
            body.extend((0..self.session_id).map(|i| 0x80 | i as u8));
            body.extend((self.suites.len() as u16).to_be_bytes());
            body.extend(&self.suites);
            body.push(self.compression.len() as u8);
            body.extend(&self.compression);
            if let Some(extensions) = &self.extensions {
                let mut all = Vec::new();
                for (kind, data) in extensions {
                    all.extend(kind.to_be_bytes());
                    all.extend((data.len() as u16).to_be_bytes());
                    all.extend(data);
                }
                body.extend((all.len() as u16).to_be_bytes());
                body.extend(all);
            }
            let mut out = vec![0x16, 3, 1];
            out.extend(((body.len() + 4) as u16).to_be_bytes());
            out.push(self.handshake_type);
            out.extend(&(body.len() as u32).to_be_bytes()[1..]);
            out.extend(body);
            out
        }
    }

    /// A server_name extension whose list holds `entries` (name_type, name).
    fn server_names(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        (0, data)
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        server_names(&[(0, name)])
    }

    fn alpn() -> (u16, Vec<u8>) {
        (16, vec![0, 3, 2, b'h', b'2'])
    }

    fn ech() -> (u16, Vec<u8>) {
        (0xfe0d, vec![0, 0, 1, 0, 1, 7, 0, 0])
    }

    /// `bytes` at the start of a kernel-sized buffer whose rest is filled with bytes that would
    /// change the answer if read (the kernel's buffer holds whatever came before).
    fn buffer(bytes: &[u8]) -> Box<[u8; HELLO_BUF]> {
        let mut buf = Box::new([0x16u8; HELLO_BUF]);
        let n = bytes.len().min(HELLO_BUF);
        buf[..n].copy_from_slice(&bytes[..n]);
        buf
    }

    fn scan_bytes(bytes: &[u8]) -> HelloScan {
        scan(&buffer(bytes), bytes.len() as u32)
    }

    /// The name a scan found, read back from `bytes`.
    fn found(bytes: &[u8]) -> Option<&[u8]> {
        match scan_bytes(bytes) {
            HelloScan::ServerName { offset, len } => {
                Some(&bytes[offset as usize..(offset + len) as usize])
            }
            other => panic!("no server name: {other:?}"),
        }
    }

    #[test]
    fn finds_the_server_name_among_other_extensions() {
        let bytes = Hello::with(vec![alpn(), sni(b"api.example.com"), (43, vec![2, 3, 4])]).bytes();
        assert_eq!(found(&bytes), Some(&b"api.example.com"[..]));
        // The offset is the name's own: after the handshake header, fixed fields, session id
        // (32), suites (2+4), compression (1+1), extensions length, ALPN (4+5), the server_name
        // extension header (4), list length (2), name type (1) and name length (2).
        let offset = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 1 + 1 + 2 + 9 + 4 + 2 + 1 + 2;
        assert_eq!(
            scan_bytes(&bytes),
            HelloScan::ServerName {
                offset,
                len: "api.example.com".len() as u32
            }
        );
    }

    #[test]
    fn a_hello_without_a_server_name_has_none() {
        let mut no_extensions = Hello::with(vec![]);
        no_extensions.extensions = None;
        assert_eq!(scan_bytes(&no_extensions.bytes()), HelloScan::NoServerName);
        assert_eq!(
            scan_bytes(&Hello::with(vec![]).bytes()),
            HelloScan::NoServerName
        );
        assert_eq!(
            scan_bytes(&Hello::with(vec![alpn(), (43, vec![2, 3, 4])]).bytes()),
            HelloScan::NoServerName
        );
    }

    #[test]
    fn encrypted_client_hello_is_seen_before_or_after_the_server_name() {
        for extensions in [
            vec![ech(), sni(b"public.example")],
            vec![sni(b"public.example"), alpn(), ech()],
            vec![ech()],
        ] {
            assert_eq!(
                scan_bytes(&Hello::with(extensions.clone()).bytes()),
                HelloScan::Encrypted,
                "{extensions:?}"
            );
        }
    }

    #[test]
    fn odd_server_name_extensions_are_malformed() {
        let cases: [(&str, Extensions); 7] = [
            ("two extensions", vec![sni(b"a.example"), sni(b"b.example")]),
            ("not host_name", vec![server_names(&[(1, b"a.example")])]),
            (
                "two entries",
                vec![server_names(&[(0, b"a.example"), (0, b"b.example")])],
            ),
            ("empty name", vec![sni(b"")]),
            ("name of 256 bytes", vec![sni(&[b'a'; 256])]),
            ("space in the name", vec![sni(b"a example")]),
            ("byte above ASCII", vec![sni(b"caf\xc3\xa9.example")]),
        ];
        for (what, extensions) in cases {
            assert_eq!(
                scan_bytes(&Hello::with(extensions).bytes()),
                HelloScan::Malformed,
                "{what}"
            );
        }
        // Control: the longest name is fine.
        let long = [b'a'; 255];
        assert_eq!(
            found(&Hello::with(vec![sni(&long)]).bytes()),
            Some(&long[..])
        );
    }

    #[test]
    fn lengths_that_do_not_add_up_are_malformed() {
        let mut session = Hello::with(vec![sni(b"a.example")]);
        session.session_id = 33;
        assert_eq!(scan_bytes(&session.bytes()), HelloScan::Malformed);
        let mut odd = Hello::with(vec![sni(b"a.example")]);
        odd.suites = vec![0x13, 0x01, 0x13];
        assert_eq!(scan_bytes(&odd.bytes()), HelloScan::Malformed);
        let mut none = Hello::with(vec![sni(b"a.example")]);
        none.compression = vec![];
        assert_eq!(scan_bytes(&none.bytes()), HelloScan::Malformed);

        let good = Hello::with(vec![sni(b"a.example")]).bytes();
        // The handshake message claims more than its record holds: fragmented.
        let mut fragmented = good.clone();
        fragmented[8] += 1;
        assert_eq!(scan_bytes(&fragmented), HelloScan::Malformed);
        // ... or less: the record holds something after it.
        let mut short = good.clone();
        short[8] -= 1;
        assert_eq!(scan_bytes(&short), HelloScan::Malformed);
        // The extensions claim more than the message holds.
        let mut extensions = good.clone();
        let at = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 1 + 1;
        extensions[at + 1] += 1;
        assert_eq!(scan_bytes(&extensions), HelloScan::Malformed);
        // One extension claims more than the extensions hold.
        let mut extension = good.clone();
        extension[at + 2 + 3] += 1;
        assert_eq!(scan_bytes(&extension), HelloScan::Malformed);
        // Control: the unbroken hello reads.
        assert_eq!(found(&good), Some(&b"a.example"[..]));
    }

    #[test]
    fn walks_at_most_128_extensions() {
        let padding = |n: usize| {
            (0..n)
                .map(|i| (0x1000 + i as u16, vec![]))
                .collect::<Vec<_>>()
        };
        let mut last = padding(127);
        last.push(sni(b"a.example"));
        assert_eq!(found(&Hello::with(last).bytes()), Some(&b"a.example"[..]));
        let mut over = padding(128);
        over.push(sni(b"a.example"));
        assert_eq!(scan_bytes(&Hello::with(over).bytes()), HelloScan::Malformed);
    }

    #[test]
    fn every_prefix_of_a_hello_asks_for_the_whole_record() {
        let bytes = Hello::with(vec![alpn(), sni(b"a.example"), ech()]).bytes();
        let full = bytes.len() as u32;
        // The whole hello stays in the buffer: only `len` says how much of it arrived.
        let buf = buffer(&bytes);
        for n in 0..full {
            let want = if n < 5 { 5 } else { full };
            assert_eq!(
                scan(&buf, n),
                HelloScan::Incomplete { total: want },
                "{n} bytes"
            );
        }
        assert_eq!(scan(&buf, full), HelloScan::Encrypted);
        // Bytes after the record do not matter.
        assert_eq!(scan(&buf, HELLO_BUF as u32 + 1), HelloScan::Encrypted);
    }

    #[test]
    fn a_record_larger_than_the_buffer_is_too_large() {
        let big = Hello::with(vec![sni(b"a.example"), (21, vec![0; HELLO_BUF])]).bytes();
        assert_eq!(scan_bytes(&big[..5]), HelloScan::TooLarge);
        assert_eq!(scan_bytes(&big), HelloScan::TooLarge);
        // Control: one that just fits reads.
        let fits = HELLO_BUF
            - Hello::with(vec![sni(b"a.example"), (21, vec![])])
                .bytes()
                .len();
        let bytes = Hello::with(vec![sni(b"a.example"), (21, vec![0; fits])]).bytes();
        assert_eq!(bytes.len(), HELLO_BUF);
        assert_eq!(found(&bytes), Some(&b"a.example"[..]));
    }

    #[test]
    fn other_protocols_and_messages_are_not_tls() {
        assert_eq!(
            scan_bytes(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            HelloScan::NotTls
        );
        assert_eq!(scan_bytes(b"G"), HelloScan::NotTls);
        let mut server_hello = Hello::with(vec![sni(b"a.example")]);
        server_hello.handshake_type = 2;
        assert_eq!(scan_bytes(&server_hello.bytes()), HelloScan::NotTls);
        let mut version = Hello::with(vec![sni(b"a.example")]).bytes();
        version[1] = 4;
        assert_eq!(scan_bytes(&version), HelloScan::NotTls);
    }

    #[test]
    fn lowercasing_by_words_is_lowercasing_every_printable_byte() {
        let mut name = [0u8; 256];
        for (i, b) in (0x21u8..=0x7e)
            .chain(0x21u8..=0x7e)
            .chain(0x21u8..=0x7e)
            .enumerate()
        {
            if i < 250 {
                name[i] = b;
            }
        }
        let mut want = name;
        want.make_ascii_lowercase();
        lowercase_words(&mut name);
        assert_eq!(name, want);
    }
}
