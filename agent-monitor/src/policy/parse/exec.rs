//! Exec allowlist entries: absolute, normalised paths, optionally a `*` prefix glob.

use agent_monitor_common::EXEC_PATH_LEN;

use super::Reason;

/// An absolute, normalised path, optionally ending in `*` → (path or prefix, is prefix glob).
pub(crate) fn parse_exec(text: &str) -> Result<(String, bool), Reason> {
    if text.contains('\0') {
        return Err(Reason::NulByte);
    }
    if !text.starts_with('/') {
        return Err(Reason::NotAbsolute);
    }
    let (path, glob) = match text.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    if path.contains('*') {
        return Err(Reason::MisplacedGlob);
    }
    // The kernel compares bytes, so `/usr/./bin/git` would never match `/usr/bin/git`. In a glob the
    // text after the last '/' is the start of a name (`/home/u/.*` is dotfiles), not a component.
    let components = match (glob, path.rfind('/')) {
        (true, Some(slash)) => &path[..=slash],
        _ => path,
    };
    if components.contains("//")
        || components.contains("/./")
        || components.contains("/../")
        || components.ends_with("/.")
        || components.ends_with("/..")
    {
        return Err(Reason::NotNormalised);
    }
    if !glob && path.ends_with('/') {
        return Err(Reason::TrailingSlash);
    }
    // An exact key holds the terminating NUL too; a glob prefix does not.
    let max = if glob {
        EXEC_PATH_LEN
    } else {
        EXEC_PATH_LEN - 1
    };
    if path.len() > max {
        return Err(Reason::PathTooLong {
            len: path.len(),
            max,
        });
    }
    Ok((path.to_string(), glob))
}
