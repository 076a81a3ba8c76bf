//! A TCP line-echo server that upgrades in place with `SIGHUP` and drains on
//! `SIGTERM`/`SIGINT`. Each reply is the line prefixed with `<pid> `.
//!
//! ```text
//! echo_server [--listen ADDR]... [--pid-file PATH] [--upgrade-timeout SECS] [--drain-timeout SECS]
//! ```
//!
//! When draining, a connection finishes the line it is receiving, answers it
//! and closes; one with nothing pending gets a 1 s grace for one more line.
//! Event lines on stdout are the same as `http_server`'s.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use handoff::ConnectionGuard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "support/mod.rs"]
mod support;

/// Longest line accepted; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

/// How long a draining connection with nothing pending waits for a line.
const IDLE_GRACE: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(about = "A demo TCP echo server that upgrades in place on SIGHUP (handoff).")]
struct Args {
    /// Address to serve on; repeat for several sockets.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: Vec<SocketAddr>,
    #[command(flatten)]
    flags: support::Flags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    support::serve("echo", args.listen, args.flags, |_, serve, listeners| {
        let prefix: Arc<[u8]> = format!("{} ", std::process::id()).into_bytes().into();
        // The raw-TCP integration: one handler per connection.
        serve.run(listeners, move |stream, guard| {
            echo(stream, guard, prefix.clone())
        })
    })
    .await
}

/// Echoes complete lines. Once draining begins, a connection answers what
/// it receives until it has answered a line and has nothing pending, or until
/// [`IDLE_GRACE`] passes with nothing pending; then it closes. So a connection
/// accepted just before the cutover, whose line has not been read yet, is
/// answered instead of reset.
async fn echo(mut stream: TcpStream, guard: ConnectionGuard, prefix: Arc<[u8]>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut grace_ends: Option<tokio::time::Instant> = None;
    let mut answered_while_draining = false;
    loop {
        if answered_while_draining && pending.is_empty() {
            return;
        }
        let idle_deadline = grace_ends.filter(|_| pending.is_empty());
        let read = tokio::select! {
            read = stream.read(&mut chunk) => read,
            () = guard.draining(), if grace_ends.is_none() => {
                grace_ends = Some(tokio::time::Instant::now() + IDLE_GRACE);
                continue;
            }
            () = sleep_until_or_never(idle_deadline) => return,
            () = guard.cut() => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let mut reply = Vec::with_capacity(prefix.len() + line.len());
            reply.extend_from_slice(&prefix);
            reply.extend_from_slice(&line);
            if stream.write_all(&reply).await.is_err() {
                return;
            }
            answered_while_draining |= grace_ends.is_some();
        }
        if pending.len() > MAX_LINE {
            return;
        }
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
