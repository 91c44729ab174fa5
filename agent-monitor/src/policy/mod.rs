//! Agent policies, pure: parse and validate TOML, evaluate actions, compile kernel tables. No I/O.

pub(crate) mod compile;
mod evaluate;
pub mod host;
pub(crate) mod model;
mod parse;

pub use compile::KernelTables;
pub use evaluate::{Decision, ExecFacts};
pub use model::{Policy, PolicySet};
pub use parse::Issue;
pub(crate) use parse::{parse_exec, valid_net_entry};
