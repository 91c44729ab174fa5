//! Server names judged in the kernel: the kernel's verdict on the first bytes of an agent's
//! connection (`KernelEvent::ServerName`) becomes an `ACTION=connect` report with `TLS_SNI`, in
//! the words the egress endpoint would use (its `judge` explains a name); a refused connection is
//! closed (`SOCK_DESTROY`), after which the kernel forgets it. Connections whose sockets went
//! without sending anything are forgotten by [`Monitor::sweep_server_name_flows`].

use agent_monitor_common::server_name::{
    SNI_MAX_PARTIAL, SNI_OUTCOME_ENCRYPTED, SNI_OUTCOME_MALFORMED, SNI_OUTCOME_NAME,
    SNI_OUTCOME_NO_NAME, SNI_OUTCOME_NOT_TLS, SNI_OUTCOME_SPLIT, SNI_OUTCOME_TOO_LARGE,
};

use super::Monitor;
use crate::action::{Action, Destination, EgressConnection, Object, Verdict};
use crate::egress::hello::{ClientHello, Opening};
use crate::egress::judge::{Decision, judge};
use crate::egress::sock_destroy::{Closed, close};
use crate::event::ServerNameEvent;

/// Why the kernel refused first bytes that carried no name it could judge.
pub fn outcome_reason(outcome: u32, port: u16) -> String {
    match outcome {
        SNI_OUTCOME_NO_NAME => "the ClientHello names no server (no SNI)".into(),
        SNI_OUTCOME_ENCRYPTED => {
            "the ClientHello is encrypted (ECH): the server name cannot be judged".into()
        }
        SNI_OUTCOME_NOT_TLS => format!(
            "the connection did not open with a TLS ClientHello on port {port}, whose server \
             names are judged in the kernel"
        ),
        SNI_OUTCOME_MALFORMED => {
            "a TLS handshake record that is not a readable ClientHello (or one split over \
             several records)"
                .into()
        }
        SNI_OUTCOME_TOO_LARGE => {
            "a ClientHello record larger than the kernel reads (16 KiB)".into()
        }
        SNI_OUTCOME_SPLIT => {
            format!("the ClientHello did not arrive whole in {SNI_MAX_PARTIAL} packets in a row")
        }
        other => format!("unknown outcome {other} of the kernel's server-name check"),
    }
}

impl Monitor {
    pub(super) fn on_server_name(&mut self, e: ServerNameEvent) {
        let port = e.dest.port();
        let mut reason = match (&e.name, e.outcome) {
            (Some(name), SNI_OUTCOME_NAME) => self.explain_name(&e, name),
            _ => outcome_reason(e.outcome, port),
        };
        let mut enforcement = None;
        match e.verdict {
            Verdict::Denied => {
                enforcement = Some("dropped");
                match close(e.source, e.dest, e.cookie) {
                    Ok(outcome) => {
                        enforcement = Some("closed");
                        if outcome == Closed::Gone {
                            reason.push_str("; the agent had closed it already");
                        }
                        if let Err(err) = self.kernel.remove_sni_flow(e.cookie) {
                            tracing::warn!("forgetting a closed server-name flow: {err:#}");
                        }
                    }
                    // The flow stays: the kernel keeps dropping the connection's data.
                    Err(err) => {
                        self.reporter.counters.sni_close_failures += 1;
                        tracing::warn!(
                            source = %e.source,
                            dest = %e.dest,
                            "closing a connection refused on its server name failed: {err}; \
                             its data stays dropped"
                        );
                        reason
                            .push_str(&format!("; closing it failed ({err}): its data is dropped"));
                    }
                }
            }
            Verdict::Alert => reason.push_str(" (alert mode: passed unchanged)"),
            _ => {}
        }
        let connection = EgressConnection {
            destination: Destination {
                addr: e.dest.ip(),
                port,
                transport: "tcp",
            },
            tls: e.outcome != SNI_OUTCOME_NOT_TLS,
            sni: e.name.clone(),
            http_host: None,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
            request: None,
        };
        let base = self.subject_action(&e.subject, Object::Egress(connection), e.verdict);
        self.reporter.action(Action {
            enforcement,
            reason: format!("{reason} (judged in the kernel)"),
            ..base
        });
    }

    /// The endpoint's explanation of `name` on this connection, by the rules and learned names
    /// in force now; a disagreement with the kernel's verdict is logged (the kernel's stands).
    fn explain_name(&self, e: &ServerNameEvent, name: &str) -> String {
        let (agent, _) = self.identity(&e.subject);
        let Some(policy) = self.generations.live().get(&agent) else {
            return format!("server name {name}: agent {agent} has no policy in force");
        };
        let learned = match self.dns.index(&agent) {
            Some(i) => self
                .dns
                .learned
                .names(i, e.dest.ip(), super::monotonic_ns()),
            None => Vec::new(),
        };
        let opening = Opening::Tls(ClientHello {
            sni: Some(name.to_string()),
            ech: false,
        });
        let j = judge(&opening, policy.egress(), e.dest.port(), &learned);
        let passes = j.decision == Decision::Splice;
        if passes != (e.verdict == Verdict::Allowed) {
            tracing::warn!(
                agent,
                name,
                dest = %e.dest,
                "the kernel's server-name verdict ({:?}) differs from the rules in force now \
                 ({}); the kernel's stands",
                e.verdict,
                j.reason
            );
        }
        j.reason
    }

    /// Forgets the kernel-judged flows whose socket is gone (closed before sending anything):
    /// the kernel cannot tell, so it would hold them until the map fills. Run on the timer.
    pub(super) fn sweep_server_name_flows(&mut self) {
        let held = self.kernel.sni_flow_cookies();
        if held.is_empty() {
            return;
        }
        let live = match crate::egress::sock_destroy::tcp_cookies() {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!("listing TCP sockets to forget closed server-name flows: {e}");
                return;
            }
        };
        for cookie in held.into_iter().filter(|c| !live.contains(c)) {
            if let Err(e) = self.kernel.remove_sni_flow(cookie) {
                tracing::warn!("forgetting a closed server-name flow: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_without_a_name_has_its_own_reason() {
        let reasons: Vec<String> = [
            SNI_OUTCOME_NO_NAME,
            SNI_OUTCOME_ENCRYPTED,
            SNI_OUTCOME_NOT_TLS,
            SNI_OUTCOME_MALFORMED,
            SNI_OUTCOME_TOO_LARGE,
            SNI_OUTCOME_SPLIT,
        ]
        .into_iter()
        .map(|o| outcome_reason(o, 443))
        .collect();
        let distinct: std::collections::HashSet<&String> = reasons.iter().collect();
        assert_eq!(distinct.len(), reasons.len(), "{reasons:#?}");
        assert!(reasons[1].contains("ECH"));
        assert!(reasons[2].contains("port 443"));
        assert!(outcome_reason(99, 443).contains("unknown outcome 99"));
    }
}
