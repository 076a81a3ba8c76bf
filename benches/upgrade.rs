//! Benchmark of zero-downtime upgrades: `cargo bench --all-features --bench upgrade`.
//!
//! It builds `examples/http_server` and `examples/axum_server` (release,
//! `--all-features`), copies them into a fresh temp directory and runs them
//! from there, on 127.0.0.1 only. Every figure is set against a baseline
//! measured in the same run, because absolute numbers on a shared machine
//! are noise. The measurements (`BENCH_SECTIONS` picks them):
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
//!
//!    Section `axum` adds rows for `axum_server` (`Serve::axum`), each
//!    against a steady phase of the same server and load: the same HTTP/1.1
//!    load through `BENCH_UPGRADES` `SIGHUP` upgrades, and an HTTP/2 load
//!    (`upgrade/h2load.rs`: hyper's client, prior knowledge,
//!    `BENCH_H2_CONNECTIONS` connections × `BENCH_H2_STREAMS` concurrent
//!    streams) through as many. A stream the server did not process (left
//!    out by a `GOAWAY`, or refused) is retried on a new connection and
//!    counted as a retry; a stream cut in flight is a failure.
//! 2. **Steady throughput of `axum_server` against plain `axum::serve`**
//!    (section `throughput`): the same router answer, the same runtime, the
//!    same HTTP/1.1 load, no restart. The plain server is this binary run with
//!    `HANDOFF_BENCH_SERVE=axum`. Rounds of `BENCH_THROUGHPUT_MS` alternate
//!    plain, handoff, plain, …, plain (`BENCH_THROUGHPUT_ROUNDS` handoff
//!    rounds, one plain round more), both servers up all along (the one not
//!    under load is idle); each handoff round is set against the mean of the
//!    plain rounds either side of it, which cancels a linear drift of the
//!    machine, and the median of those ratios is the figure.
//! 3. **Upgrade latency**, idle: `SIGHUP` → the successor's `ready` line, and
//!    `SIGHUP` → the old process's `stopping` line (printed once it no longer
//!    accepts), against the *exec floor*: spawning the same binary fresh until
//!    its `ready` line. Upgrades and fresh starts alternate, so both see the
//!    same machine.
//! 4. **Upgrade latency by number of listeners**: chains of `http_server` with
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
//! | `BENCH_H2_CONNECTIONS` [4] | HTTP/2 load: connections |
//! | `BENCH_H2_STREAMS` [8] | HTTP/2 load: concurrent streams per connection |
//! | `BENCH_THROUGHPUT_ROUNDS` [5] | throughput: handoff rounds (plain: one more) |
//! | `BENCH_THROUGHPUT_MS` [2000] | throughput: length of a round |
//! | `BENCH_PHASE_CAP_SECS` [60] | hard time cap of each phase |
//! | `BENCH_SECTIONS` [load,axum,throughput,latency,listeners] | which measurements to run |
//! | `BENCH_KEEP_TMP` [0] | 1 keeps the temp dir (server logs) |

#[path = "upgrade/events.rs"]
mod events;
#[path = "upgrade/h2load.rs"]
mod h2load;
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
use h2load::{H2Config, H2Load};
use load::{Load, LoadConfig, LoadStats};
use procs::{Family, Reaper, Result, TempDir};
use report::{Latency, ListenerRow, LoadRow, Report, Throughput};
use server::{http_server, Server, Strategy, EVENT_TIMEOUT};
use Traffic::{Http1, Http2};

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
    h2: H2Config,
    throughput_rounds: usize,
    throughput_round: Duration,
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
            h2: H2Config {
                connections: var("BENCH_H2_CONNECTIONS", 4)?,
                streams: var("BENCH_H2_STREAMS", 8)?,
                io_timeout: IO_TIMEOUT,
                failure_pause: Duration::from_millis(10),
                max_time: phase_cap,
            },
            throughput_rounds: var("BENCH_THROUGHPUT_ROUNDS", 5)?,
            throughput_round: Duration::from_millis(var("BENCH_THROUGHPUT_MS", 2000)?),
            warmup: Duration::from_millis(var("BENCH_WARMUP_MS", 500)?),
            gap: Duration::from_millis(var("BENCH_GAP_MS", 500)?),
            steady: Duration::from_millis(var("BENCH_STEADY_MS", 3000)?),
            latency_runs: var("BENCH_LATENCY_RUNS", 30)?,
            listeners,
            listener_runs: var("BENCH_LISTENER_RUNS", 30)?,
            phase_cap,
            sections: var(
                "BENCH_SECTIONS",
                "load,axum,throughput,latency,listeners".to_owned(),
            )?,
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
    /// The copies of `http_server` and `axum_server` in the temp dir.
    http_server: PathBuf,
    axum_server: PathBuf,
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
    let [http_server, axum_server] =
        build_examples(&bench, &tmp.path, ["http_server", "axum_server"])?;
    let ctx = Ctx {
        config,
        http_server,
        axum_server,
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
        h2: format!(
            "{} connections × {} concurrent streams",
            ctx.config.h2.connections, ctx.config.h2.streams
        ),
        load: Vec::new(),
        throughput: None,
        latency: None,
        listeners: Vec::new(),
    };
    let phases = PHASES
        .into_iter()
        .filter(|(section, ..)| ctx.config.wants(section))
        .map(|(_, group, strategy, traffic, restarts, label)| Phase {
            group,
            label,
            strategy,
            traffic,
            restarts,
        });
    for phase in phases {
        report.load.push(load_phase(&ctx, phase)?);
    }
    if ctx.config.wants("throughput") {
        report.throughput = Some(throughput(&ctx)?);
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

/// Builds the examples (a no-op when they are up to date) into the target
/// dir this benchmark was built in, with every feature (as the benchmark
/// itself, so the library is not built twice), and copies them to `dir`.
fn build_examples<const N: usize>(
    bench: &Path,
    dir: &Path,
    names: [&str; N],
) -> Result<[PathBuf; N]> {
    // This binary is <target>/<profile>/deps/upgrade-<hash>.
    let target = bench
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("unexpected location of the benchmark: {}", bench.display()))?;
    let mut args = vec!["build", "--release", "--all-features"];
    for name in names {
        args.extend(["--example", name]);
    }
    let command = format!("cargo {}", args.join(" "));
    eprintln!("{command} …");
    let output = Command::new(env!("CARGO"))
        .args(&args)
        .arg("--target-dir")
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let copy = |name: &str| {
        let (built, dest) = (target.join("release/examples").join(name), dir.join(name));
        std::fs::copy(&built, &dest)
            .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
        Ok::<_, String>(dest)
    };
    let mut copies = Vec::with_capacity(N);
    for name in names {
        copies.push(copy(name)?);
    }
    Ok(copies.try_into().expect("one copy per name"))
}

/// Sleeps until `until` or `cap`, whichever is first: pacing of the load.
fn pace(until: Instant, cap: Instant) {
    std::thread::sleep(until.min(cap).saturating_duration_since(Instant::now()));
}

/// The rows of the load table: (section, group, strategy, load, restarts,
/// label). A row is set against the steady rows (no restarts) of its group.
#[rustfmt::skip]
const PHASES: [(&str, &str, Strategy, Traffic, bool, &str); 9] = [
    ("load", HTTP, Strategy::Handoff, Http1, false, "steady, before (no restart)"),
    ("load", HTTP, Strategy::Handoff, Http1, true, "handoff (SIGHUP)"),
    ("load", HTTP, Strategy::Naive, Http1, true, "naive restart"),
    ("load", HTTP, Strategy::ReusePort, Http1, true, "SO_REUSEPORT rebind"),
    ("load", HTTP, Strategy::Handoff, Http1, false, "steady, after (no restart)"),
    ("axum", AXUM_H1, Strategy::Axum, Http1, false, "axum_server: steady, HTTP/1.1 (no restart)"),
    ("axum", AXUM_H1, Strategy::Axum, Http1, true, "axum_server: handoff (SIGHUP), HTTP/1.1"),
    ("axum", AXUM_H2, Strategy::Axum, Http2, false, "axum_server: steady, HTTP/2 (no restart)"),
    ("axum", AXUM_H2, Strategy::Axum, Http2, true, "axum_server: handoff (SIGHUP), HTTP/2"),
];
const HTTP: &str = "http_server, HTTP/1.1";
const AXUM_H1: &str = "axum_server, HTTP/1.1";
const AXUM_H2: &str = "axum_server, HTTP/2";

/// The load a phase puts on its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// The HTTP/1.1 clients of `upgrade/load.rs`.
    Http1,
    /// The HTTP/2 streams of `upgrade/h2load.rs`.
    Http2,
}

/// Either load, running.
enum Running {
    Http1(Load),
    Http2(H2Load),
}

impl Running {
    fn start(ctx: &Ctx, traffic: Traffic, addr: std::net::SocketAddr) -> Result<Running> {
        Ok(match traffic {
            Traffic::Http1 => Running::Http1(Load::start(addr, &ctx.config.load)?),
            Traffic::Http2 => Running::Http2(H2Load::start(addr, &ctx.config.h2)?),
        })
    }

    fn finish(self) -> Result<LoadStats> {
        match self {
            Running::Http1(load) => load.finish(),
            Running::Http2(load) => load.finish(),
        }
    }
}

/// One row of the load table.
struct Phase {
    /// The server and load; a row is set against the steady rows of its group.
    group: &'static str,
    label: &'static str,
    strategy: Strategy,
    traffic: Traffic,
    /// False: a steady phase (the baseline), no restart.
    restarts: bool,
}

/// Runs the load against one strategy's server, while it restarts unless
/// the phase is a steady one.
fn load_phase(ctx: &Ctx, phase: Phase) -> Result<LoadRow> {
    let config = &ctx.config;
    let label = phase.label;
    eprintln!("load: {label} …");
    let name = format!(
        "load-{:?}-{:?}-{}",
        phase.strategy,
        phase.traffic,
        if phase.restarts { "restarts" } else { "steady" }
    )
    .to_lowercase();
    let mut server = Server::start(ctx, phase.strategy, &name, 1)?;
    let started = Instant::now();
    let cap = started + config.phase_cap;
    let load = Running::start(ctx, phase.traffic, server.addr)?;
    let mut restarts = Vec::new();
    if !phase.restarts {
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
        group: phase.group,
        steady: !phase.restarts,
        restarts,
        stats,
    })
}

/// Steady throughput of `axum_server` against plain `axum::serve`, in
/// alternating rounds (see the top of this file).
fn throughput(ctx: &Ctx) -> Result<Throughput> {
    let config = &ctx.config;
    let rounds = config.throughput_rounds;
    eprintln!(
        "throughput: {} plain and {rounds} handoff rounds of {:?} …",
        rounds + 1,
        config.throughput_round
    );
    let plain = Server::start(ctx, Strategy::PlainAxum, "throughput-plain", 1)?;
    let handoff = Server::start(ctx, Strategy::Axum, "throughput-handoff", 1)?;
    // One round of load on `server`, and the CPU time the server used in it.
    let round = |server: &Server| -> Result<(LoadStats, Duration)> {
        let cpu = server.cpu_time()?;
        let load = Load::start(server.addr, &config.load)?;
        std::thread::sleep(config.throughput_round);
        let stats = load.finish()?;
        Ok((stats, server.cpu_time()?.saturating_sub(cpu)))
    };
    // Warm-up, not counted: connections, caches, the runtimes' threads.
    for server in [&plain, &handoff] {
        let load = Load::start(server.addr, &config.load)?;
        std::thread::sleep(config.warmup);
        load.finish()?;
    }
    let mut result = Throughput {
        plain: Vec::new(),
        handoff: Vec::new(),
    };
    for i in 0..2 * rounds + 1 {
        let (server, into) = if i % 2 == 0 {
            (&plain, &mut result.plain)
        } else {
            (&handoff, &mut result.handoff)
        };
        let (stats, cpu) = round(server)?;
        let round = report::Round { stats, cpu };
        eprintln!(
            "  {} round: {:.0} req/s, {:.1} µs server CPU per request, {} failed",
            if i % 2 == 0 { "plain" } else { "handoff" },
            round.stats.per_second(),
            round.cpu_per_request(),
            round.stats.failed
        );
        into.push(round);
    }
    plain.stop()?;
    handoff.stop()?;
    Ok(result)
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
