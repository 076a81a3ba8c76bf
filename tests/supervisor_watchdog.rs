//! `handoff run` under a watchdog (`WATCHDOG_USEC`, as systemd sets it for
//! `WatchdogSec=`): the child gets the watchdog as systemd would give it,
//! and a serving child that pinged and then hangs (here: `SIGSTOP`) is
//! replaced by a new child on the same sockets, without the supervisor (the
//! service) going down.

mod common;

use std::time::{Duration, Instant};

use common::http::get;
use common::supervised::Supervised;
use common::{example_path, DEADLINE};

/// Waits until the supervisor's log has a line containing `text`.
fn wait_log(sup: &Supervised, text: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = sup.log();
        if let Some(line) = log.lines().find(|l| l.contains(text)) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no line with {text:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_hung_child_that_stopped_pinging_the_watchdog_is_replaced() {
    let server = example_path("http_server").to_string_lossy().into_owned();
    let sup = Supervised::spawn_command_with_env(
        &[("WATCHDOG_USEC", "1000000")],
        &[&server, "--listen", "{addr}"],
    );
    let first = sup.wait_serving();
    // As systemd would set it for a process it started.
    let environ = std::fs::read(format!("/proc/{first}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let vars: Vec<&str> = environ.split('\0').collect();
    assert!(
        vars.contains(&format!("WATCHDOG_PID={first}").as_str())
            && vars.contains(&"WATCHDOG_USEC=1000000"),
        "{:?}",
        vars.iter()
            .filter(|v| v.starts_with("WATCHDOG"))
            .collect::<Vec<_>>()
    );
    // The library child pings the supervisor, which now holds it to it.
    let line = wait_log(&sup, "the child pings the watchdog");
    assert!(line.contains(&format!("pgid={first}")), "{line}");

    // It hangs: alive, but neither serving nor pinging.
    common::signal(first, libc::SIGSTOP);
    let hung_at = Instant::now();
    let deadline = hung_at + DEADLINE;
    let second = loop {
        // Connections wait in the backlog meanwhile; the new child takes them.
        if let Some(pid) = get(sup.addr, "/").ok().and_then(|r| r.pid()) {
            if pid != first {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "never replaced:\n{}", sup.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let replaced_after = hung_at.elapsed();
    let line = wait_log(&sup, "replacing a hung child");
    assert!(
        line.contains(&format!("pid={first}")) && line.contains("sent no WATCHDOG=1"),
        "{line}"
    );
    // The hung child is gone (SIGABRT waits while it is stopped; SIGKILL
    // after the grace does not).
    let deadline = Instant::now() + DEADLINE;
    while std::path::Path::new(&format!("/proc/{first}")).exists()
        && !common::zombie_children(sup.supervisor.id()).contains(&first)
    {
        assert!(
            Instant::now() < deadline,
            "the hung child {first} is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The supervisor serves on and says why.
    let status = common::supervised::handoff(&["status", "--control", &sup.control]);
    let status = common::supervised::text(&status.stdout);
    assert!(status.contains("WATCHDOG=1"), "{status}");
    println!(
        "a hung child (pid {first}) replaced by pid {second} {replaced_after:?} after it stopped"
    );
    assert!(
        replaced_after < Duration::from_secs(10),
        "replaced only after {replaced_after:?}"
    );
}
