//! agent-monitor: parse the command line, run it, exit with its code.

mod action;
mod ask_cmd;
mod audit_cmd;
mod bpf;
mod btf;
mod cli;
mod client;
mod confine;
mod console;
mod control;
mod daemon;
mod delegation_lint;
mod dns;
#[cfg(test)]
mod docs_check;
mod egress;
mod event;
mod exec_files;
mod exec_lint;
mod files;
mod generate;
mod host;
mod identity;
mod intercept;
mod learn;
mod output;
mod policy;
mod policy_cmd;
mod policy_dir;
mod privileges;
mod sandbox;
mod stdout;
mod unix_lint;
mod unix_peer;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Daemon(args) => daemon::main(args),
        cli::Command::Run(args) => client::run(args),
        cli::Command::Policy(cmd) => client::policy(cmd),
        cli::Command::Status(args) => client::status(args),
        cli::Command::Reload(args) => client::reload(args),
        cli::Command::Events(args) => client::events(args),
        cli::Command::Task(cmd) => client::task(cmd),
        cli::Command::Audit(cmd) => audit_cmd::main(cmd),
        cli::Command::Generate(cmd) => generate::main(cmd),
        cli::Command::Ca(cmd) => intercept::command::main(cmd),
        cli::Command::Pending(args) => ask_cmd::pending(args),
        cli::Command::Approve(args) => ask_cmd::approve(args),
        cli::Command::Deny(args) => ask_cmd::deny(args),
        cli::Command::Top(args) => console::main(args),
        cli::Command::FileGuard(args) => files::guard_main(args),
    }
}
