//! Facts about the host the daemon needs before loading anything: where cgroup v2, tracefs and bpffs
//! are mounted (mounting the last two if absent), tracepoint record layouts, and which LSMs run.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses /proc/self/mountinfo (see proc(5)): fields, then " - ", then fstype.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fs_type = right.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fs_type: fs_type.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Read by hand, not through `procfs`: its mountinfo keeps the kernel's `\040` escapes in mount
/// points, which `unescape_octal` undoes (a cgroup2 mount point with a space must still be found).
fn mounts() -> anyhow::Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let all = mounts()?;
    // Prefer the canonical location when several cgroup2 mounts exist.
    let mut found: Vec<_> = all.into_iter().filter(|m| m.fs_type == "cgroup2").collect();
    found.sort_by_key(|m| m.mount_point.as_os_str().len());
    match found.into_iter().next() {
        Some(m) => Ok(m.mount_point),
        None => bail!(
            "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); agent-monitor \
             needs cgroup v2 for agent identity: mount it with `mount -t cgroup2 none /sys/fs/cgroup`"
        ),
    }
}

/// Mounts `fs_type` at `target` unless something of that type is already mounted there.
fn ensure_mounted(fs_type: &str, target: &str) -> anyhow::Result<bool> {
    let here = mounts()?
        .iter()
        .any(|m| m.fs_type == fs_type && m.mount_point == Path::new(target));
    if here {
        return Ok(false);
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("static string without NUL");
    let (src, tgt, ty) = (c(fs_type), c(target), c(fs_type));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting {fs_type} at {target}"));
    }
    Ok(true)
}

/// tracefs holds the tracepoint ids aya attaches to; bpffs holds the pinned programs and maps
/// (the host's instance at /sys/fs/bpf: a pin in another instance would not outlive it).
pub fn ensure_kernel_filesystems() -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    if ensure_mounted("tracefs", "/sys/kernel/tracing")? {
        did.push("mounted tracefs at /sys/kernel/tracing".to_string());
    }
    if ensure_mounted("bpf", "/sys/fs/bpf")? {
        did.push("mounted bpffs at /sys/fs/bpf".to_string());
    }
    Ok(did)
}

/// Offset of `field` in a tracepoint `format` file, or `None` if it has no such field.
pub fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // Arrays are declared `char comm[16]`: the name is before the bracket.
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        let off = rest.trim().strip_prefix("offset:")?;
        off.split(';').next()?.trim().parse().ok()
    })
}

fn tracepoint_format(category: &str, name: &str) -> anyhow::Result<String> {
    let p = format!("/sys/kernel/tracing/events/{category}/{name}/format");
    std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))
}

/// Record offsets the kernel programs rely on, checked against this kernel's tracefs.
pub struct TracepointLayout {
    pub fork_child_pid: u32,
}

/// `kernel.pid_max`: the most thread ids the kernel hands out at once.
pub fn pid_max() -> Option<u32> {
    procfs::sys::kernel::pid_max()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

pub fn tracepoint_layout() -> anyhow::Result<TracepointLayout> {
    let fixed: [(&str, &str, &[(&str, usize)]); 2] = [
        (
            "syscalls",
            "sys_enter_socket",
            &[("family", 16), ("type", 24), ("protocol", 32)],
        ),
        ("task", "task_newtask", &[("pid", 8), ("clone_flags", 32)]),
    ];
    for (category, event, fields) in fixed {
        let format = tracepoint_format(category, event)?;
        for &(field, want) in fields {
            let got = field_offset(&format, field);
            if got != Some(want) {
                bail!(
                    "{category}/{event} has {field} at {got:?}, the programs expect {want}; \
                     this kernel's layout is not supported"
                );
            }
        }
    }
    let fork = tracepoint_format("sched", "sched_process_fork")?;
    let child = field_offset(&fork, "child_pid")
        .context("sched/sched_process_fork has no child_pid field")?;
    Ok(TracepointLayout {
        fork_child_pid: u32::try_from(child).context("child_pid offset")?,
    })
}

/// Where the exec program finds the file that runs and the task's user namespace on this
/// kernel: member offsets from its BTF, and the initial user namespace's number.
pub fn kernel_offsets() -> anyhow::Result<agent_monitor_common::KernelOffsets> {
    use std::os::unix::fs::MetadataExt as _;
    let btf = crate::btf::Btf::from_sys_fs()
        .context("the exec program needs the kernel's BTF to find the file that runs")?;
    let off = |s: &str, m: &str| btf.member_offset(s, m);
    let init_ns = std::fs::metadata("/proc/self/ns/user")
        .context("reading the daemon's user namespace (/proc/self/ns/user)")?
        .ino();
    Ok(agent_monitor_common::KernelOffsets {
        bprm_file: off("linux_binprm", "file")?,
        bprm_filename: off("linux_binprm", "filename")?,
        bprm_interp: off("linux_binprm", "interp")?,
        file_inode: off("file", "f_inode")?,
        inode_ino: off("inode", "i_ino")?,
        inode_sb: off("inode", "i_sb")?,
        sb_dev: off("super_block", "s_dev")?,
        task_cred: off("task_struct", "cred")?,
        cred_user_ns: off("cred", "user_ns")?,
        user_ns_inum: off("user_namespace", "ns")? + off("ns_common", "inum")?,
        init_user_ns: u32::try_from(init_ns).context("user namespace number")?,
        valid: 1,
    })
}

/// The host's LSM setup in words, to explain why the kernel refused a BPF LSM program.
pub fn lsm_context() -> String {
    let _ = ensure_mounted("securityfs", "/sys/kernel/security");
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    let lsms = read("/sys/kernel/security/lsm");
    let lockdown = read("/sys/kernel/security/lockdown");
    let bpf_listed = lsms.split(',').any(|l| l.trim() == "bpf");
    format!(
        "active LSMs: {lsms}{}; lockdown: {lockdown}",
        if bpf_listed {
            ""
        } else {
            " (no bpf: boot with lsm=...,bpf)"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
40 33 0:35 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
41 33 0:36 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
50 25 0:40 / /sys/my\\040dir rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let m = parse_mountinfo(MOUNTINFO);
        let c2: Vec<_> = m.iter().filter(|m| m.fs_type == "cgroup2").collect();
        assert_eq!(c2.len(), 1);
        assert_eq!(c2[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unescapes_mount_points() {
        let m = parse_mountinfo(MOUNTINFO);
        assert!(m.iter().any(|m| m.mount_point == Path::new("/sys/my dir")));
    }

    #[test]
    fn reads_field_offsets_from_format() {
        let fmt = "name: sched_process_fork\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
            \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(fmt, "child_pid"), Some(20));
        assert_eq!(field_offset(fmt, "parent_comm"), Some(8));
        assert_eq!(field_offset(fmt, "nope"), None);
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(old, "child_pid"), Some(44));
        assert_eq!(field_offset(old, "child_comm"), Some(28));
    }
}
