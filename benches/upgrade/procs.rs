//! Server processes for the benchmark: starting them, reading their event
//! lines, signalling them, and making sure every one of them (successors
//! included, which are not our children until their parent exits) is killed
//! and reaped, even when the benchmark fails or panics.

use std::collections::{BTreeSet, VecDeque};
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, Pid};

use crate::events::{read_events, Event, Kind};

/// Errors are plain messages: the benchmark reports them and stops.
pub type Result<T> = std::result::Result<T, String>;

/// How long a process gets to exit after its `exit` line or a SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// The processes of one server lineage: those the benchmark started and
/// their successors. All their event lines arrive on one channel. Dropping a
/// `Family` SIGKILLs and reaps every process of it that is still known.
pub struct Family {
    name: String,
    log: PathBuf,
    sender: Sender<Event>,
    events: Receiver<Event>,
    /// Events read but not consumed yet by [`Family::wait_for`].
    backlog: VecDeque<Event>,
    /// Pids seen (spawned or named in an event line) and not reaped.
    live: BTreeSet<i32>,
    reaped: BTreeSet<i32>,
    /// Stdout pipes still open.
    open_pipes: usize,
}

impl Family {
    /// A family whose processes log (stderr) to `log`.
    pub fn new(name: &str, log: PathBuf) -> Family {
        let (sender, events) = mpsc::channel();
        Family {
            name: name.to_owned(),
            log,
            sender,
            events,
            backlog: VecDeque::new(),
            live: BTreeSet::new(),
            reaped: BTreeSet::new(),
            open_pipes: 0,
        }
    }

    /// Starts `command` with stdout read as event lines; returns its pid.
    pub fn spawn(&mut self, mut command: Command) -> Result<i32> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        // Whatever the benchmark itself was started with, a server here starts fresh.
        for var in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "HANDOFF_GENERATION",
            "HANDOFF_NOTIFY_UPSTREAM",
        ] {
            command.env_remove(var);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = command.spawn().map_err(|e| {
            format!(
                "{}: cannot start {:?}: {e}",
                self.name,
                command.get_program()
            )
        })?;
        let pid = i32::try_from(child.id()).map_err(|_| "pid out of range".to_owned())?;
        self.live.insert(pid);
        let stdout = child.stdout.take().expect("stdout was set to piped");
        // std's Child neither kills nor waits when dropped; this family reaps
        // the pid itself, like those of the successors.
        drop(child);
        let sender = self.sender.clone();
        std::thread::Builder::new()
            .name(format!("events-{pid}"))
            .spawn(move || read_events(pid, stdout, sender))
            .map_err(|e| format!("cannot start a reader thread: {e}"))?;
        self.open_pipes += 1;
        Ok(pid)
    }

    fn note(&mut self, event: &Event) {
        for pid in [Some(event.pid), event.successor].into_iter().flatten() {
            if pid > 0 && !self.reaped.contains(&pid) {
                self.live.insert(pid);
            }
        }
    }

    /// Returns the first event, buffered or new, for which `want` holds.
    /// Fails on a timeout, an `upgrade failed` line, or when every process
    /// of the family has closed its stdout.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        if let Some(index) = self.backlog.iter().position(&want) {
            return Ok(self.backlog.remove(index).expect("position is in range"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{}: no {what} within {timeout:?} (server log: {})",
                        self.name,
                        self.log.display()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => unreachable!("the family holds a sender"),
            };
            self.note(&event);
            match event.kind {
                Kind::UpgradeFailed => return Err(format!("{}: {}", self.name, event.line)),
                Kind::Closed => {
                    self.open_pipes = self.open_pipes.saturating_sub(1);
                    if self.open_pipes == 0 {
                        return Err(format!(
                            "{}: every server process closed its stdout while waiting for {what} (server log: {})",
                            self.name,
                            self.log.display()
                        ));
                    }
                }
                _ if want(&event) => return Ok(event),
                _ => self.backlog.push_back(event),
            }
        }
    }

    /// Sends `signal` to `pid`.
    pub fn signal(&self, pid: i32, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(pid), signal)
            .map_err(|e| format!("{}: cannot send {signal} to pid {pid}: {e}", self.name))
    }

    /// Sends SIGTERM to `pid`, waits for its `exit` line, then reaps it.
    pub fn stop(&mut self, pid: i32, timeout: Duration) -> Result<Event> {
        self.signal(pid, Signal::SIGTERM)?;
        let exit = self.wait_for(&format!("exit of pid {pid}"), timeout, |e| {
            e.kind == Kind::Exit && e.pid == pid
        })?;
        self.reap(pid)?;
        Ok(exit)
    }

    /// Waits (briefly: it printed `exit` or was killed) for `pid` to end and
    /// reaps it; SIGKILLs it first if it lingers.
    pub fn reap(&mut self, pid: i32) -> Result<()> {
        let exited = wait_exit(pid, EXIT_GRACE);
        if !exited {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_exit(pid, EXIT_GRACE);
        }
        reap_pid(pid);
        self.live.remove(&pid);
        self.reaped.insert(pid);
        self.backlog.retain(|e| e.pid != pid);
        if exited {
            Ok(())
        } else {
            Err(format!(
                "{}: pid {pid} did not exit within {EXIT_GRACE:?}; killed",
                self.name
            ))
        }
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        // Learn the pids of lines read but not consumed yet.
        while let Ok(event) = self.events.try_recv() {
            self.note(&event);
        }
        for &pid in &self.live {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for &pid in &self.live {
            wait_exit(pid, EXIT_GRACE);
            // A successor whose parent was alive a moment ago may not be our
            // child yet; the final sweep (`Reaper`) reaps it then.
            reap_pid(pid);
        }
    }
}

/// Reaps `pid` if it is our child and has exited; never blocks.
fn reap_pid(pid: i32) {
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            _ => return,
        }
    }
}

/// Waits until `pid` has exited (it may be a zombie), at most `timeout`.
/// True if it exited or no longer exists.
pub fn wait_exit(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Errno::last() == Errno::ESRCH;
    }
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, count 1.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        match ready {
            1.. => return true,
            0 => return false,
            _ if Errno::last() == Errno::EINTR => continue,
            _ => return false,
        }
    }
}

/// Makes the benchmark the reaper of orphaned descendants (successors whose
/// parent exited), and on drop SIGKILLs and reaps every child left.
pub struct Reaper(());

impl Reaper {
    pub fn install() -> Result<Reaper> {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            return Err(format!(
                "cannot become a child subreaper: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(Reaper(()))
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all_children();
    }
}

/// SIGKILLs and reaps every child, and the children those leave behind
/// (they become ours as their parents die), for at most [`EXIT_GRACE`].
fn kill_all_children() {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + EXIT_GRACE;
    loop {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for &pid in &children {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Every child was just SIGKILLed, so this returns promptly.
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = writeln!(
                io::stderr(),
                "warning: could not reap the processes {children:?}"
            );
            return;
        }
    }
}

/// The write end of the pipe that [`on_interrupt`] writes to.
static INTERRUPT_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_interrupt(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; it reads one byte of a local.
    unsafe {
        libc::write(
            INTERRUPT_PIPE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

/// On SIGINT or SIGTERM, kills and reaps every server process, removes
/// `tmp` (unless `keep`) and exits with status 130. The handler only writes
/// to a pipe; a thread does the work. (A handler, not a blocked signal mask:
/// children would inherit the mask, and the servers need their SIGTERM.)
pub fn clean_up_on_interrupt(tmp: PathBuf, keep: bool) -> Result<()> {
    let (read, write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
    // Kept open for the life of the process, for the handler.
    INTERRUPT_PIPE.store(write.into_raw_fd(), Ordering::Relaxed);
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            if std::fs::File::from(read).read_exact(&mut byte).is_err() {
                return;
            }
            eprintln!("signal {}: killing every server process", byte[0]);
            kill_all_children();
            if !keep {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            std::process::exit(130);
        })
        .map_err(|e| format!("cannot start the interrupt thread: {e}"))?;
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls write(2), which is async-signal-safe.
        unsafe { sigaction(signal, &action) }
            .map_err(|e| format!("cannot handle {signal}: {e}"))?;
    }
    Ok(())
}

/// Pids whose parent is `parent`, from /proc (zombies included).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
                == Some(parent)
        })
        .collect()
}

/// A fresh directory, removed on drop unless `keep`.
pub struct TempDir {
    pub path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(keep: bool) -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("handoff-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // No eprintln!: it panics if stderr is gone, and this runs while unwinding.
        let mut stderr = io::stderr();
        if self.keep {
            let _ = writeln!(stderr, "kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            let _ = writeln!(
                stderr,
                "warning: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}
