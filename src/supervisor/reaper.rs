//! Central reaping: on `SIGCHLD`, every exited child is collected with
//! `waitpid(-1)` (as PID 1 that includes orphans) and reported to the main
//! loop, in the order they were reaped.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// A process that was reaped, with its shell-style exit code (128+signal).
pub(super) struct Reaped {
    pub pid: u32,
    pub code: i32,
}

/// Starts the reaper; its reports arrive on the returned channel.
pub(super) fn start() -> std::io::Result<mpsc::UnboundedReceiver<Reaped>> {
    let mut chld = signal(SignalKind::child())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Also once at start: a child may have exited before the handler existed.
        loop {
            if !reap_all(&tx) {
                return;
            }
            if chld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Reaps what has exited; false once nobody listens any more.
fn reap_all(tx: &mpsc::UnboundedSender<Reaped>) -> bool {
    loop {
        let (pid, code) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, 128 + signal as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return true,
            Ok(_) => continue,
        };
        if tx
            .send(Reaped {
                pid: pid.as_raw() as u32,
                code,
            })
            .is_err()
        {
            return false;
        }
    }
}
