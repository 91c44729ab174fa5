//! The seccomp filter `run` puts on every agent command, for the routes the cgroup hooks cannot
//! see: sockets of families other than unix, inet, inet6 and netlink (AF_VSOCK reaches the
//! hypervisor host, and cgroup sock_create only runs for inet), and io_uring, whose socket
//! operation creates sockets without the socket system call. Both fail with EPERM. The filter is
//! inherited by every descendant and no process can remove it.
//!
//! Classic BPF, written out here: the filter is a dozen instructions, and a seccomp crate would
//! bring a policy language we do not need.

use std::io;

use agent_monitor_common::AGENT_SOCKET_FAMILIES;

/// One ABI's system call numbers the filter looks at.
struct Abi {
    /// `AUDIT_ARCH_*` as in `seccomp_data.arch`.
    arch: u32,
    /// `socket(2)`.
    socket: u32,
    /// Calls refused outright: io_uring_setup, and i386's socketcall multiplexer (its arguments
    /// are in user memory, out of the filter's reach).
    refused: &'static [u32],
    /// Another ABI sharing `arch` whose numbers carry this bit (x32).
    alias_bit: u32,
}

#[cfg(target_arch = "x86_64")]
const ABIS: &[Abi] = &[
    Abi {
        arch: 0xc000_003e, // AUDIT_ARCH_X86_64
        socket: 41,
        refused: &[425],
        alias_bit: 0x4000_0000, // x32
    },
    Abi {
        arch: 0x4000_0003, // AUDIT_ARCH_I386
        socket: 359,
        refused: &[425, 102],
        alias_bit: 0,
    },
];

#[cfg(target_arch = "aarch64")]
const ABIS: &[Abi] = &[
    Abi {
        arch: 0xc000_00b7, // AUDIT_ARCH_AARCH64
        socket: 198,
        refused: &[425],
        alias_bit: 0,
    },
    Abi {
        arch: 0x4000_0028, // AUDIT_ARCH_ARM
        socket: 281,
        refused: &[425],
        alias_bit: 0,
    },
];

// Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// Offsets in `struct seccomp_data`: nr, arch, args[0] (low half, little endian).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0: u32 = 16;

/// Where a conditional jump goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum To {
    Next,
    Allow,
    Deny,
    FamilyCheck,
    Abi(usize),
}

enum Op {
    Load(u32),
    /// if A == k goto then else goto otherwise
    Jeq(u32, To, To),
    Ret(u32),
}

/// The filter program.
pub fn filter() -> Vec<libc::sock_filter> {
    let deny = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut ops: Vec<(Option<To>, Op)> = vec![(None, Op::Load(OFF_ARCH))];
    for (i, abi) in ABIS.iter().enumerate() {
        ops.push((None, Op::Jeq(abi.arch, To::Abi(i), To::Next)));
    }
    // Any other ABI: nothing to say.
    ops.push((None, Op::Ret(SECCOMP_RET_ALLOW)));
    for (i, abi) in ABIS.iter().enumerate() {
        ops.push((Some(To::Abi(i)), Op::Load(OFF_NR)));
        let bits: &[u32] = if abi.alias_bit == 0 {
            &[0]
        } else {
            &[0, abi.alias_bit]
        };
        for bit in bits {
            ops.push((None, Op::Jeq(abi.socket | bit, To::FamilyCheck, To::Next)));
            for nr in abi.refused {
                ops.push((None, Op::Jeq(nr | bit, To::Deny, To::Next)));
            }
        }
        ops.push((None, Op::Ret(SECCOMP_RET_ALLOW)));
    }
    ops.push((Some(To::FamilyCheck), Op::Load(OFF_ARG0)));
    for family in AGENT_SOCKET_FAMILIES {
        ops.push((None, Op::Jeq(family, To::Allow, To::Next)));
    }
    ops.push((Some(To::Deny), Op::Ret(deny)));
    ops.push((Some(To::Allow), Op::Ret(SECCOMP_RET_ALLOW)));

    let label = |to: To| -> usize {
        ops.iter()
            .position(|(l, _)| *l == Some(to))
            .expect("every jump target is labelled")
    };
    let offset = |from: usize, to: To| -> u8 {
        let target = match to {
            To::Next => from + 1,
            other => label(other),
        };
        // Classic BPF jumps are forward, relative to the next instruction, at most 255.
        u8::try_from(target - from - 1).expect("seccomp filter jump fits in a byte")
    };
    ops.iter()
        .enumerate()
        .map(|(i, (_, op))| match *op {
            Op::Load(k) => libc::sock_filter {
                code: LD_W_ABS,
                jt: 0,
                jf: 0,
                k,
            },
            Op::Jeq(k, then, otherwise) => libc::sock_filter {
                code: JEQ_K,
                jt: offset(i, then),
                jf: offset(i, otherwise),
                k,
            },
            Op::Ret(k) => libc::sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k,
            },
        })
        .collect()
}

/// Installs `program` on the calling thread. Async-signal-safe (one system call), so `run`
/// calls it between fork and exec. Needs CAP_SYS_ADMIN (`run` is root) or no_new_privs.
///
/// The filter runs before any tracepoint, so the kernel programs never see what it refuses;
/// `SECCOMP_FILTER_FLAG_LOG` has the kernel's audit log record each refusal instead.
pub fn install(program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prog points at a live filter for the duration of the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_LOG,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF seccomp filter on (arch, nr, arg0), as the kernel would.
    fn eval(prog: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            match i.code {
                LD_W_ABS => {
                    a = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0 => arg0,
                        k => panic!("load of offset {k}"),
                    };
                    pc += 1;
                }
                JEQ_K => pc += 1 + usize::from(if a == i.k { i.jt } else { i.jf }),
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn agent_families_are_the_libc_ones() {
        let libc_families = [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ];
        assert_eq!(AGENT_SOCKET_FAMILIES, libc_families.map(|f| f as u32));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn refuses_foreign_families_and_io_uring_on_every_x86_abi() {
        let p = filter();
        let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let (x64, i386, x32) = (0xc000_003e, 0x4000_0003, 0x4000_0000);
        for family in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            assert_eq!(eval(&p, x64, 41, family as u32), SECCOMP_RET_ALLOW);
            assert_eq!(eval(&p, i386, 359, family as u32), SECCOMP_RET_ALLOW);
        }
        for family in [
            libc::AF_VSOCK,
            libc::AF_PACKET,
            libc::AF_BLUETOOTH,
            21,
            30,
            43,
        ] {
            assert_eq!(eval(&p, x64, 41, family as u32), eperm, "{family}");
            assert_eq!(
                eval(&p, x64, x32 | 41, family as u32),
                eperm,
                "x32 {family}"
            );
            assert_eq!(eval(&p, i386, 359, family as u32), eperm, "i386 {family}");
        }
        assert_eq!(eval(&p, x64, 425, 0), eperm, "io_uring_setup");
        assert_eq!(eval(&p, x64, x32 | 425, 0), eperm, "x32 io_uring_setup");
        assert_eq!(eval(&p, i386, 102, 1), eperm, "socketcall");
        // Everything else passes: read, connect, exit_group, i386 write.
        for nr in [0, 42, 231] {
            assert_eq!(eval(&p, x64, nr, libc::AF_VSOCK as u32), SECCOMP_RET_ALLOW);
        }
        assert_eq!(eval(&p, i386, 4, 0), SECCOMP_RET_ALLOW);
        assert_eq!(
            eval(&p, 0x1234, 41, libc::AF_VSOCK as u32),
            SECCOMP_RET_ALLOW
        );
    }
}
