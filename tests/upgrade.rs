//! Upgrades of the real `http_server` example under real load on 127.0.0.1.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::http::{get, KeepAlive};
use common::load::Load;
use common::{signal, wait_exit, Line, Server, DEADLINE};

/// 8 clients (4 connecting per request, 4 keep-alive) through 20 upgrades: no
/// request fails; every upgrade moves new connections to a new PID; every old
/// generation exits with status 0.
#[test]
fn zero_failed_requests_through_20_upgrades() {
    let server = Server::start("http_server");
    let load = Load::start(server.addr(), 4, 4);
    load.wait_for_more(200);
    let pids = server.upgrade_many(20, || load.wait_for_more(100));
    let stats = load.stop();
    println!(
        "zero-drop: {} requests ok, {} failed, {} keep-alive retries, {} PIDs answered",
        stats.ok,
        stats.failed,
        stats.retries,
        stats.pids.len()
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 2000, "the load ran: {} requests", stats.ok);
    server.assert_generations(&pids, &stats.pids);
}

/// A slow request sent just before an upgrade completes, answered by the old PID.
#[test]
fn in_flight_request_survives_an_upgrade() {
    let server = Server::start("http_server");
    let old = server.first_pid;
    let addr = server.addr();
    let slow = std::thread::spawn(move || {
        let mut client = KeepAlive::new(addr);
        client.get("/sleep?ms=2000")
    });
    // Wait until the old process has the request in hand.
    server
        .events
        .wait(0, DEADLINE, "the slow request to start", |l| {
            l.is("sleeping") && l.num("pid") == u64::from(old)
        });
    let new = server.upgrade().expect("upgrade");
    let (_, stopping) = server
        .events
        .wait(0, DEADLINE, "the old process to stop", |l| {
            l.is("stopping") && l.num("pid") == u64::from(old)
        });
    assert!(
        stopping.num("connections") >= 1,
        "the slow request was in flight: {}",
        stopping.raw
    );
    let response = slow.join().unwrap().expect("the slow request completes");
    assert_eq!(response.status, 200);
    assert_eq!(response.pid(), Some(old), "answered by the old process");
    assert_eq!(
        wait_exit(old, DEADLINE),
        Some(Some(0)),
        "the old process drained and exited 0"
    );
    assert_eq!(get(addr, "/").unwrap().pid(), Some(new));
}

/// 20 SIGHUPs within 100 ms, to whichever process the PID file names: at most
/// one upgrade is in flight at any time, no request fails, and in the end
/// exactly one process serves.
#[test]
fn signal_storm_runs_one_upgrade_at_a_time() {
    let server = Server::start("http_server");
    let load = Load::start(server.addr(), 4, 4);
    load.wait_for_more(100);
    for _ in 0..20 {
        signal(server.serving_pid(), libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the storm settle: every started upgrade has an outcome, and every
    // generation that handed over has exited.
    let settled = |lines: &[Line]| {
        let count = |kind: &str| lines.iter().filter(|l| l.is(kind)).count();
        count("upgrade started") == count("upgrade succeeded") + count("upgrade failed")
            && count("upgrade succeeded") == count("exit")
    };
    server.wait_until("the storm to settle", || {
        let lines: Vec<Line> = server
            .events
            .snapshot()
            .iter()
            .map(|l| Line::parse(l))
            .collect();
        settled(&lines)
    });
    load.wait_for_more(100);
    let stats = load.stop();

    // At most one upgrade in flight. The library's log lines are written
    // synchronously by every generation to one shared stderr file, so their
    // order is causal. Two upgrades would overlap if one process started a
    // second before the first ended, or if a successor started its own before
    // it reported ready.
    let logs = server.log_lines();
    let mut running: BTreeMap<u64, bool> = BTreeMap::new();
    let mut ready: BTreeSet<u64> = BTreeSet::new();
    let mut upgrades = 0;
    for line in &logs {
        let pid = line
            .fields
            .get("pid")
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0);
        match line.kind.as_str() {
            "ready" => {
                ready.insert(pid);
            }
            "upgrade started" => {
                assert!(
                    ready.contains(&pid),
                    "pid {pid} upgraded before it was ready: {}",
                    line.raw
                );
                let was_running = running.insert(pid, true).unwrap_or(false);
                assert!(
                    !was_running,
                    "two upgrades in flight in pid {pid}: {}",
                    line.raw
                );
                upgrades += 1;
            }
            "upgrade succeeded" | "upgrade failed; still serving" => {
                running.insert(pid, false);
            }
            _ => {}
        }
    }
    let ignored = server.stderr_all().matches("SIGHUP ignored").count();
    println!(
        "storm: 20 SIGHUPs -> {upgrades} upgrades, {ignored} ignored while one was in flight; {} requests ok, {} retries",
        stats.ok, stats.retries
    );
    assert!(upgrades >= 1, "the storm triggered at least one upgrade");
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    let serving = server.serving_pid();
    assert_eq!(
        server.processes(),
        vec![serving],
        "exactly one process serves"
    );
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(serving));
}
