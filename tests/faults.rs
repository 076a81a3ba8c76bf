//! Faults of the upgrade path, as an operator hits them, under real load:
//! a new version that crashes right after saying ready, an old process
//! killed mid-upgrade, a new version that fails after claiming a Unix
//! socket. None of them may cost service.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::http::get;
use common::load::Load;
use common::{signal, wait_exit, Options, Server, DEADLINE};

/// Makes the next upgrade run the real binary with `HANDOFF_DEMO_FAULT=fault`
/// (a shell script that `exec`s it, so the PID and the fds stay the same).
fn inject(server: &Server, fault: &str) {
    let real = server.dir.path().join("real-http_server");
    fs::copy(common::example_path("http_server"), &real).expect("copy the binary");
    let script = format!(
        "#!/bin/sh\nHANDOFF_DEMO_FAULT='{fault}' exec '{}' \"$@\"\n",
        real.display()
    );
    server.replace_binary(Some(script.as_bytes()), 0o755);
}

fn refusals(errors: &[String]) -> usize {
    errors.iter().filter(|e| e.contains("refused")).count()
}

#[test]
fn a_successor_that_crashes_after_ready_is_taken_back_under_load() {
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--probation")
            .arg("5"),
    );
    let old = server.first_pid;
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);
    inject(&server, "abort-after-ready=30");
    let from = server.events.len();
    let successor = server.upgrade().expect("the upgrade itself succeeds");
    let (_, rolled) = server.events.wait(from, DEADLINE, "the take-back", |l| {
        l.is("upgrade rolled-back") && l.num("pid") == u64::from(old)
    });
    assert_eq!(rolled.num("successor"), u64::from(successor));
    assert!(rolled.get("reason").contains("SIGABRT"), "{}", rolled.raw);
    server
        .events
        .wait(from, DEADLINE, "the old process to resume", |l| {
            l.is("resumed") && l.num("pid") == u64::from(old)
        });
    let during = load.stop();

    // After the take-back: the old process serves everything, alone.
    let after = Load::start(server.addr(), 2, 2);
    after.wait_for_more(200);
    let after = after.stop();
    println!(
        "take-back: {} ok / {} failed during the crash (errors {:?}); {} ok / {} failed after",
        during.ok, during.failed, during.errors, after.ok, after.failed
    );
    assert_eq!(
        refusals(&during.errors),
        0,
        "the listening socket never closed: nothing refused"
    );
    assert_eq!(after.failed, 0, "after the take-back: {:?}", after.errors);
    assert_eq!(after.pids.iter().copied().collect::<Vec<_>>(), vec![old]);
    assert_eq!(
        server.serving_pid(),
        old,
        "the PID file names the old process again"
    );
    assert!(
        server.stderr_all().contains("took the sockets back"),
        "the take-back is logged as an error"
    );
    // It can upgrade again, to a good binary this time.
    server.restore_binary("http_server");
    let new = server.upgrade_ok();
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(new));
}

#[test]
fn a_successor_whose_parent_is_killed_mid_upgrade_serves_alone() {
    let server = Server::start("http_server");
    let old = server.first_pid;
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);
    inject(&server, "slow-ready=1500");
    let from = server.events.len();
    signal(old, libc::SIGHUP);
    server
        .events
        .wait(from, DEADLINE, "the upgrade to start", |l| {
            l.is("upgrade started") && l.num("pid") == u64::from(old)
        });
    let (_, listening) = server
        .events
        .wait(from, DEADLINE, "the successor to listen", |l| {
            l.is("listening") && l.num("pid") != u64::from(old)
        });
    let successor = listening.num("pid") as u32;
    // The OOM killer takes the old process while its successor starts.
    signal(old, libc::SIGKILL);
    assert!(wait_exit(old, DEADLINE).is_some(), "the old process died");
    server
        .events
        .wait(from, DEADLINE, "the successor to be ready", |l| {
            l.is("ready") && l.num("pid") == u64::from(successor)
        });
    load.wait_for_more(100);
    let stats = load.stop();
    println!(
        "parent killed: {} ok, {} failed ({:?})",
        stats.ok, stats.failed, stats.errors
    );
    assert_eq!(
        refusals(&stats.errors),
        0,
        "nothing refused: {:?}",
        stats.errors
    );
    assert_eq!(
        server.serving_pid(),
        successor,
        "the PID file names the successor"
    );
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(successor));
    assert!(server.stderr_all().contains("serving alone"));
    // It is a full server: it upgrades later.
    server.restore_binary("http_server");
    let next = server.upgrade_ok();
    assert_ne!(next, successor);
}

#[test]
fn a_successor_that_fails_at_start_up_leaves_the_unix_socket_path() {
    let dir = common::TempDir::new("control-path");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let control = dir.path().join("control.sock");
    let server = Server::start_with(
        Options::new("http_server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--control")
            .arg(control.to_str().unwrap()),
    );
    inject(&server, "exit-before-ready");
    let error = server.upgrade().expect_err("the successor exits 3");
    assert!(error.contains("status 3"), "{error}");
    assert!(
        control.exists(),
        "the failed successor must not remove its predecessor's socket path"
    );
    // The control socket still answers, from the old process.
    std::os::unix::net::UnixStream::connect(&control).expect("connect to the control socket");
    assert_eq!(
        get(server.addr(), "/").unwrap().pid(),
        Some(server.first_pid)
    );
}
