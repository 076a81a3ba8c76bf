//! Processes: spawning, finding (by `/proc` and by tag), signalling, waiting
//! for and reaping them.

use std::fs;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{COUNTER, DEADLINE};

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
pub(crate) fn tagged_processes(tag: &str) -> Vec<u32> {
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
/// Waits until an orphan named `comm` has appeared under `init` (a PID 1)
/// and is gone again, and checks that `init` left no zombie: it reaped it.
pub fn wait_orphan_reaped(init: u32, comm: &str) {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = false;
    loop {
        let orphans: Vec<_> = all_processes()
            .into_iter()
            .filter(|p| p.ppid == init && p.comm == comm)
            .collect();
        seen |= !orphans.is_empty();
        if seen && orphans.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphans under PID 1: {:?}",
            orphans.iter().map(|p| (p.pid, p.state)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(zombie_children(init).is_empty(), "no zombie under PID 1");
}

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
pub(crate) fn kill_tagged(tag: &str) {
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

/// A process a test started itself, killed and reaped however the test ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
