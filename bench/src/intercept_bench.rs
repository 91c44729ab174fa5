//! The egress endpoint's cost for method/path rules (`[[network.http]]`): HTTPS that the daemon
//! terminates with a leaf of its own CA, judges request by request and passes upstream over its
//! own TLS connection, against the same requests sent straight to the same server. Also what an
//! open connection through the endpoint costs the daemon in memory (server-name rule and
//! interception), and that an agent's connects to destinations without request rules cost what
//! an agent without request rules pays.
//!
//! The server (in this process, a thread per connection) speaks just enough HTTP/1.1 for the two
//! requests the generators send: `GET /small` (64 bytes back) and `GET /big?BYTES`; requests are
//! parsed with `httparse`, TLS is rustls on both ends, as in the daemon.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::egress::Download;
use crate::load::{OpStats, stats};
use crate::report::{median, median_f};
use crate::run::{Env, Results, check_interrupt, cpu_secs, load, load_as, spawn_load_as};
use crate::setups::{Daemon, DaemonConfig, Dnsmasq, Listener};

/// Body bytes of the small response.
const SMALL: usize = 64;
/// The agent with request rules: `[[network.http]]` for HTTPS_NAME, `[[network.tls]]` for
/// SNI_NAME, and a static address rule for the connect loop's listener.
const RULES_AGENT: &str = "interceptbench";
/// An agent with the same static rule and no request rules.
const PLAIN_AGENT: &str = "plainbench";
const HTTPS_NAME: &str = "https.ok.test";
const SNI_NAME: &str = "sni.ok.test";
/// Where the servers listen; the names resolve here (dnsmasq).
const SERVER_IP: &str = "127.0.0.3";
/// Where SNI_NAME's server listens: an address of its own, since one also learned from
/// HTTPS_NAME (method/path rules) would send its connects to the endpoint, not judge them in
/// the kernel.
const SNI_SERVER_IP: &str = "127.0.0.4";

/// Per repetition (interleaved): small requests on one kept-alive HTTPS connection and one large
/// download, direct and intercepted; the daemon's memory per open connection; connect loops of
/// an agent with request rules, one without, and no agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterceptCost {
    pub requests: usize,
    pub mib: u64,
    pub direct: Vec<OpStats>,
    pub intercepted: Vec<OpStats>,
    pub direct_download: Vec<Download>,
    pub intercepted_download: Vec<Download>,
    /// The daemon's CPU time (user + system, s) during each intercepted download.
    pub intercepted_daemon_cpu_s: Vec<f64>,
    /// Open connections held through the endpoint: server-name rule, interception.
    pub held: Vec<Held>,
    pub connects: usize,
    pub connect_no_agent: Vec<OpStats>,
    pub connect_plain_agent: Vec<OpStats>,
    pub connect_rules_agent: Vec<OpStats>,
}

/// N connections opened through the endpoint and held idle, with the daemon's RSS and open
/// descriptors before and while they are open.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    /// `sni` (spliced) or `https` (intercepted, one request answered on each).
    pub kind: String,
    pub n: usize,
    pub rss_before_kib: u64,
    pub rss_with_kib: u64,
    pub fds_before: usize,
    pub fds_with: usize,
}

impl Held {
    pub fn bytes_per_connection(&self) -> f64 {
        (self.rss_with_kib as f64 - self.rss_before_kib as f64) * 1024.0 / self.n as f64
    }
}

// ---------------------------------------------------------------------------------------------
// The server and the test CA.

/// A CA for the test server, its certificate written to `dir/test-ca.pem` (the daemon verifies
/// upstream against it, the direct client trusts it), and the server's configuration.
pub fn server_config(dir: &Path) -> anyhow::Result<(Arc<rustls::ServerConfig>, PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "agent-monitor bench upstream CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_path = dir.join("test-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec![HTTPS_NAME.to_string()])?.signed_by(&key, &issuer)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), ca_path))
}

/// ring, as the daemon (rustls deprecates ring's provider for lacking post-quantum key exchange;
/// both ends use the same suites either way).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves HTTPS on `listener`, one thread per connection, until the process ends.
pub fn serve(listener: TcpListener, config: Arc<rustls::ServerConfig>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, config);
            });
        }
    });
}

fn answer(stream: TcpStream, config: Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, stream);
    let mut pending = Vec::new();
    let chunk = vec![0x5a; 256 * 1024];
    loop {
        let Some(head) = read_head(&mut tls, &mut pending)? else {
            return Ok(());
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&head)?;
        let path = req.path.unwrap_or_default();
        let length = match path.split_once('?') {
            Some(("/big", n)) => n.parse::<u64>()?,
            _ if path == "/small" => SMALL as u64,
            _ => {
                tls.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
                continue;
            }
        };
        write!(tls, "HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n")?;
        let mut left = length;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            tls.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        tls.flush()?;
    }
}

/// Reads up to the end of a message head (`\r\n\r\n`); what follows stays in `pending`. `None`:
/// the peer closed between messages.
fn read_head(
    tls: &mut impl std::io::Read,
    pending: &mut Vec<u8>,
) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = pending[..end + 4].to_vec();
            pending.drain(..end + 4);
            return Ok(Some(head));
        }
        let mut buf = [0u8; 4096];
        let n = match tls.read(&mut buf) {
            Ok(n) => n,
            // A client that closes without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            if pending.is_empty() {
                return Ok(None);
            }
            bail!("the connection ended inside a message head");
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// The load generators (run directly, or as an agent through the endpoint).

/// Where a generator connects, and what it trusts.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The server name (SNI, `Host`), resolved unless `--addr` is given.
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub port: u16,
    /// Connect to this address instead of resolving NAME (direct: the name is only known to the
    /// agents' resolver).
    #[arg(long)]
    pub addr: Option<IpAddr>,
    /// The CA certificates to trust (PEM). `egress-hold` without it: the raw server, no TLS.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl Target {
    fn socket_addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(ip) = self.addr {
            return Ok(SocketAddr::new(ip, self.port));
        }
        (self.name.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.name))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{} has no IPv4 address", self.name))
    }

    fn open(&self) -> anyhow::Result<Client> {
        let ca = self.ca.as_deref().context("--ca is needed for HTTPS")?;
        Client::open(self.socket_addr()?, &self.name, ca)
    }
}

/// One kept-alive HTTPS connection.
struct Client {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    name: String,
    pending: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    /// Connects and completes the handshake, trusting the certificates in `ca` (PEM).
    fn open(to: SocketAddr, name: &str, ca: &Path) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", ca.display()))?;
        roots.add_parsable_certificates(certs);
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(name.to_string())?,
        )?;
        let sock = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
        sock.set_nodelay(true)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .context("the TLS handshake")?;
        }
        Ok(Client {
            tls,
            name: name.to_string(),
            pending: Vec::new(),
            buf: vec![0u8; 256 * 1024],
        })
    }

    /// `GET path`; reads the whole response. Returns its status and body length.
    fn get(&mut self, path: &str) -> anyhow::Result<(u16, u64)> {
        write!(
            self.tls,
            "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: agent-monitor-bench\r\n\r\n",
            self.name
        )?;
        self.tls.flush()?;
        let head = read_head(&mut self.tls, &mut self.pending)?
            .context("the server closed the connection before answering")?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&head)?;
        let status = resp.code.unwrap_or(0);
        let length: u64 = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .context("a response without content-length")?;
        let mut got = self.pending.len() as u64;
        self.pending.clear();
        while got < length {
            let want = self.buf.len().min((length - got) as usize);
            match self.tls.read(&mut self.buf[..want])? {
                0 => bail!("the response ended after {got} of {length} bytes"),
                n => got += n as u64,
            }
        }
        Ok((status, length))
    }
}

/// N small requests (`GET /small`) on one connection (opened before the clock starts).
pub fn requests(n: usize, to: &Target) -> anyhow::Result<OpStats> {
    let mut client = to.open()?;
    let (mut times, mut ok, mut refused, mut other) = (Vec::with_capacity(n), 0, 0, 0);
    for _ in 0..n {
        let t = Instant::now();
        let got = client.get("/small");
        times.push(t.elapsed().as_nanos() as u64);
        match got {
            Ok((200, _)) => ok += 1,
            Ok((403, _)) => refused += 1,
            Ok(_) => other += 1,
            Err(e) => bail!("request failed: {e:#}"),
        }
    }
    Ok(stats(times, ok, refused, other))
}

/// One download of MIB MiB (`GET /big?BYTES`) on a connection opened before the clock starts.
pub fn download(mib: u64, to: &Target) -> anyhow::Result<Download> {
    let mut client = to.open()?;
    let bytes = mib << 20;
    let t = Instant::now();
    let (status, got) = client.get(&format!("/big?{bytes}"))?;
    let secs = t.elapsed().as_secs_f64();
    if status != 200 || got != bytes {
        bail!("the download answered {status} with {got} of {bytes} bytes");
    }
    Ok(Download {
        bytes,
        secs,
        mib_per_s: mib as f64 / secs,
    })
}

/// Opens N connections and holds them: with `ca`, HTTPS (handshake and one small request each);
/// without, a ClientHello for NAME and the raw server's one-byte answer (`egress.rs`, `H`).
/// Prints `ready N` once all are open, closes them when stdin closes.
pub fn hold(n: usize, to: &Target) -> anyhow::Result<()> {
    let addr = to.socket_addr()?;
    let mut https = Vec::new();
    let mut raw = Vec::new();
    for i in 0..n {
        let opened = match to.ca {
            Some(_) => to.open().and_then(|mut c| {
                let (status, _) = c.get("/small")?;
                if status != 200 {
                    bail!("answered {status}");
                }
                https.push(c);
                Ok(())
            }),
            None => (|| {
                let mut s = TcpStream::connect(addr)?;
                let mut first = crate::egress::client_hello(&to.name);
                first.push(b'H');
                s.write_all(&first)?;
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
                raw.push(s);
                Ok(())
            })(),
        };
        opened.with_context(|| format!("connection {i} of {n}"))?;
    }
    println!("ready {n}");
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The phase.

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The daemon's resident memory (KiB) and open descriptors.
fn daemon_usage(pid: u32) -> anyhow::Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS missing")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

pub fn measure(env: &Env, dir: &Path) -> anyhow::Result<InterceptCost> {
    let p = &env.plan;
    let requests = if p.quick { 300 } else { 2000 };
    let mib = if p.quick { 128 } else { 1024 };
    let held = if p.quick { 100 } else { 1000 };
    let connects = if p.quick { 1000 } else { 5000 };
    let reps = p.reps.min(5);

    let (config, test_ca) = server_config(dir)?;
    let https = TcpListener::bind((SERVER_IP, 0))?;
    let https_port = https.local_addr()?.port();
    serve(https, config);
    let raw = TcpListener::bind((SNI_SERVER_IP, 0))?;
    let raw_port = raw.local_addr()?.port();
    crate::egress::serve(raw);
    let _listener = Listener::start(&env.bench, env.tcp_port)?;
    let upstream = Dnsmasq::start(
        dir,
        free_port()?,
        &[
            format!("--address=/{HTTPS_NAME}/{SERVER_IP}"),
            format!("--address=/{SNI_NAME}/{SNI_SERVER_IP}"),
        ],
    )?;
    let policies = dir.join("intercept-policies");
    std::fs::create_dir_all(&policies)?;
    let common = |agent: &str| {
        format!(
            "agent = \"{agent}\"\nmode = \"enforce\"\n[network]\nallow = [\"127.0.0.1:{}\"]\n\
             [exec]\nallow = [\"{}\"]\n[dns]\nprivate_answers = [\"*.ok.test\"]\n",
            env.tcp_port,
            env.bench.display()
        )
    };
    std::fs::write(
        policies.join(format!("{RULES_AGENT}.toml")),
        format!(
            "{}\n[[network.http]]\nhost = \"{HTTPS_NAME}\"\nport = {https_port}\n\
             methods = [\"GET\"]\npaths = [\"/small\", \"/big\"]\n\
             [[network.tls]]\nhost = \"{SNI_NAME}\"\nport = {raw_port}\n",
            common(RULES_AGENT)
        ),
    )?;
    std::fs::write(
        policies.join(format!("{PLAIN_AGENT}.toml")),
        common(PLAIN_AGENT),
    )?;
    let ca_dir = dir.join("intercept-ca");
    let cfg = DaemonConfig {
        policies,
        extra: vec![
            s("--dns-upstream"),
            format!("127.0.0.1:{}", upstream.port),
            s("--ca-dir"),
            ca_dir.display().to_string(),
            s("--upstream-ca-bundle"),
            test_ca.display().to_string(),
        ],
        ..env.daemon.clone()
    };
    let d = Daemon::start(&cfg, "intercept")?;
    // What `run` hands agents: the system roots and the daemon's CA.
    let bundle = ca_dir.join("bundle.pem");

    let https_args = |what: &[String], direct: bool| {
        let mut a = what.to_vec();
        a.extend([s("--name"), s(HTTPS_NAME), s("--port"), s(https_port)]);
        if direct {
            a.extend([
                s("--addr"),
                s(SERVER_IP),
                s("--ca"),
                test_ca.display().to_string(),
            ]);
        } else {
            a.extend([s("--ca"), bundle.display().to_string()]);
        }
        a
    };
    let small = [s("https-requests"), s("--n"), s(requests)];
    let large = [s("https-download"), s("--mib"), s(mib)];
    let connect = [
        s("connect"),
        s("--realtime"),
        s("--n"),
        s(connects),
        s("--port"),
        s(env.tcp_port),
        s("--to"),
        format!("127.0.0.1:{}", env.tcp_port),
    ];
    let mut out = InterceptCost {
        requests,
        mib,
        connects,
        ..InterceptCost::default()
    };
    for rep in 0..reps {
        check_interrupt()?;
        eprintln!("bench: interception rep {}/{reps}", rep + 1);
        let task = format!("intercept-{rep}");
        let direct: OpStats = load(env, None, &https_args(&small, true))?;
        let through: OpStats = load_as(env, RULES_AGENT, (&d, &task), &https_args(&small, false))?;
        if direct.ok != requests || through.ok != requests {
            bail!(
                "interception repetition {rep}: {} of {requests} direct and {} of {requests} \
                 intercepted requests were answered 200",
                direct.ok,
                through.ok
            );
        }
        out.direct.push(direct);
        out.intercepted.push(through);
        out.direct_download
            .push(load(env, None, &https_args(&large, true))?);
        let cpu = cpu_secs(d.pid())?;
        out.intercepted_download.push(load_as(
            env,
            RULES_AGENT,
            (&d, &task),
            &https_args(&large, false),
        )?);
        out.intercepted_daemon_cpu_s.push(cpu_secs(d.pid())? - cpu);
        out.connect_no_agent.push(load(env, None, &connect)?);
        out.connect_plain_agent
            .push(load_as(env, PLAIN_AGENT, (&d, &task), &connect)?);
        out.connect_rules_agent
            .push(load_as(env, RULES_AGENT, (&d, &task), &connect)?);
    }
    check_interrupt()?;
    let sni_hold = vec![
        s("egress-hold"),
        s("--n"),
        s(held),
        s("--name"),
        s(SNI_NAME),
        s("--port"),
        s(raw_port),
    ];
    out.held.push(hold_through(env, &d, "sni", &sni_hold)?);
    let https_hold = https_args(&[s("egress-hold"), s("--n"), s(held)], false);
    out.held.push(hold_through(env, &d, "https", &https_hold)?);
    Ok(out)
}

/// Runs the hold generator as RULES_AGENT; reads the daemon's usage before and once every
/// connection is open.
fn hold_through(env: &Env, d: &Daemon, kind: &str, args: &[String]) -> anyhow::Result<Held> {
    eprintln!("bench: holding connections through the endpoint ({kind})");
    let (rss_before_kib, fds_before) = daemon_usage(d.pid())?;
    let mut child = spawn_load_as(env, RULES_AGENT, &format!("hold-{kind}"), d, args)
        .context("starting the hold generator")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let measured = if let Some(n) = line.trim().strip_prefix("ready ") {
        let (rss_with_kib, fds_with) = daemon_usage(d.pid())?;
        Ok(Held {
            kind: kind.to_string(),
            n: n.parse()?,
            rss_before_kib,
            rss_with_kib,
            fds_before,
            fds_with,
        })
    } else {
        Err(anyhow::anyhow!(
            "the hold generator ({kind}) did not get its connections open: {line:?}"
        ))
    };
    // Closing stdin closes the connections.
    drop(child.stdin.take());
    let _ = child.wait();
    measured
}

// ---------------------------------------------------------------------------------------------
// The report.

fn med_of(v: &[OpStats], f: fn(&OpStats) -> u64) -> f64 {
    median(&v.iter().map(f).collect::<Vec<_>>())
}

fn rate(v: &[Download]) -> f64 {
    median_f(&v.iter().map(|d| d.mib_per_s).collect::<Vec<_>>())
}

/// Added latency per repetition (through minus direct, paired), its median: at the median and p99.
fn added(direct: &[OpStats], through: &[OpStats]) -> (f64, f64) {
    let (m, p): (Vec<f64>, Vec<f64>) = direct
        .iter()
        .zip(through)
        .map(|(a, b)| {
            (
                b.median_ns as f64 - a.median_ns as f64,
                b.p99_ns as f64 - a.p99_ns as f64,
            )
        })
        .unzip();
    (median_f(&m), median_f(&p))
}

/// The targets for the endpoint, for the report's target table; none for a run that did
/// not measure it.
pub fn targets(r: &Results) -> Vec<crate::report::Target> {
    let mut t = Vec::new();
    if let Some(e) = r.egress.as_ref().filter(|e| !e.direct.is_empty()) {
        let share = rate(&e.through_download) / rate(&e.direct_download) * 100.0;
        t.push(crate::report::Target {
            what: "server-name rule (judged in the kernel): download ≥ 80 % of direct".into(),
            measured: format!(
                "{share:.0} % ({:.0} of {:.0} MiB/s)",
                rate(&e.through_download),
                rate(&e.direct_download)
            ),
            held: share >= 80.0,
        });
        let (p50, _) = added(&e.direct, &e.through);
        t.push(crate::report::Target {
            what: "server-name rule: added p50 per request < 1 ms".into(),
            measured: format!("{:.0} µs (a new connection each)", p50 / 1000.0),
            held: p50 < 1e6,
        });
    }
    if let Some(i) = r.intercept.as_ref().filter(|i| !i.direct.is_empty()) {
        let share = rate(&i.intercepted_download) / rate(&i.direct_download) * 100.0;
        t.push(crate::report::Target {
            what: "interception: download ≥ ⅓ of direct".into(),
            measured: format!(
                "{share:.0} % ({:.0} of {:.0} MiB/s)",
                rate(&i.intercepted_download),
                rate(&i.direct_download)
            ),
            held: share >= 100.0 / 3.0,
        });
        let (p50, _) = added(&i.direct, &i.intercepted);
        t.push(crate::report::Target {
            what: "interception: added p50 per request < 1 ms".into(),
            measured: format!("{:.0} µs (kept-alive connection)", p50 / 1000.0),
            held: p50 < 1e6,
        });
    }
    t
}

/// The report's section.
pub fn section(o: &mut String, i: Option<&InterceptCost>) {
    let _ = writeln!(
        o,
        "## Egress endpoint (interception, memory, connects without rules)\n"
    );
    let Some(i) = i.filter(|i| !i.direct.is_empty()) else {
        let _ = writeln!(o, "Not measured in this run.\n");
        return;
    };
    let us = |ns: f64| format!("{:.1}", ns / 1000.0);
    let _ = writeln!(
        o,
        "{} repetitions, interleaved; in each, {} small HTTPS requests (`GET`, 64 bytes back) on \
         one kept-alive connection (opened before the clock starts) and one {} MiB download, \
         *direct* from an ordinary process to the server (TLS 1.3, rustls on both ends) and \
         *intercepted* from an agent with a `[[network.http]]` rule for the name: the kernel \
         redirects the connect, the daemon terminates TLS with a leaf of its CA, judges each \
         request and sends it upstream over its own TLS connection to the same server. Medians \
         over the repetitions; *added* is the median of the per-repetition differences.\n",
        i.direct.len(),
        i.requests,
        i.mib
    );
    crate::report::request_table(
        o,
        &[
            ("direct", &i.direct, &i.direct_download),
            ("intercepted", &i.intercepted, &i.intercepted_download),
        ],
    );
    let (p50, p99) = added(&i.direct, &i.intercepted);
    let _ = writeln!(
        o,
        "| **added by interception** | **{}** | **{}** | **{:.0} % of direct** (target ≥ 33 %) |\n",
        us(p50),
        us(p99),
        rate(&i.intercepted_download) / rate(&i.direct_download) * 100.0
    );
    if !i.intercepted_daemon_cpu_s.is_empty() {
        let _ = writeln!(
            o,
            "The daemon's CPU time (user + system) per GiB intercepted (decrypted, judged, \
             encrypted again both ways): **{:.2} s** (median over the downloads).\n",
            median_f(&i.intercepted_daemon_cpu_s) * 1024.0 / i.mib as f64
        );
    }
    let _ = writeln!(
        o,
        "Memory per open connection: the agent opens N connections and holds them idle \
         (server-name rule: ClientHello judged in the kernel and answered, the connection straight \
         to the server, so the daemon holds nothing for it; interception: through the endpoint, \
         handshake and one request answered, its upstream connection kept for the next); the \
         daemon's RSS and open descriptors are read before and while they are open.\n"
    );
    let _ = writeln!(
        o,
        "| connection | N | daemon RSS before | with them | per connection | descriptors per connection |\n|---|---:|---:|---:|---:|---:|"
    );
    for h in &i.held {
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} |",
            match h.kind.as_str() {
                "sni" => "server-name rule (judged in the kernel)",
                "https" => "intercepted",
                other => other,
            },
            h.n,
            h.rss_before_kib as f64 / 1024.0,
            h.rss_with_kib as f64 / 1024.0,
            h.bytes_per_connection() / 1024.0,
            (h.fds_with as f64 - h.fds_before as f64) / h.n as f64
        );
    }
    let (none, plain, rules) = (
        med_of(&i.connect_no_agent, |x| x.median_ns),
        med_of(&i.connect_plain_agent, |x| x.median_ns),
        med_of(&i.connect_rules_agent, |x| x.median_ns),
    );
    let _ = writeln!(
        o,
        "\nConnects without request rules: {} loopback TCP connects per repetition to an address \
         on a static rule (not redirected), by no agent, by an agent without request rules and \
         by the agent with them (the same daemon). Request rules add work only to connects \
         allowed by a learned address (one hash lookup); the overhead table above is the same \
         loop against a daemon with no request rules at all.\n",
        i.connects
    );
    let _ = writeln!(
        o,
        "| connect by | median µs | vs no agent |\n|---|---:|---:|\n| no agent | {} | |\n| \
         agent without request rules | {} | {:+.1} % |\n| agent with request rules | {} | {:+.1} % |\n",
        us(none),
        us(plain),
        (plain / none - 1.0) * 100.0,
        us(rules),
        (rules / none - 1.0) * 100.0
    );
}
