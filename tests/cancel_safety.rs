//! `Handoff::upgrade()` is cancel-safe: a caller that stops waiting (a
//! timeout around it, a `select!`) does not change the upgrade's outcome.
//! This test process is itself the first generation (the library in-process),
//! and `http_server` is its successor.

mod common;

use std::time::Duration;

use common::http::get;
use common::DEADLINE;

/// Kills the successor if the test ends early.
struct Reap(Option<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            common::signal(pid, libc::SIGKILL);
            let _ = common::wait_exit(pid, DEADLINE);
        }
    }
}

#[test]
fn dropping_the_upgrade_future_does_not_change_the_outcome() {
    common::become_subreaper();
    let successor_bin = common::example_path("http_server");
    let handoff = handoff::Handoff::builder()
        .command(
            &successor_bin,
            ["--listen", "127.0.0.1:0", "--probation", "0"],
        )
        .probation(Duration::ZERO)
        .build()
        .expect("build the first generation");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut reap = Reap(None);
    runtime.block_on(async {
        // The successor asks for "http0": the same socket, handed over.
        let listener = handoff
            .tcp_listener("http0", "127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        handoff.ready().unwrap();
        assert!(handoff.serving().await);
        let mut events = handoff.upgrade_events();
        // Give up on the upgrade at once: its future is dropped mid-flight.
        let gave_up = tokio::time::timeout(Duration::from_millis(1), handoff.upgrade()).await;
        assert!(gave_up.is_err(), "the upgrade cannot be over within 1 ms");
        let successor = tokio::time::timeout(DEADLINE, async {
            loop {
                match events.recv().await.expect("upgrade events") {
                    handoff::UpgradeEvent::Succeeded { successor } => break successor,
                    handoff::UpgradeEvent::Started { .. } => continue,
                    other => panic!("the upgrade went wrong: {other:?}"),
                }
            }
        })
        .await
        .expect("the upgrade finished although nobody waited for it");
        reap.0 = Some(successor);
        let reason = tokio::time::timeout(DEADLINE, handoff.stopping())
            .await
            .expect("this process stops accepting");
        assert_eq!(reason, handoff::StopReason::Upgraded { successor });
        // New connections go to the successor.
        let answer = tokio::task::spawn_blocking(move || get(addr, "/"))
            .await
            .unwrap()
            .expect("GET / from the successor");
        assert_eq!(answer.pid(), Some(successor));
        assert_eq!(handoff.finish().await, handoff::Finish::Exit);
    });
}
