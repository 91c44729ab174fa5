//! What a command started by `run` keeps of root's privileges, and the confinement that keeps a
//! root agent's uid 0 from leaving or undoing its agent (or anyone else's).
//!
//! A root agent (`run` without `--user`) keeps uid 0, so root's ordinary power over files, but
//! loses every capability that reaches past them: the bounding, permitted, effective, inheritable
//! and ambient sets hold only [`KEPT_BY_ROOT_AGENTS`]. The securebits are locked so that no exec
//! gives any back: SECBIT_NOROOT (an exec as uid 0, or of a setuid-root file, grants nothing),
//! SECBIT_NO_SETUID_FIXUP locked *off* (a switch to another uid still clears the capabilities),
//! SECBIT_NO_CAP_AMBIENT_RAISE locked on. SECBIT_KEEP_CAPS stays free: setpriv(1) and su-like
//! tools set it to switch uid and then drop capabilities themselves; it can only keep the kept
//! set, and only until the next exec (a switch away from uid 0 always clears the ambient set).
//! Because SECBIT_NOROOT makes an exec as root grant nothing, the kept capabilities travel
//! across exec in the ambient set (raised once, here, before the lock). `no_new_privs` is set as
//! well: setuid and file capabilities are ignored by every exec.
//!
//! uid 0 without capabilities still owns every root-owned file, and some kernel interfaces check
//! only that. Closed here for root agents:
//! - a Landlock filesystem ruleset refuses every write (write, truncate, create, remove, rename,
//!   link) beneath /proc (sysctls such as kernel.core_pattern, whose handler runs a program as full
//!   root outside the agent; sysrq-trigger), /sys (cgroup.procs of other cgroups, which cgroup v2
//!   grants to the owner of the common ancestor's file; bpffs pins) and /dev (block devices),
//!   except the terminal and null-like devices and /dev/pts, /dev/shm, /dev/mqueue. Writes beneath
//!   every other top-level directory stay allowed. A Landlock filesystem domain also refuses
//!   mount(2) altogether.
//! - clone3(2) fails with ENOSYS (seccomp, see [`add_seccomp_rules`]): CLONE_INTO_CGROUP is judged
//!   by the inode permission of the target's cgroup.procs inside the kernel, not through an open,
//!   so Landlock never sees it; glibc and the container runtimes fall back to clone(2) on ENOSYS.
//! - bpf(2) is refused and reported (seccomp user notification, answered by `run`): BPF_OBJ_GET
//!   checks only the file permission of a pinned map, so a capless uid 0 could open the daemon's
//!   maps and rewrite its own allowlist. Without CAP_BPF no program can be loaded either.
//! - the daemon's own files (its policy directory, its control socket and grant state file, or
//!   their directory when it is the daemon's own, its JSON trail and executable: the daemon names
//!   them in its placement answer, see [`daemon_files`]) are bound read-only onto themselves in a
//!   mount namespace of the agent's own. Landlock cannot say "everywhere beneath /etc but
//!   /etc/agent-monitor" (its rules only allow), and refusing writes to every directory on the way
//!   would refuse ordinary root work (ldconfig replacing /etc/ld.so.cache). Mounts propagate from
//!   the host into that namespace (slave), not back; the agent can neither mount nor unmount.
//!
//! A `--user` agent keeps nothing: its bounding and inheritable sets are cleared while `run` is
//! still root, then the switch to the user clears the rest; `no_new_privs` keeps setuid programs
//! (sudo, su) from bringing root back. `run --keep-capabilities` keeps today's full root, and says
//! so loudly (stderr, and a journald notice from the daemon).
//!
//! Everything that allocates or opens files (the ruleset) is prepared before the fork; what runs
//! between fork and exec ([`Confinement::apply`]) is plain system calls on prepared values.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use capctl::prctl::Secbits;
use capctl::{Cap, CapSet, CapState};

use crate::control::Privileges;

/// Capabilities a root agent keeps: root's ordinary power over files and over its own identity,
/// which root workloads (package installs, builds, servers) expect, and which reach nothing
/// outside the filesystem (whose sensitive parts the Landlock ruleset shields).
///
/// Dropped, with the reason: SYS_ADMIN (mount, namespaces' setup, most of the kernel), NET_ADMIN,
/// NET_RAW (raw and packet sockets, SO_MARK, SO_BINDTODEVICE, IP_TRANSPARENT: they bend the
/// network path around the hooks), NET_BROADCAST, SYS_PTRACE, BPF, PERFMON, SYS_MODULE,
/// SYS_RAWIO, MKNOD (block devices), SYS_BOOT, MAC_ADMIN/MAC_OVERRIDE, AUDIT_CONTROL/READ/WRITE
/// (audit records could be forged), SYSLOG, SETPCAP, SETFCAP, LINUX_IMMUTABLE, SYS_TIME,
/// WAKE_ALARM, CHECKPOINT_RESTORE, SYS_PACCT, SYS_TTY_CONFIG, LEASE, BLOCK_SUSPEND; also
/// DAC_READ_SEARCH (open_by_handle_at opens files without a path: around path-based rules),
/// KILL (signals to other users' processes, other agents' included), SYS_NICE and SYS_RESOURCE
/// (starving or outgrowing the host: realtime priorities, raised hard limits), IPC_OWNER (other
/// users' System V IPC) and IPC_LOCK (locking unlimited memory).
pub const KEPT_BY_ROOT_AGENTS: [Cap; 8] = [
    Cap::CHOWN,
    Cap::DAC_OVERRIDE,
    Cap::FOWNER,
    Cap::FSETID,
    // Dropping to another user (su, setpriv, servers): the kernel clears the capabilities then.
    Cap::SETUID,
    Cap::SETGID,
    Cap::NET_BIND_SERVICE,
    // Build tools (debootstrap, pbuilder): chroot changes no identity, and nothing setuid works.
    Cap::SYS_CHROOT,
];

/// Entries of /dev a root agent may still open for writing: the terminal, the null-like devices
/// and the directories of terminals, shared memory and message queues.
const DEV_CHAR_DEVICES: [&str; 7] = ["null", "zero", "full", "random", "urandom", "tty", "ptmx"];
const DEV_DIRECTORIES: [&str; 3] = ["pts", "shm", "mqueue"];

/// Top-level directories a root agent may not write beneath.
const NO_WRITES_BENEATH: [&str; 3] = ["proc", "sys", "dev"];

/// Why `run` could not prepare the agent's confinement.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "the Landlock filesystem ruleset for a root agent ({0}); run the agent with --user, or \
         with --keep-capabilities to run it with every capability of root"
    )]
    Landlock(String),
    #[error("reading {path}: {source}")]
    Listing {
        path: String,
        source: std::io::Error,
    },
}

/// What the command keeps, prepared before the fork.
pub struct Confinement {
    kind: Kind,
    /// The Landlock ruleset of a root agent (close-on-exec; the agent never holds it).
    ruleset: Option<OwnedFd>,
    /// The daemon's files a root agent sees read-only (see [`Confinement::protect`]).
    read_only: Vec<std::ffi::CString>,
}

enum Kind {
    /// uid 0: keeps `kept`, in every set.
    Root { kept: CapSet },
    /// Another uid: keeps nothing. `clear_bounding`: `run` may clear the bounding set
    /// (CAP_SETPCAP); a `run` that is not root has nothing to give away.
    User { uid: u32, clear_bounding: bool },
    /// `--keep-capabilities`: as `run` had it.
    KeepAll { uid: u32 },
}

impl Confinement {
    /// The confinement of a command that will run as `uid`.
    pub fn prepare(uid: u32, keep_all: bool) -> Result<Confinement, PrivilegeError> {
        if keep_all {
            return Ok(Confinement {
                kind: Kind::KeepAll { uid },
                ruleset: None,
                read_only: Vec::new(),
            });
        }
        if uid != 0 {
            let clear_bounding = CapState::get_current()
                .map(|s| s.effective.has(Cap::SETPCAP))
                .unwrap_or(false);
            return Ok(Confinement {
                kind: Kind::User {
                    uid,
                    clear_bounding,
                },
                ruleset: None,
                read_only: Vec::new(),
            });
        }
        let root = list_entries(Path::new("/"))?;
        let dev = list_entries(Path::new("/dev"))?;
        Ok(Confinement {
            kind: Kind::Root {
                kept: kept_by_root_agents(),
            },
            ruleset: Some(landlock_ruleset(&writable_beneath(&root, &dev))?),
            read_only: Vec::new(),
        })
    }

    /// The daemon's files (from its placement answer) a root agent gets to see read-only. Paths
    /// that do not exist (any more) or do not fit in a C string are left out, and said.
    pub fn protect(&mut self, paths: &[String]) {
        if !self.confines_root() {
            return;
        }
        for p in paths {
            match std::ffi::CString::new(p.as_str()) {
                Ok(c) if Path::new(p).exists() => self.read_only.push(c),
                _ => eprintln!(
                    "agent-monitor run: the daemon's file {p:?} is not there: not protected"
                ),
            }
        }
    }

    /// The root agent's rules go into `run`'s seccomp filter (clone3, bpf).
    pub fn confines_root(&self) -> bool {
        matches!(self.kind, Kind::Root { .. })
    }

    /// `--keep-capabilities`.
    pub fn keeps_all(&self) -> bool {
        matches!(self.kind, Kind::KeepAll { .. })
    }

    /// What the command gets, for the daemon (`status`) and for our own messages.
    pub fn report(&self) -> Privileges {
        match &self.kind {
            Kind::Root { kept } => Privileges {
                uid: 0,
                capabilities: cap_names(*kept),
                no_new_privs: true,
                landlock_fs: true,
                kept_all: false,
            },
            Kind::User { uid, .. } => Privileges {
                uid: *uid,
                capabilities: Vec::new(),
                no_new_privs: true,
                landlock_fs: false,
                kept_all: false,
            },
            Kind::KeepAll { uid } => Privileges {
                uid: *uid,
                capabilities: if *uid == 0 {
                    vec!["all".to_string()]
                } else {
                    Vec::new()
                },
                no_new_privs: false,
                landlock_fs: false,
                kept_all: true,
            },
        }
    }

    /// In the child, between fork and exec, after the seccomp filter: gives up what the command
    /// may not keep; `become_user` switches to `--user` (it needs CAP_SETUID/SETGID, so it runs
    /// after the bounding set is cleared but before anything else is lost). Plain system calls
    /// on prepared values only.
    pub fn apply(&self, become_user: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        match &self.kind {
            Kind::KeepAll { .. } => become_user(),
            Kind::User { clear_bounding, .. } => {
                if *clear_bounding {
                    drop_bounding_except(CapSet::empty())?;
                    lock_securebits()?;
                }
                let mut state = CapState::get_current().map_err(os)?;
                state.inheritable = CapSet::empty();
                state.set_current().map_err(os)?;
                capctl::ambient::clear().map_err(os)?;
                capctl::prctl::set_no_new_privs().map_err(os)?;
                become_user()
            }
            Kind::Root { kept } => {
                let kept = *kept;
                // While still root: the mounts need CAP_SYS_ADMIN.
                if !self.read_only.is_empty() {
                    read_only_in_own_namespace(&self.read_only)?;
                }
                drop_bounding_except(kept)?;
                // CAP_SETPCAP stays effective until the securebits are locked.
                let mut setpcap = kept;
                setpcap.add(Cap::SETPCAP);
                CapState {
                    effective: setpcap,
                    permitted: setpcap,
                    inheritable: kept,
                }
                .set_current()
                .map_err(os)?;
                // SECBIT_NOROOT makes an exec as root grant nothing: the kept capabilities
                // cross exec in the ambient set (needs them permitted and inheritable).
                for cap in kept.iter() {
                    capctl::ambient::raise(cap).map_err(os)?;
                }
                lock_securebits()?;
                CapState {
                    effective: kept,
                    permitted: kept,
                    inheritable: kept,
                }
                .set_current()
                .map_err(os)?;
                capctl::prctl::set_no_new_privs().map_err(os)?;
                if let Some(fd) = &self.ruleset {
                    // SAFETY: landlock_restrict_self(2) on a ruleset fd we hold; no pointers.
                    let rc = unsafe {
                        libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32)
                    };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                become_user()
            }
        }
    }
}

/// A mount namespace of the calling process's own, with each of `paths` bound read-only onto
/// itself (recursively). Host mounts keep propagating in (slave), ours never out.
fn read_only_in_own_namespace(paths: &[std::ffi::CString]) -> std::io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: unshare(2), mount(2) and mount_setattr(2) with NUL-terminated paths prepared
    // before the fork and a mount_attr on the stack; no allocation.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS) as libc::c_long)?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ) as libc::c_long)?;
        for p in paths {
            check(libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) as libc::c_long)?;
            let mut attr: libc::mount_attr = std::mem::zeroed();
            attr.attr_set = libc::MOUNT_ATTR_RDONLY;
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                p.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            ))?;
        }
    }
    Ok(())
}

/// The daemon's files a root agent must not change, for the placement answer: the policy
/// directory; the directories of the control socket and of the grant state file when they are
/// the daemon's own (named `agent-monitor…`, as `/run/agent-monitor`), else those files
/// themselves (a file bound over a path holds that inode: after a daemon restart the agent sees
/// the old socket, and reaches the daemon no more from inside); the JSON trail; the daemon's
/// executable. Only paths that exist; a path beneath another listed directory is covered by it.
pub fn daemon_files(
    policies: &Path,
    control_socket: &Path,
    state_file: &Path,
    json_log: Option<&Path>,
    exe: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Vec<PathBuf> {
    let own_dir = |file: &Path| -> Option<PathBuf> {
        let dir = file.parent()?;
        let name = dir.file_name()?.to_str()?;
        name.starts_with("agent-monitor").then(|| dir.to_path_buf())
    };
    let mut wanted: Vec<PathBuf> = vec![policies.to_path_buf()];
    for file in [control_socket, state_file] {
        wanted.push(own_dir(file).unwrap_or_else(|| file.to_path_buf()));
    }
    // The trail's own directory covers its rotated files (audit.jsonl.1, …) too.
    wanted.extend(json_log.map(|f| own_dir(f).unwrap_or_else(|| f.to_path_buf())));
    wanted.extend(exe.map(Path::to_path_buf));
    let mut wanted: Vec<PathBuf> = wanted.into_iter().filter(|p| exists(p)).collect();
    wanted.sort();
    wanted.dedup();
    let mut out: Vec<PathBuf> = Vec::new();
    for p in wanted {
        if !out.iter().any(|d| p.starts_with(d)) {
            out.push(p);
        }
    }
    out
}

fn os(e: capctl::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.code())
}

/// Drops every capability but `kept` from the bounding set (needs CAP_SETPCAP). Capabilities
/// this kernel does not have (EINVAL) are not there to drop.
fn drop_bounding_except(kept: CapSet) -> std::io::Result<()> {
    for cap in Cap::iter() {
        if kept.has(cap) {
            continue;
        }
        match capctl::bounding::drop(cap) {
            Ok(()) => {}
            Err(e) if e.code() == libc::EINVAL => {}
            Err(e) => return Err(os(e)),
        }
    }
    // Capabilities newer than capctl knows.
    capctl::bounding::clear_unknown().map_err(os)
}

/// The securebits of every confined agent, each locked (needs CAP_SETPCAP).
fn lock_securebits() -> std::io::Result<()> {
    capctl::prctl::set_securebits(agent_securebits()).map_err(os)
}

/// NOROOT on: an exec as uid 0 or of a setuid-root file grants no capabilities. NO_SETUID_FIXUP
/// locked *off*: switching to another uid clears the capabilities, as it should.
/// NO_CAP_AMBIENT_RAISE on: nothing joins the ambient set later. KEEP_CAPS is left unlocked (see
/// the module doc): `setpriv --reuid` needs it, and it keeps nothing across exec.
pub fn agent_securebits() -> Secbits {
    Secbits::NOROOT
        | Secbits::NOROOT_LOCKED
        | Secbits::NO_SETUID_FIXUP_LOCKED
        | Secbits::NO_CAP_AMBIENT_RAISE
        | Secbits::NO_CAP_AMBIENT_RAISE_LOCKED
}

pub fn kept_by_root_agents() -> CapSet {
    let mut set = CapSet::empty();
    set.add_all(KEPT_BY_ROOT_AGENTS);
    set
}

/// Lower-case names (`cap_chown`), as getpcaps(8) and capsh(1) print them, in number order.
pub fn cap_names(set: CapSet) -> Vec<String> {
    set.iter()
        .map(|c| c.to_string().to_ascii_lowercase())
        .collect()
}

/// The bitmask /proc/PID/status shows for `set` (CapEff, CapBnd…).
#[cfg(test)]
pub fn cap_mask(set: CapSet) -> u64 {
    set.iter().fold(0u64, |m, c| m | 1u64 << (c as u8))
}

/// What a directory entry is, as far as the write rules care (symlinks are not followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    CharDevice,
    Other,
}

/// What a rule allows beneath its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WriteRights {
    /// Every handled right: write, truncate, create, remove, rename, link.
    Beneath,
    /// Writing and truncating this file only.
    File,
}

/// The write rules of a root agent, from the entries of `/` and of `/dev` (name, kind): every
/// real directory at the top but /proc, /sys and /dev; in /dev only the allowlisted character
/// devices and directories. Symlinks get no rule of their own: their targets lie beneath some
/// top-level directory and are judged there (a symlink to /proc must not open /proc).
/// Non-directories at the top (a swap file) get none: nothing needs to write them.
pub fn writable_beneath(
    root: &[(String, EntryKind)],
    dev: &[(String, EntryKind)],
) -> Vec<(PathBuf, WriteRights)> {
    let mut rules: Vec<(PathBuf, WriteRights)> = root
        .iter()
        .filter(|(name, kind)| {
            *kind == EntryKind::Directory && !NO_WRITES_BENEATH.contains(&name.as_str())
        })
        .map(|(name, _)| (Path::new("/").join(name), WriteRights::Beneath))
        .collect();
    for (name, kind) in dev {
        let rights = match kind {
            EntryKind::CharDevice if DEV_CHAR_DEVICES.contains(&name.as_str()) => WriteRights::File,
            EntryKind::Directory if DEV_DIRECTORIES.contains(&name.as_str()) => {
                WriteRights::Beneath
            }
            _ => continue,
        };
        rules.push((Path::new("/dev").join(name), rights));
    }
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    rules
}

/// The entries of directory `dir`, symlinks not followed.
fn list_entries(dir: &Path) -> Result<Vec<(String, EntryKind)>, PrivilegeError> {
    use std::os::unix::fs::FileTypeExt as _;
    let err = |source| PrivilegeError::Listing {
        path: dir.display().to_string(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let kind = match entry.file_type().map_err(err)? {
            t if t.is_dir() => EntryKind::Directory,
            t if t.is_char_device() => EntryKind::CharDevice,
            _ => EntryKind::Other,
        };
        // Names that are not UTF-8 get no rule (nothing of ours lives there).
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, kind));
        }
    }
    Ok(out)
}

/// The Landlock ruleset (an fd, close-on-exec): writes handled, `rules` allowed. Required in
/// full (ABI 3: write, remove, create, rename across directories, truncate): a kernel without
/// Landlock cannot confine a root agent, and `run` says so rather than run it half-confined.
fn landlock_ruleset(rules: &[(PathBuf, WriteRights)]) -> Result<OwnedFd, PrivilegeError> {
    use landlock::{
        ABI, AccessFs, CompatLevel, Compatible as _, PathBeneath, PathFd, Ruleset,
        RulesetAttr as _, RulesetCreatedAttr as _,
    };
    let fail =
        |what: &str, e: &dyn std::fmt::Display| PrivilegeError::Landlock(format!("{what}: {e}"));
    let handled = AccessFs::from_write(ABI::V3);
    let file_rights = AccessFs::WriteFile | AccessFs::Truncate;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(handled)
        .map_err(|e| fail("handling the write rights", &e))?
        .create()
        .map_err(|e| fail("creating the ruleset", &e))?;
    for (path, rights) in rules {
        let fd = match PathFd::new(path) {
            Ok(fd) => fd,
            // Gone since it was listed: nothing to allow.
            Err(_) if !path.exists() => continue,
            Err(e) => return Err(fail(&format!("opening {}", path.display()), &e)),
        };
        let access = match rights {
            WriteRights::Beneath => handled,
            WriteRights::File => file_rights,
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| fail(&format!("allowing writes beneath {}", path.display()), &e))?;
    }
    Option::<OwnedFd>::from(ruleset)
        .ok_or_else(|| PrivilegeError::Landlock("this kernel has no Landlock".into()))
}

/// The root agent's lines of `run`'s seccomp filter: clone3 fails with ENOSYS (callers fall back
/// to clone(2), which cannot name a cgroup), bpf goes to the listener (refused and reported, see
/// `sandbox::decide`).
pub fn add_seccomp_rules(
    ctx: &mut libseccomp::ScmpFilterContext,
) -> Result<(), libseccomp::error::SeccompError> {
    use libseccomp::{ScmpAction, ScmpSyscall};
    ctx.add_rule(
        ScmpAction::Errno(libc::ENOSYS),
        ScmpSyscall::from_name("clone3")?,
    )?;
    ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from_name("bpf")?)?;
    Ok(())
}

/// One line for `status` and `run`'s messages: what the agent's processes hold.
pub fn describe(p: &Privileges) -> String {
    if p.kept_all {
        return format!(
            "uid {}, kept all capabilities (--keep-capabilities): NOT confined against uid 0's power",
            p.uid
        );
    }
    let caps = if p.capabilities.is_empty() {
        "none".to_string()
    } else {
        p.capabilities.join(",")
    };
    let mut s = format!("uid {}, capabilities {caps}", p.uid);
    if p.no_new_privs {
        s.push_str(", no_new_privs");
    }
    if p.landlock_fs {
        s.push_str(", landlock fs (no writes beneath /proc, /sys, /dev)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(n: &str) -> (String, EntryKind) {
        (n.to_string(), EntryKind::Directory)
    }

    #[test]
    fn root_agents_keep_file_power_and_nothing_that_reaches_further() {
        let names = cap_names(kept_by_root_agents());
        assert_eq!(
            names,
            [
                "cap_chown",
                "cap_dac_override",
                "cap_fowner",
                "cap_fsetid",
                "cap_setgid",
                "cap_setuid",
                "cap_net_bind_service",
                "cap_sys_chroot"
            ]
        );
        let kept = kept_by_root_agents();
        for dropped in [
            Cap::SYS_ADMIN,
            Cap::NET_ADMIN,
            Cap::NET_RAW,
            Cap::SYS_PTRACE,
            Cap::BPF,
            Cap::PERFMON,
            Cap::SYS_MODULE,
            Cap::SYS_RAWIO,
            Cap::MKNOD,
            Cap::SYS_BOOT,
            Cap::MAC_ADMIN,
            Cap::MAC_OVERRIDE,
            Cap::AUDIT_CONTROL,
            Cap::AUDIT_READ,
            Cap::AUDIT_WRITE,
            Cap::SYSLOG,
            Cap::SETPCAP,
            Cap::SETFCAP,
            Cap::LINUX_IMMUTABLE,
            Cap::SYS_TIME,
            Cap::CHECKPOINT_RESTORE,
            Cap::DAC_READ_SEARCH,
            Cap::KILL,
            Cap::SYS_NICE,
            Cap::SYS_RESOURCE,
            Cap::IPC_OWNER,
        ] {
            assert!(!kept.has(dropped), "{dropped} must be dropped");
        }
    }

    /// The mask /proc/self/status shows (CapEff) for the kept set.
    #[test]
    fn kept_mask_matches_the_kernel_numbering() {
        // chown 0, dac_override 1, fowner 3, fsetid 4, setgid 6, setuid 7, net_bind_service 10,
        // sys_chroot 18.
        assert_eq!(cap_mask(kept_by_root_agents()), 0x4_04db);
    }

    #[test]
    fn securebits_lock_noroot_on_and_setuid_fixup_off() {
        let b = agent_securebits();
        assert!(b.contains(Secbits::NOROOT | Secbits::NOROOT_LOCKED));
        assert!(!b.contains(Secbits::NO_SETUID_FIXUP));
        assert!(b.contains(Secbits::NO_SETUID_FIXUP_LOCKED));
        assert!(!b.contains(Secbits::KEEP_CAPS) && !b.contains(Secbits::KEEP_CAPS_LOCKED));
        assert!(b.contains(Secbits::NO_CAP_AMBIENT_RAISE | Secbits::NO_CAP_AMBIENT_RAISE_LOCKED));
    }

    #[test]
    fn writes_stay_allowed_beneath_every_top_level_directory_but_proc_sys_dev() {
        let root = [
            dir("etc"),
            dir("proc"),
            dir("sys"),
            dir("dev"),
            dir("tmp"),
            ("bin".to_string(), EntryKind::Other), // symlink to usr/bin
            ("swapfile".to_string(), EntryKind::Other),
            dir("usr"),
        ];
        let rules = writable_beneath(&root, &[]);
        let paths: Vec<&str> = rules.iter().map(|(p, _)| p.to_str().unwrap()).collect();
        assert_eq!(paths, ["/etc", "/tmp", "/usr"]);
        assert!(rules.iter().all(|(_, r)| *r == WriteRights::Beneath));
    }

    #[test]
    fn in_dev_only_terminals_and_null_like_devices_are_writable() {
        let c = |n: &str| (n.to_string(), EntryKind::CharDevice);
        let dev = [
            c("null"),
            c("zero"),
            c("tty"),
            c("ptmx"),
            c("kmsg"),
            c("mem"),
            ("sda".to_string(), EntryKind::Other), // block device
            ("loop0".to_string(), EntryKind::Other),
            dir("pts"),
            dir("shm"),
            dir("mapper"),
            dir("net"),
            // A symlink named like an allowed directory gets no rule.
            ("mqueue".to_string(), EntryKind::Other),
        ];
        let rules = writable_beneath(&[], &dev);
        assert_eq!(
            rules,
            [
                ("/dev/null".into(), WriteRights::File),
                ("/dev/ptmx".into(), WriteRights::File),
                ("/dev/pts".into(), WriteRights::Beneath),
                ("/dev/shm".into(), WriteRights::Beneath),
                ("/dev/tty".into(), WriteRights::File),
                ("/dev/zero".into(), WriteRights::File),
            ]
        );
    }

    #[test]
    fn daemon_files_are_its_own_directories_or_else_the_files() {
        let all = |_: &Path| true;
        let files = daemon_files(
            Path::new("/etc/agent-monitor/policies"),
            Path::new("/run/agent-monitor/control.sock"),
            Path::new("/run/agent-monitor/grants.json"),
            Some(Path::new("/var/log/agent-monitor.jsonl")),
            Some(Path::new("/usr/local/bin/agent-monitor")),
            all,
        );
        assert_eq!(
            files,
            [
                PathBuf::from("/etc/agent-monitor/policies"),
                "/run/agent-monitor".into(),
                "/usr/local/bin/agent-monitor".into(),
                "/var/log/agent-monitor.jsonl".into(),
            ]
        );
        // In a shared directory only the files; what does not exist is left out.
        let files = daemon_files(
            Path::new("/srv/x/policies"),
            Path::new("/run/am.sock"),
            Path::new("/run/grants.json"),
            None,
            None,
            |p: &Path| p != Path::new("/run/grants.json"),
        );
        assert_eq!(
            files,
            [PathBuf::from("/run/am.sock"), "/srv/x/policies".into()]
        );
        // Beneath a listed directory: covered by it.
        let files = daemon_files(
            Path::new("/run/agent-monitor/policies"),
            Path::new("/run/agent-monitor/control.sock"),
            Path::new("/run/agent-monitor/grants.json"),
            None,
            None,
            all,
        );
        assert_eq!(files, [PathBuf::from("/run/agent-monitor")]);
    }

    #[test]
    fn reports_say_what_was_kept() {
        let root = Confinement {
            kind: Kind::Root {
                kept: kept_by_root_agents(),
            },
            ruleset: None,
            read_only: Vec::new(),
        }
        .report();
        assert_eq!(root.uid, 0);
        assert!(root.no_new_privs && root.landlock_fs && !root.kept_all);
        assert!(root.capabilities.contains(&"cap_chown".to_string()));
        let d = describe(&root);
        assert!(d.starts_with("uid 0, capabilities cap_chown,"), "{d}");
        assert!(
            d.contains("no_new_privs") && d.contains("landlock fs"),
            "{d}"
        );

        let user = Confinement {
            kind: Kind::User {
                uid: 65534,
                clear_bounding: true,
            },
            ruleset: None,
            read_only: Vec::new(),
        }
        .report();
        assert_eq!(
            describe(&user),
            "uid 65534, capabilities none, no_new_privs"
        );

        let all = Confinement {
            kind: Kind::KeepAll { uid: 0 },
            ruleset: None,
            read_only: Vec::new(),
        }
        .report();
        assert!(all.kept_all && !all.no_new_privs);
        assert!(describe(&all).contains("--keep-capabilities"));
    }
}
