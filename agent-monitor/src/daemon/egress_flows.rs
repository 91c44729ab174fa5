//! The egress flows: which process is behind each connect the kernel redirected to the egress
//! endpoint (its redirect record, by token), and the monitor's answers to the endpoint — the
//! flow's agent, task, rules and learned names — and its reports.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use super::Monitor;
use crate::action::{Action, Object, Verdict};
use crate::egress::{EgressInput, FlowInfo, FlowReport};
use crate::event::ConnectEvent;
use crate::policy::model::Mode;

/// Redirect records kept for connections the endpoint has not asked about yet. A connection is
/// asked about right after its accept, so only a burst of connects fills this; the oldest go
/// first (and are counted).
const MAX_PENDING: usize = 16_384;

#[derive(Default)]
pub(super) struct EgressFlows {
    pending: HashMap<u32, ConnectEvent>,
    order: VecDeque<u32>,
    /// Redirect records dropped before the endpoint asked for them.
    pub(super) evicted: u64,
    /// Connections the endpoint asked about that had no redirect record (lost or evicted).
    pub(super) unknown: u64,
    /// When the kernel's server-name flows were last checked for closed sockets.
    pub(super) sni_swept_ns: u64,
}

impl EgressFlows {
    /// The kernel redirected `connect` as flow `token`.
    pub(super) fn redirected(&mut self, token: u32, connect: ConnectEvent) {
        if self.pending.insert(token, connect).is_none() {
            self.order.push_back(token);
        }
        while self.pending.len() > MAX_PENDING {
            match self.order.pop_front() {
                Some(old) => {
                    if self.pending.remove(&old).is_some() {
                        self.evicted += 1;
                    }
                }
                None => break,
            }
        }
    }

    /// The redirect record of flow `token`, once.
    pub(super) fn take(&mut self, token: u32) -> Option<ConnectEvent> {
        let c = self.pending.remove(&token);
        if c.is_some() {
            self.order.retain(|t| *t != token);
        } else {
            self.unknown += 1;
        }
        c
    }
}

impl Monitor {
    /// A question or a report of the egress endpoint.
    pub(super) fn on_egress(&mut self, input: EgressInput) {
        match input {
            EgressInput::Query(q) => {
                let answer = self.egress_flow(q.token);
                let _ = q.reply.send(answer);
            }
            EgressInput::Report(r) => self.egress_report(*r),
            EgressInput::Request(r) => self.http_request_report(*r),
        }
    }

    /// One intercepted request: `ACTION=http` with its method, path, status and the rule that
    /// allowed it, or what was missing.
    fn http_request_report(&mut self, done: crate::egress::RequestDone) {
        let r = done.report;
        let verdict = match r.verdict {
            crate::intercept::Verdict::Allowed => Verdict::Allowed,
            crate::intercept::Verdict::Denied => Verdict::Denied,
            crate::intercept::Verdict::Alert => Verdict::Alert,
        };
        let connection = crate::action::EgressConnection {
            destination: crate::action::Destination {
                addr: r.original.ip(),
                port: r.original.port(),
                transport: "tcp",
            },
            tls: false,
            sni: Some(r.sni.clone()),
            http_host: Some(r.host.clone()),
            bytes_out: r.bytes_out,
            bytes_in: r.bytes_in,
            duration_ms: r.duration.as_millis() as u64,
            request: Some(crate::action::HttpRequest {
                method: r.method.clone(),
                path: r.path.clone(),
                status: r.status,
            }),
        };
        let reason = match (&r.rule, &r.missing) {
            (Some(rule), _) => format!("allowed by network.http {rule}"),
            (None, Some(missing)) if verdict == Verdict::Alert => {
                format!("{missing} (alert mode: forwarded)")
            }
            (None, Some(missing)) => missing.clone(),
            (None, None) => "no request rule allows it".into(),
        };
        let base = self.subject_action(&done.subject, Object::Egress(connection), verdict);
        self.reporter.action(Action {
            enforcement: (verdict == Verdict::Denied).then_some("http 403"),
            reason,
            ..base
        });
    }

    fn egress_flow(&mut self, token: u32) -> Result<FlowInfo, String> {
        let Some(c) = self.egress.take(token) else {
            return Err(format!(
                "no redirect record for flow {token} (ring buffer full, or evicted)"
            ));
        };
        // The kernel's own entry is the authority on where the socket meant to go; the record
        // names who connected.
        let flow = self
            .kernel
            .egress_flow(token)
            .ok_or_else(|| format!("the kernel holds no flow {token}"))?;
        let v6 = std::net::Ipv6Addr::from(flow.addr);
        let original = match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), flow.port),
            None => SocketAddr::new(v6.into(), flow.port),
        };
        if original != SocketAddr::new(c.addr, c.port) {
            return Err(format!(
                "flow {token}: the kernel holds {original}, the redirect record {}:{}",
                c.addr, c.port
            ));
        }
        let (agent, task) = self.identity(&c.subject);
        let policy = self
            .generations
            .live()
            .get(&agent)
            .ok_or_else(|| format!("agent {agent} has no policy in force"))?;
        let learned = match self.dns.index(&agent) {
            Some(i) => self.dns.learned.names(i, c.addr, super::monotonic_ns()),
            None => Vec::new(),
        };
        Ok(FlowInfo {
            task: Some(task),
            // Ask mode does not hold a server-name mismatch or an intercepted request off the
            // rules: they are refused as in enforce.
            enforce: policy.mode() != Mode::Alert,
            original,
            rules: policy.egress().clone(),
            learned,
            subject: c.subject,
            agent,
        })
    }

    fn egress_report(&mut self, r: FlowReport) {
        let base = self.subject_action(&r.subject, Object::Egress(r.connection), r.verdict);
        self.reporter.action(Action {
            enforcement: r.enforcement,
            reason: r.reason,
            ..base
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Verdict;
    use crate::event::Subject;

    fn connect(port: u16) -> ConnectEvent {
        ConnectEvent {
            subject: Subject::unknown(),
            verdict: Verdict::Allowed,
            addr: "192.0.2.1".parse().unwrap(),
            port,
            sock_type: 1,
            granted: false,
            send: false,
            unspecified: false,
            connected_peer: false,
            learned: true,
            dns_refused: false,
            egress_refused: false,
        }
    }

    #[test]
    fn each_flow_is_answered_once() {
        let mut f = EgressFlows::default();
        f.redirected(7, connect(443));
        assert_eq!(f.take(7).map(|c| c.port), Some(443));
        assert!(f.take(7).is_none());
        assert_eq!(f.unknown, 1);
    }

    #[test]
    fn a_burst_beyond_the_limit_drops_the_oldest_and_counts_them() {
        let mut f = EgressFlows::default();
        for t in 0..(MAX_PENDING as u32 + 2) {
            f.redirected(t, connect(443));
        }
        assert_eq!(f.evicted, 2);
        assert!(f.take(0).is_none());
        assert!(f.take(2).is_some());
    }
}
