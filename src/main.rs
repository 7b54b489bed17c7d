//! The `drl` command line: parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use drl::cli;

#[derive(Parser)]
#[command(name = "drl", version, about = "A distributed rate limiter")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Check requests against a rules file with an in-process limiter.
    Check(cli::CheckArgs),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Parse and validate a rules file; print its limits or the exact error.
    Validate {
        /// The rules file (TOML).
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Rules {
            command: RulesCommand::Validate { file },
        } => cli::validate_rules(&file),
        Command::Check(check) => cli::check(&check),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
