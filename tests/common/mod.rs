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

pub mod http;
pub mod load;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The generous deadline for events that normally take milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The path of a compiled example. A plain `cargo test` builds the examples,
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
            .args(["build", "--quiet", "--examples"])
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

/// Lines a server printed on stdout, shared with a reader thread.
#[derive(Default)]
pub struct Events {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: String) {
        self.lock().push(line);
        self.changed.notify_all();
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// Waits until a line at index `from` or later matches; returns it and its index.
    pub fn wait(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&Line) -> bool,
    ) -> (usize, Line) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lock();
        loop {
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .map(|(i, l)| (i, Line::parse(l)))
                .find(|(_, line)| matches(line))
            {
                return (i, line);
            }
            let now = Instant::now();
            if now >= deadline {
                let so_far = lines.join("\n");
                drop(lines);
                panic!("timed out after {timeout:?} waiting for {what}; events so far:\n{so_far}");
            }
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One event line: a kind (the words before the first `key=`) and fields.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: String,
    pub fields: HashMap<String, String>,
    pub raw: String,
}

impl Line {
    pub fn parse(raw: &str) -> Line {
        let mut kind = Vec::new();
        let mut fields = HashMap::new();
        let mut rest = raw;
        while !rest.is_empty() {
            let word_end = rest.find(' ').unwrap_or(rest.len());
            let word = &rest[..word_end];
            if let Some((key, value)) = word.split_once('=') {
                if value.starts_with('"') {
                    // A quoted (Debug-formatted) value runs to the closing quote.
                    let start = key.len() + 1;
                    let mut end = start + 1;
                    let bytes = rest.as_bytes();
                    while end < bytes.len() && bytes[end] != b'"' {
                        end += if bytes[end] == b'\\' { 2 } else { 1 };
                    }
                    fields.insert(
                        key.to_owned(),
                        rest[start + 1..end.min(rest.len())].to_owned(),
                    );
                    rest = rest.get(end + 1..).unwrap_or("").trim_start();
                    continue;
                }
                fields.insert(key.to_owned(), value.to_owned());
            } else if fields.is_empty() {
                kind.push(word);
            }
            rest = rest[word_end..].trim_start();
        }
        Line {
            kind: kind.join(" "),
            fields,
            raw: raw.to_owned(),
        }
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("no numeric {key} in {:?}", self.raw))
    }
}

/// Makes this test process the reaper of orphaned descendants.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
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
}

impl<'a> Options<'a> {
    pub fn new(example: &'a str) -> Self {
        Options {
            example,
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
            connect_first: None,
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
        fs::copy(example_path(options.example), &bin).expect("copy the example binary");
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
        let mut child = spawn_retrying(&mut command);
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
                    l.is("listening") && l.num("pid") == u64::from(first_pid)
                });
        server.addrs = listening
            .get("addrs")
            .split(',')
            .map(|a| a.parse().expect("listening address"))
            .collect();
        server
            .events
            .wait(0, DEADLINE, "the first generation to be ready", |l| {
                l.is("ready") && l.num("pid") == u64::from(first_pid)
            });
        assert!(
            server.processes().contains(&first_pid),
            "the server lacks TEST_SERVER_TAG in its environment: cleanup could not find it"
        );
        server
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
        let _ = fs::remove_file(&self.bin);
        if let Some(contents) = contents {
            fs::write(&self.bin, contents).expect("write the new binary");
            fs::set_permissions(&self.bin, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }

    /// Puts the real example binary back at the server's path.
    pub fn restore_binary(&self, example: &str) {
        let _ = fs::remove_file(&self.bin);
        fs::copy(example_path(example), &self.bin).expect("restore the binary");
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

/// Spawns `command`. Another test thread's fork may still hold a freshly
/// copied binary open for writing for a moment (ETXTBSY): retry briefly.
pub fn spawn_retrying(command: &mut Command) -> std::process::Child {
    let mut attempts = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result.expect("spawn"),
        }
    }
}

/// One line of `/proc/<pid>/stat`: what the tests need of it.
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
}

/// Every process on the machine, as far as `/proc` shows it now.
pub fn all_processes() -> Vec<ProcStat> {
    let mut all = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(") ")) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        all.push(ProcStat {
            pid,
            comm: head[open + 1..].to_owned(),
            state,
            ppid,
        });
    }
    all
}

/// A free TCP port on 127.0.0.1, for tools that cannot bind port 0 and
/// report it (`systemd-socket-activate`).
pub fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address")
}

/// The socket inode an fd of `pid` refers to (`socket:[N]`), if it is a socket.
pub fn socket_inode(pid: u32, fd: i32) -> Option<u64> {
    let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let target = target.to_string_lossy();
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Sends a signal; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill takes a pid and a signal number only.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// PIDs of live (non-zombie) processes whose environment has our tag.
fn tagged_processes(tag: &str) -> Vec<u32> {
    let needle = format!("TEST_SERVER_TAG={tag}\0");
    all_processes()
        .into_iter()
        .filter(|p| p.state != 'Z')
        .filter(|p| {
            fs::read(format!("/proc/{}/environ", p.pid))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .map(|p| p.pid)
        .collect()
}

pub fn is_zombie(pid: u32) -> bool {
    all_processes()
        .iter()
        .any(|p| p.pid == pid && p.state == 'Z')
}

/// Children of `pid` that are zombies.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid && p.state == 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Waits until `pid` exits, then reaps it if it is our child (directly or as
/// subreaper). Returns `None` on timeout, `Some(exit code)` otherwise (`None`
/// inside when it was not ours to reap or died by a signal).
pub fn wait_exit(pid: u32, timeout: Duration) -> Option<Option<i32>> {
    // SAFETY: pidfd_open takes a pid and flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the syscall returned a new fd that we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut pollfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pollfd, 1, left.as_millis() as i32) };
            if n > 0 {
                break;
            }
            if n == 0 {
                return None;
            }
        }
    }
    // Orphans are reparented to us when their parent exits: give that a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            return Some(libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)));
        }
        if rc < 0 && !is_zombie(pid) {
            return Some(None);
        }
        if Instant::now() >= deadline {
            return Some(None);
        }
        // No event tells us when the reparenting happened; poll briefly.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A unique tag for processes a test starts itself: set `TEST_SERVER_TAG`
/// to [`value`](Tagged::value) in their environment; every process carrying
/// it (and everything they started) is killed and reaped on drop.
pub struct Tagged(String);

impl Tagged {
    pub fn new(label: &str) -> Self {
        Tagged(format!(
            "{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    pub fn value(&self) -> &str {
        &self.0
    }

    /// Live processes carrying the tag.
    pub fn processes(&self) -> Vec<u32> {
        tagged_processes(&self.0)
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        kill_tagged(&self.0);
    }
}

/// SIGKILLs every tagged process and reaps those that become ours.
fn kill_tagged(tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = tagged_processes(tag);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for &pid in &pids {
            signal(pid, libc::SIGKILL);
        }
        for pid in pids {
            wait_exit(pid, Duration::from_secs(5));
        }
    }
}
