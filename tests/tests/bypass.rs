//! Adversarial end to end: every route to the network or to a new program that an agent could try
//! instead of a plain connect() or execve(), each named after the attack. Each asserts that the
//! denied route is denied and reported, and that the allowed equivalent still works.
//! Run one at a time (`--test-threads=1`): the programs attach at the cgroup root.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use agent_monitor_tests::*;
use serde_json::Value;

fn policy(agent: &str, net: &[String], exec: &[&str]) -> (String, String) {
    let q = |v: &[&str]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let net: Vec<&str> = net.iter().map(String::as_str).collect();
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = [{}]\n[exec]\nallow = [{}]\n",
            q(&net),
            q(exec)
        ),
    )
}

fn is(v: &Value, key: &str, want: &str) -> bool {
    field(v, key) == want
}

/// `script` with each `@NAME@` replaced by its value.
fn fill(script: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(script.to_string(), |s, (k, v)| {
        s.replace(&format!("@{k}@"), v)
    })
}

fn eperm() -> String {
    format!("errno {}", libc::EPERM)
}

fn run_py(d: &Daemon, agent: &str, script: &str) -> Output {
    d.run(
        agent,
        None,
        &[PYTHON, "-c", &format!("{PY_ATTEMPT}{script}")],
    )
}

/// Two loopback endpoints, a new agent that may reach only the first, and a daemon enforcing it.
fn scene<L>(
    label: &str,
    bind: impl Fn() -> L,
    port: impl Fn(&L) -> u16,
    exec: &[&str],
) -> (L, L, String, Daemon) {
    let (allowed, denied) = (bind(), bind());
    let agent = unique_agent(label);
    let d = Daemon::start(&[policy(
        &agent,
        &[format!("127.0.0.1:{}", port(&allowed))],
        exec,
    )]);
    (allowed, denied, agent, d)
}

#[test]
fn udp_sendto_without_connect_is_judged() {
    if !require_root("udp_sendto_without_connect_is_judged") {
        return;
    }
    let (allowed, denied, agent, d) = scene(
        "udpsendto",
        || UdpSink::bind("127.0.0.1:0"),
        |l| l.port,
        &[PYTHON],
    );
    let out = run_py(
        &d,
        &agent,
        &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             attempt('sendto_denied', lambda: s.sendto(b'leak', ('127.0.0.1', {d})))\n\
             attempt('sendmsg_denied', lambda: s.sendmsg([b'leak'], [], 0, ('127.0.0.1', {d})))\n\
             attempt('sendto_allowed', lambda: s.sendto(b'fine', ('127.0.0.1', {a})))\n\
             attempt('sendmsg_allowed', lambda: s.sendmsg([b'fine'], [], 0, ('127.0.0.1', {a})))\n",
            d = denied.port,
            a = allowed.port
        ),
    );
    assert_eq!(outcome(&out, "sendto_denied"), eperm());
    assert_eq!(outcome(&out, "sendmsg_denied"), eperm());
    assert_eq!(outcome(&out, "sendto_allowed"), "ok");
    assert_eq!(outcome(&out, "sendmsg_allowed"), "ok");
    assert_eq!(denied.received(), 0, "a denied datagram arrived");
    assert_eq!(allowed.received(), 2, "allowed datagrams missing");
    let rec = d.wait_audit("denied sendmsg", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "denied") && v["dest_port"] == denied.port
    });
    assert_eq!(field(&rec, "dest_transport"), "udp");
    assert_eq!(field(&rec, "dest_addr"), "127.0.0.1");
    assert_eq!(field(&rec, "enforcement"), "eperm");
    d.wait_audit("allowed sendmsg", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "allowed") && v["dest_port"] == allowed.port
    });
    let e = wait_journal(&agent, "denied sendmsg", |e| {
        is(e, "ACTION", "sendmsg") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "DEST_PORT"), denied.port.to_string());
    assert_eq!(field(&e, "DEST_TRANSPORT"), "udp");
}

#[test]
fn connected_udp_socket_sending_elsewhere_is_judged() {
    if !require_root("connected_udp_socket_sending_elsewhere_is_judged") {
        return;
    }
    let (allowed, denied, agent, d) = scene(
        "udpelsewhere",
        || UdpSink::bind("127.0.0.1:0"),
        |l| l.port,
        &[PYTHON],
    );
    let out = run_py(
        &d,
        &agent,
        &format!(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             attempt('connect_allowed', lambda: s.connect(('127.0.0.1', {a})))\n\
             attempt('send_connected', lambda: s.send(b'fine'))\n\
             attempt('sendto_elsewhere', lambda: s.sendto(b'leak', ('127.0.0.1', {d})))\n",
            d = denied.port,
            a = allowed.port
        ),
    );
    assert_eq!(outcome(&out, "connect_allowed"), "ok");
    assert_eq!(outcome(&out, "send_connected"), "ok");
    assert_eq!(outcome(&out, "sendto_elsewhere"), eperm());
    assert_eq!(denied.received(), 0);
    assert_eq!(allowed.received(), 1);
    d.wait_audit("denied sendmsg elsewhere", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "denied") && v["dest_port"] == denied.port
    });
}

/// sendmmsg(2) sends a batch through the same udp_sendmsg; python has no sendmmsg, so C.
#[test]
fn udp_sendmmsg_batch_is_judged_per_destination() {
    if !require_root("udp_sendmmsg_batch_is_judged_per_destination") {
        return;
    }
    let allowed = UdpSink::bind("127.0.0.1:0");
    let denied = UdpSink::bind("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "mmsg", SENDMMSG_C);
    let bin_s = bin.to_str().unwrap();
    let agent = unique_agent("sendmmsg");
    let d = Daemon::start(&[policy(
        &agent,
        &[format!("127.0.0.1:{}", allowed.port)],
        &[bin_s],
    )]);
    let a = allowed.port.to_string();
    let n = denied.port.to_string();
    let out = d.run(&agent, None, &[bin_s, &a, &n]);
    let stdout = text(&out.stdout);
    // The first message goes out; the batch stops at the denied one with EPERM.
    assert!(
        stdout.contains(&format!("sent 1 errno {}", libc::EPERM)),
        "{stdout} {}",
        text(&out.stderr)
    );
    assert_eq!(denied.received(), 0);
    assert_eq!(allowed.received(), 1);
    d.wait_audit("denied sendmmsg", |v| {
        is(v, "action", "sendmsg") && is(v, "verdict", "denied") && v["dest_port"] == denied.port
    });
}

const SENDMMSG_C: &str = r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to[2];
    struct mmsghdr m[2];
    struct iovec iov = { "x", 1 };
    memset(to, 0, sizeof to); memset(m, 0, sizeof m);
    for (int i = 0; i < 2; i++) {
        to[i].sin_family = AF_INET;
        to[i].sin_port = htons(atoi(argv[1 + i]));
        to[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        m[i].msg_hdr.msg_name = &to[i];
        m[i].msg_hdr.msg_namelen = sizeof to[i];
        m[i].msg_hdr.msg_iov = &iov;
        m[i].msg_hdr.msg_iovlen = 1;
    }
    int n = sendmmsg(s, m, 2, 0);
    int again = sendmmsg(s, m + 1, 1, 0);
    printf("sent %d errno %d\n", n, again < 0 ? errno : 0);
    return 0;
}
"#;

#[test]
fn ipv4_mapped_ipv6_destination_is_judged_as_ipv4() {
    if !require_root("ipv4_mapped_ipv6_destination_is_judged_as_ipv4") {
        return;
    }
    let udp_denied = UdpSink::bind("127.0.0.1:0");
    let (allowed, denied, agent, d) = scene(
        "mapped",
        || CountingListener::bind("127.0.0.1:0"),
        |l| l.port,
        &[PYTHON],
    );
    let out = run_py(
        &d,
        &agent,
        &format!(
            "def tcp(port):\n    socket.socket(socket.AF_INET6).connect(('::ffff:127.0.0.1', port))\n\
             attempt('mapped_denied', lambda: tcp({d}))\n\
             attempt('mapped_allowed', lambda: tcp({a}))\n\
             u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             attempt('mapped_udp_denied', lambda: u.sendto(b'x', ('::ffff:127.0.0.1', {u})))\n",
            d = denied.port,
            a = allowed.port,
            u = udp_denied.port
        ),
    );
    assert_eq!(outcome(&out, "mapped_denied"), eperm());
    assert_eq!(outcome(&out, "mapped_allowed"), "ok");
    assert_eq!(outcome(&out, "mapped_udp_denied"), eperm());
    assert_eq!(denied.accepted(), 0);
    assert_eq!(udp_denied.received(), 0);
    let rec = d.wait_audit("denied mapped connect", |v| {
        is(v, "action", "connect") && is(v, "verdict", "denied") && v["dest_port"] == denied.port
    });
    // Reported as the IPv4 address it is.
    assert_eq!(field(&rec, "dest_addr"), "127.0.0.1");
    assert!(field(&rec, "reason").contains("no rule matches"), "{rec}");
}

#[test]
fn unspecified_address_is_judged_as_the_loopback_it_reaches() {
    if !require_root("unspecified_address_is_judged_as_the_loopback_it_reaches") {
        return;
    }
    let allowed = CountingListener::bind("127.0.0.1:0");
    let denied = CountingListener::bind("0.0.0.0:0");
    let agent = unique_agent("unspec");
    // 0.0.0.0/8 covers 0.0.0.0 but not 127.0.0.1, where a connect to 0.0.0.0 lands.
    let d = Daemon::start(&[policy(
        &agent,
        &[format!("127.0.0.1:{}", allowed.port), "0.0.0.0/8:*".into()],
        &[PYTHON],
    )]);
    let out = run_py(
        &d,
        &agent,
        &format!(
            "def tcp(fam, host, port):\n    socket.socket(fam).connect((host, port))\n\
             attempt('zero_denied', lambda: tcp(socket.AF_INET, '0.0.0.0', {d}))\n\
             attempt('any6_denied', lambda: tcp(socket.AF_INET6, '::', {d}))\n\
             attempt('mapped_zero_denied', lambda: tcp(socket.AF_INET6, '::ffff:0.0.0.0', {d}))\n\
             attempt('zero_allowed', lambda: tcp(socket.AF_INET, '0.0.0.0', {a}))\n",
            d = denied.port,
            a = allowed.port
        ),
    );
    assert_eq!(outcome(&out, "zero_denied"), eperm());
    assert_eq!(outcome(&out, "any6_denied"), eperm());
    assert_eq!(outcome(&out, "mapped_zero_denied"), eperm());
    assert_eq!(outcome(&out, "zero_allowed"), "ok");
    assert_eq!(denied.accepted(), 0);
    let rec = d.wait_audit("denied 0.0.0.0 connect", |v| {
        is(v, "verdict", "denied") && is(v, "dest_addr", "0.0.0.0")
    });
    assert!(field(&rec, "reason").contains("loopback"), "{rec}");
    d.wait_audit("allowed 0.0.0.0 connect", |v| {
        is(v, "verdict", "allowed") && v["dest_port"] == allowed.port
    });
}

#[test]
fn tcp_fast_open_sendto_is_judged_like_connect() {
    if !require_root("tcp_fast_open_sendto_is_judged_like_connect") {
        return;
    }
    let (allowed, denied, agent, d) = scene(
        "tfo",
        || CountingListener::bind("127.0.0.1:0"),
        |l| l.port,
        &[PYTHON],
    );
    let out = run_py(
        &d,
        &agent,
        &format!(
            "def tfo(port):\n    socket.socket().sendto(b'GET / HTTP/1.0\\r\\n\\r\\n', socket.MSG_FASTOPEN, ('127.0.0.1', port))\n\
             attempt('tfo_denied', lambda: tfo({d}))\n\
             attempt('tfo_allowed', lambda: tfo({a}))\n",
            d = denied.port,
            a = allowed.port
        ),
    );
    assert_eq!(outcome(&out, "tfo_denied"), eperm());
    assert_eq!(outcome(&out, "tfo_allowed"), "ok");
    assert_eq!(denied.accepted(), 0);
    assert_eq!(allowed.accepted(), 1);
    d.wait_audit("denied fast open", |v| {
        is(v, "action", "connect") && is(v, "verdict", "denied") && v["dest_port"] == denied.port
    });
}

#[test]
fn dual_stack_client_reaches_an_allowed_ipv4_destination() {
    if !require_root("dual_stack_client_reaches_an_allowed_ipv4_destination") {
        return;
    }
    let server = CountingListener::bind("127.0.0.1:0");
    let agent = unique_agent("dualstack");
    let d = Daemon::start(&[policy(
        &agent,
        &[format!("127.0.0.1:{}", server.port)],
        &["/usr/bin/curl"],
    )]);
    // curl resolves localhost to ::1 and 127.0.0.1 and tries both: the ::1 attempt is denied,
    // the 127.0.0.1 one must still go through.
    let url = format!("http://localhost:{}/", server.port);
    let out = d.run(
        &agent,
        None,
        &["/usr/bin/curl", "-sS", "--max-time", "10", &url],
    );
    assert!(
        out.status.success(),
        "curl failed: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "ok");
    d.wait_audit("allowed IPv4 connect", |v| {
        is(v, "verdict", "allowed") && is(v, "dest_addr", "127.0.0.1")
    });
}

/// A thread flips the caller's sockaddr between an allowed and a denied port while another
/// connects in a loop: the kernel judges its own copy, so the denied listener never sees a
/// connection and every record of the denied port is a denial.
#[test]
fn sockaddr_flipped_during_connect_never_reaches_the_denied_port() {
    if !require_root("sockaddr_flipped_during_connect_never_reaches_the_denied_port") {
        return;
    }
    let allowed = CountingListener::bind("127.0.0.1:0");
    let denied = CountingListener::bind("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let bin = compile_c(dir.path(), "race", RACE_C);
    let bin_s = bin.to_str().unwrap();
    let agent = unique_agent("race");
    let d = Daemon::start(&[policy(
        &agent,
        &[format!("127.0.0.1:{}", allowed.port)],
        &[bin_s],
    )]);
    let (a, n) = (allowed.port.to_string(), denied.port.to_string());
    let count = |stdout: &str, k: &str| -> u32 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} missing: {stdout}"))
    };
    // Until both outcomes happened (the flip raced the calls); a loaded machine may starve the
    // flipping thread for a whole round.
    let mut raced = false;
    for round in 1..=5 {
        let out = d.run(&agent, None, &[bin_s, &a, &n, "3000"]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout} {}", text(&out.stderr));
        eprintln!("round {round}: {stdout}");
        assert_eq!(
            denied.accepted(),
            0,
            "the race reached the denied port: {stdout}"
        );
        if count(&stdout, "ok=") > 0 && count(&stdout, "eperm=") > 0 {
            raced = true;
            break;
        }
    }
    assert!(
        raced,
        "the flipping thread never raced a connect in 5 rounds"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    for v in d.audit() {
        if v["dest_port"] == denied.port {
            assert_eq!(field(&v, "verdict"), "denied", "{v}");
        }
    }
}

const RACE_C: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
static volatile struct sockaddr_in sa;
static volatile int stop;
static unsigned short p_ok, p_no;
static void dwell(void) { for (volatile int i = 0; i < 2000; i++); }
static void *flip(void *x) {
    (void)x;
    /* Each value stays for a while, so connects see both, and some see it change mid-call. */
    while (!stop) { sa.sin_port = p_ok; dwell(); sa.sin_port = p_no; dwell(); }
    return 0;
}
int main(int argc, char **argv) {
    p_ok = htons(atoi(argv[1])); p_no = htons(atoi(argv[2]));
    int n = atoi(argv[3]), ok = 0, eperm = 0, other = 0;
    sa.sin_family = AF_INET; sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK); sa.sin_port = p_ok;
    pthread_t t; pthread_create(&t, 0, flip, 0);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) ok++;
        else if (errno == EPERM) eperm++; else other++;
        close(s);
    }
    stop = 1; pthread_join(t, 0);
    printf("ok=%d eperm=%d other=%d\n", ok, eperm, other);
    return 0;
}
"#;

/// A root agent has no CAP_NET_RAW (tests/tests/privileges.rs); one that kept every capability
/// (`run --keep-capabilities`) still meets the sock_create hook, which refuses and reports.
#[test]
fn raw_socket_is_refused_even_to_a_root_agent() {
    if !require_root("raw_socket_is_refused_even_to_a_root_agent") {
        return;
    }
    let agent = unique_agent("raw");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let script = format!(
        "{PY_ATTEMPT}attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))\n\
         attempt('raw6', lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP))\n\
         attempt('tcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))\n\
         attempt('udp6', lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))\n"
    );
    let out = d.run_with(&agent, &["--keep-capabilities"], &[PYTHON, "-c", &script]);
    assert_eq!(outcome(&out, "raw"), eperm());
    assert_eq!(outcome(&out, "raw6"), eperm());
    assert_eq!(outcome(&out, "tcp"), "ok");
    assert_eq!(outcome(&out, "udp6"), "ok");
    let rec = d.wait_audit("refused raw socket", |v| {
        is(v, "action", "socket") && is(v, "socket", "inet raw icmp (1)")
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "enforcement"), "eperm");
    let e = wait_journal(&agent, "refused raw socket", |e| is(e, "ACTION", "socket"));
    assert_eq!(field(&e, "VERDICT"), "denied");
    assert!(field(&e, "SOCKET").contains("raw"), "{e}");
}

/// ICMP "ping" sockets need no privilege where net.ipv4.ping_group_range admits the user, and
/// their sendto passes no sendmsg hook. The test widens the range inside a private network
/// namespace only (the sysctl is per namespace), so the host is untouched.
#[test]
fn icmp_ping_socket_is_refused() {
    if !require_root("icmp_ping_socket_is_refused") {
        return;
    }
    let agent = unique_agent("ping");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON, "/usr/bin/setpriv"])]);
    let script = format!(
        "{PY_ATTEMPT}attempt('ping4', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))\n\
         attempt('ping6', lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6))\n"
    );
    let inner = format!(
        "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range && exec {} run --control-socket {} --agent {agent} -- {} {PYTHON} -c \"$0\"",
        binary().display(),
        d.socket.display(),
        AS_NOBODY.join(" "),
    );
    let out = std::process::Command::new("/usr/bin/unshare")
        .args(["-n", "--", "/bin/sh", "-c", &inner, &script])
        .output()
        .unwrap();
    assert_eq!(outcome(&out, "ping4"), eperm());
    assert_eq!(outcome(&out, "ping6"), eperm());
    let rec = d.wait_audit("refused ping socket", |v| {
        is(v, "action", "socket") && is(v, "socket", "inet dgram icmp (1)")
    });
    assert_eq!(rec["uid"], 65534);
    d.wait_audit("refused ping6 socket", |v| {
        is(v, "action", "socket") && is(v, "socket", "inet6 dgram icmpv6 (58)")
    });
}

#[test]
fn mptcp_and_sctp_sockets_are_refused() {
    if !require_root("mptcp_and_sctp_sockets_are_refused") {
        return;
    }
    let agent = unique_agent("mptcp");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let out = run_py(
        &d,
        &agent,
        "attempt('mptcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))\n\
         attempt('sctp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))\n",
    );
    assert_eq!(outcome(&out, "mptcp"), eperm());
    // Without the sctp module the kernel refuses first (EPROTONOSUPPORT); either way, no socket.
    let sctp = outcome(&out, "sctp");
    assert!(
        sctp == eperm() || sctp == format!("errno {}", libc::EPROTONOSUPPORT),
        "sctp: {sctp}"
    );
    d.wait_audit("refused mptcp socket", |v| {
        is(v, "action", "socket") && is(v, "socket", "inet stream mptcp (262)")
    });
}

/// A directory the agent (any uid) can write, for markers and its own files.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn killed(out: &Output, what: &str) {
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("{what}=137")) || stdout.contains(&format!("{what}=-9")),
        "{what} was not killed: {stdout} {}",
        text(&out.stderr)
    );
}

fn ran(out: &Output, what: &str) {
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("{what}=0")),
        "{what} did not run: {stdout} {}",
        text(&out.stderr)
    );
}

#[test]
fn symlink_to_forbidden_binary_is_killed() {
    if !require_root("symlink_to_forbidden_binary_is_killed") {
        return;
    }
    let agent = unique_agent("symlink");
    let dir = open_dir();
    let p = dir.path().display();
    let d = Daemon::start(&[policy(&agent, &[], &[SH, "/usr/bin/touch"])]);
    // Made here for brevity; an agent makes the same in any directory it can write.
    std::os::unix::fs::symlink("/usr/bin/id", dir.path().join("harmless")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/touch", dir.path().join("t")).unwrap();
    let script = format!("{p}/harmless; echo id=$?; {p}/t {p}/marker; echo touch=$?");
    let out = d.run(&agent, None, &[SH, "-c", &script]);
    killed(&out, "id");
    // The allowed file runs under another name: it is judged as the file it is.
    ran(&out, "touch");
    assert!(dir.path().join("marker").exists());
    let rec = d.wait_audit("killed symlink", |v| {
        is(v, "action", "exec") && is(v, "exe", &format!("{p}/harmless"))
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "enforcement"), "sigkill");
    let ok = d.wait_audit("allowed symlink", |v| {
        is(v, "action", "exec") && is(v, "exe", &format!("{p}/t"))
    });
    assert_eq!(field(&ok, "verdict"), "allowed");
    assert!(field(&ok, "reason").contains("the file that runs"), "{ok}");
}

/// fexecve / execveat(AT_EMPTY_PATH) and /proc/self/fd/N have no useful name: the file decides.
#[test]
fn exec_by_file_descriptor_is_judged_by_the_file() {
    if !require_root("exec_by_file_descriptor_is_judged_by_the_file") {
        return;
    }
    let agent = unique_agent("fdexec");
    let dir = open_dir();
    let marker = dir.path().join("m");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON, "/usr/bin/touch"])]);
    let script = fill(
        r#"import os
def run(name, path, via_proc):
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_RDONLY)
        args = [path, '@M@-' + name]
        if via_proc:
            os.execv('/proc/self/fd/%d' % fd, args)
        else:
            os.execve(fd, args, {})
    _, st = os.waitpid(pid, 0)
    print(name + '=' + str(-os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)), flush=True)
run('fexecve_id', '/usr/bin/id', False)
run('procfd_id', '/usr/bin/id', True)
run('fexecve_touch', '/usr/bin/touch', False)
run('procfd_touch', '/usr/bin/touch', True)
"#,
        &[("M", marker.display().to_string())],
    );
    let out = d.run(&agent, None, &[PYTHON, "-c", &script]);
    killed(&out, "fexecve_id");
    killed(&out, "procfd_id");
    ran(&out, "fexecve_touch");
    ran(&out, "procfd_touch");
    let rec = d.wait_audit("killed fexecve", |v| {
        is(v, "action", "exec")
            && field(v, "exe").starts_with("/dev/fd/")
            && is(v, "verdict", "denied")
    });
    assert_eq!(field(&rec, "enforcement"), "sigkill");
}

#[test]
fn memfd_copy_of_an_allowed_binary_is_killed() {
    if !require_root("memfd_copy_of_an_allowed_binary_is_killed") {
        return;
    }
    let agent = unique_agent("memfd");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON, "/usr/bin/true"])]);
    let script = r#"import os
fd = os.memfd_create('true')
os.write(fd, open('/usr/bin/true', 'rb').read())
pid = os.fork()
if pid == 0:
    os.execve(fd, ['true'], {})
_, st = os.waitpid(pid, 0)
print('memfd=' + str(-os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)))
pid = os.fork()
if pid == 0:
    os.execv('/usr/bin/true', ['true'])
_, st = os.waitpid(pid, 0)
print('true=' + str(os.WEXITSTATUS(st)))
"#;
    let out = d.run(&agent, None, &[PYTHON, "-c", script]);
    // Same bytes, another file: not the allowed one.
    killed(&out, "memfd");
    ran(&out, "true");
    d.wait_audit("killed memfd exec", |v| {
        is(v, "action", "exec")
            && field(v, "exe").starts_with("/dev/fd/")
            && is(v, "verdict", "denied")
    });
}

#[test]
fn script_with_a_forbidden_interpreter_is_killed() {
    if !require_root("script_with_a_forbidden_interpreter_is_killed") {
        return;
    }
    let agent = unique_agent("script");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display().to_string();
    for (name, body) in [
        ("bad.sh", "#!/usr/bin/id\n"),
        ("good.sh", "#!/bin/sh\nexit 0\n"),
    ] {
        let f = dir.path().join(name);
        std::fs::write(&f, body).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let glob = format!("{p}/*");
    let d = Daemon::start(&[policy(&agent, &[], &[SH, &glob])]);
    let out = d.run(
        &agent,
        None,
        &[
            SH,
            "-c",
            &format!("{p}/bad.sh; echo bad=$?; {p}/good.sh; echo good=$?"),
        ],
    );
    killed(&out, "bad");
    ran(&out, "good");
    let rec = d.wait_audit("killed script", |v| {
        is(v, "action", "exec") && is(v, "exe", &format!("{p}/bad.sh"))
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "interpreter"), "/usr/bin/id");
    assert!(field(&rec, "reason").contains("interpreter"), "{rec}");
    let e = wait_journal(&agent, "killed script", |e| {
        is(e, "ACTION", "exec") && is(e, "VERDICT", "denied")
    });
    assert_eq!(field(&e, "INTERPRETER"), "/usr/bin/id");
}

#[test]
fn dynamic_loader_running_a_forbidden_binary_is_killed() {
    if !require_root("dynamic_loader_running_a_forbidden_binary_is_killed") {
        return;
    }
    let agent = unique_agent("ldso");
    let d = Daemon::start(&[policy(&agent, &[], &[SH, "/usr/bin/true"])]);
    let out = d.run(
        &agent,
        None,
        &[
            SH,
            "-c",
            "/lib64/ld-linux-x86-64.so.2 /usr/bin/id; echo ldso=$?; /usr/bin/true; echo true=$?",
        ],
    );
    killed(&out, "ldso");
    ran(&out, "true");
    d.wait_audit("killed loader", |v| {
        is(v, "action", "exec")
            && is(v, "exe", "/lib64/ld-linux-x86-64.so.2")
            && is(v, "verdict", "denied")
    });
}

/// In its own user and mount namespace an unprivileged agent can bind-mount any file over an
/// allowed name: there only the file counts. (`--user`: a root agent's Landlock ruleset refuses
/// the uid_map write and every mount.)
#[test]
fn bind_mount_over_an_allowed_name_in_a_user_namespace_is_killed() {
    if !require_root("bind_mount_over_an_allowed_name_in_a_user_namespace_is_killed") {
        return;
    }
    let agent = unique_agent("userns");
    let dir = open_dir();
    let p = dir.path().display();
    let d = Daemon::start(&[policy(
        &agent,
        &[],
        &[
            SH,
            "/usr/bin/setpriv",
            "/usr/bin/unshare",
            "/usr/bin/mount",
            "/usr/bin/touch",
        ],
    )]);
    let inner = format!(
        "/usr/bin/touch {p}/real; echo real=$?; \
         /usr/bin/mount --bind /usr/bin/id /usr/bin/touch && /usr/bin/touch {p}/fake; echo fake=$?"
    );
    let cmd = ["/usr/bin/unshare", "-Urm", "--", SH, "-c", &inner];
    let out = d.run_with(&agent, &["--user", "nobody"], &cmd);
    ran(&out, "real");
    killed(&out, "fake");
    assert!(dir.path().join("real").exists());
    assert!(!dir.path().join("fake").exists(), "the bind-mounted id ran");
    let rec = d.wait_audit("killed in user namespace", |v| {
        is(v, "action", "exec") && is(v, "exe", "/usr/bin/touch") && is(v, "verdict", "denied")
    });
    assert!(field(&rec, "reason").contains("user namespace"), "{rec}");
}

/// Identity: an unprivileged agent cannot leave its cgroup — cgroup.procs of other cgroups belong
/// to root, clone3(CLONE_INTO_CGROUP) checks the same write permission, and a cgroup namespace
/// only changes what the agent sees. After each attempt it is still judged as the agent. (Root
/// agents: tests/tests/privileges.rs.)
#[test]
fn unprivileged_agent_cannot_leave_its_cgroup() {
    if !require_root("unprivileged_agent_cannot_leave_its_cgroup") {
        return;
    }
    let denied = CountingListener::bind("127.0.0.1:0");
    let agent = unique_agent("escape");
    let d = Daemon::start(&[policy(
        &agent,
        &[],
        &[PYTHON, "/usr/bin/setpriv", "/usr/bin/unshare"],
    )]);
    let root = cgroup_root();
    let script = PY_ATTEMPT.to_string()
        + &fill(
            r#"import ctypes, threading, struct, time
libc = ctypes.CDLL(None, use_errno=True)
def move():
    open('@ROOT@/cgroup.procs', 'w').write(str(os.getpid()))
attempt('write_root_procs', move)
def clone3():
    fd = os.open('@ROOT@', os.O_RDONLY | os.O_DIRECTORY)
    # struct clone_args: flags = CLONE_INTO_CGROUP, exit_signal = SIGCHLD, cgroup = fd
    args = struct.pack('QQQQQQQQQQQ', 0x200000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, fd)
    buf = ctypes.create_string_buffer(args)
    libc.syscall.restype = ctypes.c_long
    pid = libc.syscall(435, buf, len(args))
    if pid == 0:
        os._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), 'clone3')
    os.waitpid(pid, 0)
attempt('clone3_into_root', clone3)
# A child cgroup of its own would have another id, so no longer be the agent: mkdir is refused.
own = open('/proc/self/cgroup').read().strip().split('::')[-1]
attempt('mkdir_child_cgroup', lambda: os.mkdir('@ROOT@' + own + '/escape'))
def connect():
    socket.socket().connect(('127.0.0.1', @PORT@))
attempt('connect_after', connect)
res = {}
def in_thread():
    try:
        connect()
        res['t'] = 'ok'
    except OSError as e:
        res['t'] = 'errno %d' % e.errno
t = threading.Thread(target=in_thread)
t.start()
t.join()
print('thread_connect', res['t'], flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        attempt('orphan_connect', connect)
    os._exit(0)
time.sleep(1)
"#,
            &[
                ("ROOT", root.display().to_string()),
                ("PORT", denied.port.to_string()),
            ],
        );
    let out = d.run_with(&agent, &["--user", "nobody"], &[PYTHON, "-c", &script]);
    let no_access = |o: String| o == format!("errno {}", libc::EACCES) || o == eperm();
    assert!(
        no_access(outcome(&out, "write_root_procs")),
        "{}",
        text(&out.stdout)
    );
    assert!(
        no_access(outcome(&out, "clone3_into_root")),
        "{}",
        text(&out.stdout)
    );
    assert!(
        no_access(outcome(&out, "mkdir_child_cgroup")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(outcome(&out, "connect_after"), eperm());
    assert_eq!(outcome(&out, "thread_connect"), eperm());
    assert_eq!(outcome(&out, "orphan_connect"), eperm());
    // A cgroup (and user) namespace changes the view, not the cgroup.
    let ns_script = format!(
        "{PY_ATTEMPT}attempt('ns_connect', lambda: socket.socket().connect(('127.0.0.1', {})))\n",
        denied.port
    );
    let cmd = ["/usr/bin/unshare", "-Urc", "--", PYTHON, "-c", &ns_script];
    let out = d.run_with(&agent, &["--user", "nobody"], &cmd);
    assert_eq!(outcome(&out, "ns_connect"), eperm());
    assert_eq!(denied.accepted(), 0);
    let n = d
        .audit()
        .iter()
        .filter(|v| {
            is(v, "action", "connect") && is(v, "verdict", "denied") && is(v, "agent_id", &agent)
        })
        .count();
    assert!(n >= 4, "denied connects reported: {n}");
}

/// The cgroup v2 mount, as the daemon finds it.
fn cgroup_root() -> std::path::PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2")
                .then(|| left.split(' ').nth(4).map(Into::into))?
        })
        .min_by_key(|p: &std::path::PathBuf| p.as_os_str().len())
        .expect("a cgroup2 mount")
}

/// Tries every route `run`'s seccomp filter catches, and the kept socket families.
const FILTER_ROUTES: &str = r#"import ctypes
attempt('vsock', lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM))
attempt('unix', lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
attempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt('inet', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
libc = ctypes.CDLL(None, use_errno=True)
def uring():
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 4, params)
    if fd < 0:
        raise OSError(ctypes.get_errno(), 'io_uring_setup')
    os.close(fd)
attempt('io_uring', uring)
def listener():
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog): a filter of
    # one instruction (allow), so the only reason to fail is ours.
    ins = (ctypes.c_uint16 * 4)(0x06, 0, 0, 0)
    ctypes.memmove(ctypes.addressof(ins) + 4, (ctypes.c_uint32 * 1)(0x7fff0000), 4)
    prog = (ctypes.c_uint64 * 2)(1, ctypes.addressof(ins))
    libc.prctl(38, 1, 0, 0, 0)
    if libc.syscall(317, 1, 8, prog) < 0:
        raise OSError(ctypes.get_errno(), 'seccomp')
attempt('listener', listener)
"#;

/// AF_VSOCK reaches the hypervisor host, and no cgroup hook sees it (sock_create runs for inet
/// only): `run`'s seccomp filter refuses every family but unix, inet, inet6 and netlink, and
/// io_uring, whose socket operation would create one without the socket system call. The
/// refusals are answered by `run` (seccomp user notification) and reported like every action.
#[test]
fn vsock_socket_and_io_uring_are_refused_by_the_run_filter() {
    if !require_root("vsock_socket_and_io_uring_are_refused_by_the_run_filter") {
        return;
    }
    let agent = unique_agent("vsock");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON, "/usr/bin/setpriv"])]);
    let script = PY_ATTEMPT.to_string() + FILTER_ROUTES;
    let mut cmd: Vec<&str> = AS_NOBODY.to_vec();
    cmd.extend([PYTHON, "-c", &script]);
    let out = d.run(&agent, None, &cmd);
    for refused in ["vsock", "packet", "io_uring", "listener"] {
        assert_eq!(outcome(&out, refused), eperm(), "{refused}");
    }
    for ok in ["unix", "netlink", "inet"] {
        assert_eq!(outcome(&out, ok), "ok", "{ok}");
    }
    let rec = d.wait_audit("refused vsock socket", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("vsock")
    });
    assert_eq!(field(&rec, "verdict"), "denied");
    assert_eq!(field(&rec, "enforcement"), "eperm");
    assert_eq!(field(&rec, "comm"), "python3");
    assert_eq!(
        field(&rec, "exe"),
        std::fs::canonicalize(PYTHON).unwrap().to_str().unwrap()
    );
    assert_eq!(rec["uid"], 65534);
    assert!(rec["pid"].as_u64().unwrap() > 0, "{rec}");
    assert!(field(&rec, "reason").contains("seccomp"), "{rec}");
    d.wait_audit("refused packet socket", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("packet")
    });
    let rec = d.wait_audit("refused io_uring_setup", |v| is(v, "action", "io_uring"));
    assert_eq!(field(&rec, "verdict"), "denied");
    let rec = d.wait_audit("refused seccomp listener", |v| is(v, "action", "seccomp"));
    assert_eq!(field(&rec, "verdict"), "denied");
    // Kept families are not reported.
    let trail = d.audit();
    assert!(
        !trail.iter().any(|v| is(v, "action", "socket")
            && (field(v, "socket").starts_with("family 1 ")
                || field(v, "socket").starts_with("inet "))),
        "kept family reported: {trail:?}"
    );
    let e = wait_journal(&agent, "refused vsock socket in journald", |e| {
        is(e, "ACTION", "socket") && field(e, "SOCKET").starts_with("vsock")
    });
    assert_eq!(field(&e, "VERDICT"), "denied");
    assert_eq!(field(&e, "SYSLOG_IDENTIFIER"), "agent-monitor");
    assert_eq!(field(&e, "COMM"), "python3");
    let e = wait_journal(&agent, "refused io_uring in journald", |e| {
        is(e, "ACTION", "io_uring")
    });
    assert_eq!(field(&e, "VERDICT"), "denied");
    assert!(!field(&e, "TASK_ID").is_empty());
}

/// Alert mode reports and does not block: the vsock socket and the io_uring ring are created,
/// and each is reported with VERDICT=alert (the socket by the kernel program on
/// sys_enter_socket, io_uring by `run`'s filter). A seccomp listener stays refused: it would let
/// the agent silence the filter.
#[test]
fn alert_mode_agent_is_reported_not_blocked_by_the_run_filter() {
    if !require_root("alert_mode_agent_is_reported_not_blocked_by_the_run_filter") {
        return;
    }
    let agent = unique_agent("vsalert");
    let (name, text) = policy(&agent, &[], &[PYTHON, "/usr/bin/setpriv"]);
    let text = text.replace("mode = \"enforce\"", "mode = \"alert\"");
    let d = Daemon::start(&[(name, text)]);
    let script = PY_ATTEMPT.to_string() + FILTER_ROUTES;
    let mut cmd: Vec<&str> = AS_NOBODY.to_vec();
    cmd.extend([PYTHON, "-c", &script]);
    let out = d.run(&agent, None, &cmd);
    // vsock may fail for want of a vsock transport (no hypervisor), never with EPERM.
    assert_ne!(outcome(&out, "vsock"), eperm());
    // (A packet socket still needs CAP_NET_RAW, which nobody lacks: the kernel's EPERM.)
    for ok in ["io_uring", "unix", "netlink", "inet"] {
        assert_eq!(outcome(&out, ok), "ok", "{ok}");
    }
    assert_eq!(outcome(&out, "listener"), eperm());
    let rec = d.wait_audit("vsock socket alert", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("vsock")
    });
    assert_eq!(field(&rec, "verdict"), "alert");
    let rec = d.wait_audit("io_uring alert", |v| is(v, "action", "io_uring"));
    assert_eq!(field(&rec, "verdict"), "alert");
    assert!(rec.get("enforcement").is_none_or(Value::is_null), "{rec}");
    let e = wait_journal(&agent, "io_uring alert in journald", |e| {
        is(e, "ACTION", "io_uring")
    });
    assert_eq!(field(&e, "VERDICT"), "alert");
    let rec = d.wait_audit("refused seccomp listener", |v| is(v, "action", "seccomp"));
    assert_eq!(field(&rec, "verdict"), "denied");
    // Exactly one report per caught socket (no second one from the filter).
    let vsock = d
        .audit()
        .into_iter()
        .filter(|v| is(v, "action", "socket") && field(v, "socket").starts_with("vsock"))
        .count();
    assert_eq!(vsock, 1);
}

/// `run --user` drops to the user after the filter is in place (installing it needs root
/// then): the unprivileged agent is still caught and reported with its own uid.
#[test]
fn run_as_user_keeps_the_filter_and_its_reports() {
    if !require_root("run_as_user_keeps_the_filter_and_its_reports") {
        return;
    }
    let agent = unique_agent("vsuser");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let script = PY_ATTEMPT.to_string()
        + "attempt('vsock', lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))\n\
           print('uid', os.getuid(), flush=True)\n";
    let out = std::process::Command::new(binary())
        .arg("run")
        .arg("--control-socket")
        .arg(&d.socket)
        .args(["--agent", &agent, "--user", "nobody", "--"])
        .args([PYTHON, "-c", &script])
        .output()
        .unwrap();
    assert_eq!(outcome(&out, "vsock"), eperm());
    assert_eq!(outcome(&out, "uid"), "65534");
    let rec = d.wait_audit("refused vsock as --user nobody", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("vsock")
    });
    assert_eq!(rec["uid"], 65534);
    assert_eq!(field(&rec, "verdict"), "denied");
}

/// The filter's answers come from `run`: an agent that outlives it (here `run` is killed) keeps
/// the filter, and the kernel fails the caught calls with ENOSYS. Closed, not open.
#[test]
fn caught_calls_fail_closed_when_run_is_gone() {
    if !require_root("caught_calls_fail_closed_when_run_is_gone") {
        return;
    }
    use std::io::{BufRead as _, Write as _};
    let agent = unique_agent("runkill");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON, "/usr/bin/setpriv"])]);
    let script = PY_ATTEMPT.to_string()
        + "print('ready', flush=True)\nsys.stdin.readline()\n\
           attempt('vsock', lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))\n\
           attempt('unix', lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))\n";
    let mut run = std::process::Command::new(binary())
        .arg("run")
        .arg("--control-socket")
        .arg(&d.socket)
        .args(["--agent", &agent, "--"])
        .args(AS_NOBODY)
        .args([PYTHON, "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = run.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(run.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SIGKILL: no forwarding, no goodbye; the agent lives on, orphaned.
    run.kill().unwrap();
    run.wait().unwrap();
    writeln!(stdin, "go").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(
        rest.contains(&format!("vsock errno {}", libc::ENOSYS)),
        "{rest:?}"
    );
    assert!(rest.contains(&"unix ok".to_string()), "{rest:?}");
}

/// Only the `run` process the daemon placed may report a caught call: a forged report from
/// another root process is refused and adds nothing.
#[test]
fn forged_seccomp_report_is_refused() {
    if !require_root("forged_seccomp_report_is_refused") {
        return;
    }
    let agent = unique_agent("forge");
    let d = Daemon::start(&[policy(&agent, &[], &[PYTHON])]);
    let forge = fill(
        r#"import json, socket
c = socket.socket(socket.AF_UNIX)
c.connect('@SOCK@')
c.sendall((json.dumps({'op': 'caught', 'pid': 1, 'call': {'call': 'io_uring_setup'}, 'refused': True, 'comm': 'forged', 'exe': None, 'uid': 0}) + '\n').encode())
print(c.makefile().readline(), flush=True)
"#,
        &[("SOCK", d.socket.display().to_string())],
    );
    let out = std::process::Command::new(PYTHON)
        .args(["-c", &forge])
        .output()
        .unwrap();
    let answer = text(&out.stdout);
    assert!(
        answer.contains("\"error\"") && answer.contains("not an `agent-monitor run`"),
        "{answer}"
    );
    // A real run of the agent still reports normally; the forged one never shows.
    d.run(
        &agent,
        None,
        &[
            PYTHON,
            "-c",
            "import socket\ntry:\n socket.socket(socket.AF_VSOCK)\nexcept OSError: pass",
        ],
    );
    d.wait_audit("real vsock refusal", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("vsock")
    });
    assert!(
        !d.audit().iter().any(|v| is(v, "comm", "forged")),
        "forged report recorded"
    );
}

/// The scene both io_uring tests share: two TCP and two UDP loopback endpoints (one of each
/// allowed), the io_uring attacker compiled from `URING_RING_C` and `URING_MAIN_C`, and a new agent's policy allowing the
/// two allowed endpoints and the attacker.
struct UringScene {
    tcp_ok: CountingListener,
    tcp_no: CountingListener,
    udp_ok: UdpSink,
    udp_no: UdpSink,
    /// Holds the compiled attacker.
    _dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    agent: String,
    policy: (String, String),
}

impl UringScene {
    fn new(label: &str) -> UringScene {
        let tcp_ok = CountingListener::bind("127.0.0.1:0");
        let tcp_no = CountingListener::bind("127.0.0.1:0");
        let udp_ok = UdpSink::bind("127.0.0.1:0");
        let udp_no = UdpSink::bind("127.0.0.1:0");
        let dir = tempfile::tempdir().unwrap();
        let bin = compile_c(
            dir.path(),
            "uring",
            &format!("{URING_RING_C}{URING_MAIN_C}"),
        );
        let agent = unique_agent(label);
        let policy = policy(
            &agent,
            &[
                format!("127.0.0.1:{}", tcp_ok.port),
                format!("127.0.0.1:{}", udp_ok.port),
            ],
            &[bin.to_str().unwrap()],
        );
        UringScene {
            tcp_ok,
            tcp_no,
            udp_ok,
            udp_no,
            _dir: dir,
            bin,
            agent,
            policy,
        }
    }

    fn bin_s(&self) -> &str {
        self.bin.to_str().unwrap()
    }

    /// The attacker's arguments: the four endpoints' ports.
    fn ports(&self) -> [String; 4] {
        [
            self.tcp_ok.port,
            self.tcp_no.port,
            self.udp_ok.port,
            self.udp_no.port,
        ]
        .map(|p| p.to_string())
    }

    /// The attacker's report when its allowed calls work and its denied ones get EPERM.
    fn assert_judged(&self, stdout: &str, d: &Daemon) {
        for w in [
            "connect_allowed 0".to_string(),
            format!("connect_denied -{}", libc::EPERM),
            "sendmsg_allowed 1".to_string(),
            format!("sendmsg_denied -{}", libc::EPERM),
        ] {
            assert!(stdout.contains(&w), "{w} missing: {stdout}\n{}", d.log());
        }
    }

    /// Waits for the denied connect and sendmsg records (`what` names the route); returns the
    /// connect's.
    fn wait_denials(&self, d: &Daemon, what: &str) -> Value {
        let rec = d.wait_audit(&format!("denied {what} connect"), |v| {
            is(v, "action", "connect")
                && is(v, "verdict", "denied")
                && v["dest_port"] == self.tcp_no.port
        });
        d.wait_audit(&format!("denied {what} sendmsg"), |v| {
            is(v, "action", "sendmsg")
                && is(v, "verdict", "denied")
                && v["dest_port"] == self.udp_no.port
        });
        rec
    }
}

/// io_uring's connect and sendmsg reach the same kernel functions as the system calls, so the
/// cgroup hooks judge them. `run` refuses io_uring altogether; this agent is placed through the
/// control socket directly, without that filter, to show the hooks alone hold.
#[test]
fn io_uring_connect_and_sendmsg_are_judged_without_the_filter() {
    if !require_root("io_uring_connect_and_sendmsg_are_judged_without_the_filter") {
        return;
    }
    let s = UringScene::new("uring");
    let d = Daemon::start(std::slice::from_ref(&s.policy));
    // Place this python process as the agent, then exec the attacker (no seccomp filter).
    let place = fill(
        r#"import json, os, socket, sys
c = socket.socket(socket.AF_UNIX)
c.connect('@SOCK@')
c.sendall((json.dumps({'op': 'place', 'agent': '@AGENT@', 'task': 'uring'}) + '\n').encode())
answer = c.makefile().readline()
assert 'placed' in answer, answer
c.close()
# Without the filter a vsock socket is created: reported as an alert.
socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
os.execv(sys.argv[1], sys.argv[1:])
"#,
        &[
            ("SOCK", d.socket.display().to_string()),
            ("AGENT", s.agent.clone()),
        ],
    );
    let out = std::process::Command::new(PYTHON)
        .args(["-c", &place, s.bin_s()])
        .args(s.ports())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", text(&out.stderr));
    s.assert_judged(&stdout, &d);
    assert_eq!(s.tcp_no.accepted(), 0);
    assert_eq!(s.udp_no.received(), 0);
    assert_eq!(s.udp_ok.received(), 1);
    s.wait_denials(&d, "io_uring");
    let rec = d.wait_audit("vsock socket without the filter", |v| {
        is(v, "action", "socket") && field(v, "socket").starts_with("vsock")
    });
    assert_eq!(field(&rec, "verdict"), "alert");
    assert!(field(&rec, "reason").contains("seccomp"), "{rec}");
}

/// An agent known by its executable (a tag, not a cgroup) whose io_uring calls run on io_uring
/// worker threads (`IOSQE_ASYNC`): the kernel makes those threads without the fork tracepoint, so
/// they must be tagged when they are made, or their connects would pass as the host's.
#[test]
fn io_uring_worker_threads_of_an_agent_known_by_its_executable_are_judged() {
    if !require_root("io_uring_worker_threads_of_an_agent_known_by_its_executable_are_judged") {
        return;
    }
    let s = UringScene::new("uring-wrk");
    let (name, body) = s.policy.clone();
    let body = format!(
        "{body}[identity]\nexecutables = [{{ path = {:?}, sha256 = {:?} }}]\n",
        s.bin_s(),
        sha256_hex(&s.bin)
    );
    let uring = |selected: bool| {
        let mut cmd = std::process::Command::new(&s.bin);
        cmd.args(s.ports()).env("URING_ASYNC", "1");
        let out = cmd.output().unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "selected={selected}: {stdout} {}",
            text(&out.stderr)
        );
        stdout
    };
    // Control: with no daemon, every call of the same binary through a worker thread works.
    let stdout = uring(false);
    assert!(stdout.contains("connect_denied 0"), "{stdout}");
    assert!(stdout.contains("sendmsg_denied 1"), "{stdout}");
    assert_eq!(s.tcp_no.accepted(), 1);
    assert_eq!(s.udp_no.received(), 1);

    let d = Daemon::start(&[(name, body)]);
    let stdout = uring(true);
    s.assert_judged(&stdout, &d);
    assert_eq!(
        s.tcp_no.accepted(),
        1,
        "no connect through a worker beyond the control's"
    );
    assert_eq!(
        s.udp_no.received(),
        1,
        "no datagram through a worker beyond the control's"
    );
    let rec = s.wait_denials(&d, "worker");
    assert_eq!(field(&rec, "agent_id"), s.agent);
}

/// The attacker's calls; the ring is the harness's `URING_RING_C`.
const URING_MAIN_C: &str = r#"
static struct sockaddr_in to(const char *port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}
static int tcp(const char *port) {
    struct sockaddr_in a = to(port);
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_CONNECT;
    if (async_worker) e.flags = IOSQE_ASYNC;
    e.fd = socket(AF_INET, SOCK_STREAM, 0);
    e.addr = (unsigned long)&a;
    e.off = sizeof a;
    return submit(&e);
}
static int udp(const char *port) {
    struct sockaddr_in a = to(port);
    struct iovec iov = { "x", 1 };
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_name = &a;
    m.msg_namelen = sizeof a;
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    struct io_uring_sqe e;
    memset(&e, 0, sizeof e);
    e.opcode = IORING_OP_SENDMSG;
    if (async_worker) e.flags = IOSQE_ASYNC;
    e.fd = socket(AF_INET, SOCK_DGRAM, 0);
    e.addr = (unsigned long)&m;
    e.len = 1;
    return submit(&e);
}
int main(int argc, char **argv) {
    async_worker = getenv("URING_ASYNC") != NULL;
    setup_ring();
    printf("connect_allowed %d\n", tcp(argv[1]));
    printf("connect_denied %d\n", tcp(argv[2]));
    printf("sendmsg_allowed %d\n", udp(argv[3]));
    printf("sendmsg_denied %d\n", udp(argv[4]));
    return 0;
}
"#;

/// Runs `cmd` on a new pseudo-terminal as its controlling terminal (as `run` is in a shell
/// session) and returns everything written to that terminal: its echo of typed input included.
fn on_a_terminal(cmd: &[&str]) -> String {
    const DRIVER: &str = r#"import os, pty, sys, select
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b''
while True:
    if not select.select([fd], [], [], 20)[0]:
        break
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors='replace'))
"#;
    let out = std::process::Command::new(PYTHON)
        .args(["-c", DRIVER])
        .args(cmd)
        .output()
        .expect("running the terminal driver");
    text(&out.stdout)
}

/// TIOCSTI pushes bytes into the input of the caller's controlling terminal: an agent started
/// from a shell would type a command that the shell, often root's, runs as its own once `run`
/// exits (this kernel has dev.tty.legacy_tiocsti = 1). `run`'s filter refuses it (and TIOCLINUX)
/// in both modes, for root and `--user` agents, and reports it; outside agents it works.
#[test]
fn typing_into_the_terminal_of_runs_caller_is_refused() {
    if !require_root("typing_into_the_terminal_of_runs_caller_is_refused") {
        return;
    }
    const TYPE: &str = "import fcntl, termios\ntry:\n    for c in b'echo TYPED-BY-AGENT\\n':\n        fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))\n    print('tiocsti ok')\nexcept OSError as e:\n    print('tiocsti errno', e.errno)\n";
    let enforce = unique_agent("tiocsti");
    let alert = unique_agent("tiocsti-alert");
    let (alert_file, alert_text) = policy(&alert, &[], &[PYTHON]);
    let d = Daemon::start(&[
        policy(&enforce, &[], &[PYTHON]),
        (alert_file, alert_text.replace("\"enforce\"", "\"alert\"")),
    ]);
    // Control: outside agents the bytes reach the terminal's input (echoed back to us).
    let outside = on_a_terminal(&[PYTHON, "-c", TYPE]);
    assert!(outside.contains("tiocsti ok"), "{outside}");
    assert!(outside.contains("echo TYPED-BY-AGENT"), "{outside}");
    let bin = binary();
    let bin = bin.to_str().unwrap();
    let socket = d.socket.to_str().unwrap();
    for (agent, user) in [(&enforce, Some("nobody")), (&alert, None)] {
        let mut cmd = vec![bin, "run", "--control-socket", socket, "--agent", agent];
        if let Some(u) = user {
            cmd.extend(["--user", u]);
        }
        cmd.extend(["--", PYTHON, "-c", TYPE]);
        let seen = on_a_terminal(&cmd);
        assert!(
            seen.contains(&format!("tiocsti errno {}", libc::EPERM)),
            "{agent}: {seen}"
        );
        assert!(!seen.contains("echo TYPED-BY-AGENT"), "{agent}: {seen}");
        let rec = d.wait_audit("refused TIOCSTI", |v| {
            is(v, "agent_id", agent) && is(v, "socket", "ioctl TIOCSTI")
        });
        assert_eq!(field(&rec, "action"), "seccomp");
        assert_eq!(field(&rec, "verdict"), "denied", "{rec}");
        assert!(field(&rec, "reason").contains("terminal"), "{rec}");
    }
}
