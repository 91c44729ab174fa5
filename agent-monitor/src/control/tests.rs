use std::path::Path;

use super::call::ClientError;
use super::*;

#[test]
fn requests_round_trip() {
    for r in [
        Request::Place {
            agent: "a".into(),
            task: "t".into(),
            user: Some(1001),
            unscoped: None,
            privileges: None,
        },
        Request::Place {
            agent: "a".into(),
            task: "t".into(),
            user: None,
            unscoped: None,
            privileges: Some(Privileges {
                uid: 0,
                capabilities: vec!["cap_chown".into()],
                no_new_privs: true,
                landlock_fs: true,
                kept_all: false,
            }),
        },
        Request::Place {
            agent: "a".into(),
            task: "t".into(),
            user: None,
            unscoped: Some("this kernel has Landlock ABI 5".into()),
            privileges: None,
        },
        Request::Caught(CaughtReport {
            pid: 7,
            call: CaughtCall::Signal {
                syscall: "kill".into(),
                signal: 15,
                target: CaughtTarget {
                    pid: 8,
                    comm: "sleep".into(),
                    cgroup: Some("/agent-monitor/b/t".into()),
                    uid: Some(65534),
                    supervisor: false,
                },
            },
            refused: true,
            comm: "sh".into(),
            exe: None,
            uid: 65534,
        }),
        Request::Caught(CaughtReport {
            pid: 7,
            call: CaughtCall::ProcessAccess {
                syscall: "pidfd_getfd".into(),
                target: CaughtTarget {
                    pid: 1,
                    comm: "systemd".into(),
                    cgroup: Some("/init.scope".into()),
                    uid: Some(0),
                    supervisor: false,
                },
            },
            refused: true,
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            uid: 65534,
        }),
        Request::Status {},
        Request::Reload {},
        Request::Events {
            follow: true,
            agent: Some("a".into()),
        },
        Request::TaskStart {
            agent: "a".into(),
            task: "t".into(),
            allow_connect: vec!["127.0.0.1:80".into()],
            allow_exec: vec![],
            ttl_ms: Some(1000),
            pid: None,
        },
        Request::TaskEnd {
            agent: "a".into(),
            task: "t".into(),
        },
        Request::Caught(CaughtReport {
            pid: 7,
            call: CaughtCall::Socket {
                family: 40,
                sock_type: 1,
                protocol: 0,
            },
            refused: true,
            comm: "python3".into(),
            exe: None,
            uid: 65534,
        }),
    ] {
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_request(&s).unwrap(), r);
    }
}

fn start(agent: &str, task: &str) -> Request {
    Request::TaskStart {
        agent: agent.into(),
        task: task.into(),
        allow_connect: vec!["10.0.0.1:443".into()],
        allow_exec: vec![],
        ttl_ms: None,
        pid: None,
    }
}

fn end(agent: &str, task: &str) -> Request {
    Request::TaskEnd {
        agent: agent.into(),
        task: task.into(),
    }
}

#[test]
fn admins_outside_agents_may_do_everything() {
    for r in [start("a", "t"), end("a", "t"), Request::Status {}] {
        assert!(authorize(&r, true, None).is_ok());
        assert!(
            authorize(&r, false, None)
                .unwrap_err()
                .to_string()
                .contains("--admin-group")
        );
    }
}

#[test]
fn inside_an_agent_only_its_own_task_may_be_ended_even_by_root() {
    let me = Some(("a", "t"));
    assert!(authorize(&end("a", "t"), true, me).is_ok());
    assert!(authorize(&end("a", "t"), false, me).is_ok());
    let narrow = |task: &str| Request::TaskNarrow {
        agent: "a".into(),
        task: task.into(),
        keep_connect: vec![],
        keep_exec: vec![],
        ttl_ms: Some(1),
    };
    assert!(authorize(&narrow("t"), false, me).is_ok());
    assert!(authorize(&narrow("other"), true, me).is_err());
    for r in [
        start("a", "t"),
        start("a", "other"),
        start("b", "t"),
        end("a", "other"),
        end("b", "t"),
        Request::Place {
            agent: "b".into(),
            task: "t".into(),
            user: None,
            unscoped: None,
            privileges: None,
        },
        Request::Place {
            agent: "a".into(),
            task: "t".into(),
            user: Some(1001),
            unscoped: None,
            privileges: None,
        },
        Request::Status {},
    ] {
        let e = authorize(&r, true, me).unwrap_err().to_string();
        assert!(e.contains("from inside an agent"), "{r:?}: {e}");
    }
    let same = Request::Place {
        agent: "a".into(),
        task: "t".into(),
        user: None,
        unscoped: None,
        privileges: None,
    };
    assert!(authorize(&same, true, me).is_ok());
}

/// `run` reports from inside its agent; who may report is decided against the placements.
#[test]
fn caught_reports_pass_authorization_from_inside_an_agent() {
    let caught = Request::Caught(CaughtReport {
        pid: 7,
        call: CaughtCall::IoUringSetup,
        refused: true,
        comm: "sh".into(),
        exe: None,
        uid: 0,
    });
    assert_eq!(authorize(&caught, false, Some(("a", "t"))), Ok(()));
    let widen = Request::TaskStart {
        agent: "a".into(),
        task: "t".into(),
        allow_connect: vec![],
        allow_exec: vec![],
        ttl_ms: None,
        pid: None,
    };
    assert!(authorize(&widen, true, Some(("a", "t"))).is_err());
}

#[test]
fn bad_requests_say_what_is_expected() {
    for bad in [
        "",
        "{}",
        "{\"op\":\"nuke\"}",
        "{\"op\":\"place\",\"agent\":\"a\"}",
        "{\"op\":\"status\",\"pid\":1}",
        "not json",
    ] {
        let e = parse_request(bad).unwrap_err().to_string();
        assert!(e.starts_with("bad request:"), "{e}");
        assert!(e.contains("expected"), "{e}");
    }
}

#[test]
fn missing_socket_means_daemon_not_running() {
    let e = call(
        Path::new("/nonexistent/agent-monitor.sock"),
        &Request::Status {},
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::NotRunning { .. }));
    assert!(e.to_string().contains("daemon is not running"));
}
