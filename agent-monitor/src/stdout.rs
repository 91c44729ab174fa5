//! The CLI's answers on standard output. A reader that goes away (`status | head -1`) ends the
//! program the way it ends other Unix tools: quietly, by SIGPIPE (status 141 in a shell); any
//! other write error is reported on stderr. `println!` would panic (exit 101) instead, because
//! Rust ignores SIGPIPE and `println!` panics on EPIPE. The CLI modules import these macros under
//! std's names (`use crate::stdout::outln as println;`), so every answer, also one added later,
//! goes through them.

use std::io::{self, Write as _};

/// Writes `args` to stdout; ends the process on failure (see the module docs).
pub fn write(args: std::fmt::Arguments<'_>) {
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        failed(&e);
    }
}

/// Ends the process after a failed write to stdout.
pub fn failed(e: &io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        die_of_sigpipe();
    }
    // stderr may be gone as well: nothing more to do then.
    let _ = writeln!(
        io::stderr(),
        "agent-monitor: writing to standard output: {e}"
    );
    std::process::exit(1)
}

/// Dies of SIGPIPE, as a tool that never ignored it would have: the parent sees the conventional
/// "killed by SIGPIPE" status, not a failure of ours.
fn die_of_sigpipe() -> ! {
    // SAFETY: restoring a signal's default disposition and raising it touch no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(128 + libc::SIGPIPE)
}

/// `println!` that survives a closed pipe (see the module docs).
macro_rules! outln {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that survives a closed pipe (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

pub(crate) use {out, outln};
