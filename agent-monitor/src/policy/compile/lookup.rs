//! A pure model of the kernel's lookups in the compiled tables (LPM tries compared bit by bit), so
//! tests can prove the tables and the userspace evaluator agree.

use std::net::IpAddr;

use agent_monitor_common::{EXEC_PATH_LEN, ExecKey, NetKey};

use super::KernelTables;
use crate::policy::evaluate::{ExecFacts, judged_addr};

impl KernelTables {
    /// What the kernel decides for a connect: one longest-prefix match on (agent, address), then the
    /// port against that entry's ranges.
    pub fn lookup_connect(&self, agent: u32, addr: IpAddr, port: u16) -> bool {
        let data = net_key_bytes(&NetKey {
            agent,
            addr: judged_addr(addr).octets(),
        });
        let best = self
            .net
            .iter()
            .filter(|(bits, key, _)| prefix_matches(&net_key_bytes(key), &data, *bits))
            .max_by_key(|(bits, _, _)| *bits);
        best.is_some_and(|(_, _, allow)| {
            allow
                .ranges
                .iter()
                .take(allow.count as usize)
                .any(|r| r.lo <= port && port <= r.hi)
        })
    }

    /// What the kernel decides for an exec: the looked-up data is the path and its NUL; a path that
    /// does not fit is denied.
    pub fn lookup_exec(&self, agent: u32, path: &str) -> bool {
        let bytes = path.as_bytes();
        if bytes.len() > EXEC_PATH_LEN - 1 || bytes.contains(&0) {
            return false;
        }
        let lookup = ExecKey {
            agent,
            path: crate::policy::evaluate::path_buffer(path),
        };
        // Like the kernel program: a path not in normal form is never looked up.
        if !agent_monitor_common::exec_path_is_normal(&lookup.path) {
            return false;
        }
        let data = exec_key_bytes(&lookup);
        self.exec
            .iter()
            .any(|(bits, key)| prefix_matches(&exec_key_bytes(key), &data, *bits))
    }
}

impl KernelTables {
    /// What the kernel exec program decides (exec.rs), given whether the file that runs is one the
    /// agent's exact rules name (`file_ok`, a lookup in the file-identity map the daemon fills).
    pub fn judge_exec(&self, agent: u32, facts: &ExecFacts<'_>, file_ok: bool) -> bool {
        let script = facts.interpreter.is_some();
        if !facts.initial_user_ns {
            return file_ok && !script;
        }
        let program = facts.interpreter.unwrap_or(facts.name);
        if !file_ok && !self.lookup_exec(agent, program) {
            return false;
        }
        !script || self.lookup_exec(agent, facts.name)
    }
}

/// The key's bytes as the kernel sees them (`#[repr(C)]`, no padding).
pub(super) fn net_key_bytes(key: &NetKey) -> [u8; 20] {
    let mut bytes = [0; 20];
    bytes[..4].copy_from_slice(&key.agent.to_ne_bytes());
    bytes[4..].copy_from_slice(&key.addr);
    bytes
}

pub(super) fn exec_key_bytes(key: &ExecKey) -> [u8; 4 + EXEC_PATH_LEN] {
    let mut bytes = [0; 4 + EXEC_PATH_LEN];
    bytes[..4].copy_from_slice(&key.agent.to_ne_bytes());
    bytes[4..].copy_from_slice(&key.path);
    bytes
}

/// Whether the first `bits` bits of `key` and `data` are equal, as the LPM trie compares them.
pub(super) fn prefix_matches(key: &[u8], data: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    let (Some(k), Some(d)) = (key.get(..whole), data.get(..whole)) else {
        return false;
    };
    if k != d {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (key.get(whole), data.get(whole)) {
        (Some(k), Some(d)) => k & mask == d & mask,
        _ => false,
    }
}
