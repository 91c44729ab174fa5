//! The AF_UNIX hooks read the kernel's `struct bpf_sock_addr_kern` at fixed offsets (the
//! sock_addr context exposes no field for a unix address): checked here against the kernel's
//! BTF before they are loaded, so a kernel with another layout gets no unix hook (reported as
//! refused) rather than one that misreads.

use agent_monitor_common as common;
use anyhow::{Context as _, ensure};

/// Fails unless `uaddr` and `uaddrlen` of `bpf_sock_addr_kern` sit where the program reads them.
pub(super) fn check_context_layout() -> anyhow::Result<()> {
    let btf = crate::btf::Btf::from_sys_fs()
        .context("the unix-socket hooks need the kernel's BTF to check their context layout")?;
    for (member, want) in [
        ("uaddr", common::SOCK_ADDR_KERN_UADDR),
        ("uaddrlen", common::SOCK_ADDR_KERN_UADDRLEN),
    ] {
        let got = btf
            .member_offset("bpf_sock_addr_kern", member)
            .with_context(|| format!("bpf_sock_addr_kern.{member} (kernel < 6.7?)"))?;
        ensure!(
            got == want,
            "bpf_sock_addr_kern.{member} is at byte {got} on this kernel; the unix-socket hooks \
             read it at {want}"
        );
    }
    Ok(())
}
