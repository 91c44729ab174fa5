//! agent-monitor kernel programs. Entry points only; each hook family lives in its own module.
//!
//! Every hook first asks "is the current task an agent?" (one hash lookup on the cgroup id) and
//! returns at once when it is not.
#![no_std]
#![no_main]

mod dns;
mod egress;
mod exec;
mod identity;
mod lifecycle;
mod maps;
mod net;
mod route;
mod server_name;
mod unix;
mod unix_peer;

use agent_monitor_common::RecordKind;
use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm, raw_tracepoint, tracepoint},
    programs::{
        LsmContext, RawTracePointContext, SkBuffContext, SockAddrContext, SockContext,
        TracePointContext,
    },
};

/// raw tracepoint sched_process_exec(task, old_pid, bprm): fires after every successful exec
/// (execve, execveat, fexecve, scripts, binfmt_misc, the loader run directly), in the new image's
/// task, before it runs its first instruction; `bprm` names the file that runs.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn agent_exec(ctx: RawTracePointContext) -> u32 {
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

/// tracepoint task/task_newtask: fires in the parent for every new task, io_uring worker threads
/// included (which `sched_process_fork` never sees).
#[tracepoint(category = "task", name = "task_newtask")]
pub fn agent_newtask(ctx: TracePointContext) -> u32 {
    match lifecycle::on_newtask(&ctx) {
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

/// cgroup/connect4: every connect of an AF_INET socket (TCP incl. Fast Open sendto, UDP,
/// io_uring), with the kernel's copy of the address; 0 → EPERM.
#[cgroup_sock_addr(connect4)]
pub fn agent_connect4(ctx: SockAddrContext) -> i32 {
    net::on_addr4(&ctx, RecordKind::Connect)
}

/// cgroup/connect6: every connect of an AF_INET6 socket, IPv4-mapped addresses included; 0 → EPERM.
#[cgroup_sock_addr(connect6)]
pub fn agent_connect6(ctx: SockAddrContext) -> i32 {
    net::on_addr6(&ctx, RecordKind::Connect)
}

/// cgroup/sendmsg4: every UDP send that names its destination (sendto, sendmsg, sendmmsg,
/// io_uring; an AF_INET6 socket sending to `::ffff:a.b.c.d` lands here too); 0 → EPERM. Agents'
/// DNS datagrams are rewritten to their proxy here.
#[cgroup_sock_addr(sendmsg4)]
pub fn agent_sendmsg4(ctx: SockAddrContext) -> i32 {
    net::on_addr4(&ctx, RecordKind::Sendmsg)
}

/// cgroup/sendmsg6: every UDP send on an AF_INET6 socket that names its destination; 0 → EPERM.
#[cgroup_sock_addr(sendmsg6)]
pub fn agent_sendmsg6(ctx: SockAddrContext) -> i32 {
    net::on_addr6(&ctx, RecordKind::Sendmsg)
}

/// cgroup/sock_create: every AF_INET/AF_INET6 socket a process creates; 0 → EPERM.
#[cgroup_sock(sock_create)]
pub fn agent_sock_create(ctx: SockContext) -> i32 {
    net::on_sock_create(&ctx)
}

/// cgroup_skb/egress: every packet of the sockets below where it is attached (agents' sockets, or
/// every socket while selectors exist); drops agents' source-routed packets (`route.rs`), 0 → drop.
#[cgroup_skb(egress)]
pub fn agent_egress(ctx: SkBuffContext) -> i32 {
    route::on_egress(&ctx)
}

/// tracepoint syscalls/sys_enter_socket: every socket() call; reports the families `run`'s seccomp
/// filter refuses (the cgroup hooks only see inet sockets).
#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn agent_socket_syscall(ctx: TracePointContext) -> u32 {
    match net::on_socket_syscall(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// cgroup/recvmsg4: the source address a UDP recvfrom()/recvmsg() returns; must return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn agent_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore_peer4(&ctx)
}

/// cgroup/recvmsg6: as recvmsg4, for AF_INET6 UDP sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn agent_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore_peer6(&ctx)
}

/// cgroup/getpeername4: the peer address getpeername() returns on an AF_INET socket.
#[cgroup_sock_addr(getpeername4)]
pub fn agent_getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore_peer4(&ctx);
    egress::restore_peer(&ctx, false)
}

/// cgroup/getpeername6: the peer address getpeername() returns on an AF_INET6 socket.
#[cgroup_sock_addr(getpeername6)]
pub fn agent_getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore_peer6(&ctx);
    egress::restore_peer(&ctx, true)
}

/// cgroup/connect_unix: every connect of an AF_UNIX socket (stream, seqpacket, datagram; io_uring
/// too), with the kernel's copy of the address, before the name is looked up; 0 → EPERM.
#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/connect_unix")]
pub fn agent_connect_unix(ctx: *mut aya_ebpf::bindings::bpf_sock_addr) -> i32 {
    unix::on_unix(&SockAddrContext::new(ctx), 0)
}

/// cgroup/sendmsg_unix: every AF_UNIX datagram send that names its destination (sendto,
/// sendmsg, sendmmsg), before the name is looked up; 0 → EPERM.
#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/sendmsg_unix")]
pub fn agent_sendmsg_unix(ctx: *mut aya_ebpf::bindings::bpf_sock_addr) -> i32 {
    unix::on_unix(&SockAddrContext::new(ctx), 1)
}

/// lsm/bprm_check_security: loaded (never attached) only to learn whether this kernel accepts BPF
/// LSM programs, so the daemon can report it; it would allow everything.
#[lsm(hook = "bprm_check_security")]
pub fn agent_lsm_probe(_ctx: LsmContext) -> i32 {
    0
}

/// tracepoint syscalls/sys_exit_connect: every connect() as it returns, in the caller's task,
/// before user space runs again; judges the listener's bound name of an agent's unix connect the
/// cgroup hook allowed by name (`unix_peer.rs`). Attached only while a policy has `[unix]`.
#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn agent_unix_peer(ctx: TracePointContext) -> u32 {
    unix_peer::on_exit_connect(&ctx);
    0
}

/// tracepoint syscalls/sys_exit_io_uring_enter: judges the listener's bound name of an agent's
/// unix connect that io_uring issued inline in the caller's thread (`unix_peer.rs`). Attached
/// with `agent_unix_peer`.
#[tracepoint(category = "syscalls", name = "sys_exit_io_uring_enter")]
pub fn agent_unix_uring(ctx: TracePointContext) -> u32 {
    unix_peer::on_exit_uring(&ctx);
    0
}

/// tracepoint sock/sk_data_ready: every socket that got data; for a unix datagram, in the
/// sender's task before its send returns. Judges the receiver's bound name of an agent's named
/// datagram send the cgroup hook allowed by name (`unix_peer.rs`), after delivery. Attached only
/// while a policy has `[unix]`.
#[tracepoint(category = "sock", name = "sk_data_ready")]
pub fn agent_unix_datagram(ctx: TracePointContext) -> u32 {
    unix_peer::on_data_ready(&ctx);
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
