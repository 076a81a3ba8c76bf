//! The `handoff` command: supervise a server in any language (`run`),
//! upgrade a running server and read its state over its control socket.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use handoff::control::{request, Command, GenerationState, Response, Status};
use handoff::supervisor::{self, parse_duration, Listen, Ready};
use nix::sys::signal::Signal;

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
    /// Run a server and keep it up, upgrading it in place on SIGHUP.
    ///
    /// `handoff run` owns the listening sockets and keeps one PID for the
    /// server's whole life (safe as PID 1 in a container, and as systemd's
    /// main process). It starts CMD with the sockets at fd 3, 4, … and
    /// LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID and NOTIFY_SOCKET set, as
    /// systemd socket activation does, so any server that supports socket
    /// activation works unchanged.
    ///
    /// SIGHUP (or `handoff upgrade`) starts a new CMD with the same sockets,
    /// waits until it is ready, then sends the old one the stop signal. A new
    /// process that fails is killed and the old one keeps serving. A process
    /// that dies is restarted (with backoff) while the sockets stay open, so
    /// clients wait instead of being refused. SIGTERM/SIGINT stop every child
    /// and exit with the serving child's status.
    ///
    /// Example: handoff run --listen web=tcp://127.0.0.1:8080 --control /run/app/control.sock -- ./server
    Run {
        /// A socket to own, as NAME=ADDR; ADDR is tcp://HOST:PORT,
        /// udp://HOST:PORT or unix:///PATH. HOST is an IP address ([::] is
        /// dual-stack where the system says so) or a name, resolved once at
        /// start: the socket is bound at the first address that works, and
        /// a line says which. A socket systemd passed under NAME is reused,
        /// else the one it passed at ADDR. Repeat for several.
        #[arg(long = "listen", value_name = "NAME=ADDR", value_parser = Listen::parse, required = true)]
        listen: Vec<(String, Listen)>,
        /// IPv6 sockets accept IPv6 only (IPV6_V6ONLY), so that [::]:PORT
        /// and 0.0.0.0:PORT can be two sockets.
        #[arg(long)]
        ipv6_only: bool,
        /// When a new child counts as ready: notify (it sends READY=1 to
        /// NOTIFY_SOCKET), delay=DUR, or http=URL (polled until it answers 2xx).
        #[arg(long, value_name = "MODE", default_value = "notify")]
        ready: Ready,
        /// How long a new child has to get ready.
        #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
        upgrade_timeout: Duration,
        /// How long a stopping child has to finish before it is killed.
        #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// Write the supervisor's PID here (it never changes).
        #[arg(long, value_name = "PATH")]
        pid_file: Option<PathBuf>,
        /// Serve the control socket here, for `handoff upgrade` and `handoff status`.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// The signal that asks a child to finish and exit.
        #[arg(long, value_name = "SIG", default_value = "SIGTERM", value_parser = parse_signal)]
        stop_signal: Signal,
        /// Restarts of a child that does not serve (a crash loop, a missing
        /// binary) allowed within --restart-window; one more and handoff run
        /// exits with the last error (so systemd's Restart= or a person
        /// takes over), like systemd's StartLimitBurst=.
        #[arg(long, value_name = "N", default_value = "5")]
        max_restarts: u32,
        /// The window of --max-restarts, like StartLimitIntervalSec=.
        #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
        restart_window: Duration,
        /// In an upgrade, the new child takes over only once it has lived
        /// this long after it said ready; until then the old one serves on
        /// beside it, and a new child that dies sooner is a failed upgrade. For servers that
        /// say ready before they can fail (gunicorn's arbiter says READY=1
        /// before its workers import the app).
        #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration)]
        min_uptime: Duration,
        /// The server to run, and its arguments (after --).
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Send sd_notify lines (READY=1, STATUS=…) to $NOTIFY_SOCKET and wait
    /// until they were processed: for servers that cannot send them
    /// themselves (Node has no Unix datagram sockets). Under `handoff run`
    /// a READY=1 from any process of the child's process group counts.
    Notify {
        /// The lines, such as READY=1 or "STATUS=Warming up".
        #[arg(required = true, value_name = "LINE")]
        lines: Vec<String>,
    },
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
        #[arg(long, value_name = "DUR", default_value = "120s", value_parser = parse_duration)]
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
        #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// `SIGTERM`, `TERM` or `15`.
fn parse_signal(text: &str) -> Result<Signal, String> {
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| format!("{text}: no such signal"));
    }
    let name = if text.starts_with("SIG") {
        text.to_owned()
    } else {
        format!("SIG{text}")
    };
    name.parse().map_err(|_| format!("{text}: no such signal"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Sub::Run {
        listen,
        ipv6_only,
        ready,
        upgrade_timeout,
        drain_timeout,
        pid_file,
        control,
        stop_signal,
        command,
        max_restarts,
        restart_window,
        min_uptime,
    } = cli.command
    {
        let config = supervisor::Config {
            listen,
            ready,
            upgrade_timeout,
            drain_timeout,
            control,
            stop_signal,
            command,
            max_restarts,
            restart_window,
            min_uptime,
        };
        return run(pid_file, ipv6_only, config);
    }
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
        Sub::Run { .. } => unreachable!("handled above"),
        Sub::Notify { lines } => notify(&runtime, &lines.join("\n")),
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

/// `handoff notify`: exit 0 once the lines were processed, 1 if there is no
/// $NOTIFY_SOCKET or it did not answer.
fn notify(runtime: &tokio::runtime::Runtime, lines: &str) -> ExitCode {
    let handoff = match handoff::Handoff::builder().build() {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("handoff notify: {error}");
            return ExitCode::from(2);
        }
    };
    let timeout = Duration::from_secs(5);
    if runtime.block_on(handoff.notify_and_wait(lines, timeout)) {
        ExitCode::SUCCESS
    } else {
        eprintln!("handoff notify: $NOTIFY_SOCKET is not set, or nobody processed the lines within {timeout:?}");
        ExitCode::FAILURE
    }
}

/// `handoff run`: the environment is read before any thread starts.
fn run(pid_file: Option<PathBuf>, ipv6_only: bool, config: supervisor::Config) -> ExitCode {
    let mut builder = handoff::Handoff::builder().ipv6_only(ipv6_only);
    if let Some(path) = pid_file {
        builder = builder.pid_file(path);
    }
    let handoff = match builder.build() {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("handoff run: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("handoff run: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(supervisor::run(handoff, config)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("handoff run: {error}");
            ExitCode::from(2)
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
    if status.restarts > 0 || status.next_restart_in_secs.is_some() {
        let next = status
            .next_restart_in_secs
            .map_or_else(String::new, |s| format!("; next try in {s:.1}s"));
        println!("restarts: {} in the current window{next}", status.restarts);
    }
    if let Some(error) = &status.last_error {
        println!("last error: {error}");
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
