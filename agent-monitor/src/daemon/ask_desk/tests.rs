use super::approved_file::{List, with_entry};
use super::approver::parse_answer;
use super::*;
use crate::control::HeldAction;

const S: u64 = 1_000_000_000;

fn request(pid: u32, name: &str) -> NewRequest {
    NewRequest {
        request: PendingRequest {
            id: 0,
            agent: "coder".into(),
            spiffe_id: None,
            task: Some("t1".into()),
            uid: Some(1000),
            pid,
            chain: vec![],
            action: HeldAction::Dns {
                name: name.into(),
                qtype: "A".into(),
            },
            held_ms: 0,
            expires_in_ms: 0,
        },
        key: Some(format!("coder dns {name}")),
    }
}

fn once() -> Decision {
    Decision::Allow {
        scope: Scope::Once,
        ttl_ms: None,
    }
}

#[test]
fn a_request_is_numbered_held_and_approved_once() {
    let mut desk = AskDesk::new(60 * S, 100);
    assert_eq!(
        desk.hold(request(7, "pypi.org"), "w1", 10 * S).ok(),
        Some(Hold::New(1))
    );
    let shown = desk.pending(12 * S);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].id, 1);
    assert_eq!(shown[0].held_ms, 2000);
    assert_eq!(shown[0].expires_in_ms, 58_000);
    let ended = desk.decide(1, &once(), "uid 0 (root)", 13 * S).unwrap();
    assert!(ended.approved());
    assert_eq!(ended.waiters, vec!["w1"]);
    assert_eq!(ended.waited_ns, 3 * S);
    assert_eq!(ended.outcome.scope, Some(Scope::Once));
    assert_eq!(ended.outcome.approver, "uid 0 (root)");
    assert!(desk.pending(13 * S).is_empty());
    assert_eq!(desk.next_deadline(), None);
}

#[test]
fn retransmissions_join_the_held_request() {
    let mut desk = AskDesk::new(60 * S, 100);
    desk.hold(request(7, "pypi.org"), 1, 0).ok().unwrap();
    assert_eq!(
        desk.hold(request(7, "pypi.org"), 2, S).ok(),
        Some(Hold::Joined(1))
    );
    assert_eq!(
        desk.hold(request(7, "other.org"), 3, S).ok(),
        Some(Hold::New(2))
    );
    let ended = desk
        .decide(
            1,
            &Decision::Deny {
                reason: Some("no".into()),
            },
            "op",
            2 * S,
        )
        .unwrap();
    assert!(!ended.approved());
    assert_eq!(ended.waiters, vec![1, 2]);
    assert_eq!(ended.outcome.verdict, "denied");
    assert_eq!(ended.outcome.reason.as_deref(), Some("no"));
    // Decided: the key is free again, a new query is a new request.
    assert_eq!(
        desk.hold(request(7, "pypi.org"), 4, 3 * S).ok(),
        Some(Hold::New(3))
    );
}

#[test]
fn unknown_and_already_decided_ids_are_refused_precisely() {
    let mut desk: AskDesk<()> = AskDesk::new(60 * S, 100);
    assert_eq!(
        desk.decide(9, &once(), "op", 0).err(),
        Some(DeskError::Unknown(9))
    );
    desk.hold(request(7, "a.org"), (), 0).ok().unwrap();
    desk.decide(1, &once(), "op", 0).ok().unwrap();
    let again = desk
        .decide(1, &Decision::Deny { reason: None }, "op2", 0)
        .err()
        .unwrap();
    assert_eq!(
        again,
        DeskError::AlreadyDecided {
            id: 1,
            verdict: "approved".into(),
            approver: "op".into()
        }
    );
    assert!(
        again
            .to_string()
            .contains("already decided: approved by op")
    );
}

#[test]
fn the_deadline_denies_and_a_late_approval_is_refused() {
    let mut desk = AskDesk::new(60 * S, 100);
    desk.hold(request(7, "a.org"), 'a', 0).ok().unwrap();
    desk.hold(request(8, "b.org"), 'b', 30 * S).ok().unwrap();
    assert_eq!(desk.next_deadline(), Some(60 * S));
    assert!(desk.expire(59 * S).is_empty());
    let ended = desk.expire(60 * S);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].outcome.verdict, "timeout");
    assert_eq!(ended[0].outcome.approver, "timeout");
    assert_eq!(ended[0].waiters, vec!['a']);
    assert!(!ended[0].approved());
    assert_eq!(desk.next_deadline(), Some(90 * S));
    // Approval after the timeout: the request is over, the call was denied.
    assert!(matches!(
        desk.decide(1, &once(), "op", 61 * S),
        Err(DeskError::AlreadyDecided { verdict, .. }) if verdict == "timeout"
    ));
}

#[test]
fn requests_of_gone_processes_are_withdrawn() {
    let mut desk = AskDesk::new(60 * S, 100);
    desk.hold(request(7, "a.org"), 7, 0).ok().unwrap();
    desk.hold(request(8, "b.org"), 8, 0).ok().unwrap();
    let ended = desk.withdraw(|r| (r.pid == 7).then(|| "process 7 exited".to_string()), S);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].outcome.verdict, "withdrawn");
    assert_eq!(ended[0].outcome.reason.as_deref(), Some("process 7 exited"));
    assert_eq!(desk.pids().collect::<Vec<_>>(), vec![8]);
    assert_eq!(desk.next_deadline(), Some(60 * S));
}

#[test]
fn a_thousand_requests_wait_at_once_and_time_out_in_order() {
    let mut desk = AskDesk::new(60 * S, 1000);
    for i in 0..1000u32 {
        let h = desk.hold(
            request(i, &format!("n{i}.org")),
            i,
            u64::from(i) * 1_000_000,
        );
        assert_eq!(h.ok(), Some(Hold::New(u64::from(i) + 1)));
    }
    assert_eq!(desk.len(), 1000);
    // Beyond the limit: refused, the waiter handed back to be denied.
    let (err, w) = desk.hold(request(5000, "x.org"), 5000, 0).err().unwrap();
    assert_eq!((err, w), (DeskError::Full(1000), 5000));
    let pending = desk.pending(S);
    assert!(
        pending.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first"
    );
    let half = desk.expire(60 * S + 499 * 1_000_000);
    assert_eq!(half.len(), 500);
    assert_eq!(desk.len(), 500);
    assert_eq!(desk.expire(61 * S).len(), 500);
    assert_eq!(desk.len(), 0);
}

#[test]
fn name_approvals_cover_their_task_until_they_end() {
    let mut names = NameApprovals::default();
    names.approve("coder", Some("t1"), "pypi.org", 10 * S);
    names.approve("coder", None, "once.org", 5 * S);
    assert!(names.approved("coder", Some("t1"), "pypi.org", S));
    assert!(!names.approved("coder", Some("t2"), "pypi.org", S));
    assert!(!names.approved("coder", None, "pypi.org", S));
    assert!(names.approved("coder", Some("t2"), "once.org", S));
    assert!(!names.approved("other", Some("t1"), "once.org", S));
    assert!(!names.approved("coder", Some("t1"), "pypi.org", 10 * S));
    names.expire(6 * S, |_, _| false);
    assert_eq!(names.len(), 1);
    names.expire(6 * S, |a, t| a == "coder" && t == "t1");
    assert_eq!(names.len(), 0);
}

#[test]
fn once_entries_come_due_in_time_order() {
    let mut once = OnceEntries::default();
    once.add(1, 5 * S, "a");
    once.add(2, 3 * S, "b");
    assert_eq!(once.next(), Some(3 * S));
    assert_eq!(once.due(2 * S), Vec::<&str>::new());
    assert_eq!(once.due(3 * S), vec!["b"]);
    assert_eq!(once.due(10 * S), vec!["a"]);
    assert_eq!(once.next(), None);
    // A used entry goes at once, the others wait for their time.
    once.add(3, 20 * S, "c");
    once.add(4, 21 * S, "d");
    assert_eq!(once.take_used(|e| *e == "d"), Some("d"));
    assert_eq!(once.take_used(|e| *e == "d"), None);
    assert_eq!(once.next(), Some(20 * S));
}

#[test]
fn decision_service_answers_are_read_as_documented() {
    let d = parse_answer(br#"{"decision":"allow","scope":"task","ttl":"10m"}"#).unwrap();
    assert_eq!(
        d,
        Decision::Allow {
            scope: Scope::Task,
            ttl_ms: Some(600_000)
        }
    );
    let d = parse_answer(br#"{"decision":"allow","scope":"task","ttl":30}"#).unwrap();
    assert_eq!(
        d,
        Decision::Allow {
            scope: Scope::Task,
            ttl_ms: Some(30_000)
        }
    );
    assert_eq!(parse_answer(br#"{"decision":"allow"}"#).unwrap(), once());
    assert_eq!(
        parse_answer(br#"{"decision":"deny","reason":"not on a weekday"}"#).unwrap(),
        Decision::Deny {
            reason: Some("not on a weekday".into())
        }
    );
    // Open Policy Agent's data API wraps the document in `result`.
    assert_eq!(
        parse_answer(br#"{"result":{"decision":"allow","scope":"always"}}"#).unwrap(),
        Decision::Allow {
            scope: Scope::Always,
            ttl_ms: None
        }
    );
    for bad in [
        &br#"{"decision":"maybe"}"#[..],
        br#"{"decision":"allow","scope":"forever"}"#,
        br#"{"decision":"allow","ttl":"soon"}"#,
        br#"{"decision":"allow","extra":1}"#,
        br#"{}"#,
        br#"not json"#,
        // OPA with no matching rule answers an empty document: a deny, not an allow.
        br#"{"result":{}}"#,
    ] {
        assert!(
            parse_answer(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn approved_file_gets_one_commented_entry_per_approval() {
    let first = with_entry(
        None,
        "coder",
        List::Network,
        "pypi.org:1-65535",
        "request 3: dns pypi.org, approved by uid 0 (root) at 2026-12-06T05:00:00Z",
    )
    .unwrap();
    assert!(first.contains("agent = \"coder\""), "{first}");
    assert!(
        first.contains("# request 3: dns pypi.org, approved by uid 0 (root)"),
        "{first}"
    );
    let second = with_entry(
        Some(&first),
        "coder",
        List::Exec,
        "/usr/bin/make",
        "request 4: exec /usr/bin/make, approved by approver-url",
    )
    .unwrap();
    // Nothing of the first is lost, and the same entry twice is written once.
    assert!(second.contains("# request 3:"), "{second}");
    assert!(second.contains("\"/usr/bin/make\""), "{second}");
    let again = with_entry(Some(&second), "coder", List::Exec, "/usr/bin/make", "x").unwrap();
    assert_eq!(again, second);
    let parsed: toml::Table = second.parse().unwrap();
    assert_eq!(
        parsed["network"]["allow"].as_array().unwrap()[0].as_str(),
        Some("pypi.org:1-65535")
    );
    assert_eq!(
        parsed["exec"]["allow"].as_array().unwrap()[0].as_str(),
        Some("/usr/bin/make")
    );
    // A file that names another agent is not written into.
    assert!(with_entry(Some(&second), "other", List::Exec, "/bin/x", "x").is_err());
    assert!(
        with_entry(
            Some("agent = \"coder\"\nexec = 3\n"),
            "coder",
            List::Exec,
            "/bin/x",
            "x"
        )
        .is_err()
    );
}
