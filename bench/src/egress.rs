//! The cost of a server-name rule (`[[network.tls]]`): small requests (a new connection each:
//! connect, ClientHello, 64 bytes there and back, close) and one large download, each straight to
//! the server (outside agents) and as an agent, whose ClientHello the kernel judges on the way
//! out (`--server-names kernel`, the default). The server answers after the ClientHello without
//! TLS: nothing on either path decrypts, so the crypto would cost the same on both and only blur
//! the difference.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::load::OpStats;

/// Bytes of each small request and its answer.
const REQUEST: usize = 64;

/// A TLS 1.2-style ClientHello record naming `name` (SNI), enough for the endpoint's parser.
pub fn client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes()); // server_name_list
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut ext = Vec::new();
    ext.extend_from_slice(&0u16.to_be_bytes()); // server_name
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// The server: reads the ClientHello record, then `E` + 64 bytes (echoed), `D` + a u64 length
/// (that many bytes sent) or `H` (one byte back, then held until the client closes). One thread
/// per connection.
pub fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = answer(stream);
            });
        }
    });
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let mut hello = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
    s.read_exact(&mut hello)?;
    let mut cmd = [0u8; 1];
    s.read_exact(&mut cmd)?;
    if cmd[0] == b'H' {
        // Held open (`intercept_bench::hold`): one byte says the connection is through, then
        // wait for the client to close it.
        s.write_all(b"h")?;
        let _ = s.read(&mut cmd)?;
    } else if cmd[0] == b'E' {
        let mut req = [0u8; REQUEST];
        s.read_exact(&mut req)?;
        s.write_all(&req)?;
    } else {
        let mut len = [0u8; 8];
        s.read_exact(&mut len)?;
        let chunk = vec![0x5a; 256 * 1024];
        let mut left = u64::from_be_bytes(len);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
        }
    }
    Ok(())
}

fn resolve(name: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (name, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {name}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{name} has no IPv4 address"))
}

/// N small requests, a new connection each.
pub fn requests(n: usize, name: &str, port: u16) -> anyhow::Result<OpStats> {
    let addr = resolve(name, port)?;
    let mut first = client_hello(name);
    first.push(b'E');
    first.extend_from_slice(&[0x42; REQUEST]);
    let (mut times, mut ok, mut other) = (Vec::with_capacity(n), 0, 0);
    for _ in 0..n {
        let t = Instant::now();
        let done = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.write_all(&first)?;
            let mut back = [0u8; REQUEST];
            s.read_exact(&mut back)?;
            Ok(())
        })();
        times.push(t.elapsed().as_nanos() as u64);
        match done {
            Ok(()) => ok += 1,
            Err(_) => other += 1,
        }
    }
    Ok(crate::load::stats(times, ok, 0, other))
}

/// What one download measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Download {
    pub bytes: u64,
    pub secs: f64,
    pub mib_per_s: f64,
}

/// One download of `mib` MiB.
pub fn download(mib: u64, name: &str, port: u16) -> anyhow::Result<Download> {
    let addr = resolve(name, port)?;
    let bytes = mib * 1024 * 1024;
    let mut first = client_hello(name);
    first.push(b'D');
    first.extend_from_slice(&bytes.to_be_bytes());
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&first)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match s.read(&mut buf)? {
            0 => bail!("the download ended after {got} of {bytes} bytes"),
            n => got += n as u64,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Download {
        bytes,
        secs,
        mib_per_s: mib as f64 / secs,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_client_hello_is_one_record_naming_the_server() {
        let h = super::client_hello("bench.ok.test");
        assert_eq!(h[0], 0x16);
        assert_eq!(usize::from(u16::from_be_bytes([h[3], h[4]])), h.len() - 5);
        assert!(h.windows(13).any(|w| w == b"bench.ok.test"));
    }
}
