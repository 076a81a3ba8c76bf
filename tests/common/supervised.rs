//! `handoff run` under test: the supervisor with a launcher script (which a
//! test may replace, as a deploy replaces a binary) in a private directory,
//! killed with everything it started when the test ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::get;
use super::{become_subreaper, free_port, Events, Tagged, TempDir, DEADLINE};

pub fn handoff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(args)
        .output()
        .expect("run handoff")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `handoff run` supervising the Python server through a launcher script
/// (which a test may replace, as a deploy replaces a binary).
pub struct Supervised {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub control: String,
    pub launcher: PathBuf,
    pub supervisor: Child,
    pub tag: Tagged,
    /// The lines the children print on stdout (they inherit the
    /// supervisor's, which prints nothing there itself): the library
    /// examples' event lines.
    pub events: Arc<Events>,
}

pub fn python_server() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/servers/activated_server.py")
        .to_string_lossy()
        .into_owned()
}

pub fn write_launcher(path: &Path, body: &str) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The supervisor's `--listen` unless a test says otherwise.
const LISTEN: &str = "http0=tcp://{addr}";

impl Supervised {
    pub fn start(extra: &[&str], wrapper: &[&str]) -> Supervised {
        Self::start_child(extra, wrapper, None)
    }

    /// As `start`, with the launcher running `child` (given the address)
    /// instead of the Python server.
    pub fn start_child(
        extra: &[&str],
        wrapper: &[&str],
        child: Option<&dyn Fn(SocketAddr) -> String>,
    ) -> Supervised {
        let supervised = Self::launch(LISTEN, &[], extra, wrapper, child, None);
        supervised.wait_serving();
        supervised
    }

    fn launch(
        listen: &str,
        env: &[(&str, &str)],
        extra: &[&str],
        wrapper: &[&str],
        child: Option<&dyn Fn(SocketAddr) -> String>,
        command: Option<&[&str]>,
    ) -> Supervised {
        become_subreaper();
        let dir = TempDir::new("supervisor");
        let addr = free_port();
        let control = dir
            .path()
            .join("run/control.sock")
            .to_string_lossy()
            .into_owned();
        let launcher = dir.path().join("server.sh");
        let body = match child {
            Some(child) => child(addr),
            None => format!("exec /usr/bin/python3 {}", python_server()),
        };
        write_launcher(&launcher, &body);
        let tag = Tagged::new("supervisor");
        // `{addr}` (and `{port}`) in the listen address, an argument or the
        // command is the free address picked for the supervisor.
        let fill = |arg: &str| {
            arg.replace("{addr}", &addr.to_string())
                .replace("{port}", &addr.port().to_string())
        };
        let listen = fill(listen);
        let mut args: Vec<&str> = wrapper.to_vec();
        args.extend([
            env!("CARGO_BIN_EXE_handoff"),
            "run",
            "--listen",
            &listen,
            "--control",
            &control,
        ]);
        let extra: Vec<String> = extra.iter().map(|arg| fill(arg)).collect();
        args.extend(extra.iter().map(String::as_str));
        let launcher_arg = launcher.to_string_lossy().into_owned();
        args.push("--");
        let command: Option<Vec<String>> =
            command.map(|command| command.iter().map(|arg| fill(arg)).collect());
        match &command {
            Some(command) => args.extend(command.iter().map(String::as_str)),
            None => args.push(&launcher_arg),
        }
        let stderr = std::fs::File::create(dir.path().join("supervisor.log")).unwrap();
        let mut supervisor = Command::new(args[0])
            .args(&args[1..])
            .env("TEST_SERVER_TAG", tag.value())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start handoff run");
        let events = Arc::new(Events::default());
        let stdout = supervisor.stdout.take().expect("stdout pipe");
        {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    events.push(line);
                }
            });
        }
        Supervised {
            dir,
            addr,
            control,
            launcher,
            supervisor,
            tag,
            events,
        }
    }

    /// As `start_child`, without waiting for a child to serve (one that
    /// never will, say).
    pub fn spawn_child(extra: &[&str], child: &dyn Fn(SocketAddr) -> String) -> Supervised {
        Self::launch(LISTEN, &[], extra, &[], Some(child), None)
    }

    /// `handoff run` with `command` (not the launcher) after `--`, run in
    /// the test's directory; no waiting.
    pub fn spawn_command(extra: &[&str], command: &[&str]) -> Supervised {
        Self::launch(LISTEN, &[], extra, &[], None, Some(command))
    }

    /// As `spawn_command`, with `env` added to the supervisor's environment.
    pub fn spawn_command_with_env(env: &[(&str, &str)], command: &[&str]) -> Supervised {
        Self::launch(LISTEN, env, &[], &[], None, Some(command))
    }

    /// `WRAPPER... handoff run ... -- COMMAND...`, no waiting.
    pub fn spawn_wrapped(wrapper: &[&str], command: &[&str]) -> Supervised {
        Self::launch(LISTEN, &[], &[], wrapper, None, Some(command))
    }

    /// As `spawn_command`, with `--listen listen` (where `{addr}` and
    /// `{port}` are the free address picked for the test) instead of
    /// `http0=tcp://{addr}`.
    pub fn spawn_listening(listen: &str, extra: &[&str], command: &[&str]) -> Supervised {
        Self::launch(listen, &[], extra, &[], None, Some(command))
    }

    /// Waits until a request succeeds (the first child is ready).
    pub fn wait_serving(&self) -> u32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(response) = get(self.addr, "/") {
                return response.pid().expect("pid in the body");
            }
            assert!(Instant::now() < deadline, "never served:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn upgrade(&self) -> Output {
        handoff(&["upgrade", "--control", &self.control, "--timeout", "30s"])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- supervisor log ---\n{}", self.log());
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}
