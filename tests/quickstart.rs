//! The README's five-line axum integration, run for real: it serves, upgrades
//! with `SIGHUP` (built inside `#[tokio::main]`), and with no `tracing`
//! subscriber installed every upgrade outcome is still one line on stderr.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::get;
use common::{
    become_subreaper, binary_lock, example_path, free_port, signal, Tagged, TempDir, DEADLINE,
};

/// Polls `condition` (a cheap read of a file or a socket) until it holds.
fn wait_for<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The PID that answers `GET /`, if one does.
fn answering(addr: std::net::SocketAddr) -> Option<u32> {
    let body = get(addr, "/").ok()?.body;
    body.trim().strip_prefix("pid=")?.parse().ok()
}

#[test]
fn the_quickstart_upgrades_and_reports_each_outcome_on_stderr() {
    become_subreaper();
    let dir = TempDir::new("quickstart");
    let bin = dir.path().join("axum_quickstart");
    let stderr_path = dir.path().join("stderr.log");
    let tag = Tagged::new("quickstart");
    let addr = free_port();
    let mut child = {
        let _lock = binary_lock();
        std::fs::copy(example_path("axum_quickstart"), &bin).expect("copy the example");
        Command::new(&bin)
            .arg(addr.to_string())
            .current_dir(dir.path())
            .env("TEST_SERVER_TAG", tag.value())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr log"))
            .spawn()
            .expect("start axum_quickstart")
    };
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let first = wait_for("the first generation to answer", || answering(addr));
    assert_eq!(first, child.id());

    signal(first, libc::SIGHUP);
    let second = wait_for("a successor to answer", || {
        answering(addr).filter(|&p| p != first)
    });
    let succeeded = format!("handoff[{first}]: upgrade succeeded: pid {second} serves now");
    wait_for("the success line on stderr", || {
        stderr().contains(&succeeded).then_some(())
    });
    let status = child.wait().expect("reap the first generation");
    assert!(status.success(), "the first generation exits 0: {status:?}");

    // A broken deploy: the new binary exits at once.
    {
        let _lock = binary_lock();
        std::fs::remove_file(&bin).expect("remove the binary");
        std::fs::write(&bin, "#!/bin/sh\necho 'bad config' >&2\nexit 7\n").expect("write");
        let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(&bin, executable).expect("chmod");
    }
    signal(second, libc::SIGHUP);
    let failed = format!("handoff[{second}]: upgrade failed, this process serves on:");
    let line = wait_for("the failure line on stderr", || {
        stderr()
            .lines()
            .find(|l| l.starts_with(&failed))
            .map(str::to_owned)
    });
    println!("{succeeded}\n{line}");
    assert!(
        line.contains("exit"),
        "the line says how the new process ended: {line}"
    );
    assert_eq!(
        answering(addr),
        Some(second),
        "the old generation serves on"
    );

    signal(second, libc::SIGTERM);
    assert_eq!(
        common::wait_exit(second, DEADLINE),
        Some(Some(0)),
        "SIGTERM: drained and exited 0"
    );
    assert!(tag.processes().is_empty(), "nothing left running");
}
