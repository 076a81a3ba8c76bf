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

/// Everything measured, and how.
pub struct Report {
    pub clients: String,
    pub load: Vec<LoadRow>,
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
        let steady: Vec<f64> = self
            .load
            .iter()
            .filter(|r| r.label.starts_with("steady"))
            .map(|r| r.stats.per_second())
            .collect();
        let steady = (!steady.is_empty()).then(|| steady.iter().sum::<f64>() / steady.len() as f64);
        println!(
            "**Requests during restarts** ({}; closed loop on 127.0.0.1)",
            self.clients
        );
        println!();
        println!("| strategy | restarts | restart → new ready (median) | requests ok | req/s | vs steady (mean) | failed | keep-alive retries |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.load {
            let rate = row.stats.per_second();
            let vs = steady.map_or("-".to_owned(), |s| format!("{:.2}x", rate / s.max(1e-9)));
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
             ready (includes the old one's drain and exit); SO_REUSEPORT, spawn → new process ready."
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
        }
        println!();
        if let Some(handoff) = self.load.iter().find(|r| r.label.starts_with("handoff")) {
            targets.push(verdict(
                &format!(
                    "handoff fails no request during {} upgrades",
                    handoff.restarts.len()
                ),
                format!("{} failed", handoff.stats.failed),
                handoff.stats.failed == 0,
            ));
        }
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
