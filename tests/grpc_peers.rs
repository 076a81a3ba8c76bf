//! `grpc_server` through upgrades under load from gRPC clients of another
//! implementation: Python's grpcio (the C core), which retries a call that a
//! `GOAWAY` refused before the server began it, as RFC 9113 §8.7 allows.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::peers::python_with;
use common::Server;

/// The load process, killed and reaped however the test ends.
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn grpcio_clients_see_no_failed_call_through_10_upgrades() {
    let Some(python) = python_with("grpc") else {
        return;
    };
    let server = Server::start("grpc_server");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers/grpc_load.py");
    let mut load = Load(
        Command::new(python)
            .arg(script)
            .arg(server.addr().to_string())
            .arg("6")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the grpcio load"),
    );
    let mut lines = BufReader::new(load.0.stdout.take().expect("stdout")).lines();
    let started = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(started, "started", "the load starts");

    let mut pids = vec![server.serving_pid()];
    for _ in 0..10 {
        pids.push(server.upgrade_ok());
    }
    drop(load.0.stdin.take()); // the load stops and reports
    let summary = lines
        .next()
        .and_then(Result::ok)
        .expect("the load's summary line");
    println!("grpcio load through 10 upgrades: {summary}");
    let field = |key: &str| -> String {
        let start = summary.find(&format!("\"{key}\": ")).expect(key) + key.len() + 4;
        summary[start..]
            .split([',', '}'])
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let ok: u64 = field("ok").parse().expect("ok count");
    let failed: u64 = field("failed").parse().expect("failed count");
    assert_eq!(failed, 0, "failed calls: {summary}");
    assert!(ok > 1000, "the load ran: {summary}");
    let answered = pids
        .iter()
        .filter(|pid| summary.contains(&pid.to_string()))
        .count();
    assert!(
        answered >= 8,
        "calls reached most of the 11 generations ({answered}): {summary}"
    );
    assert_eq!(server.processes(), vec![*pids.last().unwrap()]);
}
