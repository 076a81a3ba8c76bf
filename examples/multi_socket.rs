//! Every kind of named fd through upgrades: TCP (IPv4 or IPv6), UDP, a Unix
//! stream socket, a Unix datagram socket, and an append-only log file.
//!
//! ```text
//! multi_socket [--tcp ADDR]... [--udp ADDR] [--unix PATH] [--unix-dgram PATH] [--log PATH] [--pid-file PATH]
//! ```
//!
//! Each socket answers `<pid> <kind>` (stream sockets: on connect, then
//! close; datagram sockets: in reply to any datagram). Each generation appends
//! `pid=<pid> generation=<n>` to the log through the fd it inherited, so a log
//! file that was renamed keeps receiving lines. `SIGHUP` upgrades;
//! `SIGTERM`/`SIGINT` stop. Event lines on stdout as in `http_server`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use handoff::Handoff;

#[path = "support/mod.rs"]
mod support;
use support::say;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(about = "Every kind of named fd, handed over on SIGHUP (handoff).")]
struct Args {
    /// TCP address; repeat for several.
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    #[arg(long, value_name = "ADDR")]
    udp: Option<SocketAddr>,
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    unix_dgram: Option<PathBuf>,
    /// Append-only log, opened once and then inherited.
    #[arg(long, value_name = "PATH")]
    log: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let pid_file = args.pid_file.clone();
    support::main_with("multi_socket", 2, Handoff::builder(), pid_file, |handoff| {
        run(handoff, args)
    })
}

async fn run(handoff: Handoff, args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (pid, generation) = (std::process::id(), handoff.generation());
    // Each socket is served while this process serves: paused on a handover,
    // resumed if the successor dies and this process takes the sockets back.
    let mut tasks = JoinSet::new();
    let mut tcp_addrs = Vec::new();
    for (i, addr) in args.tcp.iter().enumerate() {
        let listener = Arc::new(handoff.tcp_listener(&format!("tcp{i}"), *addr)?);
        tcp_addrs.push(listener.local_addr()?.to_string());
        serve_while(&mut tasks, &handoff, move || {
            let listener = listener.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let _ = stream.write_all(format!("{pid} tcp\n").as_bytes()).await;
                }
            }
        });
    }
    let mut udp_addr = String::new();
    if let Some(addr) = args.udp {
        let socket = Arc::new(handoff.udp_socket("udp", addr)?);
        udp_addr = socket.local_addr()?.to_string();
        serve_while(&mut tasks, &handoff, move || {
            let socket = socket.clone();
            async move {
                let mut buf = [0u8; 512];
                while let Ok((_, peer)) = socket.recv_from(&mut buf).await {
                    let _ = socket.send_to(format!("{pid} udp").as_bytes(), peer).await;
                }
            }
        });
    }
    if let Some(path) = &args.unix {
        let listener = Arc::new(handoff.unix_listener("unix", path)?);
        serve_while(&mut tasks, &handoff, move || {
            let listener = listener.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let _ = stream.write_all(format!("{pid} unix\n").as_bytes()).await;
                }
            }
        });
    }
    if let Some(path) = &args.unix_dgram {
        let socket = Arc::new(handoff.unix_datagram("unix-dgram", path)?);
        serve_while(&mut tasks, &handoff, move || {
            let socket = socket.clone();
            async move {
                let mut buf = [0u8; 512];
                while let Ok((_, peer)) = socket.recv_from(&mut buf).await {
                    if let Some(peer) = peer.as_pathname() {
                        let _ = socket
                            .send_to(format!("{pid} unix-dgram").as_bytes(), peer)
                            .await;
                    }
                }
            }
        });
    }
    if let Some(path) = &args.log {
        let fd = handoff.fd("log", || {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map(Into::into)
        })?;
        let mut log = std::fs::File::from(fd);
        writeln!(log, "pid={pid} generation={generation}")?;
    }
    handoff.handle_signals()?;
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={} udp={udp_addr}",
        tcp_addrs.join(",")
    ));
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));
    support::crash_if_asked();
    loop {
        let reason = handoff.stopping().await;
        say(format_args!(
            "stopping pid={pid} generation={generation} reason={:?} connections=0",
            reason.to_string()
        ));
        if let handoff::StopReason::Upgraded { successor } = reason {
            say(format_args!(
                "upgrade succeeded pid={pid} generation={generation} successor={successor}"
            ));
        }
        // Waits out the probation; `Resume` if the successor died meanwhile.
        if handoff.finish().await == handoff::Finish::Exit {
            break;
        }
        say(format_args!("resumed pid={pid} generation={generation}"));
    }
    // The tasks have ended; dropping them closes this process's copies.
    tasks.shutdown().await;
    say(format_args!(
        "exit pid={pid} generation={generation} cut=0 waited_ms=0"
    ));
    Ok(ExitCode::SUCCESS)
}

/// Runs the task `start` makes in `tasks` while this process serves (see
/// `Handoff::while_serving`).
fn serve_while<F, Fut>(tasks: &mut JoinSet<()>, handoff: &Handoff, start: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let handoff = handoff.clone();
    tasks.spawn(async move { handoff.while_serving(start).await });
}
