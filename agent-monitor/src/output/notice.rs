//! Notices: what the daemon says about itself (enforcement active, policy reloaded, records lost,
//! addresses withheld, …), as opposed to the actions of agents. Each notice goes to the daemon's
//! log and to every notice sink (journald, with its `MESSAGE_ID`); a new destination is one more
//! [`NoticeSink`].

use std::sync::atomic::{AtomicU64, Ordering};

use libsystemd::logging::Priority;

use super::journald;

/// How serious a notice is: its journald priority and the level of its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Routine bookkeeping (audit-trail chain heads).
    Info,
    Notice,
    Warning,
    Error,
}

impl Level {
    pub fn priority(self) -> Priority {
        match self {
            Level::Info => Priority::Info,
            Level::Notice => Priority::Notice,
            Level::Warning => Priority::Warning,
            Level::Error => Priority::Error,
        }
    }
}

/// One thing the daemon reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// `MESSAGE_ID` (one of [`journald::message_id`]).
    pub id: &'static str,
    pub level: Level,
    pub message: String,
    /// Extra journald fields, in order.
    pub fields: Vec<(&'static str, String)>,
    /// Also written to the daemon's log; off where the log has its own (richer) line for it.
    pub logged: bool,
}

impl Notice {
    pub fn new(id: &'static str, level: Level, message: impl Into<String>) -> Self {
        Notice {
            id,
            level,
            message: message.into(),
            fields: Vec::new(),
            logged: true,
        }
    }

    pub fn field(mut self, name: &'static str, value: impl ToString) -> Self {
        self.fields.push((name, value.to_string()));
        self
    }

    /// Not repeated in the daemon's log.
    pub fn unlogged(mut self) -> Self {
        self.logged = false;
        self
    }
}

/// A destination of notices.
pub trait NoticeSink: Send {
    fn name(&self) -> &'static str;
    /// An error means the notice did not reach this destination.
    fn notice(&mut self, notice: &Notice) -> Result<(), super::SinkError>;
}

/// Notices to journald, as entries with `SYSLOG_IDENTIFIER` and `MESSAGE_ID`.
pub struct JournaldNotices;

impl NoticeSink for JournaldNotices {
    fn name(&self) -> &'static str {
        "journald"
    }

    fn notice(&mut self, notice: &Notice) -> Result<(), super::SinkError> {
        journald::event(
            notice.id,
            notice.level.priority(),
            &notice.message,
            &notice.fields,
        )?;
        Ok(())
    }
}

/// Notices delivered to a sink and notices a sink failed to take, by every [`Notices`] of the
/// process (the audit trail's chain heads are sent from inside the JSON sink, which has no
/// monitor to count them): `status` and the metrics show them as the sink `notices`.
static DELIVERED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// (delivered, failed) notice deliveries since start, over every sink.
pub fn delivery_counts() -> (u64, u64) {
    (
        DELIVERED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    )
}

/// Fans each notice out to the log and to every sink; counts what a sink could not take.
pub struct Notices {
    sinks: Vec<Box<dyn NoticeSink>>,
    failed: u64,
}

impl Notices {
    pub fn new(sinks: Vec<Box<dyn NoticeSink>>) -> Self {
        Notices { sinks, failed: 0 }
    }

    /// The daemon's notices: journald.
    pub fn journald() -> Self {
        Self::new(vec![Box::new(JournaldNotices)])
    }

    pub fn send(&mut self, notice: &Notice) {
        if notice.logged {
            let msg = &notice.message;
            match notice.level {
                Level::Info | Level::Notice => tracing::info!("{msg}"),
                Level::Warning => tracing::warn!("{msg}"),
                Level::Error => tracing::error!("{msg}"),
            }
        }
        for sink in &mut self.sinks {
            if let Err(e) = sink.notice(notice) {
                self.failed += 1;
                FAILED.fetch_add(1, Ordering::Relaxed);
                // The notice is about the daemon, and the daemon has no better place to say it
                // (stderr, which systemd also collects).
                tracing::warn!(
                    "{} event {} not sent ({e}): {}",
                    sink.name(),
                    notice.id,
                    notice.message
                );
            } else {
                DELIVERED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Notices a sink failed to take, since start (each was logged).
    #[cfg(test)]
    pub fn failed(&self) -> u64 {
        self.failed
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Keeps what it was sent; fails while `fail` is set.
    #[derive(Clone, Default)]
    pub(crate) struct Probe {
        pub(crate) seen: Arc<Mutex<Vec<Notice>>>,
        pub(crate) fail: Arc<Mutex<bool>>,
    }

    impl NoticeSink for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn notice(&mut self, notice: &Notice) -> Result<(), crate::output::SinkError> {
            if *self.fail.lock().unwrap() {
                return Err(crate::output::SinkError::Write {
                    path: "/probe".into(),
                    source: std::io::Error::other("probe failure"),
                });
            }
            self.seen.lock().unwrap().push(notice.clone());
            Ok(())
        }
    }

    #[test]
    fn every_sink_gets_each_notice_and_failures_are_counted() {
        let (a, b) = (Probe::default(), Probe::default());
        let mut notices = Notices::new(vec![Box::new(a.clone()), Box::new(b.clone())]);
        let n = Notice::new(journald::message_id::STOPPING, Level::Notice, "stopped")
            .field("PIN_DIR", "/sys/fs/bpf/agent-monitor");
        let (delivered, failed) = delivery_counts();
        *b.fail.lock().unwrap() = true;
        notices.send(&n);
        *b.fail.lock().unwrap() = false;
        notices.send(&n);
        assert_eq!(*a.seen.lock().unwrap(), vec![n.clone(), n.clone()]);
        assert_eq!(*b.seen.lock().unwrap(), vec![n.clone()]);
        assert_eq!(notices.failed(), 1);
        // The process-wide counts `status` shows (other tests may send meanwhile: at least).
        let (delivered_now, failed_now) = delivery_counts();
        assert!(
            delivered_now - delivered >= 3,
            "{delivered} → {delivered_now}"
        );
        assert!(failed_now - failed >= 1, "{failed} → {failed_now}");
        assert_eq!(
            n.fields,
            vec![("PIN_DIR", "/sys/fs/bpf/agent-monitor".to_string())]
        );
    }

    #[test]
    fn levels_map_to_journald_priorities() {
        assert_eq!(u8::from(Level::Notice.priority()), 5);
        assert_eq!(u8::from(Level::Warning.priority()), 4);
        assert_eq!(u8::from(Level::Error.priority()), 3);
    }
}
