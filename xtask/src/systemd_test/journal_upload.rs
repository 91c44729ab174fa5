//! Journal forwarding as docs/operation.md shows it, in the container: Debian's
//! `systemd-journal-upload` unit (a dynamic user that cannot read `/etc/ssl/private`) with the
//! documented drop-ins (URL; key and certificates handed over as credentials) sends the journal
//! over HTTPS to `systemd-journal-remote` (socket-activated, same container, certificates from a
//! test CA); an agent's denial must arrive there with its fields.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Container, MSG_ACTION_DENIED, PORT_NEVER_ALLOWED, connect_probe, parse_export};
use crate::run_cmd;

/// The drop-ins exactly as docs/operation.md gives them.
const UPLOAD_CONF: &str = "[Upload]\nURL=https://localhost:19532\n";
const UPLOAD_TLS_DROP_IN: &str = "[Service]
LoadCredential=key.pem:/etc/ssl/private/journal-upload.key
LoadCredential=cert.pem:/etc/ssl/certs/journal-upload.pem
LoadCredential=ca.pem:/etc/ssl/certs/journal-ca.pem
ExecStart=
ExecStart=/lib/systemd/systemd-journal-upload --save-state --key=%d/key.pem --cert=%d/cert.pem --trust=%d/ca.pem
";
/// The receiver's certificates, where `journal-remote.conf` is told to find them.
const REMOTE_CONF: &str = "[Remote]
ServerKeyFile=/etc/journal-remote-test/key.pem
ServerCertificateFile=/etc/journal-remote-test/cert.pem
TrustedCertificateFile=/etc/journal-remote-test/ca.pem
";

/// Makes a test CA and certificates for the receiver (`localhost`) and the uploader (on the
/// host, with `openssl`), and writes them and the configuration into the root file system.
pub(super) fn prepare(machine: &Path, work: &Path) -> Result<()> {
    let pki = work.join("pki");
    fs::create_dir_all(&pki)?;
    let openssl = |args: &[&str]| run_cmd(Command::new("openssl").args(args).current_dir(&pki));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=agent-monitor test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    fs::write(pki.join("san.ext"), "subjectAltName=DNS:localhost\n")?;
    for name in ["remote", "upload"] {
        let subject = format!(
            "/CN={}",
            if name == "remote" {
                "localhost"
            } else {
                "uploader"
            }
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{name}.pem"),
        ])?;
    }
    let put = |from: &str, to: &str| -> Result<()> {
        let to = machine.join(to);
        fs::create_dir_all(to.parent().unwrap())?;
        fs::copy(pki.join(from), &to)
            .with_context(|| format!("copying {from} to {}", to.display()))?;
        Ok(())
    };
    put("upload.key", "etc/ssl/private/journal-upload.key")?;
    put("upload.pem", "etc/ssl/certs/journal-upload.pem")?;
    put("ca.pem", "etc/ssl/certs/journal-ca.pem")?;
    put("remote.key", "etc/journal-remote-test/key.pem")?;
    put("remote.pem", "etc/journal-remote-test/cert.pem")?;
    put("ca.pem", "etc/journal-remote-test/ca.pem")?;
    let write = |to: &str, text: &str| -> Result<()> {
        let to = machine.join(to);
        fs::create_dir_all(to.parent().unwrap())?;
        fs::write(&to, text).with_context(|| format!("writing {}", to.display()))
    };
    write(
        "etc/systemd/journal-upload.conf.d/agent-monitor.conf",
        UPLOAD_CONF,
    )?;
    write(
        "etc/systemd/system/systemd-journal-upload.service.d/tls.conf",
        UPLOAD_TLS_DROP_IN,
    )?;
    write("etc/systemd/journal-remote.conf.d/test.conf", REMOTE_CONF)?;
    Ok(())
}

/// Starts receiver and uploader, makes an agent's connect be denied, and waits until the
/// denial is in the receiver's journal; the check's detail.
pub(super) fn check(c: &Container) -> Result<String> {
    c.sh(
        "chmod 0700 /etc/ssl/private && chmod 0600 /etc/ssl/private/journal-upload.key
         chown -R systemd-journal-remote: /etc/journal-remote-test
         chmod 0600 /etc/journal-remote-test/key.pem
         systemctl daemon-reload
         systemctl enable --now systemd-journal-remote.socket 2>&1
         systemctl enable --now systemd-journal-upload.service 2>&1",
    )?;
    let user = c.sh("systemctl show -P User systemd-journal-upload.service")?;
    let denied = c.agent(&connect_probe(PORT_NEVER_ALLOWED))?;
    if !denied.contains("Operation not permitted") {
        bail!("journal upload: the agent's connect was not denied: {denied}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.exec(&[
            "journalctl",
            "-D",
            "/var/log/journal/remote",
            "-o",
            "export",
            &format!("MESSAGE_ID={MSG_ACTION_DENIED}"),
            "AGENT_ID=tester",
        ])?;
        let entries = parse_export(&String::from_utf8_lossy(&out.stdout));
        if let Some(e) = entries.iter().find(|e| {
            e.get("DEST_PORT").map(String::as_str) == Some(&PORT_NEVER_ALLOWED.to_string())
                && e.get("VERDICT").map(String::as_str) == Some("denied")
        }) {
            let field = |k: &str| e.get(k).cloned().unwrap_or_default();
            return Ok(format!(
                "uploader runs as dynamic user {user:?} with the documented drop-ins; {} denial(s) \
                 of agent tester in /var/log/journal/remote, e.g. ACTION={} DEST_ADDR={} \
                 DEST_PORT={} EXE={} _SYSTEMD_UNIT={}",
                entries.len(),
                field("ACTION"),
                field("DEST_ADDR"),
                field("DEST_PORT"),
                field("EXE"),
                field("_SYSTEMD_UNIT"),
            ));
        }
        if Instant::now() > deadline {
            let status = c
                .exec(&[
                    "sh",
                    "-c",
                    "systemctl status --no-pager systemd-journal-upload systemd-journal-remote \
                     2>&1; journalctl --no-pager -n 30 -u systemd-journal-upload \
                     -u systemd-journal-remote 2>&1; ls -la /var/log/journal/remote 2>&1",
                ])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            bail!(
                "journal upload: no denial of agent tester reached /var/log/journal/remote in \
                 30 s:\n{status}"
            );
        }
        sleep(Duration::from_millis(500));
    }
}
