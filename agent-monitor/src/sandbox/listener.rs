//! Putting the filter in place in the child and handing its notification listener to `run`.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::SandboxError;

/// Installs `program` on the calling thread with a new listener and sends the listener over
/// `to_parent` (SCM_RIGHTS), then closes it here: the agent never holds it. Async-signal-safe
/// (three system calls), so `run` calls it between fork and exec. Needs CAP_SYS_ADMIN (`run` is
/// root) or no_new_privs.
pub fn install(program: &[libc::sock_filter], to_parent: RawFd) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prog points at a live filter for the duration of the call; the kernel copies it.
    let listener = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if listener < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let listener = listener as RawFd;
    let sent = send_fd(to_parent, listener);
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(listener) };
    sent
}

/// A message of one data byte with room for one fd: the handshake's whole protocol. On the
/// stack, no allocation (the child sends between fork and exec). u64 words keep the control
/// buffer aligned for cmsghdr.
struct OneFdMessage {
    byte: [u8; 1],
    control: [u64; 4],
}

impl OneFdMessage {
    fn new() -> OneFdMessage {
        OneFdMessage {
            byte: [0],
            control: [0; 4],
        }
    }

    /// Runs `f` on a msghdr over our buffers, with `control_len` bytes of control room.
    fn with_header<R>(&mut self, control_len: usize, f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
        let mut iov = libc::iovec {
            iov_base: self.byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr is plain data; all-zero is its empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = control_len.min(std::mem::size_of_val(&self.control));
        f(&mut msg)
    }
}

/// One fd over a unix socket (sendmsg with SCM_RIGHTS).
fn send_fd(sock: RawFd, fd: RawFd) -> std::io::Result<()> {
    // SAFETY: CMSG_SPACE/LEN of one int; constant arithmetic.
    let (space, len) = unsafe {
        let n = std::mem::size_of::<RawFd>() as u32;
        (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
    };
    OneFdMessage::new().with_header(space, |msg| {
        // SAFETY: the first cmsghdr and its data lie inside the control buffer (space bytes).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            if libc::sendmsg(sock, msg, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// The listener the child sent with [`install`]; call after the child exec'd.
pub fn receive_listener(sock: &UnixStream) -> Result<OwnedFd, SandboxError> {
    OneFdMessage::new().with_header(usize::MAX, |msg| {
        // SAFETY: the kernel fills at most msg_controllen bytes of our buffers; the cmsghdr is
        // checked before its data is read.
        unsafe {
            let n = libc::recvmsg(sock.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                return Err(SandboxError::Handshake(std::io::Error::last_os_error()));
            }
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if n != 1
                || cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return Err(SandboxError::Handshake(std::io::Error::other(
                    "expected one byte carrying one fd (SCM_RIGHTS)",
                )));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            Ok(OwnedFd::from_raw_fd(fd))
        }
    })
}
