//! `OPEN_FLAGS`: what the opener asked for. fanotify does not say (the event's file descriptor is
//! the guard's own, read-only), so the guard reads the opener's system call from
//! /proc/TID/syscall while the opener waits for the answer: `open`, `openat` and `creat` carry
//! their flags in a register; `openat2` in a `struct open_how` the guard reads from the opener's
//! memory. Other routes (io_uring, exec, an open the kernel makes for the process) are named
//! instead of guessed.

/// System call numbers of this architecture.
#[cfg(target_arch = "x86_64")]
mod nr {
    pub const OPEN: Option<u64> = Some(2);
    pub const CREAT: Option<u64> = Some(85);
    pub const OPENAT: u64 = 257;
    pub const OPENAT2: u64 = 437;
    pub const IO_URING_ENTER: u64 = 426;
    pub const EXECVE: u64 = 59;
    pub const EXECVEAT: u64 = 322;
}
#[cfg(not(target_arch = "x86_64"))]
mod nr {
    // The generic table (aarch64, riscv64): no open or creat.
    pub const OPEN: Option<u64> = None;
    pub const CREAT: Option<u64> = None;
    pub const OPENAT: u64 = 56;
    pub const OPENAT2: u64 = 437;
    pub const IO_URING_ENTER: u64 = 426;
    pub const EXECVE: u64 = 221;
    pub const EXECVEAT: u64 = 281;
}

/// The open flags of the call described by the text of /proc/TID/syscall (`NR ARG1 … SP PC`),
/// reading an `openat2` argument through `read_u64(address)`.
pub fn open_flags(syscall: &str, read_u64: impl FnOnce(u64) -> Option<u64>) -> String {
    let mut words = syscall.split_whitespace();
    let Some(first) = words.next() else {
        return "unknown (no system call)".into();
    };
    let Ok(nr) = first.parse::<u64>() else {
        // "running" (or "-1 …": not in a system call).
        return format!("unknown ({first})");
    };
    let args: Vec<u64> = words
        .take(6)
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    let arg = |i: usize| args.get(i).copied();
    let flags = if Some(nr) == nr::OPEN {
        arg(1)
    } else if nr == nr::OPENAT {
        arg(2)
    } else if Some(nr) == nr::CREAT {
        Some((libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u64)
    } else if nr == nr::OPENAT2 {
        match arg(2).and_then(read_u64) {
            Some(f) => Some(f),
            None => return "unknown (openat2, its open_how unreadable)".into(),
        }
    } else if nr == nr::IO_URING_ENTER {
        return "unknown (io_uring)".into();
    } else if nr == nr::EXECVE || nr == nr::EXECVEAT {
        return "exec".into();
    } else {
        return format!("unknown (system call {nr})");
    };
    match flags {
        Some(f) => describe(f),
        None => "unknown (unreadable arguments)".into(),
    }
}

/// `O_RDONLY|O_CLOEXEC`, the access mode first, then the other flags by name, then what is left
/// in hex.
pub fn describe(flags: u64) -> String {
    let f = flags as i32;
    let mut parts = vec![
        match f & libc::O_ACCMODE {
            libc::O_RDONLY => "O_RDONLY",
            libc::O_WRONLY => "O_WRONLY",
            libc::O_RDWR => "O_RDWR",
            _ => "O_ACCMODE",
        }
        .to_string(),
    ];
    let mut rest = flags & !(libc::O_ACCMODE as u64);
    // O_TMPFILE contains O_DIRECTORY and O_SYNC contains O_DSYNC: the larger ones first.
    for (bit, name) in [
        (libc::O_TMPFILE, "O_TMPFILE"),
        (libc::O_SYNC, "O_SYNC"),
        (libc::O_PATH, "O_PATH"),
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_NOCTTY, "O_NOCTTY"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_NONBLOCK, "O_NONBLOCK"),
        (libc::O_DSYNC, "O_DSYNC"),
        (libc::O_DIRECT, "O_DIRECT"),
        (libc::O_LARGEFILE, "O_LARGEFILE"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
        (libc::O_NOFOLLOW, "O_NOFOLLOW"),
        (libc::O_NOATIME, "O_NOATIME"),
        (libc::O_CLOEXEC, "O_CLOEXEC"),
    ] {
        let bit = bit as u64;
        if bit != 0 && rest & bit == bit {
            parts.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    parts.join("|")
}

/// The flags of thread `tid`'s open in progress (the thread waits for the guard's answer, so its
/// system call and arguments are still there to read).
pub fn of_thread(tid: u32) -> String {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{tid}/syscall")) else {
        return "unknown (/proc/TID/syscall unreadable)".into();
    };
    open_flags(&text, |address| read_remote_u64(tid, address))
}

/// Eight bytes at `address` in thread `tid`'s process (`open_how.flags` is the first field).
fn read_remote_u64(tid: u32, address: u64) -> Option<u64> {
    let mut value = 0u64;
    let local = libc::iovec {
        iov_base: (&mut value as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: address as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: one local iovec pointing at `value` (8 bytes), one remote iovec; the kernel checks
    // the remote address.
    let n = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
    (n == 8).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_by_name_access_mode_first() {
        assert_eq!(describe(0), "O_RDONLY");
        assert_eq!(
            describe((libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64),
            "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC"
        );
        assert_eq!(
            describe(libc::O_RDWR as u64 | 0x4000_0000),
            "O_RDWR|0x40000000"
        );
        assert_eq!(describe(libc::O_TMPFILE as u64 | 2), "O_RDWR|O_TMPFILE");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn flags_come_from_the_system_call_in_progress() {
        let none = |_| panic!("no memory read");
        // openat(AT_FDCWD, path, O_RDONLY|O_CLOEXEC)
        let openat = "257 0xffffff9c 0x7ffd1234 0x80000 0x0 0x0 0x0 0x7ffd0000 0x7f000000";
        assert_eq!(open_flags(openat, none), "O_RDONLY|O_CLOEXEC");
        assert_eq!(
            open_flags("2 0x7ffd1234 0x241 0x1b6 0x0 0x0 0x0 0x1 0x2", none),
            "O_WRONLY|O_CREAT|O_TRUNC"
        );
        assert_eq!(
            open_flags("85 0x7ffd1234 0x1a4 0 0 0 0 0x1 0x2", none),
            "O_WRONLY|O_CREAT|O_TRUNC"
        );
        let openat2 = "437 0xffffff9c 0x7ffd1234 0x7ffd5678 0x18 0x0 0x0 0x1 0x2";
        assert_eq!(
            open_flags(openat2, |a| (a == 0x7ffd5678).then_some(0o2)),
            "O_RDWR"
        );
        assert_eq!(
            open_flags(openat2, |_| None),
            "unknown (openat2, its open_how unreadable)"
        );
        assert_eq!(
            open_flags("426 0x3 0x1 0x1 0x1 0 0 0x1 0x2", none),
            "unknown (io_uring)"
        );
        assert_eq!(open_flags("59 0x1 0x2 0x3 0 0 0 0x1 0x2", none), "exec");
        assert_eq!(open_flags("running", none), "unknown (running)");
        assert_eq!(open_flags("", none), "unknown (no system call)");
        assert_eq!(
            open_flags("0 0x3 0x1 0x1 0 0 0 0x1 0x2", none),
            "unknown (system call 0)"
        );
    }
}
