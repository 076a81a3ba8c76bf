//! What the example servers share: their common flags, the server lifecycle
//! (claim listeners, accept until told to stop, report ready, drain, exit),
//! and event lines on stdout. Each example only says how to serve one
//! connection.

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use handoff::{ConnectionGuard, Drain, Handoff, UpgradeEvent};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

/// Runs a server: `name` prefixes listener names and error messages;
/// `make_serve` builds the per-connection handler once the process knows its
/// generation. Exit status: 0 after a clean drain, 1 if connections were cut,
/// 2 if the server could not start.
pub fn run<S, F>(
    name: &'static str,
    listen: Vec<SocketAddr>,
    flags: Flags,
    make_serve: impl FnOnce(&Handoff, &Drain) -> S,
) -> ExitCode
where
    S: Fn(TcpStream, ConnectionGuard) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let builder = Handoff::builder().upgrade_timeout(flags.upgrade_timeout);
    let pid_file = flags.pid_file.clone();
    main_with(name, 2, builder, pid_file, |handoff| async move {
        lifecycle(name, handoff, listen, &flags, make_serve).await
    })
}

/// An example's `main`: logging; the `Handoff` built before any thread starts
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

async fn lifecycle<S, F>(
    name: &'static str,
    handoff: Handoff,
    listen: Vec<SocketAddr>,
    flags: &Flags,
    make_serve: impl FnOnce(&Handoff, &Drain) -> S,
) -> Result<ExitCode, Box<dyn std::error::Error>>
where
    S: Fn(TcpStream, ConnectionGuard) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (pid, generation) = (std::process::id(), handoff.generation());
    let mut listeners = Vec::new();
    for (i, addr) in listen.iter().enumerate() {
        listeners.push(handoff.tcp_listener(&format!("{name}{i}"), *addr)?);
    }
    handoff.handle_signals()?;
    let reporter = Reporter::start(&handoff);
    let drain = Drain::new();
    let serve = make_serve(&handoff, &drain);
    // When to stop accepting: at once after an upgrade; after --drain-delay
    // (the lame duck) on a stop signal, unless a second one comes.
    let stop_accepting = CancellationToken::new();
    {
        let (handoff, stop_accepting, delay) =
            (handoff.clone(), stop_accepting.clone(), flags.drain_delay);
        tokio::spawn(async move {
            let reason = handoff.stopping().await;
            if !matches!(reason, handoff::StopReason::Upgraded { .. }) && !delay.is_zero() {
                say(format_args!(
                    "lame-duck pid={} delay_ms={}",
                    std::process::id(),
                    delay.as_millis()
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = handoff.forced() => {}
                }
            }
            stop_accepting.cancel();
        });
    }
    let mut addrs = Vec::new();
    let mut accepting = Vec::new();
    for listener in listeners {
        addrs.push(listener.local_addr()?.to_string());
        let task = accept_loop(
            listener,
            stop_accepting.clone(),
            drain.clone(),
            serve.clone(),
        );
        accepting.push(tokio::spawn(task));
    }
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={}",
        addrs.join(",")
    ));
    if let Some(path) = &flags.control {
        handoff.serve_control(path, Some(drain.clone()))?;
    }
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));

    let reason = handoff.stopping().await;
    stop_accepting.cancelled().await;
    for task in accepting {
        task.await?;
    }
    say(format_args!(
        "stopping pid={pid} generation={generation} reason={:?} connections={}",
        reason.to_string(),
        drain.active()
    ));
    let report = handoff.drain(&drain, flags.drain_timeout).await;
    reporter.finish().await;
    say(format_args!(
        "exit pid={pid} generation={generation} cut={} waited_ms={}",
        report.cut,
        report.waited.as_millis()
    ));
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Accepts until this process must stop, then drops (closes) its listener fd.
async fn accept_loop<S, F>(listener: TcpListener, stop: CancellationToken, drain: Drain, serve: S)
where
    S: Fn(TcpStream, ConnectionGuard) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, drain.track()));
                }
                Err(error) => {
                    // Out of fds or memory: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
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
    }
}
