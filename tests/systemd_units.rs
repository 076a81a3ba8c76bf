//! The unit files in `systemd/` under a real, private systemd (see
//! `tests/systemd/sandbox`): socket activation on the first connection, 10
//! `systemctl reload`s under load with no failed request and `MainPID`
//! following each generation, a reload with a broken binary that leaves the
//! old process serving and says why, and a `systemctl stop` that lets an
//! in-flight request finish; all with `WatchdogSec=2s`, which every
//! generation pings while it is the main process (and only then). On systemd
//! 252 (this machine's; `Type=notify` + `ExecReload=`) and 254 (from Debian
//! backports; `Type=notify-reload`). Also the minimal units without
//! `FileDescriptorName=`.
//!
//! Needs root and a writable cgroup2; skips with the reason otherwise. All it
//! writes is under its own temp directories.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{get, KeepAlive};
use common::load::Load;
use common::systemd::{cannot_run, install_binary, render, systemd_254, Sandbox};
use common::{example_path, free_port, TempDir, DEADLINE};

/// Which systemd runs the units.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Systemd {
    /// This machine's (252).
    Host,
    /// 254 from Debian backports (has `Type=notify-reload`).
    Backports254,
}

/// Which systemd and which units.
struct Variant {
    label: &'static str,
    systemd: Systemd,
    socket: &'static str,
    service: &'static str,
    /// `systemctl reload` returns only once the upgrade is over.
    reload_waits: bool,
    /// The service is `handoff run`: its main PID stays, its child changes.
    supervised: bool,
    /// A failed upgrade makes `systemctl reload` fail (ExecReload=handoff upgrade).
    reload_fails_truthfully: bool,
}

/// Runs the scenario for `variant`, or says why it is skipped.
fn exercise(variant: &Variant) {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    match variant.systemd {
        Systemd::Host => scenario(variant, None),
        Systemd::Backports254 => {
            if let Some((_cache, root)) = systemd_254() {
                scenario(variant, Some(&root));
            }
        }
    }
}

fn scenario(variant: &Variant, systemd_root: Option<&Path>) {
    let dir = TempDir::new(&format!("systemd-{}", variant.label));
    let state = dir.path().join("state");
    let units = dir.path().join("units");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&units).unwrap();
    let addr = free_port();
    render(variant.socket, &units, &state, &[addr]);
    render(variant.service, &units, &state, &[addr]);
    install_binary(&state);
    let sandbox = Sandbox::start(&state, &units, systemd_root);
    let version = sandbox.ctl_ok(&["--version"]);
    println!(
        "{}: {}",
        variant.label,
        version.lines().next().unwrap_or("")
    );
    let service = variant.service;

    // Socket activation: nothing runs until the first connection.
    sandbox.ctl_ok(&["start", variant.socket]);
    assert_eq!(sandbox.show(service, "ActiveState"), "inactive");
    let first = get(addr, "/").expect("the first connection starts the service");
    let supervisor: u32 = sandbox.show(service, "MainPID").parse().unwrap();
    // `main` is the process that serves: the main process itself, or the
    // supervisor's child.
    let mut main = first.pid().expect("pid in the body");
    if !variant.supervised {
        assert_eq!(main, supervisor, "the activated service answers");
    }
    sandbox.wait_for(service, "StatusText", "the first STATUS=", |s| {
        s.starts_with("Serving, generation 1") && s.contains(&format!("(pid {main})"))
    });
    if variant.supervised {
        // The child's own STATUS= (sent to the supervisor) is relayed.
        let status = sandbox.wait_for(service, "StatusText", "the child's STATUS= relayed", |s| {
            s.contains("; it says: Serving")
        });
        println!("{}: {status}", variant.label);
    }

    // 10 reloads under load.
    let load = Load::start(addr, 2, 2);
    load.wait_for_more(50);
    for round in 0..10 {
        let output = sandbox.ctl(&["reload", service]);
        assert!(
            output.status.success(),
            "reload {round}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let new: u32 = if variant.supervised {
            // The supervisor stays; the child answering new connections changes.
            assert_eq!(sandbox.show(service, "MainPID"), supervisor.to_string());
            served_by_other_than(addr, main, round)
        } else {
            if variant.reload_waits {
                // The reload returns once the successor serves: systemd has
                // its STATUS= already. MAINPID= follows when the old
                // generation's probation ends.
                let status = sandbox.show(service, "StatusText");
                assert!(
                    status.starts_with(&format!("Serving, generation {} ", round + 2)),
                    "reload {round}: {status}"
                );
            }
            let pid = sandbox.wait_for(service, "MainPID", "the next generation", |p| {
                p != main.to_string()
            });
            pid.parse().unwrap()
        };
        assert_ne!(new, main, "reload {round} started a new generation");
        main = new;
        if !variant.supervised {
            // The watchdog is the new main process's now, as systemd would
            // have set it for a process it started.
            let vars = sandbox.environ(main);
            assert!(
                vars.contains(&format!("WATCHDOG_PID={main}"))
                    && vars.contains(&"WATCHDOG_USEC=2000000".to_owned()),
                "reload {round}: {:?}",
                vars.iter()
                    .filter(|v| v.starts_with("WATCHDOG"))
                    .collect::<Vec<_>>()
            );
        }
        sandbox.wait_for(service, "StatusText", "the new generation's status", |s| {
            s.contains(&format!("(pid {main})"))
        });
        let deadline = Instant::now() + DEADLINE;
        while get(addr, "/").expect("GET / after a reload").pid() != Some(main) {
            assert!(
                Instant::now() < deadline,
                "new connections never reached {main}"
            );
        }
        assert_eq!(sandbox.show(service, "ActiveState"), "active");
        assert_eq!(sandbox.show(service, "NRestarts"), "0");
        load.wait_for_more(50);
    }
    let stats = load.stop();
    println!(
        "{}: {} requests ok, {} failed through 10 reloads",
        variant.label, stats.ok, stats.failed
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    // Only the main process of the moment talked to systemd (watchdog
    // pings included): systemd warns of any other sender.
    let log = sandbox.log();
    let strays: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reception only permitted for main PID"))
        .collect();
    assert!(
        strays.is_empty(),
        "notify messages from a process that was not main: {strays:#?}"
    );

    // A broken binary: the reload returns, the old process keeps serving, and
    // systemctl status says why.
    let bin = state.join("http_server");
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(&bin, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let output = sandbox.ctl(&["reload", service]);
    assert_eq!(
        output.status.success(),
        !variant.reload_fails_truthfully,
        "systemctl reload after a failed upgrade: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    sandbox.wait_for(service, "StatusText", "the failure in STATUS=", |s| {
        s.contains("last upgrade failed") && s.contains("exited with status 1")
    });
    let expected_main = if variant.supervised { supervisor } else { main };
    assert_eq!(
        sandbox.show(service, "MainPID"),
        expected_main.to_string(),
        "the old process still serves"
    );
    assert_eq!(sandbox.show(service, "ActiveState"), "active");
    let status = String::from_utf8_lossy(&sandbox.ctl(&["status", service]).stdout).into_owned();
    assert!(
        status.contains("last upgrade failed"),
        "systemctl status shows it:\n{status}"
    );
    assert_eq!(get(addr, "/").unwrap().pid(), Some(main));
    install_binary(&state);
    if !variant.supervised {
        take_back(&sandbox, service, &state, addr, main);
    }

    // Stop while a slow request is in flight: it finishes.
    let slow = std::thread::spawn(move || KeepAlive::new(addr).get("/sleep?ms=2000"));
    let out_log = state.join("out.log");
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&out_log)
        .unwrap_or_default()
        .contains(&format!("sleeping pid={main}"))
    {
        assert!(Instant::now() < deadline, "the slow request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sandbox.ctl_ok(&["stop", service]);
    let response = slow
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!((response.status, response.pid()), (200, Some(main)));
    assert_eq!(sandbox.show(service, "ActiveState"), "inactive");
    assert_eq!(sandbox.show(service, "Result"), "success");
}

/// Waits until a new connection to `addr` is answered by a process other
/// than `old` (after reload `round`); that process.
fn served_by_other_than(addr: SocketAddr, old: u32, round: usize) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let pid = get(addr, "/")
            .expect("GET / after a reload")
            .pid()
            .unwrap_or(0);
        if pid != old {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "reload {round}: still served by {old}"
        );
    }
}

/// A new version that crashes 50 ms after it said ready, under load: the old
/// process takes the sockets back without systemd noticing anything but the
/// status. It stayed the main process through the probation, so the unit
/// never restarts and nothing is refused.
fn take_back(sandbox: &Sandbox, service: &str, state: &Path, addr: SocketAddr, main: u32) {
    let real = state.join("http_server.real");
    std::fs::copy(example_path("http_server"), &real).expect("copy http_server");
    let bin = state.join("http_server");
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nHANDOFF_DEMO_FAULT=abort-after-ready=50 exec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let load = Load::start(addr, 2, 2);
    load.wait_for_more(50);
    sandbox.ctl_ok(&["reload", service]);
    sandbox.wait_for(service, "StatusText", "the take-back in STATUS=", |s| {
        s.contains(&format!("(pid {main})")) && s.contains("was killed by SIGABRT")
    });
    assert_eq!(sandbox.show(service, "MainPID"), main.to_string());
    assert_eq!(sandbox.show(service, "ActiveState"), "active");
    assert_eq!(sandbox.show(service, "NRestarts"), "0");
    load.wait_for_more(200);
    let stats = load.stop();
    let refused = stats
        .errors
        .iter()
        .filter(|e| e.contains("refused"))
        .count();
    println!(
        "take-back under systemd: {} ok, {} failed ({:?})",
        stats.ok, stats.failed, stats.errors
    );
    assert_eq!(refused, 0, "nothing refused: {:?}", stats.errors);
    assert_eq!(
        get(addr, "/").unwrap().pid(),
        Some(main),
        "the old process serves again"
    );
    install_binary(state);
}

#[test]
fn units_under_systemd_252_notify_with_exec_reload() {
    exercise(&Variant {
        label: "252",
        systemd: Systemd::Host,
        socket: "handoff-demo-legacy.socket",
        service: "handoff-demo-legacy.service",
        reload_waits: false,
        supervised: false,
        reload_fails_truthfully: false,
    });
}

#[test]
fn units_under_systemd_254_notify_reload() {
    exercise(&Variant {
        label: "254",
        systemd: Systemd::Backports254,
        socket: "handoff-demo.socket",
        service: "handoff-demo.service",
        reload_waits: true,
        supervised: false,
        reload_fails_truthfully: false,
    });
}

#[test]
fn supervisor_under_systemd_252_with_a_waiting_exec_reload() {
    exercise(&Variant {
        label: "252-supervisor",
        systemd: Systemd::Host,
        socket: "handoff-run-demo-legacy.socket",
        service: "handoff-run-demo-legacy.service",
        reload_waits: true,
        supervised: true,
        reload_fails_truthfully: true,
    });
}

#[test]
fn supervisor_under_systemd_254_notify_reload() {
    exercise(&Variant {
        label: "254-supervisor",
        systemd: Systemd::Backports254,
        socket: "handoff-run-demo.socket",
        service: "handoff-run-demo.service",
        reload_waits: true,
        supervised: true,
        reload_fails_truthfully: false,
    });
}

/// `systemd/handoff-minimal.{socket,service}`: two `ListenStream=` and no
/// `FileDescriptorName=`, so systemd passes both fds named
/// `handoff-minimal.socket`. The server (or the supervisor, with
/// `supervised`) asks for `http0` and `http1` at those addresses and gets
/// systemd's fds by address: activation from either address, then 10 reloads
/// under load on both with no failed request and `NRestarts=0`, and each new
/// generation answers on both.
fn minimal_units(supervised: bool) {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let label = if supervised {
        "minimal-supervisor"
    } else {
        "minimal"
    };
    let dir = TempDir::new(&format!("systemd-{label}"));
    let state = dir.path().join("state");
    let units = dir.path().join("units");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&units).unwrap();
    let (a, b) = (free_port(), free_port());
    let (socket, service) = ("handoff-minimal.socket", "handoff-minimal.service");
    render(socket, &units, &state, &[a, b]);
    render(service, &units, &state, &[a, b]);
    if supervised {
        let unit = units.join(service);
        let text = std::fs::read_to_string(&unit).unwrap();
        let server = state.join("http_server").display().to_string();
        let line = format!("ExecStart={server} --listen {a} --listen {b}");
        assert!(
            text.contains(&line),
            "the unit's ExecStart= changed:\n{text}"
        );
        let supervisor = format!(
            "ExecStart={} run --listen http0=tcp://{a} --listen http1=tcp://{b} -- {server} --listen {a} --listen {b}",
            state.join("handoff").display()
        );
        std::fs::write(&unit, text.replace(&line, &supervisor)).unwrap();
    }
    install_binary(&state);
    let sandbox = Sandbox::start(&state, &units, None);
    sandbox.ctl_ok(&["start", socket]);
    assert_eq!(sandbox.show(service, "ActiveState"), "inactive");

    // The second address starts it: its fd is systemd's second, under the
    // unit's name, and the server asked for it as "http1".
    let first = get(b, "/").expect("the first connection starts the service");
    let mut main = first.pid().expect("pid in the body");
    assert_eq!(
        get(a, "/").unwrap().pid(),
        Some(main),
        "both addresses served"
    );
    let out = std::fs::read_to_string(state.join("out.log")).unwrap_or_default();
    let fallbacks = out
        .lines()
        .filter(|l| l.contains("using the one it passed at this address"))
        .count();
    assert!(
        fallbacks >= 2 && out.contains("handoff-minimal.socket"),
        "an info line per listener says which fd was taken:\n{out}"
    );

    let loads = [Load::start(a, 2, 2), Load::start(b, 2, 2)];
    for load in &loads {
        load.wait_for_more(50);
    }
    for round in 0..10 {
        sandbox.ctl_ok(&["reload", service]);
        let deadline = Instant::now() + DEADLINE;
        // Each address reaches the new generation (fresh connections).
        let new = served_by_other_than(a, main, round);
        while get(b, "/").expect("GET / on the second address").pid() != Some(new) {
            assert!(
                Instant::now() < deadline,
                "reload {round}: the second address never reached {new}"
            );
        }
        main = new;
        assert_eq!(sandbox.show(service, "ActiveState"), "active");
        assert_eq!(sandbox.show(service, "NRestarts"), "0");
        for load in &loads {
            load.wait_for_more(50);
        }
    }
    for (load, addr) in loads.into_iter().zip([a, b]) {
        let stats = load.stop();
        println!(
            "{label}: {addr}: {} requests ok, {} failed through 10 reloads",
            stats.ok, stats.failed
        );
        assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    }
    sandbox.ctl_ok(&["stop", service]);
    assert_eq!(sandbox.show(service, "Result"), "success");
}

#[test]
fn a_socket_unit_without_file_descriptor_name() {
    minimal_units(false);
}

#[test]
fn a_socket_unit_without_file_descriptor_name_under_the_supervisor() {
    minimal_units(true);
}
