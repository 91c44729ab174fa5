//! HTTP interception, the parts that need the real daemon and `run` (issue 16): the daemon creates
//! its local CA, `run` hands agents the bundle through the environment, the CA key stays out of
//! agents' reach (root agents included), `ca show` and `ca rotate`. The request judging itself is
//! tested in process (agent-monitor/src/intercept/tests.rs) with curl, python3 and hyper, and
//! through the kernel's redirect in egress.rs and http_requests.rs.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use agent_monitor_tests::*;

fn policy(agent: &str) -> (String, String) {
    (
        format!("{agent}.toml"),
        format!(
            "agent = {agent:?}\nmode = \"enforce\"\n[network]\nallow = []\n[exec]\n\
             allow = [\"/usr/bin/*\", \"/bin/*\"]\n"
        ),
    )
}

/// The script an agent runs: what its environment says, and whether it can read the key.
fn probe(key: &Path) -> String {
    format!(
        "echo SSL_CERT_FILE=$SSL_CERT_FILE; echo NODE_EXTRA_CA_CERTS=$NODE_EXTRA_CA_CERTS; \
         echo GIT_SSL_CAINFO=$GIT_SSL_CAINFO; \
         if cat {} >/dev/null 2>&1; then echo KEY=read; else echo KEY=refused; fi",
        key.display()
    )
}

fn fingerprint_line(out: &std::process::Output) -> String {
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("sha256:"))
        .map(|f| f.trim().to_string())
        .unwrap_or_else(|| panic!("no sha256 line in {}", outcome(out, "ca show")))
}

#[test]
fn run_hands_agents_the_ca_bundle_and_hides_the_key() {
    if !require_root("run_hands_agents_the_ca_bundle_and_hides_the_key") {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    // Traversable by `nobody`: only the CA's own private/ keeps it out.
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca_dir = base.path().join("ca");
    let ca_arg = ca_dir.to_str().unwrap();
    let agent = unique_agent("ca");
    let mut d = Daemon::start_with(&[policy(&agent)], &["--ca-dir", ca_arg]);
    let key = ca_dir.join("private/ca-key.pem");
    let bundle = ca_dir.join("bundle.pem");
    assert!(key.exists(), "the daemon created its CA: {}", d.log());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bundle_text = std::fs::read_to_string(&bundle).unwrap();
    let ca_text = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    assert!(bundle_text.trim_end().ends_with(ca_text.trim_end()));
    assert!(
        bundle_text.matches("BEGIN CERTIFICATE").count() > 1,
        "the bundle has the system roots too"
    );

    // The control: root outside any agent reads the key.
    let outside = std::process::Command::new("/bin/sh")
        .args(["-c", &probe(&key)])
        .output()
        .unwrap();
    assert!(
        text(&outside.stdout).contains("KEY=read"),
        "{}",
        outcome(&outside, "outside")
    );
    assert!(!text(&outside.stdout).contains(bundle.to_str().unwrap()));

    // A root agent: the bundle in its environment, the key hidden.
    let root_agent = d.run(&agent, None, &["/bin/sh", "-c", &probe(&key)]);
    let out = text(&root_agent.stdout);
    assert!(
        root_agent.status.success(),
        "{}",
        outcome(&root_agent, "root agent")
    );
    for var in ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"] {
        assert!(
            out.contains(&format!("{var}={}", bundle.display())),
            "{var}: {}",
            outcome(&root_agent, "root agent")
        );
    }
    assert!(
        out.contains("KEY=refused"),
        "{}",
        outcome(&root_agent, "root agent")
    );
    // The bundle itself stays readable to it.
    let reads_bundle = d.run(&agent, None, &["/bin/cat", bundle.to_str().unwrap()]);
    assert!(
        reads_bundle.status.success(),
        "{}",
        outcome(&reads_bundle, "cat bundle")
    );

    // An agent running as another user.
    let user_agent = d.run_with(
        &agent,
        &["--user", "nobody"],
        &["/bin/sh", "-c", &probe(&key)],
    );
    let out = text(&user_agent.stdout);
    assert!(
        out.contains(&format!("SSL_CERT_FILE={}", bundle.display())),
        "{}",
        outcome(&user_agent, "user agent")
    );
    assert!(
        out.contains("KEY=refused"),
        "{}",
        outcome(&user_agent, "user agent")
    );

    // `ca show` names the certificate and its fingerprint; `ca rotate` replaces it and the daemon
    // reads the new one on the reload it asks for.
    let show_ca = || {
        std::process::Command::new(binary())
            .args(["ca", "show", "--ca-dir", ca_arg])
            .output()
            .unwrap()
    };
    let show = show_ca();
    assert!(show.status.success(), "{}", outcome(&show, "ca show"));
    let before = fingerprint_line(&show);
    assert!(
        d.log().contains(&before),
        "the daemon logged the CA it loaded: {}",
        d.log()
    );
    let rotate = d.cli(&["ca", "rotate", "--ca-dir", ca_arg]);
    assert!(rotate.status.success(), "{}", outcome(&rotate, "ca rotate"));
    let after = fingerprint_line(&show_ca());
    assert_ne!(before, after);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !d.log().contains(&format!("new CA (SHA-256 {after})")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not pick up the rotated CA: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let bundle_text = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        !bundle_text.contains(ca_text.trim_end()),
        "the old CA left the bundle"
    );
    d.stop();
}
