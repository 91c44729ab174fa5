//! Writing suggested entries as policy TOML, into a fresh policy or into an operator's existing
//! file. toml_edit keeps everything already in the file (comments, order, layout) and adds each
//! entry with its provenance comment above it; the result is checked with the daemon's own parser.

use std::path::Path;

use thiserror::Error;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, Value};

use crate::learn::request_rules::{RequestEntry, RequestKind};
use crate::learn::suggest::{Entry, Section};
use crate::policy::{Policy, PolicyError};

/// Why entries could not be written into a policy text.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("{origin}: not TOML: {message}")]
    NotToml { origin: String, message: String },
    #[error("{origin}: `{key}` is not a table; expected [{key}] with an allow list")]
    NotATable { origin: String, key: &'static str },
    #[error("{origin}: `{key}.allow` is not a list; expected allow = [\"…\", …]")]
    NotAList { origin: String, key: &'static str },
    #[error(
        "{origin}: `network.{key}` is not an array of tables; expected [[network.{key}]] tables"
    )]
    NotTables { origin: String, key: &'static str },
}

/// The start of a suggested policy: the header comment, `agent`, `mode = "enforce"` with a
/// comment saying why, and empty lists.
pub fn skeleton(agent: &str, header: &[String]) -> DocumentMut {
    let mut text = String::new();
    for line in header {
        text.push_str(&format!("# {line}\n"));
    }
    text.push_str(&format!(
        "agent = {}\n\
         # enforce (the default): the kernel refuses anything not listed below. A suggestion is\n\
         # meant to be enforced once reviewed; use \"alert\" to keep recording instead.\n\
         mode = \"enforce\"\n\n\
         [network]\nallow = []\n\n\
         [exec]\nallow = []\n",
        Value::from(agent).to_string().trim()
    ));
    // Only `agent` comes from outside, and it is written as a quoted TOML string.
    text.parse().unwrap_or_else(|_| DocumentMut::new())
}

/// Parses an existing policy's text, keeping its formatting.
pub fn parse_document(text: &str, origin: &Path) -> Result<DocumentMut, RenderError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| RenderError::NotToml {
            origin: origin.display().to_string(),
            message: e.message().to_string(),
        })
}

/// Appends `entries` to their lists in `doc` (creating `[network]`/`[exec]` and `allow` when
/// missing), each preceded by its comment. An entry whose text is already in the list is not
/// added again. Returns the entries added, in order.
pub fn add_entries<'e>(
    doc: &mut DocumentMut,
    entries: &'e [Entry],
    origin: &Path,
) -> Result<Vec<&'e Entry>, RenderError> {
    let mut added = Vec::new();
    for section in [Section::Network, Section::Exec, Section::Unix] {
        let mine: Vec<&Entry> = entries.iter().filter(|e| e.section == section).collect();
        if mine.is_empty() {
            continue;
        }
        let key = section.key();
        let origin_text = || origin.display().to_string();
        let table = doc
            .entry(key)
            .or_insert_with(toml_edit::table)
            .as_table_like_mut()
            .ok_or_else(|| RenderError::NotATable {
                origin: origin_text(),
                key,
            })?;
        let list = table
            .entry("allow")
            .or_insert_with(|| Item::Value(Value::Array(Array::new())))
            .as_array_mut()
            .ok_or_else(|| RenderError::NotAList {
                origin: origin_text(),
                key,
            })?;
        for entry in mine {
            if list.iter().any(|v| v.as_str() == Some(entry.text.as_str())) {
                continue;
            }
            let mut value = Value::from(entry.text.as_str());
            let mut prefix = String::from("\n");
            for line in entry.comment() {
                prefix.push_str(&format!("    # {line}\n"));
            }
            prefix.push_str("    ");
            value.decor_mut().set_prefix(prefix);
            value.decor_mut().set_suffix("");
            list.push_formatted(value);
            added.push(entry);
        }
        list.set_trailing_comma(true);
        list.set_trailing("\n");
    }
    Ok(added)
}

/// Appends `rules` as `[[network.http]]` / `[[network.tls]]` tables (an inline `network = {…}`
/// becomes a `[network]` table to hold them), each preceded by its comment. A rule already there
/// with the same host, port, methods and paths is not added again. Returns the rules added.
pub fn add_request_rules<'e>(
    doc: &mut DocumentMut,
    rules: &'e [RequestEntry],
    origin: &Path,
) -> Result<Vec<&'e RequestEntry>, RenderError> {
    let mut added = Vec::new();
    if rules.is_empty() {
        return Ok(added);
    }
    let origin_text = || origin.display().to_string();
    let network = doc.entry("network").or_insert_with(toml_edit::table);
    if let Some(inline) = network.as_inline_table().cloned() {
        *network = Item::Table(inline.into_table());
    }
    let network = network
        .as_table_mut()
        .ok_or_else(|| RenderError::NotATable {
            origin: origin_text(),
            key: "network",
        })?;
    for rule in rules {
        let key = rule.table();
        let tables = network
            .entry(key)
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
            .as_array_of_tables_mut()
            .ok_or_else(|| RenderError::NotTables {
                origin: origin_text(),
                key,
            })?;
        if tables.iter().any(|t| same_rule(t, rule)) {
            continue;
        }
        let mut table = Table::new();
        table.insert("host", toml_edit::value(rule.host.as_str()));
        table.insert("port", toml_edit::value(i64::from(rule.port)));
        if let RequestKind::Http { methods, paths } = &rule.kind {
            table.insert("methods", toml_edit::value(Array::from_iter(methods)));
            table.insert("paths", toml_edit::value(Array::from_iter(paths)));
        }
        let mut prefix = String::from("\n");
        for line in rule.comment() {
            prefix.push_str(&format!("# {line}\n"));
        }
        table.decor_mut().set_prefix(prefix);
        tables.push(table);
        added.push(rule);
    }
    Ok(added)
}

/// Whether an existing table says what `rule` says.
fn same_rule(table: &Table, rule: &RequestEntry) -> bool {
    let strings = |key: &str| -> Vec<String> {
        table
            .get(key)
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let same_place = table.get("host").and_then(Item::as_str) == Some(rule.host.as_str())
        && table.get("port").and_then(Item::as_integer) == Some(i64::from(rule.port));
    same_place
        && match &rule.kind {
            RequestKind::Tls => true,
            RequestKind::Http { methods, paths } => {
                strings("methods") == *methods && strings("paths") == *paths
            }
        }
}

/// Checks `text` with the daemon's parser: a suggestion the daemon would refuse is a bug here.
pub fn check(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
    Policy::parse(text, origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::audit::tests::{connect_line, exec_line, read};
    use crate::learn::suggest::{SuggestOptions, suggest};

    fn origin() -> &'static Path {
        Path::new("suggested.toml")
    }

    fn entries(lines: &[String], opts: &SuggestOptions) -> Vec<Entry> {
        let audit = read(&lines.join("\n"));
        assert_eq!(audit.problems, []);
        suggest(&audit.actions, opts).entries
    }

    fn sample() -> Vec<String> {
        vec![
            connect_line("coder", "t1", "127.0.0.1", 8080, ""),
            connect_line("coder", "t1", "127.0.0.1", 8081, ""),
            connect_line("coder", "t1", "10.0.0.1", 443, ""),
            connect_line("coder", "t1", "10.0.0.2", 443, ""),
            connect_line("coder", "t1", "::1", 9000, r#","dest_host":"localhost""#),
            exec_line("coder", "t1", "/bin/true", "2026-11-29T12:00:00Z"),
            exec_line("coder", "t2", "/bin/false", "2026-11-29T12:00:00Z"),
            exec_line("coder", "t2", "/usr/bin/python3", "2026-11-29T12:00:00Z"),
        ]
    }

    fn all_widenings() -> Vec<SuggestOptions> {
        let mut out = Vec::new();
        for bits in 0..32u8 {
            out.push(SuggestOptions {
                widen_ports: bits & 1 != 0,
                widen_cidr: bits & 2 != 0,
                widen_globs: bits & 4 != 0,
                host_names: bits & 8 != 0,
                widen_paths: bits & 16 != 0,
            });
        }
        out
    }

    #[test]
    fn every_suggestion_parses_and_allows_what_was_recorded() {
        let audit = read(&sample().join("\n"));
        for opts in all_widenings() {
            let s = suggest(&audit.actions, &opts);
            let mut doc = skeleton("coder", &["header".into()]);
            let added = add_entries(&mut doc, &s.entries, origin()).expect("fresh document");
            assert_eq!(added.len(), s.entries.len(), "{opts:?}");
            let text = doc.to_string();
            let policy =
                check(&text, origin()).unwrap_or_else(|e| panic!("{opts:?}:\n{text}\n{e}"));
            assert_eq!(policy.agent(), "coder");
            assert_eq!(policy.mode(), crate::policy::model::Mode::Enforce);
            let replay = crate::learn::replay::replay_policy(&policy, &audit.actions);
            assert_eq!(replay.not_allowed.len(), 0, "{opts:?}:\n{text}");
        }
    }

    /// Exactness: without widening the suggestion allows a probe if and only if it was recorded;
    /// with any widening it still allows everything recorded.
    #[test]
    fn allows_exactly_what_was_recorded_on_a_grid() {
        let addrs = [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.1.1",
            "127.0.0.1",
            "::1",
            "fd00::5",
        ];
        let ports = [22, 80, 443, 8080];
        let progs = [
            "/bin/sh",
            "/bin/true",
            "/usr/bin/python3",
            "/usr/bin/python3.11",
            "/opt/x/y",
        ];
        let mut seed: u64 = 0x5eed;
        for round in 0..40 {
            let mut next = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % 3 == 0
            };
            let mut lines = Vec::new();
            let mut recorded_net = Vec::new();
            let mut recorded_exec = Vec::new();
            for a in addrs {
                for p in ports {
                    if next() {
                        lines.push(connect_line("coder", "t", a, p, ""));
                        recorded_net.push((a, p));
                    }
                }
            }
            for prog in progs {
                if next() {
                    lines.push(exec_line("coder", "t", prog, "2026-11-29T12:00:00Z"));
                    recorded_exec.push(prog);
                }
            }
            if lines.is_empty() {
                continue;
            }
            let audit = read(&lines.join("\n"));
            for opts in all_widenings() {
                let mut doc = skeleton("coder", &[]);
                add_entries(&mut doc, &suggest(&audit.actions, &opts).entries, origin()).unwrap();
                let text = doc.to_string();
                let policy = check(&text, origin()).unwrap_or_else(|e| panic!("{e}\n{text}"));
                let widened = opts.widen_ports || opts.widen_cidr || opts.widen_globs;
                for a in addrs {
                    for p in ports {
                        let allowed = policy.check_connect(a.parse().unwrap(), p).allowed;
                        let was = recorded_net.contains(&(a, p));
                        assert!(
                            allowed || !was,
                            "round {round} {opts:?}: {a}:{p} recorded but not allowed\n{text}"
                        );
                        assert!(
                            widened || allowed == was,
                            "round {round}: {a}:{p} allowed={allowed}\n{text}"
                        );
                    }
                }
                for prog in progs {
                    let allowed = policy.check_exec(prog).allowed;
                    let was = recorded_exec.contains(&prog);
                    assert!(allowed || !was, "round {round} {opts:?}: {prog}\n{text}");
                    assert!(
                        widened || allowed == was,
                        "round {round}: {prog} allowed={allowed}\n{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn fresh_suggestion_reads_well() {
        let e = entries(&sample()[5..6], &SuggestOptions::default());
        let mut doc = skeleton("coder", &["Suggested from audit.jsonl".into()]);
        add_entries(&mut doc, &e, origin()).unwrap();
        assert_eq!(
            doc.to_string(),
            "# Suggested from audit.jsonl\n\
             agent = \"coder\"\n\
             # enforce (the default): the kernel refuses anything not listed below. A suggestion is\n\
             # meant to be enforced once reviewed; use \"alert\" to keep recording instead.\n\
             mode = \"enforce\"\n\n\
             [network]\nallow = []\n\n\
             [exec]\nallow = [\n    \
             # seen once (alert 1), at 2026-11-29T12:00:00Z; audit line 1\n    \
             # tasks: t1\n    \
             # by: /bin/sh > /bin/true\n    \
             \"/bin/true\",\n]\n"
        );
    }

    #[test]
    fn merge_keeps_the_operators_comments_and_adds_only_new_entries() {
        let existing = "# Owned by the platform team. Ask before widening.\n\
                        agent = \"coder\"\n\
                        mode = \"alert\"   # still learning\n\
                        [network]\n\
                        # the build cache\n\
                        allow = [\"127.0.0.1:8080\"]\n";
        let mut doc = parse_document(existing, origin()).unwrap();
        let e = entries(&sample(), &SuggestOptions::default());
        let added = add_entries(&mut doc, &e, origin()).unwrap();
        let added: Vec<&str> = added.iter().map(|e| e.text.as_str()).collect();
        assert!(
            !added.contains(&"127.0.0.1:8080"),
            "already there: {added:?}"
        );
        assert!(added.contains(&"127.0.0.1:8081"));
        assert!(added.contains(&"/bin/true"));
        let text = doc.to_string();
        for kept in [
            "# Owned by the platform team. Ask before widening.\n",
            "mode = \"alert\"   # still learning\n",
            "# the build cache\nallow = [\"127.0.0.1:8080\",\n",
        ] {
            assert!(text.contains(kept), "{kept:?} lost:\n{text}");
        }
        let policy = check(&text, origin()).unwrap_or_else(|e| panic!("{text}\n{e}"));
        assert_eq!(
            policy.mode(),
            crate::policy::model::Mode::Alert,
            "mode untouched"
        );
        assert_eq!(policy.network().len(), 5);
        assert_eq!(policy.exec().len(), 3);
    }

    #[test]
    fn merge_into_inline_tables_and_missing_lists() {
        let existing = "agent = \"coder\"\nnetwork = { allow = [] }\n";
        let mut doc = parse_document(existing, origin()).unwrap();
        let e = entries(&sample(), &SuggestOptions::default());
        add_entries(&mut doc, &e, origin()).unwrap();
        let text = doc.to_string();
        check(&text, origin()).unwrap_or_else(|e| panic!("{text}\n{e}"));
    }

    #[test]
    fn merge_refuses_shapes_it_cannot_extend() {
        let e = entries(&sample(), &SuggestOptions::default());
        let mut doc = parse_document("agent = \"c\"\nnetwork = 3\n", origin()).unwrap();
        assert_eq!(
            add_entries(&mut doc, &e, origin()).unwrap_err().to_string(),
            "suggested.toml: `network` is not a table; expected [network] with an allow list"
        );
        let mut doc = parse_document("agent = \"c\"\n[exec]\nallow = \"x\"\n", origin()).unwrap();
        assert_eq!(
            add_entries(&mut doc, &e, origin()).unwrap_err().to_string(),
            "suggested.toml: `exec.allow` is not a list; expected allow = [\"…\", …]"
        );
        assert!(
            parse_document("agent = [", origin())
                .unwrap_err()
                .to_string()
                .starts_with("suggested.toml: not TOML: ")
        );
    }

    #[test]
    fn hostile_values_cannot_inject_toml() {
        let evil_task = exec_line(
            "coder",
            "t\\n[exec]\\nallow = [\\\"/*\\\"]",
            "/bin/true",
            "2026-11-29T12:00:00Z",
        );
        let evil_path = exec_line("coder", "t", "/tmp/a\\\"b\\n'c", "2026-11-29T12:00:00Z");
        let e = entries(&[evil_task, evil_path], &SuggestOptions::default());
        let mut doc = skeleton("coder", &[]);
        add_entries(&mut doc, &e, origin()).unwrap();
        let text = doc.to_string();
        let policy = check(&text, origin()).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let exec: Vec<&str> = policy.exec().iter().map(|r| r.text()).collect();
        assert_eq!(exec, ["/bin/true", "/tmp/a\"b\n'c"], "{text}");
    }
}
