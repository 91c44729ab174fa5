//! What a connection to the egress endpoint opens with, read from bytes peeked off the socket
//! (never consumed, so the bytes reach the server or interception unchanged): a TLS ClientHello
//! (its server name, and whether it hides the real one with ECH), a plain-HTTP request head (its
//! `Host`), or something else. Pure. TLS through `tls-parser`, HTTP through `httparse`.

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_plaintext,
};

/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// Largest TLS plaintext record (2^14) plus the allowed expansion: a longer length is not TLS.
const MAX_RECORD: usize = (1 << 14) + 2048;
/// Longest plain-HTTP request head read before giving up on finding its end.
pub const MAX_HTTP_HEAD: usize = 16 * 1024;
/// Most bytes [`classify`] ever needs.
pub const MAX_PEEK: usize = RECORD_HEADER + MAX_RECORD;
const HANDSHAKE: u8 = 0x16;
/// `encrypted_client_hello` (RFC 9849) and the draft ESNI extension's code point.
const EXT_ECH: u16 = 0xfe0d;

/// The opening of a connection, as far as `bytes` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opening {
    /// Not enough bytes yet to tell.
    Incomplete,
    Tls(ClientHello),
    /// A TLS handshake record that is not a readable ClientHello (a ClientHello split over
    /// several records is not read either).
    BadTls(String),
    /// A plain-HTTP request head; `host` is its `Host` header without a port.
    Http {
        host: Option<String>,
    },
    /// Neither TLS nor HTTP.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host name, if any.
    pub sni: Option<String>,
    /// An `encrypted_client_hello` (or ESNI) extension is present: the SNI seen is the outer,
    /// public name, not the one the client means.
    pub ech: bool,
}

/// What the first `bytes` of a connection are.
pub fn classify(bytes: &[u8]) -> Opening {
    match bytes.first() {
        None => Opening::Incomplete,
        Some(&HANDSHAKE) => tls(bytes),
        Some(_) => http(bytes),
    }
}

fn tls(bytes: &[u8]) -> Opening {
    if bytes.len() < RECORD_HEADER {
        return Opening::Incomplete;
    }
    let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if len > MAX_RECORD {
        return Opening::Other;
    }
    if bytes.len() < RECORD_HEADER + len {
        return Opening::Incomplete;
    }
    let record = &bytes[..RECORD_HEADER + len];
    let plaintext = match parse_tls_plaintext(record) {
        Ok((_, p)) => p,
        Err(e) => return Opening::BadTls(format!("TLS record not readable: {e:?}")),
    };
    let hello = plaintext.msg.iter().find_map(|m| match m {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) => Some(ch),
        _ => None,
    });
    let Some(hello) = hello else {
        return Opening::BadTls("the first TLS record holds no ClientHello".into());
    };
    let mut out = ClientHello {
        sni: None,
        ech: false,
    };
    let Some(ext) = hello.ext else {
        return Opening::Tls(out);
    };
    let extensions = match parse_tls_client_hello_extensions(ext) {
        Ok((_, e)) => e,
        Err(e) => return Opening::BadTls(format!("ClientHello extensions not readable: {e:?}")),
    };
    for e in extensions {
        match e {
            TlsExtension::SNI(names) => {
                out.sni = names
                    .iter()
                    .find(|(t, _)| *t == SNIType::HostName)
                    .and_then(|(_, n)| std::str::from_utf8(n).ok())
                    .map(str::to_string);
            }
            TlsExtension::EncryptedServerName { .. } => out.ech = true,
            TlsExtension::Unknown(t, _) if t.0 == EXT_ECH => out.ech = true,
            _ => {}
        }
    }
    Opening::Tls(out)
}

fn http(bytes: &[u8]) -> Opening {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| strip_port(v.trim()).to_string());
            Opening::Http { host }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HTTP_HEAD => Opening::Incomplete,
        // Too many headers, a head too long, or not HTTP at all.
        Ok(httparse::Status::Partial) | Err(_) => Opening::Other,
    }
}

/// `name:port` → `name`; `[v6]:port` → `[v6]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real TLS client (rustls) asking for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        client_hello_with_alpn(name, &[])
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let bytes = client_hello("api.github.com");
        assert_eq!(
            classify(&bytes),
            Opening::Tls(ClientHello {
                sni: Some("api.github.com".into()),
                ech: false
            })
        );
    }

    #[test]
    fn waits_for_the_whole_record() {
        let bytes = client_hello("pypi.org");
        for cut in [0, 1, 4, 5, 40, bytes.len() - 1] {
            assert_eq!(classify(&bytes[..cut]), Opening::Incomplete, "{cut} bytes");
        }
        // Bytes after the record (the client's next flight) do not matter.
        let mut more = bytes.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert!(matches!(
            classify(&more),
            Opening::Tls(ClientHello { sni: Some(_), .. })
        ));
    }

    #[test]
    fn an_ip_address_sends_no_server_name() {
        let bytes = client_hello("192.0.2.7");
        assert_eq!(
            classify(&bytes),
            Opening::Tls(ClientHello {
                sni: None,
                ech: false
            })
        );
    }

    /// A ClientHello with an extension appended to rustls's: patches the record, handshake and
    /// extensions lengths.
    fn with_extension(mut bytes: Vec<u8>, ext_type: u16, body: &[u8]) -> Vec<u8> {
        let add = 4 + body.len();
        let grow = |b: &mut [u8], at: usize, width: usize| {
            let mut v = 0usize;
            for i in 0..width {
                v = (v << 8) | usize::from(b[at + i]);
            }
            v += add;
            for i in (0..width).rev() {
                b[at + i] = (v & 0xff) as u8;
                v >>= 8;
            }
        };
        grow(&mut bytes, 3, 2); // record length
        grow(&mut bytes, 6, 3); // handshake length
        // Extensions length: after version(2) random(32) session id, suites, compression.
        let mut at = 5 + 4 + 2 + 32;
        at += 1 + usize::from(bytes[at]);
        at += 2 + usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
        at += 1 + usize::from(bytes[at]);
        grow(&mut bytes, at, 2);
        bytes.extend_from_slice(&ext_type.to_be_bytes());
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn notices_encrypted_client_hello() {
        let bytes = with_extension(client_hello("public.example"), EXT_ECH, &[0, 1, 2, 3]);
        assert_eq!(
            classify(&bytes),
            Opening::Tls(ClientHello {
                sni: Some("public.example".into()),
                ech: true
            })
        );
        // The same patching without ECH changes nothing else.
        let plain = with_extension(client_hello("public.example"), 0xff01 - 0x100, &[]);
        assert!(matches!(
            classify(&plain),
            Opening::Tls(ClientHello { ech: false, .. })
        ));
    }

    #[test]
    fn other_handshake_bytes_are_bad_tls() {
        let mut bytes = client_hello("a.test");
        bytes[5] = 2; // ServerHello, not ClientHello
        assert!(
            matches!(classify(&bytes), Opening::BadTls(_)),
            "{:?}",
            classify(&bytes)
        );
        assert_eq!(classify(&[0x16, 3, 1, 0xff, 0xff]), Opening::Other);
    }

    #[test]
    fn reads_the_host_of_a_plain_http_request() {
        let req = b"GET /x HTTP/1.1\r\nHost: Files.Example:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            classify(req),
            Opening::Http {
                host: Some("Files.Example".into())
            }
        );
        assert_eq!(
            classify(b"GET / HTTP/1.0\r\n\r\n"),
            Opening::Http { host: None }
        );
        assert_eq!(classify(b"GET /x HTTP/1.1\r\nHost: a"), Opening::Incomplete);
        assert_eq!(
            classify(b"POST / HTTP/1.1\r\nhost: [::1]:80\r\n\r\n"),
            Opening::Http {
                host: Some("[::1]".into())
            }
        );
    }

    #[test]
    fn other_protocols_are_neither() {
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Opening::Other);
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Opening::Other
        );
        assert_eq!(classify(b"EHLO x\r\n"), Opening::Other);
        let long = vec![b'A'; MAX_HTTP_HEAD + 10];
        assert_eq!(classify(&long), Opening::Other);
    }

    /// The first flight of rustls asking for `name`, offering `alpn` (none: no ALPN extension).
    #[allow(deprecated)] // ring's provider without post-quantum groups: a smaller hello is fine.
    fn client_hello_with_alpn(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("ClientHello");
        out
    }

    /// The kernel's scanner (`agent_monitor_common::client_hello`) over `bytes`, as the sk_msg
    /// program runs it: copied into its buffer, the rest of which holds stale bytes.
    fn kernel_scan(bytes: &[u8]) -> (client_hello::HelloScan, Option<Vec<u8>>) {
        let mut buf = Box::new([0x16u8; client_hello::HELLO_BUF]);
        let n = bytes.len().min(client_hello::HELLO_BUF);
        buf[..n].copy_from_slice(&bytes[..n]);
        let found = client_hello::scan(&buf, n as u32);
        let name = match found {
            client_hello::HelloScan::ServerName { offset, len } => {
                Some(buf[offset as usize..(offset + len) as usize].to_vec())
            }
            _ => None,
        };
        (found, name)
    }

    use agent_monitor_common::client_hello;

    #[test]
    fn the_kernel_scanner_finds_the_name_tls_parser_finds_in_real_hellos() {
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long.len(), 253);
        let names = [
            "api.github.com",
            "API.GitHub.Com",
            "xn--bcher-kva.example",
            "pypi.org.",
            "a.b",
            long.as_str(),
        ];
        let alpns: [&[&[u8]]; 3] = [&[], &[b"h2", b"http/1.1"], &[b"http/1.1"]];
        for name in names {
            for alpn in alpns {
                let bytes = client_hello_with_alpn(name, alpn);
                let Opening::Tls(ClientHello {
                    sni: Some(sni),
                    ech: false,
                }) = classify(&bytes)
                else {
                    panic!("tls-parser read no name from {name}'s hello");
                };
                let (found, kernel) = kernel_scan(&bytes);
                assert_eq!(kernel.as_deref(), Some(sni.as_bytes()), "{name} {found:?}");
            }
        }
        // An address sends no name; an ECH extension hides it from both.
        assert_eq!(
            kernel_scan(&client_hello("192.0.2.7")).0,
            client_hello::HelloScan::NoServerName
        );
        let ech = with_extension(client_hello("public.example"), EXT_ECH, &[0, 1, 2, 3]);
        assert!(matches!(
            classify(&ech),
            Opening::Tls(ClientHello { ech: true, .. })
        ));
        assert_eq!(kernel_scan(&ech).0, client_hello::HelloScan::Encrypted);
    }

    /// tls-parser reads the record's ClientHello but stops before the end of its extensions.
    fn extensions_unreadable(bytes: &[u8]) -> bool {
        let Ok((_, record)) = parse_tls_plaintext(bytes) else {
            return false;
        };
        record.msg.iter().any(|m| match m {
            TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) => {
                ch.ext.is_some_and(|ext| {
                    parse_tls_client_hello_extensions(ext).is_ok_and(|(rest, _)| !rest.is_empty())
                })
            }
            _ => false,
        })
    }

    /// Broken hellos: whatever the kernel's scanner reads a name from, tls-parser reads the same
    /// name from (or gives up on an extension's content). The scanner may refuse more, never
    /// accept a different name.
    #[test]
    fn the_kernel_scanner_never_reads_a_name_tls_parser_does_not() {
        let hello = client_hello_with_alpn("api.example.com", &[b"h2"]);
        let mut variants: Vec<Vec<u8>> = Vec::new();
        for at in 0..hello.len() {
            for flip in [0x01u8, 0x20, 0x80, 0xff] {
                let mut v = hello.clone();
                v[at] ^= flip;
                variants.push(v);
            }
            for set in [0u8, 0x16, 0xff] {
                let mut v = hello.clone();
                v[at] = set;
                variants.push(v);
            }
            variants.push(hello[..at].to_vec());
            let mut inserted = hello.clone();
            inserted.insert(at, 0);
            variants.push(inserted);
            let mut removed = hello.clone();
            removed.remove(at);
            variants.push(removed);
        }
        let mut extended = hello.clone();
        extended.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        variants.push(extended);
        let (mut named, mut other_names) = (0, 0);
        for v in &variants {
            let (found, Some(kernel)) = kernel_scan(v) else {
                continue;
            };
            named += 1;
            if kernel != b"api.example.com" {
                other_names += 1;
            }
            match classify(v) {
                Opening::Tls(ClientHello { sni: Some(sni), .. }) if sni.as_bytes() == kernel => {}
                // tls-parser stops at the first extension whose content it cannot read (rustls
                // shuffles its extensions, so one may come before the server name) and reports
                // no name; the scanner reads only the server name's content. Both read the
                // record and extension lengths alike, and the name is the one there.
                Opening::Tls(ClientHello { sni: None, .. }) if extensions_unreadable(v) => {}
                other => panic!(
                    "the kernel scanner read {:?} ({found:?}), tls-parser {other:?}, from {v:?}",
                    String::from_utf8_lossy(&kernel)
                ),
            }
        }
        // The broken hellos did reach the name: flips in the name are read as other names.
        assert!(named > hello.len(), "only {named} variants had a name");
        assert!(
            other_names > 10,
            "only {other_names} variants had another name"
        );
    }
}
