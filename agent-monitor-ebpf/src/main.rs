//! agent-monitor kernel programs. Entry points only; each hook family lives in its own module.
//!
//! Every hook first asks "is the current task an agent?" (one hash lookup on the cgroup id) and
//! returns at once when it is not.
#![no_std]
#![no_main]

mod exec;
mod identity;
mod lifecycle;
mod maps;
mod net;

use aya_ebpf::{
    macros::{cgroup_sock_addr, lsm, tracepoint},
    programs::{LsmContext, SockAddrContext, TracePointContext},
};

/// tracepoint sched/sched_process_exec: fires after a successful exec (execve, execveat, scripts,
/// binfmt), in the new image's task, before it runs its first instruction.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn agent_exec(ctx: TracePointContext) -> u32 {
    match exec::on_exec(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// tracepoint sched/sched_process_fork: fires in the parent for every new task.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn agent_fork(ctx: TracePointContext) -> u32 {
    match lifecycle::on_fork(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// tracepoint sched/sched_process_exit: fires in each exiting task.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn agent_exit(ctx: TracePointContext) -> u32 {
    match lifecycle::on_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// cgroup/connect4: every connect() of an AF_INET socket (TCP, UDP, io_uring); 0 → EPERM.
#[cgroup_sock_addr(connect4)]
pub fn agent_connect4(ctx: SockAddrContext) -> i32 {
    net::on_connect4(&ctx)
}

/// cgroup/connect6: every connect() of an AF_INET6 socket, IPv4-mapped addresses included; 0 → EPERM.
#[cgroup_sock_addr(connect6)]
pub fn agent_connect6(ctx: SockAddrContext) -> i32 {
    net::on_connect6(&ctx)
}

/// lsm/bprm_check_security: loaded (never attached) only to learn whether this kernel accepts BPF
/// LSM programs, so the daemon can report it; it would allow everything.
#[lsm(hook = "bprm_check_security")]
pub fn agent_lsm_probe(_ctx: LsmContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
