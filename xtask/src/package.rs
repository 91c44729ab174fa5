//! `cargo xtask package`: the Debian package, built with `dpkg-deb` from a staged tree.
//!
//! Why not cargo-deb: half of what the package ships is generated (man pages and completions come
//! from the built binary, the unit's ExecStart is rewritten), so a staging step is needed anyway,
//! and once the tree is staged `dpkg-deb --root-owner-group --build` is the whole job. dpkg-deb is
//! on every Debian machine; cargo-deb would be one more tool to compile (minutes on CI's cores) and
//! pin, for a manifest table that would only list the staged files again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, daemon_bin, run_cmd};

const NAME: &str = "agent-monitor";

/// Shared libraries the binary links (readelf NEEDED) → the Debian package that provides them.
/// A library not listed here fails the build rather than shipping a package with a missing
/// dependency.
const LIBRARY_PACKAGES: &[(&str, &str)] = &[
    ("libc.so.6", "libc6 (>= 2.34)"),
    ("libm.so.6", "libc6 (>= 2.34)"),
    ("ld-linux-x86-64.so.2", "libc6 (>= 2.34)"),
    ("libgcc_s.so.1", "libgcc-s1"),
    ("libseccomp.so.2", "libseccomp2 (>= 2.5)"),
];

/// Builds the release binary and `target/debian/agent-monitor_VERSION_ARCH.deb`; returns its path.
pub fn package(root: &Path) -> Result<PathBuf> {
    // Default members, like `cargo xtask build`: the same feature set, so no rebuild.
    run_cmd(cargo(root).args(["build", "--release"]))?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = root.join("target/debian");
    let stage = out_dir.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    stage_tree(root, &stage, version, &arch)?;
    let deb = out_dir.join(format!("{NAME}_{version}_{arch}.deb"));
    run_cmd(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn stage_tree(root: &Path, stage: &Path, version: &str, arch: &str) -> Result<()> {
    let bin = daemon_bin(root);
    let packaging = root.join("packaging");

    install(&bin, &stage.join("usr/bin/agent-monitor"), 0o755)?;

    // The unit as shipped in the repository runs /usr/local/bin/agent-monitor (a hand install).
    let unit = read(&packaging.join("agent-monitor.service"))?;
    let unit = packaged_unit(&unit)?;
    write(
        &stage.join("lib/systemd/system/agent-monitor.service"),
        &unit,
        0o644,
    )?;
    install(
        &packaging.join("agent-monitor.catalog"),
        &stage.join("usr/lib/systemd/catalog/agent-monitor.catalog"),
        0o644,
    )?;
    install(
        &packaging.join("deb/logrotate"),
        &stage.join("etc/logrotate.d/agent-monitor"),
        0o644,
    )?;

    // Generated from the clap definitions of the binary we ship.
    let man_dir = stage.join("usr/share/man/man1");
    run_cmd(Command::new(&bin).args(["generate", "man"]).arg(&man_dir))?;
    for page in fs::read_dir(&man_dir)? {
        run_cmd(Command::new("gzip").args(["-9n"]).arg(page?.path()))?;
    }
    let completions = [
        (
            "bash",
            "usr/share/bash-completion/completions",
            "agent-monitor.bash",
            "agent-monitor",
        ),
        (
            "zsh",
            "usr/share/zsh/vendor-completions",
            "_agent-monitor",
            "_agent-monitor",
        ),
        (
            "fish",
            "usr/share/fish/vendor_completions.d",
            "agent-monitor.fish",
            "agent-monitor.fish",
        ),
    ];
    let scratch = stage.parent().unwrap().join("completions");
    for (shell, dir, generated, installed) in completions {
        run_cmd(
            Command::new(&bin)
                .args(["generate", "completions", shell])
                .arg(&scratch),
        )?;
        install(
            &scratch.join(generated),
            &stage.join(dir).join(installed),
            0o644,
        )?;
    }
    fs::remove_dir_all(&scratch)?;

    // The policy directory starts empty; the examples go with the documentation.
    fs::create_dir_all(stage.join("etc/agent-monitor/policies"))?;
    let doc = stage.join("usr/share/doc/agent-monitor");
    for entry in fs::read_dir(root.join("policies"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".toml") || name == "README.md" {
            install(&path, &doc.join("examples").join(&name), 0o644)?;
        }
    }
    // The policy format reference, which the examples' README points to.
    install(
        &root.join("docs/policies.md"),
        &doc.join("policies.md"),
        0o644,
    )?;
    write(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: agent-monitor\n\n\
         Files: *\nLicense: Apache-2.0\n \
         On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;

    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &packaging.join("deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    write(
        &debian.join("conffiles"),
        "/etc/logrotate.d/agent-monitor\n",
        0o644,
    )?;
    let depends = depends(&bin)?;
    let installed_kib = du_kib(stage)?;
    write(
        &debian.join("control"),
        &control(version, arch, &depends, installed_kib),
        0o644,
    )?;
    Ok(())
}

/// The repository's unit with ExecStart pointing at the packaged binary.
fn packaged_unit(unit: &str) -> Result<String> {
    const HAND_INSTALLED: &str = "ExecStart=/usr/local/bin/agent-monitor ";
    if !unit.contains(HAND_INSTALLED) {
        bail!("packaging/agent-monitor.service has no `{HAND_INSTALLED}` line to rewrite");
    }
    Ok(unit.replace(HAND_INSTALLED, "ExecStart=/usr/bin/agent-monitor "))
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: agent-monitor developers <agent-monitor@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Recommends: systemd, logrotate\n\
         Section: admin\n\
         Priority: optional\n\
         Description: kernel-enforced allowlists for AI agents\n \
         agent-monitor checks every connect and exec of an AI agent's processes against that\n \
         agent's allowlist in the kernel (eBPF), blocks or reports what is not allowed, and\n \
         records each decision in journald and a JSON audit trail. Removing the package stops\n \
         the daemon but leaves enforcement in place; purging it ends enforcement.\n"
    )
}

/// `Depends:` from the binary's NEEDED entries; an unknown library is an error.
fn depends(bin: &Path) -> Result<String> {
    let dynamic = command_output(Command::new("readelf").arg("-d").arg(bin))?;
    let mut packages: Vec<&str> = Vec::new();
    for library in needed_libraries(&dynamic) {
        let Some((_, package)) = LIBRARY_PACKAGES.iter().find(|(l, _)| *l == library) else {
            bail!(
                "{} links {library}, which xtask/src/package.rs does not map to a Debian package",
                bin.display()
            );
        };
        if !packages.contains(package) {
            packages.push(package);
        }
    }
    Ok(packages.join(", "))
}

/// The library names of `readelf -d` lines such as
/// ` 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]`.
fn needed_libraries(readelf: &str) -> Vec<&str> {
    readelf
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split_once('[').and_then(|(_, r)| r.split_once(']')))
        .map(|(name, _)| name)
        .collect()
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = command_output(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(dir),
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected du output: {out}"))
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            cmd.get_program().to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().unwrap())?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_libraries_are_read_from_readelf() {
        let text = " 0x0000000000000001 (NEEDED)             Shared library: [libseccomp.so.2]\n \
                    0x000000000000000e (SONAME)             Library soname: [x.so]\n \
                    0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n";
        assert_eq!(needed_libraries(text), ["libseccomp.so.2", "libc.so.6"]);
    }

    #[test]
    fn the_unit_in_the_repository_is_rewritten_for_usr_bin() {
        let root = crate::workspace_root();
        let unit = read(&root.join("packaging/agent-monitor.service")).unwrap();
        let packaged = packaged_unit(&unit).unwrap();
        assert!(packaged.contains("ExecStart=/usr/bin/agent-monitor daemon"));
        assert!(!packaged.contains("ExecStart=/usr/local"));
        assert!(packaged_unit("[Service]\nExecStart=/opt/x\n").is_err());
    }

    #[test]
    fn control_is_a_well_formed_stanza() {
        let text = control("1.2.3", "amd64", "libc6 (>= 2.34)", 42);
        for field in [
            "Package: agent-monitor\n",
            "Version: 1.2.3\n",
            "Depends: libc6",
        ] {
            assert!(text.contains(field), "{field}");
        }
        // Continuation lines of Description start with one space; no blank lines.
        assert!(text.lines().all(|l| !l.trim().is_empty()));
    }
}
