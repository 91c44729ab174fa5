//! Where the kernel state lives between daemons: a bpffs directory with every map under `maps/`
//! and every program's link under `links/`, both by name, plus the lock that keeps two daemons
//! off one directory. Nothing here knows which maps or programs exist: whatever the loader
//! created is pinned and adopted under its own name, so hooks and maps added later need no edit.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Default pin directory (under the bpffs mount `/sys/fs/bpf`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/agent-monitor";

/// The layout of one pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        PinDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// Programs loaded but attached only on demand (the socket watch) are pinned here, so a later
    /// daemon can attach them to the pinned maps.
    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }

    /// Whether a previous daemon left state here (its maps are the part that matters: without
    /// them there is nothing to adopt).
    pub fn has_state(&self) -> bool {
        names(&self.maps()).is_ok_and(|n| !n.is_empty())
    }

    /// Creates the directories (bpffs accepts mkdir) and takes the lock.
    pub fn create_and_lock(&self) -> anyhow::Result<PinLock> {
        for d in [
            self.root.clone(),
            self.maps(),
            self.links(),
            self.programs(),
        ] {
            std::fs::create_dir_all(&d).with_context(|| {
                format!("creating pin directory {} (is it on bpffs?)", d.display())
            })?;
        }
        PinLock::take(&self.root)
    }

    /// Removes every pinned link and map, keeping the directories (and so the lock). The links go
    /// first, so the programs detach before their maps lose the pin. Returns what was removed.
    pub fn remove_pins(&self) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        for (dir, what) in [
            (self.links(), "link"),
            (self.programs(), "program"),
            (self.maps(), "map"),
        ] {
            for name in names(&dir).unwrap_or_default() {
                let p = dir.join(&name);
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                removed.push(format!("{what} {name}"));
            }
        }
        Ok(removed)
    }

    /// Removes every pin and the directories: enforcement ends here.
    pub fn remove_all(&self) -> anyhow::Result<Vec<String>> {
        let removed = self.remove_pins()?;
        for dir in [self.links(), self.programs(), self.maps()] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
            }
        }
        match std::fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.root.display())),
        }
        Ok(removed)
    }
}

/// What a fresh install pinned, until the start it belongs to succeeds: dropped before
/// [`FreshInstall::keep`], it removes those pins (links first) and the directories it created, so
/// a refused start leaves bpffs as it found it.
#[derive(Debug)]
pub struct FreshInstall {
    pins: PinDir,
    created_root: bool,
    kept: bool,
}

impl FreshInstall {
    /// `created_root`: the pin directory did not exist before this start.
    pub fn new(pins: &PinDir, created_root: bool) -> FreshInstall {
        FreshInstall {
            pins: pins.clone(),
            created_root,
            kept: false,
        }
    }

    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for FreshInstall {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let removed = if self.created_root {
            self.pins.remove_all()
        } else {
            self.pins.remove_pins()
        };
        match removed {
            Ok(r) => tracing::info!(
                "start refused: removed the {} pins of this start from {}",
                r.len(),
                self.pins.root().display()
            ),
            Err(e) => tracing::error!(
                "start refused, and removing its pins from {} failed: {e:#}",
                self.pins.root().display()
            ),
        }
    }
}

/// File names in `dir`, sorted.
pub fn names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

/// An exclusive `flock` on the pin directory, held for the daemon's life: two daemons sharing maps
/// would each read half of the ring buffer and overwrite each other's allowlists.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

impl PinLock {
    fn take(root: &Path) -> anyhow::Result<PinLock> {
        let dir = std::fs::File::open(root)
            .with_context(|| format!("opening pin directory {}", root.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another agent-monitor daemon holds the pin directory {} (use its control \
                     socket, or give this one its own --pin-dir)",
                    root.display()
                );
            }
            return Err(e).with_context(|| format!("locking {}", root.display()));
        }
        Ok(PinLock { _dir: dir })
    }
}

/// FNV-1a over the kernel object and the values patched into it at load: equal hashes mean the
/// pinned programs are the ones this binary would load. Not a security check (the pins are
/// root-only); it tells an upgrade from a restart.
pub fn object_hash(object: &[u8], patched: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for &b in object {
        eat(b);
    }
    for v in patched {
        for b in v.to_le_bytes() {
            eat(b);
        }
    }
    // 0 means "no daemon wrote a hash" in the state map.
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_object_and_patches() {
        let a = object_hash(b"programs", &[20]);
        assert_eq!(a, object_hash(b"programs", &[20]));
        assert_ne!(a, object_hash(b"programz", &[20]));
        assert_ne!(a, object_hash(b"programs", &[44]));
        assert_ne!(object_hash(b"", &[]), 0);
    }

    /// A plain directory stands in for bpffs: the pins are files either way.
    #[test]
    fn a_fresh_install_not_kept_removes_its_pins_and_the_directories_it_made() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("pins");
        let pins = PinDir::new(&root);
        let lock = pins.create_and_lock().expect("lock");
        std::fs::write(pins.map("NET_ALLOW"), b"").expect("pin");
        std::fs::write(pins.link("agent_exec"), b"").expect("pin");
        drop(FreshInstall::new(&pins, true));
        drop(lock);
        assert!(!root.exists(), "pins left behind");

        // A directory that was there before stays; only the pins go.
        let lock = pins.create_and_lock().expect("lock");
        std::fs::write(pins.map("NET_ALLOW"), b"").expect("pin");
        drop(FreshInstall::new(&pins, false));
        assert!(root.exists());
        assert!(names(&pins.maps()).expect("maps").is_empty());

        // Kept: everything stays.
        std::fs::write(pins.map("NET_ALLOW"), b"").expect("pin");
        let mut kept = FreshInstall::new(&pins, true);
        kept.keep();
        drop(kept);
        drop(lock);
        assert_eq!(names(&pins.maps()).expect("maps"), ["NET_ALLOW"]);
    }

    #[test]
    fn layout_names_maps_and_links_by_name() {
        let p = PinDir::new(Path::new("/sys/fs/bpf/x"));
        assert_eq!(p.map("ACTIONS"), Path::new("/sys/fs/bpf/x/maps/ACTIONS"));
        assert_eq!(
            p.link("agent_exec"),
            Path::new("/sys/fs/bpf/x/links/agent_exec")
        );
    }
}
