//! A native load generator run as an agent: `connect()` of one UDP socket in a tight loop, paced
//! at a rate, every `deny_every`-th call to a port the policy denies and the others to one it
//! allows. Each call is an agent action the kernel judges and reports. The same loop as the
//! bench's `load rate`, in C so a test needs no other binary; python reaches about a tenth of it.
// Included by several test files (`mod flood;`); each uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_monitor_tests::{Daemon, binary, compile_c, http_get, text};

const FLOOD_C: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    return a;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: flood ALLOWED_PORT DENIED_PORT DENY_EVERY SECS RATE\n");
        return 2;
    }
    struct sockaddr_in allowed = loopback(atoi(argv[1])), denied = loopback(atoi(argv[2]));
    unsigned long long deny_every = strtoull(argv[3], 0, 10);
    double secs = atof(argv[4]), rate = atof(argv[5]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 2; }
    unsigned long long n = 0, allowed_ok = 0, denied_sent = 0, denied_eperm = 0;
    double start = now(), elapsed;
    while ((elapsed = now() - start) < secs) {
        /* In slices: everything due by now, then a short pause when ahead (rate 0: no pacing). */
        unsigned long long due = rate > 0 ? (unsigned long long)(elapsed * rate) : n + 256;
        if (n >= due) { usleep(100); continue; }
        for (int i = 0; i < 256 && n < due; i++) {
            n++;
            int deny = deny_every > 0 && n % deny_every == 0;
            int r = connect(fd, (struct sockaddr *)(deny ? &denied : &allowed), sizeof allowed);
            if (deny) {
                denied_sent++;
                denied_eperm += r != 0 && errno == EPERM;
            } else {
                allowed_ok += r == 0;
            }
        }
    }
    printf("%llu %llu %llu %llu %.6f\n", n - denied_sent, allowed_ok, denied_sent, denied_eperm,
           now() - start);
    return 0;
}
"#;

/// Compiles the generator into `dir`.
pub fn compile(dir: &Path) -> PathBuf {
    compile_c(dir, "flood", FLOOD_C)
}

/// An enforce policy for `agent`: exec of `bin`, UDP/TCP to 127.0.0.1:`allowed_port`, nothing else.
pub fn policy(agent: &str, bin: &Path, allowed_port: u16) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = [\"127.0.0.1:{allowed_port}\"]\n\
             [exec]\nallow = [{:?}]\n",
            bin.display().to_string()
        ),
    )
}

/// How to flood.
pub struct Load {
    pub allowed_port: u16,
    pub denied_port: u16,
    /// Every this many calls one goes to the denied port (1: all of them).
    pub deny_every: u64,
    pub secs: f64,
    /// Calls per second (0: as fast as it goes).
    pub rate: u64,
}

/// What one flood did.
#[derive(Debug)]
pub struct Flood {
    pub allowed_sent: usize,
    pub allowed_ok: usize,
    pub denied_sent: usize,
    pub denied_eperm: usize,
    pub secs: f64,
}

impl Flood {
    pub fn sent(&self) -> usize {
        self.allowed_sent + self.denied_sent
    }

    /// Calls per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.sent() as f64 / self.secs
    }

    /// Denied calls per second.
    pub fn denial_rate(&self) -> f64 {
        self.denied_sent as f64 / self.secs
    }

    /// Enforcement held: every call to the denied port got EPERM, every other one connected.
    pub fn assert_enforced(&self, what: &str) {
        assert_eq!(
            self.denied_eperm, self.denied_sent,
            "{what}: denials: {self:?}"
        );
        assert_eq!(
            self.allowed_ok, self.allowed_sent,
            "{what}: allowed: {self:?}"
        );
    }
}

/// Runs the generator `bin` as `agent` (task `task`) under `d`; waits for it.
pub fn run(d: &Daemon, agent: &str, task: &str, bin: &Path, load: &Load) -> Flood {
    // SCHED_FIFO at a low priority (`chrt`; the agent inherits it, and cannot set it itself:
    // `run` drops its capabilities), as the bench's generator: the paced loop keeps its rate on
    // a machine busy with other work. It sleeps whenever it is ahead, and the kernel's real-time
    // throttling bounds it anyway.
    let out = Command::new("chrt")
        .args(["--fifo", "1"])
        .arg(binary())
        .args(["run", "--control-socket"])
        .arg(&d.socket)
        .args(["--agent", agent, "--task", task, "--"])
        .arg(bin)
        .args([
            load.allowed_port.to_string(),
            load.denied_port.to_string(),
            load.deny_every.to_string(),
            load.secs.to_string(),
            load.rate.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the flood agent failed: {out:?}");
    let stdout = text(&out.stdout);
    let v: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(v.len(), 5, "flood printed {stdout:?}");
    let n = |i: usize| v[i].parse::<usize>().unwrap();
    Flood {
        allowed_sent: n(0),
        allowed_ok: n(1),
        denied_sent: n(2),
        denied_eperm: n(3),
        secs: v[4].parse().unwrap(),
    }
}

/// `agent_monitor_actions_total` of `agent`, summed over actions and verdicts.
pub fn counted(port: u16, agent: &str) -> usize {
    let (_, body) = http_get(port, "/metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("agent_monitor_actions_total{")
                && l.contains(&format!("agent=\"{agent}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
        .sum()
}

/// Waits until the daemon's count for `agent` stops moving; returns it.
pub fn settled(port: u16, agent: &str) -> usize {
    let mut last = usize::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let now = counted(port, agent);
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "the daemon never caught up");
        last = now;
    }
}
