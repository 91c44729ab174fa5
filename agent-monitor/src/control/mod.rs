//! The control socket protocol: one JSON request line, one JSON response line. Shared by the daemon
//! (server) and the `run` and `status` clients. The daemon identifies the caller with SO_PEERCRED,
//! never by what the request says.

mod ask;
mod authorize;
mod call;
mod caught;
mod request;
mod response;
#[cfg(test)]
mod tests;

pub use ask::{AskAnswer, AskCall};
pub use ask::{ChainProcess, Decision, HeldAction, Outcome, PendingEvent, PendingRequest, Scope};
pub use authorize::authorize;
pub use call::{call, call_then};
pub use caught::{CaughtCall, CaughtReport, CaughtTarget};
pub use request::{Privileges, Request, parse_request};
pub use response::{
    AgentStatus, Counters, DnsEndpoint, Placement, Response, SinkStatus, Status, TaskStatus,
};

pub const DEFAULT_SOCKET: &str = "/run/agent-monitor/control.sock";

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

pub use ask::{AskAllowlist, AskAllowlistLine};
pub use call::call_follow;
pub use caught::UnixSection;
