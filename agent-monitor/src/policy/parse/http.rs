//! `[[network.http]]` and `[[network.tls]]`: the raw shape and its validation into request rules
//! (`policy/http.rs`). Each rule's name also becomes a host rule for its port, so the DNS proxy
//! resolves it and the kernel learns its addresses.

use agent_monitor_common::{MAX_PORT_RANGES, PortRange};
use serde::Deserialize;
use toml::Spanned;

use super::{Issue, LineIndex, Reason};
use crate::policy::host::{self, HostPattern, HostRule};
use crate::policy::http::{EgressRules, HttpRule, TlsRule};

/// `[network]`: address and host entries, and the request rules.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    #[serde(default)]
    pub(crate) allow: Vec<Spanned<String>>,
    #[serde(default)]
    http: Vec<Spanned<RawHttp>>,
    #[serde(default)]
    tls: Vec<Spanned<RawTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    host: Spanned<String>,
    port: Spanned<i64>,
    methods: Spanned<Vec<Spanned<String>>>,
    paths: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    host: Spanned<String>,
    port: Spanned<i64>,
}

/// Validates the request rules; problems go to `issues`. Returns the rules and the host rules
/// their names imply.
pub(crate) fn parse_request_rules(
    raw: &RawNetwork,
    lines: &LineIndex<'_>,
    issues: &mut Vec<Issue>,
) -> (EgressRules, Vec<HostRule>) {
    let mut rules = EgressRules::default();
    let mut hosts = Vec::new();
    let mut value = |at: usize, field: String, value: String, reason: Reason| {
        issues.push(Issue::Value {
            at: lines.location(at),
            field,
            value,
            reason,
        });
    };
    for (i, entry) in raw.http.iter().enumerate() {
        let r = entry.get_ref();
        let field = format!("network.http[{i}]");
        let host = check_host(&r.host, &field, &mut value);
        let port = check_port(&r.port, &field, &mut value);
        let methods = check_list(
            &r.methods,
            &format!("{field}.methods"),
            Reason::HttpMethodsEmpty,
            check_method,
            &mut value,
        );
        let paths = check_list(
            &r.paths,
            &format!("{field}.paths"),
            Reason::HttpPathsEmpty,
            |p| check_path(p).map(|()| p.to_string()),
            &mut value,
        );
        let complete = methods.len() == r.methods.get_ref().len()
            && paths.len() == r.paths.get_ref().len()
            && !methods.is_empty()
            && !paths.is_empty();
        if let (Some(host), Some(port), true) = (host, port, complete) {
            let line = lines.line_col(entry.span().start).0;
            let text = format!(
                "http {host}:{port} {} {}",
                methods.join(","),
                paths.join(",")
            );
            hosts.push(implied_host(&host, port, &text, line));
            rules.http.push(HttpRule {
                host,
                port,
                methods,
                paths,
                text,
                line,
            });
        }
    }
    for (i, entry) in raw.tls.iter().enumerate() {
        let r = entry.get_ref();
        let field = format!("network.tls[{i}]");
        let host = check_host(&r.host, &field, &mut value);
        let port = check_port(&r.port, &field, &mut value);
        if let (Some(host), Some(port)) = (host, port) {
            let line = lines.line_col(entry.span().start).0;
            let text = format!("tls {host}:{port}");
            hosts.push(implied_host(&host, port, &text, line));
            rules.tls.push(TlsRule {
                host,
                port,
                text,
                line,
            });
        }
    }
    // One kernel entry per agent holds the ports that go to the egress endpoint.
    let ports = rules.ports();
    if ports.len() > MAX_PORT_RANGES
        && let Some(first) = raw
            .http
            .first()
            .map(|e| e.span().start)
            .or(raw.tls.first().map(|e| e.span().start))
    {
        issues.push(Issue::Value {
            at: lines.location(first),
            field: "network.http/network.tls".into(),
            value: format!("{} ports", ports.len()),
            reason: Reason::EgressPorts {
                max: MAX_PORT_RANGES,
            },
        });
    }
    (rules, hosts)
}

/// Checks each value of a list that must not be empty; returns the good ones, normalised.
fn check_list(
    list: &Spanned<Vec<Spanned<String>>>,
    field: &str,
    empty: Reason,
    check: impl Fn(&str) -> Result<String, Reason>,
    value: &mut impl FnMut(usize, String, String, Reason),
) -> Vec<String> {
    if list.get_ref().is_empty() {
        value(list.span().start, field.to_string(), "[]".into(), empty);
    }
    let mut good = Vec::new();
    for (j, item) in list.get_ref().iter().enumerate() {
        match check(item.get_ref()) {
            Ok(v) => good.push(v),
            Err(reason) => value(
                item.span().start,
                format!("{field}[{j}]"),
                item.get_ref().clone(),
                reason,
            ),
        }
    }
    good
}

fn implied_host(host: &HostPattern, port: u16, text: &str, line: usize) -> HostRule {
    HostRule {
        pattern: host.clone(),
        ports: PortRange { lo: port, hi: port },
        text: text.to_string(),
        line,
    }
}

fn check_host(
    host: &Spanned<String>,
    field: &str,
    value: &mut impl FnMut(usize, String, String, Reason),
) -> Option<HostPattern> {
    let text = host.get_ref();
    let parsed = if text.contains(':') {
        Err(Reason::PatternWithPort)
    } else {
        host::parse_host_pattern(text)
    };
    parsed
        .map_err(|reason| {
            value(
                host.span().start,
                format!("{field}.host"),
                text.clone(),
                reason,
            )
        })
        .ok()
}

fn check_port(
    port: &Spanned<i64>,
    field: &str,
    value: &mut impl FnMut(usize, String, String, Reason),
) -> Option<u16> {
    let n = *port.get_ref();
    match u16::try_from(n) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            let reason = if n == 0 {
                Reason::PortZero
            } else {
                Reason::PortTooLarge(n.to_string())
            };
            value(
                port.span().start,
                format!("{field}.port"),
                n.to_string(),
                reason,
            );
            None
        }
    }
}

/// An HTTP method: a token (RFC 9110 §5.6.2), compared in upper case; `*` is any method.
fn check_method(m: &str) -> Result<String, Reason> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if m == "*" || (!m.is_empty() && m.chars().all(token) && !m.contains('*')) {
        Ok(m.to_ascii_uppercase())
    } else {
        Err(Reason::HttpMethod)
    }
}

/// A path rule: absolute, normal (no `//`, `.` or `..` segments, no trailing `/` but the root's),
/// printable, no query or fragment; a `*` only at the end (a prefix).
fn check_path(p: &str) -> Result<(), Reason> {
    if !p.starts_with('/') {
        return Err(Reason::HttpPath("must start with /"));
    }
    if p.chars()
        .any(|c| c.is_ascii_control() || c.is_whitespace() || c == '?' || c == '#')
    {
        return Err(Reason::HttpPath(
            "no spaces, control characters, '?' or '#' (the query is not judged)",
        ));
    }
    let body = p.strip_suffix('*').unwrap_or(p);
    if body.contains('*') {
        return Err(Reason::HttpPath(
            "'*' is only allowed at the end, as a prefix",
        ));
    }
    let exact = body.len() == p.len();
    let segments: Vec<&str> = body[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        if *s == "." || *s == ".." || (s.is_empty() && i != last) {
            return Err(Reason::HttpPath(
                "must be normal: no //, /./ or /../ (requests are judged normalised)",
            ));
        }
    }
    if exact && p.len() > 1 && p.ends_with('/') {
        return Err(Reason::HttpPath(
            "no trailing / (requests are judged without it); /DIR/* covers what is below DIR",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::model::Policy;

    fn parse_err(body: &str) -> String {
        let text = format!("agent = \"t\"\n{body}");
        match Policy::parse(&text, Path::new("t.toml")) {
            Ok(p) => panic!("parsed: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn http(host: &str, port: &str, methods: &str, paths: &str) -> String {
        format!(
            "[[network.http]]\nhost = {host:?}\nport = {port}\nmethods = {methods}\npaths = {paths}\n"
        )
    }

    #[test]
    fn bad_request_rules_and_wrong_types_name_file_line_column_and_what_was_expected() {
        let cases = [
            (
                http("a.test:443", "443", "[\"GET\"]", "[\"/\"]"),
                "t.toml:3:8: network.http[0].host \"a.test:443\": expected a host name without a port",
            ),
            (
                http("a.test", "0", "[\"GET\"]", "[\"/\"]"),
                "t.toml:4:8: network.http[0].port \"0\": port 0 is not allowed",
            ),
            (
                http("a.test", "70000", "[\"GET\"]", "[\"/\"]"),
                "t.toml:4:8: network.http[0].port \"70000\": port 70000 is out of range",
            ),
            (
                http("a.test", "443", "[\"GE T\"]", "[\"/\"]"),
                "t.toml:5:12: network.http[0].methods[0] \"GE T\": expected an HTTP method",
            ),
            (
                http("a.test", "443", "[]", "[\"/\"]"),
                "t.toml:5:11: network.http[0].methods \"[]\": expected at least one method",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[]"),
                "t.toml:6:9: network.http[0].paths \"[]\": expected at least one path",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"repos\"]"),
                "t.toml:6:10: network.http[0].paths[0] \"repos\": must start with /",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"/a/*/b\"]"),
                "'*' is only allowed at the end",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"/a/../b\"]"),
                "must be normal",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"/a//b\"]"),
                "must be normal",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"/a/\"]"),
                "no trailing /",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "[\"/a?x=1\"]"),
                "the query is not judged",
            ),
            (
                "[[network.tls]]\nhost = \"*.x.*\"\nport = 443\n".to_string(),
                "t.toml:3:8: network.tls[0].host \"*.x.*\": '*' is only allowed as the first label",
            ),
            (
                "[[network.tls]]\nhost = \"a.test\"\n".to_string(),
                "missing field `port`",
            ),
            (
                (1..=17)
                    .map(|p| format!("[[network.tls]]\nhost = \"a.test\"\nport = {p}\n"))
                    .collect::<String>(),
                "t.toml:2:1: network.http/network.tls \"17 ports\": request rules name at most 16 ports",
            ),
            (
                "[[network.tls]]\nhost = \"a.test\"\nport = 443\nsni = true\n".to_string(),
                "unknown field `sni`",
            ),
            // Wrong types and missing fields.
            (
                http("a.test", "\"443\"", "[\"GET\"]", "[\"/\"]"),
                "t.toml:4:8: invalid type: string \"443\", expected i64",
            ),
            (
                http("a.test", "443", "\"GET\"", "[\"/\"]"),
                "t.toml:5:11: invalid type: string \"GET\", expected a sequence",
            ),
            (
                http("a.test", "443", "[\"GET\"]", "\"/\""),
                "t.toml:6:9: invalid type: string \"/\", expected a sequence",
            ),
            (
                http("a.test", "443", "[1]", "[\"/\"]"),
                "t.toml:5:12: invalid type: integer `1`, expected a string",
            ),
            (
                "[[network.http]]\nhost = \"a.test\"\nport = 443\nmethods = [\"GET\"]\n".into(),
                "t.toml:2:1: missing field `paths`",
            ),
            (
                "[[network.http]]\nport = 443\nmethods = [\"GET\"]\npaths = [\"/\"]\n".into(),
                "t.toml:2:1: missing field `host`",
            ),
            (
                format!(
                    "{}verbs = [\"GET\"]\n",
                    http("a.test", "443", "[\"GET\"]", "[\"/\"]")
                ),
                "t.toml:7:1: unknown field `verbs`, expected one of `host`, `port`, `methods`, `paths`",
            ),
            (
                "[network]\nhttp = { host = \"a.test\" }\n".into(),
                "t.toml:3:8: invalid type: map, expected a sequence",
            ),
            (
                http("*.a.test", "443", "[\"GET\", \"\"]", "[\"/*\"]"),
                "t.toml:5:19: network.http[0].methods[1] \"\": expected an HTTP method",
            ),
        ];
        for (body, want) in cases {
            let msg = parse_err(&body);
            assert!(msg.contains(want), "{body}\n→ {msg}\nwanted {want:?}");
        }
    }

    #[test]
    fn good_paths_and_methods() {
        for p in ["/", "/*", "/user", "/repos/acme/*", "/a/b.c/-_~%20"] {
            assert_eq!(super::check_path(p), Ok(()), "{p}");
        }
        for m in ["GET", "get", "PROPFIND", "*", "M-SEARCH"] {
            assert!(super::check_method(m).is_ok(), "{m}");
        }
        assert_eq!(super::check_method("get").unwrap(), "GET");
        assert!(super::check_method("").is_err());
        assert!(super::check_method("G*").is_err());
    }
}
