//! Test harness: runs an example server from its own temp directory, follows
//! its event lines, and kills and reaps every generation when the test ends,
//! even when it fails.
//!
//! Successor generations are not children of the test: the test process is
//! made a child subreaper, so orphaned generations are reparented to it and it
//! can wait for them and collect their exit status. Every server process
//! carries a unique `TEST_SERVER_TAG` in its environment, so cleanup finds all
//! of them (even one started mid-upgrade) without relying on PIDs it saw.

#![allow(dead_code)]

pub mod events;
pub mod http;
pub mod load;
pub mod notify;
pub mod peers;
pub mod process;
pub mod supervised;
pub mod systemd;

pub use events::{Events, Line};
pub use process::*;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The generous deadline for events that normally take milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The path of a compiled example. `cargo test --all-features` builds the examples,
/// but `cargo test --test NAME` does not, so the first call builds them (a
/// no-op when they are up to date).
pub fn example_path(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/examples/<name>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "--examples", "--all-features"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build --examples");
        assert!(status.success(), "cargo build --examples failed");
    });
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Held while a test writes a binary and while the harness forks, so no
/// child of another test thread inherits a binary's write fd between its
/// `fork` and `exec` (the binary's own `exec` would then fail with ETXTBSY,
/// and a wrapper such as `unshare` cannot retry it).
pub fn binary_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "handoff-test-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A server under test and all of its generations.
pub struct Server {
    pub dir: TempDir,
    pub bin: PathBuf,
    pub pid_file: PathBuf,
    pub events: Arc<Events>,
    pub addrs: Vec<SocketAddr>,
    pub first_pid: u32,
    /// The first generation; reaped by PID (see `wait_exit`) like the others.
    _first: std::process::Child,
    tag: String,
}

/// How to start a server.
pub struct Options<'a> {
    pub example: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command that runs the server (as `WRAPPER... BINARY ARGS...`), such
    /// as `systemd-socket-activate -l ADDR`.
    pub wrapper: Vec<String>,
    /// Connect here once spawned: a socket-activated server starts on the
    /// first connection.
    pub connect_first: Option<SocketAddr>,
    /// The wrapper starts the server in a new PID namespace, where it has
    /// this PID (1 under `unshare --pid --fork`, 2 under an init there):
    /// its event lines say so.
    pub namespace_pid: Option<u32>,
    /// Runs in the server's process before `exec` (async-signal-safe code only).
    pub pre_exec: Option<fn() -> std::io::Result<()>>,
}

impl<'a> Options<'a> {
    pub fn new(example: &'a str) -> Self {
        Options {
            example,
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
            connect_first: None,
            namespace_pid: None,
            pre_exec: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
}

impl Server {
    /// Starts `example` on an ephemeral loopback port and waits until it is ready.
    pub fn start(example: &str) -> Server {
        Self::start_with(Options::new(example).arg("--listen").arg("127.0.0.1:0"))
    }

    pub fn start_with(options: Options<'_>) -> Server {
        become_subreaper();
        let dir = TempDir::new(options.example);
        let bin = dir.path().join(options.example);
        let example = example_path(options.example);
        let lock = binary_lock();
        fs::copy(example, &bin).expect("copy the example binary");
        let pid_file = dir.path().join("server.pid");
        let tag = format!("{}-{}", dir.path().display(), std::process::id());
        let stderr = fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let mut command = match options.wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&bin);
                command
            }
            None => Command::new(&bin),
        };
        command
            .args(&options.args)
            .arg("--pid-file")
            .arg(&pid_file)
            .current_dir(dir.path())
            .env("TEST_SERVER_TAG", &tag)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (key, value) in &options.env {
            command.env(key, value);
        }
        if let Some(hook) = options.pre_exec {
            // SAFETY: the hook is async-signal-safe, as the field requires.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, hook);
            }
        }
        let mut child = spawn_retrying(&mut command);
        drop(lock);
        let first_pid = child.id();
        let stdout = child.stdout.take().expect("stdout pipe");
        let events = Arc::new(Events::default());
        {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(line) => events.push(line),
                        Err(_) => break,
                    }
                }
            });
        }
        if let Some(addr) = options.connect_first {
            // The connection only starts the server; retry until the wrapper
            // listens (the answer itself is not needed).
            std::thread::spawn(move || {
                let deadline = Instant::now() + DEADLINE;
                while Instant::now() < deadline {
                    if std::net::TcpStream::connect(addr).is_ok() {
                        let _ = http::get(addr, "/");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        // The PID the server's own lines carry.
        let own_pid = options.namespace_pid.unwrap_or(first_pid);
        let mut server = Server {
            dir,
            bin,
            pid_file,
            events,
            addrs: Vec::new(),
            first_pid,
            _first: child,
            tag,
        };
        let (_, listening) =
            server
                .events
                .wait(0, DEADLINE, "the first generation to listen", |l| {
                    l.is("listening") && l.num("pid") == u64::from(own_pid)
                });
        server.addrs = listening
            .get("addrs")
            .split(',')
            .map(|a| a.parse().expect("listening address"))
            .collect();
        server
            .events
            .wait(0, DEADLINE, "the first generation to be ready", |l| {
                l.is("ready") && l.num("pid") == u64::from(own_pid)
            });
        assert!(
            server.processes().contains(&first_pid),
            "the server lacks TEST_SERVER_TAG in its environment: cleanup could not find it"
        );
        server
    }

    /// Waits until `condition` holds, failing with the events after [`DEADLINE`].
    pub fn wait_until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events:\n{}",
                self.events.snapshot().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The PID the PID file names now.
    pub fn serving_pid(&self) -> u32 {
        let text = fs::read_to_string(&self.pid_file).expect("read the PID file");
        text.trim().parse().expect("PID file holds a number")
    }

    /// Sends SIGHUP to the serving process and waits for the outcome: the
    /// successor's `ready` line (returns its PID) or this process's `upgrade
    /// failed` line (returns the error text).
    pub fn upgrade(&self) -> Result<u32, String> {
        let pid = self.serving_pid();
        let from = self.events.len();
        signal(pid, libc::SIGHUP);
        let (_, line) = self
            .events
            .wait(from, DEADLINE, "the upgrade's outcome", |l| {
                (l.is("upgrade succeeded") || l.is("upgrade failed"))
                    && l.num("pid") == u64::from(pid)
            });
        if line.is("upgrade failed") {
            return Err(line.get("error").to_owned());
        }
        let successor = line.num("successor") as u32;
        self.events
            .wait(from, DEADLINE, "the successor to be ready", |l| {
                l.is("ready") && l.num("pid") == u64::from(successor)
            });
        Ok(successor)
    }

    /// Upgrades and checks the whole handover: the old process stops accepting,
    /// exits 0, and the PID file names the successor.
    pub fn upgrade_ok(&self) -> u32 {
        let old = self.serving_pid();
        let new = self
            .upgrade()
            .unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", self.stderr_tail()));
        assert_ne!(old, new);
        self.events
            .wait(0, DEADLINE, "the old generation to stop accepting", |l| {
                l.is("stopping") && l.num("pid") == u64::from(old)
            });
        let status =
            wait_exit(old, DEADLINE).unwrap_or_else(|| panic!("old generation {old} did not exit"));
        assert_eq!(status, Some(0), "old generation {old} exit status");
        assert_eq!(self.serving_pid(), new, "the PID file names the successor");
        new
    }

    /// Runs `upgrades` upgrades with `between` after each; the generations'
    /// PIDs, oldest first. Each new generation must answer a new
    /// connection, and each is a new process.
    pub fn upgrade_many(&self, upgrades: usize, mut between: impl FnMut()) -> Vec<u32> {
        let mut pids = vec![self.first_pid];
        for _ in 0..upgrades {
            let new = self.upgrade_ok();
            let response = http::get(self.addr(), "/").expect("GET / after the upgrade");
            assert_eq!(
                response.pid(),
                Some(new),
                "new connections go to the successor"
            );
            assert!(!pids.contains(&new), "each upgrade starts a new process");
            pids.push(new);
            between();
        }
        pids
    }

    /// After a run of upgrades through `pids` (oldest first): exactly the
    /// last one is left, and only these generations answered.
    pub fn assert_generations(&self, pids: &[u32], answered: &std::collections::BTreeSet<u32>) {
        assert_eq!(
            self.processes(),
            vec![*pids.last().expect("at least one generation")],
            "exactly one process serves at the end"
        );
        let ours: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
        assert!(
            answered.is_subset(&ours),
            "only our generations answered: {answered:?} of {ours:?}"
        );
    }

    /// Every live process of this server (all generations and anything they started).
    pub fn processes(&self) -> Vec<u32> {
        tagged_processes(&self.tag)
    }

    pub fn stderr_all(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The library's log lines (stderr), parsed: the message is the kind.
    pub fn log_lines(&self) -> Vec<Line> {
        self.stderr_all()
            .lines()
            .filter_map(|l| l.split_once(": ").map(|(_, message)| Line::parse(message)))
            .collect()
    }

    pub fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Replaces the binary at the server's path (as a deploy would).
    pub fn replace_binary(&self, contents: Option<&[u8]>, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let _lock = binary_lock();
        let _ = fs::remove_file(&self.bin);
        if let Some(contents) = contents {
            fs::write(&self.bin, contents).expect("write the new binary");
            fs::set_permissions(&self.bin, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }

    /// Makes the next upgrade run the real `example` with
    /// `HANDOFF_DEMO_FAULT=fault` (a shell script that `exec`s it, so the PID
    /// and the fds stay the same).
    pub fn inject_fault(&self, example: &str, fault: &str) {
        let real = self.dir.path().join(format!("real-{example}"));
        let source = example_path(example);
        {
            let _lock = binary_lock();
            fs::copy(source, &real).expect("copy the binary");
        }
        let script = format!(
            "#!/bin/sh\nHANDOFF_DEMO_FAULT='{fault}' exec '{}' \"$@\"\n",
            real.display()
        );
        self.replace_binary(Some(script.as_bytes()), 0o755);
    }

    /// Puts the real example binary back at the server's path.
    pub fn restore_binary(&self, example: &str) {
        let example = example_path(example);
        let _lock = binary_lock();
        let _ = fs::remove_file(&self.bin);
        fs::copy(example, &self.bin).expect("restore the binary");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- events ---\n{}", self.events.snapshot().join("\n"));
            eprintln!("--- stderr (last lines) ---\n{}", self.stderr_tail());
        }
        kill_tagged(&self.tag);
    }
}
