//! Suggesting request rules from recorded requests: `[[network.http]]` rules with the methods and
//! the exact normalised paths seen per host and port (`--widen paths` collapses paths into
//! prefixes, by the rules below), and `[[network.tls]]` rules for names that must pass the
//! egress endpoint on their name alone.
//!
//! `--widen paths`, in this order, within the paths recorded with the same methods on one host
//! and port (methods are never widened):
//! 1. **Identifiers.** A segment that looks like an identifier — all digits (`123`), a hex string
//!    of at least 7 characters with a digit (`3f9a1c2`, a commit or a hash), a UUID, or a token of
//!    at least 20 letters, digits, `-` and `_` mixing letters and digits — ends the path: it
//!    becomes the prefix of the segments before it (`/repos/acme/pulls/123/files` →
//!    `/repos/acme/pulls/*`). A rule path's `*` can only end it, so what follows goes too.
//! 2. **Siblings.** Where at least [`WIDEN_PATH_SIBLINGS`] distinct entries lie directly under
//!    one directory, they become that directory's prefix (`/a/b/x`, `/a/b/y`, `/a/b/z` →
//!    `/a/b/*`). One level only: the result is not widened again.
//! 3. Neither step ever produces `/*`: an identifier as the first segment, or siblings directly
//!    under `/`, stay exact. Paths a prefix covers are dropped; rules whose paths come out the
//!    same are merged (their methods joined).

use std::collections::{BTreeMap, BTreeSet};

use crate::intercept::rules::{normalise_path, path_matches};
use crate::learn::audit::{Recorded, RecordedRequest};
use crate::learn::requests::host_is_server_name;
use crate::learn::suggest::{Provenance, clean};

/// Distinct entries under one directory that `--widen paths` turns into `DIR/*`.
pub const WIDEN_PATH_SIBLINGS: usize = 3;
/// Paths named in a widening note; the rest are counted.
const SHOWN_PATHS: usize = 4;

/// What a suggested request rule allows on its host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `[[network.tls]]`: the connection passes on its server name, nothing is decrypted.
    Tls,
    /// `[[network.http]]`: these methods on these paths (upper case; exact or `DIR/*`).
    Http {
        methods: Vec<String>,
        paths: Vec<String>,
    },
}

/// One suggested `[[network.http]]` or `[[network.tls]]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEntry {
    /// A normalised host name.
    pub host: String,
    pub port: u16,
    pub kind: RequestKind,
    pub provenance: Provenance,
    /// Set when the rule allows more than was recorded: how, and what was seen.
    pub widened: Option<String>,
}

impl RequestEntry {
    /// The policy table: `network.http` or `network.tls`.
    pub fn table(&self) -> &'static str {
        match self.kind {
            RequestKind::Tls => "tls",
            RequestKind::Http { .. } => "http",
        }
    }

    /// The rule as one line, as the policy model writes it (`http api.github.com:443 GET /user`).
    pub fn text(&self) -> String {
        match &self.kind {
            RequestKind::Tls => format!("tls {}:{}", self.host, self.port),
            RequestKind::Http { methods, paths } => format!(
                "http {}:{} {} {}",
                self.host,
                self.port,
                methods.join(","),
                paths.join(",")
            ),
        }
    }

    /// The comment lines above the table.
    pub fn comment(&self) -> Vec<String> {
        let mut lines = self.provenance.describe();
        if let Some(w) = &self.widened {
            lines.push(format!("WIDENED {w}"));
        }
        lines
    }
}

/// A method as a rule may list it: an HTTP token without `*`.
fn writable_method(m: &str) -> bool {
    !m.is_empty()
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'+-.^_`|~".contains(c))
}

/// Why a recorded request cannot become part of a rule; else its (host, port, method, path).
fn rule_parts(r: &RecordedRequest) -> Result<(String, String), String> {
    let name = r
        .name()
        .ok_or("no server name or Host was recorded; no rule can allow it")?;
    if let (Some(sni), Some(host)) = (&r.sni, &r.host) {
        host_is_server_name(host, sni, r.port)
            .map_err(|why| format!("{why}: interception refuses it whatever the rules say"))?;
    }
    crate::policy::host::parse_host_pattern(&name)
        .ok()
        .filter(|p| matches!(p, crate::policy::host::HostPattern::Exact(_)))
        .ok_or_else(|| format!("{name:?} cannot be a rule's host name"))?;
    let path = normalise_path(&r.path)
        .map_err(|e| format!("interception refuses the path ({e}); no rule can allow it"))?;
    let judged = path.judged().to_string();
    if judged
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '*' | '?' | '#'))
    {
        return Err(format!(
            "the path {judged:?} cannot be written as an exact rule path ('*', '?', '#', spaces)"
        ));
    }
    Ok((name, judged))
}

/// Per host and port: each path seen with its methods and provenance.
type Seen = BTreeMap<(String, u16), BTreeMap<String, (BTreeSet<String>, Provenance)>>;

/// `[[network.http]]` rules allowing every request of `requests` that a rule can allow (the rest
/// go to `skip` with the reason), exactly unless `widen_paths`.
pub fn http_rules<'a>(
    requests: impl IntoIterator<Item = (&'a Recorded, &'a RecordedRequest)>,
    widen_paths: bool,
    mut skip: impl FnMut(&Recorded, String),
) -> Vec<RequestEntry> {
    let mut seen: Seen = BTreeMap::new();
    for (record, r) in requests {
        if !writable_method(&r.method) {
            skip(
                record,
                format!("the method {:?} cannot be listed in a rule", r.method),
            );
            continue;
        }
        match rule_parts(r) {
            Ok((name, path)) => {
                let (methods, prov) = seen
                    .entry((name, r.port))
                    .or_default()
                    .entry(path)
                    .or_default();
                methods.insert(r.method.clone());
                prov.add(record);
            }
            Err(why) => skip(record, why),
        }
    }
    let mut out = Vec::new();
    for ((host, port), paths) in seen {
        // Paths grouped by the exact set of methods they were seen with: a write seen on one
        // path does not become a write on every path of the host.
        let mut by_methods: BTreeMap<Vec<String>, Vec<(String, Provenance)>> = BTreeMap::new();
        for (path, (methods, prov)) in paths {
            by_methods
                .entry(methods.into_iter().collect())
                .or_default()
                .push((path, prov));
        }
        // After widening, groups whose paths come out the same are one rule.
        let mut by_paths: BTreeMap<Vec<String>, (BTreeSet<String>, Provenance, Vec<String>)> =
            BTreeMap::new();
        for (methods, group) in by_methods {
            let mut prov = Provenance::default();
            for (_, p) in &group {
                prov.merge(p);
            }
            let recorded: Vec<String> = group.into_iter().map(|(p, _)| p).collect();
            let (paths, notes) = if widen_paths {
                widen(&recorded)
            } else {
                (recorded, Vec::new())
            };
            let slot = by_paths.entry(paths).or_default();
            slot.0.extend(methods);
            slot.1.merge(&prov);
            slot.2.extend(notes);
        }
        for (paths, (methods, provenance, notes)) in by_paths {
            out.push(RequestEntry {
                host: host.clone(),
                port,
                kind: RequestKind::Http {
                    methods: methods.into_iter().collect(),
                    paths,
                },
                provenance,
                widened: (!notes.is_empty()).then(|| notes.join("; ")),
            });
        }
    }
    out
}

/// Whether a path segment looks like an identifier (see the module documentation).
pub fn identifier_segment(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let numeric = !s.is_empty() && digits == s.len();
    let hex = s.len() >= 7 && digits > 0 && s.chars().all(|c| c.is_ascii_hexdigit());
    let uuid = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    let token = s.len() >= 20
        && digits > 0
        && s.chars().any(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    numeric || hex || uuid || token
}

/// A rule path in the making: exact, or the directory of a `DIR/*` prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Widened {
    Exact(Vec<String>),
    Under(Vec<String>),
}

impl Widened {
    fn text(&self) -> String {
        match self {
            Widened::Exact(s) if s.is_empty() => "/".into(),
            Widened::Exact(s) => format!("/{}", s.join("/")),
            Widened::Under(s) => format!("/{}/*", s.join("/")),
        }
    }

    /// The path it names (a prefix: its directory), as requests are judged.
    fn judged(&self) -> String {
        match self {
            Widened::Exact(s) | Widened::Under(s) if s.is_empty() => "/".into(),
            Widened::Exact(s) | Widened::Under(s) => format!("/{}", s.join("/")),
        }
    }

    /// (parent, child) for the sibling step; none directly under `/`.
    fn parent_and_child(&self) -> Option<(Vec<String>, String)> {
        let segments = match self {
            Widened::Exact(s) | Widened::Under(s) => s,
        };
        match segments.split_last() {
            Some((child, parent)) if !parent.is_empty() => Some((parent.to_vec(), child.clone())),
            _ => None,
        }
    }
}

/// `--widen paths` on the paths of one rule: the rule paths, sorted, and what was widened.
pub fn widen(recorded: &[String]) -> (Vec<String>, Vec<String>) {
    // Each result with the recorded paths it stands for, and why it was widened.
    let mut items: BTreeMap<Widened, (BTreeSet<String>, BTreeSet<&'static str>)> = BTreeMap::new();
    for path in recorded {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let at = segments
            .iter()
            .skip(1)
            .position(|s| identifier_segment(s))
            .map(|i| i + 1);
        let (item, why) = match at {
            Some(i) => (
                Widened::Under(segments[..i].to_vec()),
                Some("an identifier segment"),
            ),
            None => (Widened::Exact(segments), None),
        };
        let slot = items.entry(item).or_default();
        slot.0.insert(path.clone());
        slot.1.extend(why);
    }
    // Siblings: distinct children per parent directory.
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for item in items.keys() {
        if let Some((parent, child)) = item.parent_and_child() {
            children.entry(parent).or_default().insert(child);
        }
    }
    let mut out: BTreeMap<Widened, (BTreeSet<String>, BTreeSet<&'static str>)> = BTreeMap::new();
    for (item, (seen, why)) in items {
        let target = match item.parent_and_child() {
            Some((parent, _))
                if children
                    .get(&parent)
                    .is_some_and(|c| c.len() >= WIDEN_PATH_SIBLINGS) =>
            {
                Some(Widened::Under(parent))
            }
            _ => None,
        };
        let (key, sibling) = match target {
            Some(t) => (t, true),
            None => (item, false),
        };
        let slot = out.entry(key).or_default();
        slot.0.extend(seen);
        slot.1.extend(why);
        if sibling {
            slot.1.insert("siblings");
        }
    }
    // A path a prefix covers is not listed again.
    let prefixes: Vec<Widened> = out
        .keys()
        .filter(|w| matches!(w, Widened::Under(_)))
        .cloned()
        .collect();
    let mut kept: BTreeMap<Widened, (BTreeSet<String>, BTreeSet<&'static str>)> = BTreeMap::new();
    for (item, (seen, why)) in out {
        // The shortest covering prefix: nothing covers it in turn.
        let cover = prefixes
            .iter()
            .filter(|p| **p != item && path_matches(&p.text(), &item.judged()))
            .min_by_key(|p| (p.judged().len(), (*p).clone()));
        let slot = kept.entry(cover.cloned().unwrap_or(item)).or_default();
        slot.0.extend(seen);
        slot.1.extend(why);
    }
    // In the order of the rule paths' text, so the output reads sorted.
    let kept: BTreeMap<String, (Widened, BTreeSet<String>, BTreeSet<&'static str>)> = kept
        .into_iter()
        .map(|(item, (seen, why))| (item.text(), (item, seen, why)))
        .collect();
    let mut paths = Vec::new();
    let mut notes = Vec::new();
    for (text, (item, seen, why)) in kept {
        if matches!(item, Widened::Under(_)) {
            let reasons: Vec<String> = why
                .iter()
                .map(|w| match *w {
                    "siblings" => {
                        format!("{WIDEN_PATH_SIBLINGS} or more entries under one directory")
                    }
                    other => other.to_string(),
                })
                .collect();
            let shown: Vec<String> = seen.iter().take(SHOWN_PATHS).map(|s| clean(s)).collect();
            let more = match seen.len().saturating_sub(SHOWN_PATHS) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            notes.push(format!(
                "by --widen paths: {} ({}) for seen {}{more}",
                clean(&text),
                reasons.join(", "),
                shown.join(", ")
            ));
        }
        paths.push(text);
    }
    (paths, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widened(paths: &[&str]) -> Vec<String> {
        let recorded: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        widen(&recorded).0
    }

    #[test]
    fn identifiers_are_recognised() {
        for s in [
            "1",
            "123",
            "3f9a1c2",
            "0123456789abcdef0123456789abcdef01234567",
            "123e4567-e89b-12d3-a456-426614174000",
            "AKIAxxxxxxxx1234567890",
        ] {
            assert!(identifier_segment(s), "{s}");
        }
        for s in [
            "", "repos", "acme", "v1", "deadbeef", "issues", "abc123", "face", "x-1",
        ] {
            assert!(!identifier_segment(s), "{s}");
        }
    }

    #[test]
    fn identifiers_end_the_path_but_never_at_the_root() {
        assert_eq!(
            widened(&["/repos/acme/pulls/123/files", "/repos/acme/pulls/456"]),
            ["/repos/acme/pulls/*"]
        );
        assert_eq!(widened(&["/123", "/456/x"]), ["/123", "/456/x"]);
        assert_eq!(
            widened(&["/git/3f9a1c2d/info"]),
            ["/git/*"],
            "a hash right under the first segment"
        );
    }

    #[test]
    fn three_siblings_become_their_directory() {
        assert_eq!(
            widened(&["/a/b/x", "/a/b/y", "/user"]),
            ["/a/b/x", "/a/b/y", "/user"],
            "two siblings stay exact"
        );
        assert_eq!(
            widened(&["/a/b/x", "/a/b/y", "/a/b/z", "/user"]),
            ["/a/b/*", "/user"]
        );
        assert_eq!(
            widened(&["/x", "/y", "/z", "/w"]),
            ["/w", "/x", "/y", "/z"],
            "never /*"
        );
        // One level only: /a/b/* and two more under /a do not become /a/*.
        assert_eq!(
            widened(&["/a/b/x", "/a/b/y", "/a/b/z", "/a/c", "/a/d"]),
            ["/a/b/*", "/a/c", "/a/d"]
        );
    }

    #[test]
    fn covered_paths_are_dropped_and_notes_say_what_was_seen() {
        let recorded: Vec<String> = ["/r/a/1", "/r/a", "/r/a/2/x", "/other"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let (paths, notes) = widen(&recorded);
        assert_eq!(paths, ["/other", "/r/a/*"]);
        assert_eq!(
            notes,
            ["by --widen paths: /r/a/* (an identifier segment) for seen /r/a, /r/a/1, /r/a/2/x"]
        );
    }

    #[test]
    fn widening_is_deterministic_whatever_the_order() {
        let mut a = vec!["/s/1", "/s/t/u", "/s/t/v", "/s/t/w", "/q"];
        let first = widened(&a);
        a.reverse();
        assert_eq!(widened(&a), first);
        assert_eq!(first, ["/q", "/s/*"]);
    }
}

/// Suggest → write → parse with the daemon's parser → replay: every recorded request a rule can
/// allow is allowed, and (without widening) nothing else.
#[cfg(test)]
mod round_trip_tests {
    use std::path::Path;

    use crate::action::Verdict;
    use crate::learn::audit::tests::{connect_line, read};
    use crate::learn::render::{add_entries, add_request_rules, check, parse_document, skeleton};
    use crate::learn::replay::{judge, replay_policy};
    use crate::learn::requests::tests::request_line;
    use crate::learn::suggest::{SuggestOptions, suggest, suggest_for};
    use crate::policy::Policy;

    fn req(host: &str, method: &str, path: &str, verdict: Verdict) -> String {
        request_line("coder", host, host, 443, method, path, verdict)
    }

    fn trail() -> Vec<String> {
        vec![
            req("api.github.com", "GET", "/user", Verdict::Allowed),
            req("api.github.com", "HEAD", "/user/", Verdict::Allowed),
            req(
                "api.github.com",
                "GET",
                "/repos/acme/x/issues/1",
                Verdict::Allowed,
            ),
            req(
                "api.github.com",
                "GET",
                "/repos/acme/x/issues/2",
                Verdict::Allowed,
            ),
            req(
                "api.github.com",
                "POST",
                "/repos/acme/x/issues",
                Verdict::Denied,
            ),
            // Domain fronting: no rule can allow it.
            request_line(
                "coder",
                "api.github.com",
                "evil.test",
                443,
                "GET",
                "/",
                Verdict::Denied,
            ),
            connect_line(
                "coder",
                "t",
                "10.0.0.1",
                443,
                r#","dest_host":"api.github.com""#,
            ),
            connect_line("coder", "t", "10.0.0.2", 443, r#","dest_host":"pypi.org""#),
            connect_line("coder", "t", "10.9.9.9", 22, ""),
        ]
    }

    fn written(lines: &[String], opts: &SuggestOptions) -> (String, Policy) {
        let audit = read(&lines.join("\n"));
        assert_eq!(audit.problems, []);
        let s = suggest(&audit.actions, opts);
        let mut doc = skeleton("coder", &["header".into()]);
        add_entries(&mut doc, &s.entries, Path::new("s.toml")).expect("fresh");
        let added = add_request_rules(&mut doc, &s.requests, Path::new("s.toml")).expect("fresh");
        assert_eq!(added.len(), s.requests.len());
        let text = doc.to_string();
        let policy = check(&text, Path::new("s.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (text, policy)
    }

    fn probe(p: &Policy, method: &str, path: &str) -> bool {
        let audit = read(&req("api.github.com", method, path, Verdict::Allowed));
        judge(p, &audit.actions[0].what).expect("judged").allowed
    }

    #[test]
    fn suggested_rules_allow_every_recorded_request_and_no_other() {
        for widen_paths in [false, true] {
            let opts = SuggestOptions {
                host_names: true,
                widen_paths,
                ..SuggestOptions::default()
            };
            let lines = trail();
            let (text, policy) = written(&lines, &opts);
            let audit = read(&lines.join("\n"));
            let refused: Vec<usize> = replay_policy(&policy, &audit.actions)
                .not_allowed
                .iter()
                .map(|f| f.record.line)
                .collect();
            assert_eq!(refused, [6], "only the fronted request\n{text}");
            // The host entry for api.github.com:443 is implied by its HTTP rules; pypi.org:443,
            // a learned address on a port with request rules, needs a server-name rule.
            let hosts: Vec<&str> = policy.network().iter().map(|r| r.text()).collect();
            assert_eq!(hosts, ["10.9.9.9:22"], "{text}");
            let tls: Vec<&str> = policy.egress().tls().iter().map(|r| r.text()).collect();
            assert_eq!(tls, ["tls pypi.org:443"], "{text}");
            // Writes stay as narrow as recorded, with or without widening.
            assert!(probe(&policy, "POST", "/repos/acme/x/issues"));
            assert!(!probe(&policy, "POST", "/repos/acme/x/issues/3"), "{text}");
            assert!(!probe(&policy, "POST", "/user"), "{text}");
            assert!(!probe(&policy, "DELETE", "/repos/acme/x"), "{text}");
            assert!(!probe(&policy, "GET", "/gists"), "{text}");
            assert_eq!(
                probe(&policy, "GET", "/repos/acme/x/issues/3"),
                widen_paths,
                "{text}"
            );
        }
    }

    #[test]
    fn a_suggestion_reads_as_rules_with_their_provenance() {
        let opts = SuggestOptions {
            host_names: true,
            widen_paths: true,
            ..SuggestOptions::default()
        };
        let (text, policy) = written(&trail(), &opts);
        let http: Vec<&str> = policy.egress().http().iter().map(|r| r.text()).collect();
        assert_eq!(
            http,
            [
                "http api.github.com:443 POST /repos/acme/x/issues",
                "http api.github.com:443 GET /repos/acme/x/issues/*",
                "http api.github.com:443 GET,HEAD /user",
            ],
            "{text}"
        );
        assert!(
            text.contains(
                "# seen once (denied 1), at 2025-11-29T11:44:00Z; audit line 5\n\
                 # tasks: t-42\n\
                 # by: /usr/bin/python3 > /bin/sh > /usr/bin/curl\n\
                 [[network.http]]\n\
                 host = \"api.github.com\"\n\
                 port = 443\n\
                 methods = [\"POST\"]\n\
                 paths = [\"/repos/acme/x/issues\"]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "# WIDENED by --widen paths: /repos/acme/x/issues/* (an identifier segment) for \
                 seen /repos/acme/x/issues/1, /repos/acme/x/issues/2\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn merging_adds_only_what_the_policy_does_not_allow() {
        let existing = "agent = \"coder\"\n\
                        [network]\nallow = [\"10.9.9.9:22\"]\n\
                        [[network.http]]\nhost = \"api.github.com\"\nport = 443\n\
                        methods = [\"GET\", \"HEAD\"]\npaths = [\"/user\"]\n";
        let base = Policy::parse(existing, Path::new("c.toml")).expect("valid");
        let lines = trail();
        let audit = read(&lines.join("\n"));
        let wanted: Vec<_> = audit
            .actions
            .iter()
            .filter(|r| judge(&base, &r.what).is_some_and(|d| !d.allowed))
            .collect();
        let opts = SuggestOptions {
            host_names: true,
            ..SuggestOptions::default()
        };
        let s = suggest_for(wanted.iter().copied(), &opts, Some(&base));
        let mut doc = parse_document(existing, Path::new("c.toml")).expect("toml");
        add_entries(&mut doc, &s.entries, Path::new("c.toml")).expect("entries");
        let added =
            add_request_rules(&mut doc, &s.requests, Path::new("c.toml")).expect("request rules");
        let added: Vec<String> = added.iter().map(|r| r.text()).collect();
        assert_eq!(
            added,
            [
                "http api.github.com:443 POST /repos/acme/x/issues",
                "http api.github.com:443 GET /repos/acme/x/issues/1,/repos/acme/x/issues/2",
                "tls pypi.org:443",
            ]
        );
        let text = doc.to_string();
        assert!(text.starts_with("agent = \"coder\"\n"), "{text}");
        let merged = check(&text, Path::new("c.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let refused: Vec<usize> = replay_policy(&merged, &audit.actions)
            .not_allowed
            .iter()
            .map(|f| f.record.line)
            .collect();
        assert_eq!(refused, [6], "{text}");
        // Adding the same again adds nothing.
        let mut again = parse_document(&text, Path::new("c.toml")).expect("toml");
        assert_eq!(
            add_request_rules(&mut again, &s.requests, Path::new("c.toml"))
                .expect("again")
                .len(),
            0
        );
    }

    #[test]
    fn an_inline_network_table_becomes_a_table_to_hold_the_rules() {
        let existing = "agent = \"coder\"\nnetwork = { allow = [\"10.9.9.9:22\"] }\n";
        let audit = read(&trail()[..1].join("\n"));
        let s = suggest(&audit.actions, &SuggestOptions::default());
        let mut doc = parse_document(existing, Path::new("c.toml")).expect("toml");
        add_request_rules(&mut doc, &s.requests, Path::new("c.toml")).expect("rules");
        let text = doc.to_string();
        let p = check(&text, Path::new("c.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(p.network().len(), 1, "{text}");
        assert_eq!(p.egress().http().len(), 1, "{text}");
    }
}
