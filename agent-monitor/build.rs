//! Compiles the kernel programs (agent-monitor-ebpf) with the nightly toolchain and bpf-linker into
//! OUT_DIR; `src/bpf` embeds the object, so the daemon is one self-contained binary.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-monitor-ebpf");
    let root = root
        .to_str()
        .context("non-UTF-8 path to agent-monitor-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-monitor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (needs `cargo xtask setup`: nightly rust-src and bpf-linker 0.10.0)")
}
