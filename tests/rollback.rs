//! A broken new binary never takes the service down: the upgrade fails with an
//! error naming the cause, the old process keeps serving without a single
//! failed request, nothing is left behind, and the next good upgrade works.

mod common;

use std::time::Duration;

use common::http::get;
use common::load::Load;
use common::{all_processes, wait_exit, zombie_children, Options, Server};

enum Replacement {
    /// A file with these bytes and this mode.
    File(&'static [u8], u32),
    /// The real binary, without the execute bit.
    NotExecutable,
    /// Nothing at the path.
    Missing,
}

fn roll_back(replacement: Replacement, expected_error: &str) {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--upgrade-timeout")
            .arg("2"),
    );
    let serving = server.first_pid;
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);

    match replacement {
        Replacement::File(bytes, mode) => server.replace_binary(Some(bytes), mode),
        Replacement::NotExecutable => {
            let real = std::fs::read(&server.bin).expect("read the binary");
            server.replace_binary(Some(&real), 0o644);
        }
        Replacement::Missing => server.replace_binary(None, 0),
    }
    let error = server.upgrade().expect_err("the upgrade must fail");
    assert!(
        error.contains(expected_error),
        "error {error:?} should say {expected_error:?}"
    );

    // Still serving, from the same process, and nothing left behind.
    load.wait_for_more(50);
    assert_eq!(
        server.serving_pid(),
        serving,
        "the PID file still names the old process"
    );
    assert_eq!(
        get(server.addr(), "/")
            .expect("GET / after the failure")
            .pid(),
        Some(serving)
    );
    assert_eq!(
        zombie_children(serving),
        Vec::<u32>::new(),
        "the failed child was reaped"
    );
    assert_eq!(
        server.processes(),
        vec![serving],
        "nothing the failed child started survives"
    );
    reap_orphaned_sleeps();

    // A good binary again: the next upgrade succeeds.
    server.restore_binary("http_server");
    let new = server.upgrade_ok();
    load.wait_for_more(50);
    let stats = load.stop();
    println!(
        "rollback ({expected_error}): {} requests ok, {} failed, {} retries",
        stats.ok, stats.failed, stats.retries
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert_eq!(server.processes(), vec![new]);
}

/// The grandchild of the never-ready case is reparented to this test
/// process (a subreaper) when its group is killed: reap it here.
fn reap_orphaned_sleeps() {
    let me = std::process::id();
    for process in all_processes() {
        if process.comm == "sleep" && process.ppid == me {
            wait_exit(process.pid, Duration::from_secs(5));
        }
    }
}

#[test]
fn a_successor_that_exits_1_rolls_back() {
    roll_back(
        Replacement::File(b"#!/bin/sh\nexit 1\n", 0o755),
        "exited with status 1",
    );
}

#[test]
fn a_successor_killed_by_a_signal_rolls_back() {
    roll_back(
        Replacement::File(b"#!/bin/sh\nkill -SEGV $$\n", 0o755),
        "was killed by signal SIGSEGV",
    );
}

#[test]
fn a_successor_that_never_gets_ready_is_killed_with_its_children() {
    // It also starts a grandchild: the whole process group must go.
    roll_back(
        Replacement::File(b"#!/bin/sh\nsleep 300 &\nexec sleep 300\n", 0o755),
        "was not ready within 2s; it was killed",
    );
}

#[test]
fn a_binary_without_the_execute_bit_rolls_back() {
    roll_back(
        Replacement::NotExecutable,
        "cannot be executed: Permission denied",
    );
}

#[test]
fn a_missing_binary_rolls_back() {
    roll_back(Replacement::Missing, "does not exist");
}
