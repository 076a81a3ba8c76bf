//! Serving one HTTP/1.1 connection (hyper, keep-alive on) with a drain that
//! drops no request. Shared by the `http_server` example and the benchmark's
//! SO_REUSEPORT server, so both serve and drain the same way.
//!
//! - `GET /` answers `pid=<pid> generation=<n>`.
//! - `GET /sleep?ms=N` waits N ms (at most 60 s), then answers like `GET /`;
//!   it prints `sleeping pid=<pid> ms=<N>` on stdout when it starts.
//! - `GET /healthz` answers 200 while the process works; `GET /readyz`
//!   answers 503 from the moment it decided to stop, else 200.
//! - `GET /subprocess` runs `/bin/sh -c 'ls -l /proc/$$/fd; env'` and returns
//!   its output: what a subprocess of the server inherits (fds and variables).

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use handoff::{ConnectionGuard, Drain};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Once draining begins, every response carries `Connection: close`, and a
/// connection gets this long to send its next request before it is closed.
/// A busy keep-alive client thus gets its last answer with `Connection: close`
/// and reconnects (to the successor), instead of racing a close (sending a
/// request into a connection the server just closed); and a connection
/// accepted just before the cutover is answered rather than closed unanswered
/// (hyper issue 2730). A connection that stays silent is closed at the end.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Who answers.
pub struct App {
    pub pid: u32,
    pub generation: u64,
    /// Answers `/readyz` with 503 once this reports true (the process decided to stop).
    pub stopping: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

/// Serves one connection; see [`IDLE_GRACE`] for what happens when draining.
pub async fn serve(stream: TcpStream, guard: ConnectionGuard, drain: Drain, app: Arc<App>) {
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
        // Liveness: the process works.
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        // Readiness: 503 from the moment the process decided to stop, so a
        // load balancer stops sending new work during the drain delay.
        "/readyz" => match &app.stopping {
            Some(stopping) if stopping() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into())
            }
            _ => text(StatusCode::OK, "ready\n".into()),
        },
        "/sleep" => {
            let ms = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|ms| ms.parse::<u64>().ok());
            match ms {
                Some(ms) => {
                    event(format_args!("sleeping pid={} ms={ms}", app.pid));
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

/// Prints an event line on stdout, ignoring a closed stdout.
fn event(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
