//! JSON-lines audit trail: one object per action, appended to a file, with the journald field names
//! in lower case plus `time` (RFC 3339, UTC) and `priority`.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::chain::{self, Chain, Head, HeadNotices, Witness};
use super::rotate::{Rotation, previous_file};
use super::{FailureThrottle, FieldValue, Sink, SinkError, action_fields, journald};
use crate::action::Action;

/// The audit record of `action`: every field of [`super::Field`] under its JSON name (`null` where
/// it does not apply), `process_chain` as an array of `{pid, exe, args}`, `time` and `priority`. The
/// same object as [`json_line`] writes, as a value (for readers of single records and tests).
#[cfg_attr(not(test), allow(dead_code))]
pub fn json_record(action: &Action) -> Result<Map<String, Value>, SinkError> {
    let mut line = Vec::new();
    write_json_line(action, &mut line)?;
    Ok(serde_json::from_slice(&line)?)
}

/// [`json_record`] as one line, newline included.
pub fn json_line(action: &Action) -> Result<String, SinkError> {
    let mut line = Vec::with_capacity(512);
    write_json_line(action, &mut line)?;
    // The writer only emits serde_json's UTF-8 and the RFC 3339 time.
    Ok(String::from_utf8(line).expect("JSON is UTF-8"))
}

/// Appends the record of `action` and a newline to `out`. Written field by field, without an
/// intermediate map: this runs once per agent action (see docs/benchmarks.md).
pub fn write_json_line(action: &Action, out: &mut Vec<u8>) -> Result<(), SinkError> {
    out.push(b'{');
    for (field, value) in action_fields(action) {
        serde_json::to_writer(&mut *out, field.json_name())?;
        out.push(b':');
        match value {
            None => out.extend_from_slice(b"null"),
            Some(FieldValue::Text(t)) => serde_json::to_writer(&mut *out, t.as_ref())?,
            Some(FieldValue::Number(n)) => serde_json::to_writer(&mut *out, &n)?,
            Some(FieldValue::Chain(chain)) => serde_json::to_writer(&mut *out, chain)?,
        }
        out.push(b',');
    }
    out.extend_from_slice(b"\"time\":\"");
    OffsetDateTime::from(action.time).format_into(out, &Rfc3339)?;
    let priority = u8::from(journald::priority(action.verdict));
    out.extend_from_slice(b"\",\"priority\":");
    serde_json::to_writer(&mut *out, &priority)?;
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// Appends [`json_line`]s to a file. Lines are collected in a buffer and written with one
/// `write` per [`Sink::flush`] (the daemon flushes after each burst of kernel records), not one
/// per action.
#[derive(Debug)]
pub struct JsonSink {
    path: PathBuf,
    file: File,
    /// The file ends in the middle of a line (a crash or a failed write left part of one): the next
    /// write starts with a newline so that the new record is a line of its own.
    mid_line: bool,
    /// Whole lines not yet written, and how many.
    buf: Vec<u8>,
    pending: u64,
    /// The hash chain through every line (see [`chain`]).
    chain: Chain,
    /// Size-based rotation (`--json-log-max-size`), if any.
    rotation: Option<Rotation>,
    rotation_failures: FailureThrottle,
    /// Where chain heads are reported (journald in the daemon), and when last.
    witness: Option<Witness>,
    notices: HeadNotices,
}

impl JsonSink {
    /// Opens `path` for appending (see [`JsonSink::open_with`]), without rotation or chain-head
    /// reports.
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        Self::open_with(path, None, None)
    }

    /// Opens `path` for appending, creating it with mode 0600 (and a missing parent directory with
    /// 0700): the trail says what agents did and is for root's eyes. An existing file keeps its
    /// mode. The chain goes on from the last line of `path`, or if `path` is new or empty, of
    /// `path.1` (the file a rotation just renamed). `witness` is told the chain head at intervals
    /// and at every rotation, reopen and stop.
    pub fn open_with(
        path: &Path,
        rotation: Option<Rotation>,
        witness: Option<Witness>,
    ) -> Result<Self, SinkError> {
        let (file, mid_line) = Self::open_file(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            mid_line,
            buf: Vec::new(),
            pending: 0,
            chain: Chain::after(resume(path)),
            rotation,
            rotation_failures: FailureThrottle::default(),
            witness,
            notices: HeadNotices::default(),
        })
    }

    /// The file at `path`, and whether it ends mid-line.
    fn open_file(path: &Path) -> Result<(File, bool), SinkError> {
        let open_err = |source| SinkError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let mut last = [0u8; 1];
        let mid_line = len > 0
            && file.metadata().map_err(open_err)?.is_file()
            && file.read_exact_at(&mut last, len - 1).is_ok()
            && last[0] != b'\n';
        Ok((file, mid_line))
    }

    /// Rotates before `incoming` bytes would take the file past `--json-log-max-size`. A failed
    /// rotation is logged (rate-limited) and the lines go to the current file: none is lost.
    fn rotate_if_due(&mut self, incoming: u64) {
        let Some(rotation) = self.rotation else {
            return;
        };
        let len = match self.file.metadata() {
            Ok(m) if m.is_file() => m.len(),
            _ => return,
        };
        if !rotation.due(len, incoming) {
            return;
        }
        let now = std::time::Instant::now();
        let rotated = rotation
            .rotate(&self.path)
            .map_err(|source| SinkError::Open {
                path: self.path.clone(),
                source,
            })
            .and_then(|()| Self::open_file(&self.path));
        match rotated {
            Ok((file, mid_line)) => {
                self.file = file;
                self.mid_line = mid_line;
                self.report_head(now, "rotation");
            }
            Err(e) => {
                if let Some(n) = self.rotation_failures.failure(now, 1) {
                    tracing::warn!(
                        failures = n,
                        "rotating the audit trail failed, still writing to the current file: {e}"
                    );
                }
            }
        }
    }

    /// Tells the witness the chain head if due (`why` other than "interval": at once).
    fn report_head(&mut self, now: std::time::Instant, why: &str) {
        let Some(witness) = self.witness else {
            return;
        };
        if self.notices.due(self.chain.head(), now, why != "interval") {
            witness(&self.path, self.chain.head(), why);
        }
    }

    /// Writes `lines` (newline-terminated) in one go. A write that fails half-way (a full disk
    /// takes what fits, then says ENOSPC) is cut back to where it began, so the trail never ends
    /// in a torn record that readers trip on; the whole batch then counts as failed. Only if the
    /// cut fails too is the file marked as ending mid-line (the next write starts a fresh line).
    fn write_line(&mut self, lines: &[u8]) -> io::Result<()> {
        let start = self.file.metadata()?.len();
        let was_mid_line = self.mid_line;
        if let Err(e) = self.write_lines(lines) {
            // Not a regular file (a pipe, /dev/full): nothing to cut.
            if self.file.metadata().is_ok_and(|m| m.is_file()) && self.file.set_len(start).is_ok() {
                self.mid_line = was_mid_line;
            }
            return Err(e);
        }
        self.file.flush()
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        if self.mid_line {
            self.write_counted(b"\n")?;
        }
        self.write_counted(lines)
    }

    fn write_counted(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => {
                    self.note_partial(buf, done);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.note_partial(buf, done);
                    return Err(e);
                }
            }
        }
        self.mid_line = buf.last() != Some(&b'\n');
        Ok(())
    }

    fn note_partial(&mut self, buf: &[u8], done: usize) {
        if done > 0 {
            self.mid_line = buf[done - 1] != b'\n';
        }
    }
}

impl Sink for JsonSink {
    fn name(&self) -> &'static str {
        "json"
    }

    fn emit(&mut self, action: &Action) -> Result<(), SinkError> {
        let start = self.buf.len();
        if let Err(e) = write_json_line(action, &mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        self.chain.seal(&mut self.buf, start);
        self.pending += 1;
        Ok(())
    }

    fn emit_record(&mut self, record: &Value) -> Result<(), SinkError> {
        let start = self.buf.len();
        if let Err(e) = serde_json::to_writer(&mut self.buf, record) {
            self.buf.truncate(start);
            return Err(e.into());
        }
        self.buf.push(b'\n');
        self.chain.seal(&mut self.buf, start);
        self.pending += 1;
        Ok(())
    }

    fn pending(&self) -> u64 {
        self.pending
    }

    /// The chain goes on from memory, not from the files: logrotate may name the old file
    /// anything.
    fn reopen(&mut self) -> Result<(), SinkError> {
        let (file, mid_line) = Self::open_file(&self.path)?;
        // What is still buffered was accepted before the rotation: it goes to the old file.
        let flushed = Sink::flush(self);
        self.file = file;
        self.mid_line = mid_line;
        self.report_head(std::time::Instant::now(), "reopen");
        flushed
    }

    fn tick(&mut self, now: std::time::Instant) {
        self.report_head(now, "interval");
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        self.pending = 0;
        self.rotate_if_due(buf.len() as u64);
        let result = self.write_line(&buf);
        match result {
            Ok(()) => self.chain.commit(),
            // The lines are lost (and counted so); the next ones chain to the last line written.
            Err(_) => self.chain.rollback(),
        }
        // Keep the allocation for the next burst.
        self.buf = buf;
        self.buf.clear();
        result.map_err(|source| SinkError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for JsonSink {
    /// What is still buffered at shutdown goes out; a failure here has nobody left to tell.
    fn drop(&mut self) {
        let _ = Sink::flush(self);
        self.report_head(std::time::Instant::now(), "stop");
    }
}

/// Where the chain of a trail opened at `path` goes on from: its last chained line, or if it is
/// new or empty that of `path.1`; else a new chain. An unreadable file is logged and starts a new
/// chain (`audit verify` then shows the break).
fn resume(path: &Path) -> Head {
    let empty = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    let from = if empty {
        previous_file(path)
    } else {
        path.to_path_buf()
    };
    match chain::last_head(&from) {
        Ok(Some(head)) => head,
        Ok(None) => Head::genesis(),
        Err(e) => {
            tracing::warn!(
                "reading the chain head of {}: {e}; the audit trail's chain starts anew",
                from.display()
            );
            Head::genesis()
        }
    }
}

#[cfg(test)]
mod reopen_tests {
    use super::*;

    #[test]
    fn reopen_after_a_rename_writes_to_a_new_file_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonSink::open(&path).unwrap();
        sink.write_line(b"{\"n\":1}\n").unwrap();
        // logrotate: rename, then SIGUSR1. A line buffered in between goes to the renamed file.
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.buf.extend_from_slice(b"{\"n\":2}\n");
        sink.pending = 1;
        sink.reopen().unwrap();
        sink.write_line(b"{\"n\":3}\n").unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old, "{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(new, "{\"n\":3}\n");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;
    use crate::action::Verdict;
    use crate::output::Field;
    use crate::output::journald::journal_fields;
    use crate::output::tests::{connect_action, dns_action, exec_action};

    fn parse(line: &str) -> Value {
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        serde_json::from_str(line).expect("valid JSON")
    }

    #[test]
    fn connect_round_trips_every_field() {
        let v = parse(&json_line(&connect_action()).unwrap());
        let expected = json!({
            "agent_id": "coder",
            "agent_spiffe_id": "spiffe://host.example/agent/coder",
            "task_id": "t-42",
            "action": "connect",
            "verdict": "denied",
            "pid": 4242,
            "uid": 1000,
            "comm": "curl",
            "exe": "/usr/bin/curl",
            "interpreter": null,
            "dest_addr": "10.1.2.3",
            "dest_port": 443,
            "dest_transport": "tcp",
            "dest_host": "api.example.com",
            "dns_name": null,
            "socket": null,
            "syscall": null,
            "signal": null,
            "target_pid": null,
            "target_comm": null,
            "target_agent": null,
            "target_task": null,
            "process_chain": [
                {"pid": 4000, "exe": "/usr/bin/python3", "args": []},
                {"pid": 4100, "exe": "/bin/sh", "args": ["-c", "curl https://10.1.2.3"]},
                {"pid": 4242, "exe": "/usr/bin/curl", "args": []}
            ],
            "enforcement": "eperm",
            "reason": "no network rule matches 10.1.2.3:443",
            "message": "agent coder task t-42: connect tcp 10.1.2.3:443 (api.example.com) by pid 4242 (curl): DENIED",
            "file_path": null,
            "open_flags": null,
            "dest_path": null,
            "time": "2025-11-29T11:44:00.25Z",
            "priority": 4,
            "tls_sni": null,
            "http_host": null,
            "bytes_in": null,
            "bytes_out": null,
            "duration_ms": null,
            "http_method": null,
            "url_path": null,
            "http_status": null
        });
        assert_eq!(v, expected);
    }

    #[test]
    fn exec_has_nulls_where_fields_do_not_apply() {
        let v = parse(&json_line(&exec_action()).unwrap());
        assert_eq!(v["action"], "exec");
        assert_eq!(v["verdict"], "alert");
        assert_eq!(v["priority"], 3);
        assert_eq!(v["exe"], "/usr/bin/nc");
        for k in ["dest_addr", "dest_port", "dest_transport", "enforcement"] {
            assert_eq!(v[k], Value::Null, "{k}");
        }
        let exe_unknown = Action {
            exe: None,
            verdict: Verdict::Allowed,
            ..connect_action()
        };
        let v = parse(&json_line(&exe_unknown).unwrap());
        assert_eq!(v["exe"], Value::Null);
        assert_eq!(v["priority"], 6);
    }

    #[test]
    fn same_fields_as_journald() {
        for a in [connect_action(), exec_action(), dns_action()] {
            let record = json_record(&a).unwrap();
            let mut journal = journal_fields(&a);
            journal.retain(|(k, _)| *k != "SYSLOG_IDENTIFIER" && *k != "MESSAGE_ID");
            for (name, value) in journal {
                let field = Field::ALL
                    .into_iter()
                    .find(|f| f.journal_name() == name)
                    .unwrap_or_else(|| panic!("journald field {name} is not a Field"));
                let json = &record[field.json_name()];
                let rendered = match json {
                    Value::String(s) => s.clone(),
                    Value::Array(_) => a.chain_string(),
                    other => other.to_string(),
                };
                assert_eq!(rendered, value, "{name}");
            }
        }
    }

    #[test]
    fn appends_one_line_per_action_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        let mut sink = JsonSink::open(&path).unwrap();
        sink.emit(&connect_action()).unwrap();
        sink.emit(&exec_action()).unwrap();
        drop(sink);
        // Reopening appends.
        JsonSink::open(&path)
            .unwrap()
            .emit(&connect_action())
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let lines: Vec<String> = io::BufReader::new(File::open(&path).unwrap())
            .lines()
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines.len(), 3);
        let actions: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(actions[0]["action"], "connect");
        assert_eq!(actions[1]["action"], "exec");
    }

    #[test]
    fn a_torn_last_line_is_terminated_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"agent_id\":\"cod").unwrap();
        JsonSink::open(&path)
            .unwrap()
            .emit(&connect_action())
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(parse(&format!("{}\n", lines[1]))["agent_id"], "coder");
    }

    #[test]
    fn full_device_is_an_error() {
        let mut sink = JsonSink::open(Path::new("/dev/full")).unwrap();
        sink.emit(&connect_action()).unwrap();
        assert_eq!(sink.pending(), 1);
        let err = sink.flush().unwrap_err();
        assert_eq!(sink.pending(), 0);
        match &err {
            SinkError::Write { path, source } => {
                assert_eq!(path, Path::new("/dev/full"));
                assert_eq!(source.kind(), io::ErrorKind::StorageFull, "{source}");
            }
            other => panic!("expected a write error, got {other:?}"),
        }
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }

    #[test]
    fn unopenable_path_is_an_error() {
        let err = JsonSink::open(Path::new("/proc/version/audit.jsonl")).unwrap_err();
        assert!(matches!(err, SinkError::Open { .. }), "{err:?}");
    }
}
