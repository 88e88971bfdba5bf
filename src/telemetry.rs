//! Logging set-up: structured `tracing` output, plain or JSON.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::{LogFormat, TelemetryArgs};

/// Install the global subscriber. Logs go to stderr so that `statelock crds` output stays clean.
pub fn init(args: &TelemetryArgs) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(&args.log_filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match args.log_format {
        // Colour only on a terminal: a file, a pipe or a container log gets plain text.
        LogFormat::Plain => {
            let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
            registry.with(fmt::layer().with_ansi(colour).with_writer(std::io::stderr)).init()
        }
        LogFormat::Json => {
            registry.with(fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr)).init()
        }
    }
    Ok(())
}
