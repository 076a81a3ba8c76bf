//! The unit files in `systemd/` under a real, private systemd (see
//! `tests/systemd/sandbox`): socket activation on the first connection, 10
//! `systemctl reload`s under load with no failed request and `MainPID`
//! following each generation, a reload with a broken binary that leaves the
//! old process serving and says why, and a `systemctl stop` that lets an
//! in-flight request finish. On systemd 252 (this machine's; `Type=notify` +
//! `ExecReload=`) and 254 (from Debian backports; `Type=notify-reload`).
//!
//! Needs root and a writable cgroup2; skips with the reason otherwise. All it
//! writes is under its own temp directories.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::http::{get, KeepAlive};
use common::load::Load;
use common::{example_path, free_port, TempDir, DEADLINE};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd/sandbox")
}

fn run(args: &[&str]) -> Output {
    // Every call is bounded: a hung systemctl must not hang the suite.
    Command::new("timeout")
        .arg("120")
        .arg(script())
        .args(args)
        .output()
        .expect("run tests/systemd/sandbox")
}

/// Why a private systemd cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    let output = run(&["check"]);
    (!output.status.success()).then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A running private systemd; stopped (everything in it killed) on drop.
struct Sandbox {
    state: String,
}

impl Sandbox {
    fn start(state: &Path, units: &Path, systemd_root: Option<&Path>) -> Sandbox {
        let mut args = vec!["start".to_owned(), path(state), path(units)];
        args.extend(systemd_root.map(path));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(&args);
        let sandbox = Sandbox { state: path(state) };
        assert!(
            output.status.success(),
            "sandbox start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        sandbox
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", self.state.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn show(&self, unit: &str, property: &str) -> String {
        let out = self.ctl_ok(&["show", "-p", property, "--value", unit]);
        out.trim().to_owned()
    }

    /// Polls a unit property until `done` holds (systemd has no event to wait on from here).
    fn wait_for(
        &self,
        unit: &str,
        property: &str,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let value = self.show(unit, property);
            if done(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{unit}: {property}={value:?}, waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(Path::new(&self.state).join("systemd.log")).unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- private systemd log ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
            let out =
                std::fs::read_to_string(Path::new(&self.state).join("out.log")).unwrap_or_default();
            let lines: Vec<&str> = out.lines().collect();
            eprintln!(
                "--- service output ---\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        let output = run(&["stop", &self.state]);
        if !output.status.success() {
            eprintln!("sandbox stop: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Copies a unit from `systemd/`, pointed at the test's binary and port, with
/// the service's output in the state directory.
fn render(name: &str, units: &Path, state: &Path, addr: SocketAddr) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    let text = std::fs::read_to_string(&source).expect("read the unit");
    let mut text: String = text
        .replace(
            "/usr/local/bin/http_server",
            &path(&state.join("http_server")),
        )
        .replace("/usr/local/bin/handoff", &path(&state.join("handoff")))
        .replace("127.0.0.1:8080", &addr.to_string())
        .replace("127.0.0.1:8081", &addr.to_string())
        // Short enough that a supervisor that stopped pinging is killed
        // within the test.
        .replace("WatchdogSec=10s", "WatchdogSec=2s")
        .lines()
        .filter(|l| *l != "[Install]" && !l.starts_with("WantedBy="))
        .map(|l| format!("{l}\n"))
        .collect();
    if name.ends_with(".service") {
        // [Service] is the last section once [Install] is gone.
        text.push_str(&format!(
            "StandardOutput=append:{}\n",
            path(&state.join("out.log"))
        ));
        text.push_str(&format!(
            "StandardError=append:{}\n",
            path(&state.join("out.log"))
        ));
    }
    std::fs::write(units.join(name), text).expect("write the unit");
}

/// Copies the binaries into the state directory: inside the sandbox only it
/// (of everything under /tmp) is visible.
fn install_binary(state: &Path) {
    let bin = state.join("http_server");
    let _ = std::fs::remove_file(&bin);
    std::fs::copy(example_path("http_server"), &bin).expect("copy http_server");
    let handoff = state.join("handoff");
    if !handoff.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_handoff"), &handoff).expect("copy handoff");
    }
}

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
    render(variant.socket, &units, &state, addr);
    render(variant.service, &units, &state, addr);
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
            let deadline = Instant::now() + DEADLINE;
            loop {
                let pid = get(addr, "/")
                    .expect("GET / after a reload")
                    .pid()
                    .unwrap_or(0);
                if pid != main {
                    break pid;
                }
                assert!(
                    Instant::now() < deadline,
                    "reload {round}: still served by {main}"
                );
            }
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

/// systemd 254 unpacked from Debian backports into a temp dir (kept alive by
/// the returned guard), or `None` after saying why it is skipped.
fn systemd_254() -> Option<(TempDir, PathBuf)> {
    let cache = TempDir::new("systemd-254");
    let output = run(&["fetch", &path(cache.path())]);
    if !output.status.success() {
        eprintln!(
            "SKIPPED: cannot fetch systemd 254 from Debian backports: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let root = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    Some((cache, root))
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
