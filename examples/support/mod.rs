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

/// Prints a line for every upgrade event of this process, until [`finish`](Reporter::finish).
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    done: std::sync::Arc<tokio::sync::Notify>,
}

impl Reporter {
    pub fn start(handoff: &Handoff) -> Reporter {
        let mut events = handoff.upgrade_events();
        let done = std::sync::Arc::new(tokio::sync::Notify::new());
        let pid = std::process::id();
        let generation = handoff.generation();
        let task = {
            let done = done.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        event = events.recv() => match event {
                            Ok(event) => print_event(pid, generation, &event),
                            Err(_) => return,
                        },
                        () = done.notified() => break,
                    }
                }
                while let Ok(event) = events.try_recv() {
                    print_event(pid, generation, &event);
                }
            })
        };
        Reporter { task, done }
    }

    /// Prints what is still queued, so no event line is lost at exit.
    pub async fn finish(self) {
        self.done.notify_one();
        let _ = self.task.await;
    }
}

fn print_event(pid: u32, generation: u64, event: &UpgradeEvent) {
    match event {
        UpgradeEvent::Started { .. } => say(format_args!(
            "upgrade started pid={pid} generation={generation}"
        )),
        UpgradeEvent::Succeeded { successor } => say(format_args!(
            "upgrade succeeded pid={pid} generation={generation} successor={successor}"
        )),
        UpgradeEvent::Failed { error } => say(format_args!(
            "upgrade failed pid={pid} generation={generation} error={:?}",
            error.to_string()
        )),
    }
}
