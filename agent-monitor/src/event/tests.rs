//! Decoding of every record kind from the bytes the kernel writes.

use super::*;
use common::{
    ExecPayload, ExitPayload, ForkPayload, NetPayload, Record, SocketPayload, SourceRoutePayload,
    TaggedPayload,
};

fn header(kind: RecordKind, verdict: u32) -> RecordHeader {
    RecordHeader {
        kind: kind as u32,
        verdict,
        cgroup_id: 77,
        ktime_ns: 5,
        pid: 100,
        tid: 101,
        uid: 1000,
        flags: 0,
        comm: *b"python3\0\0\0\0\0\0\0\0\0",
        agent: 3,
        task: 9,
        source: common::SOURCE_UID,
        _pad: 0,
    }
}

fn exec(verdict: u32) -> Record<ExecPayload> {
    Record {
        header: header(RecordKind::Exec, verdict),
        payload: ExecPayload {
            old_pid: 0,
            basis: 0,
            file_dev: 0,
            path_len: 0,
            file_ino: 0,
            interp_len: 0,
            _pad: 0,
            path: [0xAA; 256],
            interp: [0xBB; 256],
        },
    }
}

fn net(kind: RecordKind, verdict: u32) -> Record<NetPayload> {
    Record {
        header: header(kind, verdict),
        payload: NetPayload {
            family: common::AF_INET,
            port: 0,
            sock_type: 0,
            addr: [0; 16],
        },
    }
}

fn tagged(verdict: u32) -> Record<TaggedPayload> {
    Record {
        header: header(RecordKind::Tagged, verdict),
        payload: TaggedPayload {
            old_pid: 0,
            prior_agent: 0,
            path_len: 0,
            _pad: 0,
            path: [0xAA; 256],
        },
    }
}

/// The bytes the kernel would hand over for `r`: exactly the record, no more.
fn bytes<P: Copy>(r: &Record<P>) -> Vec<u8> {
    // SAFETY: viewing a repr(C) integer struct without padding as bytes.
    unsafe { std::slice::from_raw_parts((r as *const Record<P>).cast::<u8>(), size_of_val(r)) }
        .to_vec()
}

#[test]
fn each_kind_is_written_in_its_own_size() {
    assert_eq!(bytes(&exec(0)).len(), RecordKind::Exec.record_size());
    assert_eq!(
        bytes(&net(RecordKind::Connect, 0)).len(),
        RecordKind::Connect.record_size()
    );
    assert_eq!(bytes(&tagged(0)).len(), RecordKind::Tagged.record_size());
    // A connect no longer carries the exec's path buffers.
    assert!(RecordKind::Connect.record_size() * 6 < RecordKind::Exec.record_size());
}

#[test]
fn exec_record_decodes_path_and_flags() {
    let mut r = exec(common::VERDICT_DENIED);
    r.payload.path[..9].copy_from_slice(b"/bin/true");
    r.payload.path_len = 9;
    r.header.flags = common::FLAG_KILLED | common::FLAG_PATH_NOT_NORMAL;
    let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
        panic!("not an exec")
    };
    assert!(e.not_normal);
    assert_eq!(e.path, "/bin/true");
    assert_eq!(e.verdict, Verdict::Denied);
    assert!(e.killed && !e.truncated && !e.unreadable);
    assert_eq!(e.subject.comm, "python3");
    assert_eq!(
        (e.subject.pid, e.subject.tid, e.subject.uid),
        (100, 101, 1000)
    );
    assert_eq!(e.subject.cgroup_id, 77);
}

#[test]
fn exec_path_len_beyond_buffer_is_clamped() {
    let mut r = exec(common::VERDICT_ALLOWED);
    r.payload.path_len = 10_000;
    r.header.flags = common::FLAG_PATH_TRUNCATED;
    let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(e.path.chars().count(), 256);
    assert!(e.truncated);
}

#[test]
fn connect4_decodes_mapped_address_and_port() {
    let mut r = net(RecordKind::Connect, common::VERDICT_ALLOWED);
    r.payload.family = common::AF_INET;
    r.payload.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
    r.payload.port = 8080;
    r.payload.sock_type = 1;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(c.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(c.port, 8080);
    assert_eq!(transport(c.sock_type), "tcp");
    assert!(!c.learned && !c.dns_refused && !c.send);
}

#[test]
fn learned_connect_and_dns_redirect_records() {
    let mut r = net(RecordKind::Connect, common::VERDICT_ALLOWED);
    r.payload.family = common::AF_INET;
    r.payload.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7];
    r.header.flags = common::FLAG_LEARNED;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!("not a connect")
    };
    assert!(c.learned);
    r.header.kind = RecordKind::DnsRedirect as u32;
    r.header.verdict = common::VERDICT_DENIED;
    r.payload.port = 53;
    r.header.flags = common::FLAG_DNS_REFUSED;
    let KernelEvent::DnsRedirect(d) = decode(&bytes(&r)).unwrap() else {
        panic!("not a DNS redirect")
    };
    assert!(d.dns_refused && !d.learned);
    assert_eq!((d.addr.to_string(), d.port), ("10.0.0.7".into(), 53));
    assert_eq!(d.verdict, Verdict::Denied);
}

#[test]
fn connect6_keeps_v6_and_unmaps_v4_mapped() {
    let mut r = net(RecordKind::Connect, common::VERDICT_ALERT);
    r.payload.family = common::AF_INET6;
    r.payload.addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(c.addr, "::1".parse::<IpAddr>().unwrap());
    assert_eq!(c.verdict, Verdict::Alert);
    r.payload.addr = "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets();
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(c.addr, "10.1.2.3".parse::<IpAddr>().unwrap());
}

#[test]
fn records_carry_the_kernel_identity_and_grant_flag() {
    let mut r = net(RecordKind::Connect, common::VERDICT_ALLOWED);
    r.header.flags = common::FLAG_GRANTED;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert!(c.granted);
    assert_eq!(
        (c.subject.agent, c.subject.task, c.subject.source),
        (3, 9, common::SOURCE_UID)
    );
}

#[test]
fn tagged_record_names_path_and_prior_agent() {
    let mut r = tagged(common::VERDICT_NONE);
    r.payload.path[..8].copy_from_slice(b"/opt/bot");
    r.payload.path_len = 8;
    let KernelEvent::Tagged {
        path,
        retagged_from,
        ..
    } = decode(&bytes(&r)).unwrap()
    else {
        panic!()
    };
    assert_eq!((path.as_str(), retagged_from), ("/opt/bot", None));
    r.header.flags = common::FLAG_RETAGGED;
    r.payload.prior_agent = 1;
    assert!(matches!(
        decode(&bytes(&r)),
        Ok(KernelEvent::Tagged {
            retagged_from: Some(1),
            ..
        })
    ));
    r.header.verdict = common::VERDICT_DENIED;
    r.payload.prior_agent = 2;
    assert!(matches!(
        decode(&bytes(&r)),
        Ok(KernelEvent::ClaimRefused { claimed_by: 2, .. })
    ));
}

#[test]
fn script_exec_carries_interpreter_and_file() {
    let mut r = exec(common::VERDICT_DENIED);
    r.payload.path[..9].copy_from_slice(b"/tmp/x.sh");
    r.payload.path_len = 9;
    r.payload.interp[..9].copy_from_slice(b"/bin/bash");
    r.payload.interp_len = 9;
    r.payload.file_dev = 254 << 20;
    r.payload.file_ino = 1234;
    r.payload.basis = common::EXEC_BASIS_INTERPRETER;
    r.header.flags = common::FLAG_KILLED | common::FLAG_USER_NS;
    let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(e.interpreter.as_deref(), Some("/bin/bash"));
    assert_eq!((e.file_dev, e.file_ino), (254 << 20, 1234));
    assert!(e.user_ns && e.killed);
    assert_eq!(e.basis, common::EXEC_BASIS_INTERPRETER);
    r.payload.interp_len = 0;
    let KernelEvent::Exec(e) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(e.interpreter, None);
}

#[test]
fn sendmsg_and_unspecified_destinations() {
    let mut r = net(RecordKind::Sendmsg, common::VERDICT_DENIED);
    r.payload.family = common::AF_INET;
    r.payload.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
    r.header.flags = common::FLAG_ADDR_UNSPECIFIED;
    r.payload.sock_type = 2;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert!(c.send && c.unspecified);
    assert_eq!(c.addr, "0.0.0.0".parse::<IpAddr>().unwrap());
    r.header.kind = RecordKind::Connect as u32;
    r.header.flags = 0;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert!(!c.send && !c.unspecified && !c.connected_peer);
}

#[test]
fn a_send_without_address_is_reported_as_its_connected_peer() {
    let mut r = net(RecordKind::Sendmsg, common::VERDICT_ALLOWED);
    r.payload.family = common::AF_INET6;
    r.payload.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
    r.payload.port = 4433;
    r.header.flags = common::FLAG_CONNECTED_PEER;
    r.payload.sock_type = 2;
    let KernelEvent::Connect(c) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert!(c.send && c.connected_peer && !c.unspecified);
    assert_eq!((c.addr, c.port), ("127.0.0.1".parse().unwrap(), 4433));
}

#[test]
fn socket_record() {
    let r = Record {
        header: header(RecordKind::Socket, common::VERDICT_DENIED),
        payload: SocketPayload {
            family: common::AF_INET6,
            _pad: 0,
            sock_type: 2,
            protocol: 58,
            _pad2: 0,
        },
    };
    let KernelEvent::Socket(s) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(
        socket_description(s.family, s.sock_type, s.protocol),
        "inet6 dgram icmpv6 (58)"
    );
    assert_eq!(s.verdict, Verdict::Denied);
}

#[test]
fn source_route_record_names_the_first_hop() {
    let mut r = Record {
        header: header(RecordKind::SourceRoute, common::VERDICT_DENIED),
        payload: SourceRoutePayload {
            family: common::AF_INET,
            _pad: 0,
            protocol: 17,
            detail: 0x83,
            _pad2: 0,
            first_hop: "::ffff:192.0.2.9".parse::<Ipv6Addr>().unwrap().octets(),
        },
    };
    let KernelEvent::SourceRoute(s) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(s.first_hop, "192.0.2.9".parse::<IpAddr>().unwrap());
    assert_eq!(
        (s.protocol, s.detail, s.verdict),
        (17, 0x83, Verdict::Denied)
    );
    r.payload.family = common::AF_INET6;
    r.payload.first_hop = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
    let KernelEvent::SourceRoute(s) = decode(&bytes(&r)).unwrap() else {
        panic!()
    };
    assert_eq!(s.first_hop, "2001:db8::1".parse::<IpAddr>().unwrap());
    r.payload.family = 1;
    assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownFamily(1)));
}

#[test]
fn lifecycle_records() {
    let fork = Record {
        header: header(RecordKind::Fork, common::VERDICT_NONE),
        payload: ForkPayload {
            child: 4242,
            _pad: 0,
        },
    };
    assert!(matches!(
        decode(&bytes(&fork)),
        Ok(KernelEvent::Fork { child: 4242, .. })
    ));
    let exit = Record {
        header: header(RecordKind::Exit, common::VERDICT_NONE),
        payload: ExitPayload {},
    };
    assert_eq!(bytes(&exit).len(), size_of::<RecordHeader>());
    assert!(matches!(
        decode(&bytes(&exit)),
        Ok(KernelEvent::Exit { .. })
    ));
}

/// Every kind's header fields come back as the subject, unchanged.
#[test]
fn the_header_round_trips_into_the_subject_for_every_kind() {
    let mut h = header(RecordKind::Exit, common::VERDICT_ALLOWED);
    h.cgroup_id = u64::MAX - 1;
    h.ktime_ns = 1 << 50;
    (h.pid, h.tid, h.uid) = (u32::MAX, 7, 65_534);
    h.comm = *b"0123456789abcdef";
    (h.agent, h.task, h.source) = (4095, 77, common::SOURCE_TASK_SWITCH);
    for kind in RecordKind::ALL {
        let mut rec = vec![0u8; kind.record_size()];
        h.kind = kind as u32;
        // SAFETY: `rec` holds at least a header; RecordHeader is plain integers.
        unsafe { std::ptr::write_unaligned(rec.as_mut_ptr().cast::<RecordHeader>(), h) };
        // A valid family for the address-carrying payloads (offset 0 of the payload).
        if let Some(family) = rec.get_mut(size_of::<RecordHeader>()..size_of::<RecordHeader>() + 2)
        {
            family.copy_from_slice(&common::AF_INET6.to_ne_bytes());
        }
        let event = decode(&rec).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let subject = match event {
            KernelEvent::Exec(e) => e.subject,
            KernelEvent::Connect(c) | KernelEvent::DnsRedirect(c) => c.subject,
            KernelEvent::Socket(s) => s.subject,
            KernelEvent::SourceRoute(s) => s.subject,
            KernelEvent::Fork { subject, .. }
            | KernelEvent::Exit { subject }
            | KernelEvent::Tagged { subject, .. }
            | KernelEvent::ClaimRefused { subject, .. } => subject,
            KernelEvent::Unix(u) => u.subject,
            KernelEvent::EgressRedirect { connect, .. } => connect.subject,
            KernelEvent::UnixPeer(u) => u.connect.subject,
            KernelEvent::ServerName(e) => e.subject,
        };
        assert_eq!(
            subject,
            Subject {
                cgroup_id: u64::MAX - 1,
                ktime_ns: 1 << 50,
                pid: u32::MAX,
                tid: 7,
                uid: 65_534,
                comm: "0123456789abcdef".into(),
                agent: 4095,
                task: 77,
                source: common::SOURCE_TASK_SWITCH,
            },
            "{kind:?}"
        );
    }
}

#[test]
fn a_record_shorter_than_its_kind_is_an_error_not_a_panic() {
    assert_eq!(
        decode(&[0u8; 10]),
        Err(DecodeError::Short {
            got: 10,
            want: size_of::<RecordHeader>()
        })
    );
    for kind in RecordKind::ALL {
        let want = kind.record_size();
        let mut rec = vec![0u8; want];
        rec[..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        if want > size_of::<RecordHeader>() {
            assert_eq!(
                decode(&rec[..want - 1]),
                Err(DecodeError::Short {
                    got: want - 1,
                    want
                }),
                "{kind:?}"
            );
        }
    }
}

#[test]
fn odd_records_are_errors_not_panics() {
    let mut unknown = exec(0);
    unknown.header.kind = 99;
    assert_eq!(decode(&bytes(&unknown)), Err(DecodeError::UnknownKind(99)));
    // An unknown kind is reported as such even in a record too short for any payload.
    let mut h = header(RecordKind::Exit, 0);
    h.kind = 5;
    let rec = Record {
        header: h,
        payload: ExitPayload {},
    };
    assert_eq!(decode(&bytes(&rec)), Err(DecodeError::UnknownKind(5)));
    assert_eq!(
        decode(&bytes(&exec(9))),
        Err(DecodeError::UnknownVerdict {
            kind: "exec",
            verdict: 9
        })
    );
    let mut r = net(RecordKind::Connect, common::VERDICT_ALLOWED);
    r.payload.family = 1;
    assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownFamily(1)));
}

#[test]
fn unix_records_decode_with_the_name_as_policies_write_it() {
    let key = common::UnixKey::of_name(0, b"@engine").expect("fits");
    let rec = Record {
        header: header(RecordKind::UnixConnect, common::VERDICT_DENIED),
        payload: common::UnixPayload {
            sock_type: 2,
            name_len: key.name_len,
            send: 1,
            rule: 0,
            path: key.path,
            _pad: 0,
        },
    };
    match decode(&bytes(&rec)) {
        Ok(KernelEvent::Unix(u)) => {
            assert_eq!(u.name, "@engine");
            assert!(u.send);
            assert_eq!(u.verdict, Verdict::Denied);
            assert_eq!(u.sock_type, 2);
        }
        other => panic!("{other:?}"),
    }
    let short = &bytes(&rec)[..size_of::<RecordHeader>() + 8];
    assert!(matches!(decode(short), Err(DecodeError::Short { .. })));
}

#[test]
fn egress_redirects_carry_the_original_destination_and_the_token() {
    let r = Record {
        header: header(RecordKind::EgressRedirect, common::VERDICT_ALLOWED),
        payload: common::EgressPayload {
            dest: common::NetPayload {
                family: common::AF_INET6,
                port: 443,
                sock_type: 1,
                addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 9],
            },
            token: 0x01_02_03,
            _pad: 0,
        },
    };
    let KernelEvent::EgressRedirect { connect, token } = decode(&bytes(&r)).unwrap() else {
        panic!("not an egress redirect")
    };
    assert_eq!(token, 0x01_02_03);
    assert_eq!(
        (connect.addr.to_string(), connect.port),
        ("192.0.2.9".into(), 443)
    );
    // A refused datagram to a destination with request rules says so.
    let mut n = net(RecordKind::Sendmsg, common::VERDICT_DENIED);
    n.header.flags = common::FLAG_EGRESS_REFUSED | common::FLAG_LEARNED;
    let KernelEvent::Connect(c) = decode(&bytes(&n)).unwrap() else {
        panic!("not a send")
    };
    assert!(c.egress_refused && c.send && c.learned);
}

#[test]
fn unix_peer_records_carry_the_name_given_and_the_listeners_bound_name() {
    let given = common::UnixKey::of_name(0, b"/tmp/ok.sock").expect("fits");
    let bound = common::UnixKey::of_name(0, b"/run/docker.sock").expect("fits");
    let rec = Record {
        header: header(RecordKind::UnixPeer, common::VERDICT_DENIED),
        payload: common::UnixPeerPayload {
            given: common::UnixPayload {
                sock_type: 1,
                name_len: given.name_len,
                send: 0,
                rule: 0,
                path: given.path,
                _pad: 0,
            },
            bound_len: bound.name_len,
            bound_rule: common::UNIX_DENY,
            bound: bound.path,
            _pad: 0,
        },
    };
    match decode(&bytes(&rec)) {
        Ok(KernelEvent::UnixPeer(u)) => {
            assert_eq!(u.connect.name, "/tmp/ok.sock");
            assert_eq!(u.bound, "/run/docker.sock");
            assert_eq!(u.bound_rule, common::UNIX_DENY);
            assert_eq!(u.connect.verdict, Verdict::Denied);
            assert!(!u.connect.send);
        }
        other => panic!("{other:?}"),
    }
    let short = &bytes(&rec)[..size_of::<RecordHeader>() + 130];
    assert!(matches!(decode(short), Err(DecodeError::Short { .. })));
}
