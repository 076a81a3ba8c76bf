//! The `ordered_shutdown` example: stages close in order (HTTP, then the
//! workers, then the store), in-flight work finishes, nothing queued is lost,
//! a second SIGTERM forces the exit, the overall deadline is enforced, and the
//! old process runs the same sequence after an upgrade.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::{get, KeepAlive};
use common::{signal, wait_exit, Line, Options, Server, TempDir, DEADLINE};

fn start(extra: &[&str]) -> (Server, TempDir, PathBuf) {
    let dir = TempDir::new("ordered");
    let store = dir.path().join("store");
    let mut options = Options::new("ordered_shutdown")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--store")
        .arg(store.to_string_lossy().into_owned());
    for arg in extra {
        options = options.arg(*arg);
    }
    (Server::start_with(options), dir, store)
}

/// Every event line up to the `exit` line of `pid` (the process has exited,
/// but the reader thread may not have read all it printed yet).
fn lines_until_exit(server: &Server, pid: u32) -> Vec<Line> {
    server.events.wait(0, DEADLINE, "the exit line", |l| {
        l.is("exit") && l.num("pid") == u64::from(pid)
    });
    server
        .events
        .snapshot()
        .iter()
        .map(|l| Line::parse(l))
        .collect()
}

fn position(lines: &[Line], what: impl Fn(&Line) -> bool) -> usize {
    lines.iter().position(what).expect("the line is there")
}

#[test]
fn stages_close_in_order_work_in_flight_finishes_and_nothing_is_lost() {
    let (server, _dir, store) = start(&["--workers", "1"]);
    let (addr, pid) = (server.addr(), server.first_pid);
    assert_eq!(get(addr, "/job?ms=1500").unwrap().body, "queued id=1\n");
    server.events.wait(0, DEADLINE, "job 1 to start", |l| {
        l.is("job started") && l.get("id") == "1"
    });
    // The only worker is busy: job 2 waits in the queue.
    assert_eq!(get(addr, "/job?ms=10").unwrap().body, "queued id=2\n");
    let slow = std::thread::spawn(move || KeepAlive::new(addr).get("/sleep?ms=1000"));
    server
        .events
        .wait(0, DEADLINE, "the slow request", |l| l.is("sleeping"));
    signal(pid, libc::SIGTERM);

    let response = slow
        .join()
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!(response.status, 200);
    assert_eq!(
        wait_exit(pid, DEADLINE),
        Some(Some(0)),
        "every component closed"
    );
    let lines = lines_until_exit(&server, pid);
    let http = position(&lines, |l| l.is("shutdown") && l.get("stage") == "http");
    let workers = position(&lines, |l| l.is("shutdown") && l.get("stage") == "workers");
    let store_closed = position(&lines, |l| l.is("shutdown") && l.get("stage") == "store");
    assert!(http < workers && workers < store_closed, "stage order");
    let job_done = position(&lines, |l| l.is("job done") && l.get("id") == "1");
    let flushed = position(&lines, |l| l.is("store flushed"));
    assert!(
        job_done < flushed,
        "the store is flushed after the job finished"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.is("job started") && l.get("id") == "2"),
        "no new job taken"
    );
    for l in lines.iter().filter(|l| l.is("shutdown")) {
        assert_eq!(l.get("outcome"), "closed", "{}", l.raw);
    }
    let stored = std::fs::read_to_string(&store).unwrap();
    assert!(stored.contains(&format!("done id=1 pid={pid}")), "{stored}");
    assert!(
        stored.contains("pending id=2 ms=10"),
        "the queued job is kept: {stored}"
    );
}

/// A server with one worker, busy on a 30 s job; returns its PID too.
fn busy(extra: &[&str]) -> (Server, TempDir, u32) {
    let (server, dir, _store) = start(extra);
    get(server.addr(), "/job?ms=30000").unwrap();
    server
        .events
        .wait(0, DEADLINE, "the long job to start", |l| {
            l.is("job started")
        });
    let pid = server.first_pid;
    (server, dir, pid)
}

#[test]
fn a_second_sigterm_exits_within_a_second() {
    let (server, _dir, pid) = busy(&["--workers", "1"]);
    signal(pid, libc::SIGTERM);
    server
        .events
        .wait(0, DEADLINE, "the shutdown to begin", |l| l.is("stopping"));
    let second = Instant::now();
    signal(pid, libc::SIGTERM);
    assert_eq!(
        wait_exit(pid, DEADLINE),
        Some(Some(2)),
        "forced: exit status 2"
    );
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the second SIGTERM took {took:?}"
    );
    let (_, exit) = server
        .events
        .wait(0, DEADLINE, "the exit line", |l| l.is("exit"));
    assert!(exit.get("late").contains("workers"), "{}", exit.raw);
}

#[test]
fn the_overall_deadline_forces_exit_and_names_the_late() {
    let (server, _dir, pid) = busy(&["--workers", "1", "--overall-timeout", "1"]);
    let signalled = Instant::now();
    signal(pid, libc::SIGTERM);
    assert_eq!(wait_exit(pid, DEADLINE), Some(Some(2)));
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "ended at the overall deadline"
    );
    let (_, exit) = server
        .events
        .wait(0, DEADLINE, "the exit line", |l| l.is("exit"));
    assert_eq!(exit.get("late"), "workers,store", "{}", exit.raw);
}

#[test]
fn after_an_upgrade_the_old_process_closes_every_component() {
    let (server, _dir, _store) = start(&[]);
    let old = server.first_pid;
    get(server.addr(), "/job?ms=200").unwrap();
    let new = server.upgrade_ok(); // also checks the old process exited 0
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(new));
    let reports: Vec<Line> = lines_until_exit(&server, old)
        .into_iter()
        .filter(|l| l.is("shutdown") && l.num("pid") == u64::from(old))
        .collect();
    let components: Vec<&str> = reports.iter().map(|l| l.get("component")).collect();
    assert_eq!(components, ["connections", "workers", "store"]);
    for l in &reports {
        assert_eq!(l.get("outcome"), "closed", "{}", l.raw);
    }
}
