//! The client commands: `run` (in `client/run.rs`), `status`, `reload`, `events`,
//! `task start/end/narrow`, `policy check` (`policy suggest`/`test` are in `policy_cmd`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{EventsArgs, PolicyCommand, SocketOnlyArgs, StatusArgs, TaskCommand};
use crate::control::{self, Request, Response};
// Every answer goes to stdout through these: a closed pipe ends the command by SIGPIPE instead of
// the panic (exit 101) of std's `println!`.
use crate::stdout::outln as println;

mod run;

pub use run::run;

pub fn task(cmd: TaskCommand) -> ExitCode {
    let (socket, req) = match cmd {
        TaskCommand::Start(a) => (
            a.socket.control_socket,
            Request::TaskStart {
                agent: a.agent,
                task: a.task,
                allow_connect: a.allow_connect,
                allow_exec: a.allow_exec,
                ttl_ms: a
                    .ttl
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
                pid: a.pid,
            },
        ),
        TaskCommand::End(a) => (
            a.socket.control_socket,
            Request::TaskEnd {
                agent: a.agent,
                task: a.task,
            },
        ),
        TaskCommand::Narrow(a) => (
            a.socket.control_socket,
            Request::TaskNarrow {
                agent: a.agent,
                task: a.task,
                keep_connect: a.keep_connect,
                keep_exec: a.keep_exec,
                ttl_ms: a
                    .ttl
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
            },
        ),
    };
    let until = |ms: Option<u64>| match ms {
        Some(ms) => format!(
            "for {}",
            humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000)))
        ),
        None => "until `task end`".to_string(),
    };
    match control::call(&socket, &req) {
        Ok(Response::TaskStarted {
            agent,
            task,
            grants,
            expires_in_ms,
            moved,
        }) => {
            println!(
                "task {task} of agent {agent} started; grants [{}] {}",
                grants.join(", "),
                until(expires_in_ms)
            );
            if let Some(pid) = moved {
                println!("process {pid} moved into task {task}");
            }
            ExitCode::SUCCESS
        }
        Ok(Response::TaskNarrowed {
            agent,
            task,
            grants,
            expires_in_ms,
        }) => {
            println!(
                "task {task} of agent {agent} narrowed; grants [{}] {}",
                grants.join(", "),
                until(expires_in_ms)
            );
            ExitCode::SUCCESS
        }
        Ok(Response::TaskEnded {
            agent,
            task,
            revoked,
        }) => {
            println!("task {task} of agent {agent} ended; {revoked} grant(s) revoked");
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor task: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor task: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn status(args: StatusArgs) -> ExitCode {
    let status = match control::call(&args.socket.control_socket, &Request::Status {}) {
        Ok(Response::Status(s)) => s,
        Ok(other) => {
            eprintln!("agent-monitor status: unexpected answer: {other:?}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("agent-monitor status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agent-monitor status: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!("policies: {}", status.policies);
    crate::ask_cmd::print_status(&status.pending);
    if !status.journal_query.is_empty() {
        // Entries are matched by fields journald sets itself; anyone can forge the others.
        println!(
            "journald: {} (only entries this daemon wrote; add e.g. AGENT_ID=NAME VERDICT=denied)",
            status.journal_query
        );
    }
    match status.origin.get("kind").and_then(|k| k.as_str()) {
        Some("adopted") => println!(
            "kernel state: adopted from pins (previous daemon away {} s, {} records lost meanwhile{})",
            status.origin["away_seconds"]
                .as_f64()
                .map_or("?".into(), |s| format!("{s:.1}")),
            status.origin["lost_while_away"],
            if status.origin["replaced_build"] == true {
                "; programs of another build replaced without a gap"
            } else {
                ""
            }
        ),
        Some(k) => println!("kernel state: {k}"),
        None => {}
    }
    if let Some(pins) = status.mechanisms.get("pin_dir").and_then(|v| v.as_str()) {
        println!("pinned in: {pins} (`agent-monitor daemon --uninstall` ends enforcement)");
    }
    let m = &status.mechanisms;
    let text = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
    let list = |k: &str| -> Vec<String> {
        m.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    println!("exec enforcement: {}", text("exec_enforcement"));
    println!("connect enforcement: {}", text("connect_enforcement"));
    for a in list("attached") {
        println!("attached: {a}");
    }
    println!("socket() watch: {}", text("socket_syscall_watch"));
    println!("unix-socket hooks: {}", text("unix_socket_hooks"));
    for r in list("refused") {
        println!("not available: {r}");
    }
    println!(
        "counters: {} actions, {} denied, {} alerts, {} lost records, {} undecodable, {} verdict disagreements, {} tracked processes",
        status.counters.actions,
        status.counters.denied,
        status.counters.alerts,
        status.counters.lost_records,
        status.counters.undecodable_records,
        status.counters.verdict_disagreements,
        status.counters.tracked_processes
    );
    println!(
        "operation: {} actions lost ({} of them alert-mode actions refused as unrecordable), {} reloads, {} reload failures, {} denials folded into journald summaries",
        status.counters.actions_lost,
        status.counters.alerts_refused_unrecordable,
        status.counters.reloads,
        status.counters.reload_failures,
        status.counters.journald_aggregated
    );
    for o in status.occupancy.as_array().into_iter().flatten() {
        println!(
            "map {}: {} of {} entries",
            o["map"].as_str().unwrap_or("?"),
            o["used"],
            o["capacity"]
        );
    }
    println!(
        "identity: {} refusals by an expired grant (in the kernel), {} untaggable processes (map full), {} selector conflicts",
        status.counters.grants_expired_in_kernel,
        status.counters.tags_full,
        status.counters.selector_conflicts
    );
    println!(
        "network path: {} source-routed packets of agents' sockets (dropped in enforce mode), {} \
         connections refused on their server name not closed (their data stays dropped)",
        status.counters.source_routed_packets, status.counters.sni_close_failures
    );
    let c = &status.counters;
    println!(
        "dns: {} queries, {} refused, {} upstream failures, {} install failures, {} malformed, {} overloaded, {} without proxy, {} originals forgotten, {} learned addresses, {} non-public answer addresses withheld, {} addresses over agents' learned limits ({} answers)",
        c.dns_queries,
        c.dns_refused,
        c.dns_upstream_failures,
        c.dns_install_failures,
        c.dns_malformed,
        c.dns_overloaded,
        c.dns_no_proxy,
        c.dns_orig_missing,
        c.dns_learned,
        c.dns_withheld_non_public,
        c.dns_withheld_limit,
        c.dns_limit_reached
    );
    for s in &status.sinks {
        println!(
            "sink {}: {} written, {} failed",
            s.sink, s.written, s.failed
        );
    }
    for a in &status.agents {
        println!(
            "agent {} ({}): {} actions, {} allowed, {} denied, {} alerts",
            a.agent, a.mode, a.actions, a.allowed, a.denied, a.alerts
        );
        if a.dns_learned_limit > 0 || a.dns_withheld_non_public > 0 {
            println!(
                "  dns: {} of {} learned addresses; withheld: {} non-public, {} over the limit",
                a.dns_learned, a.dns_learned_limit, a.dns_withheld_non_public, a.dns_withheld_limit
            );
        }
        for sel in &a.selectors {
            println!("  selector {sel}");
        }
        for t in &a.tasks {
            let pids: Vec<String> = t.processes.iter().map(u32::to_string).collect();
            println!("  task {}: processes [{}]", t.task, pids.join(" "));
            for p in &t.placements {
                match &p.privileges {
                    Some(privileges) => println!(
                        "    run {}: {}",
                        p.pid,
                        crate::privileges::describe(privileges)
                    ),
                    None => println!(
                        "    placed {}: privileges not reported (not placed by `agent-monitor run`)",
                        p.pid
                    ),
                }
            }
            if !t.grants.is_empty() {
                let until = t
                    .grants_expire_in_ms
                    .map_or("until `task end`".to_string(), |ms| {
                        format!(
                            "for {} more",
                            humantime::format_duration(std::time::Duration::from_secs(
                                ms.div_ceil(1000)
                            ))
                        )
                    });
                println!("    grants [{}] {until}", t.grants.join(", "));
            }
            for u in &t.unscoped {
                println!("    NOT scoped to its own processes (no Landlock domain): {u}");
            }
        }
    }
    ExitCode::SUCCESS
}

pub fn reload(args: SocketOnlyArgs) -> ExitCode {
    match control::call(&args.socket.control_socket, &Request::Reload {}) {
        Ok(Response::Reloaded { message, .. }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor reload: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor reload: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn events(args: EventsArgs) -> ExitCode {
    use std::io::Write as _;
    let print = |v: &serde_json::Value| -> bool {
        let line = if args.json {
            v.to_string()
        } else if let Some(n) = v.get("lagged") {
            format!("!! {n} actions went by too fast to show here (see the JSON audit trail)")
        } else {
            format!(
                "{} {}",
                v["time"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("?")
            )
        };
        // A closed pipe (`events -f | head`) ends the stream quietly, by SIGPIPE.
        if let Err(e) = writeln!(std::io::stdout(), "{line}") {
            crate::stdout::failed(&e);
        }
        true
    };
    let req = Request::Events {
        follow: args.follow,
        agent: args.agent.clone(),
    };
    // Following, the daemon streams the recent history as lines before the new actions; a
    // one-shot call gets it in the response.
    let result =
        control::call_then(
            &args.socket.control_socket,
            &req,
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => print(&v),
                Err(e) => {
                    eprintln!(
                        "agent-monitor events: unreadable line from the daemon ({e}): {line}"
                    );
                    true
                }
            },
        );
    match result {
        Ok(Response::Events { history }) => {
            for v in &history {
                if !print(v) {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("agent-monitor events: unexpected answer: {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agent-monitor events: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn policy(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check { path } => match crate::policy_dir::load_path(&path) {
            Ok(set) => {
                // Host-dependent refusals, the same the daemon applies at start and reload.
                let capture = crate::identity::host_capture::issues(
                    &set,
                    &crate::identity::host_capture::Protected::host("this `policy check`"),
                    &crate::identity::host_capture::LiveHost {
                        cgroup_root: &crate::host::cgroup2_root()
                            .unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup")),
                    },
                );
                if !capture.is_empty() {
                    for c in capture {
                        eprintln!("{c}");
                    }
                    return ExitCode::FAILURE;
                }
                // Valid, but worth a second look: printed, not failed.
                for w in crate::exec_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::unix_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::delegation_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                // A uid selector takes every process of the uid: say which run now.
                for p in &set {
                    for u in &p.selectors().uids {
                        let found = crate::identity::uid_binding::outsiders(u.value, p.agent());
                        if let Some(w) = crate::identity::uid_binding::outsiders_warning(
                            u.value,
                            p.agent(),
                            "a `uids` selector, once loaded",
                            &found,
                        ) {
                            eprintln!("{}: warning: {w}", u.at);
                        }
                    }
                }
                for w in crate::confine::selector_warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::files::check_warnings(&set) {
                    eprintln!("{w}");
                }
                for w in crate::policy::request_lint::warnings(&set) {
                    eprintln!("{w}");
                }
                // What the daemon would refuse before loading anything: the kernel maps' limits.
                if let Err(e) = set.compile() {
                    eprintln!("{}: does not fit the kernel: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                let names: Vec<&str> = set.iter().map(|p| p.agent()).collect();
                println!(
                    "{}: ok, {} agent(s): {}",
                    path.display(),
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Suggest(args) => crate::policy_cmd::suggest_cmd(args),
        PolicyCommand::Test(args) => crate::policy_cmd::test_cmd(args),
    }
}
