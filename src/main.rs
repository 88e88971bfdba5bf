use std::process::ExitCode;

use clap::Parser;
use statelock::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = statelock::telemetry::init(&cli.telemetry) {
        eprintln!("error: invalid --log-filter: {err}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Crds(args) => match statelock::app::crds(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("error: failed to start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(statelock::app::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "statelock stopped");
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
