//! Native load generators: N loopback TCP connects, N fork+exec, connects at a fixed rate, and a
//! tree of sleeping processes. Each times its own operations and prints one JSON object.
//!
//! They run as ordinary processes or, through `agent-monitor run`, as an agent; the orchestrator
//! ([`crate::run`]) reads their output. Raw libc calls, not `std::process::Command` or
//! `TcpStream`: the operation measured is exactly the syscalls named, nothing the standard library
//! adds around them.

use std::ffi::CString;
use std::io::{BufRead as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

#[derive(Debug, Subcommand)]
pub enum Load {
    /// N times: socket(), connect() to 127.0.0.1:PORT over TCP, close() with an RST (no
    /// TIME_WAIT left behind). A listener thread in this process accepts and closes.
    Connect {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        port: u16,
        /// Connect here instead (no listener is started): a destination the agent may not reach.
        #[arg(long)]
        to: Option<SocketAddrV4>,
        /// Run as SCHED_FIFO (see [`realtime`]).
        #[arg(long)]
        realtime: bool,
    },
    /// N times: fork(), execv(PROG) in the child, waitpid() in the parent.
    Exec {
        #[arg(long)]
        n: usize,
        #[arg(long, default_value = "/bin/true")]
        prog: String,
        /// Run as SCHED_FIFO (see [`realtime`]); the children inherit it.
        #[arg(long)]
        realtime: bool,
    },
    /// connect() of one UDP socket at RATE per second for SECS seconds (each one an agent action
    /// when run as an agent); every DENY_EVERY-th goes to 127.0.0.1:DENY_PORT instead.
    Rate {
        /// Connects per second; 0 = as fast as possible.
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        deny_port: u16,
        #[arg(long, default_value_t = 1000)]
        deny_every: u64,
        /// Print `ready` and wait for a line on stdin before starting (the orchestrator stops
        /// the daemon in between).
        #[arg(long)]
        wait_stdin: bool,
    },
    /// N DNS queries (type A for NAME) over one connected UDP socket to SERVER, each waiting for
    /// its answer. As an agent, the kernel redirects them to the daemon's DNS proxy.
    Dns {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        server: SocketAddrV4,
        #[arg(long)]
        name: String,
    },
    /// Accepts (and drops) TCP connections on 127.0.0.1:PORT until killed: the server of the
    /// connect measurement, a process of its own (not the agent), as an agent's peers are.
    Listen {
        #[arg(long)]
        port: u16,
    },
    /// Forks N children that sleep; prints `ready` when all exist, kills them when stdin closes.
    Spawn {
        #[arg(long)]
        n: usize,
    },
    /// N times: open(PATH, O_RDONLY), close(); EPERM counts as refused (the file guard).
    Open {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        path: String,
    },
    /// N times: socket(AF_UNIX, SOCK_STREAM), connect() to PATH, close().
    UnixConnect {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        path: std::path::PathBuf,
    },
    /// N small requests to NAME:PORT (resolved once), a new connection each: ClientHello naming
    /// NAME, 64 bytes there and back (`egress.rs`). As an agent with a server-name rule for NAME,
    /// through the egress endpoint.
    EgressRequests {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// One download of MIB MiB from NAME:PORT after a ClientHello naming NAME.
    EgressDownload {
        #[arg(long)]
        mib: u64,
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// N small HTTPS requests (`GET /small`) on one kept-alive connection (`intercept_bench.rs`).
    /// As an agent with an HTTP rule for NAME, intercepted by the daemon.
    HttpsRequests {
        #[arg(long)]
        n: usize,
        #[command(flatten)]
        to: crate::intercept_bench::Target,
    },
    /// One HTTPS download of MIB MiB (`GET /big?BYTES`), as `https-requests`.
    HttpsDownload {
        #[arg(long)]
        mib: u64,
        #[command(flatten)]
        to: crate::intercept_bench::Target,
    },
    /// Opens N connections and holds them until stdin closes (prints `ready N`): HTTPS with one
    /// request each when CA is given, else a ClientHello answered by the raw server
    /// (`egress.rs`).
    EgressHold {
        #[arg(long)]
        n: usize,
        #[command(flatten)]
        to: crate::intercept_bench::Target,
    },
}

/// What a timed loop (connect, exec) reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpStats {
    pub n: usize,
    pub median_ns: u64,
    pub mean_ns: u64,
    pub p90_ns: u64,
    #[serde(default)]
    pub p99_ns: u64,
    /// Operations that succeeded (connected; exited 0).
    pub ok: usize,
    /// connect: failed with EPERM; exec: child killed by SIGKILL.
    pub refused: usize,
    /// Any other outcome.
    pub other: usize,
}

/// What a rate run reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RateStats {
    pub target_rate: u64,
    pub achieved_rate: f64,
    pub secs: f64,
    /// connect() calls to the allowed port, and how many succeeded.
    pub allowed_sent: u64,
    pub allowed_ok: u64,
    /// connect() calls to the denied port, and how many failed with EPERM.
    pub denied_sent: u64,
    pub denied_eperm: u64,
}

pub fn run(load: Load) -> anyhow::Result<()> {
    let out = match load {
        Load::Connect {
            n,
            port,
            to,
            realtime: rt,
        } => {
            if rt {
                realtime()?;
            }
            serde_json::to_string(&connect(n, port, to)?)?
        }
        Load::Exec {
            n,
            prog,
            realtime: rt,
        } => {
            if rt {
                realtime()?;
            }
            serde_json::to_string(&exec(n, &prog)?)?
        }
        Load::Rate {
            rate,
            secs,
            port,
            deny_port,
            deny_every,
            wait_stdin,
        } => {
            if wait_stdin {
                println!("ready");
                std::io::stdout().flush()?;
                std::io::stdin().lock().read_line(&mut String::new())?;
            }
            serde_json::to_string(&rate_run(rate, secs, port, deny_port, deny_every)?)?
        }
        Load::Dns { n, server, name } => serde_json::to_string(&dns(n, server, &name)?)?,
        Load::Listen { port } => return serve(port),
        Load::Spawn { n } => return spawn(n),
        Load::Open { n, path } => serde_json::to_string(&crate::files::open_loop(n, &path)?)?,
        Load::UnixConnect { n, path } => {
            serde_json::to_string(&crate::unix_bench::connect(n, &path)?)?
        }
        Load::EgressRequests { n, name, port } => {
            serde_json::to_string(&crate::egress::requests(n, &name, port)?)?
        }
        Load::EgressDownload { mib, name, port } => {
            serde_json::to_string(&crate::egress::download(mib, &name, port)?)?
        }
        Load::HttpsRequests { n, to } => {
            serde_json::to_string(&crate::intercept_bench::requests(n, &to)?)?
        }
        Load::HttpsDownload { mib, to } => {
            serde_json::to_string(&crate::intercept_bench::download(mib, &to)?)?
        }
        Load::EgressHold { n, to } => return crate::intercept_bench::hold(n, &to),
    };
    println!("{out}");
    Ok(())
}

/// SCHED_FIFO at a low real-time priority: other work on the machine (builds, tests) no longer
/// preempts the timed loop or delays its children, which made fork+exec medians jump by a factor
/// of three on a loaded machine. Each operation blocks (accept, waitpid), so the loop never holds
/// a CPU for long, and the kernel's real-time throttling bounds it anyway.
fn realtime() -> anyhow::Result<()> {
    // On the last CPU, with the children it forks: a forked child then runs where its parent
    // waits instead of wherever the scheduler finds room, and the monitors' own processes
    // (daemons, auditd, bpftrace, the server) keep the other CPUs. Unpinned, a quarter of the
    // exec repetitions ran 10-25 % slow in every setup, the floor included.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpus - 1, &mut set) };
    // SAFETY: plain syscall on this process with a live, correctly sized set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!(
            "sched_setaffinity(CPU {}): {}",
            cpus - 1,
            std::io::Error::last_os_error()
        );
    }
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on this process with a live parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        bail!(
            "sched_setscheduler(SCHED_FIFO): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

pub(crate) fn stats(mut times: Vec<u64>, ok: usize, refused: usize, other: usize) -> OpStats {
    times.sort_unstable();
    let n = times.len();
    let at = |q: f64| {
        times
            .get(((n as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    OpStats {
        n,
        median_ns: at(0.5),
        mean_ns: if n == 0 {
            0
        } else {
            times.iter().sum::<u64>() / n as u64
        },
        p90_ns: at(0.9),
        p99_ns: at(0.99),
        ok,
        refused,
        other,
    }
}

/// `ok`: an answer with this query's id and at least one record; `refused`: REFUSED; `other`:
/// anything else (another code, no answer within 2 s, an unreadable reply).
fn dns(n: usize, server: SocketAddrV4, name: &str) -> anyhow::Result<OpStats> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    let name = Name::from_ascii(name).with_context(|| format!("DNS name {name:?}"))?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1500];
    let (mut times, mut ok, mut refused, mut other) = (Vec::with_capacity(n), 0, 0, 0);
    for i in 0..n {
        let id = i as u16;
        let mut query = Message::new();
        query
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name.clone(), RecordType::A));
        let bytes = query.to_vec()?;
        let t = Instant::now();
        sock.send(&bytes)?;
        let reply = loop {
            match sock.recv(&mut buf) {
                Ok(len) => match Message::from_vec(&buf[..len]) {
                    // A late answer to an earlier, timed-out query: keep waiting for ours.
                    Ok(m) if m.id() != id => continue,
                    Ok(m) => break Some(m),
                    Err(_) => break None,
                },
                Err(_) => break None,
            }
        };
        times.push(t.elapsed().as_nanos() as u64);
        match reply {
            Some(m) if m.response_code() == ResponseCode::NoError && !m.answers().is_empty() => {
                ok += 1
            }
            Some(m) if m.response_code() == ResponseCode::Refused => refused += 1,
            _ => other += 1,
        }
    }
    Ok(stats(times, ok, refused, other))
}

/// Accepts in batches every millisecond, not blocked in accept(): a blocked acceptor is woken by
/// every connect, and where the scheduler runs it (this CPU or the other) changed the measured
/// connect time by a third, monitor or not. Accept errors (the client's RST may come first) are
/// expected and ignored.
fn accept_forever(listener: TcpListener) -> ! {
    loop {
        while let Ok(c) = listener.accept() {
            drop(c);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn serve(port: u16) -> anyhow::Result<()> {
    let listener = listen(port).with_context(|| format!("listening on 127.0.0.1:{port}"))?;
    listener.set_nonblocking(true)?;
    println!("ready");
    std::io::stdout().flush()?;
    accept_forever(listener)
}

fn connect(n: usize, port: u16, to: Option<SocketAddrV4>) -> anyhow::Result<OpStats> {
    let target = match to {
        Some(t) => t,
        None => {
            let listener =
                listen(port).with_context(|| format!("listening on 127.0.0.1:{port}"))?;
            listener.set_nonblocking(true)?;
            std::thread::spawn(move || accept_forever(listener));
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
        }
    };
    let sa = sockaddr(target);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (mut ok, mut refused, mut other) = (0, 0, 0);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: plain syscalls on a socket this loop owns; pointers are to live locals.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket(): {}", std::io::Error::last_os_error());
            }
            let r = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            let e = errno();
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            );
            libc::close(fd);
            match (r, e) {
                (0, _) => ok += 1,
                (_, libc::EPERM) => refused += 1,
                _ => other += 1,
            }
        }
        times.push(t.elapsed().as_nanos() as u64);
    }
    Ok(stats(times, ok, refused, other))
}

/// A listener with the largest backlog the kernel allows (std's is 128): a connect that finds the
/// queue full waits a whole SYN retransmission (1 s), which a busy acceptor thread must not cause.
fn listen(port: u16) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd as _;
    let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let one: libc::c_int = 1;
    // SAFETY: plain syscalls on a new socket; on success its fd is handed to the TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
            || libc::listen(fd, 65_535) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpListener::from_raw_fd(fd))
    }
}

fn exec(n: usize, prog: &str) -> anyhow::Result<OpStats> {
    let path = CString::new(prog).context("program path with a NUL byte")?;
    let argv = [path.as_ptr(), std::ptr::null()];
    let (mut ok, mut refused, mut other) = (0, 0, 0);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: the child only calls execv and _exit (async-signal-safe); argv is prepared
        // before the fork and outlives it.
        let status = unsafe {
            let pid = libc::fork();
            if pid < 0 {
                bail!("fork(): {}", std::io::Error::last_os_error());
            }
            if pid == 0 {
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        };
        times.push(t.elapsed().as_nanos() as u64);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            ok += 1;
        } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
            refused += 1;
        } else {
            other += 1;
        }
    }
    Ok(stats(times, ok, refused, other))
}

fn rate_run(
    rate: u64,
    secs: f64,
    port: u16,
    deny_port: u16,
    deny_every: u64,
) -> anyhow::Result<RateStats> {
    let allowed = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let denied = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, deny_port));
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        bail!("socket(): {}", std::io::Error::last_os_error());
    }
    let mut s = RateStats {
        target_rate: rate,
        achieved_rate: 0.0,
        secs: 0.0,
        allowed_sent: 0,
        allowed_ok: 0,
        denied_sent: 0,
        denied_eperm: 0,
    };
    let start = Instant::now();
    let total = Duration::from_secs_f64(secs);
    let mut done: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= total {
            break;
        }
        // Paced in slices: everything due by now, then a short sleep. Per-call sleeps would be
        // coarser than the 10 µs between calls at 100k/s.
        let due = if rate == 0 {
            done + 256
        } else {
            (elapsed.as_secs_f64() * rate as f64) as u64
        };
        while done < due {
            done += 1;
            let deny = deny_every > 0 && done.is_multiple_of(deny_every);
            let sa = if deny { &denied } else { &allowed };
            // SAFETY: connect on our own UDP socket with a live sockaddr.
            let r = unsafe {
                libc::connect(
                    fd,
                    (sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if deny {
                s.denied_sent += 1;
                if r != 0 && errno() == libc::EPERM {
                    s.denied_eperm += 1;
                }
            } else {
                s.allowed_sent += 1;
                if r == 0 {
                    s.allowed_ok += 1;
                }
            }
        }
        if rate != 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    s.secs = start.elapsed().as_secs_f64();
    s.achieved_rate = done as f64 / s.secs;
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    Ok(s)
}

fn spawn(n: usize) -> anyhow::Result<()> {
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the child only calls pause/_exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            kill_all(&children);
            bail!("fork() of child {i} of {n}: {e}");
        }
        if pid == 0 {
            // SAFETY: async-signal-safe calls only.
            unsafe {
                libc::pause();
                libc::_exit(0);
            }
        }
        children.push(pid);
    }
    println!("ready {}", children.len());
    std::io::stdout().flush()?;
    // Holds the tree until the orchestrator closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    kill_all(&children);
    Ok(())
}

fn kill_all(children: &[libc::pid_t]) {
    for &pid in children {
        // SAFETY: our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in children {
        // SAFETY: reaping our own children.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}
