//! Stopping: `SIGTERM` stops accepting and lets in-flight requests finish
//! (exit 0); the drain deadline cuts what is left (exit 1); a second
//! `SIGTERM` cuts at once.

mod common;

use std::time::{Duration, Instant};

use common::http::KeepAlive;
use common::{signal, wait_exit, Options, Server, DEADLINE};

fn slow_request(
    server: &Server,
    ms: u64,
) -> std::thread::JoinHandle<Result<common::http::Response, String>> {
    let addr = server.addr();
    let pid = server.first_pid;
    let handle = std::thread::spawn(move || KeepAlive::new(addr).get(&format!("/sleep?ms={ms}")));
    server
        .events
        .wait(0, DEADLINE, "the slow request to start", |l| {
            l.is("sleeping") && l.num("pid") == u64::from(pid)
        });
    handle
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_0() {
    let server = Server::start("http_server");
    let pid = server.first_pid;
    let slow = slow_request(&server, 1000);
    signal(pid, libc::SIGTERM);
    server
        .events
        .wait(0, DEADLINE, "the server to stop accepting", |l| {
            l.is("stopping")
        });
    // No longer accepting: the listener is closed (the last generation owns it).
    assert!(
        std::net::TcpStream::connect(server.addr()).is_err(),
        "still accepting after SIGTERM"
    );
    let response = slow
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!((response.status, response.pid()), (200, Some(pid)));
    assert_eq!(
        wait_exit(pid, DEADLINE),
        Some(Some(0)),
        "clean drain exits 0"
    );
    assert!(
        !server.pid_file.exists(),
        "the last generation removes its PID file"
    );
}

#[test]
fn the_drain_deadline_cuts_what_is_left_and_exits_1() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--drain-timeout")
            .arg("0.5"),
    );
    let pid = server.first_pid;
    let slow = slow_request(&server, 30_000);
    signal(pid, libc::SIGTERM);
    let (_, exit) = server
        .events
        .wait(0, DEADLINE, "the exit line", |l| l.is("exit"));
    assert_eq!(exit.num("cut"), 1, "{}", exit.raw);
    assert_eq!(
        wait_exit(pid, DEADLINE),
        Some(Some(1)),
        "a cut drain exits 1"
    );
    assert!(slow.join().unwrap().is_err(), "the cut request fails");
}

#[test]
fn a_second_sigterm_cuts_at_once() {
    let server = Server::start("http_server");
    let pid = server.first_pid;
    let slow = slow_request(&server, 30_000);
    signal(pid, libc::SIGTERM);
    server
        .events
        .wait(0, DEADLINE, "the server to stop accepting", |l| {
            l.is("stopping")
        });
    let second = Instant::now();
    signal(pid, libc::SIGTERM);
    let (_, exit) = server
        .events
        .wait(0, DEADLINE, "the exit line", |l| l.is("exit"));
    assert_eq!(exit.num("cut"), 1, "{}", exit.raw);
    assert_eq!(wait_exit(pid, DEADLINE), Some(Some(1)));
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the second SIGTERM took {took:?}, not the 30 s drain"
    );
    assert!(slow.join().unwrap().is_err());
}

/// Lame duck: with `--drain-delay 2`, `/readyz` answers 503 at once after
/// SIGTERM, requests keep succeeding for the delay, then the listener closes.
#[test]
fn a_drain_delay_reports_not_ready_keeps_serving_then_closes() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--drain-delay")
            .arg("2"),
    );
    let addr = server.addr();
    let pid = server.first_pid;
    assert_eq!(common::http::get(addr, "/readyz").unwrap().status, 200);
    assert_eq!(common::http::get(addr, "/healthz").unwrap().status, 200);
    let signalled = Instant::now();
    signal(pid, libc::SIGTERM);
    server
        .events
        .wait(0, DEADLINE, "the lame-duck line", |l| l.is("lame-duck"));
    assert_eq!(
        common::http::get(addr, "/readyz").unwrap().status,
        503,
        "not ready at once"
    );
    assert_eq!(
        common::http::get(addr, "/healthz").unwrap().status,
        200,
        "still alive"
    );
    // Keep asking until the listener closes; every answer until then is 200.
    let mut served = 0;
    let closed_after = loop {
        match common::http::get(addr, "/") {
            Ok(response) => {
                assert_eq!(response.status, 200);
                served += 1;
            }
            Err(error) => {
                // The listener closed (refused, or reset in its backlog): the
                // server says so on stdout, though our reader may see it a
                // moment after the client does.
                let failed_after = signalled.elapsed();
                server.events.wait(
                    0,
                    DEADLINE,
                    &format!("the stopping line after {error}"),
                    |l| l.is("stopping"),
                );
                break failed_after;
            }
        }
        assert!(signalled.elapsed() < DEADLINE, "the listener never closed");
    };
    println!("lame duck: {served} requests served during the delay; closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(1900),
        "closed after {closed_after:?}, before the 2 s delay"
    );
    assert!(served > 10, "requests kept succeeding during the delay");
    assert_eq!(wait_exit(pid, DEADLINE), Some(Some(0)));
}
