//! Replaying what went through the egress endpoint: a recorded request (`ACTION=http` with
//! `HTTP_METHOD`) is judged with interception's own matcher (`intercept::rules`), and a recorded
//! connect to a learned address is judged as the kernel and the endpoint would treat it once the
//! port has request rules (redirected, then judged on its name).

use crate::intercept::rules::{self, Judgement};
use crate::learn::audit::RecordedRequest;
use crate::policy::Decision;
use crate::policy::Policy;
use crate::policy::host::normalize_name;
use crate::policy::http::NameVerdict;

fn denied(reason: String) -> Decision {
    Decision {
        allowed: false,
        reason,
    }
}

/// Interception refuses a request whose `Host` is not the connection's server name (domain
/// fronting) or names another port, whatever the rules say.
pub fn host_is_server_name(host: &str, sni: &str, port: u16) -> Result<(), String> {
    let authority: hyper::http::uri::Authority = host
        .parse()
        .map_err(|_| format!("the Host {host:?} is not a host name"))?;
    let name = normalize_name(authority.host());
    let sni = normalize_name(sni);
    if name != sni {
        return Err(format!(
            "the Host {name} is not the TLS server name {sni} (domain fronting)"
        ));
    }
    match authority.port_u16() {
        Some(p) if p != port => Err(format!(
            "the Host names port {p}, the connection is to port {port}"
        )),
        _ => Ok(()),
    }
}

/// What `policy` says about a recorded request: its server name must have request rules on the
/// port; with `[[network.http]]` rules its method and path are judged as interception judges
/// them; with only a `[[network.tls]]` rule the connection now passes without interception.
pub fn judge_request(policy: &Policy, r: &RecordedRequest) -> Decision {
    let Some(name) = r.name() else {
        return denied("no server name (SNI) or Host was recorded".into());
    };
    if let (Some(sni), Some(host)) = (&r.sni, &r.host)
        && let Err(why) = host_is_server_name(host, sni, r.port)
    {
        return denied(why);
    }
    match policy.egress().judge_name(&name, r.port) {
        NameVerdict::NoRule => denied(format!(
            "{name}:{}: no network.http or network.tls rule names it",
            r.port
        )),
        NameVerdict::Pass(rule) => Decision {
            allowed: true,
            reason: format!(
                "rule {:?} (line {}): the connection passes without interception, method and \
                 path are not judged",
                rule.text(),
                rule.line()
            ),
        },
        NameVerdict::Intercept(http) => {
            let path = match rules::normalise_path(&r.path) {
                Ok(p) => p,
                Err(e) => return denied(format!("the path {:?} is refused: {e}", r.path)),
            };
            let rules = crate::intercept::from_policy::rules_of(&http);
            match rules::judge(&rules, &name, r.port, &r.method, &path) {
                Judgement::Allowed(rule) => Decision {
                    allowed: true,
                    reason: format!("rule {:?} (line {})", rule.text, rule.line),
                },
                Judgement::Denied(why) => denied(why),
            }
        }
    }
}

/// A connect allowed because the agent learned the address for `host` goes, on a port with
/// request rules, to the egress endpoint (docs/egress.md), which refuses a name no request rule
/// covers. `by_name` is the evaluator's answer for the name.
pub fn through_endpoint(policy: &Policy, host: &str, port: u16, by_name: Decision) -> Decision {
    if !policy.egress().ports().contains(&port) {
        return by_name;
    }
    match policy.egress().judge_name(host, port) {
        NameVerdict::NoRule => denied(format!(
            "port {port} has request rules, so the kernel redirects this connect to the egress \
             endpoint, where no network.http or network.tls rule names {host}: refused (allowed \
             by {} only up to the redirect)",
            by_name.reason
        )),
        verdict => Decision {
            allowed: true,
            reason: format!("{}, through the egress endpoint: {verdict}", by_name.reason),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use super::*;
    use crate::action::{Destination, EgressConnection, HttpRequest, Object, Verdict};
    use crate::learn::audit::tests::{connect_line, read};
    use crate::learn::audit::{Recorded, What};
    use crate::learn::replay::{judge, replay_policy};

    /// A request line exactly as the daemon's JSON sink writes an intercepted request.
    pub(crate) fn request_line(
        agent: &str,
        sni: &str,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
        verdict: Verdict,
    ) -> String {
        let base = crate::output::tests::connect_action();
        let action = crate::action::Action {
            agent: agent.into(),
            verdict,
            object: Object::Egress(EgressConnection {
                destination: Destination {
                    addr: "10.1.2.3".parse().expect("address"),
                    port,
                    transport: "tcp",
                },
                tls: false,
                sni: Some(sni.into()),
                http_host: Some(host.into()),
                bytes_out: 0,
                bytes_in: 10,
                duration_ms: 1,
                request: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    status: if verdict == Verdict::Denied { 403 } else { 200 },
                }),
            }),
            enforcement: (verdict == Verdict::Denied).then_some("http 403"),
            ..base
        };
        crate::output::json::json_line(&action)
            .expect("json")
            .trim_end()
            .to_string()
    }

    fn policy(body: &str) -> Policy {
        crate::policy::test_policy("coder", body)
    }

    const RULES: &str = r#"
[[network.http]]
host = "api.github.com"
port = 443
methods = ["GET", "HEAD"]
paths = ["/repos/acme/*", "/user"]

[[network.tls]]
host = "pypi.org"
port = 443
"#;

    fn get(path: &str) -> String {
        request_line(
            "coder",
            "api.github.com",
            "api.github.com",
            443,
            "GET",
            path,
            Verdict::Allowed,
        )
    }

    #[test]
    fn the_trail_reads_back_as_requests() {
        let audit = read(&get("/user/"));
        assert_eq!(audit.problems, []);
        let What::Request(r) = &audit.actions[0].what else {
            panic!("{:?}", audit.actions[0].what)
        };
        assert_eq!(r.sni.as_deref(), Some("api.github.com"));
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/user/");
        assert_eq!(r.port, 443);
        assert_eq!(
            audit.actions[0].what.to_string(),
            "http api.github.com:443 GET /user/"
        );
    }

    fn verdicts(p: &Policy, lines: &[String]) -> Vec<(bool, String)> {
        let audit = read(&lines.join("\n"));
        assert_eq!(audit.problems, []);
        audit
            .actions
            .iter()
            .map(|r: &Recorded| {
                let d = judge(p, &r.what).expect("judged");
                (d.allowed, d.reason)
            })
            .collect()
    }

    #[test]
    fn requests_are_judged_as_interception_judges_them() {
        let p = policy(RULES);
        let post = request_line(
            "coder",
            "api.github.com",
            "api.github.com",
            443,
            "POST",
            "/user",
            Verdict::Denied,
        );
        let fronted = request_line(
            "coder",
            "api.github.com",
            "evil.test",
            443,
            "GET",
            "/user",
            Verdict::Denied,
        );
        let other_port = request_line(
            "coder",
            "api.github.com",
            "api.github.com:8443",
            443,
            "GET",
            "/user",
            Verdict::Denied,
        );
        let pypi = request_line(
            "coder",
            "pypi.org",
            "pypi.org",
            443,
            "GET",
            "/simple/x",
            Verdict::Allowed,
        );
        let unknown = request_line(
            "coder",
            "gist.github.com",
            "gist.github.com",
            443,
            "POST",
            "/",
            Verdict::Denied,
        );
        let got = verdicts(
            &p,
            &[
                get("/user/"),
                get("/repos/acme"),
                get("/repos/acme/x/issues"),
                get("/repos/other"),
                get("/a/..%2f"),
                post,
                fronted,
                other_port,
                pypi,
                unknown,
            ],
        );
        let allowed: Vec<bool> = got.iter().map(|(a, _)| *a).collect();
        assert_eq!(
            allowed,
            [
                true, true, true, false, false, false, false, false, true, false
            ],
            "{got:#?}"
        );
        assert_eq!(
            got[0].1,
            "rule \"http api.github.com:443 GET,HEAD /repos/acme/*,/user\" (line 3)"
        );
        assert!(got[3].1.contains("path /repos/other not listed"), "{got:?}");
        assert!(got[4].1.contains("is refused"), "{got:?}");
        assert!(got[5].1.contains("method POST not listed"), "{got:?}");
        assert!(got[6].1.contains("domain fronting"), "{got:?}");
        assert!(got[7].1.contains("port 8443"), "{got:?}");
        assert!(got[8].1.contains("passes without interception"), "{got:?}");
        assert_eq!(
            got[9].1,
            "gist.github.com:443: no network.http or network.tls rule names it"
        );
    }

    #[test]
    fn a_learned_connect_on_a_request_rule_port_needs_a_request_rule_for_its_name() {
        let p = policy(&format!(
            "[network]\nallow = [\"github.com:443\", \"github.com:22\"]\n{RULES}"
        ));
        let connect = |host: &str, port: u16| {
            connect_line(
                "coder",
                "t",
                "10.0.0.1",
                port,
                &format!(r#","dest_host":"{host}""#),
            )
        };
        let got = verdicts(
            &p,
            &[
                connect("github.com", 443),
                connect("github.com", 22),
                connect("api.github.com", 443),
                connect("pypi.org", 443),
            ],
        );
        let allowed: Vec<bool> = got.iter().map(|(a, _)| *a).collect();
        assert_eq!(allowed, [false, true, true, true], "{got:#?}");
        assert!(
            got[0]
                .1
                .contains("redirects this connect to the egress endpoint"),
            "{got:?}"
        );
        // Without request rules the same connect is allowed by its host entry.
        let plain = policy("[network]\nallow = [\"github.com:443\"]\n");
        assert!(verdicts(&plain, &[connect("github.com", 443)])[0].0);
    }

    #[test]
    fn replay_lists_the_requests_a_policy_would_now_deny() {
        let audit = read(&[get("/user"), get("/gists")].join("\n"));
        let r = replay_policy(&policy(RULES), &audit.actions);
        assert_eq!(r.judged, 2);
        assert_eq!(r.not_allowed.len(), 1);
        assert_eq!(r.not_allowed[0].record.line, 2);
        let shown = r.not_allowed[0].to_string();
        assert!(
            shown.starts_with(
                "agent coder task t-42: http api.github.com:443 GET /gists by /usr/bin/python3 > \
                 /bin/sh > /usr/bin/curl: would be DENIED: no [[network.http]] rule allows GET \
                 /gists on api.github.com:443"
            ),
            "{shown}"
        );
    }
}
