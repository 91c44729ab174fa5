//! Hash chain of the JSON audit trail: every line ends in a `chain` field, `{"seq":N,"hash":H}`,
//! where `H = sha256(previous line's H, "\n", N, "\n", this line up to ",\"chain\":")` in lower-case
//! hex. The first line ever has the previous hash [`GENESIS`] and `seq` 0; every later line, in the
//! same file or the next one after a rotation, continues the sequence.
//!
//! Anyone can recompute such a chain, so it proves nothing by itself: the daemon also writes the
//! chain head (seq and hash of the last line written) to journald at intervals and at every
//! rotation ([`head_notice`]), and `audit verify --head SEQ:HASH` checks a trail against it. An
//! edit, a deletion, an insertion or a reordering then shows as a break at its line.

use super::notice::{Level, Notice, Notices};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The previous hash of the first line of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where the chain field starts in a line: everything before it is what the hash covers.
pub const MARKER: &str = ",\"chain\":{\"seq\":";

/// The hash of a line with sequence number `seq` whose content (the line up to [`MARKER`]) is
/// `content`, following a line whose hash was `prev`.
pub fn link_hash(prev: &str, seq: u64, content: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(format!("\n{seq}\n").as_bytes());
    h.update(content);
    let mut hex = String::with_capacity(64);
    for b in h.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The last line of the chain: the next line gets `seq + 1` and chains to `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// `None` before the first line of a trail.
    pub seq: Option<u64>,
    pub hash: String,
}

impl Head {
    pub fn genesis() -> Self {
        Head {
            seq: None,
            hash: GENESIS.to_string(),
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.map_or(0, |s| s + 1)
    }
}

/// The chain state of a trail writer. Lines are sealed when buffered; the head only counts as
/// written once the buffer reached the file ([`Chain::commit`]). A failed write is undone
/// ([`Chain::rollback`]): the lost lines are counted as failed by the sink's owner, and the lines
/// after them chain to the last line that is really in the file, so the chain has no gap.
#[derive(Clone, Debug)]
pub struct Chain {
    written: Head,
    sealed: Head,
}

impl Chain {
    /// Continues after `head` (the last line already in the trail, or [`Head::genesis`]).
    pub fn after(head: Head) -> Self {
        Chain {
            written: head.clone(),
            sealed: head,
        }
    }

    /// Adds the chain field to the line that starts at `start` in `buf` and ends it (`…}\n`).
    pub fn seal(&mut self, buf: &mut Vec<u8>, start: usize) {
        debug_assert!(buf.ends_with(b"}\n"), "a JSON line ends in }}\\n");
        buf.truncate(buf.len() - 2);
        let seq = self.sealed.next_seq();
        let hash = link_hash(&self.sealed.hash, seq, &buf[start..]);
        buf.extend_from_slice(MARKER.as_bytes());
        buf.extend_from_slice(seq.to_string().as_bytes());
        buf.extend_from_slice(b",\"hash\":\"");
        buf.extend_from_slice(hash.as_bytes());
        buf.extend_from_slice(b"\"}}\n");
        self.sealed = Head {
            seq: Some(seq),
            hash,
        };
    }

    /// Everything sealed reached the file.
    pub fn commit(&mut self) {
        self.written = self.sealed.clone();
    }

    /// Nothing sealed since the last commit reached the file.
    pub fn rollback(&mut self) {
        self.sealed = self.written.clone();
    }

    /// The last line in the file.
    pub fn head(&self) -> &Head {
        &self.written
    }
}

/// A chained line taken apart: its content (what the hash covers), seq and hash. `None` if the
/// line does not end in a well-formed chain field or is not a JSON object.
pub fn parse_line(line: &str) -> Option<(&str, u64, &str)> {
    let at = line.rfind(MARKER)?;
    let (content, tail) = line.split_at(at);
    let rest = tail.strip_prefix(MARKER)?;
    let (seq, rest) = rest.split_once(",\"hash\":\"")?;
    let hash = rest.strip_suffix("\"}}")?;
    let seq: u64 = seq.parse().ok()?;
    // Canonical only: a seq with leading zeros or a sign would hash differently than it reads.
    if tail != format!("{MARKER}{seq},\"hash\":\"{hash}\"}}}}")
        || hash.len() != 64
        || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).ok()?;
    Some((content, seq, hash))
}

/// The head of an existing trail file: its last complete chained line. `Ok(None)` when the file
/// is missing, empty or its last complete line is not chained (a trail written before the chain
/// existed). A torn last line is skipped.
pub fn last_head(path: &Path) -> io::Result<Option<Head>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        // /dev/full, a pipe: no trail to continue (and reading /dev/full never ends).
        return Ok(None);
    }
    let len = meta.len();
    // A line is well under 64 KiB (paths and process chains are bounded by the kernel record).
    let from = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    // A torn last line (a crash mid-write) is not part of the chain: the line before it is.
    let Some((body, _torn)) = text.rsplit_once('\n') else {
        return Ok(None);
    };
    let last = body.rsplit('\n').next().unwrap_or(body);
    Ok(parse_line(last).map(|(_, seq, hash)| Head {
        seq: Some(seq),
        hash: hash.to_string(),
    }))
}

/// Says where the chain stands: [`head_notice`] in the daemon, nothing (or a probe) in tests.
pub type Witness = fn(&Path, &Head, &str);

/// When the chain head is next worth writing to journald: at most every [`HeadNotices::INTERVAL`]
/// while lines are written, and only if it moved.
#[derive(Debug, Default)]
pub struct HeadNotices {
    last_seq: Option<u64>,
    at: Option<std::time::Instant>,
}

impl HeadNotices {
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    /// Whether to write `head` now (`force`: a rotation, reopen or stop); records it if so.
    pub fn due(&mut self, head: &Head, now: std::time::Instant, force: bool) -> bool {
        let moved = head.seq.is_some() && head.seq != self.last_seq;
        let waited = self
            .at
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::INTERVAL);
        if !(moved && (force || waited)) {
            return false;
        }
        self.last_seq = head.seq;
        self.at = Some(now);
        true
    }
}

/// Writes the chain head to journald (`MESSAGE_ID` [`super::journald::message_id::AUDIT_CHAIN_HEAD`]):
/// the trail file, the seq and hash of its last line, and why now (`interval`, `rotation`,
/// `reopen`, `stop`). `audit verify --head SEQ:HASH` checks a trail against such an entry.
pub fn head_notice(path: &Path, head: &Head, why: &str) {
    let Some(seq) = head.seq else { return };
    let notice = Notice::new(
        super::journald::message_id::AUDIT_CHAIN_HEAD,
        Level::Info,
        format!(
            "audit trail {} chain head ({why}): seq {seq} hash {}",
            path.display(),
            head.hash
        ),
    )
    .field("AUDIT_FILE", path.display())
    .field("AUDIT_CHAIN_SEQ", seq)
    .field("AUDIT_CHAIN_HASH", &head.hash)
    .field("AUDIT_CHAIN_REASON", why)
    .unlogged();
    // Through the one notice path (a failure is logged there); the sink has no monitor to ask.
    Notices::journald().send(&notice);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(chain: &mut Chain, json: &str) -> String {
        let mut buf = json.as_bytes().to_vec();
        chain.seal(&mut buf, 0);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn seal_appends_seq_and_hash_and_keeps_the_fields() {
        let mut chain = Chain::after(Head::genesis());
        let a = sealed(&mut chain, "{\"agent_id\":\"coder\",\"priority\":4}\n");
        let b = sealed(&mut chain, "{\"agent_id\":\"coder\",\"priority\":6}\n");
        let (content, seq, hash) = parse_line(a.trim_end()).unwrap();
        assert_eq!(content, "{\"agent_id\":\"coder\",\"priority\":4");
        assert_eq!(seq, 0);
        assert_eq!(hash, link_hash(GENESIS, 0, content.as_bytes()));
        let (content_b, seq_b, hash_b) = parse_line(b.trim_end()).unwrap();
        assert_eq!(seq_b, 1);
        assert_eq!(hash_b, link_hash(hash, 1, content_b.as_bytes()));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["agent_id"], "coder");
        assert_eq!(v["priority"], 4);
        assert_eq!(v["chain"]["seq"], 0);
    }

    #[test]
    fn rollback_forgets_lines_that_were_not_written() {
        let mut chain = Chain::after(Head::genesis());
        sealed(&mut chain, "{\"n\":1}\n");
        chain.commit();
        let head = chain.head().clone();
        sealed(&mut chain, "{\"n\":2}\n");
        chain.rollback();
        assert_eq!(chain.head(), &head);
        let c = sealed(&mut chain, "{\"n\":3}\n");
        assert_eq!(parse_line(c.trim_end()).unwrap().1, 1);
    }

    #[test]
    fn parse_refuses_what_is_not_a_canonical_chain_field() {
        let mut chain = Chain::after(Head::genesis());
        let line = sealed(&mut chain, "{\"n\":1}\n");
        let line = line.trim_end();
        assert!(parse_line(line).is_some());
        assert!(parse_line("{\"n\":1}").is_none());
        assert!(parse_line(&line.replace("\"seq\":0", "\"seq\":00")).is_none());
        assert!(parse_line(&line[..line.len() - 3]).is_none());
        assert!(parse_line(&line.replacen('{', "[", 1)).is_none());
    }

    #[test]
    fn head_notices_only_when_moved_and_not_too_often() {
        let t0 = std::time::Instant::now();
        let at = |s| t0 + std::time::Duration::from_secs(s);
        let head = |seq| Head {
            seq: Some(seq),
            hash: GENESIS.into(),
        };
        let mut n = HeadNotices::default();
        assert!(!n.due(&Head::genesis(), at(0), true), "nothing written yet");
        assert!(n.due(&head(0), at(0), false));
        assert!(!n.due(&head(5), at(1), false), "within the interval");
        assert!(n.due(&head(5), at(1), true), "a rotation says it at once");
        assert!(!n.due(&head(5), at(30), false), "not moved");
        assert!(n.due(&head(6), at(30), false));
    }

    #[test]
    fn last_head_reads_the_final_complete_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert_eq!(last_head(&path).unwrap(), None);
        let mut chain = Chain::after(Head::genesis());
        let text = sealed(&mut chain, "{\"n\":1}\n") + &sealed(&mut chain, "{\"n\":2}\n");
        chain.commit();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(last_head(&path).unwrap().as_ref(), Some(chain.head()));
        std::fs::write(&path, format!("{text}{{\"torn")).unwrap();
        assert_eq!(last_head(&path).unwrap().as_ref(), Some(chain.head()));
        std::fs::write(&path, "{\"before the chain\":1}\n").unwrap();
        assert_eq!(last_head(&path).unwrap(), None);
    }
}
