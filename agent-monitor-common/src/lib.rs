//! Types shared by the eBPF programs and the daemon: map keys and values, and (in `record`) the
//! ring-buffer records.
//!
//! Every type here is written by one side and read by the other, so each is `#[repr(C)]` with explicit
//! widths and no implicit padding.
#![no_std]

mod record;
pub use record::*;
mod unix;
pub use unix::*;
pub mod client_hello;
pub mod server_name;
mod unix_peer;
pub use unix_peer::*;

/// Length of `task_struct::comm`.
pub const COMM_LEN: usize = 16;
/// Bytes of path stored in an exec allowlist key. The kernel caps LPM trie keys at 256 data bytes and
/// 4 of them hold the agent index.
pub const EXEC_PATH_LEN: usize = 252;
/// Port ranges one network allowlist entry can carry.
pub const MAX_PORT_RANGES: usize = 16;

/// Capacities of the kernel maps; the daemon checks compiled tables against them before loading.
pub const MAX_AGENT_CGROUPS: u32 = 16_384;
/// 64-bit words of the agent-cgroup pre-filter (`AGENT_CGROUP_FILTER`): one bit per cgroup id
/// modulo 65,536.
pub const AGENT_CGROUP_FILTER_WORDS: u32 = 1024;

/// Word and bit of cgroup `id` in the agent-cgroup pre-filter. A clear bit means "not an agent
/// cgroup": the hooks at the cgroup root then skip the identity map, whose lookup (a helper call)
/// costs every process on the host. Set bits may be shared (a set bit only costs that lookup);
/// one is set for every cgroup in the identity map, before the entry goes in.
#[inline(always)]
pub fn agent_cgroup_filter_slot(id: u64) -> (u32, u64) {
    (
        ((id >> 6) as u32) % AGENT_CGROUP_FILTER_WORDS,
        1u64 << (id & 63),
    )
}
/// Agents (policies) the kernel can tell apart (`AGENT_TABLES`).
pub const MAX_AGENTS: u32 = 4_096;
/// An allowlist index no entry is ever written under: an agent whose policy is gone may do nothing.
pub const NO_ALLOWLIST: u32 = u32::MAX;
pub const MAX_NET_ENTRIES: u32 = 65_536;
pub const MAX_EXEC_ENTRIES: u32 = 65_536;
/// Addresses learned from DNS answers, over all agents (`DNS_LEARNED`).
pub const MAX_DNS_LEARNED: u32 = 65_536;
/// Sockets whose DNS destination was redirected and is remembered for the reply (`DNS_ORIG`, LRU).
pub const MAX_DNS_SOCKETS: u32 = 16_384;

/// Sockets of tag-identified agents remembered for the egress program (`AGENT_SOCKETS`, LRU).
pub const MAX_AGENT_SOCKETS: u32 = 65_536;

/// DNS traffic of agents (UDP and TCP to this port, any address) goes to the daemon's proxy.
pub const DNS_PORT: u16 = 53;
/// Where the daemon's DNS proxy listens; the kernel rewrites agents' DNS destinations to these.
pub const DNS_PROXY_IP4: [u8; 4] = [127, 0, 0, 1];
pub const DNS_PROXY_IP6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Mode of an agent, as the kernel sees it.
pub const MODE_ALERT: u32 = 0;
pub const MODE_ENFORCE: u32 = 1;
/// Ask mode: the kernel refuses an off-list action exactly as in enforce mode; the holding (and
/// asking) happens before the kernel, in the DNS proxy and in `run`'s seccomp supervisor.
pub const MODE_ASK: u32 = 2;

/// Whether the kernel refuses an off-list action of an agent in `mode` (enforce and ask do;
/// alert lets it through and reports it).
#[inline(always)]
pub const fn mode_refuses(mode: u32) -> bool {
    mode != MODE_ALERT
}

/// What an agent process is: the value of every identity map (`AGENT_CGROUPS` keyed by cgroup v2 id,
/// `PROCESS_AGENTS` keyed by thread id, the uid and executable selectors). In those maps `agent` is
/// the agent's stable id (see the daemon's `agent_id`); the kernel translates it through
/// `AGENT_TABLES`, whose values are also `AgentSlot`s and hold the index of the agent's allowlists
/// in force and its mode, so a reload or restart never leaves an identity pointing at stale tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentSlot {
    /// In identity maps the agent's stable id; after translation through `AGENT_TABLES` (and in
    /// records) the index of the agent's allowlists in the allowlist maps.
    pub agent: u32,
    /// `MODE_ALERT` or `MODE_ENFORCE` (the translation's mode wins: a reload may change it).
    pub mode: u32,
    /// Task number (allocated by the daemon per (agent, task), never reused while the daemon runs):
    /// the key of the per-task grant maps. `TASK_NONE` has no grants.
    pub task: u32,
    /// How the process became this agent (`SOURCE_*`): decides precedence when two agents claim it.
    pub source: u32,
}

/// A task number no grant is ever written for.
pub const TASK_NONE: u32 = 0;

/// How a process became an agent. Higher `source_rank` wins when two agents claim one process.
/// Placed by `agent-monitor run` (its own (agent, task) cgroup).
pub const SOURCE_RUN: u32 = 0;
/// In (or below) a cgroup named by a `cgroups` selector.
pub const SOURCE_CGROUP: u32 = 1;
/// In (or below) the cgroup of a `systemd_units` selector.
pub const SOURCE_UNIT: u32 = 2;
/// Exec'd a file named by an `executables` selector (or descends from one that did).
pub const SOURCE_EXECUTABLE: u32 = 3;
/// Runs (or ran, at its last fork/exec) with a uid named by a `uids` selector.
pub const SOURCE_UID: u32 = 4;
/// Moved to a task by `agent-monitor task start --pid` (a tag on the process, same agent).
pub const SOURCE_TASK_SWITCH: u32 = 5;

/// Precedence of identity sources: `run` > cgroup = unit > task switch > executable > uid.
/// The kernel applies it when an exec or fork would re-tag a process; the daemon documents it.
#[inline(always)]
pub fn source_rank(source: u32) -> u32 {
    match source {
        SOURCE_RUN => 5,
        SOURCE_CGROUP | SOURCE_UNIT => 4,
        SOURCE_TASK_SWITCH => 3,
        SOURCE_EXECUTABLE => 2,
        SOURCE_UID => 1,
        _ => 0,
    }
}

/// Whether a process identified through `source` keeps that identity only through a tag in
/// `PROCESS_AGENTS` (so its children must be tagged at fork), as opposed to its cgroup.
#[inline(always)]
pub fn source_is_tag(source: u32) -> bool {
    matches!(source, SOURCE_EXECUTABLE | SOURCE_UID | SOURCE_TASK_SWITCH)
}

/// Value of the one-entry `IDENTITY_CONFIG` array, written by the daemon whenever selectors change.
/// With `selectors == 0`, a process outside every agent cgroup pays exactly one hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityConfig {
    /// `SELECT_*` bits: which selector kinds are armed.
    pub selectors: u32,
    /// Bit `l` set: some cgroup or unit selector is a cgroup at level `l` of the cgroup v2 tree
    /// (root = 0), looked up with `bpf_get_current_ancestor_cgroup_id(l)`.
    pub ancestor_levels: u32,
}

pub const SELECT_CGROUPS: u32 = 1;
pub const SELECT_UIDS: u32 = 2;
pub const SELECT_EXECUTABLES: u32 = 4;
/// Processes are tagged in `PROCESS_AGENTS` (executable/uid selectors, task switches).
pub const SELECT_TAGS: u32 = 8;
/// Deepest cgroup level a selector may name (levels 0..MAX_SELECTOR_LEVEL-1 are looked up).
pub const MAX_SELECTOR_LEVEL: u32 = 16;

/// When something granted for a limited time stops being valid, in `bpf_ktime_get_ns` time
/// (CLOCK_MONOTONIC). The kernel compares it itself, so expiry does not wait for the daemon.
/// Shared by every expiring kernel entry (task grants, learned addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub expires_ns: u64,
}

impl Expiry {
    pub const NEVER: Expiry = Expiry {
        expires_ns: u64::MAX,
    };

    /// Valid at `now_ns`: strictly before the expiry instant.
    #[inline(always)]
    pub fn is_live(&self, now_ns: u64) -> bool {
        now_ns < self.expires_ns
    }
}

/// Value of the per-task network grant trie (key: `NetKey` whose `agent` field holds the task
/// number): ports allowed for addresses under the prefix, until `expiry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetGrant {
    pub expiry: Expiry,
    pub allow: NetAllow,
    pub _pad: u32,
}

/// Capacities of the identity and grant maps.
pub const MAX_TAGGED_TASKS: u32 = 65_536;
pub const MAX_UID_SELECTORS: u32 = 1_024;
pub const MAX_EXEC_SELECTORS: u32 = 1_024;
pub const MAX_GRANT_ENTRIES: u32 = 16_384;

/// Data part of a network allowlist LPM key: the agent index (always fully matched) followed by
/// the IPv6 address (IPv4 as `::ffff:a.b.c.d`), so one trie serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetKey {
    pub agent: u32,
    pub addr: [u8; 16],
}

/// Bits of `NetKey` before the address.
pub const NET_KEY_AGENT_BITS: u32 = 32;

/// Inclusive port range; `lo = 0, hi = 65535` is every port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// Value of the network allowlist: the ports allowed for every address under the key's prefix
/// (already merged with the ports of every shorter prefix that covers it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetAllow {
    pub count: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

/// Data part of an exec allowlist LPM key: agent index, then the path bytes. An exact path is stored
/// with its terminating NUL inside the prefix, a prefix glob (`/usr/bin/python3*`) without it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecKey {
    pub agent: u32,
    pub path: [u8; EXEC_PATH_LEN],
}

/// Bits of `ExecKey` before the path.
pub const EXEC_KEY_AGENT_BITS: u32 = 32;

/// Ports of one agent's DNS proxy endpoint (host order; 0 = none), value of `DNS_PROXY` keyed by
/// the agent index. The `*4` ports listen on `DNS_PROXY_IP4`, the `*6` ports on `DNS_PROXY_IP6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsProxy {
    pub udp4: u16,
    pub tcp4: u16,
    pub udp6: u16,
    pub tcp6: u16,
}

/// Key of `DNS_PROXY_PORTS`: a proxy endpoint's port, with bit 16 set for IPv6 (`::1`) and bit 17
/// for TCP.
pub fn dns_proxy_port_key(port: u16, ipv6: bool, tcp: bool) -> u32 {
    u32::from(port) | (u32::from(ipv6) << 16) | (u32::from(tcp) << 17)
}

/// Where an agent's socket meant to send its DNS traffic before the kernel redirected it, so the
/// reply can appear to come from there. Value of `DNS_ORIG`, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrig {
    /// As the caller wrote it: IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u16,
}

/// An address an agent resolved through the proxy: allowed for these ports until `expires_ns`
/// (CLOCK_MONOTONIC, compared with `bpf_ktime_get_ns`). Value of `DNS_LEARNED`, keyed by `NetKey`
/// with the full address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub expires_ns: u64,
    pub ports: NetAllow,
    /// Nonzero: no name the address was learned from has method/path rules, so a TLS connect to
    /// it on a port of the agent's request rules has its server name judged in the kernel, on the
    /// agent's own connection (`server_name`), instead of going to the egress endpoint.
    pub kernel_sni: u32,
}

/// Connects of agents to destinations with request rules (`[[network.http]]`, `[[network.tls]]`)
/// go to the daemon's egress endpoint on this loopback address (IPv6 sockets reach it as
/// `::ffff:127.0.0.1`); `EGRESS_ENDPOINT` holds its port. Each redirected socket is first bound
/// to a source address of its own in 127.0.0.0/8 (`egress_source`), by which the endpoint finds
/// the flow (`EGRESS_FLOWS`) on accept.
pub const EGRESS_IP4: [u8; 4] = [127, 0, 0, 1];
/// Redirected connects the endpoint has not finished with (`EGRESS_FLOWS`, LRU by token).
pub const MAX_EGRESS_FLOWS: u32 = 16_384;

/// Where a redirected socket meant to connect, and which socket it is. Value of `EGRESS_FLOWS`,
/// keyed by the flow's token (`egress_token`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressFlow {
    /// The agent socket's cookie: tells a live flow from an older one with the same token.
    pub cookie: u64,
    /// As the caller wrote it: IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Tokens run from 2 to 2^24 - 2: the host part of a 127.0.0.0/8 source address that is neither
/// the network, 127.0.0.1 (what every other loopback client uses), nor the broadcast address.
const EGRESS_TOKENS: u64 = (1 << 24) - 3;

/// The token of a redirected socket, from its cookie. Cookies only grow, so two live flows share
/// a token only when 16 million sockets were created while the older one was still open.
#[inline(always)]
pub fn egress_token(cookie: u64) -> u32 {
    (cookie % EGRESS_TOKENS) as u32 + 2
}

/// The loopback source address (network order bytes) a flow with `token` is bound to.
#[inline(always)]
pub fn egress_source(token: u32) -> [u8; 4] {
    [127, (token >> 16) as u8, (token >> 8) as u8, token as u8]
}

/// The token of a flow bound to `source` (IPv4 octets), if it is one.
pub fn egress_token_of(source: [u8; 4]) -> Option<u32> {
    let token = u32::from_be_bytes([0, source[1], source[2], source[3]]);
    (source[0] == 127 && token >= 2 && u64::from(token) < EGRESS_TOKENS + 2).then_some(token)
}

/// Address families, as in `<sys/socket.h>`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Data part of the file-identity allowlist key: (agent, device, inode) of a file an exact exec
/// rule names, resolved by the daemon (`stat`) and kept current.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecFileKey {
    pub agent: u32,
    /// Kernel encoding of the device (`MKDEV`: major << 20 | minor).
    pub dev: u32,
    pub ino: u64,
}

/// Kernel encoding of a device number (`MKDEV` in `<linux/kdev_t.h>`).
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Member offsets of kernel structures the exec program follows from `struct linux_binprm *`,
/// read by the daemon from the kernel's BTF and handed to the program before it loads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub bprm_file: u32,
    pub bprm_filename: u32,
    pub bprm_interp: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub task_cred: u32,
    pub cred_user_ns: u32,
    /// `user_namespace.ns.inum` (the number `/proc/PID/ns/user` shows).
    pub user_ns_inum: u32,
    /// The initial user namespace's number (`/proc/self/ns/user` of the daemon).
    pub init_user_ns: u32,
    /// 1 once the daemon filled this in; the program judges nothing as allowed before.
    pub valid: u32,
}

/// Socket families an agent keeps; `run`'s seccomp filter refuses the others (AF_VSOCK reaches
/// the hypervisor host, and cgroup sock_create only runs for inet families).
pub const AGENT_SOCKET_FAMILIES: [u32; 4] = [1, AF_INET as u32, AF_INET6 as u32, 16];

/// Protocol numbers (`IPPROTO_*`) and socket types an agent may create.
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_UDPLITE: u32 = 136;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;

/// Whether an agent may create an inet socket of this type and protocol: TCP and UDP(-Lite) only,
/// the protocols whose every destination passes the connect and sendmsg hooks. Raw sockets, ICMP
/// "ping" sockets, SCTP and MPTCP reach endpoints those hooks do not see.
pub const fn socket_allowed(sock_type: u32, protocol: u32) -> bool {
    // Low bits only: SOCK_NONBLOCK / SOCK_CLOEXEC are flags.
    matches!(
        (sock_type & 0xf, protocol),
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP) | (SOCK_DGRAM, IPPROTO_UDPLITE)
    )
}

/// The address a connect or send is judged as (IPv6 form, IPv4 as `::ffff:a.b.c.d`) and whether it
/// was rewritten: Linux sends to the unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) over
/// loopback, so it is judged as `127.0.0.1` / `::1`. Shared by the kernel and the evaluator.
#[inline(always)]
pub fn net_judged_addr(addr: [u8; 16]) -> ([u8; 16], bool) {
    let mut head_zero = true;
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            head_zero = false;
        }
        i += 1;
    }
    let tail_zero = addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0;
    if head_zero && tail_zero {
        if addr[10] == 0xff && addr[11] == 0xff {
            let mut v4 = addr;
            v4[12] = 127;
            v4[15] = 1;
            return (v4, true);
        }
        if addr[10] == 0 && addr[11] == 0 {
            let mut v6 = [0u8; 16];
            v6[15] = 1;
            return (v6, true);
        }
    }
    (addr, false)
}

/// Indexes of the per-CPU drop/loss counters.
/// A record could not be reserved in the ring buffer (full): the action was still judged.
pub const COUNTER_RECORDS_LOST: u32 = 0;
/// An exec path was longer than the allowlist can hold.
pub const COUNTER_PATH_TRUNCATED: u32 = 1;
/// The exec path could not be read.
pub const COUNTER_PATH_UNREADABLE: u32 = 2;
/// An exec path was not in normal form.
pub const COUNTER_PATH_NOT_NORMAL: u32 = 3;
/// DNS traffic of an agent without a proxy endpoint (see `FLAG_DNS_REFUSED`).
pub const COUNTER_DNS_NO_PROXY: u32 = 12;
/// A DNS reply reached an agent socket whose original destination was no longer remembered
/// (`DNS_ORIG` evicted it): its source stays the proxy's address.
pub const COUNTER_DNS_ORIG_MISSING: u32 = 13;
/// An exec whose facts (name, interpreter, file) could not be read: judged as not allowed.
pub const COUNTER_EXEC_UNREADABLE: u32 = 4;
/// A socket an agent may not create was refused (or, alert mode, reported).
pub const COUNTER_SOCKET_REFUSED: u32 = 5;
/// A process could not be tagged (`PROCESS_AGENTS` full): it did not become / stay the agent.
pub const COUNTER_TAGS_FULL: u32 = 8;
/// A task grant matched but had expired: denied by the kernel before the daemon removed it.
pub const COUNTER_GRANTS_EXPIRED: u32 = 9;
/// An exec of another agent's selected executable left the process with its higher-ranked agent.
pub const COUNTER_SELECTOR_CONFLICTS: u32 = 10;
/// An agent action (a record with a verdict, not a fork or exit) could not be reserved in the ring
/// buffer: its verdict applied but it is not reported. A subset of `COUNTER_RECORDS_LOST`, so that
/// "actions seen + actions lost == actions done" can be checked exactly.
pub const COUNTER_ACTIONS_LOST: u32 = 16;
/// An alert-mode agent's off-list action (connect, datagram, socket, exec, DNS without a proxy)
/// whose record could not be reserved (ring buffer full) was refused as enforce mode would refuse
/// it (EPERM; SIGKILL for an exec or a socket family only a tracepoint sees): an action outside
/// the allowlist never happens unrecorded. A subset of `COUNTER_ACTIONS_LOST` (the record is lost
/// too). Allowed actions of any agent proceed when their record is lost, and denials are applied
/// whether or not their record could be queued.
pub const COUNTER_ALERTS_REFUSED_UNRECORDABLE: u32 = 6;
/// Packets of agents' sockets that carried a source route (IPv4 options, IPv6 routing header):
/// dropped in enforce mode, reported in alert mode (`KIND_SOURCE_ROUTE`).
pub const COUNTER_SOURCE_ROUTED: u32 = 7;
/// Indices 16–19 belong to production operation (issue 6); the array covers them.
pub const COUNTERS: u32 = 20;

/// Slots of the daemon-state array (`DAEMON_STATE`), written by the daemon only. The map is pinned
/// with the others, so a restarted daemon learns from it what its predecessor left.
/// Wall-clock time (Unix ns) of the daemon's last heartbeat.
pub const STATE_HEARTBEAT_UNIX_NS: u32 = 0;
/// Hash of the kernel object the pinned programs were loaded from (upgrade detection).
pub const STATE_OBJECT_HASH: u32 = 1;
/// Which bank of agent indices (0 or 1) the live allowlists use (see the daemon's reload).
pub const STATE_LIVE_BANK: u32 = 2;
/// `COUNTER_RECORDS_LOST` at the last heartbeat, so the next daemon knows what was lost meanwhile.
pub const STATE_LOST_AT_HEARTBEAT: u32 = 3;
/// 1 while the agent-socket hooks (sock_create, recvmsg, getpeername) are attached at the cgroup
/// root, 0 while they sit below the agents' cgroup (see the daemon's `Kernel::scope_agent_hooks`).
pub const STATE_AGENT_HOOKS_HOST_WIDE: u32 = 4;
pub const DAEMON_STATE_LEN: u32 = 8;

/// Whether a NUL-terminated path is in normal form: no empty, `.` or `..` component after a `/`
/// (so no `//`, `/./`, `/../`, trailing `/`, `/.` or `/..`). One implementation for the kernel
/// programs and the userspace evaluator, so both judge the same paths.
///
/// Written for the verifier: the only state carried from one byte to the next is the index, and
/// each byte's look-ahead is read afresh, so every iteration's states collapse into one.
#[inline(always)]
pub fn exec_path_is_normal(path: &[u8; EXEC_PATH_LEN]) -> bool {
    let at = |i: usize| -> u8 { if i < EXEC_PATH_LEN { path[i] } else { 0 } };
    let mut i = 0;
    while i < EXEC_PATH_LEN {
        let c = path[i];
        if c == 0 {
            return true;
        }
        if c == b'/' {
            let n1 = at(i + 1);
            // "//" or a trailing "/".
            if n1 == b'/' || n1 == 0 {
                return false;
            }
            if n1 == b'.' {
                let n2 = at(i + 2);
                // "/./" or a trailing "/.".
                if n2 == b'/' || n2 == 0 {
                    return false;
                }
                // "/../" or a trailing "/..".
                if n2 == b'.' {
                    let n3 = at(i + 3);
                    if n3 == b'/' || n3 == 0 {
                        return false;
                    }
                }
            }
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_cgroup_filter_gives_nearby_cgroups_their_own_bit_and_stays_in_the_array() {
        // Cgroup ids are handed out in sequence: a run of them must not share bits.
        let mut seen = [0u64; AGENT_CGROUP_FILTER_WORDS as usize];
        for id in 100_000u64..100_000 + 65_536 {
            let (word, bit) = agent_cgroup_filter_slot(id);
            assert_eq!(seen[word as usize] & bit, 0, "{id} shares a bit");
            seen[word as usize] |= bit;
        }
        for id in [0, 63, 64, u64::MAX, 1 << 40] {
            let (word, bit) = agent_cgroup_filter_slot(id);
            assert!(word < AGENT_CGROUP_FILTER_WORDS, "{id}");
            assert_eq!(bit.count_ones(), 1, "{id}");
        }
        assert_eq!(
            agent_cgroup_filter_slot(5),
            agent_cgroup_filter_slot(5 + 65_536)
        );
    }

    fn normal(s: &str) -> bool {
        let mut b = [0u8; EXEC_PATH_LEN];
        b[..s.len()].copy_from_slice(s.as_bytes());
        exec_path_is_normal(&b)
    }

    #[test]
    fn normal_paths() {
        for p in [
            "/usr/bin/git",
            "/bin/sh",
            "/opt/a.b/...x/.hidden",
            "/x/...",
            "relative/ok",
        ] {
            assert!(normal(p), "{p} judged not normal");
        }
    }

    #[test]
    fn spellings_that_could_escape_a_glob() {
        for p in [
            "/opt/tools/../../bin/sh",
            "/usr/./bin/id",
            "//usr/bin/id",
            "/usr//bin/id",
            "/usr/bin/",
            "/usr/bin/.",
            "/usr/bin/..",
        ] {
            assert!(!normal(p), "{p} judged normal");
        }
    }

    #[test]
    fn unspecified_addresses_are_judged_as_loopback() {
        let v4 = |a: [u8; 4]| {
            let mut x = [0u8; 16];
            x[10] = 0xff;
            x[11] = 0xff;
            x[12..].copy_from_slice(&a);
            x
        };
        assert_eq!(
            net_judged_addr(v4([0, 0, 0, 0])),
            (v4([127, 0, 0, 1]), true)
        );
        let mut lo6 = [0u8; 16];
        lo6[15] = 1;
        assert_eq!(net_judged_addr([0; 16]), (lo6, true));
        for a in [v4([10, 0, 0, 1]), v4([0, 0, 0, 1]), lo6, v4([127, 0, 0, 1])] {
            assert_eq!(net_judged_addr(a), (a, false));
        }
        // ::a.b.c.d (IPv4-compatible) is an IPv6 address to Linux and judged as such.
        let mut compat = [0u8; 16];
        compat[12] = 10;
        assert_eq!(net_judged_addr(compat), (compat, false));
    }

    #[test]
    fn only_tcp_and_udp_sockets() {
        assert!(socket_allowed(SOCK_STREAM, IPPROTO_TCP));
        assert!(socket_allowed(SOCK_DGRAM | 0x80000, IPPROTO_UDP));
        assert!(socket_allowed(SOCK_DGRAM, IPPROTO_UDPLITE));
        assert!(!socket_allowed(3, 1), "raw ICMP");
        assert!(!socket_allowed(SOCK_DGRAM, 1), "ICMP ping socket");
        assert!(!socket_allowed(SOCK_DGRAM, 58), "ICMPv6 ping socket");
        assert!(!socket_allowed(SOCK_STREAM, 132), "SCTP");
        assert!(!socket_allowed(5, 132), "SCTP seqpacket");
        assert!(!socket_allowed(SOCK_STREAM, 262), "MPTCP");
        assert!(!socket_allowed(10, 0), "SOCK_PACKET");
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(254, 0), 254 << 20);
        assert_eq!(kernel_dev(8, 1), (8 << 20) | 1);
    }

    #[test]
    fn egress_tokens_are_loopback_sources_other_than_the_usual_ones() {
        for cookie in [
            0,
            1,
            2,
            0xff_ffff,
            0x100_0000,
            0x100_0001,
            u64::MAX,
            12_345_678_901,
        ] {
            let token = egress_token(cookie);
            let source = egress_source(token);
            assert_eq!(source[0], 127);
            assert_ne!(source, [127, 0, 0, 1], "{cookie}");
            assert_ne!(source, [127, 0, 0, 0], "{cookie}");
            assert_ne!(source, [127, 255, 255, 255], "{cookie}");
            assert_eq!(egress_token_of(source), Some(token), "{cookie}");
        }
        assert_eq!(egress_token_of([127, 0, 0, 1]), None);
        assert_eq!(egress_token_of([127, 255, 255, 255]), None);
        assert_eq!(egress_token_of([10, 0, 0, 5]), None);
        assert_ne!(egress_token(7), egress_token(8));
    }

    #[test]
    fn a_full_buffer_without_nul_is_judged_whole() {
        let mut b = [b'a'; EXEC_PATH_LEN];
        b[0] = b'/';
        assert!(exec_path_is_normal(&b));
        b[10] = b'/';
        b[11] = b'/';
        assert!(!exec_path_is_normal(&b));
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), made of integers, with no padding.
    unsafe impl aya::Pod for super::AgentSlot {}
    unsafe impl aya::Pod for super::NetKey {}
    unsafe impl aya::Pod for super::NetAllow {}
    unsafe impl aya::Pod for super::ExecKey {}
    unsafe impl aya::Pod for super::IdentityConfig {}
    unsafe impl aya::Pod for super::Expiry {}
    unsafe impl aya::Pod for super::NetGrant {}
    unsafe impl aya::Pod for super::DnsProxy {}
    unsafe impl aya::Pod for super::DnsOrig {}
    unsafe impl aya::Pod for super::Learned {}
    unsafe impl aya::Pod for super::ExecFileKey {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::UnixKey {}
    unsafe impl aya::Pod for super::EgressFlow {}
    unsafe impl aya::Pod for super::UnixPeerLayout {}
    unsafe impl aya::Pod for super::UnixPending {}
    unsafe impl aya::Pod for super::server_name::SniNameKey {}
    unsafe impl aya::Pod for super::server_name::SniFlow {}
}

// The kernel and the daemon must agree on these sizes; a change here is a format change.
const _: () = assert!(core::mem::size_of::<ExecFileKey>() == 16);
const _: () = assert!(core::mem::size_of::<AgentSlot>() == 16);
const _: () = assert!(core::mem::size_of::<NetGrant>() == 8 + 4 + 4 * MAX_PORT_RANGES + 4);
const _: () = assert!(core::mem::size_of::<NetKey>() == 20);
const _: () = assert!(core::mem::size_of::<ExecKey>() == 256);
const _: () = assert!(core::mem::size_of::<NetAllow>() == 4 + 4 * MAX_PORT_RANGES);
const _: () = assert!(core::mem::size_of::<DnsProxy>() == 8);
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 20);
const _: () = assert!(core::mem::size_of::<Learned>() == 8 + 4 + 4 * MAX_PORT_RANGES + 4);
const _: () = assert!(core::mem::size_of::<EgressFlow>() == 32);

/// Value of `TASK_EXEC_FILE_GRANTS` (key: `ExecFileKey` whose `agent` field holds the task
/// number): the task may exec this file (device, inode) until `expiry`. An ask-mode approval of
/// an exec writes it, so a file swapped in at the same path afterwards is not covered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileGrant {
    pub expiry: Expiry,
    /// `FILE_GRANT_ONCE`: the exec it allows removes it (the kernel's delete succeeds for one
    /// exec only, so two execs racing for it cannot both pass).
    pub uses: u32,
    pub _pad: u32,
}

/// `FileGrant::uses`: valid until its expiry.
pub const FILE_GRANT_UNTIL_EXPIRY: u32 = 0;
/// `FileGrant::uses`: valid for one exec.
pub const FILE_GRANT_ONCE: u32 = 1;

/// Set in `ExecKey::agent` (above the task number) of a task exec grant that allows a script's
/// own name only, never a program's: an ask-mode approval of a script. The kernel no longer holds
/// the script's file when it judges the exec (`sched_process_exec` sees the interpreter's), so a
/// script is judged by name; this bit keeps a binary swapped in at that name from passing as the
/// program.
pub const SCRIPT_NAME_GRANT: u32 = 1 << 31;

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for FileGrant {}

const _: () = assert!(core::mem::size_of::<FileGrant>() == 16);
