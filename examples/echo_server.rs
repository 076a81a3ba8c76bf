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
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use handoff::{ConnectionGuard, Drain, Handoff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/mod.rs"]
mod support;
use support::{say, secs};

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
    /// Keep a PID file here that always names the generation serving new connections.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Seconds the new process has to become ready before the upgrade is abandoned.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = secs)]
    upgrade_timeout: Duration,
    /// Seconds connections get to finish their line when stopping; then they are cut.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = secs)]
    drain_timeout: Duration,
}

fn main() -> ExitCode {
    support::init_logging();
    let args = Args::parse();
    let mut builder = Handoff::builder().upgrade_timeout(args.upgrade_timeout);
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    let handoff = match builder.build() {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("echo_server: {error}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .map_err(Into::into)
        .and_then(|runtime| runtime.block_on(run(handoff, args)));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("echo_server: {error}");
            ExitCode::from(2)
        }
    }
}

async fn run(handoff: Handoff, args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let pid = std::process::id();
    let generation = handoff.generation();
    let prefix: Arc<[u8]> = format!("{pid} ").into_bytes().into();
    handoff.handle_signals()?;
    let reporter = support::Reporter::start(&handoff);
    let drain = Drain::new();
    let mut addrs = Vec::new();
    let mut accepting = Vec::new();
    for (i, addr) in args.listen.iter().enumerate() {
        let listener = handoff.tcp_listener(&format!("echo{i}"), *addr)?;
        addrs.push(listener.local_addr()?.to_string());
        accepting.push(tokio::spawn(accept_loop(
            listener,
            handoff.clone(),
            drain.clone(),
            prefix.clone(),
        )));
    }
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={}",
        addrs.join(",")
    ));
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));

    let reason = handoff.stopping().await;
    for task in accepting {
        task.await?;
    }
    say(format_args!(
        "stopping pid={pid} generation={generation} reason={:?} connections={}",
        reason.to_string(),
        drain.active()
    ));
    let report = drain.drain(args.drain_timeout, handoff.forced()).await;
    reporter.finish().await;
    say(format_args!(
        "exit pid={pid} generation={generation} cut={} waited_ms={}",
        report.cut,
        report.waited.as_millis()
    ));
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn accept_loop(listener: TcpListener, handoff: Handoff, drain: Drain, prefix: Arc<[u8]>) {
    loop {
        tokio::select! {
            biased;
            _ = handoff.stopping() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream, drain.track(), prefix.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
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
