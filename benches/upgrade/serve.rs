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
//!
//! Two more modes: `HANDOFF_BENCH_SERVE=bare` (the handoff mechanism alone,
//! see [`run_bare`]) and `HANDOFF_BENCH_SERVE=axum` (a plain `axum::serve`,
//! the baseline of `axum_server`'s throughput, see [`run_axum`]).

use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use handoff::Drain;
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};
use tokio::net::TcpListener;

use crate::http::{service, App};
use tokio::signal::unix::{signal, SignalKind};

pub const SERVE_VAR: &str = "HANDOFF_BENCH_SERVE";
pub const ADDR_VAR: &str = "HANDOFF_BENCH_ADDR";
pub const GENERATION_VAR: &str = "HANDOFF_BENCH_GENERATION";
pub const LISTENERS_VAR: &str = "HANDOFF_BENCH_LISTENERS";

const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the server and returns its exit code if this process was started as one.
pub fn serve_if_asked() -> Option<ExitCode> {
    let mode = std::env::var(SERVE_VAR).ok()?;
    let result = match mode.as_str() {
        "reuseport" => run(),
        "bare" => run_bare(),
        "axum" => run_axum(),
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

fn run() -> Result<ExitCode, Box<dyn Error>> {
    let addr: SocketAddr = std::env::var(ADDR_VAR)?.parse()?;
    let generation: u64 = std::env::var(GENERATION_VAR)?.parse()?;
    let app = Arc::new(App {
        pid: std::process::id(),
        generation,
        ready: Box::new(|| true),
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
                        let _ = stream.set_nodelay(true);
                        let service = service(app.clone());
                        tokio::spawn(handoff::http::serve_connection(stream, drain.track(), service));
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

/// The handoff mechanism alone: claims `HANDOFF_BENCH_LISTENERS` TCP
/// listeners as std sockets (no runtime registration, no accept tasks), says
/// ready, and on `SIGHUP` hands them to its successor (this binary again, with
/// the same environment). It serves nothing. Its upgrade latency is what the
/// library itself costs per listener, apart from what a server does with each.
fn run_bare() -> Result<ExitCode, Box<dyn Error>> {
    let count: usize = std::env::var(LISTENERS_VAR)?.parse()?;
    // No probation: the benchmark waits for each old process's exit (see
    // `server::http_server`).
    let handoff = handoff::Handoff::builder()
        .probation(std::time::Duration::ZERO)
        .build()?;
    let (pid, generation) = (std::process::id(), handoff.generation());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let mut listeners = Vec::with_capacity(count);
        for i in 0..count {
            listeners.push(handoff.std_tcp_listener(&format!("l{i}"), any)?);
        }
        let first = listeners.first().map(|l| l.local_addr()).transpose()?;
        handoff.handle_signals()?;
        let addrs = first.map(|a| a.to_string()).unwrap_or_default();
        say(format_args!(
            "listening pid={pid} generation={generation} addrs={addrs}"
        ));
        handoff.ready()?;
        say(format_args!("ready pid={pid} generation={generation}"));
        let reason = handoff.stopping().await;
        drop(listeners);
        say(format_args!(
            "stopping pid={pid} generation={generation} reason={:?} connections=0",
            reason.to_string()
        ));
        // Before exiting: wait out the probation and hand the service over.
        // (This server accepts nothing, so a take-back has nothing to resume.)
        let _ = handoff.finish().await;
        say(format_args!(
            "exit pid={pid} generation={generation} cut=0 waited_ms=0"
        ));
        Ok(ExitCode::SUCCESS)
    })
}

/// Plain axum, no handoff: `axum::serve(TcpListener, router)` on the same
/// multi-thread runtime as `#[tokio::main]` (`axum_server`'s), with a router
/// that answers `GET /` as `axum_server` does (`pid=<pid> generation=<n>`,
/// the same handler shape) and has the same number of routes. It binds
/// `HANDOFF_BENCH_ADDR` itself. `SIGTERM` ends it at once (it is only
/// stopped idle, after its load).
fn run_axum() -> Result<ExitCode, Box<dyn Error>> {
    use axum::routing::{get, post};

    let addr: SocketAddr = std::env::var(ADDR_VAR)?.parse()?;
    let generation: u64 = std::env::var(GENERATION_VAR)?.parse()?;
    let pid = std::process::id();
    let hello = format!("pid={pid} generation={generation}\n");
    let sleepy = hello.clone();
    // The paths of `axum_server`'s routes, so that routing costs the same;
    // only `GET /` is measured, the others are stubs.
    let router = axum::Router::new()
        .route("/", get(move || async move { hello }))
        .route(
            "/sleep",
            get(move || async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                sleepy
            }),
        )
        .route("/echo", post(|body: axum::body::Bytes| async move { body }))
        .route("/subprocess", get(|| async { "" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }));
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let mut term = signal(SignalKind::terminate())?;
        say(format_args!(
            "listening pid={pid} generation={generation} addrs={local}"
        ));
        say(format_args!("ready pid={pid} generation={generation}"));
        tokio::select! {
            served = axum::serve(listener, router) => served?,
            _ = term.recv() => {}
        }
        say(format_args!(
            "stopping pid={pid} generation={generation} reason=\"received SIGTERM\" connections=0"
        ));
        say(format_args!(
            "exit pid={pid} generation={generation} cut=0 waited_ms=0"
        ));
        Ok(ExitCode::SUCCESS)
    })
}
