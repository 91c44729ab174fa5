//! The control socket: connections, requests and the reports `run` sends (caught reaches, privileges).

use super::*;

/// Binds the control socket (replacing a stale one): root-only, or root:ADMIN 0660.
pub(super) fn bind_control_socket(
    path: &Path,
    admin_gid: Option<u32>,
) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = match admin_gid {
        None => 0o600,
        Some(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid))
                .with_context(|| format!("giving {} to the admin group", path.display()))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

/// A request from a control connection, with the kernel-reported identity of the caller.
pub(super) struct ControlCall {
    pub(super) request: Request,
    pub(super) peer: Peer,
    pub(super) reply: oneshot::Sender<Response>,
}

/// What a connection needs of ask mode: the monitor's ask input (a `run`'s ask channel) and the
/// `pending --follow` stream.
#[derive(Clone)]
pub(super) struct AskLinks {
    pub(super) asks: mpsc::Sender<ask::AskIn>,
    pub(super) pending: broadcast::Sender<String>,
    /// The own allowlists of ask-mode agents, for the ask channels.
    pub(super) allowlists: tokio::sync::watch::Receiver<Arc<ask::AskAllowlists>>,
}

pub(super) async fn serve_control(
    listener: UnixListener,
    to_monitor: mpsc::Sender<ControlCall>,
    events: broadcast::Sender<EventLine>,
    ask: AskLinks,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let to_monitor = to_monitor.clone();
        let events = events.clone();
        let ask = ask.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, to_monitor, events, ask).await {
                tracing::warn!("control connection: {e:#}");
            }
        });
    }
}

pub(super) async fn serve_connection(
    stream: UnixStream,
    to_monitor: mpsc::Sender<ControlCall>,
    events: broadcast::Sender<EventLine>,
    ask: AskLinks,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let peer_pidfd = {
        use std::os::fd::AsRawFd as _;
        crate::identity::peer::peer_pidfd(stream.as_raw_fd())
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(control::MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("no request within 10 s")??;
    // Closed without a request: `run` connects for an ask channel before it learns its agent's
    // mode (sandbox/ask_channel.rs) and closes the connection unused outside ask mode.
    if line.is_empty() {
        return Ok(());
    }
    let mut follow: Option<(broadcast::Receiver<EventLine>, Option<String>)> = None;
    let pending_follow;
    let ask_channel;
    let ask_agent;
    let caught_channel;
    let response = {
        let request = control::parse_request(&line).map_err(|bad| bad.to_string());
        if let Ok(Request::Events {
            follow: true,
            agent,
        }) = &request
        {
            // Subscribed before the history is taken, so no action falls between the two.
            follow = Some((events.subscribe(), agent.clone()));
        }
        // Likewise for held requests: subscribed before the list is taken.
        pending_follow = matches!(&request, Ok(Request::Pending { follow: true }))
            .then(|| ask.pending.subscribe());
        ask_channel = matches!(&request, Ok(Request::AskChannel { .. }));
        ask_agent = match &request {
            Ok(Request::AskChannel { agent, .. }) => agent.clone(),
            _ => String::new(),
        };
        caught_channel = matches!(&request, Ok(Request::CaughtChannel {}));
        match (request, cred.pid()) {
            (Err(message), _) => Response::Error { message },
            (Ok(_), None) => Response::Error {
                message: "the kernel did not report the caller's pid".into(),
            },
            (Ok(request), Some(pid)) => {
                let peer = Peer::from_cred(pid as u32, cred.uid(), cred.gid());
                // Who the caller is comes from /proc of the pid that connected: only while that
                // process still runs (checked after the read, through a pidfd that cannot name a
                // reused pid). Else an agent connects, exits and leaves the connection to a
                // descendant, and a pid without /proc reads as no agent's.
                // Kernels before 6.5 have no SO_PEERPIDFD: there the pid's /proc entry, read
                // after the peer's identity was, is the best check (a reused pid can pass).
                let connected_still_runs = match &peer_pidfd {
                    Ok(fd) => crate::identity::peer::still_running(fd, pid as u32),
                    Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| {
                            tracing::warn!(
                                "this kernel has no SO_PEERPIDFD (Linux 6.5): a control request \
                                 is checked against the connecting pid's /proc entry instead, \
                                 which a reused pid can pass"
                            )
                        });
                        crate::identity::procfs::exists(pid as u32)
                    }
                    Err(_) => false,
                };
                match connected_still_runs {
                    true => {
                        let (reply, answer) = oneshot::channel();
                        to_monitor
                            .send(ControlCall {
                                request,
                                peer,
                                reply,
                            })
                            .await
                            .context("monitor stopped")?;
                        answer.await.context("monitor dropped the request")?
                    }
                    false => Response::Error {
                        message: format!(
                            "the process that connected (pid {pid}) no longer runs: a request is \
                             judged by the process that made the connection"
                        ),
                    },
                }
            }
        }
    };
    if let (Response::Pending { .. }, Some(rx)) = (&response, pending_follow) {
        return stream_pending(write, &response, rx).await;
    }
    if let (Response::AskChannelOpen {}, true, Some(pid)) = (&response, ask_channel, cred.pid()) {
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        let lists = AgentAllowlist {
            agent: ask_agent,
            lists: ask.allowlists,
        };
        return serve_ask_channel(reader.into_inner(), write, pid as u32, ask.asks, lists).await;
    }
    if let (Response::Recorded {}, true, Some(pid)) = (&response, caught_channel, cred.pid()) {
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        let peer = Peer::from_cred(pid as u32, cred.uid(), cred.gid());
        return serve_caught_channel(reader.into_inner(), peer, to_monitor).await;
    }
    let (response, history) = match (response, follow.is_some()) {
        (Response::Events { history }, true) => (Response::Events { history: vec![] }, history),
        (r, _) => {
            // Refused (authorization) or not a follow: nothing streams.
            follow = None;
            (r, vec![])
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    let Some((mut rx, agent)) = follow else {
        return Ok(());
    };
    for v in history {
        write.write_all(format!("{v}\n").as_bytes()).await?;
    }
    loop {
        let line = match rx.recv().await {
            Ok(ev) if agent.as_ref().is_none_or(|a| *a == ev.0) => format!("{}\n", ev.1),
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"lagged\":{n}}}\n"),
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        if write.write_all(line.as_bytes()).await.is_err() {
            // The follower went away.
            return Ok(());
        }
    }
}

/// `pending --follow`: the list, then one `PendingEvent` per line until the follower leaves.
async fn stream_pending(
    mut write: tokio::net::unix::OwnedWriteHalf,
    first: &Response,
    mut rx: broadcast::Receiver<String>,
) -> anyhow::Result<()> {
    let mut out = serde_json::to_string(first)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    loop {
        let line = match rx.recv().await {
            Ok(l) => format!("{l}\n"),
            Err(broadcast::error::RecvError::Lagged(n)) => format!("{{\"lagged\":{n}}}\n"),
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        if write.write_all(line.as_bytes()).await.is_err() {
            return Ok(());
        }
    }
}

/// A `run`'s caught channel: one `CaughtReport` per line, each handled as a `caught` request of
/// the `run` that opened the connection, until it closes it. A report the monitor refuses is
/// logged (it names why), never dropped silently.
async fn serve_caught_channel(
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    peer: Peer,
    to_monitor: mpsc::Sender<ControlCall>,
) -> anyhow::Result<()> {
    let mut reader = read.take(control::MAX_REQUEST as u64);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        reader.set_limit(control::MAX_REQUEST as u64);
        let report = match serde_json::from_slice::<control::CaughtReport>(&line) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(run_pid = peer.pid, "caught channel: unreadable report: {e}");
                continue;
            }
        };
        let (reply, answer) = oneshot::channel();
        let call = ControlCall {
            request: Request::Caught(report),
            peer: peer.clone(),
            reply,
        };
        if to_monitor.send(call).await.is_err() {
            return Ok(());
        }
        if let Ok(Response::Error { message }) = answer.await {
            tracing::warn!(
                run_pid = peer.pid,
                "caught channel: report refused: {message}"
            );
        }
    }
}

/// A `run`'s ask channel: `AskCall` lines in, `AskAnswer` lines out, in any order, until `run`
/// closes it; then its held calls are withdrawn (they went with it).
async fn serve_ask_channel(
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    run_pid: u32,
    asks: mpsc::Sender<ask::AskIn>,
    mut lists: AgentAllowlist,
) -> anyhow::Result<()> {
    // The agent's own allowlist first, then whenever it changes: `run` continues calls on it
    // without asking.
    let mut sent = lists.line();
    write.write_all(sent.as_bytes()).await?;
    let (answers, mut answered) = mpsc::unbounded_channel::<control::AskAnswer>();
    let mut reader = read.take(control::MAX_REQUEST as u64);
    // `read_until` (not `read_line`): cancel safe in `select!`, a partly read line stays in `line`.
    let mut line = Vec::new();
    let result = loop {
        tokio::select! {
            n = reader.read_until(b'\n', &mut line) => {
                match n {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(anyhow::Error::from(e)),
                }
                if line.last() != Some(&b'\n') {
                    // The limit, or the end of the stream, in the middle of a line.
                    break Err(anyhow::anyhow!(
                        "ask channel of `run` {run_pid}: a line longer than {} bytes, or cut short",
                        control::MAX_REQUEST
                    ));
                }
                reader.set_limit(control::MAX_REQUEST as u64);
                match serde_json::from_slice::<control::AskCall>(&line) {
                    Ok(call) => {
                        let input = ask::AskIn::Call { run_pid, call, answers: answers.clone() };
                        if asks.send(input).await.is_err() {
                            break Ok(());
                        }
                    }
                    Err(e) => {
                        // Refused, never released: answered when its number can be read.
                        tracing::warn!(run_pid, "ask channel: unreadable call, denied: {e}");
                        let call = serde_json::from_slice::<serde_json::Value>(&line)
                            .ok()
                            .and_then(|v| v.get("call").and_then(serde_json::Value::as_u64));
                        if let Some(call) = call {
                            let _ = answers.send(control::AskAnswer {
                                call,
                                allow: false,
                                outcome: None,
                                grant_ms: None,
                            });
                        }
                    }
                }
                line.clear();
            }
            Ok(()) = lists.lists.changed() => {
                let line = lists.line();
                if line != sent {
                    if let Err(e) = write.write_all(line.as_bytes()).await {
                        break Err(e.into());
                    }
                    sent = line;
                }
            }
            Some(a) = answered.recv() => {
                let mut out = serde_json::to_string(&a)?;
                out.push('\n');
                if let Err(e) = write.write_all(out.as_bytes()).await {
                    break Err(e.into());
                }
            }
        }
    };
    let _ = asks.send(ask::AskIn::Closed { run_pid }).await;
    result
}

impl Monitor {
    pub(super) fn on_request(&mut self, request: Request, peer: &Peer) -> Response {
        let inside = self.identify(peer.pid).map(|id| self.names(&id.slot));
        let admin = peer.is_admin(self.admin_gid);
        if let Err(why) = control::authorize(
            &request,
            admin,
            inside.as_ref().map(|(a, t)| (a.as_str(), t.as_str())),
        )
        .map_err(|refusal| refusal.to_string())
        {
            self.report_refusal(&request, peer, inside, &why);
            return Response::Error { message: why };
        }
        let pid = peer.pid;
        let result = match request {
            Request::Place {
                agent,
                task,
                user,
                unscoped,
                privileges,
            } => {
                let placed = self.place(&agent, &task, pid, user, unscoped);
                if placed.is_ok() {
                    self.note_privileges(&agent, &task, pid, privileges);
                }
                placed.map(|(cgroup, warnings)| Response::Placed {
                    unix: crate::sandbox::unix_section(self.generations.live().get(&agent)),
                    mode: self
                        .generations
                        .live()
                        .get(&agent)
                        .map(|p| p.mode().as_str().to_string()),
                    read_only: self.daemon_files.clone(),
                    agent,
                    task,
                    cgroup,
                    warnings,
                    ca_bundle: self
                        .interceptor
                        .as_ref()
                        .map(|i| i.bundle_path().display().to_string()),
                })
            }
            Request::Caught(caught) => self.on_caught(pid, caught).map(|()| Response::Recorded {}),
            Request::Status {} => Ok(Response::Status(self.status())),
            Request::Reload {} => Ok(match self.reload("control socket") {
                Ok(message) => Response::Reloaded {
                    agents: self
                        .generations
                        .live()
                        .iter()
                        .map(|p| p.agent().to_string())
                        .collect(),
                    message,
                },
                Err(message) => Response::Error { message },
            }),
            Request::Events { agent, .. } => Ok(Response::Events {
                history: self
                    .reporter
                    .history()
                    .filter(|e| agent.as_ref().is_none_or(|want| *want == e.0))
                    .filter_map(|e| serde_json::from_str(&e.1).ok())
                    .collect(),
            }),
            Request::TaskStart {
                agent,
                task,
                allow_connect,
                allow_exec,
                ttl_ms,
                pid: target,
            } => self.task_start(&agent, &task, &allow_connect, &allow_exec, ttl_ms, target),
            Request::TaskEnd { agent, task } => self.task_end(&agent, &task),
            Request::TaskNarrow {
                agent,
                task,
                keep_connect,
                keep_exec,
                ttl_ms,
            } => self.task_narrow(&agent, &task, &keep_connect, &keep_exec, ttl_ms),
            Request::Pending { .. } => Ok(Response::Pending {
                requests: self.pending(),
            }),
            Request::Decide { id, decision } => self
                .decide(id, &decision, &ask::operator(peer.uid))
                .map(Response::Decided)
                .map_err(anyhow::Error::from),
            Request::AskChannel { agent, task } => self
                .open_ask_channel(pid, &agent, &task)
                .map(|()| Response::AskChannelOpen {}),
            // Each report on the channel is checked when it comes (`on_caught`).
            Request::CaughtChannel {} => Ok(Response::Recorded {}),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(pid, "control request refused: {e:#}");
            Response::Error {
                message: format!("{e:#}"),
            }
        })
    }

    /// A refused control request goes to journald (ACTION=control, VERDICT=denied) under the
    /// caller's own agent when it is one, else under the agent it asked about.
    pub(super) fn report_refusal(
        &mut self,
        request: &Request,
        peer: &Peer,
        inside: Option<(String, String)>,
        why: &str,
    ) {
        let (agent, task) = inside.clone().unwrap_or_else(|| {
            request
                .target()
                .map(|(a, t)| (a.to_string(), t.to_string()))
                .unwrap_or_else(|| ("?".into(), "?".into()))
        });
        let target = request
            .target()
            .map(|(a, t)| format!(" for agent {a} task {t}"))
            .unwrap_or_default();
        let comm = identity::procfs::comm(peer.pid).unwrap_or_default();
        let exe = identity::procfs::exe(peer.pid).map(|p| p.display().to_string());
        tracing::warn!(
            pid = peer.pid,
            uid = peer.uid,
            "control request {} refused: {why}",
            request.op()
        );
        let action = Action {
            time: SystemTime::now(),
            spiffe_id: self.spiffe_id(&agent),
            chain: self.ident.chain(peer.pid, &comm),
            agent,
            task,
            verdict: Verdict::Denied,
            pid: peer.pid,
            uid: peer.uid,
            comm,
            exe,
            object: Object::Control,
            enforcement: Some("refused"),
            reason: format!("{}{target} refused: {why}", request.op()),
        };
        self.reporter.action(action);
    }

    /// A call `run`'s seccomp filter caught, reported by that `run`. Only the `run` process this
    /// daemon placed may report, for its own task and its own processes; identity comes from the
    /// placement, never from the report, and the record is only ever denied or alert.
    pub(super) fn on_caught(
        &mut self,
        peer_pid: u32,
        c: control::CaughtReport,
    ) -> anyhow::Result<()> {
        let Some(placement) = self.ident.placement(peer_pid) else {
            bail!("pid {peer_pid} is not an `agent-monitor run` this daemon placed");
        };
        let cgroup_id = placement.task_cgroup;
        let Some(entry) = self.ident.task(cgroup_id) else {
            bail!("the task pid {peer_pid} was placed in is gone");
        };
        let (agent, task) = (entry.agent.clone(), entry.task.clone());
        let chain = self.ident.chain(c.pid, &c.comm);
        // A process the table knows must descend from that `run`.
        if chain.len() > 1 && chain[0].pid != peer_pid {
            bail!(
                "pid {} is not a process of the task `run` {peer_pid} started",
                c.pid
            );
        }
        let process_target = |syscall: &String, target: &control::CaughtTarget, signal| {
            let (agent, task) = self.target_agent(target).unzip();
            crate::action::ProcessTarget {
                syscall: syscall.clone(),
                signal,
                pid: target.pid,
                comm: target.comm.clone(),
                agent,
                task,
            }
        };
        let (object, reason) = match &c.call {
            control::CaughtCall::Socket {
                family,
                sock_type,
                protocol,
            } => (
                Object::Socket(event::socket_description(
                    *family as u16,
                    *sock_type,
                    *protocol,
                )),
                "a socket family the cgroup hooks cannot judge (vsock, packet…): agents keep \
                 unix, inet, inet6 and netlink (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::Socketcall { op } => (
                Object::Socket(format!("socketcall op {op} (i386)")),
                "i386 socketcall keeps its arguments in user memory, out of the filter's \
                 reach (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::IoUringSetup => (
                Object::IoUring("io_uring_setup".to_string()),
                "io_uring creates sockets without the socket system call (seccomp filter of \
                 `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::Bpf => (
                Object::Seccomp("bpf".to_string()),
                "bpf(2) from a root agent: pinned maps open by file permission alone, and uid 0 \
                 owns them (seccomp filter of `agent-monitor run`)"
                    .to_string(),
            ),
            control::CaughtCall::SeccompListener => (
                Object::Seccomp("seccomp listener".to_string()),
                "a seccomp notification listener would let the agent answer the calls the \
                 `run` filter catches: always refused"
                    .to_string(),
            ),
            control::CaughtCall::ProcessAccess { syscall, target } => (
                Object::Ptrace(process_target(syscall, target, None)),
                self.reach_reason(target, "reach into"),
            ),
            control::CaughtCall::Signal {
                syscall,
                target,
                signal,
            } => (
                Object::Signal(process_target(syscall, target, Some(*signal))),
                self.reach_reason(target, "signal"),
            ),
            control::CaughtCall::UnixConnect {
                path,
                resolved,
                sock_type,
                reason,
                send,
                ..
            } => (
                Object::Unix(crate::action::UnixTarget {
                    path: path.clone(),
                    send: *send,
                    sock_type: crate::sandbox::unix_sock_type(sock_type),
                }),
                match resolved.as_ref().filter(|r| *r != path) {
                    Some(r) => format!(
                        "{path} leads to {r}: {reason} (judged on the resolved socket by \
                         the seccomp supervisor of `agent-monitor run`)"
                    ),
                    None => format!(
                        "{reason} (judged on the resolved socket by the seccomp supervisor \
                         of `agent-monitor run`)"
                    ),
                },
            ),
            control::CaughtCall::Other { name } => (
                Object::Seccomp(name.clone()),
                if name.starts_with("ioctl ") {
                    "typing into the terminal the agent shares with whoever started it (read as \
                     that shell's next command): always refused (seccomp filter of \
                     `agent-monitor run`)"
                        .to_string()
                } else {
                    "caught by the seccomp filter of `agent-monitor run`".to_string()
                },
            ),
        };
        // A unix connect the supervisor judged on its resolved socket and allowed is reported
        // like the kernel hook's allowed connects (the JSON trail).
        let judged_allowed = matches!(
            c.call,
            control::CaughtCall::UnixConnect { allowed: true, .. }
        );
        let verdict = if judged_allowed {
            Verdict::Allowed
        } else if c.refused {
            Verdict::Denied
        } else {
            Verdict::Alert
        };
        if matches!(object, Object::Socket(_)) {
            self.reporter.counters.sockets_refused += 1;
        }
        if !judged_allowed {
            self.reporter.counters.seccomp_caught += 1;
        }
        let subject = event::Subject {
            cgroup_id,
            pid: c.pid,
            tid: c.pid,
            uid: c.uid,
            comm: c.comm.clone(),
            ..event::Subject::unknown()
        };
        let action = Action {
            exe: c.exe.or_else(|| self.ident.exe(c.pid).map(str::to_string)),
            enforcement: (c.refused && !judged_allowed).then_some("eperm"),
            reason,
            chain,
            ..self.action(&subject, agent, task, object, verdict)
        };
        self.reporter.action(action);
        Ok(())
    }

    /// The agent and task a process that an agent tried to reach belongs to, from what `run`
    /// read while the call waited (its cgroup and uid); the pid only for a selector's thread tag.
    pub(super) fn target_agent(&self, t: &control::CaughtTarget) -> Option<(String, String)> {
        if t.supervisor {
            return None;
        }
        if let Some((agent, task)) = t
            .cgroup
            .as_deref()
            .and_then(identity::peer::run_cgroup_identity)
        {
            return Some((agent.to_string(), task.to_string()));
        }
        let slot = self
            .ident
            .by_selector(&self.kernel, t.pid, t.cgroup.as_deref(), || t.uid)?;
        Some(self.names(&slot))
    }

    /// Why a ptrace-family call or a signal to `t` was refused, in words.
    pub(super) fn reach_reason(&self, t: &control::CaughtTarget, verb: &str) -> String {
        let whose = if t.supervisor {
            "the agent's own `agent-monitor run` (its seccomp supervisor)".to_string()
        } else {
            match self.target_agent(t) {
                Some((agent, task)) => format!("a process of agent {agent} task {task}"),
                None => "a process outside every agent".to_string(),
            }
        };
        format!(
            "an agent may {verb} only processes of its own task; pid {} ({}) is {whose} \
             (seccomp filter and Landlock scope of `agent-monitor run`)",
            t.pid, t.comm
        )
    }

    /// Keeps what placed process `pid` said its command holds, for `status`; a command that
    /// kept every capability of root is worth a warning (it can undo its own confinement).
    pub(super) fn note_privileges(
        &mut self,
        agent: &str,
        task: &str,
        pid: u32,
        privileges: Option<control::Privileges>,
    ) {
        if let Some(p) = privileges.as_ref().filter(|p| p.kept_all) {
            let msg = format!(
                "agent {agent} task {task}: `run` {pid} started its command with every capability \
                 of root (--keep-capabilities, uid {}): it can leave or undo its own confinement \
                 and other agents'",
                p.uid
            );
            self.reporter.notice(
                Notice::new(message_id::CAPABILITIES_KEPT, Level::Warning, msg)
                    .field("AGENT_ID", agent)
                    .field("TASK_ID", task)
                    .field("RUN_PID", pid)
                    .field("AGENT_UID", p.uid),
            );
        }
        self.ident.note_privileges(pid, privileges);
    }
}

/// The own allowlist of the agent an ask channel serves, as the monitor publishes it.
struct AgentAllowlist {
    agent: String,
    lists: tokio::sync::watch::Receiver<Arc<ask::AskAllowlists>>,
}

impl AgentAllowlist {
    /// Its ask-channel line (an empty list when the agent is not, or no longer, in ask mode).
    fn line(&mut self) -> String {
        let list = self
            .lists
            .borrow_and_update()
            .get(&self.agent)
            .cloned()
            .unwrap_or_default();
        let mut line = serde_json::to_string(&control::AskAllowlistLine { allowlist: list })
            .unwrap_or_default();
        line.push('\n');
        line
    }
}
