//! Audit → learn → enforce, pure: read the JSON audit trail back, suggest allowlist entries from
//! what an agent did, write them as policy TOML (fresh or merged), and replay recorded actions
//! through the daemon's evaluator. No I/O beyond the reader it is given; `policy_cmd` does the rest.

pub mod audit;
pub mod render;
pub mod replay;
pub mod request_rules;
pub mod requests;
pub mod suggest;
