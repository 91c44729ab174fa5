//! The host's processes as procfs lists them: what start-up tagging walks (processes that ran
//! before a selector was armed).

/// Every process now: (pid, parent pid). Processes that exit while being read are skipped.
pub fn processes() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_of(&stat)?))
        })
        .collect()
}

/// Thread ids of process `pid` (empty if it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The parent pid from a `/proc/PID/stat` line: the field after the state, which follows the
/// command name in parentheses (a name may itself contain spaces and parentheses, so the last
/// `)` ends it).
pub fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_after_a_name_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a) b) c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn this_process_is_listed_with_its_parent() {
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id();
        assert!(processes().contains(&(me, parent)));
        assert!(threads(me).contains(&me));
    }
}
