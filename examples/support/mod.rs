//! Helpers shared by the example servers: event lines on stdout, logging,
//! and flag parsing.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use handoff::{Handoff, UpgradeEvent};

/// Prints one event line on stdout. Errors (a closed stdout) are ignored:
/// a server must not die because nobody reads its events.
pub fn say(line: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Parses a number of seconds such as `2` or `0.5`.
pub fn secs(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{value:?} is not a duration"))
}

/// Prints a line for every upgrade event of this process.
pub fn report_upgrades(handoff: &Handoff) {
    let mut events = handoff.upgrade_events();
    let pid = std::process::id();
    let generation = handoff.generation();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                UpgradeEvent::Started { .. } => {
                    say(format_args!("upgrade started pid={pid} generation={generation}"))
                }
                UpgradeEvent::Succeeded { successor } => say(format_args!(
                    "upgrade succeeded pid={pid} generation={generation} successor={successor}"
                )),
                UpgradeEvent::Failed { error } => say(format_args!(
                    "upgrade failed pid={pid} generation={generation} error={:?}",
                    error.to_string()
                )),
            }
        }
    });
}
