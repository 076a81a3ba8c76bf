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
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use handoff::{ConnectionGuard, Drain};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[path = "support/mod.rs"]
mod support;
use support::say;

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
    #[command(flatten)]
    flags: support::Flags,
}

struct App {
    pid: u32,
    generation: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    support::run("http", args.listen, args.flags, |handoff, drain| {
        let app = Arc::new(App {
            pid: std::process::id(),
            generation: handoff.generation(),
        });
        let drain = drain.clone();
        move |stream, guard| serve(stream, guard, drain.clone(), app.clone())
    })
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
