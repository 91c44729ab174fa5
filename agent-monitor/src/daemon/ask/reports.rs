//! What ask mode tells the operator: the notices of held and decided requests (journald and the
//! trail) and the metrics.

use super::*;

impl Monitor {
    /// Ask mode's part of a metrics scrape.
    pub(in crate::daemon) fn ask_metrics(&self) -> crate::output::ask_metrics::AskMetrics {
        let c = &self.ask.counters;
        crate::output::ask_metrics::AskMetrics {
            held: c.held,
            pending: self.ask.desk.len() as u64,
            ended: vec![
                ("approved", c.approved),
                ("denied", c.denied),
                ("timeout", c.timeout),
                ("withdrawn", c.withdrawn),
            ],
            allowed_without_asking: c.allowed_without_asking,
            denied_without_asking: c.denied_without_asking,
            approver_errors: c.approver_errors,
            refused_full: c.refused_full,
            decision_seconds: c.decision_seconds.clone(),
        }
    }

    pub(super) fn ask_notice(&self, r: &PendingRequest, verdict: &str, message: String) -> Notice {
        let level = match verdict {
            "pending" | "approved" => Level::Notice,
            _ => Level::Warning,
        };
        let mut n = Notice::new(message_id::ASK_REQUEST, level, message)
            .field("AGENT_ID", &r.agent)
            .field("TASK_ID", r.task.as_deref().unwrap_or("?"))
            // ACTION=ask: a request, not an action the kernel judged (readers of the trail, such
            // as `policy suggest`, count it without judging it); HELD_ACTION says what waits.
            .field("ACTION", "ask")
            .field("HELD_ACTION", action_kind(&r.action))
            .field("VERDICT", verdict)
            .field("REQUEST_ID", r.id)
            .field("PID", r.pid);
        if let Some(uid) = r.uid {
            n = n.field("AGENT_UID", uid);
        }
        match &r.action {
            HeldAction::Dns { name, .. } => n = n.field("DNS_NAME", name),
            HeldAction::Connect {
                transport,
                address,
                port,
                host,
            } => {
                n = n
                    .field("DEST_ADDR", address)
                    .field("DEST_PORT", port)
                    .field("DEST_TRANSPORT", transport);
                if let Some(h) = host {
                    n = n.field("DEST_HOST", h);
                }
            }
            HeldAction::Exec { path, .. } => n = n.field("EXE", path),
            HeldAction::Unix { .. } => n = super::unix_ask::notice_fields(n, &r.action),
            HeldAction::Open {
                path, open_flags, ..
            } => n = n.field("FILE_PATH", path).field("OPEN_FLAGS", open_flags),
        }
        n
    }

    pub(super) fn report_held(&mut self, r: &PendingRequest) {
        let msg = format!(
            "agent {} task {}: {} held as request {} (ask mode), waiting for a decision",
            r.agent,
            r.task.as_deref().unwrap_or("?"),
            describe(&r.action),
            r.id
        );
        let n = self.ask_notice(r, "pending", msg);
        self.report_ask(r, n);
    }

    /// To journald as a notice, and to the JSON trail as a record with the same fields (JSON
    /// names: lower case, `uid` for `AGENT_UID`), the time, SPIFFE id and process chain.
    pub(super) fn report_ask(&mut self, r: &PendingRequest, n: Notice) {
        let mut record = serde_json::Map::new();
        for (name, value) in &n.fields {
            let key = match *name {
                "AGENT_UID" => "uid".to_string(),
                other => other.to_ascii_lowercase(),
            };
            let value = match value.parse::<u64>() {
                Ok(number) if matches!(*name, "PID" | "AGENT_UID" | "REQUEST_ID" | "DEST_PORT") => {
                    serde_json::Value::from(number)
                }
                _ => serde_json::Value::from(value.as_str()),
            };
            record.insert(key, value);
        }
        record.insert("agent_spiffe_id".into(), r.spiffe_id.clone().into());
        record.insert(
            "process_chain".into(),
            serde_json::to_value(&r.chain).unwrap_or_default(),
        );
        record.insert("message".into(), n.message.clone().into());
        record.insert(
            "time".into(),
            humantime::format_rfc3339_nanos(SystemTime::now())
                .to_string()
                .into(),
        );
        self.reporter.record(&serde_json::Value::Object(record));
        self.reporter.notice(n);
    }

    pub(super) fn report_decided(&mut self, r: &PendingRequest, o: &Outcome, waited_ns: u64) {
        let scope = o.scope.map(|s| match s {
            Scope::Once => "once",
            Scope::Task => "task",
            Scope::Always => "always",
        });
        let msg = format!(
            "agent {} task {}: request {} ({}) {}{} by {} after {} ms{}",
            r.agent,
            r.task.as_deref().unwrap_or("?"),
            r.id,
            describe(&r.action),
            o.verdict,
            scope.map(|s| format!(" ({s})")).unwrap_or_default(),
            o.approver,
            waited_ns / 1_000_000,
            o.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        let mut n = self
            .ask_notice(r, &o.verdict, msg)
            .field("APPROVER", &o.approver);
        if let Some(s) = scope {
            n = n.field("DECISION_SCOPE", s);
        }
        if let Some(reason) = &o.reason {
            n = n.field("REASON", reason);
        }
        self.report_ask(r, n);
    }
}
