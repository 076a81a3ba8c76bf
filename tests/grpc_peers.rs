//! `grpc_server` through upgrades under load from gRPC clients of another
//! implementation: Python's grpcio (the C core), which retries a call that a
//! `GOAWAY` refused before the server began it, as RFC 9113 §8.7 allows.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::peers::python_with;
use common::{KillOnDrop, Server};

#[test]
fn grpcio_clients_see_no_failed_call_through_10_upgrades() {
    let Some(python) = python_with("grpc") else {
        return;
    };
    let server = Server::start("grpc_server");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers/grpc_load.py");
    let mut load = KillOnDrop(
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
    let stats: serde_json::Value = serde_json::from_str(&summary).expect("the summary is JSON");
    let ok = stats["ok"].as_u64().expect("ok count");
    let failed = stats["failed"].as_u64().expect("failed count");
    assert_eq!(failed, 0, "failed calls: {summary}");
    assert!(ok > 1000, "the load ran: {summary}");
    let answered: std::collections::BTreeSet<u32> = stats["pids"]
        .as_array()
        .expect("the answering pids")
        .iter()
        .filter_map(|pid| u32::try_from(pid.as_u64()?).ok())
        .collect();
    server.assert_generations(&pids, &answered);
    assert!(
        answered.len() >= 8,
        "calls reached most of the 11 generations ({answered:?}): {summary}"
    );
}
