//! Closing TCP connections from outside the process that holds them: `SOCK_DESTROY` through the
//! sock_diag netlink family (root, `CONFIG_INET_DIAG_DESTROY`). The kernel drops every data packet
//! of a connection whose server name it refused; closing it tells the agent at once
//! (`ECONNABORTED`) instead of after minutes of retransmissions. The socket's cookie goes with
//! the request, so a later connection that reuses the addresses is never the one closed. Also
//! lists the cookies of every TCP socket, to find the flows whose socket is gone.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DESTROY};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// What became of a close request.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// The kernel closed it (the agent sees `ECONNABORTED`).
    Closed,
    /// No such socket (any more), or one whose cookie differs (the kernel answers both the
    /// same): it was closed already.
    Gone,
}

fn request(source: SocketAddr, dest: SocketAddr, cookie: u64) -> InetRequest {
    // An IPv4 connection is found as one, whatever family its socket has (a v4-mapped AF_INET6
    // socket sits in the IPv4 tables).
    let family = if source.is_ipv4() { AF_INET } else { AF_INET6 };
    InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: source.port(),
            destination_port: dest.port(),
            source_address: source.ip(),
            destination_address: dest.ip(),
            interface_id: 0,
            cookie: cookie.to_ne_bytes(),
        },
    }
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    s.connect(&NetlinkAddr::new(0, 0))?;
    Ok(s)
}

fn send(
    s: &Socket,
    mut msg: NetlinkMessage<SockDiagMessage>,
    message_type: Option<u16>,
) -> io::Result<()> {
    msg.finalize();
    if let Some(t) = message_type {
        msg.header.message_type = t;
    }
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    s.send(&buf, 0)?;
    Ok(())
}

/// Closes the TCP connection from `source` to `dest` whose socket has cookie `cookie`.
pub fn close(source: SocketAddr, dest: SocketAddr, cookie: u64) -> io::Result<Closed> {
    let s = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(request(source, dest, cookie)).into(),
    );
    send(&s, msg, Some(SOCK_DESTROY))?;
    let (reply, _) = s.recv_from_full()?;
    let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(Closed::Closed),
            Some(code) if -code.get() == libc::ENOENT => Ok(Closed::Gone),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag answered SOCK_DESTROY with {other:?}"),
        )),
    }
}

/// The cookies of every TCP socket on the host (both families).
pub fn tcp_cookies() -> io::Result<HashSet<u64>> {
    let mut cookies = HashSet::new();
    for family in [AF_INET, AF_INET6] {
        let s = socket()?;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = request(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::from(([0, 0, 0, 0], 0)),
            u64::MAX,
        );
        req.family = family;
        if family == AF_INET6 {
            req.socket_id.source_address = std::net::Ipv6Addr::UNSPECIFIED.into();
            req.socket_id.destination_address = std::net::Ipv6Addr::UNSPECIFIED.into();
        }
        send(
            &s,
            NetlinkMessage::new(header, SockDiagMessage::InetRequest(req).into()),
            None,
        )?;
        'dump: loop {
            let (buf, _) = s.recv_from_full()?;
            let mut offset = 0;
            while offset < buf.len() {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..]).map_err(
                    |e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag dump: {e}")),
                )?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(e.code.map_or_else(
                            || io::Error::other("sock_diag dump ended in an ack"),
                            |c| io::Error::from_raw_os_error(-c.get()),
                        ));
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        cookies.insert(u64::from_ne_bytes(r.header.socket_id.cookie));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
    Ok(cookies)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root only: a real loopback connection is closed by its cookie, and listed before.
    #[test]
    fn a_connection_is_closed_by_its_addresses_and_cookie() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED (not root): sock_diag needs CAP_NET_ADMIN");
            return;
        }
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64.
        let r = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        assert!(tcp_cookies().unwrap().contains(&cookie), "listed");
        let (source, dest) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        // The kernel answers a cookie that does not match as it answers no socket at all.
        assert_eq!(
            close(source, dest, cookie.wrapping_add(1)).unwrap(),
            Closed::Gone,
            "another cookie names no socket"
        );
        client.set_nonblocking(true).unwrap();
        let alive = client.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(
            alive.kind(),
            std::io::ErrorKind::WouldBlock,
            "still open: {alive}"
        );
        client.set_nonblocking(false).unwrap();
        assert_eq!(close(source, dest, cookie).unwrap(), Closed::Closed);
        let err = client.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        assert_eq!(close(source, dest, cookie).unwrap(), Closed::Gone);
    }
}
