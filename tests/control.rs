//! `handoff upgrade` and `handoff status` against the library-based
//! `http_server`, and the control socket's defences: another uid is refused;
//! garbage, oversized and half-written requests get errors while serving goes on.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::http::get;
use common::load::Load;
use common::{Options, Server};

fn handoff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(args)
        .output()
        .expect("run handoff")
}

/// `http_server` with a control socket in a directory it creates (0700).
fn with_control() -> (Server, common::TempDir, PathBuf) {
    let dir = common::TempDir::new("control-dir");
    let control = dir.path().join("run").join("control.sock");
    let options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--control")
        .arg(control.to_string_lossy().into_owned());
    (Server::start_with(options), dir, control)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn upgrade_and_status_against_the_library_server() {
    let (server, _dir, control) = with_control();
    let control_arg = control.to_string_lossy().into_owned();
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the socket is private"
    );
    assert_eq!(
        std::fs::metadata(control.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);
    for _ in 0..3 {
        let old = server.serving_pid();
        let out = handoff(&["upgrade", "--control", &control_arg]);
        assert!(
            out.status.success(),
            "handoff upgrade: {}",
            text(&out.stderr)
        );
        let new: u32 = text(&out.stdout)
            .trim()
            .parse()
            .expect("it prints the new PID");
        assert_ne!(new, old);
        assert_eq!(server.serving_pid(), new, "the PID file agrees");
        assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(new));
        load.wait_for_more(50);
    }
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);

    let out = handoff(&["status", "--control", &control_arg, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    let serving = server.serving_pid();
    assert_eq!(status["pid"], serving);
    assert_eq!(status["generations"][0]["pid"], serving);
    assert_eq!(status["generations"][0]["generation"], 4);
    assert_eq!(status["generations"][0]["state"], "serving");
    let listeners = status["generations"][0]["listeners"].as_array().unwrap();
    assert!(listeners.iter().any(|l| l == "http0"), "{status}");
    let human = handoff(&["status", "--control", &control_arg]);
    assert!(
        text(&human.stdout).contains("serving"),
        "{}",
        text(&human.stdout)
    );

    // A failed upgrade: exit 1 with the reason; the server keeps serving.
    server.replace_binary(Some(b"#!/bin/sh\nexit 1\n"), 0o755);
    let out = handoff(&["upgrade", "--control", &control_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exited with status 1"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(serving));
    let out = handoff(&["status", "--control", &control_arg, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["upgrades_failed"], 1);
    assert_eq!(
        status["upgrades_done"], 3,
        "the lineage's upgrades: {status}"
    );
    assert!(status["last_failure"]
        .as_str()
        .unwrap()
        .contains("exited with status 1"));
    server.restore_binary("http_server");

    // Nobody there: exit 2.
    let out = handoff(&["status", "--control", "/nonexistent/handoff-test.sock"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Sends raw bytes and returns the reply's `error` text.
fn raw(control: &Path, bytes: &[u8], close_after: bool) -> String {
    let mut stream = UnixStream::connect(control).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = stream.write_all(bytes);
    if close_after {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("a reply");
    let reply: serde_json::Value = serde_json::from_str(&answer).expect("a JSON reply");
    assert_eq!(reply["ok"], false, "{answer}");
    reply["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn the_control_socket_refuses_strangers_and_garbage_while_serving_goes_on() {
    let (server, _dir, control) = with_control();
    let control_arg = control.to_string_lossy().into_owned();
    let load = Load::start(server.addr(), 2, 2);
    load.wait_for_more(50);

    for (bytes, close_after, expected) in [
        (&b"hello\n"[..], false, "malformed request"),
        (
            &b"{\"version\":9,\"command\":\"status\"}\n"[..],
            false,
            "unsupported protocol version 9",
        ),
        (
            &b"{\"version\":1,\"command\":\"format-disk\"}\n"[..],
            false,
            "malformed request",
        ),
        (&[b'{'; 10_000][..], false, "larger than 4096 bytes"),
        (&b"{\"version\":1,\"comm"[..], true, "incomplete request"),
        // Half-written and then silent: answered when the request time is up.
        (&b"{\"version\":1,\"comm"[..], false, "no newline within"),
    ] {
        let error = raw(&control, bytes, close_after);
        assert!(
            error.contains(expected),
            "{:?}: {error}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
    }

    // Another uid: the 0600 socket in a 0700 directory keeps it out…
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["status", "--control", &control_arg])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run handoff as nobody");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out.stderr)
        );
        // …and with the permissions opened up, the server itself refuses the uid.
        std::fs::set_permissions(
            control.parent().unwrap(),
            std::fs::Permissions::from_mode(0o711),
        )
        .unwrap();
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
            .args(["upgrade", "--control", &control_arg])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run handoff as nobody");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("refused: uid 65534"),
            "{}",
            text(&out.stderr)
        );
    } else {
        eprintln!("SKIPPED (part): running as another uid needs root");
    }

    // Serving went on, from the same process, and the control socket still works.
    let first = server.first_pid;
    assert_eq!(get(server.addr(), "/").unwrap().pid(), Some(first));
    let out = handoff(&["status", "--control", &control_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}
