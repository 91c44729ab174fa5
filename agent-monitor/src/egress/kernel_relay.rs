//! Passing a server-name-checked connection's bytes inside the kernel: both sockets go into the
//! egress relay's sockmap (`bpf::egress_relay`), whose stream verdict sends what one receives out
//! of the other. The daemon is not woken per chunk; it only watches for the ends of the streams
//! (its own epoll instance, asking for nothing but hang-ups and errors), passes each end on as a
//! write shutdown once the bytes before it have left, and reads the byte counts from the kernel's
//! own TCP counters when both directions are done.
//!
//! Order of the start, so that no byte is lost or passed out of order: the endpoint only peeked
//! at the opening (the ClientHello is still in the agent's socket), and the upstream connection
//! has sent nothing yet, so its server has nothing to answer. The upstream socket goes in first,
//! then the agent's; then both are poked (`SO_RCVLOWAT`, whose setter runs the socket's
//! data-ready callback, now the relay's), so what was already queued — the ClientHello and
//! anything after it — is read by the verdict from the head of the queue, in order, before or
//! together with every later byte.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use super::relay::Moved;
use crate::bpf::egress_relay::{EgressRelay, PairError};

/// How often an end of stream checks whether the bytes before it have left.
const DRAIN_POLL: Duration = Duration::from_millis(1);
/// An end of stream waits this long for bytes that neither leave nor wait in the send queue (the
/// kernel did not pass them: a bug or a broken socket), then the connection ends with an error.
const DRAIN_STALL: Duration = Duration::from_secs(2);

/// Hands `client` and `upstream` to the kernel relay and waits until both directions have ended.
/// When the relay refuses the pair (full, or a kernel error) the streams come back untouched, to
/// be spliced.
pub async fn relay_in_kernel(
    relay: &EgressRelay,
    client: TcpStream,
    upstream: TcpStream,
) -> Result<io::Result<Moved>, (TcpStream, TcpStream, PairError)> {
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    let sides = [client, upstream];
    // Before the pair goes in (nothing has been written to either socket by the relay yet):
    // the base of their written counts, and whether the map can take them.
    let (before, established) = match (counters(sides[0].as_fd()), counters(sides[1].as_fd())) {
        (Ok(c), Ok(u)) => ([c.written, u.written], c.established && u.established),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    // Upstream first: the agent's socket holds the ClientHello, which must find its peer.
    let paired = if established {
        relay.pair(&sides[1], &sides[0])
    } else {
        // An end of stream came with the opening: the socket map takes only established sockets.
        Err(PairError::NotEstablished)
    };
    let pairing = match paired {
        Ok(p) => p,
        Err(e) => {
            let [client, upstream] = sides;
            return match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
                (Ok(c), Ok(u)) => Err((c, u, e)),
                (Err(e), _) | (_, Err(e)) => Ok(Err(e)),
            };
        }
    };
    for side in &sides {
        poke(side.as_fd());
    }
    let moved = watch(&sides, before).await;
    // Closing takes both sockets out of the socket map; then the pair is forgotten.
    drop(sides);
    relay.unpair(pairing);
    Ok(moved)
}

/// Runs the socket's data-ready callback (the relay's verdict, once the socket is in the map):
/// bytes that arrived before the socket went in are passed on now, not at the next arrival.
fn poke(socket: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Waits for the ends of both directions, passing each on; returns the bytes moved.
async fn watch(sides: &[std::net::TcpStream; 2], baseline: [u64; 2]) -> io::Result<Moved> {
    let ends = Ends::watch(sides)?;
    let mut ended = [false; 2];
    while !(ended[0] && ended[1]) {
        let mut guard = ends.fd.readable().await?;
        let events = ends.take()?;
        if events.is_empty() {
            guard.clear_ready();
            continue;
        }
        for (side, flags) in events {
            let error = socket_error(sides[side].as_fd());
            if let Some(e) = error {
                return Err(e);
            }
            if flags & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 && !ended[side] {
                // `side` received its peer's end of stream: once what came before it has left
                // through the other socket, end that one's sending.
                let other = 1 - side;
                drained(sides[side].as_fd(), sides[other].as_fd(), baseline[other]).await?;
                match shutdown(sides[other].as_raw_fd(), Shutdown::Write) {
                    Ok(()) | Err(Errno::ENOTCONN) => {}
                    Err(e) => return Err(e.into()),
                }
                ended[side] = true;
            }
        }
    }
    // Both ends of stream are in the counts.
    Ok(Moved {
        out: counters(sides[0].as_fd())?.received.saturating_sub(1),
        inn: counters(sides[1].as_fd())?.received.saturating_sub(1),
    })
}

/// Waits until every byte `from` received before its end of stream has been written into `to`
/// (sent or queued there); `to_baseline`: `to`'s written count when the pair went in.
async fn drained(from: BorrowedFd<'_>, to: BorrowedFd<'_>, to_baseline: u64) -> io::Result<()> {
    // The end of stream is in the count (it takes a sequence number), and is not passed.
    let target = counters(from)?.received.saturating_sub(1);
    let mut last = (u64::MAX, Instant::now());
    loop {
        if let Some(e) = socket_error(to) {
            return Err(e);
        }
        let written = counters(to)?.written - to_baseline;
        if written >= target {
            return Ok(());
        }
        if written != last.0 {
            last = (written, Instant::now());
        } else if last.1.elapsed() > DRAIN_STALL && unsent(to)? == 0 {
            return Err(io::Error::other(format!(
                "the kernel relay passed {written} of {target} bytes and stalled"
            )));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// A socket's byte counters, from the kernel's `tcp_info`.
struct Counters {
    /// Sequence space received (`tcpi_bytes_received`): the payload, plus one for an end of
    /// stream.
    received: u64,
    /// Sequence space written: acknowledged (`tcpi_bytes_acked`, which counts the SYN of a
    /// socket that connected, not that of an accepted one) plus the send queue (`SIOCOUTQ`).
    /// Payload written since a moment is the difference from the count then.
    written: u64,
    /// `tcpi_state` is TCP_ESTABLISHED (the socket map takes no other).
    established: bool,
}

/// Offsets in `struct tcp_info` (uapi/linux/tcp.h, stable since Linux 4.1); the libc crate's
/// struct stops before them.
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
/// `tcpi_state` of an established connection (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;

fn counters(socket: BorrowedFd<'_>) -> io::Result<Counters> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < TCPI_BYTES_RECEIVED + 8 {
        return Err(io::Error::other(
            "tcp_info without byte counters (Linux < 4.1)",
        ));
    }
    let at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
    // Read in this order: an acknowledgement between the two reads can only make the sum smaller.
    let acked = at(TCPI_BYTES_ACKED);
    let queued = unsent(socket)?;
    Ok(Counters {
        received: at(TCPI_BYTES_RECEIVED),
        written: acked + queued,
        established: info[0] == TCP_ESTABLISHED,
    })
}

/// Bytes written to `socket` and not yet acknowledged (`SIOCOUTQ`).
fn unsent(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// The socket's pending error (a reset, a timeout), if any.
fn socket_error(socket: BorrowedFd<'_>) -> Option<io::Error> {
    let mut e: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut e).cast(),
            &mut len,
        )
    };
    match (rc, e) {
        (0, 0) => None,
        (0, e) => Some(io::Error::from_raw_os_error(e)),
        _ => Some(io::Error::last_os_error()),
    }
}

/// An epoll instance watching both sockets for hang-ups and errors only: the data-ready wake-ups
/// of every chunk (EPOLLIN) do not reach it. Tokio watches the instance itself.
struct Ends {
    fd: AsyncFd<EpollFd>,
}

struct EpollFd(OwnedFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Ends {
    fn watch(sides: &[std::net::TcpStream; 2]) -> io::Result<Ends> {
        // SAFETY: plain system calls; the new descriptor is owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        let epoll = EpollFd(unsafe { OwnedFd::from_raw_fd(epoll) });
        for (i, side) in sides.iter().enumerate() {
            // Edge-triggered: each change of state is reported once; HUP and ERR always are.
            let mut event = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: i as u64,
            };
            // SAFETY: `event` is read during the call.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    side.as_raw_fd(),
                    &mut event,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Ends {
            // SAFETY: `EpollFd` owns the descriptor and closes it only when dropped with it.
            fd: unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?,
        })
    }

    /// The events waiting, as (side, flags); empty when none.
    fn take(&self) -> io::Result<Vec<(usize, u32)>> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: the kernel writes at most `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.get_ref().as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(events[..n as usize]
            .iter()
            .map(|e| (e.u64 as usize, e.events))
            .collect())
    }
}

/// The most connections the kernel relay holds at once (its maps' size: two sockets each).
/// Beyond, connections are spliced and counted (`relay::relay_connection`). Each relayed
/// connection holds three descriptors (two sockets, one epoll instance); the packaged unit's
/// `LimitNOFILE` (65536) leaves room for this many and the rest of the daemon.
pub const MAX_KERNEL_CONNECTIONS: u32 = 16384;

/// Loads the kernel relay if chosen; logs one line saying which mechanism passes the bytes.
pub fn start(choice: super::RelayChoice) -> Option<std::sync::Arc<EgressRelay>> {
    if choice == super::RelayChoice::Splice {
        tracing::info!("egress endpoint: server-name-checked connections are spliced");
        return None;
    }
    match EgressRelay::load(MAX_KERNEL_CONNECTIONS) {
        Ok(relay) => {
            tracing::info!(
                capacity = relay.capacity(),
                "egress endpoint: server-name-checked connections pass in the kernel (sockmap)"
            );
            Some(std::sync::Arc::new(relay))
        }
        Err(e) => {
            tracing::warn!(
                "egress endpoint: the kernel relay (sockmap) is unavailable on this kernel ({e}); \
                 server-name-checked connections are spliced"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// The relay needs root (loading a program); elsewhere these tests say so and pass, unless
    /// CI is set.
    fn loaded() -> Option<EgressRelay> {
        match EgressRelay::load(4) {
            Ok(r) => Some(r),
            Err(e) if std::env::var_os("CI").is_none() && !nix::unistd::geteuid().is_root() => {
                eprintln!("SKIPPED: the kernel relay needs root ({e})");
                None
            }
            Err(e) => panic!("loading the kernel relay: {e}"),
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (outer, inner) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (outer.unwrap(), inner.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_already_queued_pass_first_then_both_ways_and_are_counted() {
        let Some(relay) = loaded() else { return };
        let (mut client, relay_client) = pair().await;
        let (relay_server, mut server) = pair().await;
        // The opening waits in the relay's socket before the pair goes in, as a ClientHello does.
        client.write_all(b"hello-before").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let task = tokio::spawn(async move {
            relay_in_kernel(&relay, relay_client, relay_server)
                .await
                .map_err(|(_, _, e)| e.to_string())
        });
        let mut opening = [0u8; 12];
        server.read_exact(&mut opening).await.unwrap();
        assert_eq!(&opening, b"hello-before");
        // Both directions at once, each ended by its sender.
        let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let download: Vec<u8> = (0..40_000_000u32).map(|i| (i % 241) as u8).collect();
        let ((cr, mut cw), (sr, mut sw)) = (client.split(), server.split());
        async fn read_all(mut half: tokio::net::tcp::ReadHalf<'_>) -> Vec<u8> {
            let mut got = Vec::new();
            half.read_to_end(&mut got).await.unwrap();
            got
        }
        let ((), at_server, (), at_client) = tokio::join!(
            async {
                cw.write_all(&upload).await.unwrap();
                cw.shutdown().await.unwrap();
            },
            read_all(sr),
            async {
                sw.write_all(&download).await.unwrap();
                sw.shutdown().await.unwrap();
            },
            read_all(cr),
        );
        assert!(at_server == upload, "the server got the upload unchanged");
        assert!(
            at_client == download,
            "the client got the download unchanged"
        );
        let moved = task.await.unwrap().unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                out: 12 + upload.len() as u64,
                inn: download.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn a_half_closed_client_still_gets_its_answer() {
        let Some(relay) = loaded() else { return };
        let (mut client, relay_client) = pair().await;
        let (relay_server, mut server) = pair().await;
        let task = tokio::spawn(async move {
            relay_in_kernel(&relay, relay_client, relay_server)
                .await
                .map_err(|(_, _, e)| e.to_string())
        });
        client.write_all(b"ask").await.unwrap();
        // Once the server has the question (the pair is in), the client ends its sending.
        let mut asked = [0u8; 3];
        server.read_exact(&mut asked).await.unwrap();
        assert_eq!(&asked, b"ask");
        client.shutdown().await.unwrap();
        assert_eq!(
            server.read(&mut [0u8; 1]).await.unwrap(),
            0,
            "end of stream passed"
        );
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        let moved = task.await.unwrap().unwrap().unwrap();
        assert_eq!(moved, Moved { out: 3, inn: 6 });
    }

    #[tokio::test]
    async fn a_full_relay_hands_the_streams_back() {
        let Some(relay) = loaded() else { return };
        let relay = std::sync::Arc::new(relay);
        let mut held = Vec::new();
        for _ in 0..relay.capacity() {
            let (c, rc) = pair().await;
            let (ru, u) = pair().await;
            let r = relay.clone();
            held.push((
                c,
                u,
                tokio::spawn(async move { relay_in_kernel(&r, rc, ru).await.is_ok() }),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_c, rc) = pair().await;
        let (ru, _u) = pair().await;
        match relay_in_kernel(&relay, rc, ru).await {
            Err((_, _, PairError::Full(n))) => assert_eq!(n, relay.capacity()),
            other => panic!(
                "expected a full relay, got {:?}",
                other.map(|_| ()).map_err(|e| e.2)
            ),
        }
        for (c, u, task) in held {
            drop((c, u));
            assert!(task.await.unwrap(), "a relayed connection ended");
        }
    }
}
