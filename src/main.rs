//! The `drl` command line: parses arguments and hands over to the library
//! (`drl::cli::execute`; `drl node` ends in `drl::server::run`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    drl::cli::execute(drl::cli::Cli::parse())
}
