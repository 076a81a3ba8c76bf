//! A small HTTP server (hyper: HTTP/1.1 keep-alive and HTTP/2 on one port)
//! that upgrades in place with `SIGHUP` and drains on `SIGTERM`/`SIGINT`,
//! on `handoff::Serve::http`.
//!
//! ```text
//! http_server [--listen ADDR]... [--pid-file PATH] [--upgrade-timeout SECS] [--drain-timeout SECS]
//!             [--control PATH] [--drain-delay SECS] [--probation SECS]
//! ```
//!
//! - `GET /` answers `pid=<pid> generation=<n>`.
//! - `GET /sleep?ms=N` waits N ms (at most 60 s), then answers like `GET /`.
//! - `GET /healthz` answers 200; `GET /readyz` 503 from the moment the
//!   process decided to stop.
//! - `GET /subprocess` runs `/bin/sh -c 'ls -l /proc/$$/fd; env'` and returns
//!   its output: what a subprocess of the server inherits (fds and variables).
//!
//! It prints one line per event on stdout (`listening`, `ready`, `upgrade
//! started|succeeded|failed`, `stopping`, `exit`, and `sleeping` when a
//! `/sleep` request starts), with `key=value` fields; logs go to stderr
//! (`RUST_LOG`, default `info`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

#[path = "support/mod.rs"]
mod support;

#[path = "support/http.rs"]
mod http;

#[derive(Parser, Debug)]
#[command(about = "A demo HTTP server that upgrades in place on SIGHUP (handoff).")]
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
        |handoff, serve, listeners| {
            let handoff = handoff.clone();
            let app = Arc::new(http::App {
                pid: std::process::id(),
                generation: handoff.generation(),
                ready: Box::new(move || handoff.is_ready()),
            });
            serve.http(listeners, http::service(app))
        },
    )
    .await
}
