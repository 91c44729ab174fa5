//! Agent policies, pure: parse and validate TOML, evaluate actions, compile kernel tables. No I/O.

mod compile;
mod evaluate;
mod model;
mod parse;

pub use compile::{CapacityError, KernelTables};
pub use evaluate::{Decision, NO_RULE_MATCHES};
pub use model::{ExecRule, Mode, NetRule, Policy, PolicySet};
pub use parse::{AGENT_NAME_MAX, Issue, Location, PolicyError, Reason};
