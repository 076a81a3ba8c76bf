//! A plain Node `http` server under `handoff run` in the default `notify`
//! mode: it cannot send `READY=1` itself (no Unix datagram sockets in Node),
//! so it runs `handoff notify READY=1`, a process of its own process group.

mod common;

use std::time::{Duration, Instant};

use common::http::get;
use common::load::Load;
use common::supervised::{text, Supervised};
use common::DEADLINE;

#[test]
fn node_says_ready_through_handoff_notify_and_upgrades_under_load() {
    let node = std::path::Path::new("/usr/bin/node");
    if !node.exists() {
        eprintln!("SKIPPED: /usr/bin/node is not installed");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers/node_server.js");
    let launcher = format!(
        "HANDOFF_BIN={} exec {} {script}",
        env!("CARGO_BIN_EXE_handoff"),
        node.display()
    );
    let sup = Supervised::start_child(
        &["--upgrade-timeout", "10s"],
        &[],
        Some(&|_| launcher.clone()),
    );
    let mut serving = sup.wait_serving();
    let load = Load::start(sup.addr, 2, 2);
    load.wait_for_more(50);
    for _ in 0..5 {
        let start = Instant::now();
        let out = sup.upgrade();
        assert!(
            out.status.success(),
            "handoff upgrade: {}\n{}",
            text(&out.stderr),
            sup.log()
        );
        let new: u32 = text(&out.stdout).trim().parse().expect("the new PID");
        println!("node upgrade to {new}: {:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_secs(10));
        let deadline = Instant::now() + DEADLINE;
        while get(sup.addr, "/").ok().and_then(|r| r.pid()) == Some(serving) {
            assert!(
                Instant::now() < deadline,
                "new connections still reach {serving}"
            );
        }
        serving = new;
        load.wait_for_more(50);
    }
    let stats = load.stop();
    println!(
        "node under handoff run: {} ok, {} failed, {} retries",
        stats.ok, stats.failed, stats.retries
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}
