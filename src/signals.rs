//! The ready-made signal handler: `SIGHUP` upgrades, `SIGTERM`/`SIGINT`
//! stop gracefully, a second one forces the stop.

use std::io;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::error::UpgradeError;
use crate::upgrader::{Handoff, StopReason};

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
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> std::io::Result<()> {
    /// handoff.handle_signals()?;
    /// # Ok(()) }
    /// ```
    pub fn handle_signals(&self) -> io::Result<JoinHandle<()>> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
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
        match self.begin_upgrade() {
            Ok(ticket) => {
                tokio::spawn(async move {
                    // The outcome is logged and published by `run`.
                    let _ = ticket.run().await;
                });
            }
            Err(reason @ (UpgradeError::InProgress | UpgradeError::AlreadyUpgraded { .. })) => {
                tracing::info!(pid, %reason, "SIGHUP ignored");
            }
            Err(reason) => tracing::warn!(pid, %reason, "SIGHUP ignored"),
        }
    }
}
