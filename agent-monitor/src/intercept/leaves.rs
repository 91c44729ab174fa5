//! The leaf certificates presented to agents: issued by the local CA on first use of a server
//! name, kept (with their rustls server configuration) in a bounded cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::InterceptError;
use super::ca::LocalCa;

/// How many server names keep their leaf; past that the least recently used is issued anew on
/// its next use (an ECDSA P-256 key and a signature: well under a millisecond).
pub const LEAF_CACHE: usize = 1024;

/// One CA generation and the leaves it issued.
pub struct Issuing {
    ca: LocalCa,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    configs: HashMap<String, (Arc<rustls::ServerConfig>, u64)>,
    clock: u64,
}

impl Cache {
    fn get(&mut self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.clock += 1;
        let now = self.clock;
        self.configs.get_mut(name).map(|(config, used)| {
            *used = now;
            config.clone()
        })
    }

    fn put(&mut self, name: &str, config: Arc<rustls::ServerConfig>) {
        if self.configs.len() >= LEAF_CACHE {
            // A scan only when full: rare, and 1024 entries.
            if let Some(oldest) = self
                .configs
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| n.clone())
            {
                self.configs.remove(&oldest);
            }
        }
        self.clock += 1;
        self.configs.insert(name.to_string(), (config, self.clock));
    }
}

/// The ALPN protocols offered to agents, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// rustls with ring (see Cargo.toml). rustls 0.23.48 deprecates ring's provider for lacking
/// post-quantum key exchange; aws-lc-rs has it but needs cmake and a long C build.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Issuing {
    pub fn new(ca: LocalCa) -> Self {
        Issuing {
            ca,
            cache: Mutex::new(Cache::default()),
        }
    }

    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// The server configuration for `name`: from the cache, or with a leaf issued now.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        if let Some(hit) = self.lock().get(name) {
            return Ok(hit);
        }
        let leaf = self.ca.issue(name)?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key_der.into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(leaf.chain, key)?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        self.lock().put(name, config.clone());
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding it leaves a consistent map (each operation is one insert/remove).
        match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.lock().configs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::ca::CaFiles;

    #[test]
    fn leaves_are_cached_per_name_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::create(&CaFiles::new(dir.path())).unwrap();
        let issuing = Issuing::new(ca);
        let a = issuing.server_config("a.example").unwrap();
        let again = issuing.server_config("a.example").unwrap();
        assert!(Arc::ptr_eq(&a, &again), "the second use is a cache hit");
        assert_eq!(issuing.cached(), 1);
        let mut cache = Cache::default();
        for i in 0..LEAF_CACHE + 10 {
            cache.put(&format!("n{i}"), a.clone());
            // n0 stays in use: it must survive the evictions.
            assert!(cache.get("n0").is_some());
        }
        assert_eq!(cache.configs.len(), LEAF_CACHE);
        assert!(cache.get("n0").is_some());
        assert!(
            cache.get("n1").is_none(),
            "the least recently used went first"
        );
    }
}
