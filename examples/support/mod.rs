//! What the example servers share: their common flags, event lines on
//! stdout, and the faults tests inject. The serving lifecycle itself is the
//! library's (`handoff::Serve`); each example only says what it serves.
// Each example uses a part of this module.
#![allow(dead_code)]

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use handoff::{Drain, Handoff, Serve, ServeEvent, UpgradeEvent};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Flags every example takes besides `--listen`.
#[derive(clap::Args, Debug)]
pub struct Flags {
    /// Keep a PID file here that always names the generation serving new connections.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Seconds the new process has to become ready before the upgrade is abandoned.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = secs)]
    pub upgrade_timeout: Duration,
    /// Seconds open connections get to finish when stopping; then they are cut.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = secs)]
    pub drain_timeout: Duration,
    /// Serve the control protocol here, for `handoff upgrade` and `handoff status`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Lame duck: after SIGTERM, keep accepting this many seconds while
    /// /readyz answers 503, so load balancers stop sending traffic before the
    /// listener closes. (Not after an upgrade: the successor serves.)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = secs)]
    pub drain_delay: Duration,
    /// After handing over, stay alive at least this many seconds to take the
    /// sockets back if the new process dies.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = secs)]
    pub probation: Duration,
}

/// A fault the tests inject into a new version (a real crash, a real hang),
/// from `HANDOFF_DEMO_FAULT`; removed from the environment once read, so the
/// faulty process's own successors run clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Return exit status 3 from `main` after claiming the listeners, before
    /// `ready()` (as a bad configuration would).
    ExitBeforeReady,
    /// `abort()` this many ms after `ready()` (a panic on the first request).
    AbortAfterReady(u64),
    /// Wait this many ms before calling `ready()`.
    SlowReady(u64),
    /// Never call `ready()`.
    NeverReady,
}

impl Fault {
    pub fn take() -> Fault {
        let Some(value) = std::env::var_os("HANDOFF_DEMO_FAULT") else {
            return Fault::None;
        };
        std::env::remove_var("HANDOFF_DEMO_FAULT");
        let value = value.to_string_lossy().into_owned();
        let ms = |prefix: &str| value.strip_prefix(prefix).and_then(|v| v.parse().ok());
        if value == "exit-before-ready" {
            Fault::ExitBeforeReady
        } else if value == "never-ready" {
            Fault::NeverReady
        } else if let Some(ms) = ms("abort-after-ready=") {
            Fault::AbortAfterReady(ms)
        } else if let Some(ms) = ms("slow-ready=") {
            Fault::SlowReady(ms)
        } else {
            eprintln!("ignoring unknown HANDOFF_DEMO_FAULT={value:?}");
            Fault::None
        }
    }
}

/// Prints one event line on stdout. Errors (a closed stdout) are ignored:
/// a server must not die because nobody reads its events.
pub fn say(line: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

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

/// Runs a server on the library's serving lifecycle: logging, the
/// `Handoff` (built on the running runtime: `#[tokio::main]` is fine), the
/// listeners (`name0`, `name1`, …), event lines, the injected fault, then
/// `serve` (one of `Serve::run`, `http`, `axum`, `tonic`). Exit status: 0
/// after a clean drain, 1 if connections were cut, 2 if the server could
/// not start.
pub async fn serve<F, Fut>(
    name: &'static str,
    listen: Vec<SocketAddr>,
    flags: Flags,
    serve: F,
) -> ExitCode
where
    F: FnOnce(&Handoff, Serve, Vec<TcpListener>) -> Fut,
    Fut: Future<Output = Result<handoff::Report, handoff::Error>>,
{
    init_logging();
    FAULT.get_or_init(Fault::take);
    let mut builder = Handoff::builder()
        .upgrade_timeout(flags.upgrade_timeout)
        .probation(flags.probation);
    if let Some(path) = &flags.pid_file {
        builder = builder.pid_file(path);
    }
    let result = async {
        let handoff = builder.build()?;
        let mut listeners = Vec::new();
        for (i, addr) in listen.iter().enumerate() {
            listeners.push(handoff.tcp_listener(&format!("{name}{i}"), *addr)?);
        }
        let exit = lifecycle(&handoff, listeners, &flags, serve).await?;
        Ok::<_, Box<dyn std::error::Error>>(exit)
    };
    result.await.unwrap_or_else(|error| {
        eprintln!("{name}: {error}");
        ExitCode::from(2)
    })
}

static FAULT: std::sync::OnceLock<Fault> = std::sync::OnceLock::new();

/// The fault injected into this process, if any.
pub fn fault() -> Fault {
    *FAULT.get().unwrap_or(&Fault::None)
}

/// Right after `ready()`: the `abort-after-ready` fault's crash, if asked for.
pub fn crash_if_asked() {
    if let Fault::AbortAfterReady(ms) = fault() {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            std::process::abort();
        });
    }
}

/// An example's `main` without `Serve`: logging; the `Handoff` built first
/// (it reads and scrubs the environment); then `body` on a tokio runtime.
/// `cannot_start` is the exit status when the server could not start.
pub fn main_with<B, Fut>(
    name: &str,
    cannot_start: u8,
    mut builder: handoff::Builder,
    pid_file: Option<PathBuf>,
    body: B,
) -> ExitCode
where
    B: FnOnce(Handoff) -> Fut,
    Fut: Future<Output = Result<ExitCode, Box<dyn std::error::Error>>>,
{
    init_logging();
    FAULT.get_or_init(Fault::take);
    if let Some(path) = pid_file {
        builder = builder.pid_file(path);
    }
    let result = builder
        .build()
        .map_err(Into::into)
        .and_then(|handoff| tokio::runtime::Runtime::new()?.block_on(body(handoff)));
    result.unwrap_or_else(|error| {
        eprintln!("{name}: {error}");
        ExitCode::from(cannot_start)
    })
}

async fn lifecycle<F, Fut>(
    handoff: &Handoff,
    listeners: Vec<TcpListener>,
    flags: &Flags,
    serve: F,
) -> Result<ExitCode, Box<dyn std::error::Error>>
where
    F: FnOnce(&Handoff, Serve, Vec<TcpListener>) -> Fut,
    Fut: Future<Output = Result<handoff::Report, handoff::Error>>,
{
    let (pid, generation) = (std::process::id(), handoff.generation());
    // Before anything can take time: a SIGHUP must never find the default action.
    handoff.handle_signals()?;
    let reporter = Reporter::start(handoff);
    let drain = Drain::new();
    let mut addrs = Vec::new();
    for listener in &listeners {
        addrs.push(listener.local_addr()?.to_string());
    }
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={}",
        addrs.join(",")
    ));
    if let Some(path) = &flags.control {
        handoff.serve_control(path, Some(drain.clone()))?;
    }
    match fault() {
        // Returned, not exit(): a start-up error runs every destructor.
        Fault::ExitBeforeReady => return Ok(ExitCode::from(3)),
        Fault::NeverReady => std::future::pending::<()>().await,
        Fault::SlowReady(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Fault::AbortAfterReady(_) | Fault::None => {}
    }
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));
    crash_if_asked();
    let lifecycle = Serve::new(handoff)
        .drain(drain.clone())
        .drain_timeout(flags.drain_timeout)
        .drain_delay(flags.drain_delay)
        .on_event(event_lines(pid, generation, drain));
    let report = serve(handoff, lifecycle, listeners).await?;
    reporter.finish().await;
    say(format_args!(
        "exit pid={pid} generation={generation} cut={} waited_ms={}",
        report.drain.cut,
        report.drain.waited.as_millis()
    ));
    Ok(ExitCode::from(report.exit_code() as u8))
}

/// Prints a line for each `ServeEvent` (`lame-duck`, `stopping`, `resumed`),
/// with `drain`'s open connections.
pub fn event_lines(pid: u32, generation: u64, drain: Drain) -> impl Fn(&ServeEvent) + Send + Sync {
    move |event| match event {
        ServeEvent::LameDuck { delay } => say(format_args!(
            "lame-duck pid={pid} delay_ms={}",
            delay.as_millis()
        )),
        ServeEvent::StoppedAccepting {
            reason,
            connections,
        } => say(format_args!(
            "stopping pid={pid} generation={generation} reason={:?} connections={connections}",
            reason.to_string()
        )),
        ServeEvent::Resumed => say(format_args!(
            "resumed pid={pid} generation={generation} connections={}",
            drain.active()
        )),
    }
}

/// Prints a line for every upgrade event of this process, until [`finish`](Reporter::finish).
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    done: Arc<Notify>,
}

impl Reporter {
    pub fn start(handoff: &Handoff) -> Reporter {
        let mut events = handoff.upgrade_events();
        let done = Arc::new(Notify::new());
        let (pid, generation) = (std::process::id(), handoff.generation());
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
        UpgradeEvent::RolledBack { successor, reason } => say(format_args!(
            "upgrade rolled-back pid={pid} generation={generation} successor={successor} reason={reason:?}"
        )),
    }
}
