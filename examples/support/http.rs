//! The routes of the `http_server` example, as a `tower` service. Shared
//! with the benchmark's SO_REUSEPORT server, so both answer the same way
//! (and drain the same way: both serve through `handoff::http`).
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

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

/// Who answers.
pub struct App {
    pub pid: u32,
    pub generation: u64,
    /// Answers `/readyz` with 503 unless this reports true.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The routes, as a `tower` service for `handoff::Serve::http` (which
/// applies the drain rules) or `handoff::http::serve_connection`.
pub fn service(
    app: Arc<App>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |request| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(request, app).await) }
    })
}

async fn handle(request: Request<Incoming>, app: Arc<App>) -> Response<Full<Bytes>> {
    let hello = || format!("pid={} generation={}\n", app.pid, app.generation);
    let response = match request.uri().path() {
        "/" => text(StatusCode::OK, hello()),
        // Liveness: the process works.
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        // Readiness: 503 from the moment the process decided to stop, so a
        // load balancer stops sending new work during the drain delay.
        "/readyz" => match (app.ready)() {
            true => text(StatusCode::OK, "ready\n".into()),
            false => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into()),
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
