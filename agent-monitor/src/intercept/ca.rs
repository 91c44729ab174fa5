//! The local CA: created by the daemon on first start, read back on later starts and on reload,
//! replaced by `agent-monitor ca rotate`; it issues the leaf certificates the interceptor
//! presents to agents.
//!
//! Files under the CA directory (default /var/lib/agent-monitor/ca):
//! - `ca.pem` (0644): the CA certificate, public;
//! - `bundle.pem` (0644): the system roots plus the CA, the file `run` hands agents;
//! - `private/` (0700) `ca-key.pem` (0600): the CA key, root only. A key file readable by group or
//!   others, or owned by another user, is refused rather than used.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest as _, Sha256};

/// Where the daemon keeps its CA unless `--ca-dir` says otherwise.
pub const DEFAULT_CA_DIR: &str = "/var/lib/agent-monitor/ca";
/// How long a CA is valid.
const CA_DAYS: i64 = 5 * 365;
/// How long a leaf is valid (the cache re-issues long before that: a daemon restart or a rotation
/// empties it).
const LEAF_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the CA key {path} is readable by others or not owned by this user (mode {mode:o}, \
         owner uid {uid}); refusing to use it: fix with `chmod 600` and `chown`, or `ca rotate`"
    )]
    KeyExposed { path: PathBuf, mode: u32, uid: u32 },
    #[error("the CA in {dir} cannot be read: {why}")]
    Invalid { dir: PathBuf, why: String },
    #[error("issuing a certificate for {name}: {source}")]
    Issue { name: String, source: rcgen::Error },
    #[error("generating the CA: {0}")]
    Generate(rcgen::Error),
}

/// The files of a CA directory.
#[derive(Clone, Debug)]
pub struct CaFiles {
    pub dir: PathBuf,
}

impl CaFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaFiles { dir: dir.into() }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
    fn private(&self) -> PathBuf {
        self.dir.join("private")
    }
    pub fn key(&self) -> PathBuf {
        self.private().join("ca-key.pem")
    }
}

/// A loaded CA: its certificate and the issuer that signs leaves.
pub struct LocalCa {
    cert_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate for one server name: the chain (leaf, CA) and its key in PKCS#8 DER.
pub struct Leaf {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError + use<> {
    let path = path.to_path_buf();
    move |source| CaError::Io { what, path, source }
}

/// Write `contents` to `path` through a temporary file and a rename: readers see the old or the
/// new file, never half of one.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    file.write_all(contents).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

fn make_dirs(files: &CaFiles) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&files.dir)
        .map_err(io("creating the CA directory", &files.dir))?;
    let private = files.private();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&private)
        .map_err(io("creating the CA key directory", &private))?;
    // An existing directory keeps its mode through create(): make sure it is root's (ours) only.
    fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(io("restricting", &private))
}

impl LocalCa {
    /// Read the CA from `files`, or create one if there is none (first start).
    pub fn load_or_create(files: &CaFiles) -> Result<(LocalCa, bool), CaError> {
        if files.key().exists() || files.cert().exists() {
            return Ok((Self::load(files)?, false));
        }
        Ok((Self::create(files)?, true))
    }

    /// Read an existing CA.
    pub fn load(files: &CaFiles) -> Result<LocalCa, CaError> {
        let key_path = files.key();
        let meta = fs::metadata(&key_path).map_err(io("reading", &key_path))?;
        let uid = nix::unistd::geteuid().as_raw();
        if meta.mode() & 0o077 != 0 || meta.uid() != uid {
            return Err(CaError::KeyExposed {
                path: key_path,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
            });
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
        let cert_path = files.cert();
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
        let invalid = |why: String| CaError::Invalid {
            dir: files.dir.clone(),
            why,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("the key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| invalid(format!("the certificate: {e}")))?;
        let der = pem::parse(&cert_pem).map_err(|e| invalid(format!("the certificate: {e}")))?;
        let cert_der = rustls::pki_types::CertificateDer::from(der.contents().to_vec());
        let ca = LocalCa {
            cert_pem,
            cert_der,
            issuer,
        };
        ca.check_pair().map_err(invalid)?;
        Ok(ca)
    }

    /// Make a new CA and write it (replacing any CA there): first start and `ca rotate`.
    pub fn create(files: &CaFiles) -> Result<LocalCa, CaError> {
        make_dirs(files)?;
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agent-monitor");
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        // The creation time in the name: a rotated CA never shares a subject with the one before.
        dn.push(
            DnType::CommonName,
            format!("agent-monitor local CA ({host}, {})", now.unix_timestamp()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        // The key first: a certificate on disk without its key would be unusable.
        write_atomic(&files.key(), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&files.cert(), cert.pem().as_bytes(), 0o644)?;
        Ok(LocalCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Issue one leaf to check that the key signs what the certificate says (a key and
    /// certificate from different rotations fail here rather than at every handshake).
    fn check_pair(&self) -> Result<(), String> {
        let leaf = self.issue("check.invalid").map_err(|e| e.to_string())?;
        let end = rustls::pki_types::CertificateDer::from(leaf.chain[0].to_vec());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("the certificate: {e}"))?;
        let provider = super::leaves::provider();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier as _;
        let name =
            rustls::pki_types::ServerName::try_from("check.invalid").map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&end, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("the key does not match the certificate: {e}"))
    }

    /// The certificate, PEM.
    #[cfg(test)]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the certificate's DER, as `openssl x509 -fingerprint -sha256` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issue a leaf certificate for `name` (a DNS name or an IP address).
    pub fn issue(&self, name: &str) -> Result<Leaf, CaError> {
        let err = |source| CaError::Issue {
            name: name.to_string(),
            source,
        };
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key_der: key.serialize_der(),
        })
    }

    /// Write the bundle agents get: the system roots (as rustls-native-certs finds them), then
    /// this CA. Returns how many system roots went in.
    pub fn write_bundle(&self, files: &CaFiles) -> Result<usize, CaError> {
        let found = rustls_native_certs::load_native_certs();
        let mut text = String::new();
        for cert in &found.certs {
            text.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())));
        }
        text.push_str("# agent-monitor local CA\n");
        text.push_str(&self.cert_pem);
        write_atomic(&files.bundle(), text.as_bytes(), 0o644)?;
        Ok(found.certs.len())
    }
}

/// SHA-256 of DER bytes as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn first_start_creates_then_later_starts_load_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::new(dir.path().join("ca"));
        let (first, created) = LocalCa::load_or_create(&files).unwrap();
        assert!(created);
        let (again, created) = LocalCa::load_or_create(&files).unwrap();
        assert!(!created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        let key_mode = fs::metadata(files.key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let private_mode = fs::metadata(files.dir.join("private"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(private_mode, 0o700);
        let cert_mode = fs::metadata(files.cert()).unwrap().permissions().mode() & 0o777;
        assert_eq!(cert_mode, 0o644);
    }

    #[test]
    fn rotation_replaces_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::new(dir.path());
        let old = LocalCa::create(&files).unwrap();
        let new = LocalCa::create(&files).unwrap();
        assert_ne!(old.fingerprint(), new.fingerprint());
        assert_eq!(
            LocalCa::load(&files).unwrap().fingerprint(),
            new.fingerprint()
        );
    }

    #[test]
    fn an_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::new(dir.path());
        LocalCa::create(&files).unwrap();
        fs::set_permissions(files.key(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalCa::load(&files)
            .err()
            .expect("a 0644 key must be refused");
        assert!(matches!(err, CaError::KeyExposed { .. }), "{err}");
    }

    #[test]
    fn a_key_from_another_rotation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::new(dir.path());
        LocalCa::create(&files).unwrap();
        let old_cert = fs::read(files.cert()).unwrap();
        LocalCa::create(&files).unwrap();
        fs::write(files.cert(), old_cert).unwrap();
        let err = LocalCa::load(&files)
            .err()
            .expect("mismatched key must be refused");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn leaves_verify_against_the_ca_for_their_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::create(&CaFiles::new(dir.path())).unwrap();
        let leaf = ca.issue("api.example.com").unwrap();
        assert_eq!(leaf.chain.len(), 2);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            super::super::leaves::provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        let now = rustls::pki_types::UnixTime::now();
        let good = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        verifier
            .verify_server_cert(&leaf.chain[0], &[], &good, &[], now)
            .expect("the leaf verifies for its name");
        let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf.chain[0], &[], &other, &[], now)
                .is_err()
        );
        assert!(ca.issue("10.0.0.1").is_ok(), "IP addresses get an IP SAN");
    }

    #[test]
    fn the_bundle_ends_with_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::new(dir.path());
        let ca = LocalCa::create(&files).unwrap();
        ca.write_bundle(&files).unwrap();
        let bundle = fs::read_to_string(files.bundle()).unwrap();
        assert!(bundle.trim_end().ends_with(ca.cert_pem().trim_end()));
        assert_eq!(fingerprint(b"").len(), 32 * 3 - 1);
    }
}
