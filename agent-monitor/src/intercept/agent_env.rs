//! What `run` exports so that the common runtimes trust the agent-monitor CA on intercepted
//! connections: every variable names the bundle (system roots + the CA), so nothing a runtime
//! trusted before is lost. docs/http-interception.md has the survey behind this list.

/// The variables, each with the runtimes that read it.
pub const VARIABLES: [(&str, &str); 8] = [
    // OpenSSL's default verify file: Python `ssl`/`urllib`/`http.client`, Ruby, PHP, curl built
    // with OpenSSL when CURL_CA_BUNDLE is unset, httpx; Go's crypto/x509 on Linux; Rust's
    // rustls-native-certs and openssl-based crates; .NET on Linux.
    (
        "SSL_CERT_FILE",
        "OpenSSL, Python ssl, Go, Rust rustls-native-certs, Ruby, .NET",
    ),
    ("REQUESTS_CA_BUNDLE", "Python requests (certifi otherwise)"),
    ("CURL_CA_BUNDLE", "curl, and Python requests as a fallback"),
    // Read once at start-up, added to Node's own (compiled-in) roots.
    ("NODE_EXTRA_CA_CERTS", "Node.js, npm"),
    ("GIT_SSL_CAINFO", "git over HTTPS"),
    ("PIP_CERT", "pip (its vendored certifi otherwise)"),
    ("AWS_CA_BUNDLE", "AWS CLI and SDKs"),
    ("DENO_CERT", "Deno"),
];

/// The environment for an agent whose daemon has a CA; `bundle` is its bundle path.
pub fn variables(bundle: &str) -> Vec<(&'static str, String)> {
    VARIABLES
        .iter()
        .map(|(name, _)| (*name, bundle.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_variable_names_the_bundle() {
        let vars = super::variables("/var/lib/agent-monitor/ca/bundle.pem");
        assert!(vars.iter().any(|(k, _)| *k == "SSL_CERT_FILE"));
        assert!(vars.iter().any(|(k, _)| *k == "NODE_EXTRA_CA_CERTS"));
        assert!(
            vars.iter()
                .all(|(_, v)| v == "/var/lib/agent-monitor/ca/bundle.pem")
        );
    }
}

/// The CA key's directory beside the bundle the daemon named (`ca/bundle.pem` → `ca/private`).
pub fn key_dir(bundle: &str) -> std::path::PathBuf {
    std::path::Path::new(bundle).with_file_name("private")
}

/// A root agent (uid 0 without capabilities) still owns root's files, the CA key among them:
/// in a mount namespace of its own, an empty read-only tmpfs covers the key's directory. Runs
/// between fork and exec while `run` is still root, before the confinement (which makes its own
/// namespace beneath this one): plain system calls on a path prepared before the fork.
pub fn hide_in_own_namespace(dir: &std::ffi::CStr) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: unshare(2) and mount(2) with NUL-terminated strings that outlive the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted here propagates back to the host.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"agent-monitor-hidden".as_ptr(),
            dir.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k,mode=000".as_ptr().cast(),
        ))
    }
}
