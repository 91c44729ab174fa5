//! Where the peer tracepoint (`agent-monitor-ebpf/src/unix_peer.rs`) finds the name a unix
//! connect's listener bound on the running kernel: member offsets of `unix_sock` and
//! `unix_address` from its BTF, and the `ret` field of `syscalls/sys_exit_connect`. Pure (the
//! caller reads the files), so a kernel without these members is a clear error here, not a
//! misread in the kernel.

use agent_monitor_common::{SOCK_ADDR_KERN_SK, UnixPeerLayout};
use thiserror::Error;

use crate::btf::{Btf, BtfError};

/// Where the program reads `ret` in the `sys_exit_connect` record.
const EXIT_CONNECT_RET: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnixPeerLayoutError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("bpf_sock_addr_kern.sk is at byte {0} on this kernel; the unix hook reads it at 0")]
    SockAt(u32),
    #[error(
        "syscalls/sys_exit_connect has ret at {0:?}; the program reads it at {EXIT_CONNECT_RET}"
    )]
    ExitRet(Option<usize>),
}

/// Where the program reads `skaddr` and `family` in the `sk_data_ready` record.
const DATA_READY_FIELDS: [(&str, usize); 2] = [("skaddr", 8), ("family", 16)];

/// Whether a `sock/sk_data_ready` format file (absent before Linux 6.6) has the fields where the
/// datagram program reads them.
pub fn data_ready_matches(format: Option<&str>) -> bool {
    format.is_some_and(|f| {
        DATA_READY_FIELDS
            .iter()
            .all(|(field, at)| crate::host::field_offset(f, field) == Some(*at))
    })
}

/// The layout from a kernel's BTF and its `sys_exit_connect` format file; `data_ready`: whether
/// [`data_ready_matches`].
pub fn layout_from(
    btf: &Btf,
    exit_connect_format: &str,
    data_ready: bool,
) -> Result<UnixPeerLayout, UnixPeerLayoutError> {
    let sk = btf.member_offset("bpf_sock_addr_kern", "sk")?;
    if sk != SOCK_ADDR_KERN_SK {
        return Err(UnixPeerLayoutError::SockAt(sk));
    }
    let ret = crate::host::field_offset(exit_connect_format, "ret");
    if ret != Some(EXIT_CONNECT_RET) {
        return Err(UnixPeerLayoutError::ExitRet(ret));
    }
    Ok(UnixPeerLayout {
        enabled: 1,
        unix_sock_peer: btf.member_offset("unix_sock", "peer")?,
        unix_sock_addr: btf.member_offset("unix_sock", "addr")?,
        unix_address_len: btf.member_offset("unix_address", "len")?,
        unix_address_name: btf.member_offset("unix_address", "name")?,
        data_ready: u32::from(data_ready),
    })
}

/// The running kernel's layout (`/sys/kernel/btf/vmlinux`, tracefs).
pub fn running_kernel_layout() -> anyhow::Result<UnixPeerLayout> {
    use anyhow::Context as _;
    let btf = Btf::from_sys_fs()?;
    let p = "/sys/kernel/tracing/events/syscalls/sys_exit_connect/format";
    let format = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
    let data_ready =
        std::fs::read_to_string("/sys/kernel/tracing/events/sock/sk_data_ready/format").ok();
    let data_ready = data_ready_matches(data_ready.as_deref());
    if !data_ready {
        tracing::warn!(
            "named unix datagram sends are judged by the name given only: this kernel's \
             sock/sk_data_ready tracepoint is missing (Linux < 6.6) or has another layout"
        );
    }
    Ok(layout_from(&btf, &format, data_ready)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: sys_exit_connect\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n";

    /// A BTF blob with one int type and nothing else: no unix_sock.
    fn empty_btf() -> Btf {
        let strings = b"\0int\0";
        let types: Vec<u8> = [1u32, 1 << 24, 4, 32]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut b = Vec::new();
        b.extend(0xeb9fu16.to_le_bytes());
        b.extend([1u8, 0]);
        b.extend(24u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((types.len() as u32).to_le_bytes());
        b.extend((types.len() as u32).to_le_bytes());
        b.extend((strings.len() as u32).to_le_bytes());
        b.extend(&types);
        b.extend(strings);
        Btf::parse(&b).expect("valid blob")
    }

    #[test]
    fn a_kernel_without_the_members_is_a_named_error() {
        let err = layout_from(&empty_btf(), FORMAT, true).unwrap_err();
        assert_eq!(
            err,
            UnixPeerLayoutError::Btf(BtfError::NoStruct("bpf_sock_addr_kern".into()))
        );
        assert!(err.to_string().contains("bpf_sock_addr_kern"), "{err}");
    }

    /// The machine's own kernel's BTF, when it publishes it (readable without privileges).
    fn kernel_btf() -> Option<Btf> {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return None;
        };
        Some(Btf::parse(&data).expect("the kernel's BTF parses"))
    }

    #[test]
    fn this_kernel_has_the_members_the_peer_tracepoint_follows() {
        let Some(btf) = kernel_btf() else {
            return;
        };
        let layout = layout_from(&btf, FORMAT, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((layout.enabled, layout.data_ready), (1, 1));
        // `struct unix_sock` begins with its `struct sock`; peer and addr follow it.
        assert!(
            layout.unix_sock_peer > 0 && layout.unix_sock_addr > 0,
            "{layout:?}"
        );
        // `struct unix_address { refcount_t refcnt; int len; struct sockaddr_un name[]; }`
        assert_eq!((layout.unix_address_len, layout.unix_address_name), (4, 8));
    }

    #[test]
    fn a_moved_ret_field_is_refused() {
        let Some(btf) = kernel_btf() else {
            return;
        };
        let moved = FORMAT.replace("offset:16", "offset:24");
        assert_eq!(
            layout_from(&btf, &moved, true),
            Err(UnixPeerLayoutError::ExitRet(Some(24)))
        );
        assert_eq!(
            layout_from(&btf, "name: x\n", true),
            Err(UnixPeerLayoutError::ExitRet(None))
        );
    }

    #[test]
    fn the_data_ready_record_must_have_its_fields_where_they_are_read() {
        let format = "name: sk_data_ready\nformat:\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:__u16 family;\toffset:16;\tsize:2;\tsigned:0;\n";
        assert!(data_ready_matches(Some(format)));
        assert!(!data_ready_matches(Some(
            &format.replace("offset:16", "offset:18")
        )));
        assert!(!data_ready_matches(None));
    }
}
