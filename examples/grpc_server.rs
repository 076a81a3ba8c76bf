//! A gRPC server (tonic) that upgrades in place with `SIGHUP` and drains on
//! `SIGTERM`/`SIGINT`, on `handoff::Serve::tonic`. It serves
//! `grpc.health.v1.Health` (Check and Watch, via tonic-health: `SERVING`
//! while this process serves, `NOT_SERVING` from the moment it decided to
//! stop, `SERVING` again if it takes the sockets back) and
//! `handoff.demo.Echo` (unary `Say`, server-streaming `Stream`). The same
//! flags and event lines as `http_server`.
//!
//! ```text
//! grpc_server [--listen ADDR]... [--pid-file PATH] [--upgrade-timeout SECS] [--drain-timeout SECS]
//!             [--control PATH] [--drain-delay SECS] [--probation SECS]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tonic_health::ServingStatus;

#[path = "support/mod.rs"]
mod support;

#[path = "support/echo_grpc.rs"]
mod echo_grpc;

#[derive(Parser, Debug)]
#[command(about = "A demo gRPC server that upgrades in place on SIGHUP (handoff).")]
struct Args {
    /// Address to serve on; repeat for several sockets.
    #[arg(
        long = "listen",
        value_name = "ADDR",
        default_value = "127.0.0.1:50051"
    )]
    listen: Vec<SocketAddr>,
    #[command(flatten)]
    flags: support::Flags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    support::serve(
        "grpc",
        args.listen,
        args.flags,
        |handoff, serve, listeners| {
            let (health, health_service) = tonic_health::server::health_reporter();
            let life = handoff.clone();
            tokio::spawn(async move {
                // "" is the whole server, as health checkers ask by default.
                // SERVING again after a take-back (the successor died).
                while life.serving().await {
                    health.set_service_status("", ServingStatus::Serving).await;
                    life.stopping().await;
                    health
                        .set_service_status("", ServingStatus::NotServing)
                        .await;
                }
            });
            let echo = echo_grpc::EchoServer {
                generation: handoff.generation(),
            };
            let routes = tonic::service::Routes::new(health_service).add_service(echo);
            serve.tonic(listeners, routes)
        },
    )
    .await
}
