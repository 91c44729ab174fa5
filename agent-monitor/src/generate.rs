//! `agent-monitor generate man|completions DIR` (hidden): documentation generated from the clap
//! definitions in cli.rs, for the Debian package (`cargo xtask package`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory as _;

use crate::cli::{Cli, GenerateCommand};

pub fn main(cmd: GenerateCommand) -> ExitCode {
    let result = match cmd {
        GenerateCommand::Man { dir } => man_pages(&dir),
        GenerateCommand::Completions { shell, dir } => completions(shell, &dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agent-monitor: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One page per command and subcommand; hidden commands (this one) get none.
fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

fn completions(shell: clap_complete::Shell, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    let path = clap_complete::generate_to(shell, &mut cmd, "agent-monitor", dir)
        .with_context(|| format!("writing the {shell} completion into {}", dir.display()))?;
    println!("{}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_subcommand_gets_a_man_page() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let mut expected = vec!["agent-monitor.1".to_string()];
        fn walk(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = format!("{prefix}-{}", sub.get_name());
                out.push(format!("{name}.1"));
                walk(sub, &name, out);
            }
        }
        walk(&Cli::command(), "agent-monitor", &mut expected);
        for page in &expected {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        assert!(expected.contains(&"agent-monitor-policy-suggest.1".to_string()));
        assert!(!dir.path().join("agent-monitor-generate.1").exists());
    }

    #[test]
    fn completions_know_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            completions(shell, dir.path()).unwrap();
        }
        let bash = std::fs::read_to_string(dir.path().join("agent-monitor.bash")).unwrap();
        assert!(
            bash.contains("suggest"),
            "bash completion lacks policy suggest"
        );
        assert!(dir.path().join("_agent-monitor").exists());
        assert!(dir.path().join("agent-monitor.fish").exists());
    }
}
