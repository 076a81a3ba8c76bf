//! `handoff run` in control through faults: a crash loop never blocks
//! `status`, `upgrade` or `SIGTERM`; restarts are bounded and a missing
//! binary is missing however it was named; the serving child killed in the
//! middle of an upgrade leaves no generation behind.

mod common;

use std::time::{Duration, Instant};

use common::http::get;
use common::supervised::{handoff, python_server, text, write_launcher, Supervised};
use common::{signal, wait_exit, KillOnDrop, DEADLINE};

/// `handoff status --json`, parsed, and how long the answer took.
fn status(sup: &Supervised) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    let out = handoff(&["status", "--control", &sup.control, "--json"]);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "handoff status: {}\n{}",
        text(&out.stderr),
        sup.log()
    );
    let value = serde_json::from_slice(&out.stdout).expect("status JSON");
    (value, took)
}

/// Waits (with the deadline) until `condition` holds on a fresh status.
fn wait_status(
    sup: &Supervised,
    what: &str,
    condition: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if std::path::Path::new(&sup.control).exists() {
            let (value, _) = status(sup);
            if condition(&value) {
                return value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            sup.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serving_pids(status: &serde_json::Value) -> Vec<u64> {
    status["generations"]
        .as_array()
        .map(|gens| {
            gens.iter()
                .filter(|g| g["state"] == "serving")
                .filter_map(|g| g["pid"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_crash_loop_never_blocks_status_upgrade_or_sigterm() {
    let sup = Supervised::spawn_child(
        &["--max-restarts", "1000", "--drain-timeout", "2s"],
        &|_| "echo 'bad config' >&2\nexit 3".to_owned(),
    );
    // The crash loop is under way: status answers, with what is going on.
    let looping = wait_status(&sup, "a restart to be counted", |s| {
        s["restarts"].as_u64() >= Some(2)
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let (value, took) = status(&sup);
        slowest = slowest.max(took);
        assert!(serving_pids(&value).is_empty(), "nothing serves: {value}");
    }
    let last_error = looping["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "crash loop: {} restarts, next try in {:?} s, last error {last_error:?}; slowest of 10 `handoff status`: {slowest:?}",
        looping["restarts"], looping["next_restart_in_secs"]
    );
    assert!(
        last_error.contains("exited with status 3 before it was ready"),
        "{looping}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "status answered in {slowest:?}"
    );
    let human = handoff(&["status", "--control", &sup.control]);
    assert!(
        text(&human.stdout).contains("last error: "),
        "{}",
        text(&human.stdout)
    );

    // The fix is deployed by an upgrade, which starts a new child at once.
    write_launcher(
        &sup.launcher,
        &format!("exec /usr/bin/python3 {}", python_server()),
    );
    let out = sup.upgrade();
    assert!(
        out.status.success(),
        "upgrade during a crash loop: {}\n{}",
        text(&out.stderr),
        sup.log()
    );
    let fixed: u32 = text(&out.stdout).trim().parse().expect("the new PID");
    assert_eq!(get(sup.addr, "/").expect("GET /").pid(), Some(fixed));

    // Broken again and the serving child dies: a new crash loop, and
    // SIGTERM still stops everything within the drain timeout.
    write_launcher(&sup.launcher, "exit 3");
    signal(fixed, libc::SIGKILL);
    wait_status(&sup, "the new crash loop", |s| {
        serving_pids(s).is_empty() && s["restarts"].as_u64() >= Some(1)
    });
    let stop = Instant::now();
    signal(sup.supervisor.id(), libc::SIGTERM);
    let code = wait_exit(sup.supervisor.id(), Duration::from_secs(10));
    println!(
        "SIGTERM during a crash loop: exit {code:?} after {:?}",
        stop.elapsed()
    );
    assert!(
        code.is_some(),
        "the supervisor ignored SIGTERM\n{}",
        sup.log()
    );
    assert!(
        stop.elapsed() < Duration::from_secs(4),
        "stopped in {:?}",
        stop.elapsed()
    );
}

/// Runs `handoff run -- COMMAND` with a start limit of 3 and returns its
/// exit status and log once it gave up.
fn gives_up(command: &str) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let sup = Supervised::spawn_command(
        &["--max-restarts", "3", "--restart-window", "60s"],
        &[command],
    );
    let code = wait_exit(sup.supervisor.id(), DEADLINE)
        .unwrap_or_else(|| panic!("`-- {command}` was retried forever\n{}", sup.log()));
    (code, sup.log(), start.elapsed())
}

#[test]
fn a_missing_binary_gives_up_after_the_start_limit_however_it_was_named() {
    for command in ["./no-such-server", "no-such-server-in-path"] {
        let (code, log, took) = gives_up(command);
        let last = log.lines().last().unwrap_or_default().to_owned();
        println!("`-- {command}`: exit {code:?} after {took:?}: {last}");
        assert_eq!(code, Some(2), "exit status for `-- {command}`\n{log}");
        assert!(last.contains("giving up after 3 restarts"), "{last}");
        assert!(
            last.contains("no-such-server"),
            "the error names the binary: {last}"
        );
    }
}

#[test]
fn the_serving_child_killed_mid_upgrade_leaves_no_generation_behind() {
    let sup = Supervised::start(&["--drain-timeout", "5s"], &[]);
    let first = sup.wait_serving();
    // The next version takes a second to get ready.
    write_launcher(
        &sup.launcher,
        &format!("sleep 1\nexec /usr/bin/python3 {}", python_server()),
    );
    let upgrade = std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["upgrade", "--control", &sup.control, "--timeout", "30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start handoff upgrade");
    wait_status(&sup, "the new child to be starting", |s| {
        s["generations"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["state"] == "starting"))
    });
    signal(first, libc::SIGKILL);
    let out = upgrade.wait_with_output().expect("handoff upgrade");
    assert!(
        out.status.success(),
        "the upgrade still succeeds: {}\n{}",
        text(&out.stderr),
        sup.log()
    );
    let second: u32 = text(&out.stdout).trim().parse().expect("the new PID");
    assert_eq!(get(sup.addr, "/").expect("GET /").pid(), Some(second));

    // Two more upgrades: exactly one generation serves after each, and
    // every other child is gone.
    write_launcher(
        &sup.launcher,
        &format!("exec /usr/bin/python3 {}", python_server()),
    );
    let mut serving = second;
    for _ in 0..2 {
        let out = sup.upgrade();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serving = text(&out.stdout).trim().parse().expect("the new PID");
    }
    let settled = wait_status(&sup, "one generation left", |s| {
        s["generations"].as_array().is_some_and(|g| g.len() == 1)
    });
    println!("after the kill mid-upgrade and 2 more upgrades: {settled}");
    assert_eq!(serving_pids(&settled), vec![u64::from(serving)]);
    let alive = sup.tag.processes();
    assert_eq!(
        alive.len(),
        2,
        "the supervisor and one child: {alive:?}\n{}",
        sup.log()
    );
}

#[test]
fn a_killed_supervisor_leaves_no_orphan_and_a_new_one_takes_the_port() {
    let sup = Supervised::start(&[], &[]);
    let child = sup.wait_serving();
    signal(sup.supervisor.id(), libc::SIGKILL);
    assert!(
        wait_exit(sup.supervisor.id(), DEADLINE).is_some(),
        "the supervisor died"
    );
    // The orphan was told (its parent-death signal is the stop signal): it
    // drains and exits instead of holding the port.
    let exited = wait_exit(child, DEADLINE);
    println!("orphaned child {child} after SIGKILL of its supervisor: exit {exited:?}");
    assert!(
        exited.is_some(),
        "child {child} still runs without its supervisor"
    );

    // A new supervisor on the same port and control path (the old one left
    // its socket file behind) starts and serves.
    let listen = format!("http0=tcp://{}", sup.addr);
    let launcher = sup.launcher.to_string_lossy().into_owned();
    let log = std::fs::File::create(sup.dir.path().join("second.log")).expect("log");
    let second = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
            .args([
                "run",
                "--listen",
                &listen,
                "--control",
                &sup.control,
                "--",
                &launcher,
            ])
            .env("TEST_SERVER_TAG", sup.tag.value())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a second handoff run"),
    );
    let deadline = Instant::now() + DEADLINE;
    let pid = loop {
        if let Some(pid) = get(sup.addr, "/").ok().and_then(|r| r.pid()) {
            break pid;
        }
        let second_log =
            std::fs::read_to_string(sup.dir.path().join("second.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "the second supervisor never served:\n{second_log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(pid, child);
    let out = handoff(&["status", "--control", &sup.control]);
    assert!(
        out.status.success(),
        "status on the reused control path: {}",
        text(&out.stderr)
    );
    drop(second);
}

#[test]
fn a_stop_that_went_as_asked_is_exit_0_even_when_the_child_dies_of_the_signal() {
    // `sleep` has no SIGTERM handler: it dies of the signal, as uvicorn and
    // a plain Node server do.
    let sup = Supervised::spawn_child(&["--ready", "delay=100ms"], &|_| {
        "exec sleep 600".to_owned()
    });
    wait_status(&sup, "the child to serve", |s| !serving_pids(s).is_empty());
    signal(sup.supervisor.id(), libc::SIGTERM);
    let code = wait_exit(sup.supervisor.id(), DEADLINE);
    assert_eq!(
        code,
        Some(Some(0)),
        "exit status of handoff run\n{}",
        sup.log()
    );
}

/// gunicorn (no `--preload`) under `handoff run --min-uptime 3s`, serving
/// `app` from tests/servers.
fn gunicorn(app: &str) -> Option<String> {
    let gunicorn = common::peers::exec_module("gunicorn")?;
    let servers = common::peers::SERVERS;
    Some(format!(
        "{gunicorn} --chdir {servers} --workers 2 --graceful-timeout 5 {app}"
    ))
}

#[test]
fn with_min_uptime_a_gunicorn_whose_app_fails_to_import_is_a_failed_upgrade() {
    let (Some(good), Some(broken)) = (gunicorn("wsgi_app:app"), gunicorn("broken_app:app")) else {
        return;
    };
    let sup = Supervised::start_child(&["--min-uptime", "3s"], &[], Some(&|_| good.clone()));
    let old = sup.wait_serving();

    // gunicorn's arbiter says READY=1, then its workers fail to import the
    // app and it exits: within the minimum uptime, so the upgrade fails.
    write_launcher(&sup.launcher, &broken);
    let out = sup.upgrade();
    let error = text(&out.stderr);
    println!(
        "broken deploy: handoff upgrade exit {:?}: {}",
        out.status.code(),
        error.trim()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the upgrade failed\n{}",
        sup.log()
    );
    assert!(error.contains("--min-uptime"), "{error}");
    let (after, _) = status(&sup);
    assert_eq!(after["upgrades_failed"], 1, "{after}");
    assert_eq!(after["upgrades_done"], 0, "{after}");
    let served = get(sup.addr, "/");
    assert!(
        served.is_ok(),
        "the old gunicorn serves on: {served:?}\n{}",
        sup.log()
    );

    // A good deploy takes over once it has lived the minimum uptime.
    write_launcher(&sup.launcher, &good);
    let start = Instant::now();
    let out = sup.upgrade();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), sup.log());
    println!("good deploy: took over after {:?}", start.elapsed());
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "not before --min-uptime"
    );
    let (after, _) = status(&sup);
    assert_eq!(after["upgrades_done"], 1, "{after}");
    let deadline = Instant::now() + DEADLINE;
    while get(sup.addr, "/").ok().and_then(|r| r.pid()) == Some(old) {
        assert!(
            Instant::now() < deadline,
            "the old gunicorn's workers still answer"
        );
    }
}

#[test]
fn an_upgrade_asked_while_the_first_child_gets_ready_waits_for_it() {
    let python = format!("exec /usr/bin/python3 {}", python_server());
    // The first child counts as ready after a second; the upgrade is asked
    // for before that, and the new version is broken.
    let sup = Supervised::spawn_child(&["--ready", "delay=1s"], &|_| python.clone());
    let deadline = Instant::now() + DEADLINE;
    while !std::path::Path::new(&sup.control).exists() {
        assert!(
            Instant::now() < deadline,
            "no control socket\n{}",
            sup.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (early, _) = status(&sup);
    let first = early["generations"][0]["pid"]
        .as_u64()
        .expect("the first child") as u32;
    assert_eq!(early["generations"][0]["state"], "starting", "{early}");
    write_launcher(&sup.launcher, "exit 1");
    let out = sup.upgrade();
    println!(
        "upgrade during the first start: exit {:?}: {}",
        out.status.code(),
        text(&out.stderr).trim()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the broken upgrade fails\n{}",
        sup.log()
    );
    // The first child was not sacrificed to it: it serves.
    let (after, _) = status(&sup);
    assert_eq!(serving_pids(&after), vec![u64::from(first)], "{after}");
    assert_eq!(get(sup.addr, "/").expect("GET /").pid(), Some(first));
}

#[test]
fn a_server_behind_a_shell_without_exec_is_retired_too() {
    // `sh` is the child; the server is its child, in its process group.
    // (Node takes fd 3 without checking LISTEN_PID, which names `sh`.)
    let node = std::path::Path::new("/usr/bin/node");
    if !node.exists() {
        eprintln!("SKIPPED: /usr/bin/node is not installed");
        return;
    }
    let body = format!(
        "HANDOFF_BIN={} {} {}/tests/servers/node_server.js",
        env!("CARGO_BIN_EXE_handoff"),
        node.display(),
        env!("CARGO_MANIFEST_DIR")
    );
    let sup = Supervised::start_child(&["--drain-timeout", "5s"], &[], Some(&|_| body.clone()));
    let old = sup.wait_serving();
    let out = sup.upgrade();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), sup.log());
    // The old server got the stop signal with its group: it drains and exits.
    let exited = wait_exit(old, Duration::from_secs(10));
    println!("the old server behind sh: exit {exited:?}");
    assert_eq!(
        exited,
        Some(Some(0)),
        "the old server {old} drained and exited by itself (None: still runs)\n{}",
        sup.log()
    );
    // And at stop, the supervisor waits for the server, not only for sh.
    let serving = sup.wait_serving();
    signal(sup.supervisor.id(), libc::SIGTERM);
    assert!(wait_exit(sup.supervisor.id(), DEADLINE).is_some());
    assert!(
        !sup.tag.processes().contains(&serving),
        "the server outlived its supervisor"
    );
}
