//! Benchmark of zero-downtime upgrades: `cargo bench --bench upgrade`.
//!
//! It builds `examples/http_server` (release), copies it into a fresh temp
//! directory and runs it from there, on 127.0.0.1 only. Every figure is set
//! against a baseline measured in the same run, because absolute numbers on a
//! shared machine are noise. Three measurements:
//!
//! 1. **Requests during restarts.** A closed-loop load (blocking std sockets;
//!    some clients open a connection per request, some keep one alive; see
//!    `upgrade/load.rs`) runs while the server is replaced `BENCH_UPGRADES`
//!    times, `BENCH_GAP_MS` apart, by three strategies:
//!    - *handoff*: `SIGHUP` to `http_server`; the successor inherits the
//!      listening socket itself.
//!    - *naive restart*: `SIGTERM` to `http_server`, wait for it to exit,
//!      start a fresh `http_server` on the same port.
//!    - *SO_REUSEPORT rebind*: a new process binds its own socket on the same
//!      port with `SO_REUSEPORT`; once it is ready the old one gets `SIGTERM`,
//!      closes its socket (resetting what waits in its accept queue), drains
//!      and exits. The server is this binary run with
//!      `HANDOFF_BENCH_SERVE=reuseport` (`upgrade/serve.rs`): the same hyper
//!      server and draining as `http_server`, minus handoff.
//!
//!    *Steady* phases without restarts, first and last, are the baseline for
//!    requests/s (their mean) and show that the load itself fails nothing.
//!    A request fails unless it gets `200` with a `pid=…` body; a keep-alive
//!    client may retry once when its reused connection was closed before any
//!    response byte (counted as a retry). After a failure a client pauses
//!    10 ms, so a refused client does not spin: failure counts are attempts
//!    during the outage, comparable across strategies.
//! 2. **Upgrade latency**, idle: `SIGHUP` → the successor's `ready` line, and
//!    `SIGHUP` → the old process's `stopping` line (printed once it no longer
//!    accepts), against the *exec floor*: spawning the same binary fresh until
//!    its `ready` line. Upgrades and fresh starts alternate, so both see the
//!    same machine.
//! 3. **Upgrade latency by number of listeners**: chains of `http_server` with
//!    1, 100 and 1000 `--listen 127.0.0.1:0` sockets, upgraded in turn
//!    (round-robin, so all see the same noise), against the first count.
//!
//! Times are taken when the benchmark reads an event line from the servers'
//! stdout (a reader thread per pipe stamps each line), for the upgrade and
//! the floor alike. Medians and nearest-rank p99s (with fewer than 100
//! samples, the p99 is the maximum). Targets are judged on medians and only
//! reported: a miss does not fail the benchmark.
//!
//! The benchmark becomes a child subreaper, so successors (children of the
//! generation before them) become its children once their parent exits; every
//! process it knows of is SIGKILLed and reaped on any exit path (error, panic,
//! SIGINT/SIGTERM), and a final sweep kills and reaps any child left. Server
//! logs (stderr, `RUST_LOG`) go to `<name>.log` files in the temp dir.
//!
//! Settings (environment variables, defaults in brackets):
//!
//! | variable | meaning |
//! |---|---|
//! | `BENCH_UPGRADES` [10] | restarts per strategy under load |
//! | `BENCH_NEW_CLIENTS` [4] | clients opening a connection per request |
//! | `BENCH_KEEPALIVE_CLIENTS` [4] | clients reusing a keep-alive connection |
//! | `BENCH_WARMUP_MS` [500] | load before the first restart |
//! | `BENCH_GAP_MS` [500] | load after each restart |
//! | `BENCH_STEADY_MS` [3000] | length of the steady (baseline) phase |
//! | `BENCH_LATENCY_RUNS` [30] | upgrades (and fresh starts) for latency |
//! | `BENCH_LISTENERS` [1,100,1000] | listener counts; the first is the baseline |
//! | `BENCH_LISTENER_RUNS` [30] | upgrades per listener count |
//! | `BENCH_PHASE_CAP_SECS` [60] | hard time cap of each phase |
//! | `BENCH_SECTIONS` [load,latency,listeners] | which measurements to run |
//! | `BENCH_KEEP_TMP` [0] | 1 keeps the temp dir (server logs) |

#[path = "upgrade/events.rs"]
mod events;
/// The HTTP serving of `examples/http_server.rs`, shared with the SO_REUSEPORT server.
#[path = "../examples/support/http.rs"]
mod http;
#[path = "upgrade/load.rs"]
mod load;
#[path = "upgrade/procs.rs"]
mod procs;
#[path = "upgrade/report.rs"]
mod report;
#[path = "upgrade/serve.rs"]
mod serve;
#[path = "upgrade/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use events::Kind;
use load::{Load, LoadConfig};
use procs::{Family, Reaper, Result, TempDir};
use report::{Latency, ListenerRow, LoadRow, Report};
use server::{http_server, Server, Strategy, EVENT_TIMEOUT};

/// Socket timeouts of the load clients.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    if let Some(code) = serve::serve_if_asked() {
        return code;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("upgrade bench failed: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Config {
    upgrades: usize,
    load: LoadConfig,
    warmup: Duration,
    gap: Duration,
    steady: Duration,
    latency_runs: usize,
    listeners: Vec<usize>,
    listener_runs: usize,
    phase_cap: Duration,
    sections: String,
    keep_tmp: bool,
}

fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .map_err(|_| format!("{name}={value:?} is not valid")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let phase_cap = Duration::from_secs(var("BENCH_PHASE_CAP_SECS", 60)?);
        let listeners: String = var("BENCH_LISTENERS", "1,100,1000".to_owned())?;
        let listeners = listeners
            .split(',')
            .map(|n| n.trim().parse::<usize>().ok().filter(|&n| n > 0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                format!("BENCH_LISTENERS={listeners:?}: expected counts like 1,100,1000")
            })?;
        Ok(Config {
            upgrades: var("BENCH_UPGRADES", 10)?,
            load: LoadConfig {
                new_connection_clients: var("BENCH_NEW_CLIENTS", 4)?,
                keep_alive_clients: var("BENCH_KEEPALIVE_CLIENTS", 4)?,
                io_timeout: IO_TIMEOUT,
                failure_pause: Duration::from_millis(10),
                max_requests: 10_000_000,
                max_time: phase_cap,
            },
            warmup: Duration::from_millis(var("BENCH_WARMUP_MS", 500)?),
            gap: Duration::from_millis(var("BENCH_GAP_MS", 500)?),
            steady: Duration::from_millis(var("BENCH_STEADY_MS", 3000)?),
            latency_runs: var("BENCH_LATENCY_RUNS", 30)?,
            listeners,
            listener_runs: var("BENCH_LISTENER_RUNS", 30)?,
            phase_cap,
            sections: var("BENCH_SECTIONS", "load,latency,listeners".to_owned())?,
            keep_tmp: var("BENCH_KEEP_TMP", 0u8)? != 0,
        })
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.split(',').any(|s| s.trim() == section)
    }
}

/// What every measurement needs.
struct Ctx {
    config: Config,
    /// The copy of `http_server` in the temp dir.
    http_server: PathBuf,
    /// This binary, run as the SO_REUSEPORT server.
    bench: PathBuf,
    tmp: PathBuf,
}

fn run() -> Result<()> {
    let config = Config::from_env()?;
    let tmp = TempDir::new(config.keep_tmp)?;
    procs::clean_up_on_interrupt(tmp.path.clone(), config.keep_tmp)?;
    // Dropped before `tmp`: kills and reaps whatever is left first.
    let _reaper = Reaper::install()?;
    let bench = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let http_server = build_http_server(&bench, &tmp.join("http_server"))?;
    let ctx = Ctx {
        config,
        http_server,
        bench,
        tmp: tmp.path.clone(),
    };
    let c = &ctx.config.load;
    let mut report = Report {
        clients: format!(
            "{} clients: {} new connection per request, {} keep-alive",
            c.new_connection_clients + c.keep_alive_clients,
            c.new_connection_clients,
            c.keep_alive_clients
        ),
        load: Vec::new(),
        latency: None,
        listeners: Vec::new(),
    };
    if ctx.config.wants("load") {
        let phases = [
            (Strategy::Steady, "steady, before (no restart)"),
            (Strategy::Handoff, "handoff (SIGHUP)"),
            (Strategy::Naive, "naive restart"),
            (Strategy::ReusePort, "SO_REUSEPORT rebind"),
            (Strategy::Steady, "steady, after (no restart)"),
        ];
        for (strategy, label) in phases {
            report.load.push(load_phase(&ctx, strategy, label)?);
        }
    }
    if ctx.config.wants("latency") {
        report.latency = Some(latency(&ctx)?);
    }
    if ctx.config.wants("listeners") {
        report.listeners = listeners(&ctx)?;
    }
    report.print();
    Ok(())
}

/// Builds the example (a no-op when it is up to date) into the target dir
/// this benchmark was built in, and copies it to `dest`.
fn build_http_server(bench: &Path, dest: &Path) -> Result<PathBuf> {
    // This binary is <target>/<profile>/deps/upgrade-<hash>.
    let target = bench
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("unexpected location of the benchmark: {}", bench.display()))?;
    eprintln!("building examples/http_server (release)…");
    let output = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--example",
            "http_server",
            "--target-dir",
        ])
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build --release --example http_server failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let built = target.join("release/examples/http_server");
    std::fs::copy(&built, dest)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
    Ok(dest.to_path_buf())
}

/// Sleeps until `until` or `cap`, whichever is first: pacing of the load.
fn pace(until: Instant, cap: Instant) {
    std::thread::sleep(until.min(cap).saturating_duration_since(Instant::now()));
}

/// Runs the load against one strategy's server while it restarts.
fn load_phase(ctx: &Ctx, strategy: Strategy, label: &'static str) -> Result<LoadRow> {
    let config = &ctx.config;
    eprintln!("load: {label} …");
    let name = format!("load-{strategy:?}").to_lowercase();
    let mut server = Server::start(ctx, strategy, &name, 1)?;
    let started = Instant::now();
    let cap = started + config.phase_cap;
    let load = Load::start(server.addr, &config.load)?;
    let mut restarts = Vec::new();
    if strategy == Strategy::Steady {
        pace(Instant::now() + config.steady, cap);
    } else {
        pace(Instant::now() + config.warmup, cap);
        while restarts.len() < config.upgrades && Instant::now() < cap {
            restarts.push(server.restart(ctx)?);
            pace(Instant::now() + config.gap, cap);
        }
    }
    let stats = load.finish()?;
    for sample in stats.samples.iter().take(5) {
        eprintln!(
            "  failure at {:.3}s: {}",
            sample.at.saturating_duration_since(started).as_secs_f64(),
            sample.what
        );
    }
    eprintln!(
        "  {} restarts, {} ok ({:.0}/s), {} failed, {} retries",
        restarts.len(),
        stats.ok,
        stats.per_second(),
        stats.failed,
        stats.retries
    );
    server.stop()?;
    Ok(LoadRow {
        label,
        restarts,
        stats,
    })
}

/// One fresh start of `http_server` with one listener: spawn → `ready`.
fn exec_floor(ctx: &Ctx, family: &mut Family) -> Result<Duration> {
    let spawned = Instant::now();
    let pid = family.spawn(http_server(ctx, &["127.0.0.1:0".to_owned()]))?;
    let ready = family.wait_for("ready", EVENT_TIMEOUT, |e| {
        e.kind == Kind::Ready && e.pid == pid
    })?;
    family.stop(pid, EVENT_TIMEOUT)?;
    Ok(ready.at.saturating_duration_since(spawned))
}

fn latency(ctx: &Ctx) -> Result<Latency> {
    let runs = ctx.config.latency_runs;
    eprintln!("latency: {runs} upgrades and {runs} fresh starts …");
    let cap = Instant::now() + ctx.config.phase_cap;
    let mut chain = Server::start(ctx, Strategy::Handoff, "latency", 1)?;
    let mut floors = Family::new("floor", ctx.tmp.join("floor.log"));
    let mut result = Latency {
        floor: Vec::new(),
        ready: Vec::new(),
        stopping: Vec::new(),
    };
    for run in 0..runs {
        if Instant::now() >= cap {
            eprintln!(
                "  stopped at the {:?} cap after {run} runs",
                ctx.config.phase_cap
            );
            break;
        }
        // Alternate which goes first, so neither always follows the other.
        if run % 2 == 1 {
            result.floor.push(exec_floor(ctx, &mut floors)?);
        }
        let upgrade = chain.upgrade()?;
        result.ready.push(upgrade.ready);
        result.stopping.push(upgrade.stopping);
        if run % 2 == 0 {
            result.floor.push(exec_floor(ctx, &mut floors)?);
        }
    }
    chain.stop()?;
    Ok(result)
}

fn listeners(ctx: &Ctx) -> Result<Vec<ListenerRow>> {
    let counts = &ctx.config.listeners;
    let runs = ctx.config.listener_runs;
    eprintln!("listeners: {counts:?}, {runs} upgrades each …");
    let mut chains = Vec::new();
    let mut rows = Vec::new();
    for (strategy, server) in [(Strategy::Handoff, "http_server"), (Strategy::Bare, "bare")] {
        for &count in counts {
            let name = format!("listeners-{server}-{count}");
            let chain = Server::start(ctx, strategy, &name, count)?;
            rows.push(ListenerRow {
                server,
                listeners: count,
                fresh_start: chain.startup,
                ready: Vec::new(),
            });
            chains.push(chain);
        }
    }
    let cap = Instant::now() + ctx.config.phase_cap;
    for run in 0..runs {
        if Instant::now() >= cap {
            eprintln!(
                "  stopped at the {:?} cap after {run} rounds",
                ctx.config.phase_cap
            );
            break;
        }
        // Round-robin, starting with a different chain each round.
        for i in 0..chains.len() {
            let k = (run + i) % chains.len();
            rows[k].ready.push(chains[k].upgrade()?.ready);
        }
    }
    for chain in chains {
        chain.stop()?;
    }
    Ok(rows)
}
