//! The ready-made signal handler: `SIGHUP` upgrades, `SIGTERM`/`SIGINT`
//! stop gracefully, a second one forces the stop.

use std::io;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::error::UpgradeError;
use std::os::fd::AsFd;

use nix::sys::signal::Signal;

use crate::handoff::{lock, Handoff, StopReason};

impl Handoff {
    /// Installs the standard handler and returns its task:
    ///
    /// - `SIGHUP` starts an upgrade. One that arrives while an upgrade is in
    ///   flight (or after this process handed over) is logged and ignored,
    ///   never queued into a second spawn.
    /// - The first `SIGTERM` or `SIGINT` makes [`stopping`](Self::stopping)
    ///   resolve; a second one makes [`forced`](Self::forced) resolve.
    ///
    /// Outcomes of upgrades are logged and sent to
    /// [`upgrade_events`](Self::upgrade_events). Needs a tokio runtime.
    /// [`Serve::run`](crate::Serve::run) calls it if the application did not.
    ///
    /// # Errors
    ///
    /// The signal handlers could not be installed, or this was called before
    /// (two handlers would count every signal twice).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> std::io::Result<()> {
    /// handoff.handle_signals()?;
    /// # Ok(()) }
    /// ```
    pub fn handle_signals(&self) -> io::Result<JoinHandle<()>> {
        use std::sync::atomic::Ordering;
        if self.inner.signals.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the handoff signal handler is installed already",
            ));
        }
        let installed = (|| {
            Ok::<_, io::Error>((
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })();
        let (mut hup, mut term, mut int) = installed.inspect_err(|_| {
            self.inner.signals.store(false, Ordering::SeqCst);
        })?;
        let handoff = self.clone();
        Ok(tokio::spawn(async move {
            let mut stop_signals = 0u32;
            loop {
                let name = tokio::select! {
                    Some(()) = hup.recv() => {
                        handoff.on_hangup();
                        continue;
                    }
                    Some(()) = term.recv() => "SIGTERM",
                    Some(()) = int.recv() => "SIGINT",
                    else => break,
                };
                stop_signals += 1;
                if stop_signals == 1 {
                    handoff.request_stop(StopReason::Signal(name));
                } else {
                    tracing::warn!(
                        pid = handoff.inner.pid,
                        signal = name,
                        "second stop signal: stopping now"
                    );
                    handoff.force_stop();
                }
            }
        }))
    }

    fn on_hangup(&self) {
        let pid = self.inner.pid;
        match self.claim_upgrade(true) {
            Ok(ticket) => {
                // The outcome is logged and published by the upgrade task.
                tokio::spawn(ticket.run());
            }
            Err(UpgradeError::NotReady) => {
                tracing::info!(
                    pid,
                    "SIGHUP kept: the upgrade runs once this process serves"
                );
            }
            Err(UpgradeError::AlreadyUpgraded { .. }) => {
                match self.inner.life.begin_passing_hangup() {
                    Some(successor) => {
                        let handoff = self.clone();
                        tokio::spawn(async move { handoff.pass_on_hangup(successor).await });
                    }
                    None => tracing::info!(
                        pid,
                        "SIGHUP ignored: one is being passed on to the successor"
                    ),
                }
            }
            Err(reason @ UpgradeError::InProgress) => {
                tracing::info!(pid, %reason, "SIGHUP ignored");
            }
            Err(reason @ (UpgradeError::Pid1 | UpgradeError::GenerationLimit { .. })) => {
                // Never silent: this process can never upgrade as it runs.
                tracing::error!(pid, %reason, "SIGHUP refused");
                self.tell_upgrade_failed(&reason.to_string());
                let _ = self.inner.events.send(crate::UpgradeEvent::Failed {
                    error: std::sync::Arc::new(reason),
                });
            }
            Err(reason) => tracing::warn!(pid, %reason, "SIGHUP ignored"),
        }
    }

    /// A `SIGHUP` for a process that handed over but is still systemd's main
    /// process (in its probation or drain): the request is for the service.
    /// The handover is final already (see `begin_passing_hangup`); systemd
    /// learns the successor's PID (so that it accepts the successor's
    /// `RELOADING=1`), then the successor gets the signal through its pidfd
    /// (and upgrades, keeping it until it serves if need be).
    /// [`Handoff::finish`] waits until then, so this process does not exit
    /// before the signal is passed on.
    async fn pass_on_hangup(&self, successor: u32) {
        let pid = self.inner.pid;
        self.tell_handover(successor).await;
        let sent = match lock(&self.inner.successor)
            .as_ref()
            .and_then(|l| l.pidfd.as_ref())
        {
            Some(pidfd) => crate::pidfd::send_signal(pidfd.as_fd(), Signal::SIGHUP),
            // Between the commit and taking its pidfd: still our child, not
            // reaped, so its PID is still its own.
            None => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(successor as i32), Signal::SIGHUP)
                    .map_err(std::io::Error::from)
            }
        };
        match sent {
            Ok(()) => tracing::info!(pid, successor, "SIGHUP passed on to the successor"),
            Err(error) => {
                tracing::warn!(pid, successor, %error, "cannot pass SIGHUP on to the successor")
            }
        }
        self.inner.life.end_passing_hangup();
    }
}
