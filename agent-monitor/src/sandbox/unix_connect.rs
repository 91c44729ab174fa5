//! Judging an agent's connect to a pathname unix socket on the socket the name resolves to, not
//! on the name (docs/unix-sockets.md, "Judging the resolved socket").
//!
//! For an agent whose policy has `[unix]`, `run`'s filter sends connect() to the supervisor.
//! The supervisor takes a copy of the caller's socket (pidfd_getfd); anything but AF_UNIX, and
//! abstract names, continue to the kernel (its cgroup hooks judge them). For a pathname it
//! copies the address once, and hands the socket, the caller's root and cwd and credentials to
//! the *connector*: a process `run` forks before it is placed, so it is outside every agent and
//! the kernel's unix hook does not judge its connects by name. The connector resolves the name
//! exactly as the caller's lookup would (chroot to the caller's root, its cwd, its uids, gids
//! and groups) to an O_PATH descriptor, compares that socket's device and inode with the listed
//! sockets' (or the known daemons'), and on allow connects the caller's own socket object to
//! `/proc/self/fd/N` of that descriptor, still with the caller's ids: the name is never looked
//! up twice, so renaming or re-linking it meanwhile changes nothing. The trapped call returns
//! the connect's result; a refusal returns EPERM and is reported like the kernel hook's.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Mutex, OnceLock};

use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags, notify_id_valid};

use super::arguments::{Memory as _, ProcessMemory};
use super::unix_connector::{Job, OffList, Outcome, Reply, UnixConnector};
use super::unix_judge::{
    AgentCredentials, IdentityRule, SOCKADDR_UN_LEN, SocketIdentity, UnixAddress, display,
    parse_sockaddr_un, parse_status_credentials, sock_type_name,
};
use crate::control::{CaughtCall, CaughtReport, UnixSection};

/// The agent's `[unix]` section as `run` is told it at placement (None: no section).
pub fn unix_section(policy: Option<&crate::policy::Policy>) -> Option<UnixSection> {
    let rules = policy?.unix()?;
    Some(UnixSection {
        allow: rules
            .allow()
            .map(|r| r.iter().map(|r| r.name().to_string()).collect()),
        deny_known_daemons: rules.deny_known_daemons(),
    })
}

/// A report's socket type back to the static name reports carry.
pub fn unix_sock_type(name: &str) -> &'static str {
    match name {
        "stream" => "stream",
        "dgram" => "dgram",
        "seqpacket" => "seqpacket",
        _ => "other",
    }
}

/// The supervisor's state for an agent whose policy has `[unix]`: set once per `run`.
struct Judge {
    connector: Mutex<UnixConnector>,
    section: UnixSection,
    /// What a socket off the section gets: refused (enforce), let through and reported
    /// (alert), held for a decision (ask).
    off_list: OffList,
}

static JUDGE: OnceLock<Judge> = OnceLock::new();

/// Arms the supervisor for an agent with `section` in `mode` ("enforce", "alert" or "ask"): what a socket off its section
/// gets (refused; connected and reported `alert`; held for a decision).
pub fn arm_for_mode(connector: UnixConnector, section: UnixSection, mode: &str) {
    let off_list = match mode {
        "alert" => OffList::Report,
        "ask" => OffList::Hold,
        _ => OffList::Refuse,
    };
    let _ = JUDGE.set(Judge {
        connector: Mutex::new(connector),
        section,
        off_list,
    });
}

/// What became of a caught connect.
pub(super) enum Taken {
    /// Not a pathname unix connect (another family, an abstract or malformed name), or nothing
    /// armed: the caller answers it.
    NotOurs,
    /// Answered, and reported.
    Answered,
    /// Off the list of an ask-mode agent and not granted: the caller holds it and asks.
    Held(HeldConnect),
}

/// A held unix connect: the caller's socket and the socket its name led to (resolved once; an
/// approval connects to this descriptor), with what the request and the report say of it.
pub(super) struct HeldConnect {
    pub(super) tid: u32,
    socket: OwnedFd,
    target: OwnedFd,
    credentials: AgentCredentials,
    /// The name the caller gave (an abstract one never gets here).
    pub(super) path: String,
    /// Where it led, as the host names it.
    pub(super) resolved: Option<String>,
    pub(super) identity: SocketIdentity,
    sock_type: i32,
}

/// Runs `f` with the connector and the section, for the named datagram sends (unix_send.rs).
pub(super) fn with_judge<R>(f: impl FnOnce(&UnixConnector, &UnixSection) -> R) -> Option<R> {
    let judge = JUDGE.get()?;
    let connector = judge.connector.lock().unwrap_or_else(|p| p.into_inner());
    Some(f(&connector, &judge.section))
}

/// Whether connects are judged here (the filter then traps them).
pub fn armed() -> bool {
    JUDGE.get().is_some()
}

/// Answers caught connect `req` if it is a connect to a pathname unix socket and reports it;
/// false: not one (another family, an abstract or malformed name), the caller answers.
pub(super) fn take(
    listener: RawFd,
    req: &ScmpNotifReq,
    report: &mut impl FnMut(CaughtReport),
) -> bool {
    // Outside ask mode nothing is held; were it, with no one to ask, it is refused.
    match take_or_hold(listener, req, &|_| None, report) {
        Taken::NotOurs => false,
        Taken::Answered => true,
        Taken::Held(held) => {
            let _ = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty())
                .respond(listener);
            report(held.report(false, "held for a decision with no one to ask".into()));
            true
        }
    }
}

/// [`take`] for an agent whose off-list sockets are held (ask mode): a socket `granted` names
/// (an earlier approval of this `run`, by identity; it returns the report's reason) is
/// connected at once; another off the list comes back [`Taken::Held`], unanswered.
pub(super) fn take_or_hold(
    listener: RawFd,
    req: &ScmpNotifReq,
    granted: &dyn Fn(SocketIdentity) -> Option<String>,
    report: &mut dyn FnMut(CaughtReport),
) -> Taken {
    let Some(judge) = JUDGE.get() else {
        return Taken::NotOurs;
    };
    let tid = req.pid;
    let args = &req.data.args;
    let Some(socket) = caller_socket(tid, args[0] as u32 as i32) else {
        return Taken::NotOurs;
    };
    if sock_option(&socket, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return Taken::NotOurs;
    }
    let sock_type = sock_option(&socket, libc::SO_TYPE).unwrap_or(-1);
    let len = args[2] as u32 as usize;
    let mut bytes = [0u8; SOCKADDR_UN_LEN];
    let read = ProcessMemory { pid: tid }
        .read(args[1], &mut bytes[..len.min(SOCKADDR_UN_LEN)])
        .unwrap_or(0);
    let address = parse_sockaddr_un(&bytes[..read], len);
    let UnixAddress::Path(name) = &address else {
        return Taken::NotOurs;
    };
    let judged = |allowed: bool, why: String, resolved: Option<String>| {
        let mut c = caught(
            tid,
            CaughtCall::UnixConnect {
                path: display(&address),
                resolved,
                sock_type: sock_type_name(sock_type).to_string(),
                reason: why,
                allowed,
                send: false,
            },
        );
        c.refused = !allowed;
        c
    };
    let refuse = |listener, why: String, resolved: Option<String>, report: &mut dyn FnMut(_)| {
        let _ = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty())
            .respond(listener);
        report(judged(false, why, resolved));
    };
    let opened = (
        open_dir(&format!("/proc/{tid}/root")),
        open_dir(&format!("/proc/{tid}/cwd")),
        std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| parse_status_credentials(&s)),
    );
    // All read while the caller waits: still the same caller (no pid reuse).
    if notify_id_valid(listener, req.id).is_err() {
        return Taken::Answered;
    }
    let (Some(root), Some(cwd), Some(credentials)) = opened else {
        refuse(
            listener,
            "the caller's root, cwd or credentials could not be read, so the name could not be \
             resolved in its view"
                .into(),
            None,
            report,
        );
        return Taken::Answered;
    };
    let job = Job {
        name: name.clone(),
        credentials,
        rule: identity_rule(&judge.section),
        off_list: judge.off_list,
        connect_held: false,
        send: None,
    };
    let reply = {
        let connector = judge.connector.lock().unwrap_or_else(|p| p.into_inner());
        connector.ask_for_fds(
            &job,
            &[socket.as_raw_fd(), root.as_raw_fd(), cwd.as_raw_fd()],
        )
    };
    match reply {
        Ok((
            Reply {
                outcome: Outcome::Refused,
                resolved,
                ..
            },
            _,
        )) => refuse(listener, job.rule.refusal().into(), resolved, report),
        Ok((
            Reply {
                outcome: Outcome::Held,
                resolved,
                identity: Some(identity),
                ..
            },
            mut fds,
        )) if fds.len() == 1 => {
            let held = HeldConnect {
                tid,
                socket,
                target: fds.remove(0),
                credentials: job.credentials,
                path: display(&address),
                resolved,
                identity,
                sock_type,
            };
            match granted(identity) {
                Some(why) => release(listener, req.id, held, why, report),
                None => return Taken::Held(held),
            }
        }
        Ok((
            Reply {
                outcome: Outcome::Held,
                resolved,
                ..
            },
            _,
        )) => refuse(
            listener,
            "the connector held the call without handing back the socket: refused".into(),
            resolved,
            report,
        ),
        Ok((
            Reply {
                outcome,
                allowed,
                resolved,
                alerted,
                ..
            },
            _,
        )) => {
            respond_result(listener, req.id, &outcome);
            // Judged and allowed (a failed lookup was never judged): the JSON trail has it,
            // as it has the kernel hook's allowed connects. Off the list in alert mode:
            // reported here, once (the connector's connect runs no kernel hook).
            if allowed {
                report(judged(true, job.rule.allowance().into(), resolved));
            } else if alerted {
                let mut c = judged(
                    false,
                    format!("{} (alert mode: let through)", job.rule.refusal()),
                    resolved,
                );
                c.refused = false;
                report(c);
            }
        }
        Err(e) => refuse(
            listener,
            format!("the connector process of `run` failed ({e}): refused, not let through"),
            None,
            report,
        ),
    }
    Taken::Answered
}

/// Answers notification `id` with a connect's result: 0, or the errno.
fn respond_result(listener: RawFd, id: u64, outcome: &Outcome) {
    let resp = match outcome {
        Outcome::Failed(errno) => {
            ScmpNotifResp::new_error(id, -errno.abs(), ScmpNotifRespFlags::empty())
        }
        Outcome::Refused | Outcome::Held => {
            ScmpNotifResp::new_error(id, -libc::EPERM, ScmpNotifRespFlags::empty())
        }
        Outcome::Connected => ScmpNotifResp::new_val(id, 0, ScmpNotifRespFlags::empty()),
        // A send's byte count (a connect job never gets one).
        Outcome::Sent(n) => ScmpNotifResp::new_val(id, *n as i64, ScmpNotifRespFlags::empty()),
    };
    let _ = resp.respond(listener);
}

/// Releases held connect `held` (notification `id`) after an approval: the connector connects
/// the caller's socket to the socket the name led to when it was held (never the name again),
/// the call returns that result, and the allowed connect is reported with `why`.
pub(super) fn release(
    listener: RawFd,
    id: u64,
    held: HeldConnect,
    why: String,
    report: &mut dyn FnMut(CaughtReport),
) {
    let Some(judge) = JUDGE.get() else {
        let _ = ScmpNotifResp::new_error(id, -libc::EPERM, ScmpNotifRespFlags::empty())
            .respond(listener);
        return;
    };
    let job = Job {
        name: Vec::new(),
        credentials: held.credentials.clone(),
        rule: IdentityRule::Only(Vec::new()),
        off_list: OffList::Refuse,
        connect_held: true,
        send: None,
    };
    let reply = {
        let connector = judge.connector.lock().unwrap_or_else(|p| p.into_inner());
        connector.ask(&job, &[held.socket.as_raw_fd(), held.target.as_raw_fd()])
    };
    match reply {
        Ok(r) => {
            respond_result(listener, id, &r.outcome);
            report(held.report(true, why));
        }
        Err(e) => {
            let _ = ScmpNotifResp::new_error(id, -libc::EPERM, ScmpNotifRespFlags::empty())
                .respond(listener);
            report(held.report(
                false,
                format!("the connector process of `run` failed ({e}): refused, not let through"),
            ));
        }
    }
}

impl HeldConnect {
    /// The caught-call report of this connect: allowed (approved) or refused, with `why`.
    pub(super) fn report(&self, allowed: bool, why: String) -> CaughtReport {
        let mut c = caught(
            self.tid,
            CaughtCall::UnixConnect {
                path: self.path.clone(),
                resolved: self.resolved.clone(),
                sock_type: sock_type_name(self.sock_type).to_string(),
                reason: why,
                allowed,
                send: false,
            },
        );
        c.refused = !allowed;
        c
    }

    pub(super) fn sock_type(&self) -> &'static str {
        sock_type_name(self.sock_type)
    }
}

/// The identities the section's names have now, in the host's view (re-read at every connect:
/// a restarted server's new socket is the listed one at once).
pub(super) fn identity_rule(section: &UnixSection) -> IdentityRule {
    match &section.allow {
        // A listed name whose last component is a symlink names no socket: else whoever may
        // write its directory chooses where the listed name leads.
        Some(names) => IdentityRule::Only(
            names
                .iter()
                .filter(|n| n.starts_with('/'))
                .filter_map(|n| identity_of(n, false))
                .collect(),
        ),
        None => {
            let mut ids: Vec<SocketIdentity> = Vec::new();
            if section.deny_known_daemons {
                for n in crate::policy::unix::KNOWN_DAEMONS {
                    if let Some(id) = identity_of(n, true)
                        && !ids.contains(&id)
                    {
                        ids.push(id);
                    }
                }
            }
            IdentityRule::AllBut(ids)
        }
    }
}

/// The socket at `path`, following a last symlink only if `follow`.
fn identity_of(path: &str, follow: bool) -> Option<SocketIdentity> {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .ok()?;
    use std::os::unix::fs::FileTypeExt as _;
    meta.file_type().is_socket().then(|| SocketIdentity {
        device: meta.dev(),
        inode: meta.ino(),
    })
}

/// A caught-call report about thread `tid`, with what /proc says of it now.
pub(super) fn caught(tid: u32, call: CaughtCall) -> CaughtReport {
    CaughtReport {
        pid: tid,
        call,
        refused: true,
        comm: std::fs::read_to_string(format!("/proc/{tid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "?".into()),
        exe: std::fs::read_link(format!("/proc/{tid}/exe"))
            .ok()
            .map(|p| p.display().to_string()),
        uid: std::fs::metadata(format!("/proc/{tid}")).map_or(u32::MAX, |m| m.uid()),
    }
}

pub(super) fn open_dir(path: &str) -> Option<OwnedFd> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: open of a NUL-terminated path; the fd is owned at once.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: as above.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_open(2) flag for a thread (Linux 6.9): the fd table of the very thread that called.
const PIDFD_THREAD: libc::c_int = libc::O_EXCL;

/// A copy of fd `fd` of thread `tid` (the same open socket object).
pub(super) fn caller_socket(tid: u32, fd: i32) -> Option<OwnedFd> {
    let raw = |r: libc::c_long| (r >= 0).then_some(r as libc::c_int);
    // SAFETY: plain system calls on integers; the fds returned are owned at once.
    unsafe {
        let pidfd = raw(libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD))
            .or_else(|| raw(libc::syscall(libc::SYS_pidfd_open, tid, 0)))
            .map(|f| OwnedFd::from_raw_fd(f))?;
        raw(libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd,
            0,
        ))
        .map(|f| OwnedFd::from_raw_fd(f))
    }
}

pub(super) fn sock_option(sock: &OwnedFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into v.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}
