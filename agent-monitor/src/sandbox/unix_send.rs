//! Judging an agent's datagram send that names a pathname unix socket (`sendto`, `sendmsg`) on
//! the socket the name resolves to, and making the send for it (docs/unix-sockets.md, "Named
//! datagram sends").
//!
//! For an agent whose policy has `[unix]`, `run`'s filter sends `sendto()` with an address and
//! every `sendmsg()`/`sendmmsg()` to the supervisor (their msghdr is out of a filter's reach).
//! A send that names no address, a socket that is not a unix datagram socket, and an abstract
//! or malformed name continue at once (the kernel and its cgroup hook judge them). For a
//! pathname, the supervisor copies the message once (msghdr, iovecs, control data; bounded and
//! checked as the kernel checks them, unix_message.rs), takes the caller's socket and the
//! descriptors it passes (pidfd_getfd), and hands everything to the connector
//! (unix_connector.rs), which resolves the name in the caller's view exactly as for a connect,
//! judges the socket by device and inode, and on allow sends the copied datagram on the
//! caller's own socket to `/proc/self/fd/N` of the resolved descriptor, with the caller's ids.
//! The trapped call returns the byte count or the errno; a refusal returns EPERM and is
//! reported like a refused connect (`ACTION=sendmsg`).

use std::io::{Seek as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpFilterContext, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags,
    ScmpSyscall, notify_id_valid, scmp_cmp,
};
use serde::{Deserialize, Serialize};

use super::arguments::{Memory as _, ProcessMemory, Width, mmsghdr_names};
use super::unix_connect::{
    caller_socket, caught, identity_rule, open_dir, sock_option, with_judge,
};
use super::unix_connector::{Job, Outcome, Reply};
use super::unix_judge::{
    AgentCredentials, SOCKADDR_UN_LEN, UnixAddress, display, parse_sockaddr_un,
    parse_status_credentials,
};
use super::unix_message::{
    Control, MessageError, PASSED_FDS_MAX, PAYLOAD_MAX, Segment, payload_len, read_control,
    read_header, read_iovecs, read_payload,
};
use crate::control::{CaughtCall, CaughtReport};

/// How long a blocking send waits for room at the receiver before it fails with EAGAIN (the
/// connector serves one job at a time: the agent's other connects and sends wait this long at
/// most behind a full receiver).
pub const BLOCKING_SEND_BOUND: Duration = Duration::from_secs(2);

/// The filter rules of an agent whose policy has `[unix]`: sendto with an address (arg 4),
/// every sendmsg but the handshake's (`handshake`: the child's end of the listener socket,
/// whose send happens before anyone listens) and every sendmmsg.
pub(super) fn add_send_rules(
    ctx: &mut ScmpFilterContext,
    handshake: u64,
) -> Result<(), libseccomp::error::SeccompError> {
    let notify = ScmpAction::Notify;
    ctx.add_rule_conditional(
        notify,
        ScmpSyscall::from_name("sendto")?,
        &[scmp_cmp!(
            $arg4 != 0
        )],
    )?;
    ctx.add_rule_conditional(
        notify,
        ScmpSyscall::from_name("sendmsg")?,
        &[scmp_cmp!(
            $arg0 != handshake
        )],
    )?;
    ctx.add_rule(notify, ScmpSyscall::from_name("sendmmsg")?)?;
    Ok(())
}

/// What the connector is asked beside the name: the send to make on allow. Descriptors after
/// the caller's socket, root and cwd: a memfd with the payload, then the descriptors to pass.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SendJob {
    /// The caller's flags (MSG_DONTWAIT…); MSG_NOSIGNAL is added.
    pub(super) flags: i32,
    /// Longer than the socket's SO_SNDBUF − 32: EMSGSIZE once judged, as the kernel answers.
    pub(super) oversize: bool,
}

/// A trapped send, as read from its registers.
struct Send {
    fd: i32,
    flags: i32,
    name: u64,
    namelen: u32,
    body: Body,
}

enum Body {
    /// sendto: one buffer.
    Buffer(Segment),
    /// sendmsg: the msghdr read once.
    Message(super::unix_message::Header),
}

/// Answers trapped send `req` if it names a pathname unix socket on a datagram socket, and
/// reports; false: not one (no address, another family or socket type, an abstract or
/// malformed name, or the supervisor is not armed), the caller lets it continue.
pub(super) fn take(
    listener: RawFd,
    req: &ScmpNotifReq,
    report: &mut impl FnMut(CaughtReport),
) -> bool {
    if !super::unix_connect::armed() {
        return false;
    }
    let width = if req.data.arch == ScmpArch::native() {
        Width::Native
    } else {
        Width::Compat
    };
    let arg = |i: usize| match width {
        Width::Native => req.data.args[i],
        Width::Compat => req.data.args[i] & 0xffff_ffff,
    };
    let mem = ProcessMemory { pid: req.pid };
    let name = req
        .data
        .syscall
        .get_name_by_arch(req.data.arch)
        .unwrap_or_default();
    let send = match name.as_str() {
        "sendto" => Send {
            fd: arg(0) as u32 as i32,
            flags: arg(3) as u32 as i32,
            name: arg(4),
            namelen: arg(5) as u32,
            body: Body::Buffer(Segment {
                base: arg(1),
                len: arg(2),
            }),
        },
        "sendmsg" => match read_header(&mem, arg(1), width) {
            Ok(h) if h.names_an_address() => Send {
                fd: arg(0) as u32 as i32,
                flags: arg(2) as u32 as i32,
                name: h.name,
                namelen: h.namelen,
                body: Body::Message(h),
            },
            // No address (the common case: a connected or stream socket), or a header the
            // kernel cannot read either (EFAULT).
            _ => return false,
        },
        "sendmmsg" => return take_mmsg(listener, req, width, report),
        _ => return false,
    };
    let Some(path) = pathname(&mem, send.name, send.namelen) else {
        return false;
    };
    let Some(socket) = unix_dgram_socket(req.pid, send.fd) else {
        return false;
    };
    judge_send(listener, req, width, &send, path, socket, report);
    true
}

/// The pathname `name` (of `namelen` bytes) names, None for anything else.
fn pathname(mem: &ProcessMemory, name: u64, namelen: u32) -> Option<Vec<u8>> {
    let len = namelen as usize;
    let mut bytes = [0u8; SOCKADDR_UN_LEN];
    let read = mem
        .read(name, &mut bytes[..len.min(SOCKADDR_UN_LEN)])
        .unwrap_or(0);
    match parse_sockaddr_un(&bytes[..read], len) {
        UnixAddress::Path(p) => Some(p),
        _ => None,
    }
}

/// A copy of the caller's fd `fd` if it is a unix datagram socket (a stream socket fails a named
/// send itself, a seqpacket socket ignores the name: no hook runs for either).
fn unix_dgram_socket(tid: u32, fd: i32) -> Option<OwnedFd> {
    let socket = caller_socket(tid, fd)?;
    (sock_option(&socket, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sock_option(&socket, libc::SO_TYPE) == Some(libc::SOCK_DGRAM))
    .then_some(socket)
}

/// sendmmsg naming a pathname on a unix datagram socket: not supported (refused, reported);
/// any other sendmmsg continues.
fn take_mmsg(
    listener: RawFd,
    req: &ScmpNotifReq,
    width: Width,
    report: &mut impl FnMut(CaughtReport),
) -> bool {
    let mem = ProcessMemory { pid: req.pid };
    let args = &req.data.args;
    let Ok(names) = mmsghdr_names(&mem, args[1], args[2] as u32, width) else {
        return false;
    };
    let Some(path) = names
        .iter()
        .filter(|(name, len)| *name != 0 && *len != 0)
        .find_map(|&(name, len)| pathname(&mem, name, len))
    else {
        return false;
    };
    if unix_dgram_socket(req.pid, args[0] as u32 as i32).is_none() {
        return false;
    }
    refuse(
        listener,
        req,
        &UnixAddress::Path(path),
        "sendmmsg naming a pathname unix socket is not supported for an agent whose policy has \
         [unix] (send each datagram with sendmsg or sendto): refused, not let through"
            .into(),
        None,
        report,
    );
    true
}

/// Reports a named send of `tid` to `address`.
fn reported(
    tid: u32,
    address: &UnixAddress,
    allowed: bool,
    reason: String,
    resolved: Option<String>,
) -> CaughtReport {
    let mut c = caught(
        tid,
        CaughtCall::UnixConnect {
            path: display(address),
            resolved,
            sock_type: "dgram".into(),
            reason,
            allowed,
            send: true,
        },
    );
    c.refused = !allowed;
    c
}

fn refuse(
    listener: RawFd,
    req: &ScmpNotifReq,
    address: &UnixAddress,
    why: String,
    resolved: Option<String>,
    report: &mut impl FnMut(CaughtReport),
) {
    answer(listener, req, Err(libc::EPERM));
    report(reported(req.pid, address, false, why, resolved));
}

/// Returns `result` (a byte count or an errno) from the trapped call.
fn answer(listener: RawFd, req: &ScmpNotifReq, result: Result<i64, i32>) {
    let resp = match result {
        Ok(n) => ScmpNotifResp::new_val(req.id, n, ScmpNotifRespFlags::empty()),
        Err(errno) => ScmpNotifResp::new_error(req.id, -errno.abs(), ScmpNotifRespFlags::empty()),
    };
    let _ = resp.respond(listener);
}

/// The caller's root, cwd and ids, read while it waits.
struct CallerView {
    root: OwnedFd,
    cwd: OwnedFd,
    credentials: AgentCredentials,
}

fn caller_view(tid: u32) -> Option<CallerView> {
    Some(CallerView {
        root: open_dir(&format!("/proc/{tid}/root"))?,
        cwd: open_dir(&format!("/proc/{tid}/cwd"))?,
        credentials: std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| parse_status_credentials(&s))?,
    })
}

fn judge_send(
    listener: RawFd,
    req: &ScmpNotifReq,
    width: Width,
    send: &Send,
    path: Vec<u8>,
    socket: OwnedFd,
    report: &mut impl FnMut(CaughtReport),
) {
    let tid = req.pid;
    let mem = ProcessMemory { pid: tid };
    let address = UnixAddress::Path(path.clone());
    let read = match &send.body {
        Body::Buffer(seg) => Ok((vec![*seg], Control::default())),
        Body::Message(h) => {
            read_iovecs(&mem, h, width).and_then(|s| read_control(&mem, h, width).map(|c| (s, c)))
        }
    };
    let (segments, control) = match read {
        Ok(r) => r,
        Err(e) => return fail(listener, req, &address, e, report),
    };
    let total = payload_len(&segments);
    let sndbuf = sock_option(&socket, libc::SO_SNDBUF).unwrap_or(0).max(0) as u64;
    let oversize = total > sndbuf.saturating_sub(32);
    if !oversize && total > PAYLOAD_MAX {
        let e = MessageError::Unsupported(format!(
            "a datagram of {total} bytes, more than the {PAYLOAD_MAX} the supervisor copies"
        ));
        fail(listener, req, &address, e, report);
        return;
    }
    if control.fds.len() > PASSED_FDS_MAX {
        let e = MessageError::Unsupported(format!(
            "{} descriptors in SCM_RIGHTS, more than the {PASSED_FDS_MAX} the supervisor passes on",
            control.fds.len()
        ));
        fail(listener, req, &address, e, report);
        return;
    }
    let mut passed = Vec::with_capacity(control.fds.len());
    for &fd in &control.fds {
        match caller_socket(tid, fd) {
            Some(f) => passed.push(f),
            None => return answer(listener, req, Err(libc::EBADF)),
        }
    }
    let payload = if oversize {
        Ok(Vec::new())
    } else {
        read_payload(&mem, &segments)
    };
    let payload = match payload
        .map_err(|e| (e.errno(), e.to_string()))
        .and_then(|p| {
            payload_file(&p).map_err(|e| (libc::EPERM, format!("the payload's memfd: {e}")))
        }) {
        Ok(f) => f,
        Err((libc::EPERM, why)) => {
            return refuse(listener, req, &address, why, None, report);
        }
        Err((errno, _)) => return answer(listener, req, Err(errno)),
    };
    let view = caller_view(tid);
    // All read while the caller waits: still the same caller (no pid reuse).
    if notify_id_valid(listener, req.id).is_err() {
        return;
    }
    let Some(view) = view else {
        let why = "the caller's root, cwd or credentials could not be read, so the name could \
                   not be resolved in its view";
        return refuse(listener, req, &address, why.into(), None, report);
    };
    let mut fds = vec![
        socket.as_raw_fd(),
        view.root.as_raw_fd(),
        view.cwd.as_raw_fd(),
        payload.as_raw_fd(),
    ];
    fds.extend(passed.iter().map(|f| f.as_raw_fd()));
    let asked = with_judge(|connector, section| {
        let job = Job {
            name: path,
            credentials: view.credentials.clone(),
            rule: identity_rule(section),
            // A named send off the list is refused in ask mode too: a datagram is not held.
            off_list: super::unix_connector::OffList::Refuse,
            connect_held: false,
            send: Some(SendJob {
                flags: send.flags,
                oversize,
            }),
        };
        (connector.ask(&job, &fds), job.rule)
    });
    let Some((reply, rule)) = asked else {
        return answer(listener, req, Err(libc::EPERM));
    };
    match reply {
        // Held: never asked of a send (its job says refuse), refused all the same.
        Ok(Reply {
            outcome: Outcome::Refused | Outcome::Held,
            resolved,
            ..
        }) => refuse(
            listener,
            req,
            &address,
            rule.refusal().into(),
            resolved,
            report,
        ),
        Ok(Reply {
            outcome,
            allowed,
            resolved,
            ..
        }) => {
            answer(
                listener,
                req,
                match outcome {
                    Outcome::Sent(n) => Ok(n as i64),
                    Outcome::Failed(errno) => Err(errno),
                    Outcome::Connected | Outcome::Refused | Outcome::Held => Ok(0),
                },
            );
            if allowed {
                report(reported(
                    tid,
                    &address,
                    true,
                    rule.allowance().into(),
                    resolved,
                ));
            }
        }
        Err(e) => refuse(
            listener,
            req,
            &address,
            format!("the connector process of `run` failed ({e}): refused, not let through"),
            None,
            report,
        ),
    }
}

/// Answers a message the kernel would fail with its errno, or refuses and reports what is not
/// supported.
fn fail(
    listener: RawFd,
    req: &ScmpNotifReq,
    address: &UnixAddress,
    e: MessageError,
    report: &mut impl FnMut(CaughtReport),
) {
    if e.reported() {
        refuse(listener, req, address, e.to_string(), None, report);
    } else {
        answer(listener, req, Err(e.errno()));
    }
}

/// The payload in a memfd, for the connector (any size, one descriptor).
fn payload_file(payload: &[u8]) -> std::io::Result<std::fs::File> {
    // SAFETY: plain memfd_create with a static name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c"agent-monitor-datagram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(payload)?;
    file.rewind()?;
    Ok(file)
}

/// The uid and gid the receiver is told (SCM_CREDENTIALS, read by a receiver with SO_PASSCRED
/// such as journald): the caller's real ids, as its own send would carry, where the kernel lets
/// the connector (real and saved ids root, effective ids the caller's) name them; else the
/// caller's effective ids, which the caller could name itself. Never root for a caller that is
/// not: without them the kernel would attach the connector's real ids, root.
pub fn passed_ids(c: &AgentCredentials) -> (u32, u32) {
    let pick = |ids: [u32; 4]| {
        if ids[0] == ids[1] || ids[0] == 0 {
            ids[0]
        } else {
            ids[1]
        }
    };
    (pick(c.uids), pick(c.gids))
}

/// In the connector, with the caller's ids: sends the payload of `extra[0]` with the
/// descriptors `extra[1..]` on the caller's socket `sock` to the socket at `link`
/// (`/proc/self/fd/N`), with SCM_CREDENTIALS naming this process and [`passed_ids`]. A blocking
/// send waits at most [`BLOCKING_SEND_BOUND`] for room, then fails with EAGAIN.
pub(super) fn send_in_connector(
    sock: &OwnedFd,
    link: &str,
    job: &SendJob,
    credentials: &AgentCredentials,
    extra: &[OwnedFd],
) -> std::io::Result<usize> {
    let errno = std::io::Error::from_raw_os_error;
    if job.oversize {
        return Err(errno(libc::EMSGSIZE));
    }
    let Some((payload, passed)) = extra.split_first() else {
        return Err(errno(libc::EPERM));
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(payload.try_clone()?), &mut bytes)?;
    let (uid, gid) = passed_ids(credentials);
    let ucred = libc::ucred {
        pid: std::process::id() as libc::pid_t,
        uid,
        gid,
    };
    let fds: Vec<RawFd> = passed.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: sockaddr_un is plain data; zero is its empty value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(link.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + link.len() + 1) as libc::socklen_t;
    // SAFETY: fcntl on our copy of the caller's socket (the same open file: its O_NONBLOCK).
    let nonblocking =
        unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let blocking = !nonblocking && job.flags & libc::MSG_DONTWAIT == 0;
    let flags = job.flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match send_once(sock, &addr, addr_len, &bytes, &fds, &ucred, flags) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if blocking
                    && e.raw_os_error() == Some(libc::EAGAIN)
                    && started.elapsed() < BLOCKING_SEND_BOUND =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Room for SCM_RIGHTS with every passed descriptor and one SCM_CREDENTIALS, in u64 words.
const CONTROL_WORDS: usize = (16 + 4 * super::unix_message::SCM_MAX_FD + 8) / 8 + 6;

fn send_once(
    sock: &OwnedFd,
    addr: &libc::sockaddr_un,
    addr_len: libc::socklen_t,
    bytes: &[u8],
    fds: &[RawFd],
    ucred: &libc::ucred,
    flags: i32,
) -> std::io::Result<usize> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (addr as *const libc::sockaddr_un).cast_mut().cast();
    msg.msg_namelen = addr_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let rights = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
    let creds = std::mem::size_of::<libc::ucred>() as u32;
    // SAFETY: CMSG macros over our control buffer, sized for SCM_MAX_FD descriptors and one
    // ucred (CONTROL_WORDS); fds.len() <= PASSED_FDS_MAX.
    unsafe {
        let space = if fds.is_empty() {
            0
        } else {
            libc::CMSG_SPACE(rights)
        } + libc::CMSG_SPACE(creds);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as usize;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !fds.is_empty() {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(rights) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_CREDENTIALS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(creds) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::ucred>(), *ucred);
    }
    // SAFETY: msg points at live buffers for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(uids: [u32; 4], gids: [u32; 4]) -> AgentCredentials {
        AgentCredentials {
            uids,
            gids,
            groups: vec![],
        }
    }

    #[test]
    fn the_receiver_is_told_the_callers_ids_never_roots_for_another_caller() {
        assert_eq!(passed_ids(&creds([1000; 4], [100; 4])), (1000, 100));
        assert_eq!(passed_ids(&creds([0; 4], [0; 4])), (0, 0));
        // A set-uid program: real 1000, effective 1001; the connector may name only 0 or
        // 1001, and 0 would be a lie: the effective id, which the caller could name itself.
        assert_eq!(
            passed_ids(&creds([1000, 1001, 1001, 1001], [100, 101, 101, 101])),
            (1001, 101)
        );
        // A set-uid-root program run by 1000: its effective id is root.
        assert_eq!(passed_ids(&creds([1000, 0, 0, 0], [100; 4])), (0, 100));
    }

    #[test]
    fn the_control_buffer_holds_every_descriptor_and_the_credentials() {
        // SAFETY: CMSG_SPACE is arithmetic.
        let need = unsafe {
            libc::CMSG_SPACE((4 * super::super::unix_message::SCM_MAX_FD) as u32)
                + libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
        } as usize;
        assert!(need <= CONTROL_WORDS * 8, "{need} > {}", CONTROL_WORDS * 8);
    }
}
