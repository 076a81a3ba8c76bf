//! A real, private systemd for tests (`tests/systemd/sandbox`), and the
//! unit files of `systemd/` rendered for it: pointed at the test's binaries,
//! ports and state directory. Needs root and a writable cgroup2; see
//! [`cannot_run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{example_path, TempDir, DEADLINE};

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/systemd/sandbox")
}

pub fn run(args: &[&str]) -> Output {
    // Every call is bounded: a hung systemctl must not hang the suite.
    Command::new("timeout")
        .arg("120")
        .arg(script())
        .args(args)
        .output()
        .expect("run tests/systemd/sandbox")
}

/// Why a private systemd cannot run here, if it cannot.
pub fn cannot_run() -> Option<String> {
    let output = run(&["check"]);
    (!output.status.success()).then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A running private systemd; stopped (everything in it killed) on drop.
pub struct Sandbox {
    state: String,
}

impl Sandbox {
    pub fn start(state: &Path, units: &Path, systemd_root: Option<&Path>) -> Sandbox {
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

    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", self.state.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The environment of process `pid` (a PID inside the sandbox).
    pub fn environ(&self, pid: u32) -> Vec<String> {
        let output = run(&["exec", &self.state, "cat", &format!("/proc/{pid}/environ")]);
        assert!(
            output.status.success(),
            "read the environment of {pid}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .split('\0')
            .map(str::to_owned)
            .collect()
    }

    pub fn show(&self, unit: &str, property: &str) -> String {
        let out = self.ctl_ok(&["show", "-p", property, "--value", unit]);
        out.trim().to_owned()
    }

    /// Polls a unit property until `done` holds (systemd has no event to wait on from here).
    pub fn wait_for(
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

    pub fn log(&self) -> String {
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

pub fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Copies a unit from `systemd/`, pointed at the test's binary and port, with
/// the service's output in the state directory.
/// The units' addresses `127.0.0.1:8080` and `:8081` become `addrs[0]`,
/// `127.0.0.1:8082` becomes `addrs[1]`.
pub fn render(name: &str, units: &Path, state: &Path, addrs: &[SocketAddr]) {
    let addr = addrs[0];
    let second = addrs.get(1).unwrap_or(&addr);
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
        .replace("127.0.0.1:8082", &second.to_string())
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
pub fn install_binary(state: &Path) {
    let bin = state.join("http_server");
    let _ = std::fs::remove_file(&bin);
    std::fs::copy(example_path("http_server"), &bin).expect("copy http_server");
    let handoff = state.join("handoff");
    if !handoff.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_handoff"), &handoff).expect("copy handoff");
    }
}

/// systemd 254 unpacked from Debian backports into a temp dir (kept alive by
/// the returned guard), or `None` after saying why it is skipped.
pub fn systemd_254() -> Option<(TempDir, PathBuf)> {
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
