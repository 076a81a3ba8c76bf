//! The server for the SO_REUSEPORT comparison. The benchmark runs its own
//! binary as this server when `HANDOFF_BENCH_SERVE=reuseport` is set.
//!
//! It is the example `http_server` without handoff: the same tokio runtime,
//! hyper HTTP/1.1 with keep-alive, the same answer (`pid=<pid>
//! generation=<n>`), the same draining (responses say `Connection: close`, and
//! each connection gets a grace to send its next request) and the same event
//! lines. The one difference is the socket: each process binds its
//! own with `SO_REUSEPORT` on the same port, so the kernel spreads new
//! connections over the old and the new socket until the old one closes, and
//! whatever waits in the old socket's accept queue then is reset.
//!
//! `HANDOFF_BENCH_ADDR` is the address to bind, `HANDOFF_BENCH_GENERATION`
//! the generation to report. SIGTERM stops accepting, drains, exits.

use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use handoff::{ConnectionGuard, Drain};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

pub const SERVE_VAR: &str = "HANDOFF_BENCH_SERVE";
pub const ADDR_VAR: &str = "HANDOFF_BENCH_ADDR";
pub const GENERATION_VAR: &str = "HANDOFF_BENCH_GENERATION";

/// As in `examples/http_server.rs`: once draining begins, a connection gets
/// this long to send its next request (answered with `Connection: close`).
const IDLE_GRACE: Duration = Duration::from_secs(1);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the server and returns its exit code if this process was started as one.
pub fn serve_if_asked() -> Option<ExitCode> {
    let mode = std::env::var(SERVE_VAR).ok()?;
    let result = match mode.as_str() {
        "reuseport" => run(),
        other => Err(format!("unknown {SERVE_VAR}={other:?}").into()),
    };
    Some(result.unwrap_or_else(|error| {
        eprintln!("bench server: {error}");
        ExitCode::from(2)
    }))
}

fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct App {
    pid: u32,
    generation: u64,
}

fn run() -> Result<ExitCode, Box<dyn Error>> {
    let addr: SocketAddr = std::env::var(ADDR_VAR)?.parse()?;
    let generation: u64 = std::env::var(GENERATION_VAR)?.parse()?;
    let app = Arc::new(App {
        pid: std::process::id(),
        generation,
    });
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = bind_reuseport(addr)?;
        let local = listener.local_addr()?;
        let mut term = signal(SignalKind::terminate())?;
        let drain = Drain::new();
        say(format_args!(
            "listening pid={} generation={} addrs={local}",
            app.pid, app.generation
        ));
        say(format_args!(
            "ready pid={} generation={}",
            app.pid, app.generation
        ));
        loop {
            tokio::select! {
                biased;
                _ = term.recv() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, drain.track(), drain.clone(), app.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        drop(listener);
        say(format_args!(
            "stopping pid={} generation={} reason=\"received SIGTERM\" connections={}",
            app.pid,
            app.generation,
            drain.active()
        ));
        let report = drain.drain(DRAIN_TIMEOUT, std::future::pending()).await;
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
    })
}

/// A listening socket of its own on `addr`, with `SO_REUSEPORT`.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::MAXCONN)?;
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The connection handling of `examples/http_server.rs`: once draining
/// begins, responses carry `Connection: close` and a connection gets
/// [`IDLE_GRACE`] to send its next request before it is closed.
async fn serve(stream: TcpStream, guard: ConnectionGuard, drain: Drain, app: Arc<App>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| {
        let (app, drain) = (app.clone(), drain.clone());
        async move {
            let mut response = handle(request, app);
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

fn handle(request: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/" => (
            StatusCode::OK,
            format!("pid={} generation={}\n", app.pid, app.generation),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
