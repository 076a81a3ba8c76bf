//! An axum app that upgrades in place with `SIGHUP` and drains on
//! `SIGTERM`/`SIGINT`, on `handoff::Serve::axum`: HTTP/1.1 keep-alive and
//! HTTP/2 (prior knowledge, cleartext) on the same port. The same contract as
//! `http_server` (flags, routes, event lines), plus `POST /echo`.
//!
//! ```text
//! axum_server [--listen ADDR]... [--pid-file PATH] [--upgrade-timeout SECS] [--drain-timeout SECS]
//!             [--control PATH] [--drain-delay SECS] [--probation SECS]
//! ```
//!
//! - `GET /` answers `pid=<pid> generation=<n>`.
//! - `GET /sleep?ms=N` waits N ms (at most 60 s), then answers like `GET /`.
//! - `GET /healthz`, `GET /readyz`: `handoff::axum::health`.
//! - `POST /echo` answers its body.
//! - `GET /subprocess`: what a subprocess inherits (fds and variables).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;

#[path = "support/mod.rs"]
mod support;

#[derive(Parser, Debug)]
#[command(about = "A demo axum server that upgrades in place on SIGHUP (handoff).")]
struct Args {
    /// Address to serve on; repeat for several sockets.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<SocketAddr>,
    #[command(flatten)]
    flags: support::Flags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    support::serve(
        "http",
        args.listen,
        args.flags,
        |handoff, serve, listeners| serve.axum(listeners, app(handoff)),
    )
    .await
}

fn app(handoff: &handoff::Handoff) -> Router {
    let hello = format!(
        "pid={} generation={}\n",
        std::process::id(),
        handoff.generation()
    );
    let sleepy = hello.clone();
    Router::new()
        .route("/", get(move || async move { hello }))
        .route(
            "/sleep",
            get(
                move |Query(query): Query<HashMap<String, u64>>| async move {
                    let Some(&ms) = query.get("ms") else {
                        return (StatusCode::BAD_REQUEST, "expected /sleep?ms=N\n".to_owned());
                    };
                    support::say(format_args!("sleeping pid={} ms={ms}", std::process::id()));
                    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                    (StatusCode::OK, sleepy)
                },
            ),
        )
        .route("/echo", post(|body: axum::body::Bytes| async move { body }))
        .route("/subprocess", get(subprocess))
        .merge(handoff::axum::health(handoff))
}

async fn subprocess() -> (StatusCode, String) {
    let output = tokio::process::Command::new("/bin/sh")
        .args(["-c", "ls -l /proc/$$/fd; env"])
        .output()
        .await;
    match output {
        Ok(output) => (
            StatusCode::OK,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot run /bin/sh: {error}\n"),
        ),
    }
}
