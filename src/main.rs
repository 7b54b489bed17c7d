//! The `drl` command line: parses arguments and hands over to the library
//! (`drl::cli::execute`; `drl node` ends in `drl::server::run`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = drl::cli::Cli::parse();
    if cli.command.prints_and_exits() {
        drl::cli::end_quietly_on_broken_pipe();
    }
    drl::cli::execute(cli)
}
