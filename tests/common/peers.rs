//! Third-party peers the tests run (Python packages from PyPI): found in the
//! project's venv (`.venv`, which `.ci/run` makes) or `TEST_PYTHON`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A Python interpreter that can `import module`, if there is one. Without
/// one the test is skipped with a message that says how to get it, unless
/// `REQUIRE_TEST_PEERS` is set (as CI sets it): then it fails.
pub fn python_with(module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let importable = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if importable {
        return Some(python);
    }
    let how = format!(
        "{} cannot import {module}: run .ci/run, or `python3 -m venv .venv && .venv/bin/pip install {module}`",
        python.display()
    );
    assert!(
        std::env::var_os("REQUIRE_TEST_PEERS").is_none(),
        "REQUIRE_TEST_PEERS is set but {how}"
    );
    eprintln!("SKIPPED: {how}");
    None
}

/// Where the test servers and apps live (`tests/servers`).
pub const SERVERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers");

/// `exec PYTHON -m MODULE`, the start of a launcher line that runs a PyPI
/// server (gunicorn, uvicorn) from the venv, if it is installed.
pub fn exec_module(module: &str) -> Option<String> {
    let python = python_with(module)?;
    Some(format!("exec {} -m {module}", python.display()))
}
