//! From recorded actions to allowlist entries: exactly what was recorded, widened only when asked,
//! each entry with its provenance (how often, when, by which tasks and process chains).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::learn::audit::{Recorded, What};
use crate::learn::request_rules::{RequestEntry, RequestKind, http_rules};
use crate::policy::{Policy, parse_exec, valid_net_entry};

/// How far a suggestion may go beyond what was recorded. All off: exactly what was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuggestOptions {
    /// Several ports to one destination → one range from the lowest to the highest.
    pub widen_ports: bool,
    /// Several addresses in one IPv4 /24 (IPv6 /64) with the same ports → that network.
    pub widen_cidr: bool,
    /// Several programs in one directory → `dir/*`.
    pub widen_globs: bool,
    /// Write `host:port` where the trail names the host (`dest_host`) and the policy format takes
    /// host names; otherwise the address, with the names in the comment.
    pub host_names: bool,
    /// Paths of `[[network.http]]` rules → prefixes (`learn::request_rules` says when).
    pub widen_paths: bool,
}

/// IPv4 addresses sharing this prefix are merged by `--widen cidr`.
pub const WIDEN_V4_PREFIX: u8 = 24;
/// IPv6 addresses sharing this prefix are merged by `--widen cidr`.
pub const WIDEN_V6_PREFIX: u8 = 64;
/// At most this many process chains and tasks are named in a comment; the rest are counted.
const SHOWN: usize = 3;

/// Which list of a policy an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Network,
    Exec,
    Unix,
}

impl Section {
    /// The policy table: `[network]`, `[exec]`.
    pub fn key(self) -> &'static str {
        match self {
            Section::Network => "network",
            Section::Exec => "exec",
            Section::Unix => "unix",
        }
    }
}

/// Where an entry came from, for the reviewer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    pub count: u64,
    pub first: Option<OffsetDateTime>,
    pub last: Option<OffsetDateTime>,
    pub tasks: BTreeSet<String>,
    /// `exe > exe > …`, root first.
    pub chains: BTreeSet<String>,
    pub verdicts: BTreeMap<String, u64>,
    /// Host names recorded for an address entry.
    pub hosts: BTreeSet<String>,
    /// Audit lines, first few only (enough to look the records up).
    pub lines: Vec<usize>,
}

impl Provenance {
    pub(crate) fn add(&mut self, r: &Recorded) {
        self.count += 1;
        self.first = Some(self.first.map_or(r.time, |t| t.min(r.time)));
        self.last = Some(self.last.map_or(r.time, |t| t.max(r.time)));
        self.tasks.insert(r.task.clone());
        self.chains.insert(r.chain.join(" > "));
        *self.verdicts.entry(r.verdict.clone()).or_insert(0) += 1;
        if self.lines.len() < SHOWN {
            self.lines.push(r.line);
        }
    }

    pub(crate) fn merge(&mut self, other: &Provenance) {
        self.count += other.count;
        self.first = match (self.first, other.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last = match (self.last, other.last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.tasks.extend(other.tasks.iter().cloned());
        self.chains.extend(other.chains.iter().cloned());
        for (v, n) in &other.verdicts {
            *self.verdicts.entry(v.clone()).or_insert(0) += n;
        }
        self.hosts.extend(other.hosts.iter().cloned());
        self.lines.extend(&other.lines);
        self.lines.sort_unstable();
        self.lines.truncate(SHOWN);
    }

    /// The comment lines (without `#`) a reviewer reads above the entry. Every piece that came
    /// from the trail is escaped, so a hostile file or task name cannot end the comment and add
    /// TOML of its own.
    pub fn describe(&self) -> Vec<String> {
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(v, n)| format!("{} {n}", clean(v)))
            .collect();
        let when = match (self.first, self.last) {
            (Some(a), Some(b)) if a == b => format!("at {}", stamp(a)),
            (Some(a), Some(b)) => format!("first {}, last {}", stamp(a), stamp(b)),
            _ => "time unknown".into(),
        };
        let times = match self.count {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        let lines: Vec<String> = self.lines.iter().map(usize::to_string).collect();
        let lines_word = if lines.len() == 1 { "line" } else { "lines" };
        let mut out = vec![format!(
            "seen {times} ({}), {when}; audit {lines_word} {}",
            verdicts.join(", "),
            lines.join(", ")
        )];
        out.push(format!("tasks: {}", some_of(&self.tasks)));
        for chain in self.chains.iter().take(SHOWN) {
            out.push(format!("by: {}", clean(chain)));
        }
        if self.chains.len() > SHOWN {
            out.push(format!(
                "by: … and {} more process chains",
                self.chains.len() - SHOWN
            ));
        }
        if !self.hosts.is_empty() {
            out.push(format!("host names seen: {}", some_of(&self.hosts)));
        }
        out
    }
}

/// Up to [`SHOWN`] items, escaped, and how many more.
fn some_of(items: &BTreeSet<String>) -> String {
    let shown: Vec<String> = items.iter().take(SHOWN).map(|s| clean(s)).collect();
    let mut text = shown.join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// Control characters (newline above all) escaped, so the text stays on its comment line.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn stamp(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// One suggested allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub section: Section,
    /// The entry as written in the policy.
    pub text: String,
    pub provenance: Provenance,
    /// Set when the entry allows more than was recorded: which flag did it and what was seen.
    pub widened: Option<String>,
}

impl Entry {
    /// The comment lines above the entry.
    pub fn comment(&self) -> Vec<String> {
        let mut lines = self.provenance.describe();
        if let Some(w) = &self.widened {
            lines.push(format!("WIDENED {w}"));
        }
        lines
    }
}

/// A recorded action no entry was made for, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotSuggested {
    pub line: usize,
    pub what: String,
    pub why: String,
}

/// What `suggest` made of the recorded actions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestion {
    /// Network entries first, each list in a stable order.
    pub entries: Vec<Entry>,
    /// `[[network.http]]` rules, then `[[network.tls]]` rules, each by host and port.
    pub requests: Vec<RequestEntry>,
    pub not_suggested: Vec<NotSuggested>,
}

/// What a network entry allows: one address, a network, or a host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Net(IpAddr, u8),
    Host(String),
}

impl Target {
    fn text(&self) -> String {
        match self {
            Target::Net(IpAddr::V4(a), 32) => a.to_string(),
            Target::Net(IpAddr::V4(a), len) => format!("{a}/{len}"),
            Target::Net(IpAddr::V6(a), 128) => format!("[{a}]"),
            Target::Net(IpAddr::V6(a), len) => format!("[{a}/{len}]"),
            Target::Host(h) => h.clone(),
        }
    }
}

fn ports_text((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// A network entry being built: target, port range, provenance, widening notes.
type NetDraft = (Target, (u16, u16), Provenance, Vec<String>);

/// Entries allowing every action of `actions` that can be allowed, and nothing else unless
/// `opts` widens. Unknown action kinds are left to the caller to count. (The command always
/// goes through [`suggest_for`]; this is the fresh-policy case.)
#[cfg(test)]
pub fn suggest<'a>(
    actions: impl IntoIterator<Item = &'a Recorded>,
    opts: &SuggestOptions,
) -> Suggestion {
    suggest_for(actions, opts, None)
}

/// As [`suggest`], for adding to `existing` (its request-rule ports matter: see
/// [`request_rules_for_names`]).
pub fn suggest_for<'a>(
    actions: impl IntoIterator<Item = &'a Recorded>,
    opts: &SuggestOptions,
    existing: Option<&Policy>,
) -> Suggestion {
    let mut requests = Vec::new();
    let mut names: BTreeMap<(String, u16), Provenance> = BTreeMap::new();
    let mut net: BTreeMap<(Target, u16), Provenance> = BTreeMap::new();
    let mut exec: BTreeMap<String, Provenance> = BTreeMap::new();
    let mut unix: BTreeMap<String, Provenance> = BTreeMap::new();
    let mut not_suggested = Vec::new();
    let mut skip = |r: &Recorded, why: String| {
        not_suggested.push(NotSuggested {
            line: r.line,
            what: r.what.to_string(),
            why,
        })
    };
    for r in actions {
        match &r.what {
            What::Connect { addr, port, host } => {
                if *port == 0 {
                    skip(
                        r,
                        "port 0 can only be allowed by `*` (every port); not suggested".into(),
                    );
                    continue;
                }
                let by_name = host
                    .as_ref()
                    .filter(|h| opts.host_names && valid_net_entry(&format!("{h}:{port}")));
                let target = match by_name {
                    Some(h) => Target::Host(h.clone()),
                    None => Target::Net(*addr, full_prefix(*addr)),
                };
                let p = net.entry((target, *port)).or_default();
                p.add(r);
                if let (None, Some(h)) = (by_name, host) {
                    p.hosts.insert(h.clone());
                }
            }
            What::Exec { path, complete } => {
                if !complete {
                    skip(
                        r,
                        "the kernel could not read the whole path, so the recorded path is not \
                         the program that ran; not suggested"
                            .into(),
                    );
                    continue;
                }
                // A '*' in a file name would turn the exact entry into a glob.
                match parse_exec(path) {
                    Ok((_, false)) if !path.contains('*') => {
                        exec.entry(path.clone()).or_default().add(r)
                    }
                    Ok(_) => skip(
                        r,
                        "a path containing '*' cannot be written as an exact entry; not suggested"
                            .into(),
                    ),
                    Err(reason) => skip(r, format!("cannot be an exact entry: {reason}")),
                }
            }
            What::Other { .. } => {}
            What::Open { .. } => skip(
                r,
                "an open of a file [files] denies: [files] is a deny list the operator writes, \
                 not an allowlist to widen; not suggested"
                    .into(),
            ),
            What::Unix { path } => match crate::policy::unix::suggestable(path) {
                Ok(()) => unix.entry(path.clone()).or_default().add(r),
                Err(why) => skip(r, why),
            },
            What::Request(req) => requests.push((r, req)),
            What::Egress { name, port, .. } => match name.as_deref().map(tls_name) {
                Some(Ok(n)) => names.entry((n, *port)).or_default().add(r),
                Some(Err(why)) => skip(r, why),
                None => skip(
                    r,
                    "no server name (SNI) or Host was recorded; no rule can allow it".into(),
                ),
            },
        }
    }
    let http = http_rules(requests, opts.widen_paths, &mut skip);
    let (net, request_entries) = request_rules_for_names(net, names, http, existing);

    let mut drafts: Vec<NetDraft> = net
        .into_iter()
        .map(|((t, port), p)| (t, (port, port), p, Vec::new()))
        .collect();
    if opts.widen_ports {
        drafts = widen_ports(drafts);
    }
    if opts.widen_cidr {
        drafts = widen_cidr(drafts);
    }
    drafts.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut entries: Vec<Entry> = drafts
        .into_iter()
        .map(|(target, ports, provenance, notes)| Entry {
            section: Section::Network,
            text: format!("{}:{}", target.text(), ports_text(ports)),
            provenance,
            widened: (!notes.is_empty()).then(|| notes.join("; ")),
        })
        .collect();

    let exec_entries: Vec<(String, Provenance, Option<String>)> = if opts.widen_globs {
        widen_globs(exec)
    } else {
        exec.into_iter().map(|(p, prov)| (p, prov, None)).collect()
    };
    entries.extend(
        exec_entries
            .into_iter()
            .map(|(text, provenance, widened)| Entry {
                section: Section::Exec,
                text,
                provenance,
                widened,
            }),
    );
    entries.extend(unix.into_iter().map(|(text, provenance)| Entry {
        section: Section::Unix,
        text,
        provenance,
        widened: None,
    }));
    Suggestion {
        entries,
        requests: request_entries,
        not_suggested,
    }
}

/// A recorded server name as a `[[network.tls]]` host, or why it cannot be one.
fn tls_name(name: &str) -> Result<String, String> {
    let name = crate::policy::host::normalize_name(name);
    match crate::policy::host::parse_host_pattern(&name) {
        Ok(crate::policy::host::HostPattern::Exact(n)) => Ok(n),
        _ => Err(format!("{name:?} cannot be a rule's host name")),
    }
}

/// Connects to learned addresses on a port with request rules go through the egress endpoint,
/// which refuses a name no request rule covers (docs/egress.md). So where the suggestion (or the
/// policy it is added to) has request rules on a port, a host entry for that port is dropped when
/// an HTTP rule for its name makes it redundant, and becomes a `[[network.tls]]` rule (the name
/// passes, nothing is decrypted) otherwise. Recorded `tls`/`http` connections (`names`) become
/// `[[network.tls]]` rules unless an HTTP rule covers their name.
fn request_rules_for_names(
    net: BTreeMap<(Target, u16), Provenance>,
    mut names: BTreeMap<(String, u16), Provenance>,
    http: Vec<RequestEntry>,
    existing: Option<&Policy>,
) -> (BTreeMap<(Target, u16), Provenance>, Vec<RequestEntry>) {
    let http_keys: BTreeSet<(String, u16)> =
        http.iter().map(|e| (e.host.clone(), e.port)).collect();
    let covered_by_http = |host: &str, port: u16| {
        http_keys.contains(&(host.to_string(), port))
            || existing.is_some_and(|p| {
                matches!(
                    p.egress().judge_name(host, port),
                    crate::policy::http::NameVerdict::Intercept(_)
                )
            })
    };
    let mut ports: BTreeSet<u16> = http_keys.iter().map(|(_, p)| *p).collect();
    ports.extend(names.keys().map(|(_, p)| *p));
    if let Some(p) = existing {
        ports.extend(p.egress().ports());
    }
    let mut kept = BTreeMap::new();
    for ((target, port), prov) in net {
        match &target {
            Target::Host(h) if ports.contains(&port) => {
                if !covered_by_http(h, port) {
                    names.entry((h.clone(), port)).or_default().merge(&prov);
                }
            }
            _ => {
                kept.insert((target, port), prov);
            }
        }
    }
    let mut entries = http;
    entries.extend(
        names
            .into_iter()
            .filter(|((h, port), _)| !covered_by_http(h, *port))
            .map(|((host, port), provenance)| RequestEntry {
                host,
                port,
                kind: RequestKind::Tls,
                provenance,
                widened: None,
            }),
    );
    (kept, entries)
}

fn full_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Several ports to one target → one range `min-max`.
fn widen_ports(drafts: Vec<NetDraft>) -> Vec<NetDraft> {
    let mut by_target: BTreeMap<Target, Vec<NetDraft>> = BTreeMap::new();
    for d in drafts {
        by_target.entry(d.0.clone()).or_default().push(d);
    }
    let mut out = Vec::new();
    for (target, group) in by_target {
        if group.len() == 1 {
            out.extend(group);
            continue;
        }
        let lo = group.iter().map(|d| d.1.0).min().unwrap_or(0);
        let hi = group.iter().map(|d| d.1.1).max().unwrap_or(0);
        let seen: Vec<String> = group.iter().map(|d| ports_text(d.1)).collect();
        let mut prov = Provenance::default();
        for d in &group {
            prov.merge(&d.2);
        }
        let note = format!(
            "by --widen ports: seen ports {}; allows every port {lo}-{hi}",
            seen.join(", ")
        );
        out.push((target, (lo, hi), prov, vec![note]));
    }
    out
}

/// Several addresses of one /24 (/64) with the same ports → that network.
fn widen_cidr(drafts: Vec<NetDraft>) -> Vec<NetDraft> {
    let mut groups: BTreeMap<(Target, (u16, u16)), Vec<NetDraft>> = BTreeMap::new();
    let mut out = Vec::new();
    for d in drafts {
        match &d.0 {
            Target::Net(addr, len) if *len == full_prefix(*addr) => {
                let net = network_of(*addr);
                groups.entry((net, d.1)).or_default().push(d);
            }
            _ => out.push(d),
        }
    }
    for ((net, ports), group) in groups {
        if group.len() == 1 {
            out.extend(group);
            continue;
        }
        let seen: Vec<String> = group.iter().map(|d| d.0.text()).collect();
        let mut prov = Provenance::default();
        let mut notes = Vec::new();
        for d in &group {
            prov.merge(&d.2);
            notes.extend(d.3.iter().cloned());
        }
        notes.dedup();
        notes.push(format!(
            "by --widen cidr: seen {}; allows all of {}",
            seen.join(", "),
            net.text()
        ));
        out.push((net, ports, prov, notes));
    }
    out
}

fn network_of(addr: IpAddr) -> Target {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX << (32 - u32::from(WIDEN_V4_PREFIX));
            Target::Net(
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                WIDEN_V4_PREFIX,
            )
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX << (128 - u32::from(WIDEN_V6_PREFIX));
            Target::Net(
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                WIDEN_V6_PREFIX,
            )
        }
    }
}

/// Several programs of one directory → `dir/*`.
fn widen_globs(exec: BTreeMap<String, Provenance>) -> Vec<(String, Provenance, Option<String>)> {
    let mut by_dir: BTreeMap<String, Vec<(String, Provenance)>> = BTreeMap::new();
    for (path, prov) in exec {
        let dir = match path.rfind('/') {
            Some(i) => path[..=i].to_string(),
            None => path.clone(),
        };
        by_dir.entry(dir).or_default().push((path, prov));
    }
    let mut out = Vec::new();
    for (dir, group) in by_dir {
        if group.len() == 1 {
            out.extend(group.into_iter().map(|(p, prov)| (p, prov, None)));
            continue;
        }
        let seen: Vec<String> = group.iter().map(|(p, _)| clean(p)).collect();
        let mut prov = Provenance::default();
        for (_, p) in &group {
            prov.merge(p);
        }
        let note = format!(
            "by --widen globs: seen {}; allows every program under {}",
            seen.join(", "),
            clean(&dir)
        );
        out.push((format!("{dir}*"), prov, Some(note)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::audit::tests::{connect_line, exec_line, read};

    fn texts(s: &Suggestion) -> Vec<(Section, &str)> {
        s.entries
            .iter()
            .map(|e| (e.section, e.text.as_str()))
            .collect()
    }

    fn trail(lines: &[String]) -> crate::learn::audit::Audit {
        let audit = read(&lines.join("\n"));
        assert_eq!(audit.problems, []);
        audit
    }

    #[test]
    fn exactly_what_was_recorded() {
        let audit = trail(&[
            connect_line("a", "t1", "127.0.0.1", 8080, ""),
            connect_line("a", "t2", "127.0.0.1", 8080, ""),
            connect_line("a", "t1", "::1", 9000, ""),
            connect_line("a", "t1", "10.0.0.7", 443, ""),
            exec_line("a", "t1", "/bin/true", "2026-11-29T12:00:05Z"),
            exec_line("a", "t1", "/usr/bin/python3", "2026-11-29T12:00:01Z"),
            exec_line("a", "t1", "/bin/true", "2026-11-29T12:00:09Z"),
        ]);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        assert_eq!(
            texts(&s),
            [
                (Section::Network, "10.0.0.7:443"),
                (Section::Network, "127.0.0.1:8080"),
                (Section::Network, "[::1]:9000"),
                (Section::Exec, "/bin/true"),
                (Section::Exec, "/usr/bin/python3"),
            ]
        );
        assert!(s.entries.iter().all(|e| e.widened.is_none()));
        assert_eq!(s.not_suggested, []);
        let lo = &s.entries[1].provenance;
        assert_eq!(lo.count, 2);
        assert_eq!(lo.tasks.iter().collect::<Vec<_>>(), ["t1", "t2"]);
        let t = &s.entries[3];
        assert_eq!(
            t.comment(),
            [
                "seen 2 times (alert 2), first 2026-11-29T12:00:05Z, last 2026-11-29T12:00:09Z; audit lines 5, 7",
                "tasks: t1",
                "by: /bin/sh > /bin/true",
            ]
        );
    }

    #[test]
    fn host_names_are_named_in_the_comment_or_used_when_supported() {
        let audit = trail(&[connect_line(
            "a",
            "t",
            "93.184.216.34",
            443,
            r#","dest_host":"example.com""#,
        )]);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        assert_eq!(s.entries[0].text, "93.184.216.34:443");
        assert!(
            s.entries[0]
                .comment()
                .contains(&"host names seen: example.com".to_string())
        );
        let with_names = SuggestOptions {
            host_names: true,
            ..SuggestOptions::default()
        };
        let s = suggest(&audit.actions, &with_names);
        // Host entries are used only if the policy format takes them.
        if valid_net_entry("example.com:443") {
            assert_eq!(s.entries[0].text, "example.com:443");
        } else {
            assert_eq!(s.entries[0].text, "93.184.216.34:443");
        }
    }

    #[test]
    fn widen_ports_makes_one_range_and_says_so() {
        let audit = trail(&[
            connect_line("a", "t", "127.0.0.1", 8080, ""),
            connect_line("a", "t", "127.0.0.1", 8090, ""),
            connect_line("a", "t", "127.0.0.1", 8085, ""),
            connect_line("a", "t", "127.0.0.2", 22, ""),
        ]);
        let opts = SuggestOptions {
            widen_ports: true,
            ..SuggestOptions::default()
        };
        let s = suggest(&audit.actions, &opts);
        assert_eq!(
            texts(&s),
            [
                (Section::Network, "127.0.0.1:8080-8090"),
                (Section::Network, "127.0.0.2:22")
            ]
        );
        assert_eq!(
            s.entries[0].widened.as_deref(),
            Some("by --widen ports: seen ports 8080, 8085, 8090; allows every port 8080-8090")
        );
        assert_eq!(s.entries[0].provenance.count, 3);
        assert_eq!(s.entries[1].widened, None);
    }

    #[test]
    fn widen_cidr_merges_neighbours_with_the_same_ports() {
        let audit = trail(&[
            connect_line("a", "t", "10.1.2.3", 443, ""),
            connect_line("a", "t", "10.1.2.200", 443, ""),
            connect_line("a", "t", "10.1.3.1", 443, ""),
            connect_line("a", "t", "10.1.2.9", 80, ""),
            connect_line("a", "t", "fd00::1", 53, ""),
            connect_line("a", "t", "fd00::2:1", 53, ""),
        ]);
        let opts = SuggestOptions {
            widen_cidr: true,
            ..SuggestOptions::default()
        };
        let s = suggest(&audit.actions, &opts);
        assert_eq!(
            texts(&s),
            [
                (Section::Network, "10.1.2.0/24:443"),
                (Section::Network, "10.1.2.9:80"),
                (Section::Network, "10.1.3.1:443"),
                (Section::Network, "[fd00::/64]:53"),
            ]
        );
        assert_eq!(
            s.entries[0].widened.as_deref(),
            Some("by --widen cidr: seen 10.1.2.3, 10.1.2.200; allows all of 10.1.2.0/24")
        );
    }

    #[test]
    fn widen_globs_takes_a_directory_with_several_programs() {
        let audit = trail(&[
            exec_line("a", "t", "/usr/bin/git", "2026-11-29T12:00:00Z"),
            exec_line("a", "t", "/usr/bin/ls", "2026-11-29T12:00:00Z"),
            exec_line("a", "t", "/bin/true", "2026-11-29T12:00:00Z"),
        ]);
        let opts = SuggestOptions {
            widen_globs: true,
            ..SuggestOptions::default()
        };
        let s = suggest(&audit.actions, &opts);
        assert_eq!(
            texts(&s),
            [(Section::Exec, "/bin/true"), (Section::Exec, "/usr/bin/*")]
        );
        assert!(s.entries[1].comment().last().is_some_and(|l| {
            l.starts_with("WIDENED by --widen globs: seen /usr/bin/git, /usr/bin/ls")
        }));
    }

    #[test]
    fn what_cannot_be_written_exactly_is_reported() {
        let incomplete = exec_line("a", "t", "/x/long", "2026-11-29T12:00:00Z").replace(
            "\"reason\":\"no rule matches\"",
            "\"reason\":\"exec path unreadable in the kernel\"",
        );
        let audit = trail(&[
            connect_line("a", "t", "127.0.0.1", 0, ""),
            incomplete,
            exec_line("a", "t", "/tmp/odd*", "2026-11-29T12:00:00Z"),
            exec_line("a", "t", "/opt/../bin/sh", "2026-11-29T12:00:00Z"),
            exec_line("a", "t", "relative", "2026-11-29T12:00:00Z"),
        ]);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        assert_eq!(s.entries, []);
        let lines: Vec<usize> = s.not_suggested.iter().map(|n| n.line).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5]);
        assert!(
            s.not_suggested[3].why.contains("normalised"),
            "{:?}",
            s.not_suggested[3]
        );
        assert!(
            s.not_suggested[4].why.contains("absolute"),
            "{:?}",
            s.not_suggested[4]
        );
    }

    #[test]
    fn many_chains_and_tasks_are_summarised() {
        let lines: Vec<String> = (0..5)
            .map(|i| {
                exec_line("a", &format!("t{i}"), "/bin/true", "2026-11-29T12:00:00Z").replace(
                    "\"pid\":9,\"exe\":\"/bin/sh\"",
                    &format!("\"pid\":9,\"exe\":\"/bin/sh{i}\""),
                )
            })
            .collect();
        let audit = trail(&lines);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        let c = s.entries[0].comment();
        assert_eq!(
            c[0],
            "seen 5 times (alert 5), at 2026-11-29T12:00:00Z; audit lines 1, 2, 3"
        );
        assert_eq!(c[1], "tasks: t0, t1, t2 and 2 more");
        assert_eq!(c[5], "by: … and 2 more process chains");
    }

    #[test]
    fn hostile_names_stay_inside_their_comment() {
        let audit = trail(&[exec_line(
            "a",
            "evil\\nmode = \\\"alert\\\"",
            "/bin/true",
            "2026-11-29T12:00:00Z",
        )]);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        for line in s.entries[0].comment() {
            assert!(!line.contains('\n'), "{line:?}");
        }
        assert!(s.entries[0].comment()[1].contains("evil\\nmode"));
    }

    #[test]
    fn unix_connects_become_a_unix_allow_list_but_host_daemons_are_left_to_a_person() {
        use crate::learn::audit::tests::unix_line;
        use crate::learn::render::{add_entries, check, skeleton};
        let audit = trail(&[
            unix_line("a", "t1", "/run/user/1000/bus"),
            unix_line("a", "t2", "/run/user/1000/bus"),
            unix_line("a", "t1", "@engine"),
            unix_line("a", "t1", "/var/run/docker.sock"),
            unix_line("a", "t1", "relative.sock"),
        ]);
        let s = suggest(&audit.actions, &SuggestOptions::default());
        assert_eq!(
            texts(&s),
            [
                (Section::Unix, "/run/user/1000/bus"),
                (Section::Unix, "@engine")
            ]
        );
        let skipped: Vec<&str> = s.not_suggested.iter().map(|n| n.what.as_str()).collect();
        assert_eq!(
            skipped,
            [
                "connect unix /var/run/docker.sock",
                "connect unix relative.sock"
            ]
        );
        assert!(s.not_suggested[0].why.contains("host daemon"));
        let mut doc = skeleton("a", &["header".into()]);
        add_entries(&mut doc, &s.entries, std::path::Path::new("s.toml")).expect("fresh");
        let text = doc.to_string();
        let policy =
            check(&text, std::path::Path::new("s.toml")).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let replay = crate::learn::replay::replay_policy(&policy, &audit.actions);
        let refused: Vec<String> = replay
            .not_allowed
            .iter()
            .map(|f| f.record.what.to_string())
            .collect();
        assert_eq!(
            refused,
            [
                "connect unix /var/run/docker.sock",
                "connect unix relative.sock"
            ],
            "{text}"
        );
    }
}
