//! A small HTTP/1.1 server (hyper, keep-alive on) that upgrades in place with
//! `SIGHUP` and drains on `SIGTERM`/`SIGINT`.
//!
//! ```text
//! http_server [--listen ADDR]... [--pid-file PATH] [--upgrade-timeout SECS] [--drain-timeout SECS]
//! ```
//!
//! - `GET /` answers `pid=<pid> generation=<n>`.
//! - `GET /sleep?ms=N` waits N ms (at most 60 s), then answers like `GET /`.
//! - `GET /subprocess` runs `/bin/sh -c 'ls -l /proc/$$/fd; env'` and returns
//!   its output: what a subprocess of the server inherits (fds and variables).
//!
//! It prints one line per event on stdout (`listening`, `ready`, `upgrade
//! started|succeeded|failed`, `stopping`, `exit`, and `sleeping` when a
//! `/sleep` request starts), with `key=value` fields; logs go to stderr
//! (`RUST_LOG`, default `info`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use handoff::{ConnectionGuard, Drain, Handoff};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[path = "support/mod.rs"]
mod support;
use support::{say, secs};

/// Once draining begins, every response carries `Connection: close`, and a
/// connection gets this long to send its next request before it is closed.
/// A busy keep-alive client thus gets its last answer with `Connection: close`
/// and reconnects (to the successor), instead of racing a close (sending a
/// request into a connection the server just closed); and a connection
/// accepted just before the cutover is answered rather than closed unanswered
/// (hyper issue 2730). A connection that stays silent is closed at the end.
const IDLE_GRACE: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(about = "A demo HTTP server that upgrades in place on SIGHUP (handoff).")]
struct Args {
    /// Address to serve on; repeat for several sockets.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,
    /// Keep a PID file here that always names the generation serving new connections.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Seconds the new process has to become ready before the upgrade is abandoned.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = secs)]
    upgrade_timeout: Duration,
    /// Seconds in-flight requests get to finish when stopping; then they are cut.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = secs)]
    drain_timeout: Duration,
}

struct App {
    pid: u32,
    generation: u64,
}

fn main() -> ExitCode {
    support::init_logging();
    let args = Args::parse();
    let mut builder = Handoff::builder().upgrade_timeout(args.upgrade_timeout);
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    // Before the runtime starts: this reads and scrubs the environment.
    let handoff = match builder.build() {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("http_server: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("http_server: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(handoff, args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("http_server: {error}");
            ExitCode::from(2)
        }
    }
}

async fn run(handoff: Handoff, args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let app = Arc::new(App {
        pid: std::process::id(),
        generation: handoff.generation(),
    });
    let mut listeners = Vec::new();
    for (i, addr) in args.listen.iter().enumerate() {
        listeners.push(handoff.tcp_listener(&format!("http{i}"), *addr)?);
    }
    handoff.handle_signals()?;
    let reporter = support::Reporter::start(&handoff);

    let drain = Drain::new();
    let mut addrs = Vec::new();
    let mut accepting = Vec::new();
    for listener in listeners {
        addrs.push(listener.local_addr()?.to_string());
        accepting.push(tokio::spawn(accept_loop(
            listener,
            handoff.clone(),
            drain.clone(),
            app.clone(),
        )));
    }
    say(format_args!(
        "listening pid={} generation={} addrs={}",
        app.pid,
        app.generation,
        addrs.join(",")
    ));
    handoff.ready()?;
    say(format_args!(
        "ready pid={} generation={}",
        app.pid, app.generation
    ));

    let reason = handoff.stopping().await;
    for task in accepting {
        task.await?;
    }
    say(format_args!(
        "stopping pid={} generation={} reason={:?} connections={}",
        app.pid,
        app.generation,
        reason.to_string(),
        drain.active()
    ));
    let report = drain.drain(args.drain_timeout, handoff.forced()).await;
    reporter.finish().await;
    say(format_args!(
        "exit pid={} generation={} cut={} waited_ms={}",
        app.pid,
        app.generation,
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
async fn accept_loop(listener: TcpListener, handoff: Handoff, drain: Drain, app: Arc<App>) {
    loop {
        tokio::select! {
            biased;
            _ = handoff.stopping() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, drain.track(), drain.clone(), app.clone()));
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

/// Serves one connection; see [`IDLE_GRACE`] for what happens when draining.
async fn serve(stream: TcpStream, guard: ConnectionGuard, drain: Drain, app: Arc<App>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| {
        let (app, drain) = (app.clone(), drain.clone());
        async move {
            let mut response = handle(request, app).await;
            if drain.is_draining() {
                // hyper closes the connection after this response.
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = guard.draining() => {}
    }
    tokio::select! {
        _ = connection.as_mut() => return,
        () = tokio::time::sleep(IDLE_GRACE) => {}
        () = guard.cut() => return,
    }
    // Still open: close it if idle, or after the request in flight.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection.as_mut() => {}
        () = guard.cut() => {}
    }
}

async fn handle(request: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    let hello = || format!("pid={} generation={}\n", app.pid, app.generation);
    let response = match request.uri().path() {
        "/" => text(StatusCode::OK, hello()),
        "/sleep" => {
            let ms = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|ms| ms.parse::<u64>().ok());
            match ms {
                Some(ms) => {
                    say(format_args!("sleeping pid={} ms={ms}", app.pid));
                    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                    text(StatusCode::OK, hello())
                }
                None => text(StatusCode::BAD_REQUEST, "expected /sleep?ms=N\n".into()),
            }
        }
        "/subprocess" => {
            let output = tokio::process::Command::new("/bin/sh")
                .args(["-c", "ls -l /proc/$$/fd; env"])
                .output()
                .await;
            match output {
                Ok(output) => text(
                    StatusCode::OK,
                    String::from_utf8_lossy(&output.stdout).into_owned(),
                ),
                Err(error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot run /bin/sh: {error}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
