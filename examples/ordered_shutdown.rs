//! Ordered shutdown: an HTTP server, a worker pool fed by a queue, and a
//! store that must be flushed last. On SIGTERM, and in the old process after
//! an upgrade, the same three stages run in order, each with a deadline:
//!
//! 1. `http`: stop accepting, let in-flight requests finish (the drain of
//!    `handoff::Serve`, which then runs the next stages, given by `then`);
//! 2. `workers`: each worker finishes its current job and takes no new one;
//! 3. `store`: flush the results, and the jobs still queued as pending, so no
//!    job is lost.
//!
//! ```text
//! ordered_shutdown [--listen ADDR] [--pid-file PATH] [--workers N] [--store PATH]
//!                  [--stage-timeout SECS] [--overall-timeout SECS] [--upgrade-timeout SECS]
//! ```
//!
//! `GET /job?ms=N` queues a job that takes N ms (answers `queued id=K`);
//! `GET /sleep?ms=N` is a slow request; `GET /` answers `pid=… generation=…`.
//! The log shows each stage and component with its timing; stdout has one
//! `shutdown stage=… component=… outcome=… ms=…` line per component, and the
//! exit status is the report's (0 all closed, 1 something late or failed,
//! 2 forced or out of time); 3 if the server could not start.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use handoff::{Handoff, Outcome, Serve, Shutdown, Workers};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;

#[path = "support/mod.rs"]
mod support;
use support::{say, secs};

#[derive(Parser, Debug)]
#[command(about = "A server that shuts down in ordered stages (handoff).")]
struct Args {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Workers taking jobs from the queue.
    #[arg(long, default_value = "2")]
    workers: usize,
    /// Where the store is flushed (appended).
    #[arg(long, value_name = "PATH", default_value = "ordered_shutdown.store")]
    store: PathBuf,
    /// Deadline of each shutdown stage.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = secs)]
    stage_timeout: Duration,
    /// Deadline of the whole shutdown.
    #[arg(long, value_name = "SECS", default_value = "25", value_parser = secs)]
    overall_timeout: Duration,
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = secs)]
    upgrade_timeout: Duration,
}

/// A job: its id and how long it takes.
struct Job {
    id: u64,
    ms: u64,
}

/// Results kept in memory until flushed.
type Store = Arc<Mutex<Vec<String>>>;

fn main() -> ExitCode {
    let args = Args::parse();
    let builder = Handoff::builder().upgrade_timeout(args.upgrade_timeout);
    let pid_file = args.pid_file.clone();
    support::main_with("ordered_shutdown", 3, builder, pid_file, |handoff| {
        run(handoff, args)
    })
}

async fn run(handoff: Handoff, args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (pid, generation) = (std::process::id(), handoff.generation());
    let listener = handoff.tcp_listener("http0", args.listen)?;
    let bound = listener.local_addr()?;
    handoff.handle_signals()?;
    let reporter = support::Reporter::start(&handoff);

    let (queue, jobs) = mpsc::channel::<Job>(1024);
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    let store: Store = Arc::default();
    let workers = Workers::new();
    for worker in 0..args.workers {
        let (jobs, store) = (jobs.clone(), store.clone());
        workers.spawn(move |stop| async move {
            loop {
                // Take a job unless told to stop; a job taken is finished.
                let job = {
                    let mut jobs = jobs.lock().await;
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => None,
                        job = jobs.recv() => job,
                    }
                };
                let Some(job) = job else { break };
                say(format_args!(
                    "job started id={} worker={worker} pid={pid}",
                    job.id
                ));
                tokio::time::sleep(Duration::from_millis(job.ms)).await;
                store
                    .lock()
                    .unwrap()
                    .push(format!("done id={} pid={pid}", job.id));
                say(format_args!(
                    "job done id={} worker={worker} pid={pid}",
                    job.id
                ));
            }
        });
    }

    let next_id = Arc::new(AtomicU64::new(1));
    let service = tower::service_fn(move |request| {
        handle(request, queue.clone(), next_id.clone(), pid, generation)
    });
    say(format_args!(
        "listening pid={pid} generation={generation} addrs={bound}"
    ));
    handoff.ready()?;
    say(format_args!("ready pid={pid} generation={generation}"));

    // After the connections drained (on SIGTERM, or once a handover is
    // final): the workers finish their jobs, then the store is flushed.
    let mut shutdown = Shutdown::new(args.overall_timeout);
    shutdown
        .stage("workers", args.stage_timeout)
        .add("workers", move || async move {
            workers.close().await;
            Ok::<(), String>(())
        });
    shutdown.stage("store", args.stage_timeout).add("store", {
        let path = args.store.clone();
        move || async move { flush(&path, &store, &jobs).await.map_err(|e| e.to_string()) }
    });
    let drain = handoff::Drain::new();
    let report = Serve::new(&handoff)
        .drain(drain.clone())
        .drain_timeout(args.stage_timeout)
        .on_event(support::event_lines(pid, generation, drain))
        .then(shutdown)
        .http(listener, service)
        .await?;
    let drained = match report.drain.cut {
        0 => "closed".to_owned(),
        n => format!("failed:\"{n} connections cut\""),
    };
    say(format_args!(
        "shutdown pid={pid} stage=http component=connections outcome={drained} ms={}",
        report.drain.waited.as_millis()
    ));
    let stages = report.shutdown.as_ref();
    for c in stages.iter().flat_map(|s| &s.components) {
        let outcome = match &c.outcome {
            Outcome::Closed => "closed".to_owned(),
            Outcome::Failed(why) => format!("failed:{why:?}"),
            Outcome::TimedOut => "timed-out".to_owned(),
            Outcome::Skipped => "skipped".to_owned(),
        };
        say(format_args!(
            "shutdown pid={pid} stage={} component={} outcome={outcome} ms={}",
            c.stage,
            c.name,
            c.elapsed.as_millis()
        ));
    }
    reporter.finish().await;
    let code = report.exit_code();
    let late = stages.map(|s| s.late().join(",")).unwrap_or_default();
    say(format_args!(
        "exit pid={pid} generation={generation} code={code} late={late}"
    ));
    Ok(ExitCode::from(code as u8))
}

/// Writes the results, then every job still queued as pending: nothing is lost.
async fn flush(
    path: &PathBuf,
    store: &Store,
    jobs: &tokio::sync::Mutex<mpsc::Receiver<Job>>,
) -> std::io::Result<()> {
    let mut lines: Vec<String> = std::mem::take(&mut *store.lock().unwrap());
    let mut jobs = jobs.lock().await;
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        lines.push(format!("pending id={} ms={}", job.id, job.ms));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for line in &lines {
        writeln!(file, "{line}")?;
    }
    file.sync_all()?;
    say(format_args!("store flushed records={}", lines.len()));
    Ok(())
}

async fn handle(
    request: Request<Incoming>,
    queue: mpsc::Sender<Job>,
    next_id: Arc<AtomicU64>,
    pid: u32,
    generation: u64,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ms = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0)
        .min(60_000);
    let (status, body) = match request.uri().path() {
        "/" => (
            StatusCode::OK,
            format!("pid={pid} generation={generation}\n"),
        ),
        "/sleep" => {
            say(format_args!("sleeping pid={pid} ms={ms}"));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (
                StatusCode::OK,
                format!("pid={pid} generation={generation}\n"),
            )
        }
        "/job" => {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            match queue.send(Job { id, ms }).await {
                Ok(()) => (StatusCode::ACCEPTED, format!("queued id={id}\n")),
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue closed\n".to_owned()),
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    Ok(response)
}
