//! `[files]`: the files and directories an agent may not open, and the built-in list of
//! well-known credential locations (`deny_known_secrets`). Pure: patterns and matching only; the
//! daemon's file guard (`crate::files`) expands them against the host.

/// The well-known credential locations `files.deny_known_secrets = true` denies, in one place.
/// An entry starting with `~/` stands for that path under every home directory in /etc/passwd and
/// under /root; the others are absolute. A directory entry covers everything below it. `.env`
/// files are not here: nobody can list every project's; name yours in `deny`.
pub const KNOWN_SECRETS: &[&str] = &[
    // SSH private keys (the whole directory: keys are named freely; known_hosts goes with it).
    "~/.ssh",
    // GnuPG private keys and the pass(1) store built on them.
    "~/.gnupg",
    "~/.password-store",
    // Cloud and cluster credentials.
    "~/.aws",
    "~/.config/gcloud",
    "~/.azure",
    "~/.kube/config",
    "~/.docker/config.json",
    "~/.config/gh",
    "~/.config/hub",
    "~/.terraform.d/credentials.tfrc.json",
    "~/.vault-token",
    // Tokens of package registries and of git/HTTP clients.
    "~/.netrc",
    "~/.git-credentials",
    "~/.npmrc",
    "~/.pypirc",
    "~/.cargo/credentials.toml",
    "~/.cargo/credentials",
    "~/.pgpass",
    "~/.local/share/keyrings",
    // The host's own secrets.
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/ssh/ssh_host_ecdsa_key",
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_dsa_key",
];

/// One `files.deny` entry: an absolute, normalised path whose components may be `*` (any one
/// name), or a built-in entry (`~/…` for every home directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRule {
    pub(crate) pattern: String,
    /// 1-based line in its file; 0 for the built-in list.
    pub(crate) line: usize,
    /// From `deny_known_secrets`, not written in the file.
    pub(crate) builtin: bool,
}

impl FileRule {
    /// The entry as written (`/home/*/.aws`), or the built-in entry (`~/.aws`).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn line(&self) -> usize {
        self.line
    }

    pub fn builtin(&self) -> bool {
        self.builtin
    }

    /// The rule as a reason names it: `files.deny "/etc/shadow" (line 4)`, or
    /// `files.deny_known_secrets "~/.aws"`.
    pub fn describe(&self) -> String {
        if self.builtin {
            format!("files.deny_known_secrets {:?}", self.pattern)
        } else {
            format!("files.deny {:?} (line {})", self.pattern, self.line)
        }
    }

    /// The absolute patterns this rule stands for, given the host's home directories.
    pub fn absolute_patterns(&self, homes: &[String]) -> Vec<String> {
        match self.pattern.strip_prefix("~/") {
            Some(rest) => homes
                .iter()
                .map(|h| format!("{}/{rest}", h.trim_end_matches('/')))
                .collect(),
            None => vec![self.pattern.clone()],
        }
    }

    /// Whether `path` (absolute, normalised) is this rule's file or lies below it, by name.
    pub fn covers(&self, path: &str, homes: &[String]) -> bool {
        self.absolute_patterns(homes)
            .iter()
            .any(|p| pattern_covers(p, path))
    }
}

/// `[files]` of one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRules {
    /// `deny` in file order, then the built-in list when `deny_known_secrets` is on.
    pub(crate) deny: Vec<FileRule>,
    pub(crate) deny_known_secrets: bool,
}

impl FileRules {
    pub(crate) fn new(written: Vec<FileRule>, deny_known_secrets: bool) -> FileRules {
        let mut deny = written;
        if deny_known_secrets {
            deny.extend(KNOWN_SECRETS.iter().map(|p| FileRule {
                pattern: (*p).to_string(),
                line: 0,
                builtin: true,
            }));
        }
        FileRules {
            deny,
            deny_known_secrets,
        }
    }

    /// Every rule, written ones first.
    pub fn deny(&self) -> &[FileRule] {
        &self.deny
    }

    pub fn deny_known_secrets(&self) -> bool {
        self.deny_known_secrets
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
    }

    /// The first rule that denies opening `path`, by name (`policy test`; the daemon judges the
    /// file itself, by device and inode).
    pub fn denying(&self, path: &str, homes: &[String]) -> Option<&FileRule> {
        self.deny.iter().find(|r| r.covers(path, homes))
    }
}

/// Whether `path` is what `pattern` names or lies below it; `*` in the pattern matches any one
/// component.
pub fn pattern_covers(pattern: &str, path: &str) -> bool {
    let mut pat = pattern.split('/').filter(|c| !c.is_empty());
    let mut comps = path.split('/').filter(|c| !c.is_empty());
    loop {
        match (pat.next(), comps.next()) {
            (None, _) => return true,
            (Some(_), None) => return false,
            (Some(p), Some(c)) if p == "*" || p == c => {}
            _ => return false,
        }
    }
}

/// The home directories in the text of /etc/passwd (the sixth field), plus /root; sorted, without
/// duplicates, absolute ones only.
pub fn homes_from_passwd(passwd: &str) -> Vec<String> {
    let mut homes: Vec<String> = passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(':').nth(5))
        .map(|h| h.trim_end_matches('/').to_string())
        .filter(|h| h.starts_with('/') && h.len() > 1)
        .chain(std::iter::once("/root".to_string()))
        .collect();
    homes.sort();
    homes.dedup();
    homes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(p: &str) -> FileRule {
        FileRule {
            pattern: p.into(),
            line: 3,
            builtin: p.starts_with('~'),
        }
    }

    #[test]
    fn a_pattern_covers_its_path_and_what_lies_below_only() {
        assert!(pattern_covers("/etc/shadow", "/etc/shadow"));
        assert!(!pattern_covers("/etc/shadow", "/etc/shadow-"));
        assert!(!pattern_covers("/etc/shadow", "/etc"));
        assert!(pattern_covers("/root/.ssh", "/root/.ssh/id_ed25519"));
        assert!(pattern_covers("/home/*/.aws", "/home/dev/.aws/credentials"));
        assert!(pattern_covers("/home/*/.aws", "/home/dev/.aws"));
        assert!(!pattern_covers("/home/*/.aws", "/home/.aws"));
        assert!(!pattern_covers(
            "/home/*/.aws",
            "/home/dev/.awsx/credentials"
        ));
        assert!(!pattern_covers("/home/*/.aws", "/srv/dev/.aws"));
    }

    #[test]
    fn home_entries_stand_for_every_home() {
        let homes = vec!["/home/dev".to_string(), "/root".to_string()];
        let r = rule("~/.aws");
        assert_eq!(
            r.absolute_patterns(&homes),
            ["/home/dev/.aws", "/root/.aws"]
        );
        assert!(r.covers("/root/.aws/config", &homes));
        assert!(!r.covers("/home/other/.aws/config", &homes));
        assert_eq!(r.describe(), "files.deny_known_secrets \"~/.aws\"");
        assert_eq!(
            rule("/etc/shadow").describe(),
            "files.deny \"/etc/shadow\" (line 3)"
        );
    }

    #[test]
    fn homes_come_from_passwd_plus_root() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                      dev:x:1000:1000:Dev,,,:/home/dev/:/bin/bash\n\
                      broken line\n\
                      odd:x:1001:1001::relative:/bin/sh\n\
                      slash:x:1002:1002::/:/bin/sh\n";
        assert_eq!(
            homes_from_passwd(passwd),
            ["/home/dev", "/nonexistent", "/root", "/usr/sbin"]
        );
        assert_eq!(homes_from_passwd(""), ["/root"]);
    }

    #[test]
    fn known_secrets_are_added_after_the_written_rules() {
        let rules = FileRules::new(vec![rule("/srv/app/.env")], true);
        assert_eq!(rules.deny()[0].pattern(), "/srv/app/.env");
        assert_eq!(rules.deny().len(), 1 + KNOWN_SECRETS.len());
        let homes = vec!["/home/dev".to_string(), "/root".to_string()];
        let found = rules.denying("/home/dev/.ssh/id_ed25519", &homes);
        assert_eq!(found.map(FileRule::pattern), Some("~/.ssh"));
        assert!(rules.denying("/etc/passwd", &homes).is_none());
        assert!(FileRules::new(Vec::new(), false).is_empty());
    }

    #[test]
    fn every_known_secret_is_a_valid_entry() {
        for p in KNOWN_SECRETS {
            let absolute = p.replacen("~/", "/root/", 1);
            assert_eq!(
                super::super::parse::parse_file_entry(&absolute),
                Ok(()),
                "{p}"
            );
        }
    }
}
