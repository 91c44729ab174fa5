//! Agent policies, pure: parse and validate TOML, evaluate actions, compile kernel tables. No I/O.

pub(crate) mod compile;
pub mod dns;
mod evaluate;
pub mod files;
pub mod host;
pub mod http;
mod index;
pub(crate) mod model;
mod parse;
pub mod request_lint;
pub mod selectors;
pub mod unix;
pub mod unix_approved;

pub use compile::{EXEC_ENTRIES_PER_SET, KernelTables, NET_ENTRIES_PER_SET, compile_grants};
pub use evaluate::{Decision, ExecFacts, to_table_addr};
pub use model::{ExecRule, NetRule};
pub use model::{Policy, PolicySet};
pub use parse::{GrantRuleError, Issue, PolicyError, parse_grants};
pub(crate) use parse::{parse_exec, valid_net_entry};
pub use unix::unix_name_display;

/// Test helper: the policy of `agent` written as the agent line followed by `body`, parsed from
/// `{agent}.toml`; a parse error fails the test with the text.
#[cfg(test)]
pub(crate) fn test_policy(agent: &str, body: &str) -> Policy {
    let text = format!("agent = {agent:?}\n{body}");
    Policy::parse(&text, std::path::Path::new(&format!("{agent}.toml")))
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}
