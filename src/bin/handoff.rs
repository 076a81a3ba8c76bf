//! The `handoff` command: upgrade a running server and read its state over
//! its control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use handoff::control::{request, Command, GenerationState, Response, Status};

#[derive(Parser, Debug)]
#[command(
    name = "handoff",
    version,
    about = "Zero-downtime restarts for network servers.",
    long_about = "Zero-downtime restarts for network servers.\n\n\
        A server built with the handoff library (or run under `handoff run`) \
        starts its new binary, hands it the listening sockets, waits until it \
        is ready, then drains and exits. This command triggers that and \
        reports how it went, through the server's control socket."
)]
struct Cli {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Upgrade the server now and wait for the outcome.
    ///
    /// Prints the PID of the new process and exits 0 once it serves; prints
    /// why and exits 1 if the upgrade failed (the old process keeps serving).
    /// Exit status 2: the control socket could not be reached. Fit for
    /// systemd's ExecReload=.
    Upgrade {
        /// The server's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Give up waiting after this long (e.g. 90s, 2m).
        #[arg(long, value_name = "DUR", default_value = "120s", value_parser = duration)]
        timeout: Duration,
    },
    /// Show the server's processes, their state and the upgrade history.
    Status {
        /// The server's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Give up waiting after this long.
        #[arg(long, value_name = "DUR", default_value = "10s", value_parser = duration)]
        timeout: Duration,
    },
}

/// A duration such as `30s`, `500ms` or `2m`; a bare number is seconds.
fn duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (try 30s, 500ms, 2m)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("handoff: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Sub::Upgrade { control, timeout } => {
            let answer = runtime.block_on(request(&control, Command::Upgrade, timeout));
            report(answer, &control, |response| match &response.upgraded {
                Some(up) => {
                    println!("{}", up.pid);
                    true
                }
                None => false,
            })
        }
        Sub::Status {
            control,
            json,
            timeout,
        } => {
            let answer = runtime.block_on(request(&control, Command::Status, timeout));
            report(answer, &control, |response| match &response.status {
                Some(status) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(status).unwrap_or_default()
                    );
                    true
                }
                Some(status) => {
                    print_status(status);
                    true
                }
                None => false,
            })
        }
    }
}

/// Exit status: 0 if `show` printed a result, 1 if the server said no, 2 if
/// it could not be asked.
fn report(
    answer: std::io::Result<Response>,
    control: &std::path::Path,
    show: impl FnOnce(&Response) -> bool,
) -> ExitCode {
    match answer {
        Ok(response) if response.ok && show(&response) => ExitCode::SUCCESS,
        Ok(response) => {
            let why = response
                .error
                .unwrap_or_else(|| "the server sent no result".into());
            eprintln!("handoff: {why}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "handoff: cannot reach the control socket {}: {error}",
                control.display()
            );
            ExitCode::from(2)
        }
    }
}

fn print_status(status: &Status) {
    println!(
        "pid {}: {} upgrades done, {} failed",
        status.pid, status.upgrades_done, status.upgrades_failed
    );
    if let Some(failure) = &status.last_failure {
        println!("last failure: {failure}");
    }
    println!(
        "{:<10} {:<8} {:<9} {:>9} {:>11}  LISTENERS",
        "GENERATION", "PID", "STATE", "AGE", "CONNECTIONS"
    );
    for g in &status.generations {
        let state = match g.state {
            GenerationState::Starting => "starting",
            GenerationState::Serving => "serving",
            GenerationState::Draining => "draining",
        };
        let connections = g
            .connections
            .map_or_else(|| "-".to_owned(), |c| c.to_string());
        println!(
            "{:<10} {:<8} {:<9} {:>8.1}s {:>11}  {}",
            g.generation,
            g.pid,
            state,
            g.age_secs,
            connections,
            g.listeners.join(",")
        );
    }
}
