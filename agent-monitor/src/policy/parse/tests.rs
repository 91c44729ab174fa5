use std::net::Ipv6Addr;

use agent_monitor_common::{EXEC_PATH_LEN, PortRange};

use super::location::line_col;
use super::*;

const ORIGIN: &str = "policies/coder.toml";

fn ok(text: &str) -> Policy {
    match Policy::parse(text, Path::new(ORIGIN)) {
        Ok(p) => p,
        Err(e) => panic!("expected {text:?} to parse, got:\n{e}"),
    }
}

fn err(text: &str) -> String {
    match Policy::parse(text, Path::new(ORIGIN)) {
        Ok(p) => panic!("expected {text:?} to fail, got {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn net(entry: &str) -> NetRule {
    let p = ok(&format!("agent = \"a\"\n[network]\nallow = [{entry:?}]\n"));
    p.network[0].clone()
}

/// The error for one network entry, which sits on line 3, column 10.
fn net_err(entry: &str) -> String {
    err(&format!("agent = \"a\"\n[network]\nallow = [{entry:?}]\n"))
}

fn exec(entry: &str) -> ExecRule {
    let p = ok(&format!("agent = \"a\"\n[exec]\nallow = [{entry:?}]\n"));
    p.exec[0].clone()
}

fn exec_err(entry: &str) -> String {
    err(&format!("agent = \"a\"\n[exec]\nallow = [{entry:?}]\n"))
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

fn range(lo: u16, hi: u16) -> PortRange {
    PortRange { lo, hi }
}

#[test]
fn full_example_parses() {
    let p = ok(r#"
agent = "coder"
mode = "enforce"
[network]
allow = ["127.0.0.1:8080", "10.0.0.0/8:443", "[::1]:8080", "192.168.1.5:1000-2000", "[fd00::/8]:*"]
[exec]
allow = ["/usr/bin/git", "/bin/sh", "/usr/bin/python3*"]
"#);
    assert_eq!(p.agent(), "coder");
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.network().len(), 5);
    assert_eq!(p.exec().len(), 3);
    assert_eq!(p.network()[1].text(), "10.0.0.0/8:443");
    assert_eq!(p.network()[1].line(), 5);
    assert_eq!(p.origin(), Path::new(ORIGIN));
    assert_eq!(p.defined_at().to_string(), "policies/coder.toml:2:9");
}

#[test]
fn minimal_policy_allows_nothing_and_enforces() {
    let p = ok("agent = \"a\"");
    assert_eq!(p.mode(), Mode::Enforce);
    assert!(p.network().is_empty());
    assert!(p.exec().is_empty());
}

#[test]
fn empty_sections_are_allowed() {
    let p = ok("agent = \"a\"\n[network]\n[exec]\nallow = []\n");
    assert!(p.network().is_empty() && p.exec().is_empty());
}

#[test]
fn alert_mode() {
    assert_eq!(ok("agent = \"a\"\nmode = \"alert\"").mode(), Mode::Alert);
    assert_eq!(Mode::Alert.kernel_value(), agent_monitor_common::MODE_ALERT);
    assert_eq!(
        Mode::Enforce.kernel_value(),
        agent_monitor_common::MODE_ENFORCE
    );
}

#[test]
fn ipv4_single_address_is_mapped_slash_128() {
    let r = net("127.0.0.1:8080");
    assert_eq!(r.net(), v6("::ffff:127.0.0.1"));
    assert_eq!(r.prefix_len(), 128);
    assert_eq!(r.ports(), range(8080, 8080));
}

#[test]
fn ipv4_cidr() {
    let r = net("10.0.0.0/8:443");
    assert_eq!(r.net(), v6("::ffff:10.0.0.0"));
    assert_eq!(r.prefix_len(), 104);
    assert_eq!(r.ports(), range(443, 443));
}

#[test]
fn ipv4_zero_prefix_covers_all_ipv4() {
    let r = net("0.0.0.0/0:53");
    assert_eq!(r.net(), v6("::ffff:0.0.0.0"));
    assert_eq!(r.prefix_len(), 96);
}

#[test]
fn ipv6_address_and_cidr() {
    let r = net("[::1]:8080");
    assert_eq!((r.net(), r.prefix_len()), (v6("::1"), 128));
    let r = net("[fd00::/8]:*");
    assert_eq!((r.net(), r.prefix_len()), (v6("fd00::"), 8));
    assert_eq!(r.ports(), range(0, 65535));
    let r = net("[::/0]:443");
    assert_eq!(r.prefix_len(), 0);
}

#[test]
fn ipv4_mapped_ipv6_entry() {
    let r = net("[::ffff:10.0.0.0/104]:80");
    assert_eq!((r.net(), r.prefix_len()), (v6("::ffff:10.0.0.0"), 104));
}

#[test]
fn port_forms() {
    assert_eq!(net("1.2.3.4:1").ports(), range(1, 1));
    assert_eq!(net("1.2.3.4:65535").ports(), range(65535, 65535));
    assert_eq!(net("192.168.1.5:1000-2000").ports(), range(1000, 2000));
    assert_eq!(net("1.2.3.4:7-7").ports(), range(7, 7));
    assert_eq!(net("1.2.3.4:*").ports(), range(0, 65535));
}

#[test]
fn error_format_names_file_line_column_value_and_expectation() {
    let msg = err(
        "agent = \"coder\"\n\n[network]\nallow = [\n  \"127.0.0.1:80\",\n  \"10.0.0.0/8:443\",\n  \"10.0.0.0/33:443\",\n]\n",
    );
    assert_eq!(
        msg,
        "policies/coder.toml:7:3: network.allow[2] \"10.0.0.0/33:443\": prefix length 33 is longer than 32 for IPv4"
    );
}

#[test]
fn all_bad_entries_are_reported() {
    let msg = err(
        "agent = \"Bad\"\nmode = \"block\"\n[network]\nallow = [\"1.2.3.4\", \"1.2.3.4:80\", \"x..y:1\"]\n[exec]\nallow = [\"bin/sh\"]\n",
    );
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 5, "{msg}");
    assert!(lines[0].starts_with("policies/coder.toml:1:9: agent \"Bad\""));
    assert!(lines[1].starts_with("policies/coder.toml:2:8: mode \"block\""));
    assert!(lines[2].starts_with("policies/coder.toml:4:10: network.allow[0] \"1.2.3.4\""));
    assert!(lines[3].starts_with("policies/coder.toml:4:35: network.allow[2] \"x..y:1\""));
    assert!(lines[4].starts_with("policies/coder.toml:6:10: exec.allow[0] \"bin/sh\""));
}

#[test]
fn bad_ipv4() {
    assert_eq!(
        net_err("10.0.0.256:80"),
        "policies/coder.toml:3:10: network.allow[0] \"10.0.0.256:80\": \"10.0.0.256\" is not a valid IPv4 address; expected a.b.c.d"
    );
    assert!(net_err("1.2.3:80").contains("\"1.2.3\" is not a valid IPv4 address"));
    assert!(net_err(":80").contains("\"\" is not a valid IPv4 address"));
}

#[test]
fn bad_ipv6() {
    let msg = net_err("[fd00::g]:80");
    assert!(msg.starts_with("policies/coder.toml:3:10: network.allow[0] \"[fd00::g]:80\": "));
    assert!(
        msg.ends_with("\"fd00::g\" is not a valid IPv6 address"),
        "{msg}"
    );
    assert!(
        net_err("[10.0.0.1]:80")
            .ends_with("IPv4 addresses are written without brackets, e.g. 10.0.0.1:80")
    );
    assert!(net_err("[::1:80").ends_with("missing ']' after the IPv6 address"));
    assert!(net_err("[::1]80").ends_with("expected ':' and a port after ']'"));
}

#[test]
fn prefix_too_long() {
    assert!(net_err("10.0.0.0/33:443").ends_with(
        "network.allow[0] \"10.0.0.0/33:443\": prefix length 33 is longer than 32 for IPv4"
    ));
    assert!(net_err("[fd00::/129]:443").ends_with("prefix length 129 is longer than 128 for IPv6"));
    assert!(net_err("10.0.0.0/300:443").ends_with("prefix length 300 is longer than 32 for IPv4"));
}

#[test]
fn bad_prefix() {
    assert!(net_err("10.0.0.0/:443").ends_with("prefix length \"\" is not a number"));
    assert!(net_err("10.0.0.0/x:443").ends_with("prefix length \"x\" is not a number"));
    assert!(net_err("10.0.0.0/+8:443").ends_with("prefix length \"+8\" is not a number"));
}

#[test]
fn host_bits_set() {
    assert_eq!(
        net_err("10.0.0.1/8:443"),
        "policies/coder.toml:3:10: network.allow[0] \"10.0.0.1/8:443\": host bits are set below the prefix; did you mean 10.0.0.0/8?"
    );
    assert!(net_err("[fd00::1/8]:443").ends_with("did you mean [fd00::/8]?"));
    assert!(net_err("1.2.3.4/0:1").ends_with("did you mean 0.0.0.0/0?"));
}

#[test]
fn missing_port() {
    for entry in ["10.0.0.1", "10.0.0.1:", "10.0.0.0/8", "[::1]", "[::1]:"] {
        let msg = net_err(entry);
        assert!(
            msg.ends_with("missing port; expected ADDR[/PREFIX]:PORT where PORT is N, LO-HI or *"),
            "{entry}: {msg}"
        );
        assert!(msg.contains(&format!("{entry:?}")), "{msg}");
    }
}

#[test]
fn port_zero() {
    assert_eq!(
        net_err("1.2.3.4:0"),
        "policies/coder.toml:3:10: network.allow[0] \"1.2.3.4:0\": port 0 is not allowed; expected 1-65535 (or * for every port)"
    );
    assert!(
        net_err("1.2.3.4:0-10")
            .ends_with("port 0 is not allowed; expected 1-65535 (or * for every port)")
    );
}

#[test]
fn port_too_large() {
    assert!(net_err("1.2.3.4:65536").ends_with("port 65536 is out of range; expected 1-65535"));
    assert!(
        net_err("1.2.3.4:1-99999999999999999999")
            .ends_with("port 99999999999999999999 is out of range; expected 1-65535")
    );
}

#[test]
fn bad_port_text() {
    for entry in [
        "1.2.3.4:http",
        "1.2.3.4:+80",
        "1.2.3.4:1-",
        "1.2.3.4:-5",
        "1.2.3.4:1-2-3",
        "1.2.3.4: 80",
    ] {
        let msg = net_err(entry);
        assert!(
            msg.contains("is not valid; expected N (1-65535), LO-HI or *"),
            "{entry}: {msg}"
        );
    }
}

#[test]
fn reversed_range() {
    assert!(
        net_err("1.2.3.4:2000-1000").ends_with(
            "\"1.2.3.4:2000-1000\": port range 2000-1000 is reversed; expected LO <= HI"
        )
    );
}

#[test]
fn unbracketed_ipv6() {
    for entry in ["::1:80", "fd00::/8:443", "::1"] {
        assert!(
            net_err(entry)
                .ends_with("IPv6 addresses must be in brackets, e.g. [::1]:80 or [fd00::/8]:443"),
            "{entry}"
        );
    }
}

#[test]
fn host_name_with_prefix() {
    let msg = net_err("example.com/8:443");
    assert!(
        msg.ends_with("host names take no prefix length; expected NAME:PORT or *.NAME:PORT"),
        "{msg}"
    );
}

#[test]
fn empty_network_entry() {
    assert!(
        net_err("").ends_with("network.allow[0] \"\": empty entry; expected ADDR[/PREFIX]:PORT")
    );
}

#[test]
fn exec_forms() {
    let r = exec("/usr/bin/git");
    assert_eq!(
        (r.path(), r.prefix_glob(), r.text()),
        ("/usr/bin/git", false, "/usr/bin/git")
    );
    let r = exec("/usr/bin/python3*");
    assert_eq!(
        (r.path(), r.prefix_glob(), r.text()),
        ("/usr/bin/python3", true, "/usr/bin/python3*")
    );
    assert_eq!(exec("/opt/tools/*").path(), "/opt/tools/");
    assert_eq!(exec("/*").path(), "/");
    // The last part of a glob is the start of a name, so dotfiles are fine.
    assert_eq!(exec("/home/u/.*").path(), "/home/u/.");
    assert_eq!(exec("/usr/bin/.hidden").path(), "/usr/bin/.hidden");
}

#[test]
fn relative_exec_path() {
    assert_eq!(
        exec_err("bin/sh"),
        "policies/coder.toml:3:10: exec.allow[0] \"bin/sh\": path must be absolute (start with /)"
    );
    assert!(exec_err("").ends_with("exec.allow[0] \"\": path must be absolute (start with /)"));
    assert!(exec_err("*").ends_with("path must be absolute (start with /)"));
}

#[test]
fn star_in_the_middle() {
    assert!(exec_err("/usr/*/git").ends_with(
        "exec.allow[0] \"/usr/*/git\": '*' is only allowed at the end of a path, as a prefix glob"
    ));
    assert!(
        exec_err("/usr/bin/**")
            .ends_with("'*' is only allowed at the end of a path, as a prefix glob")
    );
}

#[test]
fn non_normalised_paths() {
    for entry in [
        "/usr//bin/git",
        "/usr/./bin/git",
        "/usr/../bin/git",
        "/usr/bin/.",
        "/usr/bin/..",
        "//bin/sh",
        "/usr/../*",
        "/usr/.//*",
    ] {
        let msg = exec_err(entry);
        assert!(
            msg.ends_with(&format!(
                "exec.allow[0] {entry:?}: path must be normalised (no //, /./, /../, or trailing /. or /..)"
            )),
            "{entry}: {msg}"
        );
    }
}

#[test]
fn exact_path_with_trailing_slash() {
    assert!(exec_err("/usr/bin/").contains("cannot end with '/'"));
    assert!(exec_err("/").contains("cannot end with '/'"));
}

#[test]
fn path_length_limits() {
    let exact_max = format!("/{}", "a".repeat(EXEC_PATH_LEN - 2));
    assert_eq!(exec(&exact_max).path().len(), EXEC_PATH_LEN - 1);
    let too_long = format!("{exact_max}b");
    assert!(
        exec_err(&too_long).ends_with("path is 252 bytes; at most 251 fit in the kernel table")
    );

    let glob_max = format!("/{}*", "a".repeat(EXEC_PATH_LEN - 1));
    assert_eq!(exec(&glob_max).path().len(), EXEC_PATH_LEN);
    let glob_too_long = format!("/{}*", "a".repeat(EXEC_PATH_LEN));
    assert!(
        exec_err(&glob_too_long)
            .ends_with("path is 253 bytes; at most 252 fit in the kernel table")
    );
}

#[test]
fn nul_byte_in_path() {
    let msg = err("agent = \"a\"\n[exec]\nallow = [\"/bin/s\\u0000h\"]\n");
    assert!(
        msg.ends_with("exec.allow[0] \"/bin/s\\0h\": path contains a NUL byte"),
        "{msg}"
    );
}

#[test]
fn unknown_top_level_key() {
    let msg = err("agent = \"a\"\nmodee = \"alert\"\n");
    assert!(
        msg.starts_with("policies/coder.toml:2:1: unknown field `modee`, expected one of"),
        "{msg}"
    );
}

#[test]
fn unknown_key_in_network() {
    let msg = err("agent = \"a\"\n[network]\nallows = [\"1.2.3.4:80\"]\n");
    assert!(
        msg.starts_with("policies/coder.toml:3:1: unknown field `allows`, expected one of `allow`, `http`, `tls`"),
        "{msg}"
    );
}

#[test]
fn unknown_table() {
    // `[files]` is a table now (`files.rs`); a table nobody defined is still refused.
    let msg = err("agent = \"a\"\n[filesystem]\nallow = []\n");
    assert!(msg.starts_with("policies/coder.toml:2:"), "{msg}");
    assert!(msg.contains("unknown field `filesystem`"), "{msg}");
}

#[test]
fn wrong_types() {
    let msg = err("agent = 5\n");
    assert!(
        msg.starts_with("policies/coder.toml:1:9: invalid type: integer `5`, expected a string"),
        "{msg}"
    );
    let msg = err("agent = \"a\"\n[network]\nallow = \"1.2.3.4:80\"\n");
    assert!(
        msg.starts_with(
            "policies/coder.toml:3:9: invalid type: string \"1.2.3.4:80\", expected a sequence"
        ),
        "{msg}"
    );
    let msg = err("agent = \"a\"\n[exec]\nallow = [\"/bin/sh\", 7]\n");
    assert!(
        msg.starts_with("policies/coder.toml:3:21: invalid type: integer `7`, expected a string"),
        "{msg}"
    );
    let msg = err("agent = \"a\"\nnetwork = 1\n");
    assert!(
        msg.starts_with("policies/coder.toml:2:11: invalid type: integer `1`"),
        "{msg}"
    );
}

#[test]
fn missing_agent() {
    let msg = err("mode = \"alert\"\n");
    assert!(msg.starts_with("policies/coder.toml"), "{msg}");
    assert!(msg.contains("missing field `agent`"), "{msg}");
}

#[test]
fn toml_syntax_error() {
    let msg = err("agent = \"a\"\n[network\n");
    assert_eq!(
        msg,
        "policies/coder.toml:2:9: invalid table header; expected `.`, `]`"
    );
    let msg = err("agent = \"a\"\nagent = \"b\"\n");
    assert_eq!(
        msg,
        "policies/coder.toml:2:1: duplicate key `agent` in document root"
    );
}

#[test]
fn bad_mode() {
    assert_eq!(
        err("agent = \"a\"\nmode = \"block\"\n"),
        "policies/coder.toml:2:8: mode \"block\": expected \"enforce\", \"alert\" or \"ask\""
    );
    assert!(err("agent = \"a\"\nmode = \"Enforce\"\n").contains("mode \"Enforce\": expected"));
}

#[test]
fn good_agent_names() {
    for name in [
        "a",
        "0",
        "coder",
        "code-review_2.x",
        &"a".repeat(AGENT_NAME_MAX),
    ] {
        assert_eq!(ok(&format!("agent = {name:?}")).agent(), name);
    }
}

#[test]
fn bad_agent_names() {
    let cases = [
        (
            "",
            "agent name is empty; expected 1-63 characters of [a-z0-9_.-], starting with [a-z0-9]",
        ),
        ("Coder", "agent name must start with [a-z0-9], not 'C'"),
        ("-x", "agent name must start with [a-z0-9], not '-'"),
        (".x", "agent name must start with [a-z0-9], not '.'"),
        (
            "co der",
            "character ' ' is not allowed in an agent name; expected [a-z0-9_.-]",
        ),
        (
            "a/b",
            "character '/' is not allowed in an agent name; expected [a-z0-9_.-]",
        ),
        (
            "café",
            "character 'é' is not allowed in an agent name; expected [a-z0-9_.-]",
        ),
    ];
    for (name, reason) in cases {
        assert_eq!(
            err(&format!("agent = {name:?}")),
            format!("policies/coder.toml:1:9: agent {name:?}: {reason}")
        );
    }
    let long = "a".repeat(AGENT_NAME_MAX + 1);
    assert!(
        err(&format!("agent = {long:?}"))
            .ends_with("agent name is 64 characters; expected at most 63")
    );
}

#[test]
fn columns_count_characters() {
    assert_eq!(line_col("é = 1", 3), (1, 3));
    assert_eq!(line_col("a\nbc", 3), (2, 2));
    assert_eq!(line_col("a", 99), (1, 2));
    assert_eq!(line_col("", 0), (1, 1));
}

#[test]
fn line_index_agrees_with_the_scan_at_every_offset() {
    for text in ["", "a", "\n", "a\nbc\n\né = 1\n  x", "é\r\nü\n"] {
        let index = LineIndex::new(text, Path::new("p.toml"));
        for offset in 0..=text.len() + 2 {
            assert_eq!(
                index.line_col(offset),
                line_col(text, offset),
                "{text:?} at {offset}"
            );
        }
    }
}

/// Entries far down a large file still get their own line (and parsing stays linear: the
/// line of each entry is found without rescanning the file).
#[test]
fn large_policy_keeps_entry_lines() {
    let n = 20_000;
    let net: Vec<String> = (0..n)
        .map(|i| format!("\"10.{}.{}.1:443\"", i / 256, i % 256))
        .collect();
    let text = format!(
        "agent = \"big\"\n[network]\nallow = [\n{}\n]\n",
        net.join(",\n")
    );
    let started = std::time::Instant::now();
    let p = ok(&text);
    assert_eq!(p.network().len(), n);
    assert_eq!(p.network()[0].line(), 4);
    assert_eq!(p.network()[n - 1].line(), 4 + n - 1);
    // Generous for a debug build on a busy machine; the quadratic scan took seconds in release.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "parsing {n} entries took {:?}",
        started.elapsed()
    );
}

const SUM: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

#[test]
fn identity_section_parses() {
    let p = ok(&format!(
        "agent = \"coder\"\n[identity]\nuids = [1001, 1002]\nsystemd_units = [\"coder-agent.service\"]\ncgroups = [\"/agents/coder\"]\nexecutables = [{{ path = \"/opt/coder/bin/agent\", sha256 = \"{SUM}\" }}]\n"
    ));
    let s = p.selectors();
    let uids: Vec<u32> = s.uids.iter().map(|u| u.value).collect();
    assert_eq!(uids, [1001, 1002]);
    assert_eq!(s.uids[0].at.to_string(), format!("{ORIGIN}:3:9"));
    assert_eq!(s.systemd_units[0].value, "coder-agent.service");
    assert_eq!(s.cgroups[0].value, "/agents/coder");
    assert_eq!(s.executables[0].value.path, "/opt/coder/bin/agent");
    assert_eq!(s.executables[0].value.sha256[0], 0xba);
    assert!(ok("agent = \"a\"\n").selectors().is_empty());
}

#[test]
fn selectors_that_capture_the_host_name_place_and_reason() {
    let e = err(
        "agent = \"a\"\n[identity]\nuids = [1001, 0]\nsystemd_units = [\"init.scope\"]\ncgroups = [\"/system.slice\"]\n",
    );
    for want in [
        "policies/coder.toml:4:18: identity.systemd_units[0] \"init.scope\": this unit would capture the host: it holds PID 1",
        "policies/coder.toml:5:12: identity.cgroups[0] \"/system.slice\": this cgroup would capture the host: it holds the daemon",
        "policies/coder.toml:3:15: identity.uids[1] \"0\": uid 0 is root",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn bad_selectors_name_field_and_expectation() {
    let e = err(&format!(
        "agent = \"a\"\n[identity]\ncgroups = [\"/\", \"/agent-monitor/a/t\"]\nsystemd_units = [\"coder\"]\nexecutables = [{{ path = \"/opt/*\", sha256 = \"xyz\" }}, {{ path = \"/opt/a\", sha256 = \"{SUM}\" }}]\n"
    ));
    for want in [
        "identity.cgroups[0] \"/\": the cgroup root would select every process",
        "identity.cgroups[1] \"/agent-monitor/a/t\": agent-monitor's own cgroup tree",
        "identity.systemd_units[0] \"coder\": expected a systemd unit name",
        "identity.executables[0].path \"/opt/*\": an executable selector names one file",
        "identity.executables[0].sha256 \"xyz\": expected the file's sha256 as 64 hex digits",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let e = err("agent = \"a\"\n[identity]\nexecutables = [{ path = \"/x\" }]\n");
    assert!(e.contains("sha256"), "{e}");
    let e = err("agent = \"a\"\n[identity]\nuids = [-1]\n");
    assert!(e.starts_with(ORIGIN), "{e}");
    let e = err("agent = \"a\"\n[identity]\nuser = \"x\"\n");
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn overlapping_selectors_across_files_are_refused_with_both_places() {
    let a = Policy::parse(
        "agent = \"a\"\n[identity]\ncgroups = [\"/agents\"]\nuids = [7]\n",
        Path::new("policies/a.toml"),
    )
    .unwrap();
    let b = Policy::parse(
        "agent = \"b\"\n[identity]\ncgroups = [\"/agents/b\"]\nuids = [8]\n",
        Path::new("policies/b.toml"),
    )
    .unwrap();
    let e = crate::policy::PolicySet::new(vec![a, b])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "policies/b.toml:3:12: cgroup selector \"/agents/b\" of agent \"b\" overlaps cgroup selector \"/agents\" of agent \"a\" at policies/a.toml:3:12: a process would match two agents; expected selectors that no two agents share"
    );
}

#[test]
fn ask_mode_is_read_and_refuses_in_the_kernel_like_enforce() {
    let p = ok("agent = \"a\"\nmode = \"ask\"");
    assert_eq!(p.mode(), Mode::Ask);
    assert_eq!(p.mode().as_str(), "ask");
    assert_eq!(Mode::Ask.kernel_value(), agent_monitor_common::MODE_ASK);
    // The kernel refuses an off-list action of an ask-mode agent exactly as in enforce mode.
    assert!(agent_monitor_common::mode_refuses(Mode::Ask.kernel_value()));
    assert!(agent_monitor_common::mode_refuses(
        Mode::Enforce.kernel_value()
    ));
    assert!(!agent_monitor_common::mode_refuses(
        Mode::Alert.kernel_value()
    ));
    assert!(Mode::Ask.refuses() && !Mode::Alert.refuses());
}
