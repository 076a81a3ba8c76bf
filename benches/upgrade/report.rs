//! Percentiles and the final markdown report.

use std::time::Duration;

use crate::load::LoadStats;

/// Median and p99 of a set of durations, nearest-rank (with fewer than 100
/// samples the p99 is the largest sample).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: Duration,
    pub p99: Duration,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        let rank =
            |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Some(Summary {
            median: rank(0.50),
            p99: rank(0.99),
        })
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// One row of the load table.
pub struct LoadRow {
    pub label: &'static str,
    /// The server and load: `vs steady` is against the steady rows of the group.
    pub group: &'static str,
    /// A steady phase (no restart), a baseline of its group.
    pub steady: bool,
    /// Restarts done, and the time each took until the new process was ready.
    pub restarts: Vec<Duration>,
    pub stats: LoadStats,
}

pub struct Latency {
    pub floor: Vec<Duration>,
    pub ready: Vec<Duration>,
    pub stopping: Vec<Duration>,
}

pub struct ListenerRow {
    /// `http_server`, or `bare` (the handoff mechanism alone).
    pub server: &'static str,
    pub listeners: usize,
    /// One fresh start of the first generation, spawn → ready.
    pub fresh_start: Duration,
    pub ready: Vec<Duration>,
}

/// One throughput round: what the clients saw, and the server's CPU time.
pub struct Round {
    pub stats: LoadStats,
    pub cpu: Duration,
}

impl Round {
    /// Server CPU time (all threads, user + system) per request, in µs.
    pub fn cpu_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.stats.ok.max(1) as f64
    }
}

/// Alternating rounds of the same load on plain `axum::serve` and on
/// `axum_server`: plain, handoff, plain, …, plain.
pub struct Throughput {
    pub plain: Vec<Round>,
    pub handoff: Vec<Round>,
}

impl Throughput {
    /// Each handoff round's `value` against the mean of the plain rounds
    /// either side of it.
    fn bracketed(&self, value: impl Fn(&Round) -> f64) -> Vec<f64> {
        self.handoff
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let (before, after) = (self.plain.get(i)?, self.plain.get(i + 1)?);
                let base = (value(before) + value(after)) / 2.0;
                // Nothing to compare with (no client of that kind).
                (base > 0.0).then(|| value(h) / base)
            })
            .collect()
    }
}

/// A column of the throughput table: a round's value, and how it is printed.
type Column<'a> = (&'a dyn Fn(&Round) -> f64, fn(f64) -> String);

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// Everything measured, and how.
pub struct Report {
    pub clients: String,
    /// The HTTP/2 load, in words.
    pub h2: String,
    pub load: Vec<LoadRow>,
    pub throughput: Option<Throughput>,
    pub latency: Option<Latency>,
    pub listeners: Vec<ListenerRow>,
}

/// A target's verdict line.
fn verdict(what: &str, value: String, met: bool) -> String {
    let mark = if met { "met" } else { "NOT met" };
    format!("- {what}: {value} — **{mark}**")
}

impl Report {
    pub fn print(&self) {
        let mut targets = Vec::new();
        println!();
        if !self.load.is_empty() {
            self.print_load(&mut targets);
        }
        if let Some(throughput) = &self.throughput {
            self.print_throughput(throughput, &mut targets);
        }
        if let Some(latency) = &self.latency {
            print_latency(latency, &mut targets);
        }
        if !self.listeners.is_empty() {
            self.print_listeners(&mut targets);
        }
        println!("Targets (judged on medians):");
        println!();
        for line in targets {
            println!("{line}");
        }
    }

    fn print_load(&self, targets: &mut Vec<String>) {
        // The baseline of each group: the mean rate of its steady rows.
        let steady = |group: &str| {
            let rates: Vec<f64> = self
                .load
                .iter()
                .filter(|r| r.steady && r.group == group)
                .map(|r| r.stats.per_second())
                .collect();
            (!rates.is_empty()).then(|| mean(rates.into_iter()))
        };
        let h2 = self.load.iter().any(|r| r.group.ends_with("HTTP/2"));
        println!(
            "**Requests during restarts** (HTTP/1.1: {}{}; closed loop on 127.0.0.1)",
            self.clients,
            if h2 {
                format!("; HTTP/2: {}, hyper's client, prior knowledge", self.h2)
            } else {
                String::new()
            }
        );
        println!();
        println!("| strategy | restarts | restart → new ready (median) | requests ok | req/s | vs steady (mean) | failed | retries |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.load {
            let rate = row.stats.per_second();
            let vs =
                steady(row.group).map_or("-".to_owned(), |s| format!("{:.2}x", rate / s.max(1e-9)));
            let restart = Summary::of(&row.restarts).map_or("-".to_owned(), |s| ms(s.median));
            println!(
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                row.label,
                row.restarts.len(),
                restart,
                row.stats.ok,
                rate,
                vs,
                row.stats.failed,
                row.stats.retries
            );
        }
        println!();
        println!(
            "Restart → new ready: handoff, SIGHUP → successor ready; naive, SIGTERM → new process \
             ready (includes the old one's drain and exit); SO_REUSEPORT, spawn → new process ready. \
             vs steady: against the steady rows of the same server and load. Retries: HTTP/1.1, a \
             keep-alive request resent once on a new connection because its reused connection was \
             closed before any response byte; HTTP/2, a request the server did not process (a stream \
             left out by GOAWAY, or refused), resent on a new connection."
        );
        println!();
        for row in &self.load {
            let causes = |map: &std::collections::BTreeMap<String, u64>| {
                map.iter()
                    .map(|(cause, n)| format!("{n}× {cause}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if !row.stats.failures.is_empty() {
                println!("- {} failures: {}", row.label, causes(&row.stats.failures));
            }
            if !row.stats.retry_causes.is_empty() {
                println!(
                    "- {} retries: {}",
                    row.label,
                    causes(&row.stats.retry_causes)
                );
            }
            if row.stats.connections > 0 {
                println!(
                    "- {}: {} HTTP/2 connections opened",
                    row.label, row.stats.connections
                );
            }
        }
        println!();
        for row in self.load.iter().filter(|r| r.label.contains("handoff")) {
            targets.push(verdict(
                &format!(
                    "{}: no failed request during {} upgrades",
                    row.group,
                    row.restarts.len()
                ),
                format!("{} failed", row.stats.failed),
                row.stats.failed == 0,
            ));
        }
    }

    fn print_throughput(&self, t: &Throughput, targets: &mut Vec<String>) {
        let rate = |r: &Round| r.stats.per_second();
        let (Some(round), Some(ratio)) = (
            t.plain.first().map(|r| r.stats.elapsed),
            median(&t.bracketed(rate)),
        ) else {
            return;
        };
        println!(
            "**Steady throughput: axum_server (handoff) against plain `axum::serve`** ({}; {} plain and {} handoff rounds of {:.1} s, alternating; no restart)",
            self.clients,
            t.plain.len(),
            t.handoff.len(),
            round.as_secs_f64()
        );
        println!();
        println!("| server | rounds | requests ok | req/s (mean of rounds) | new-connection req/s | keep-alive req/s | server CPU per request | failed |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        // Columns: (value of a round, how it is printed).
        let columns: [Column; 4] = [
            (&rate, |v| format!("{v:.0}")),
            (&|r| r.stats.rate(r.stats.ok_new_connection), |v| {
                format!("{v:.0}")
            }),
            (&|r| r.stats.rate(r.stats.ok_keep_alive), |v| {
                format!("{v:.0}")
            }),
            (&Round::cpu_per_request, |v| format!("{v:.1} µs")),
        ];
        for (name, rounds, handoff) in [
            ("plain `axum::serve`", &t.plain, false),
            ("axum_server (`Serve::axum`, handoff)", &t.handoff, true),
        ] {
            let cells: Vec<String> = columns
                .iter()
                .map(|(value, show)| {
                    let mean = mean(rounds.iter().map(value));
                    let vs = match handoff {
                        true => median(&t.bracketed(value))
                            .map_or("-".to_owned(), |r| format!("{r:.3}x")),
                        false => "1.00x".to_owned(),
                    };
                    format!("{} ({vs})", show(mean))
                })
                .collect();
            println!(
                "| {name} | {} | {} | {} | {} |",
                rounds.len(),
                rounds.iter().map(|r| r.stats.ok).sum::<u64>(),
                cells.join(" | "),
                rounds.iter().map(|r| r.stats.failed).sum::<u64>(),
            );
        }
        println!();
        let each = t
            .bracketed(rate)
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "In brackets, handoff against plain: the median over handoff rounds of each round against \
             the mean of the plain rounds before and after it (cancels a linear drift of the machine). \
             req/s per round: {each}. Server CPU: user + system time of the server process, all its \
             threads, per request answered (below 1.00x: handoff spends less)."
        );
        println!();
        targets.push(verdict(
            "axum_server steady throughput ≥ 0.99x plain `axum::serve`",
            format!("{ratio:.3}x"),
            ratio >= 0.99,
        ));
    }

    fn print_listeners(&self, targets: &mut Vec<String>) {
        let runs = self.listeners.first().map_or(0, |r| r.ready.len());
        println!("**Upgrade latency by number of listeners** (SIGHUP → successor `ready`, {runs} upgrades each, idle)");
        println!();
        println!("| server | listeners | median | p99 | vs fewest listeners (median / p99) | first start, spawn → ready |");
        println!("|---|---:|---:|---:|---:|---:|");
        let mut servers: Vec<&str> = self.listeners.iter().map(|r| r.server).collect();
        servers.dedup();
        for server in servers {
            let rows: Vec<&ListenerRow> = self
                .listeners
                .iter()
                .filter(|r| r.server == server)
                .collect();
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                continue;
            };
            let Some(base) = Summary::of(&first.ready) else {
                continue;
            };
            for row in &rows {
                let Some(s) = Summary::of(&row.ready) else {
                    continue;
                };
                println!(
                    "| {server} | {} | {} | {} | {:.2}x / {:.2}x | {} |",
                    row.listeners,
                    ms(s.median),
                    ms(s.p99),
                    ratio(s.median, base.median),
                    ratio(s.p99, base.p99),
                    ms(row.fresh_start)
                );
            }
            if let Some(s) = Summary::of(&last.ready) {
                let r = ratio(s.median, base.median);
                targets.push(verdict(
                    &format!(
                        "{server}: upgrade with {} listeners ≤ 2x the {}-listener upgrade",
                        last.listeners, first.listeners
                    ),
                    format!("{r:.2}x"),
                    r <= 2.0,
                ));
            }
        }
        println!();
        println!("`http_server` registers each listener with tokio and runs an accept task per listener; `bare` only claims them (the handoff mechanism alone).");
        println!();
    }
}

fn print_latency(latency: &Latency, targets: &mut Vec<String>) {
    let (Some(floor), Some(ready), Some(stopping)) = (
        Summary::of(&latency.floor),
        Summary::of(&latency.ready),
        Summary::of(&latency.stopping),
    ) else {
        return;
    };
    println!(
        "**Upgrade latency** ({} upgrades, interleaved with {} fresh starts, idle server, 1 listener)",
        latency.ready.len(),
        latency.floor.len()
    );
    println!();
    println!("| measurement | median | p99 | vs exec floor (median / p99) |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, s: Summary| {
        println!(
            "| {name} | {} | {} | {:.2}x / {:.2}x |",
            ms(s.median),
            ms(s.p99),
            ratio(s.median, floor.median),
            ratio(s.p99, floor.p99)
        );
    };
    row("exec floor: spawn → `ready` (fresh start)", floor);
    row("handoff: SIGHUP → successor `ready`", ready);
    row(
        "handoff: SIGHUP → old stops accepting (`stopping`)",
        stopping,
    );
    println!();
    for (what, s) in [
        ("SIGHUP → successor ready", ready),
        ("SIGHUP → old stops accepting", stopping),
    ] {
        let r = ratio(s.median, floor.median);
        targets.push(verdict(
            &format!("{what} ≤ 1.5x the exec floor"),
            format!("{r:.2}x"),
            r <= 1.5,
        ));
    }
}
