//! The test plays systemd's notify socket (a datagram socket with
//! `SO_PASSCRED`, so every message carries its sender's PID) and checks the
//! exact conversation across start, a good upgrade, a failed upgrade and stop:
//! who sent `MAINPID=`, and that the old process waited for the `BARRIER=1`
//! answer before it stopped.

mod common;

use common::notify::Manager;
use common::{signal, wait_exit, Options, Server, DEADLINE};

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[test]
fn the_conversation_with_systemd_across_start_upgrade_failure_and_stop() {
    let dir = common::TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let manager = Manager::bind(&socket_path);
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    options.env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    let server = Server::start_with(options);
    let first = server.first_pid;

    // Start: READY=1 with a status, from the main process.
    let i = manager.wait(0, "READY=1 at start", |m| m.has("READY=1"));
    manager.with(i, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(
            m.value("STATUS"),
            Some(format!("Serving, generation 1 (pid {first})").as_str())
        );
    });

    // A good upgrade: RELOADING=1 with a time at or after the signal, then
    // MAINPID=<successor> and READY=1 from the old main process, then a
    // barrier, and only after the answer does the old process stop.
    let before_signal = monotonic_usec();
    signal(first, libc::SIGHUP);
    let reloading = manager.wait(i + 1, "RELOADING=1", |m| m.has("RELOADING=1"));
    manager.with(reloading, |m| {
        assert_eq!(m.pid, first);
        let usec: u64 = m
            .value("MONOTONIC_USEC")
            .expect("MONOTONIC_USEC")
            .parse()
            .unwrap();
        assert!(
            usec >= before_signal,
            "MONOTONIC_USEC {usec} is before the signal ({before_signal})"
        );
    });
    // The reload ends at the commit, from the old main process, which stays
    // the main process through the probation; MAINPID= comes at its end.
    let committed = manager.wait(reloading + 1, "READY=1", |m| m.has("READY=1"));
    manager.with(committed, |m| {
        assert_eq!(m.pid, first, "the old main process ends the reload");
        assert!(
            m.value("MAINPID").is_none(),
            "no MAINPID= before the probation ends"
        );
    });
    let handover = manager.wait(committed + 1, "MAINPID=", |m| m.value("MAINPID").is_some());
    let second: u32 = manager.with(handover, |m| {
        assert_eq!(m.pid, first, "the old main process announces its successor");
        m.value("MAINPID").unwrap().parse().unwrap()
    });
    assert_ne!(second, first);
    let barrier = manager.wait(handover + 1, "BARRIER=1", |m| m.has("BARRIER=1"));
    let barrier_fd = manager.with(barrier, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(m.fds.len(), 1, "BARRIER=1 carries one fd");
        m.fds.pop().unwrap()
    });
    // Until we answer, the old process does not exit: systemd must know its
    // new main process first. (It stopped accepting at the commit.)
    server
        .events
        .wait(0, DEADLINE, "the successor to be ready", |l| {
            l.is("ready") && l.num("pid") == u64::from(second)
        });
    assert!(
        !server
            .events
            .snapshot()
            .iter()
            .any(|l| l.starts_with(&format!("exit pid={first} "))),
        "the old process exited before systemd confirmed MAINPID="
    );
    assert!(std::path::Path::new(&format!("/proc/{first}")).exists() && !common::is_zombie(first));
    drop(barrier_fd); // the answer
    server
        .events
        .wait(0, DEADLINE, "the old process to stop", |l| {
            l.is("stopping") && l.num("pid") == u64::from(first)
        });
    assert_eq!(wait_exit(first, DEADLINE), Some(Some(0)));

    // A failed upgrade still ends the reload with READY=1; STATUS= says why.
    server.replace_binary(Some(b"#!/bin/sh\nexit 1\n"), 0o755);
    signal(second, libc::SIGHUP);
    let reloading = manager.wait(barrier + 1, "RELOADING=1 (failing)", |m| {
        m.has("RELOADING=1")
    });
    let failed = manager.wait(reloading + 1, "READY=1 after the failure", |m| {
        m.has("READY=1")
    });
    manager.with(failed, |m| {
        assert_eq!(m.pid, second);
        let status = m.value("STATUS").unwrap_or_default();
        assert!(
            status.contains("last upgrade failed") && status.contains("exited with status 1"),
            "{status}"
        );
        assert!(m.value("MAINPID").is_none(), "no handover on failure");
    });
    server.restore_binary("http_server");

    // Stop: STOPPING=1, and the drain deadline announced to systemd.
    signal(second, libc::SIGTERM);
    let stopping = manager.wait(failed + 1, "STOPPING=1", |m| m.has("STOPPING=1"));
    manager.with(stopping, |m| assert_eq!(m.pid, second));
    let extend = manager.wait(stopping + 1, "EXTEND_TIMEOUT_USEC=", |m| {
        m.value("EXTEND_TIMEOUT_USEC").is_some()
    });
    manager.with(extend, |m| {
        let usec: u64 = m.value("EXTEND_TIMEOUT_USEC").unwrap().parse().unwrap();
        // http_server's default drain timeout is 30 s.
        assert!(usec >= 30_000_000, "{usec}");
    });
    assert_eq!(wait_exit(second, DEADLINE), Some(Some(0)));

    // Nothing came from anyone but the main process of the moment.
    let handover_index = handover;
    for (i, (pid, text)) in manager.all().into_iter().enumerate() {
        let main = if i <= barrier.max(handover_index) {
            first
        } else {
            second
        };
        assert_eq!(
            pid, main,
            "message {i} {text:?} from pid {pid}, but the main process was {main}"
        );
    }
}

#[test]
fn an_unreachable_notify_socket_gives_one_warning_and_serving_goes_on() {
    let dir = common::TempDir::new("notify-missing");
    let missing = dir.path().join("nobody-listens-here.sock");
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    options.env.push((
        "NOTIFY_SOCKET".into(),
        missing.to_string_lossy().into_owned(),
    ));
    let server = Server::start_with(options);
    let first = server.first_pid;
    // Start, an upgrade (RELOADING=1, MAINPID=, BARRIER=1) and more: all fail to send.
    let second = server.upgrade_ok();
    assert_eq!(
        common::http::get(server.addr(), "/").unwrap().pid(),
        Some(second)
    );
    let warnings = |pid: u32| {
        server
            .stderr_all()
            .lines()
            .filter(|l| {
                l.contains("cannot notify the service manager")
                    && l.contains(&format!("pid={pid} "))
            })
            .count()
    };
    assert_eq!(
        warnings(first),
        1,
        "one warning from the first generation:\n{}",
        server.stderr_tail()
    );
    assert_eq!(warnings(second), 0, "the successor has not tried yet");
}
