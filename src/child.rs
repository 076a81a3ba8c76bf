//! A started process, watched through its pidfd and never left a zombie:
//! a [`Child`] until the commit point (dropping it kills its process group
//! and reaps it), a [`Successor`] after it (never killed by this process);
//! and how a reaped child ended, as an upgrade error.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::error::UpgradeError;

/// A started process: a handoff successor, or a child of the supervisor.
/// Dropping it before [`Child::commit`] kills its process group and reaps
/// it.
pub(crate) struct Child {
    pid: Pid,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

/// A pidfd for `pid`: readable once the process has exited (Linux 5.3+).
fn open_pidfd(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (always
    // close-on-exec) or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for as long
    // as it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

impl Child {
    /// Takes charge of the process `pid` that `spawn` just forked and opens
    /// its pidfd. The `Child` exists first, so that a failure to open the
    /// pidfd kills the group and reaps the child too (see `Drop`).
    pub(crate) fn new(pid: Pid) -> Result<Child, UpgradeError> {
        let mut child = Child { pid, pidfd: None };
        child.pidfd = Some(
            open_pidfd(pid.as_raw())
                .and_then(register)
                .map_err(|e| UpgradeError::io("cannot open a pidfd for the new process", e))?,
        );
        Ok(child)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Resolves once the process has exited (it is then a zombie until reaped).
    pub(crate) async fn exited(&self) {
        if let Some(pidfd) = &self.pidfd {
            // A pidfd becomes readable when the process exits.
            if let Ok(mut guard) = pidfd.readable().await {
                guard.retain_ready();
                return;
            }
        }
        std::future::pending().await
    }

    /// Kills the child's whole process group (it and anything it started).
    pub(crate) fn kill_group(&self) {
        self.signal_group(Signal::SIGKILL);
    }

    /// Whether the process has exited (without waiting).
    pub(crate) fn has_exited(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return false;
        };
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; timeout 0 never blocks.
        unsafe { libc::poll(&mut poll, 1, 0) > 0 && poll.revents & libc::POLLIN != 0 }
    }

    /// Reaps a child whose pidfd reported its exit: `waitpid` returns at once.
    pub(crate) async fn reap(mut self) -> Option<WaitStatus> {
        self.exited().await;
        self.pidfd = None;
        let pid = self.pid;
        std::mem::forget(self);
        loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(status) => return Some(status),
                Err(_) => return None,
            }
        }
    }

    /// Rolls the child back: `SIGTERM` to its group, so whatever it accepted
    /// can be answered, then `SIGKILL` after `grace`; then reaps it and
    /// returns how it ended.
    pub(crate) async fn terminate(self, grace: std::time::Duration) -> Option<WaitStatus> {
        self.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            tracing::warn!(
                pid = self.pid(),
                grace_ms = grace.as_millis() as u64,
                "the new process did not exit after SIGTERM; killing it"
            );
        }
        // Anything the group started and left behind goes too.
        self.kill_group();
        self.reap().await
    }

    fn signal_group(&self, signal: Signal) {
        // While the child is not yet reaped its PID, and so the group ID,
        // cannot be reused, so this cannot hit an unrelated group.
        if let Err(e) = killpg(self.pid, signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid.as_raw(), error = %e, "cannot signal the new process group");
            }
        }
    }

    /// Hands the child over to a caller that reaps with `waitpid(-1)` itself
    /// (the supervisor), with its pidfd: nothing here will wait for it or
    /// kill it.
    pub(crate) fn into_pidfd(mut self) -> (u32, Option<OwnedFd>) {
        let pidfd = self.pidfd.take().map(AsyncFd::into_inner);
        let pid = self.pid();
        std::mem::forget(self);
        (pid, pidfd)
    }
}

/// A successor after the commit point: watched through its pidfd, never
/// killed by this process (dropping it only closes the pidfd).
pub(crate) struct Successor {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
}

impl Child {
    /// The commit point: from here on this process never kills the child.
    pub(crate) fn commit(mut self) -> Option<Successor> {
        let pidfd = self.pidfd.take()?;
        let pid = self.pid;
        std::mem::forget(self);
        Some(Successor { pid, pidfd })
    }
}

impl Successor {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// A copy of its pidfd, to signal it later without naming a PID.
    pub(crate) fn pidfd(&self) -> io::Result<OwnedFd> {
        self.pidfd.get_ref().try_clone()
    }

    /// Resolves once the successor exited, and reaps it (the wait returns at
    /// once then); returns how it ended.
    pub(crate) async fn exited(&self) -> Option<WaitStatus> {
        match self.pidfd.readable().await {
            Ok(mut guard) => guard.retain_ready(),
            Err(_) => std::future::pending().await,
        }
        loop {
            match waitpid(self.pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(status) => return Some(status),
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Child {
    /// Kills the group and reaps the child without ever blocking the caller
    /// (which may hold a lock): the wait runs on a thread of its own.
    fn drop(&mut self) {
        self.kill_group();
        self.pidfd = None;
        let pid = self.pid;
        let wait = move || loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return,
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(wait)),
            Err(_) => drop(std::thread::spawn(wait)),
        }
    }
}

/// How a reaped child ended, as an upgrade error.
pub(crate) fn exit_error(pid: u32, status: Option<WaitStatus>) -> UpgradeError {
    match status {
        Some(WaitStatus::Exited(_, code)) => UpgradeError::Exited { pid, code },
        Some(WaitStatus::Signaled(_, signal, _)) => UpgradeError::Killed {
            pid,
            signal: signal.as_str().to_owned(),
        },
        other => UpgradeError::io(
            format!("the new process (pid {pid}) ended before it was ready"),
            io::Error::other(format!("{other:?}")),
        ),
    }
}
