//! The userspace evaluator: the same verdicts as the kernel tables, plus the rule that decided.
//! Used for alert explanations and `policy test`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use agent_monitor_common::EXEC_PATH_LEN;

use crate::policy::model::Policy;

/// Whether an action is on the allowlist, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// When allowed, the matching entry as written in the policy file; otherwise why nothing
    /// matched (`no rule matches`).
    pub reason: String,
}

/// Why nothing matched, in `Decision::reason`.
pub const NO_RULE_MATCHES: &str = "no rule matches";

/// Why a non-normalised exec path is not allowed, in `Decision::reason`.
pub const NOT_NORMAL: &str =
    "path is not in normal form (//, /./ or /../): not matched, so a glob cannot be escaped";

/// `path` as the kernel holds it: bytes, NUL, zeros. The caller has checked the length.
pub(crate) fn path_buffer(path: &str) -> [u8; EXEC_PATH_LEN] {
    let mut b = [0u8; EXEC_PATH_LEN];
    let n = path.len().min(EXEC_PATH_LEN);
    b[..n].copy_from_slice(&path.as_bytes()[..n]);
    b
}

impl Decision {
    fn allowed_by(rule: &str) -> Decision {
        Decision {
            allowed: true,
            reason: rule.to_string(),
        }
    }

    fn not_allowed(reason: impl Into<String>) -> Decision {
        Decision {
            allowed: false,
            reason: reason.into(),
        }
    }
}

/// "not allowed" rather than "denied": in alert mode the action still proceeds.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allowed {
            write!(f, "allowed by rule {:?}", self.reason)
        } else {
            write!(f, "not allowed: {}", self.reason)
        }
    }
}

/// The address as the kernel tables hold it: IPv4 as `::ffff:a.b.c.d`.
pub fn to_table_addr(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The address a connect or send is judged as: the table form, with the unspecified address
/// (which Linux sends to loopback) replaced by loopback, as the kernel programs do.
pub(crate) fn judged_addr(addr: IpAddr) -> Ipv6Addr {
    Ipv6Addr::from(agent_monitor_common::net_judged_addr(to_table_addr(addr).octets()).0)
}

/// What the kernel knows about one exec, as the userspace evaluator needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecFacts<'a> {
    /// The name the exec was asked for (`bprm->filename`).
    pub name: &'a str,
    /// A script's `#!` interpreter (`bprm->interp`), the program that actually runs.
    pub interpreter: Option<&'a str>,
    /// The exact rule path whose file (device, inode, as resolved by the daemon) is the file
    /// that runs, if any.
    pub file_rule: Option<&'a str>,
    /// The task was in the initial user namespace, where an unprivileged process cannot remap names.
    pub initial_user_ns: bool,
}

/// Why an exec in a user namespace is not allowed, in `Decision::reason`.
pub const USER_NS: &str = "in a user namespace names can be remapped (bind mounts, chroot), so \
                           only the files of exact rules are allowed there, and no scripts";

impl Policy {
    fn rule_index(&self) -> &crate::policy::index::RuleIndex {
        self.index.get(&self.network, &self.exec)
    }

    /// Whether this agent may connect to `addr:port`. An IPv4-mapped IPv6 address is judged as the
    /// IPv4 address, as the kernel sees both the same way.
    pub fn check_connect(&self, addr: IpAddr, port: u16) -> Decision {
        let addr = judged_addr(addr);
        // Report the most specific rule, first in the file on ties, as the one a reader looks for.
        let best = self
            .rule_index()
            .connect(u128::from(addr), port, &self.network);
        match best {
            Some(i) => Decision::allowed_by(&self.network[i].text),
            None => Decision::not_allowed(NO_RULE_MATCHES),
        }
    }

    /// Whether this agent may run the program an exec started, by the kernel's facts: the file that
    /// runs is an exact rule's file, or (initial user namespace only) the name it was opened by
    /// matches a rule; a script's own name must match a rule too. The kernel program decides the same.
    pub fn check_exec_facts(&self, facts: &ExecFacts<'_>) -> Decision {
        let by_file = facts.file_rule.and_then(|path| {
            self.rule_index()
                .exact(path)
                .map(|i| Decision::allowed_by(&self.exec[i].text))
        });
        if !facts.initial_user_ns {
            return match (by_file, facts.interpreter) {
                (Some(d), None) => d,
                _ => Decision::not_allowed(USER_NS),
            };
        }
        let program =
            by_file.unwrap_or_else(|| self.check_exec(facts.interpreter.unwrap_or(facts.name)));
        let Some(interpreter) = facts.interpreter else {
            return program;
        };
        if !program.allowed {
            return Decision::not_allowed(format!(
                "script interpreter {interpreter} (#!) {program}"
            ));
        }
        let script = self.check_exec(facts.name);
        if !script.allowed {
            return Decision::not_allowed(format!("script {} {script}", facts.name));
        }
        Decision::allowed_by(&format!(
            "{}\" and interpreter rule \"{}",
            script.reason, program.reason
        ))
    }

    /// Whether this agent may execute `path` by its name alone.
    pub fn check_exec(&self, path: &str) -> Decision {
        // A kernel path cannot contain NUL; judged as not allowed rather than cut short.
        if path.contains('\0') {
            return Decision::not_allowed("path contains a NUL byte");
        }
        // The kernel key holds EXEC_PATH_LEN - 1 path bytes; a longer path can match nothing.
        if path.len() > EXEC_PATH_LEN - 1 {
            return Decision::not_allowed(format!(
                "path is longer than {} bytes, which the kernel cannot match",
                EXEC_PATH_LEN - 1
            ));
        }
        if !agent_monitor_common::exec_path_is_normal(&path_buffer(path)) {
            return Decision::not_allowed(NOT_NORMAL);
        }
        // An exact rule beats any glob; among globs the longest prefix wins.
        match self.rule_index().exec(path) {
            Some(i) => Decision::allowed_by(&self.exec[i].text),
            None => Decision::not_allowed(NO_RULE_MATCHES),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn policy(network: &[&str], exec: &[&str]) -> Policy {
        crate::policy::test_policy(
            "t",
            &format!("[network]\nallow = {network:?}\n[exec]\nallow = {exec:?}\n"),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn connect(p: &Policy, addr: &str, port: u16) -> Decision {
        p.check_connect(ip(addr), port)
    }

    fn allowed_by(rule: &str) -> Decision {
        Decision::allowed_by(rule)
    }

    /// Denied because no rule matches.
    fn denied() -> Decision {
        Decision::not_allowed(NO_RULE_MATCHES)
    }

    #[test]
    fn dot_dot_cannot_escape_a_glob() {
        let p = policy(&[], &["/opt/tools/*", "/usr/bin/git"]);
        assert_eq!(p.check_exec("/opt/tools/lint"), allowed_by("/opt/tools/*"));
        for path in [
            "/opt/tools/../../bin/sh",
            "/opt/tools/./x",
            "/opt/tools//x",
            "//usr/bin/git",
        ] {
            assert_eq!(
                p.check_exec(path),
                Decision::not_allowed(NOT_NORMAL),
                "{path}"
            );
        }
    }

    #[test]
    fn nothing_allowed_by_default() {
        let p = policy(&[], &[]);
        assert_eq!(connect(&p, "127.0.0.1", 80), denied());
        assert_eq!(p.check_exec("/bin/sh"), denied());
        assert_eq!(
            connect(&p, "127.0.0.1", 80).to_string(),
            "not allowed: no rule matches"
        );
    }

    #[test]
    fn single_address_and_port() {
        let p = policy(&["127.0.0.1:8080"], &[]);
        let d = connect(&p, "127.0.0.1", 8080);
        assert_eq!(d, allowed_by("127.0.0.1:8080"));
        assert!(d.allowed);
        assert_eq!(d.to_string(), "allowed by rule \"127.0.0.1:8080\"");
        assert_eq!(connect(&p, "127.0.0.1", 8081), denied());
        assert_eq!(connect(&p, "127.0.0.2", 8080), denied());
    }

    #[test]
    fn cidr_edges() {
        let p = policy(&["10.1.2.0/23:443"], &[]);
        assert!(connect(&p, "10.1.2.0", 443).allowed);
        assert!(connect(&p, "10.1.3.255", 443).allowed);
        assert!(!connect(&p, "10.1.1.255", 443).allowed);
        assert!(!connect(&p, "10.1.4.0", 443).allowed);
    }

    #[test]
    fn zero_prefixes() {
        let p = policy(&["0.0.0.0/0:53"], &[]);
        assert!(connect(&p, "255.255.255.255", 53).allowed);
        assert!(connect(&p, "0.0.0.0", 53).allowed);
        // An IPv4 /0 is ::ffff:0:0/96, so real IPv6 addresses stay outside it.
        assert!(!connect(&p, "2001:db8::1", 53).allowed);
        let p = policy(&["[::/0]:53"], &[]);
        assert!(connect(&p, "2001:db8::1", 53).allowed);
        assert!(connect(&p, "8.8.8.8", 53).allowed);
    }

    #[test]
    fn port_ranges() {
        let p = policy(&["192.168.1.5:1000-2000"], &[]);
        assert!(!connect(&p, "192.168.1.5", 999).allowed);
        assert!(connect(&p, "192.168.1.5", 1000).allowed);
        assert!(connect(&p, "192.168.1.5", 2000).allowed);
        assert!(!connect(&p, "192.168.1.5", 2001).allowed);
    }

    #[test]
    fn any_port() {
        let p = policy(&["[fd00::/8]:*"], &[]);
        for port in [0, 1, 80, 65535] {
            assert!(connect(&p, "fd12::1", port).allowed, "{port}");
        }
        assert!(!connect(&p, "fe00::1", 80).allowed);
    }

    #[test]
    fn ipv6_addresses() {
        let p = policy(&["[::1]:8080", "[2001:db8::/32]:443"], &[]);
        assert!(connect(&p, "::1", 8080).allowed);
        assert!(!connect(&p, "::2", 8080).allowed);
        assert!(connect(&p, "2001:db8:ffff::1", 443).allowed);
        assert!(!connect(&p, "2001:db9::1", 443).allowed);
        // ::1 is not 127.0.0.1.
        assert!(!connect(&p, "127.0.0.1", 8080).allowed);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
        let p = policy(&["10.0.0.0/8:443"], &[]);
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
        assert_eq!(p.check_connect(mapped, 443), allowed_by("10.0.0.0/8:443"));
        assert_eq!(p.check_connect(mapped, 80), denied());
        let outside = IpAddr::V6(Ipv4Addr::new(11, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(p.check_connect(outside, 443), denied());
    }

    #[test]
    fn ipv6_mapped_rule_matches_ipv4() {
        let p = policy(&["[::ffff:10.0.0.0/104]:80"], &[]);
        assert!(connect(&p, "10.200.0.1", 80).allowed);
        assert!(!connect(&p, "11.0.0.1", 80).allowed);
    }

    #[test]
    fn most_specific_rule_is_reported() {
        let p = policy(&["10.0.0.0/8:*", "10.1.0.0/16:443", "10.1.2.3:443"], &[]);
        assert_eq!(connect(&p, "10.1.2.3", 443), allowed_by("10.1.2.3:443"));
        assert_eq!(connect(&p, "10.1.2.4", 443), allowed_by("10.1.0.0/16:443"));
        // The /16 does not allow 80, but the /8 that covers it does.
        assert_eq!(connect(&p, "10.1.2.3", 80), allowed_by("10.0.0.0/8:*"));
    }

    #[test]
    fn unspecified_destination_is_judged_as_loopback() {
        // 0.0.0.0/8 does not contain 127.0.0.1, and 0.0.0.0 is where Linux sends to loopback.
        let p = policy(&["0.0.0.0/8:*", "[::ffff:0.0.0.0/128]:*"], &[]);
        assert_eq!(connect(&p, "0.0.0.0", 22), denied());
        assert_eq!(connect(&p, "::ffff:0.0.0.0", 22), denied());
        let p = policy(&["127.0.0.1:22", "[::1]:80"], &[]);
        assert!(connect(&p, "0.0.0.0", 22).allowed);
        assert!(connect(&p, "::ffff:0.0.0.0", 22).allowed);
        assert!(connect(&p, "::", 80).allowed);
        assert!(!connect(&p, "::", 22).allowed);
    }

    fn facts<'a>(
        name: &'a str,
        interpreter: Option<&'a str>,
        file_rule: Option<&'a str>,
        initial_user_ns: bool,
    ) -> ExecFacts<'a> {
        ExecFacts {
            name,
            interpreter,
            file_rule,
            initial_user_ns,
        }
    }

    #[test]
    fn the_file_that_runs_decides_whatever_its_name() {
        let p = policy(&[], &["/usr/bin/git", "/opt/tools/*"]);
        // fexecve, a symlink, /proc/self/fd/N: the file is git's.
        for name in ["/dev/fd/3", "/tmp/link", "/proc/self/fd/3"] {
            assert_eq!(
                p.check_exec_facts(&facts(name, None, Some("/usr/bin/git"), true)),
                allowed_by("/usr/bin/git"),
                "{name}"
            );
            assert!(!p.check_exec_facts(&facts(name, None, None, true)).allowed);
        }
        // A name that matches but a file that is not git's (upgraded, not yet resolved): by name.
        assert!(
            p.check_exec_facts(&facts("/usr/bin/git", None, None, true))
                .allowed
        );
    }

    #[test]
    fn in_a_user_namespace_only_exact_files_count() {
        let p = policy(&[], &["/usr/bin/git", "/opt/tools/*", "/bin/sh"]);
        assert!(
            p.check_exec_facts(&facts("/usr/bin/git", None, Some("/usr/bin/git"), false))
                .allowed
        );
        // Bind-mounted over git: the name matches, the file does not.
        assert_eq!(
            p.check_exec_facts(&facts("/usr/bin/git", None, None, false)),
            Decision::not_allowed(USER_NS)
        );
        assert!(
            !p.check_exec_facts(&facts("/opt/tools/x", None, None, false))
                .allowed
        );
        // A script's own name cannot be trusted there either.
        assert!(
            !p.check_exec_facts(&facts(
                "/opt/tools/x.sh",
                Some("/bin/sh"),
                Some("/bin/sh"),
                false
            ))
            .allowed
        );
    }

    #[test]
    fn a_script_needs_its_name_and_its_interpreter() {
        let p = policy(&[], &["/opt/tools/*", "/bin/sh"]);
        let ok = p.check_exec_facts(&facts(
            "/opt/tools/x.sh",
            Some("/bin/sh"),
            Some("/bin/sh"),
            true,
        ));
        assert!(ok.allowed, "{ok}");
        let bad_interp =
            p.check_exec_facts(&facts("/opt/tools/x.sh", Some("/usr/bin/perl"), None, true));
        assert!(!bad_interp.allowed);
        assert!(
            bad_interp.reason.contains("interpreter /usr/bin/perl"),
            "{bad_interp}"
        );
        let bad_script =
            p.check_exec_facts(&facts("/tmp/x.sh", Some("/bin/sh"), Some("/bin/sh"), true));
        assert!(!bad_script.allowed);
        assert!(
            bad_script.reason.contains("script /tmp/x.sh"),
            "{bad_script}"
        );
    }

    #[test]
    fn exact_exec() {
        let p = policy(&[], &["/usr/bin/git"]);
        assert_eq!(p.check_exec("/usr/bin/git"), allowed_by("/usr/bin/git"));
        assert_eq!(p.check_exec("/usr/bin/gitk"), denied());
        assert_eq!(p.check_exec("/usr/bin/gi"), denied());
        assert_eq!(
            p.check_exec("/usr/bin/git/"),
            Decision::not_allowed(NOT_NORMAL)
        );
    }

    #[test]
    fn glob_exec() {
        let p = policy(&[], &["/usr/bin/python3*"]);
        for path in [
            "/usr/bin/python3",
            "/usr/bin/python3.12",
            "/usr/bin/python3-config",
        ] {
            assert_eq!(
                p.check_exec(path),
                allowed_by("/usr/bin/python3*"),
                "{path}"
            );
        }
        assert_eq!(p.check_exec("/usr/bin/python2"), denied());
        assert_eq!(p.check_exec("/usr/bin/python"), denied());
    }

    #[test]
    fn exact_rule_is_reported_over_glob() {
        let p = policy(&[], &["/usr/*", "/usr/bin/*", "/usr/bin/git"]);
        assert_eq!(p.check_exec("/usr/bin/git"), allowed_by("/usr/bin/git"));
        assert_eq!(p.check_exec("/usr/bin/ls"), allowed_by("/usr/bin/*"));
        assert_eq!(p.check_exec("/usr/lib/x"), allowed_by("/usr/*"));
    }

    #[test]
    fn too_long_or_nul_paths_are_denied() {
        let p = policy(&[], &["/*"]);
        let max = format!("/{}", "a".repeat(EXEC_PATH_LEN - 2));
        assert!(p.check_exec(&max).allowed);
        let long = format!("{max}a");
        assert_eq!(
            p.check_exec(&long).to_string(),
            "not allowed: path is longer than 251 bytes, which the kernel cannot match"
        );
        assert_eq!(
            p.check_exec("/bin/sh\0x").to_string(),
            "not allowed: path contains a NUL byte"
        );
    }
}
