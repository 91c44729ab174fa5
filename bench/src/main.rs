//! agent-monitor-bench: the load generators and the benchmark run behind `cargo xtask bench`.

mod ask;
mod chart;
mod egress;
mod files;
mod intercept_bench;
mod load;
mod machine;
mod policy_size;
mod report;
mod run;
mod setups;
mod unix_bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agent-monitor-bench",
    about = "Benchmarks of agent-monitor against auditd and bpftrace"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One load generator; prints one JSON object.
    #[command(subcommand)]
    Load(load::Load),
    /// The whole run (root): measure, then write the report and the chart. `cargo xtask bench`
    /// builds everything and calls this.
    Run {
        /// Workspace root (holds target/release/agent-monitor and docs/).
        #[arg(long)]
        root: PathBuf,
        /// Fewer repetitions and shorter runs, for development.
        #[arg(long)]
        quick: bool,
        /// Criterion's output directory to read the in-process benches from.
        #[arg(long)]
        criterion: Option<PathBuf>,
        /// Measure only these phases (overhead, capacity, startup, policy_size, memory, dns, files,
        /// ask, unix, egress, intercept); the
        /// report is then partial. For development.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The command line that reproduces this run, for the report.
        #[arg(long, default_value = "sudo cargo xtask bench")]
        command: String,
    },
    /// Rewrite docs/benchmarks.md and the chart from docs/benchmarks.json, without measuring.
    Report {
        /// Workspace root (holds docs/).
        #[arg(long)]
        root: PathBuf,
        /// The command line that reproduces the run, for the report.
        #[arg(long, default_value = "cargo xtask bench")]
        command: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Load(l) => load::run(l),
        Cmd::Run {
            root,
            quick,
            criterion,
            only,
            command,
        } => run_and_report(&root, quick, criterion.as_deref(), &only, &command),
        Cmd::Report { root, command } => rewrite_report(&root, &command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent-monitor-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_and_report(
    root: &std::path::Path,
    quick: bool,
    criterion: Option<&std::path::Path>,
    only: &[String],
    command: &str,
) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("agent-monitor-bench.{}", std::process::id()));
    let results = run::run(root, quick, criterion, only, &work);
    let _ = std::fs::remove_dir_all(&work);
    let results = results?;
    let docs = root.join("docs");
    std::fs::create_dir_all(&docs)?;
    std::fs::write(
        docs.join("benchmarks.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    write_report(&results, &docs, command)
}

fn rewrite_report(root: &std::path::Path, command: &str) -> anyhow::Result<()> {
    let docs = root.join("docs");
    let path = docs.join("benchmarks.json");
    let text =
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let results: run::Results =
        serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    write_report(&results, &docs, command)
}

fn write_report(
    results: &run::Results,
    docs: &std::path::Path,
    command: &str,
) -> anyhow::Result<()> {
    chart::overhead_svg(results, &docs.join("benchmarks.svg"))?;
    std::fs::write(
        docs.join("benchmarks.md"),
        report::markdown(&results, command),
    )?;
    eprintln!(
        "bench: wrote {0}/benchmarks.md and {0}/benchmarks.svg from the results in {0}/benchmarks.json",
        docs.display()
    );
    Ok(())
}
