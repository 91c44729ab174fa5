//! The only module that talks to aya: loads and attaches the kernel programs (or adopts the ones a
//! previous daemon pinned), writes the identity and allowlist maps, reads the action ring buffer
//! and the loss counters.
//!
//! - `load`: loading, adoption of a previous daemon's pins, upgrade from another build.
//! - `hooks`: the hook table, attaching through pinned links, moving the agent-socket hooks.
//! - `socket_watch`: the `sys_enter_socket` watch, attached only while needed.
//! - `unix_hooks`: the unix-socket hooks' context check, attached only while a policy needs them.
//! - `tables`: every map user space uses, opened once into typed handles.
//! - `facade`: [`Kernel`]'s methods over the tables.
//! - `ring`: the action ring buffer's reader.
//! - `pin`: the pin directory's layout and lock.

mod facade;
mod hooks;
mod load;
mod pin;
mod ring;
mod socket_watch;
mod tables;
mod thread_tags;
mod unix_hooks;
// The egress endpoint's sockmap relay (its own object).
pub mod egress_relay;

pub use hooks::HookCgroups;
pub use load::{Mechanisms, Origin, uninstall};
pub use pin::DEFAULT_PIN_DIR;
pub use ring::ActionStream;
pub use tables::Occupancy;
pub use thread_tags::ThreadTags;

/// The kernel state: the typed tables, where the hooks sit, the socket() watch, and the hold on
/// the pin directory. One owner (the monitor task) holds it.
pub struct Kernel {
    tables: tables::Tables,
    pub mechanisms: Mechanisms,
    pub origin: Origin,
    hooks: hooks::HookPlacement,
    /// Last: the pins of a failed fresh install go while the directory is still locked.
    tenure: load::Tenure,
}
