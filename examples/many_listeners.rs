//! Thousands of named listeners through upgrades: `--tcp N` TCP listeners on
//! 127.0.0.1 and `--unix N` Unix ones in `--unix-dir`, named
//! `<prefix>-tcp-<i>` and `<prefix>-unix-<i>`.
//!
//! ```text
//! many_listeners --tcp N [--unix N --unix-dir DIR] [--name-prefix P] [--pid-file PATH]
//! ```
//!
//! The `listening` line carries a `digest` of every name with the address
//! it holds (the same in every generation if each listener came back under
//! its own name), and the `sample` of listeners that answer `<pid> <name>`
//! on connect (the first, every 1000th, the last); the others are held for
//! the successor only (this process drops its own copy, so each costs one
//! fd). `SIGHUP` upgrades; `SIGTERM`/`SIGINT` stop. Event lines on stdout as
//! in `http_server`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use handoff::Handoff;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

#[path = "support/mod.rs"]
mod support;
use support::say;

#[derive(Parser, Debug)]
#[command(about = "Thousands of named listeners, handed over on SIGHUP (handoff).")]
struct Args {
    #[arg(long, default_value_t = 1)]
    tcp: usize,
    #[arg(long, default_value_t = 0)]
    unix: usize,
    #[arg(long, value_name = "DIR")]
    unix_dir: Option<PathBuf>,
    #[arg(long, default_value = "listener")]
    name_prefix: String,
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let pid_file = args.pid_file.clone();
    support::main_with(
        "many_listeners",
        2,
        Handoff::builder(),
        pid_file,
        |handoff| run(handoff, args),
    )
}

/// Whether listener `i` of `count` answers (the others are only held).
fn sampled(i: usize, count: usize) -> bool {
    i.is_multiple_of(1000) || i + 1 == count
}

async fn run(handoff: Handoff, args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (pid, generation) = (std::process::id(), handoff.generation());
    handoff.handle_signals()?;
    let reporter = support::Reporter::start(&handoff);
    // FNV-1a over "name=address\n" for every listener, in order.
    let mut digest = 0xcbf2_9ce4_8422_2325_u64;
    let (mut tasks, mut sample, mut addrs) = (JoinSet::new(), Vec::new(), Vec::new());
    for i in 0..args.tcp {
        let name = format!("{}-tcp-{i:05}", args.name_prefix);
        let listener = handoff.std_tcp_listener(&name, "127.0.0.1:0".parse()?)?;
        let addr = listener.local_addr()?;
        fnv(&mut digest, format!("{name}={addr}\n").as_bytes());
        if sampled(i, args.tcp) {
            listener.set_nonblocking(true)?;
            let listener = std::sync::Arc::new(tokio::net::TcpListener::from_std(listener)?);
            serve_while(&mut tasks, &handoff, name.clone(), move || {
                let listener = listener.clone();
                async move { listener.accept().await.map(|(stream, _)| stream) }
            });
            sample.push(name);
            addrs.push(addr.to_string());
        }
    }
    for i in 0..args.unix {
        let name = format!("{}-unix-{i:05}", args.name_prefix);
        let dir = args.unix_dir.as_ref().ok_or("--unix needs --unix-dir")?;
        let path = dir.join(format!("{i}.sock"));
        let listener = handoff.std_unix_listener(&name, &path)?;
        fnv(
            &mut digest,
            format!("{name}={}\n", path.display()).as_bytes(),
        );
        if sampled(i, args.unix) {
            listener.set_nonblocking(true)?;
            let listener = std::sync::Arc::new(tokio::net::UnixListener::from_std(listener)?);
            serve_while(&mut tasks, &handoff, name.clone(), move || {
                let listener = listener.clone();
                async move { listener.accept().await.map(|(stream, _)| stream) }
            });
            sample.push(name);
        }
    }
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={} sample={} digest={:016x}",
        addrs.join(","),
        sample.join(","),
        digest
    ));
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));
    loop {
        let reason = handoff.stopping().await;
        say(format_args!(
            "stopping pid={pid} generation={generation} reason={:?}",
            reason.to_string()
        ));
        if handoff.finish().await == handoff::Finish::Exit {
            break;
        }
        say(format_args!("resumed pid={pid} generation={generation}"));
    }
    tasks.shutdown().await;
    reporter.finish().await;
    say(format_args!("exit pid={pid} generation={generation}"));
    Ok(ExitCode::SUCCESS)
}

/// While this process serves, answers each connection `accept` returns
/// with `<pid> <name>`.
fn serve_while<F, Fut, S>(tasks: &mut JoinSet<()>, handoff: &Handoff, name: String, accept: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
    S: tokio::io::AsyncWrite + Unpin + Send,
{
    let handoff = handoff.clone();
    let answer = format!("{} {name}\n", std::process::id());
    tasks.spawn(async move {
        handoff
            .while_serving(|| async {
                while let Ok(mut stream) = accept().await {
                    let _ = stream.write_all(answer.as_bytes()).await;
                }
            })
            .await
    });
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
}
