//! Start-up and uninstall: the checks before anything is loaded, and the wiring of kernel, policy, proxies, control socket and sinks into a running monitor.

use super::*;

pub(super) async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the daemon needs root (it loads eBPF programs and manages cgroups)");
    }
    if args.uninstall {
        return uninstall(&args.pin_dir, &args.state_file);
    }
    tracing::info!("loading the policies in {}", args.policies.display());
    let policies = crate::policy_dir::load_dir(&args.policies)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "refusing to start: invalid policies in {}",
                args.policies.display()
            )
        })?;
    if policies.is_empty() {
        tracing::warn!(
            "no policy files (*.toml) in {}: `agent-monitor run` will refuse every agent",
            args.policies.display()
        );
    }
    // Checked here so that a bad set stops the start before anything is loaded or pinned.
    let compiled = policies
        .compile()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("refusing to start: the policies do not fit the kernel tables")?;
    tracing::info!(
        "{} agent(s) in {} ms: {} network and {} exec allowlist entries (at most {} and {} fit)",
        policies.len(),
        t0.elapsed().as_millis(),
        compiled.net.len(),
        compiled.exec.len(),
        crate::policy::NET_ENTRIES_PER_SET,
        crate::policy::EXEC_ENTRIES_PER_SET,
    );

    for w in crate::exec_lint::warnings(&policies) {
        tracing::warn!("{w}");
    }
    for w in crate::unix_lint::warnings(&policies) {
        tracing::warn!("{w}");
    }
    for w in crate::confine::selector_warnings(&policies) {
        tracing::warn!("{w}");
    }
    for did in crate::host::ensure_kernel_filesystems()? {
        tracing::info!("{did}");
    }
    let cgroup_root = crate::host::cgroup2_root()?;
    refuse_host_capture(&policies, &cgroup_root).context("refusing to start")?;
    let layout = crate::host::tracepoint_layout()?;
    let cgroups = AgentCgroups::new(&cgroup_root)?;
    let admin_gid = match &args.admin_group {
        None => None,
        Some(g) => Some(admin_group_gid(g)?),
    };
    let trust_domain = match &args.trust_domain {
        Some(d) => check_trust_domain(d)?,
        None => check_trust_domain(&host_name())
            .context("the host name is not a valid trust domain; set --trust-domain")?,
    };
    refuse_if_already_running(&args.socket.control_socket).await?;

    let offsets = crate::host::kernel_offsets()?;
    let hook_cgroups = crate::bpf::HookCgroups {
        root: cgroup_root.clone(),
        agents: cgroups.base().to_path_buf(),
    };
    let mut kernel = Kernel::open(&args.pin_dir, &hook_cgroups, &layout, &offsets)?;
    super::unix_peer::install_unix_peer_layout(&mut kernel);
    // The proxies' kernel entries are written by `apply_policies`, keyed by the live bank.
    let (dns_reports, dns_proxies) = start_dns_proxies(&args, &policies)?;
    let stream = kernel.take_actions()?;
    let outputs = Outputs::open(&OutputConfig {
        journal_allowed: args.journal_allowed,
        json_path: args.json_log.clone(),
        json_rotation: args.trail.rotation(),
        otlp: args.otlp.config(),
        storm_window: Duration::from_secs(args.storm_window),
    })
    .context("opening the output sinks")?;
    let metrics_listener = match args.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let (events_tx, _) = broadcast::channel(4096);
    let mut monitor = Monitor {
        kernel,
        ident: IdentityDirectory::new(cgroups),
        grants: GrantBook::new(GrantStateFile::new(&args.state_file, &args.pin_dir)),
        cgroup_root: cgroup_root.clone(),
        admin_gid,
        trust_domain,
        generations: Generations::new(&args.policies),
        exec_files: ExecFiles::default(),
        socket_watch_sticky: None,
        daemon_files: Vec::new(),
        reporter: Reporter::new(outputs, Notices::journald(), events_tx.clone()),
        dns: DnsLearner::new(dns_proxies, args.dns_grace.saturating_mul(1_000_000_000)),
        files: file_guard::FileGuardState::start(&args.pin_dir).await,
        interceptor: super::interception::start(&args.intercept),
        ask: ask::AskState::new(
            args.ask.ask_timeout,
            args.ask.approver_url.clone(),
            args.ask.approver_timeout,
        ),
        egress: Default::default(),
        request_warnings: Default::default(),
    };
    // The file guard holds ask-mode agents' opens for this daemon's desk (and its timeout).
    monitor.files.set_asking(args.ask.ask_timeout);
    // Before the policies: a connect with request rules must find the endpoint.
    let (egress_tx, egress_rx) = mpsc::channel(1024);
    let endpoint =
        crate::egress::Endpoint::start(egress_tx, monitor.interceptor.clone(), args.egress_relay)
            .await
            .context("starting the egress endpoint")?;
    monitor.kernel.set_egress_endpoint(endpoint.port)?;
    monitor
        .kernel
        .set_server_names_in_kernel(args.server_names == crate::egress::ServerNameCheck::Kernel)?;
    tracing::info!("egress endpoint on 127.0.0.1:{}", endpoint.port);
    // What the previous daemon governed stays governed: its tasks come back from the pinned
    // identity map (names from the cgroup tree) and its grants from the state file (as far as the
    // kernel still holds them), then the policy on disk applies to them.
    monitor.recover_tasks()?;
    monitor.recover_grants()?;
    monitor
        .apply_policies(policies)
        .context("refusing to start: applying the policies to the kernel")?;
    let adopted = matches!(monitor.kernel.origin, crate::bpf::Origin::Adopted { .. });
    monitor.generations.started(adopted, monotonic_ns());
    let retired = monitor.kernel.retire_previous_build();
    monitor.reporter.loss_baseline(&monitor.kernel);
    monitor.report_origin(retired);
    // Bound last: a client that reaches the socket finds enforcement active.
    let listener = bind_control_socket(&args.socket.control_socket, admin_gid)?;
    // Any failure before this removed what this start pinned; from now on the pins outlive us.
    monitor.kernel.keep_pins();
    // Now that the socket exists (the grant state file may not yet: see `daemon_files`).
    monitor.daemon_files = crate::privileges::daemon_files(
        &args.policies,
        &args.socket.control_socket,
        &args.state_file,
        args.json_log.as_deref(),
        crate::identity::procfs::exe(std::process::id()).as_deref(),
        |p| p.exists(),
    )
    .iter()
    .map(|p| p.display().to_string())
    .collect();

    let m = &monitor.kernel.mechanisms;
    tracing::info!(
        agents = monitor.generations.live().len(),
        cgroup_root = %cgroup_root.display(),
        pin_dir = %args.pin_dir.display(),
        "enforcement active in {} ms; exec: {}; connect: {}",
        t0.elapsed().as_millis(),
        m.exec_enforcement,
        m.connect_enforcement
    );
    for a in &m.attached {
        tracing::info!("attached {a}");
    }
    for r in &m.refused {
        tracing::warn!("not available: {r}");
    }
    monitor.warn_unenforced_unix();
    let names: Vec<String> = monitor
        .generations
        .live()
        .iter()
        .map(|p| format!("{} ({})", p.agent(), p.mode().as_str()))
        .collect();
    tracing::info!(
        "policies from {}: {}",
        args.policies.display(),
        names.join(", ")
    );
    let active = format!(
        "agent-monitor enforcing for {} agent(s); programs pinned in {}",
        monitor.generations.live().len(),
        args.pin_dir.display()
    );
    monitor.reporter.notice(
        Notice::new(message_id::ENFORCEMENT_ACTIVE, Level::Notice, active)
            .field("PIN_DIR", args.pin_dir.display())
            .field("POLICY_DIR", args.policies.display())
            .unlogged(),
    );

    let (requests_tx, requests_rx) = mpsc::channel(64);
    let (scrapes_tx, scrapes_rx) = mpsc::channel(8);
    let socket_path = args.socket.control_socket.clone();
    let ask_links = AskLinks {
        asks: monitor.ask.to_monitor.clone(),
        pending: monitor.ask.followers.clone(),
        allowlists: monitor.ask.allowlists.subscribe(),
    };
    tokio::spawn(serve_control(listener, requests_tx, events_tx, ask_links));
    if let Some(l) = metrics_listener {
        tracing::info!(
            "metrics on http://{}/metrics",
            args.metrics.map_or(String::new(), |a| a.to_string())
        );
        tokio::spawn(metrics::serve(l, scrapes_tx));
    }
    // Handlers are in place before READY, so a reload right after it cannot kill the daemon.
    let signals = Signals::new()?;
    // systemd (Type=notify): ready only now that enforcement is active and the socket serves.
    notify(&[libsystemd::daemon::NotifyState::Ready]);

    let result = monitor
        .run(
            stream,
            requests_rx,
            scrapes_rx,
            signals,
            dns_reports,
            egress_rx,
        )
        .await;
    notify(&[libsystemd::daemon::NotifyState::Stopping]);
    monitor.reporter.flush();
    if let Err(e) = monitor.kernel.heartbeat() {
        tracing::warn!("leaving the last heartbeat: {e:#}");
    }
    let _ = std::fs::remove_file(&socket_path);
    let msg = format!(
        "stopped; enforcement continues from the programs pinned in {} (`agent-monitor daemon \
         --uninstall --pin-dir {0}` ends it)",
        args.pin_dir.display()
    );
    monitor.reporter.notice(
        Notice::new(message_id::STOPPING, Level::Notice, msg)
            .field("PIN_DIR", args.pin_dir.display()),
    );
    result
}

/// `daemon --uninstall`: removes the pins, so the programs detach and enforcement stops, and the
/// grant state file of that pin directory (its grants went with the maps).
pub(super) fn uninstall(pin_dir: &Path, state_file: &Path) -> anyhow::Result<()> {
    // Output into a closed pipe ends the command by SIGPIPE instead of std's panic (exit 101).
    use crate::stdout::outln as println;
    let removed = crate::bpf::uninstall(pin_dir)?;
    match crate::files::stop_guard(pin_dir) {
        Ok(Some(pid)) => println!("stopped the file guard (pid {pid}): [files] denials have ended"),
        Ok(None) => {}
        Err(e) => eprintln!("agent-monitor daemon --uninstall: the file guard: {e:#}"),
    }
    match grant_state::remove_if_of(state_file, pin_dir) {
        Ok(true) => println!("removed the grant state file {}", state_file.display()),
        Ok(false) => {}
        Err(e) => eprintln!(
            "agent-monitor daemon --uninstall: could not remove the grant state file {}: {e}",
            state_file.display()
        ),
    }
    // Empty agent and task cgroups go too; one with processes stays (and is named).
    match crate::host::cgroup2_root() {
        Ok(root) => {
            let base = root.join("agent-monitor");
            let cleanup = crate::identity::AgentCgroups::remove_empty_below(&base);
            if !cleanup.removed.is_empty() {
                println!(
                    "removed {} empty agent cgroup(s) below {}",
                    cleanup.removed.len(),
                    base.display()
                );
            }
            for left in &cleanup.left {
                println!("left cgroup {left}");
            }
        }
        Err(e) => eprintln!("agent-monitor daemon --uninstall: agent cgroups not removed: {e:#}"),
    }
    if removed.is_empty() {
        println!("nothing pinned in {}", pin_dir.display());
    } else {
        println!(
            "removed from {}: {}; agent-monitor enforcement has stopped",
            pin_dir.display(),
            removed.join(", ")
        );
        // No monitor (and no reporter) runs here: the same notice path, without the log line
        // (the command printed what it did).
        Notices::journald().send(
            &Notice::new(
                message_id::STOPPING,
                Level::Notice,
                format!(
                    "agent-monitor uninstalled from {}: enforcement stopped",
                    pin_dir.display()
                ),
            )
            .field("PIN_DIR", pin_dir.display())
            .unlogged(),
        );
    }
    Ok(())
}

/// Starts one DNS proxy endpoint per agent and points the kernel's redirection at it. Returns the
/// channel on which the endpoints report queries to the monitor.
pub(super) fn start_dns_proxies(
    args: &DaemonArgs,
    policies: &PolicySet,
) -> anyhow::Result<(mpsc::Receiver<QueryReport>, Proxies)> {
    let upstream = match args.dns_upstream {
        Some(a) => Some(a),
        None => match crate::dns::upstream_from_resolv_conf(Path::new("/etc/resolv.conf")) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("{e:#}: agents' allowed DNS queries will get SERVFAIL");
                None
            }
        },
    };
    let config = Arc::new(ProxyConfig {
        upstream,
        timeout: Duration::from_millis(args.dns_timeout_ms),
    });
    let (tx, rx) = mpsc::channel(1024);
    let mut proxies = Proxies::new(config, tx);
    for policy in policies.iter() {
        proxies.ensure(policy)?;
    }
    tracing::info!(
        upstream = %upstream.map_or("none".to_string(), |a| a.to_string()),
        grace_s = args.dns_grace,
        "DNS proxy: agents' port-53 traffic is redirected to a per-agent endpoint on loopback"
    );
    Ok((rx, proxies))
}

/// Two daemons would attach every program twice; the control socket tells whether one runs.
pub(super) async fn refuse_if_already_running(path: &Path) -> anyhow::Result<()> {
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "another agent-monitor daemon is already serving {}",
            path.display()
        );
    }
    Ok(())
}

/// The admin group's gid.
pub(super) fn admin_group_gid(name: &str) -> anyhow::Result<u32> {
    let group = match name.parse::<u32>() {
        Ok(gid) => nix::unistd::Group::from_gid(gid.into()),
        Err(_) => nix::unistd::Group::from_name(name),
    }
    .with_context(|| format!("--admin-group {name:?}: looking it up"))?
    .with_context(|| format!("--admin-group {name:?}: no such group"))?;
    Ok(group.gid.as_raw())
}

pub(super) fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "localhost".into())
}

/// A SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_`.
pub(super) fn check_trust_domain(d: &str) -> anyhow::Result<String> {
    let ok = !d.is_empty()
        && d.len() <= 255
        && d.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if !ok {
        bail!(
            "trust domain {d:?}: expected lower-case letters, digits, '.', '-', '_' (as in spiffe://DOMAIN/agent/NAME)"
        );
    }
    Ok(d.to_string())
}

/// Selectors that would capture PID 1 or the daemon on this host refuse the whole set (see
/// `identity::host_capture`), before anything is written: at start before the programs load, at
/// reload before the new bank.
pub(super) fn refuse_host_capture(set: &PolicySet, cgroup_root: &Path) -> anyhow::Result<()> {
    let found = identity::host_capture::issues(
        set,
        &identity::host_capture::Protected::host("the daemon"),
        &identity::host_capture::LiveHost { cgroup_root },
    );
    if !found.is_empty() {
        bail!(
            "selectors that would capture the host:\n{}",
            found.join("\n")
        );
    }
    Ok(())
}

/// Why the `sys_enter_socket` watch is needed from the start, if it is: agents identified by
/// selectors ([identity]) run without `run`'s seccomp filter, and in alert mode that filter lets
/// other socket families pass for this watch to report.
pub(super) fn socket_watch_at_start(policies: &PolicySet) -> Option<String> {
    let names = |pick: &dyn Fn(&crate::policy::Policy) -> bool| -> Vec<&str> {
        policies
            .iter()
            .filter(|p| pick(p))
            .map(|p| p.agent())
            .collect()
    };
    let selected = names(&|p| !p.selectors().is_empty());
    let alert = names(&|p| p.mode() == crate::policy::model::Mode::Alert);
    let mut why = Vec::new();
    if !selected.is_empty() {
        why.push(format!(
            "agents identified by [identity] selectors have no seccomp filter: {}",
            selected.join(", ")
        ));
    }
    if !alert.is_empty() {
        why.push(format!(
            "`run`'s filter lets other socket families pass in alert mode: {}",
            alert.join(", ")
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Why process `pid`, about to be placed, needs the `sys_enter_socket` watch: it was placed by a
/// control client other than this program's own `run` (which gives the command its seccomp
/// filter). Told apart by the executable file: the same file as the daemon's is `run`; anything
/// else, or a file we cannot read, counts as unfiltered (the safe side).
pub(super) fn unfiltered_placement(pid: u32) -> Option<String> {
    use crate::identity::procfs;
    use std::os::unix::fs::MetadataExt as _;
    let file = |pid: u32| {
        std::fs::metadata(procfs::exe_link(pid))
            .map(|m| (m.dev(), m.ino()))
            .ok()
    };
    let ours = file(std::process::id());
    let theirs = file(pid);
    if ours.is_some() && ours == theirs {
        return None;
    }
    let exe = procfs::exe_name(pid);
    Some(format!(
        "process {pid} ({exe}) was placed by a control client other than `agent-monitor run`, \
         so it has no seccomp filter"
    ))
}
