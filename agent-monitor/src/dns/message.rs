//! DNS messages for the proxy, through hickory-proto: what an agent asked, the replies the proxy
//! writes itself (REFUSED, SERVFAIL, FORMERR), and the addresses an answer gives for the name
//! asked. Pure: bytes in, values out.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record};

use crate::policy::host::normalize_name;

/// Longest CNAME chain followed; real chains are a handful of links.
const MAX_CHAIN: usize = 16;

/// The one question of a standard query, as the proxy judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Normalised: ASCII lower case, no trailing dot (IDNs in their `xn--` form, as sent).
    pub name: String,
    /// Record type asked (`A`, `AAAA`, `TXT`, …).
    pub qtype: String,
}

/// Why a query is not judged at all; the proxy answers with `response` without asking upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unjudgeable {
    pub reason: String,
    /// The reply to send, if the message had a readable id.
    pub response: Option<Vec<u8>>,
}

/// Reads a query: exactly one question, opcode QUERY.
pub fn parse_query(bytes: &[u8]) -> Result<Question, Unjudgeable> {
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => {
            // Answer FORMERR when at least the id is there, so the client does not wait.
            let response = (bytes.len() >= 2)
                .then(|| u16::from_be_bytes([bytes[0], bytes[1]]))
                .and_then(|id| {
                    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                        .to_vec()
                        .ok()
                });
            return Err(Unjudgeable {
                reason: format!("unreadable DNS message: {e}"),
                response,
            });
        }
    };
    let refuse = |code: ResponseCode, reason: String| Unjudgeable {
        reason,
        response: reply(&msg, code),
    };
    if msg.message_type() != MessageType::Query {
        return Err(refuse(
            ResponseCode::FormErr,
            "a DNS response sent as a query".into(),
        ));
    }
    if msg.op_code() != OpCode::Query {
        return Err(refuse(
            ResponseCode::NotImp,
            format!("DNS opcode {:?} is not forwarded", msg.op_code()),
        ));
    }
    let [q] = msg.queries() else {
        return Err(refuse(
            ResponseCode::FormErr,
            format!(
                "{} questions in one query; exactly one is forwarded",
                msg.queries().len()
            ),
        ));
    };
    Ok(Question {
        id: msg.id(),
        name: normalize_name(&q.name().to_ascii()),
        qtype: q.query_type().to_string(),
    })
}

/// The proxy's own reply to `query` with `code`: same id and question, no records.
pub fn reply_to(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    reply(&msg, code)
}

fn reply(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut msg = Message::error_msg(query.id(), query.op_code(), code);
    msg.set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .add_queries(query.queries().iter().cloned());
    msg.to_vec().ok()
}

/// What upstream answered, as far as the proxy cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub rcode: String,
    /// A and AAAA records reached from the name asked through the answer's CNAME chain, with
    /// their TTLs in seconds.
    pub addrs: Vec<(IpAddr, u32)>,
    /// The chain's names after the one asked (CNAME targets), normalised.
    pub cnames: Vec<String>,
}

/// Why upstream's response could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("unreadable upstream response: {0}")]
    Unreadable(#[source] hickory_proto::ProtoError),
    #[error("upstream sent something other than the response to query {id}")]
    NotTheResponse { id: u16 },
    #[error("re-encoding the response: {0}")]
    Encode(#[source] hickory_proto::ProtoError),
}

/// Reads upstream's response to the query with `id` for `name` (normalised).
pub fn parse_answer(bytes: &[u8], id: u16, name: &str) -> Result<Answer, AnswerError> {
    let msg = Message::from_vec(bytes).map_err(AnswerError::Unreadable)?;
    if msg.message_type() != MessageType::Response || msg.id() != id {
        return Err(AnswerError::NotTheResponse { id });
    }
    let (addrs, cnames) = chain_addresses(name, msg.answers());
    Ok(Answer {
        rcode: msg.response_code().to_string(),
        addrs,
        cnames,
    })
}

/// Upstream's response `bytes` without the A/AAAA records for `strip` (in any section), and how many
/// A/AAAA answers are left. The rest of the message is kept as it was.
pub fn strip_addresses(bytes: &[u8], strip: &[IpAddr]) -> Result<(Vec<u8>, usize), AnswerError> {
    let mut msg = Message::from_vec(bytes).map_err(AnswerError::Unreadable)?;
    let canon = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    };
    let strip: HashSet<IpAddr> = strip.iter().map(|&a| canon(a)).collect();
    let keep = |r: &Record| match r.data() {
        RData::A(a) => !strip.contains(&IpAddr::V4(a.0)),
        RData::AAAA(a) => !strip.contains(&canon(IpAddr::V6(a.0))),
        _ => true,
    };
    let answers: Vec<Record> = msg.take_answers().into_iter().filter(keep).collect();
    let additionals: Vec<Record> = msg.take_additionals().into_iter().filter(keep).collect();
    let left = answers
        .iter()
        .filter(|r| matches!(r.data(), RData::A(_) | RData::AAAA(_)))
        .count();
    msg.insert_answers(answers);
    msg.insert_additionals(additionals);
    let out = msg.to_vec().map_err(AnswerError::Encode)?;
    Ok((out, left))
}

/// Follows the CNAME chain from `name` through `records` and returns the A/AAAA records owned by a
/// name on it. Records for names off the chain (which a resolver has no reason to send) are not
/// taken: only what answers the question asked becomes reachable.
fn chain_addresses(name: &str, records: &[Record]) -> (Vec<(IpAddr, u32)>, Vec<String>) {
    let owner = |r: &Record| normalize_name(&r.name().to_ascii());
    let mut on_chain: HashSet<String> = HashSet::from([name.to_string()]);
    let mut cnames = Vec::new();
    let mut current = name.to_string();
    for _ in 0..MAX_CHAIN {
        let next = records.iter().find_map(|r| match r.data() {
            RData::CNAME(target) if owner(r) == current => {
                Some(normalize_name(&target.0.to_ascii()))
            }
            _ => None,
        });
        match next {
            Some(target) if on_chain.insert(target.clone()) => {
                cnames.push(target.clone());
                current = target;
            }
            // End of the chain, or a loop.
            _ => break,
        }
    }
    let addrs = records
        .iter()
        .filter(|r| on_chain.contains(&owner(r)))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect();
    (addrs, cnames)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr as _;

    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).expect("test name")
    }

    fn query(id: u16, qname: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name(qname), qtype));
        m.to_vec().expect("encode")
    }

    fn response(id: u16, qname: &str, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .add_query(Query::query(name(qname), RecordType::A));
        for r in answers {
            m.add_answer(r);
        }
        m.to_vec().expect("encode")
    }

    fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    #[test]
    fn a_query_is_read_and_normalised() {
        let q = parse_query(&query(7, "OK.Example.COM.", RecordType::AAAA)).expect("query");
        assert_eq!(
            q,
            Question {
                id: 7,
                name: "ok.example.com".into(),
                qtype: "AAAA".into()
            }
        );
    }

    #[test]
    fn garbage_gets_formerr_when_it_has_an_id() {
        let e = parse_query(&[0x12, 0x34, 0xff]).expect_err("garbage");
        let r = Message::from_vec(&e.response.expect("a reply")).expect("reply parses");
        assert_eq!((r.id(), r.response_code()), (0x1234, ResponseCode::FormErr));
        assert!(parse_query(&[1]).expect_err("short").response.is_none());
    }

    #[test]
    fn two_questions_are_not_forwarded() {
        let mut m = Message::new();
        m.set_id(9)
            .add_query(Query::query(name("a.test."), RecordType::A))
            .add_query(Query::query(name("b.test."), RecordType::A));
        let e = parse_query(&m.to_vec().expect("encode")).expect_err("two questions");
        assert!(e.reason.contains("2 questions"), "{}", e.reason);
    }

    #[test]
    fn refused_reply_keeps_id_and_question() {
        let bytes =
            reply_to(&query(42, "x.test.", RecordType::A), ResponseCode::Refused).expect("reply");
        let r = Message::from_vec(&bytes).expect("parses");
        assert_eq!(r.id(), 42);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(r.queries().len(), 1);
        assert!(r.answers().is_empty());
    }

    #[test]
    fn answer_follows_the_cname_chain_only() {
        let bytes = response(
            5,
            "alias.ok.test.",
            vec![
                cname("alias.ok.test.", "Edge.CDN.net."),
                cname("edge.cdn.net.", "node.cdn.net."),
                a("node.cdn.net.", [10, 0, 0, 7], 30),
                Record::from_rdata(
                    name("node.cdn.net."),
                    60,
                    RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
                ),
                // Not on the chain: never learned.
                a("other.test.", [10, 9, 9, 9], 30),
            ],
        );
        let ans = parse_answer(&bytes, 5, "alias.ok.test").expect("answer");
        assert_eq!(ans.cnames, ["edge.cdn.net", "node.cdn.net"]);
        assert_eq!(
            ans.addrs,
            [
                (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)), 30),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 60)
            ]
        );
        assert_eq!(ans.rcode, "No Error");
    }

    #[test]
    fn cname_loops_end() {
        let bytes = response(
            1,
            "a.test.",
            vec![cname("a.test.", "b.test."), cname("b.test.", "a.test.")],
        );
        let ans = parse_answer(&bytes, 1, "a.test").expect("answer");
        assert_eq!(ans.cnames, ["b.test"]);
        assert!(ans.addrs.is_empty());
    }

    #[test]
    fn wrong_id_or_a_query_is_not_an_answer() {
        let bytes = response(1, "a.test.", vec![a("a.test.", [1, 2, 3, 4], 5)]);
        assert!(parse_answer(&bytes, 2, "a.test").is_err());
        assert!(parse_answer(&query(1, "a.test.", RecordType::A), 1, "a.test").is_err());
        assert!(parse_answer(&[0, 1], 1, "a.test").is_err());
    }

    #[test]
    fn stripped_addresses_leave_the_reply_and_the_rest_stays() {
        let bytes = response(
            3,
            "rebind.test.",
            vec![
                cname("rebind.test.", "edge.test."),
                a("edge.test.", [127, 0, 0, 1], 30),
                a("edge.test.", [93, 184, 216, 34], 30),
                Record::from_rdata(
                    name("edge.test."),
                    60,
                    RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
                ),
            ],
        );
        let strip = [
            IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let (out, left) = strip_addresses(&bytes, &strip).expect("strip");
        assert_eq!(left, 1);
        let ans = parse_answer(&out, 3, "rebind.test").expect("still an answer");
        assert_eq!(ans.cnames, ["edge.test"]);
        assert_eq!(
            ans.addrs,
            [(IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)), 30)]
        );
        let (out, left) =
            strip_addresses(&out, &[IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34))]).expect("strip");
        assert_eq!(left, 0);
        assert!(
            parse_answer(&out, 3, "rebind.test")
                .expect("answer")
                .addrs
                .is_empty()
        );
    }
}
