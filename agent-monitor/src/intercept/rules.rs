//! Judging one HTTP request against an agent's method/path rules: method and path normalisation
//! and matching. Pure: no I/O, no TLS, no hyper types.
//!
//! Path normalisation (the form that is judged AND the form that is sent upstream, so the server
//! never sees a path other than the one judged):
//! - the path must be absolute (`/…`); the query is not judged and is passed on unchanged;
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes are
//!   kept with upper-case hex (RFC 3986 §6.2.2); a malformed escape is refused;
//! - an encoded `/` (`%2F`) or `\` (`%5C`), an encoded NUL (`%00`) and a raw `\` are refused: servers
//!   disagree on whether they separate segments, so a rule cannot say what they reach;
//! - empty segments (`//`) and `.` segments are removed, `..` removes the segment before it; a `..`
//!   that would climb above `/` is refused (the path tries to escape);
//! - a trailing slash is kept in what is sent upstream, but ignored for matching: `/user/` is
//!   judged as `/user`.
//!
//! Rule paths are exact (`/user`) or prefix globs ending in `*`: `/repos/acme/*` covers
//! `/repos/acme` and everything below it, `/repos/ac*` every path starting with `/repos/ac`.
//! Methods compare upper-cased; a rule method `*` covers every method.

use std::fmt;

/// One method/path rule, as the policy wrote it (the lead converts the policy model's rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// An exact name (`api.github.com`) or `*.domain` (every name below `domain`, not `domain`).
    pub host: String,
    pub port: u16,
    /// `GET`, `post`, … (compared upper-cased); `*` for any method.
    pub methods: Vec<String>,
    /// Exact paths or prefix globs with a trailing `*`.
    pub paths: Vec<String>,
    /// The rule as written, for reports and 403 bodies.
    pub text: String,
    /// Its line in the policy file.
    pub line: usize,
}

/// Why a request path cannot be judged: the request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is not absolute (does not start with /)")]
    NotAbsolute,
    #[error("malformed percent-escape in the path")]
    BadEscape,
    #[error("the path contains an encoded slash, backslash or NUL ({0})")]
    AmbiguousEscape(String),
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path climbs above / with ..")]
    Escapes,
}

/// A path in normal form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalPath {
    /// What is sent upstream (trailing slash kept).
    pub forward: String,
}

impl NormalPath {
    /// What rules are matched against: without a trailing slash (except `/` itself).
    pub fn judged(&self) -> &str {
        match self.forward.strip_suffix('/') {
            Some(head) if !head.is_empty() => head,
            _ => &self.forward,
        }
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.forward)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decode escaped unreserved characters, upper-case the others; refuse the ambiguous ones.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (hex(h), hex(l)),
                    _ => return Err(PathError::BadEscape),
                };
                let (Some(h), Some(l)) = (h, l) else {
                    return Err(PathError::BadEscape);
                };
                let value = h << 4 | l;
                if unreserved(value) {
                    out.push(value as char);
                } else if matches!(value, b'/' | b'\\' | 0) {
                    return Err(PathError::AmbiguousEscape(format!("%{value:02X}")));
                } else {
                    out.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // The request line is ASCII for hyper (http::Uri); other bytes pass as they are.
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8().max(1);
            }
        }
    }
    Ok(out)
}

/// Normalise a request path (without its query), as the module documentation says.
pub fn normalise_path(path: &str) -> Result<NormalPath, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::Escapes);
                }
            }
            s => segments.push(s),
        }
    }
    let mut forward = String::with_capacity(decoded.len());
    for s in &segments {
        forward.push('/');
        forward.push_str(s);
    }
    // A trailing slash (or a last `.`/`..` segment, which names a directory) stays a slash.
    let last = decoded.rsplit('/').next().unwrap_or("");
    if forward.is_empty() || matches!(last, "" | "." | "..") {
        forward.push('/');
    }
    Ok(NormalPath { forward })
}

/// The request method in the form rules compare: upper case.
pub fn normalise_method(method: &str) -> String {
    method.to_ascii_uppercase()
}

/// A host name as rules compare it: lower case, without a trailing dot.
pub fn normalise_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the rule's host pattern covers the normalised `name` (as `network.allow` host rules:
/// `*.example.com` covers names below `example.com`, not `example.com` itself).
pub fn host_matches(pattern: &str, name: &str) -> bool {
    let pattern = normalise_host(pattern);
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .strip_suffix(parent)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == name,
    }
}

/// Whether a rule path (exact or trailing-`*` prefix glob) covers the judged path.
pub fn path_matches(rule: &str, judged: &str) -> bool {
    match rule.strip_suffix('*') {
        Some(prefix) => match prefix.strip_suffix('/') {
            // `/repos/acme/*`: `/repos/acme` itself and everything below it.
            Some(dir) => judged == dir || judged.starts_with(prefix),
            None => judged.starts_with(prefix),
        },
        None => {
            let rule = match rule.strip_suffix('/') {
                Some(head) if !head.is_empty() => head,
                _ => rule,
            };
            rule == judged
        }
    }
}

fn method_matches(rule: &str, method: &str) -> bool {
    rule == "*" || rule.eq_ignore_ascii_case(method)
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement<'r> {
    Allowed(&'r Rule),
    /// Why not, naming what is missing (the 403 body and the report say it).
    Denied(String),
}

/// Judge a request: `name` is the server name (normalised), `method` and `path` as received.
pub fn judge<'r>(
    rules: &'r [Rule],
    name: &str,
    port: u16,
    method: &str,
    path: &NormalPath,
) -> Judgement<'r> {
    let method = normalise_method(method);
    let judged = path.judged();
    let for_host: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.port == port && host_matches(&r.host, name))
        .collect();
    if for_host.is_empty() {
        return Judgement::Denied(format!("no [[network.http]] rule for {name}:{port}"));
    }
    if let Some(rule) = for_host.iter().find(|r| {
        r.methods.iter().any(|m| method_matches(m, &method))
            && r.paths.iter().any(|p| path_matches(p, judged))
    }) {
        return Judgement::Allowed(rule);
    }
    let method_ok = for_host
        .iter()
        .any(|r| r.methods.iter().any(|m| method_matches(m, &method)));
    let what = if method_ok {
        format!("path {judged}")
    } else {
        format!("method {method}")
    };
    let near: Vec<String> = for_host
        .iter()
        .map(|r| format!("line {}: {}", r.line, r.text))
        .collect();
    Judgement::Denied(format!(
        "no [[network.http]] rule allows {method} {judged} on {name}:{port} ({what} not listed; \
         rules for this host: {})",
        near.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalise_path(p).map(|n| n.forward)
    }

    #[test]
    fn paths_normalise() {
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/a/b").unwrap(), "/a/b");
        assert_eq!(norm("//a///b").unwrap(), "/a/b");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/").unwrap(), "/a/");
        assert_eq!(norm("/%7Euser/%61%62").unwrap(), "/~user/ab");
        assert_eq!(norm("/a%20b/%c3%a9").unwrap(), "/a%20b/%C3%A9");
        assert_eq!(norm("/a/%2e%2E/b").unwrap(), "/b", "encoded dots are dots");
        assert_eq!(norm("/ä").unwrap(), "/ä");
    }

    #[test]
    fn escaping_and_ambiguous_paths_are_refused() {
        assert_eq!(norm("/.."), Err(PathError::Escapes));
        assert_eq!(norm("/a/../../etc"), Err(PathError::Escapes));
        assert_eq!(norm("/%2e%2e/x"), Err(PathError::Escapes));
        assert_eq!(
            norm("/a/..%2f..%2fx"),
            Err(PathError::AmbiguousEscape("%2F".into()))
        );
        assert_eq!(
            norm("/a%5cb"),
            Err(PathError::AmbiguousEscape("%5C".into()))
        );
        assert_eq!(norm("/a%00"), Err(PathError::AmbiguousEscape("%00".into())));
        assert_eq!(norm("/a\\..\\b"), Err(PathError::Backslash));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%4"), Err(PathError::BadEscape));
        assert_eq!(norm("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn judged_form_ignores_the_trailing_slash() {
        assert_eq!(normalise_path("/user/").unwrap().judged(), "/user");
        assert_eq!(normalise_path("/").unwrap().judged(), "/");
        assert_eq!(normalise_path("//").unwrap().judged(), "/");
    }

    #[test]
    fn hosts_match_like_network_allow() {
        assert!(host_matches("api.github.com", "api.github.com"));
        assert!(host_matches("API.GitHub.com.", "api.github.com"));
        assert!(!host_matches("api.github.com", "github.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert_eq!(normalise_host("A.Example.COM."), "a.example.com");
    }

    #[test]
    fn path_globs() {
        assert!(path_matches("/user", "/user"));
        assert!(path_matches("/user/", "/user"));
        assert!(!path_matches("/user", "/user/x"));
        assert!(!path_matches("/user", "/users"));
        assert!(path_matches("/repos/acme/*", "/repos/acme"));
        assert!(path_matches("/repos/acme/*", "/repos/acme/x/y"));
        assert!(!path_matches("/repos/acme/*", "/repos/acmeevil"));
        assert!(!path_matches("/repos/acme/*", "/repos/other"));
        assert!(path_matches("/repos/ac*", "/repos/acmeevil"));
        assert!(path_matches("/*", "/"));
        assert!(path_matches("/*", "/anything/at/all"));
        assert!(path_matches("*", "/x"));
    }

    fn rule(host: &str, methods: &[&str], paths: &[&str], line: usize) -> Rule {
        Rule {
            host: host.into(),
            port: 443,
            methods: methods.iter().map(|m| m.to_string()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            text: format!("{host} {methods:?} {paths:?}"),
            line,
        }
    }

    fn judge_str(rules: &[Rule], host: &str, method: &str, path: &str) -> Result<usize, String> {
        let path = normalise_path(path).unwrap();
        match judge(rules, host, 443, method, &path) {
            Judgement::Allowed(r) => Ok(r.line),
            Judgement::Denied(why) => Err(why),
        }
    }

    #[test]
    fn requests_are_judged_by_method_path_host_and_port() {
        let rules = vec![
            rule(
                "api.github.com",
                &["GET", "head"],
                &["/repos/acme/*", "/user"],
                3,
            ),
            rule("*.example.com", &["*"], &["/*"], 9),
        ];
        assert_eq!(judge_str(&rules, "api.github.com", "GET", "/user"), Ok(3));
        assert_eq!(judge_str(&rules, "api.github.com", "get", "/user/"), Ok(3));
        assert_eq!(
            judge_str(&rules, "api.github.com", "HEAD", "/repos/acme/x"),
            Ok(3)
        );
        assert_eq!(
            judge_str(&rules, "api.github.com", "GET", "/repos/acme/../evil/x")
                .unwrap_err()
                .contains("path /repos/evil/x not listed"),
            true
        );
        let post = judge_str(&rules, "api.github.com", "POST", "/user").unwrap_err();
        assert!(post.contains("method POST not listed"), "{post}");
        assert!(post.contains("line 3"), "{post}");
        assert_eq!(judge_str(&rules, "a.example.com", "DELETE", "/x"), Ok(9));
        let other = judge_str(&rules, "github.com", "GET", "/user").unwrap_err();
        assert_eq!(other, "no [[network.http]] rule for github.com:443");
        let path = normalise_path("/user").unwrap();
        assert!(matches!(
            judge(&rules, "api.github.com", 8443, "GET", &path),
            Judgement::Denied(_)
        ));
    }

    #[test]
    fn no_rules_deny_everything() {
        let path = normalise_path("/").unwrap();
        assert!(matches!(
            judge(&[], "a.example", 443, "GET", &path),
            Judgement::Denied(_)
        ));
    }
}
