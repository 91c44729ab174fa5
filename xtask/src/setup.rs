//! `cargo xtask setup`: bring a fresh Debian 12 machine to what building and testing need, doing
//! nothing for pieces already present (see ../../shared/TOOLCHAIN.md for why these versions).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run_cmd;

/// bpf-linker 0.10 uses the nightly toolchain's own LLVM; newer releases want a system LLVM that
/// Debian 12 lacks.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages the tests and tasks use: journald and journalctl (systemd), curl, python3,
/// ip/ss (iproute2), ps/pkill (procps), coreutils, and dnsmasq as the DNS tests' upstream
/// (`dnsmasq-base`: the binary without the system service, which would take port 53).
const PACKAGES: &[&str] = &[
    "systemd",
    "curl",
    "python3",
    "iproute2",
    "procps",
    "coreutils",
    "dnsmasq-base",
    // The bypass tests compile small C attackers (a sockaddr race, io_uring) and use
    // setpriv/unshare to act as an unprivileged agent.
    "gcc",
    "libc6-dev",
    "util-linux",
    // `run`'s seccomp filter is built with libseccomp (linked at build time).
    "libseccomp-dev",
    // The systemd test's journal upload runs over HTTPS with a test CA made by openssl.
    "openssl",
    // tests/console.rs drives `agent-monitor top` in a terminal (send-keys, capture-pane).
    "tmux",
    // ssh-agent and ssh-add: the unix-socket tests keep an agent away from a real SSH agent.
    "openssh-client",
];

/// (mount point, filesystem type) that the eBPF loader and pinning need.
const MOUNTS: &[(&str, &str)] = &[("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")];

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    for (target, fstype) in MOUNTS {
        mount(target, fstype)?;
    }
    Ok(())
}

fn step(name: &str, outcome: &str) {
    println!("setup: {name}: {outcome}");
}

/// `rust-src` for nightly: the eBPF build compiles `core` with `-Z build-std`.
fn rust_src() -> Result<()> {
    const NAME: &str = "nightly rust-src";
    let listed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (is it installed and on PATH?)")?;
    if listed.status.success() {
        if has_rust_src(&String::from_utf8_lossy(&listed.stdout)) {
            step(NAME, "ok");
            return Ok(());
        }
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        step(NAME, "added rust-src to the nightly toolchain");
    } else {
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        step(NAME, "installed the nightly toolchain with rust-src");
    }
    Ok(())
}

fn has_rust_src(installed: &str) -> bool {
    installed
        .lines()
        .any(|l| l.split_whitespace().next() == Some("rust-src"))
}

fn bpf_linker() -> Result<()> {
    let name = format!("bpf-linker {BPF_LINKER_VERSION}");
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        step(&name, "ok");
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_cmd(Command::new(cargo).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]))?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            let was = found.map_or("absent".to_string(), |v| format!("was {v}"));
            step(&name, &format!("installed ({was})"));
            Ok(())
        }
        other => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but the bpf-linker on PATH reports {}; \
             put ~/.cargo/bin first on PATH or remove the other one",
            other.as_deref().unwrap_or("nothing")
        ),
    }
}

/// The version `bpf-linker --version` reports, if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_bpf_linker_version(&String::from_utf8_lossy(&out.stdout))
}

/// `bpf-linker 0.10.0` → `0.10.0`.
fn parse_bpf_linker_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    (words.next()? == "bpf-linker").then_some(())?;
    words.next().map(str::to_string)
}

fn packages() -> Result<()> {
    install_packages(PACKAGES).map(drop)
}

/// Installs those of `packages` that are missing; returns the ones it installed.
pub fn install_packages<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    let name = format!("packages ({})", packages.join(" "));
    let mut missing = Vec::new();
    for pkg in packages {
        if !package_installed(pkg)? {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        step(&name, "ok");
        return Ok(missing);
    }
    require_root(&format!("install {}", missing.join(" ")))?;
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    step(&name, &format!("installed {}", missing.join(" ")));
    Ok(missing)
}

fn package_installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query: setup supports Debian-based systems only")?;
    // Exit status 1 means "not known to dpkg", i.e. not installed.
    Ok(out.status.success() && dpkg_status_installed(&String::from_utf8_lossy(&out.stdout)))
}

/// `${Status}` is "want flag status", e.g. "install ok installed" or "deinstall ok config-files".
fn dpkg_status_installed(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

fn mount(target: &str, fstype: &str) -> Result<()> {
    let name = format!("{fstype} at {target}");
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if is_mounted(&mounts, target, fstype) {
        step(&name, "ok");
        return Ok(());
    }
    require_root(&format!("mount {fstype} at {target}"))?;
    if !Path::new(target).is_dir() {
        bail!("cannot mount {fstype}: {target} does not exist (kernel without {fstype}?)");
    }
    run_cmd(Command::new("mount").args(["-t", fstype, fstype, target]))?;
    step(&name, "mounted");
    Ok(())
}

/// Whether /proc/self/mounts text has `fstype` mounted at `target`.
fn is_mounted(mounts: &str, target: &str, fstype: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(target) && fields.next() == Some(fstype)
    })
}

/// Fails with a message naming `what` unless we run as root.
pub fn require_root(what: &str) -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    match effective_uid(&status) {
        Some(0) => Ok(()),
        Some(uid) => {
            bail!("need root to {what} (running as uid {uid}); rerun as root, e.g. with sudo")
        }
        None => bail!("need root to {what}, and cannot tell our uid from /proc/self/status"),
    }
}

/// The effective uid from /proc/self/status (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_src_is_found_in_component_list() {
        assert!(has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64\n"
        ));
        assert!(has_rust_src("rust-src (installed)\n"));
        assert!(!has_rust_src(
            "rust-std-x86_64-unknown-linux-gnu\nrust-src-extra\n"
        ));
        assert!(!has_rust_src(""));
    }

    #[test]
    fn bpf_linker_version_is_parsed() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.10.0\n").as_deref(),
            Some("0.10.0")
        );
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.9.15").as_deref(),
            Some("0.9.15")
        );
        assert_eq!(parse_bpf_linker_version("something 0.10.0"), None);
        assert_eq!(parse_bpf_linker_version(""), None);
    }

    #[test]
    fn dpkg_status_is_parsed() {
        assert!(dpkg_status_installed("install ok installed"));
        assert!(!dpkg_status_installed("deinstall ok config-files"));
        assert!(!dpkg_status_installed("unknown ok not-installed"));
        assert!(!dpkg_status_installed(""));
    }

    #[test]
    fn mounts_are_matched_by_target_and_type() {
        let mounts = "tracefs /sys/kernel/tracing tracefs rw,relatime 0 0\n\
                      sysfs /sys sysfs ro 0 0\n";
        assert!(is_mounted(mounts, "/sys/kernel/tracing", "tracefs"));
        assert!(!is_mounted(mounts, "/sys/fs/bpf", "bpf"));
        assert!(!is_mounted(mounts, "/sys", "bpf"));
    }

    #[test]
    fn effective_uid_is_the_second_number() {
        assert_eq!(effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}
