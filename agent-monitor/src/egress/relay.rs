//! Passing a server-name-checked connection's bytes both ways, unchanged, without copying them
//! through the daemon: splice(2) from one socket into a pipe and from the pipe into the other, one
//! pipe per direction, driven by tokio's readiness. The kernel moves page references; the daemon
//! never touches the data. Measured against tokio's `copy_bidirectional` (two copies through a
//! user-space buffer per byte): see docs/egress.md, "How the bytes pass".

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::kernel_relay::relay_in_kernel;
use crate::bpf::egress_relay::{EgressRelay, PairError};

/// Capacity asked for each pipe: the most one splice call moves. The default (64 KiB) costs a
/// wake-up and two system calls per 64 KiB; more lets a slow reader's side hold more unsent
/// (kernel memory, the sockets' own pages).
const PIPE_BYTES: usize = 256 << 10;

/// Buffer per direction when no pipe can be had (out of file descriptors): tokio's default
/// (8 KiB) costs a wake-up and two system calls per 8 KiB of a download.
const COPY_BUF: usize = 64 * 1024;

/// How the bytes passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Splice,
    /// No pipe could be made (the error is logged): copied through the daemon.
    Copy,
    /// Passed inside the kernel by the egress relay's sockmap (`kernel_relay`).
    Kernel,
}

/// Bytes moved: `out` from the client to upstream, `inn` back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub out: u64,
    pub inn: u64,
}

/// Passes bytes between `client` and `upstream` until both directions have ended (each end's
/// EOF is passed on as a write shutdown, as `copy_bidirectional` does) or one breaks.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> (Mechanism, io::Result<Moved>) {
    relay_through(client, upstream, PIPE_BYTES).await
}

/// Passes the bytes of `client` and `upstream` through the kernel relay when there is one and it
/// takes the pair, else spliced ([`relay`]); returns how, and the bytes moved.
pub async fn relay_connection(
    mut client: TcpStream,
    mut upstream: TcpStream,
    kernel: Option<&EgressRelay>,
) -> (Mechanism, io::Result<Moved>) {
    if let Some(kernel) = kernel {
        match relay_in_kernel(kernel, client, upstream).await {
            Ok(moved) => return (Mechanism::Kernel, moved),
            Err((c, u, why)) => {
                refused_by_kernel(&why);
                (client, upstream) = (c, u);
            }
        }
    }
    relay(&mut client, &mut upstream).await
}

/// Logs why the kernel relay did not take a connection; a full relay is counted and logged at
/// the first refusal and then at every power of two, the count in each line.
fn refused_by_kernel(why: &PairError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static FULL: AtomicU64 = AtomicU64::new(0);
    match why {
        PairError::Full(_) => {
            let n = FULL.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    refused = n,
                    "egress endpoint: {why}; spliced instead ({n} connections so far)"
                );
            }
        }
        // A client that ended its sending with its opening: expected, spliced.
        PairError::NotEstablished => tracing::debug!("egress endpoint: {why}; spliced instead"),
        _ => tracing::warn!(
            "egress endpoint: the kernel relay refused a connection ({why}); spliced instead"
        ),
    }
}

/// [`relay`] with pipes of `pipe_bytes` (the measurement compares sizes).
async fn relay_through(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    pipe_bytes: usize,
) -> (Mechanism, io::Result<Moved>) {
    let pipes = Pipe::new(pipe_bytes).and_then(|a| Pipe::new(pipe_bytes).map(|b| (a, b)));
    let (to_upstream, to_client) = match pipes {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("egress endpoint: no pipe for splicing ({e}); copying instead");
            let copied =
                tokio::io::copy_bidirectional_with_sizes(client, upstream, COPY_BUF, COPY_BUF)
                    .await
                    .map(|(out, inn)| Moved { out, inn });
            return (Mechanism::Copy, copied);
        }
    };
    let moved = tokio::try_join!(
        one_way(client, upstream, &to_upstream),
        one_way(upstream, client, &to_client),
    )
    .map(|(out, inn)| Moved { out, inn });
    (Mechanism::Splice, moved)
}

/// A non-blocking pipe: what `one_way` splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity: the most one splice moves.
    bytes: usize,
}

impl Pipe {
    fn new(bytes: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused above /proc/sys/fs/pipe-max-size or the user's pipe page limits: the default
        // capacity still works, in smaller steps.
        let bytes = fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&write),
            FcntlArg::F_SETPIPE_SZ(bytes as i32),
        )
        .or_else(|_| {
            fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&write),
                FcntlArg::F_GETPIPE_SZ,
            )
        })
        .map_or(64 * 1024, |b| b as usize);
        Ok(Pipe { read, write, bytes })
    }
}

/// Moves bytes from `from` to `to` through `pipe` until `from` ends (then shuts `to`'s writing
/// side down) or either side fails. Returns the bytes moved.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved = 0u64;
    loop {
        // Only ever spliced into an empty pipe: a would-block here is then the socket's (nothing
        // to read), never a full pipe's, so tokio's readiness for `from` stays right.
        let filled = from
            .async_io(Interest::READABLE, || {
                splice(
                    from.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    pipe.bytes,
                    flags,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if filled == 0 {
            // End of stream from `from`: pass it on; the other direction may go on.
            match shutdown(std::os::fd::AsRawFd::as_raw_fd(to), Shutdown::Write) {
                Ok(()) | Err(Errno::ENOTCONN) => return Ok(moved),
                Err(e) => return Err(e.into()),
            }
        }
        let mut left = filled;
        while left > 0 {
            // The pipe holds bytes: a would-block is `to`'s send buffer being full. A peer that
            // has gone gives EPIPE (the kernel's SIGPIPE is ignored by Rust's runtime).
            let sent = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await?;
            left -= sent;
            moved += sent as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets: (the side a client holds, the side the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (outer, inner) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (outer.unwrap(), inner.unwrap().0)
    }

    /// client ⇄ [relay] ⇄ server; returns (client, server, the relay's task).
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Mechanism, io::Result<Moved>)>,
    ) {
        let (client, mut relay_client) = pair().await;
        let (mut relay_server, server) = pair().await;
        let task = tokio::spawn(async move { relay(&mut relay_client, &mut relay_server).await });
        (client, server, task)
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_both_ways_and_are_counted() {
        let (mut client, mut server, task) = relayed().await;
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let download: Vec<u8> = (0..5_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up, down) = (upload.clone(), download.clone());
        let serving = tokio::spawn(async move {
            let mut got = vec![0u8; up.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, up, "the server got the upload unchanged");
            server.write_all(&down).await.unwrap();
            // The client's end of stream reaches the server as one.
            assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0);
        });
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == download, "the client got the download unchanged");
        serving.await.unwrap();
        let (mechanism, moved) = task.await.unwrap();
        assert_eq!(mechanism, Mechanism::Splice);
        assert_eq!(
            moved.unwrap(),
            Moved {
                out: upload.len() as u64,
                inn: download.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn a_half_closed_side_still_gets_its_answer() {
        // The client ends its sending at once (HTTP/1.0 style); the answer still comes back.
        let (mut client, mut server, task) = relayed().await;
        client.write_all(b"ask").await.unwrap();
        client.shutdown().await.unwrap();
        let mut asked = Vec::new();
        server.read_to_end(&mut asked).await.unwrap();
        assert_eq!(asked, b"ask");
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        assert_eq!(task.await.unwrap().1.unwrap(), Moved { out: 3, inn: 6 });
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, server, task) = relayed().await;
        // SO_LINGER 0: close sends a reset.
        #[allow(deprecated)] // blocks on drop only with data unsent; there is none
        server.set_linger(Some(Duration::ZERO)).unwrap();
        drop(server);
        let (_, moved) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the relay ended")
            .unwrap();
        assert!(moved.is_err(), "a reset is an error: {moved:?}");
        drop(client);
    }

    /// A measurement, not a check: 1 GiB downloads over loopback, straight, through `relay` with
    /// pipes of several sizes, and through tokio's copy with 64 KiB buffers (what the endpoint did
    /// before), and through the kernel's sockmap relay (`kernel_relay`, as root), interleaved.
    /// Prints MiB/s and the process's CPU time per GiB (user + system: on a
    /// shared machine the wall clock says more about the neighbours). `cargo test --release -p
    /// agent-monitor measure_relay -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement: prints throughput and CPU per GiB, direct, spliced, copied, in the kernel"]
    async fn measure_relay() {
        const SIZE: usize = 1 << 30;
        fn cpu_secs() -> f64 {
            // SAFETY: getrusage fills a plain struct.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
            let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
            t(u.ru_utime) + t(u.ru_stime)
        }
        async fn download(mut client: TcpStream, mut server: TcpStream) -> (f64, f64) {
            let sending = tokio::spawn(async move {
                let chunk = vec![0x5au8; 256 * 1024];
                let mut left = SIZE;
                while left > 0 {
                    let n = left.min(chunk.len());
                    server.write_all(&chunk[..n]).await.unwrap();
                    left -= n;
                }
            });
            let (started, cpu) = (Instant::now(), cpu_secs());
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            while got < SIZE {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got += n;
            }
            let secs = started.elapsed().as_secs_f64();
            let cpu = cpu_secs() - cpu;
            sending.await.unwrap();
            ((SIZE >> 20) as f64 / secs, cpu)
        }
        let kinds = [
            "direct",
            "splice 64K",
            "splice 256K",
            "splice 1M",
            "copy 64K",
            "kernel",
        ];
        // The sockmap relay (root only; without it that row stays empty).
        let kernel = EgressRelay::load(16).map(std::sync::Arc::new);
        if let Err(e) = &kernel {
            eprintln!("no kernel relay row: {e}");
        }
        let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
        for _ in 0..4 {
            for (k, kind) in kinds.iter().enumerate() {
                let (c, s) = match *kind {
                    "direct" => pair().await,
                    "copy 64K" => {
                        let (c, mut rc) = pair().await;
                        let (mut rs, s) = pair().await;
                        tokio::spawn(async move {
                            tokio::io::copy_bidirectional_with_sizes(
                                &mut rc, &mut rs, COPY_BUF, COPY_BUF,
                            )
                            .await
                        });
                        (c, s)
                    }
                    "kernel" => {
                        let Ok(kernel) = kernel.as_ref().map(std::sync::Arc::clone) else {
                            continue;
                        };
                        let (c, rc) = pair().await;
                        let (ru, s) = pair().await;
                        tokio::spawn(async move { relay_in_kernel(&kernel, rc, ru).await.is_ok() });
                        (c, s)
                    }
                    _ => {
                        let bytes = match *kind {
                            "splice 64K" => 64 << 10,
                            "splice 256K" => 256 << 10,
                            _ => 1 << 20,
                        };
                        let (c, mut rc) = pair().await;
                        let (mut rs, s) = pair().await;
                        tokio::spawn(async move { relay_through(&mut rc, &mut rs, bytes).await });
                        (c, s)
                    }
                };
                results[k].push(download(c, s).await);
            }
        }
        for (kind, r) in kinds.iter().zip(&results) {
            eprintln!(
                "{kind:>12}: MiB/s {}; CPU s per GiB {}",
                r.iter()
                    .map(|x| format!("{:.0}", x.0))
                    .collect::<Vec<_>>()
                    .join(" "),
                r.iter()
                    .map(|x| format!("{:.2}", x.1))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
}
