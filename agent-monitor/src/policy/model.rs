//! The validated policy model: what an agent may do, independent of TOML and of the kernel.
//!
//! Fields are private so every value here went through validation (`parse.rs`); compile and evaluate
//! rely on its invariants (prefix lengths in range, no host bits, paths that fit the kernel key).

use std::fmt;
use std::net::Ipv6Addr;
use std::path::Path;

use agent_monitor_common::{MODE_ALERT, MODE_ENFORCE, PortRange};

use crate::policy::host::HostRule;
use crate::policy::parse::{Issue, Location, PolicyError};
use crate::policy::selectors::Selectors;

/// What happens when an agent does something its allowlist does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The kernel refuses the action.
    #[default]
    Enforce,
    /// The action proceeds and is reported.
    Alert,
    /// The action is held until an operator or the decision service decides (`docs/ask.md`);
    /// the kernel refuses it as in enforce mode unless an approval's entry is in place.
    Ask,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Alert => "alert",
            Mode::Ask => "ask",
        }
    }

    /// The value the kernel programs read (`AgentSlot::mode`).
    pub fn kernel_value(self) -> u32 {
        match self {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Alert => MODE_ALERT,
            Mode::Ask => agent_monitor_common::MODE_ASK,
        }
    }
}

impl Mode {
    /// Whether the kernel refuses an off-list action (enforce and ask).
    pub fn refuses(self) -> bool {
        self != Mode::Alert
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One network allowlist entry: an IPv6 prefix (IPv4 as `::ffff:a.b.c.d`, prefix + 96) and a port
/// range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRule {
    pub(crate) net: Ipv6Addr,
    pub(crate) prefix_len: u8,
    pub(crate) ports: PortRange,
    pub(crate) text: String,
    pub(crate) line: usize,
}

impl NetRule {
    /// Network address, host bits clear.
    pub fn net(&self) -> Ipv6Addr {
        self.net
    }

    /// Prefix length in IPv6 bits (0–128).
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Inclusive port range; `*` is `0-65535`.
    pub fn ports(&self) -> PortRange {
        self.ports
    }

    /// The entry as written in the policy file.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// 1-based line of the entry in its file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// Whether `addr` lies inside this rule's prefix.
    pub fn covers(&self, addr: Ipv6Addr) -> bool {
        prefix_contains(self.net, self.prefix_len, addr)
    }
}

/// One exec allowlist entry: an exact absolute path, or a path prefix (`/usr/bin/python3*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRule {
    pub(crate) path: String,
    pub(crate) prefix_glob: bool,
    pub(crate) text: String,
    pub(crate) line: usize,
}

impl ExecRule {
    /// The exact path, or the prefix without its `*`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn prefix_glob(&self) -> bool {
        self.prefix_glob
    }

    /// The entry as written in the policy file.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// 1-based line of the entry in its file.
    pub fn line(&self) -> usize {
        self.line
    }

    pub fn matches(&self, path: &str) -> bool {
        if self.prefix_glob {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

/// One agent's allowlist, parsed from one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub(crate) agent: String,
    pub(crate) mode: Mode,
    pub(crate) network: Vec<NetRule>,
    /// Host-name network rules, judged by the DNS proxy (see `host.rs`).
    pub(crate) hosts: Vec<HostRule>,
    /// `[dns]`: learned-address limit and DNS-rebinding opt-in (see `dns.rs`).
    pub(crate) dns: crate::policy::dns::DnsSettings,
    pub(crate) exec: Vec<ExecRule>,
    /// `[identity]`: processes started outside `run` that are this agent.
    pub(crate) selectors: Selectors,
    /// Where `agent = …` was written; names the file in errors about the whole policy.
    pub(crate) defined_at: Location,
    /// Lookup tables over `network` and `exec` for the evaluator.
    pub(crate) index: crate::policy::index::LazyIndex,
    /// `[files]`: files and directories the agent may not open (see `files.rs`).
    pub(crate) files: crate::policy::files::FileRules,
    /// `[unix]`: which unix sockets it may use; `None`: not judged (see `unix.rs`).
    pub(crate) unix: Option<crate::policy::unix::UnixRules>,
    /// `[[network.http]]` and `[[network.tls]]`: request rules, judged by the egress endpoint.
    pub(crate) egress: crate::policy::http::EgressRules,
}

impl Policy {
    /// Adds the allow entries of an approved file (`<agent>.approved.toml`, ask mode's `always`)
    /// to this agent's lists; everything else of the agent stays as its own file says.
    pub fn absorb_approved(&mut self, approved: Policy) {
        self.network.extend(approved.network);
        self.hosts.extend(approved.hosts);
        self.exec.extend(approved.exec);
        crate::policy::unix_approved::absorb(&mut self.unix, approved.unix);
        self.index = Default::default();
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn network(&self) -> &[NetRule] {
        &self.network
    }

    pub fn hosts(&self) -> &[HostRule] {
        &self.hosts
    }

    pub fn exec(&self) -> &[ExecRule] {
        &self.exec
    }

    pub fn selectors(&self) -> &Selectors {
        &self.selectors
    }

    /// The file this policy came from.
    pub fn origin(&self) -> &Path {
        &self.defined_at.origin
    }

    /// File, line and column of the `agent` value.
    pub fn defined_at(&self) -> &Location {
        &self.defined_at
    }

    pub fn files(&self) -> &crate::policy::files::FileRules {
        &self.files
    }
}

/// Every agent's policy, with the index each agent has in the kernel tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    /// Sorted by agent name: the position is the kernel agent index, so the same set of policies
    /// always compiles to the same tables.
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Fails if two policies name the same agent, or if selectors of two agents overlap (every
    /// such pair is reported, with both places).
    pub fn new(mut policies: Vec<Policy>) -> Result<PolicySet, PolicyError> {
        // Stable sort keeps file order among duplicates, so errors read in the order files were given.
        policies.sort_by(|a, b| a.agent.cmp(&b.agent));
        let issues: Vec<Issue> = policies
            .windows(2)
            .filter(|pair| pair[0].agent == pair[1].agent)
            .map(|pair| Issue::DuplicateAgent {
                agent: pair[0].agent.clone(),
                first: pair[0].defined_at.clone(),
                second: pair[1].defined_at.clone(),
            })
            .chain(crate::policy::selectors::conflicts(
                policies.iter().map(|p| (p.agent.as_str(), &p.selectors)),
            ))
            .collect();
        if issues.is_empty() {
            Ok(PolicySet { policies })
        } else {
            Err(PolicyError::new(issues))
        }
    }

    pub fn get(&self, agent: &str) -> Option<&Policy> {
        self.find(agent).map(|i| &self.policies[i])
    }

    /// The agent's index in the kernel tables (`NetKey::agent`, `ExecKey::agent`, `AgentSlot::agent`).
    pub fn index_of(&self, agent: &str) -> Option<u32> {
        self.find(agent).and_then(|i| u32::try_from(i).ok())
    }

    /// Policies in kernel index order (by agent name).
    pub fn iter(&self) -> std::slice::Iter<'_, Policy> {
        self.policies.iter()
    }

    /// Policies with their kernel agent index.
    pub fn indexed(&self) -> impl Iterator<Item = (u32, &Policy)> {
        (0u32..).zip(self.policies.iter())
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn find(&self, agent: &str) -> Option<usize> {
        self.policies
            .binary_search_by(|p| p.agent.as_str().cmp(agent))
            .ok()
    }
}

impl<'a> IntoIterator for &'a PolicySet {
    type Item = &'a Policy;
    type IntoIter = std::slice::Iter<'a, Policy>;

    fn into_iter(self) -> Self::IntoIter {
        self.policies.iter()
    }
}

/// Mask with the top `len` bits set (`len` ≤ 128).
pub(crate) fn prefix_mask(len: u8) -> u128 {
    match len {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n.min(128))),
    }
}

pub(crate) fn prefix_contains(net: Ipv6Addr, len: u8, addr: Ipv6Addr) -> bool {
    let mask = prefix_mask(len);
    u128::from(addr) & mask == u128::from(net) & mask
}

/// A prefix as a person would write it: `10.0.0.0/8` for IPv4-mapped prefixes, `fd00::/8` otherwise.
pub(crate) fn prefix_to_string(net: Ipv6Addr, len: u8) -> String {
    match net.to_ipv4_mapped() {
        Some(v4) if len >= 96 => format!("{v4}/{}", len - 96),
        _ => format!("{net}/{len}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(agent: &str, file: &str) -> Policy {
        let text = format!("agent = \"{agent}\"\n");
        match Policy::parse(&text, Path::new(file)) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn set_sorts_agents_and_indexes_them_by_name() {
        let set = PolicySet::new(vec![
            policy("zeta", "z.toml"),
            policy("alpha", "a.toml"),
            policy("mid", "m.toml"),
        ])
        .expect("distinct agents");
        assert_eq!(set.index_of("alpha"), Some(0));
        assert_eq!(set.index_of("mid"), Some(1));
        assert_eq!(set.index_of("zeta"), Some(2));
        assert_eq!(set.index_of("nobody"), None);
        assert_eq!(
            set.get("mid").map(|p| p.origin()),
            Some(Path::new("m.toml"))
        );
        let names: Vec<_> = set.indexed().map(|(i, p)| (i, p.agent())).collect();
        assert_eq!(names, [(0, "alpha"), (1, "mid"), (2, "zeta")]);
        assert_eq!(set.len(), 3);
        let plain: Vec<_> = set.iter().map(Policy::agent).collect();
        assert_eq!(plain, ["alpha", "mid", "zeta"]);
    }

    #[test]
    fn duplicate_agent_names_both_files() {
        let err = PolicySet::new(vec![
            policy("coder", "policies/a.toml"),
            policy("other", "policies/o.toml"),
            policy("coder", "policies/b.toml"),
        ])
        .expect_err("duplicate");
        let msg = err.to_string();
        assert_eq!(
            msg,
            "agent \"coder\" is defined twice: at policies/a.toml:1:9 and at policies/b.toml:1:9"
        );
    }

    #[test]
    fn empty_set_is_fine() {
        let set = PolicySet::new(Vec::new()).expect("empty");
        assert!(set.is_empty());
        assert_eq!(set.index_of("x"), None);
    }

    #[test]
    fn prefix_helpers() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(128), u128::MAX);
        assert_eq!(prefix_mask(1), 1 << 127);
        let v4: Ipv6Addr = "::ffff:10.0.0.0".parse().expect("addr");
        assert_eq!(prefix_to_string(v4, 104), "10.0.0.0/8");
        let v6: Ipv6Addr = "fd00::".parse().expect("addr");
        assert_eq!(prefix_to_string(v6, 8), "fd00::/8");
    }
}
