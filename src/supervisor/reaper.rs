//! Central reaping: on `SIGCHLD`, every exited child is reported to the main
//! loop (as PID 1 that includes orphans), in order. A child is first only
//! looked at (`waitid` with `WNOWAIT`: it stays a zombie, so its PID and
//! process group ID cannot be reused), and reaped once the loop has taken it
//! out of its table: nothing the loop signals by PID can be a recycled one.

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

/// A process that exited, with its shell-style exit code (128+signal).
/// Dropping `forgotten` (or sending on it) lets the reaper reap it.
pub(super) struct Reaped {
    pub pid: u32,
    pub code: i32,
    pub forgotten: oneshot::Sender<()>,
}

/// Starts the reaper; its reports arrive on the returned channel.
pub(super) fn start() -> std::io::Result<mpsc::UnboundedReceiver<Reaped>> {
    let mut chld = signal(SignalKind::child())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Also once at start: a child may have exited before the handler existed.
        loop {
            if !reap_all(&tx).await {
                return;
            }
            if chld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Reports and reaps what has exited; false once nobody listens any more.
async fn reap_all(tx: &mpsc::UnboundedSender<Reaped>) -> bool {
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let (pid, code) = match waitid(Id::All, flags) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, 128 + signal as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return true,
            Ok(_) => continue,
        };
        let (forgotten, wait) = oneshot::channel();
        let report = Reaped {
            pid: pid.as_raw() as u32,
            code,
            forgotten,
        };
        if tx.send(report).is_err() {
            return false;
        }
        // The loop took it out of its table (or the loop is gone): reap it.
        let _ = wait.await;
        while let Err(nix::errno::Errno::EINTR) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {}
    }
}
