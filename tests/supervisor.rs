//! `handoff run` with a server written in Python (tests/servers/activated_server.py)
//! that knows nothing of handoff, only systemd socket activation and sd_notify.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::get;
use common::load::Load;
use common::supervised::{handoff, python_server, text, write_launcher, Supervised};
use common::{wait_exit, TempDir, DEADLINE};

#[test]
fn a_python_server_upgrades_10_times_under_load() {
    let sup = Supervised::start(&[], &[]);
    let load = Load::start(sup.addr, 2, 2);
    load.wait_for_more(50);
    let mut pids = vec![sup.wait_serving()];
    for _ in 0..10 {
        let out = sup.upgrade();
        assert!(
            out.status.success(),
            "handoff upgrade: {}",
            text(&out.stderr)
        );
        let pid: u32 = text(&out.stdout).trim().parse().expect("the new PID");
        assert!(!pids.contains(&pid));
        // The old child stops accepting once it has handled its stop signal;
        // from then on new connections reach the new child only.
        let deadline = Instant::now() + DEADLINE;
        while get(sup.addr, "/").unwrap().pid() != Some(pid) {
            assert!(
                Instant::now() < deadline,
                "new connections never reached {pid}"
            );
        }
        pids.push(pid);
        load.wait_for_more(50);
    }
    // No spurious restart: exactly 10 upgrades, and the serving child is generation 11.
    let out = handoff(&["status", "--control", &sup.control, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["upgrades_done"], 10, "{status}");
    let serving: Vec<&serde_json::Value> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "{status}");
    assert_eq!(serving[0]["generation"], 11, "{status}");
    assert_eq!(serving[0]["pid"], *pids.last().unwrap(), "{status}");
    let stats = load.stop();
    println!(
        "python under handoff run: {} ok, {} failed, {} retries",
        stats.ok, stats.failed, stats.retries
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    // Every old child drains and exits (the supervisor reaps it); the
    // supervisor keeps its PID.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let alive = sup.tag.processes();
        let old: Vec<&u32> = pids[..pids.len() - 1]
            .iter()
            .filter(|p| alive.contains(p))
            .collect();
        if old.is_empty() {
            assert!(alive.contains(&sup.supervisor.id()));
            break;
        }
        assert!(Instant::now() < deadline, "old children still run: {old:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_failing_new_child_is_reported_and_the_old_one_keeps_serving() {
    let sup = Supervised::start(&["--upgrade-timeout", "2s"], &[]);
    let serving = sup.wait_serving();
    let load = Load::start(sup.addr, 2, 2);
    load.wait_for_more(50);
    for (body, expected) in [
        (Some("exit 3"), "exited with status 3"),
        (
            Some("exec sleep 300"),
            "was not ready within 2s (it never sent READY=1",
        ),
        (None, "does not exist"),
    ] {
        match body {
            Some(body) => write_launcher(&sup.launcher, body),
            None => std::fs::remove_file(&sup.launcher).unwrap(),
        }
        let out = sup.upgrade();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(
            get(sup.addr, "/").unwrap().pid(),
            Some(serving),
            "the old child serves"
        );
        load.wait_for_more(50);
    }
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    // Nothing of the failed children is left: the supervisor and the serving child only.
    let mut alive = sup.tag.processes();
    alive.sort();
    let mut expected = vec![sup.supervisor.id(), serving];
    expected.sort();
    assert_eq!(alive, expected);
    let status = handoff(&["status", "--control", &sup.control, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["upgrades_failed"], 3);
}

#[test]
fn a_killed_child_is_restarted_and_clients_are_never_refused() {
    let sup = Supervised::start(&[], &[]);
    let first = sup.wait_serving();
    let load = Load::start(sup.addr, 2, 2);
    load.wait_for_more(50);
    common::signal(first, libc::SIGKILL);
    // Requests keep being answered, by a new child.
    let deadline = Instant::now() + DEADLINE;
    let second = loop {
        let pid = get(sup.addr, "/").expect("served while restarting").pid();
        if pid != Some(first) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no restart:\n{}", sup.log());
    };
    load.wait_for_more(50);
    let stats = load.stop();
    println!(
        "SIGKILL under load: {} ok, {} failed (connections the killed child held), restarted as {second:?}",
        stats.ok, stats.failed
    );
    let refused: Vec<&String> = stats
        .errors
        .iter()
        .filter(|e| e.contains("refused"))
        .collect();
    assert!(refused.is_empty(), "refused connections: {refused:?}");
}

#[test]
fn as_pid_1_it_reaps_orphans_and_drains_on_sigterm() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: unshare --pid needs root");
        return;
    }
    // The launcher leaves an orphan behind: a subshell starts `sleep` and
    // exits at once, so `sleep` is reparented to PID 1, the supervisor.
    let sup = Supervised::start(&[], &["unshare", "--pid", "--fork", "--kill-child"]);
    write_launcher(
        &sup.launcher,
        &format!("(sleep 0.3 &)\nexec /usr/bin/python3 {}", python_server()),
    );
    // The supervisor's host PID: unshare's child.
    let unshare = sup.supervisor.id();
    let pid1 = common::all_processes()
        .into_iter()
        .find(|p| p.ppid == unshare)
        .expect("the supervisor under unshare")
        .pid;
    let out = sup.upgrade();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The orphan appears under PID 1, exits, and must not stay a zombie.
    common::wait_orphan_reaped(pid1, "sleep");
    // SIGTERM: the child drains and exits 0, and so does the supervisor.
    common::signal(pid1, libc::SIGTERM);
    assert_eq!(wait_exit(unshare, DEADLINE), Some(Some(0)), "{}", sup.log());
}

/// A child that exits the moment it is told to stop (the library's
/// `http_server` with nothing in flight) must not be mistaken for a crash of
/// the serving child: exactly one child serves, of the expected generation.
#[test]
fn a_retired_child_that_exits_at_once_is_not_taken_for_a_crash() {
    let server = common::example_path("http_server")
        .to_string_lossy()
        .into_owned();
    let child = move |addr: SocketAddr| format!("exec {server} --listen {addr}");
    let sup = Supervised::start_child(&[], &[], Some(&child));
    for _ in 0..5 {
        let out = sup.upgrade();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = handoff(&["status", "--control", &sup.control, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let generations = status["generations"].as_array().unwrap();
    let serving: Vec<&serde_json::Value> = generations
        .iter()
        .filter(|g| g["state"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "{status}");
    assert_eq!(serving[0]["generation"], 6, "no restart happened: {status}");
    assert!(!sup.log().contains("restarting"), "{}", sup.log());
}

/// The supervisor keeps reading its notify socket while children serve, so a
/// child that sends many messages (STATUS=, WATCHDOG=1, …) never blocks.
#[test]
fn notify_messages_from_a_serving_child_never_pile_up() {
    let marker = TempDir::new("notify-spam");
    let done = marker.path().join("sent");
    let spam = format!(
        "import os, socket\n\
         a = os.environ['NOTIFY_SOCKET']\n\
         a = '\\0' + a[1:] if a.startswith('@') else a\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         for i in range(2000): s.sendto(b'STATUS=busy %d' % i, a)\n\
         open('{}', 'w').write('ok')\n",
        done.display()
    );
    let script = marker.path().join("spam.py");
    std::fs::write(&script, spam).unwrap();
    let python = python_server();
    let script_arg = script.display().to_string();
    let child = move |_addr: SocketAddr| {
        // Once serving (after READY=1), a helper in the child's group sends 2000 messages.
        format!("(sleep 0.5; /usr/bin/python3 {script_arg}) &\nexec /usr/bin/python3 {python}")
    };
    let sup = Supervised::start_child(&[], &[], Some(&child));
    let deadline = Instant::now() + DEADLINE;
    while !done.exists() {
        assert!(
            Instant::now() < deadline,
            "the child's notify messages were not read:\n{}",
            sup.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get(sup.addr, "/").is_ok(), "still serving");
}
