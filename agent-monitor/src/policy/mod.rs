//! Agent policies, pure: parse and validate TOML, evaluate actions, compile kernel tables. No I/O.

mod compile;
mod evaluate;
pub(crate) mod model;
mod parse;

pub use compile::KernelTables;
pub use evaluate::{Decision, ExecFacts};
pub use model::{Policy, PolicySet};
pub use parse::Issue;
pub(crate) use parse::{parse_exec, parse_net};
