//! Stopping and exiting: `stopping()`, `request_stop()`, the force signal,
//! and `finish()`, which ends a handover (after the probation) or reports a
//! take-back.

use crate::handoff::{lock, Handoff, StopReason};
use crate::lifecycle::Phase;

impl Handoff {
    /// Resolves once this process must stop accepting: after a successor took
    /// over, on `SIGTERM`/`SIGINT` (with [`handle_signals`](Self::handle_signals)),
    /// or after [`request_stop`](Self::request_stop).
    ///
    /// After a handover the process may take the sockets back (its successor
    /// died): it then serves again, and `stopping()` waits for the next stop.
    /// [`Serve`](crate::Serve) and [`while_serving`](Self::while_serving) handle this; a hand-written accept loop does so
    /// with [`finish`](Self::finish).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// let reason = handoff.stopping().await;
    /// println!("no longer accepting: {reason}");
    /// # }
    /// ```
    pub async fn stopping(&self) -> StopReason {
        let life = self.inner.life.wait(|l| l.stop_reason().is_some()).await;
        life.stop_reason().unwrap_or(StopReason::Requested)
    }

    /// Whether this process must not accept now (it handed over or stops).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// assert!(!handoff.is_stopping());
    /// ```
    pub fn is_stopping(&self) -> bool {
        self.inner.life.get().stop_reason().is_some()
    }

    /// Readiness, for an application's `/readyz` or health service: true
    /// while this process serves (it said ready, and a successor's parent
    /// committed the handover), false from the moment it decided to stop
    /// (a stop signal, during the drain delay too, or a handover). Liveness
    /// needs no method: a process that answers is alive.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let status = if handoff.is_ready() { 200 } else { 503 };
    /// ```
    pub fn is_ready(&self) -> bool {
        self.inner.life.get().accepting()
    }

    /// Asks this process to stop accepting, for good, as `SIGTERM` would. The
    /// first reason given is kept.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.request_stop(handoff::StopReason::Requested);
    /// assert!(handoff.is_stopping());
    /// ```
    pub fn request_stop(&self, reason: StopReason) {
        let inner = &self.inner;
        let shown = reason.to_string();
        inner.life.stop(reason, |left| {
            tracing::info!(pid = inner.pid, generation = inner.generation, reason = %shown, "stopping");
            if !matches!(left, Phase::HandedOver { .. }) {
                // No successor will take the fds: let the sockets close as
                // soon as the application drops its own copies.
                lock(&inner.registry).close_all();
                self.tell_stopping();
            }
        });
    }

    /// Resolves when draining must end at once (a second `SIGTERM`/`SIGINT`,
    /// or [`force_stop`](Self::force_stop)).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// handoff.forced().await;
    /// eprintln!("cutting remaining connections");
    /// # }
    /// ```
    pub async fn forced(&self) {
        self.inner.force.cancelled().await
    }

    /// Ends draining at once; implies [`request_stop`](Self::request_stop).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.force_stop();
    /// ```
    pub fn force_stop(&self) {
        self.request_stop(StopReason::Requested);
        self.inner.force.cancel();
    }

    /// Call when this process has stopped accepting and drained, before it
    /// exits. After a handover it waits out the probation
    /// ([`Builder::probation`](crate::Builder::probation)); if the successor died meanwhile and this
    /// process took the sockets back, it returns [`Finish::Resume`]: accept
    /// again. Otherwise it tells systemd the successor's PID, releases the
    /// sockets and returns [`Finish::Exit`]. Without a handover it returns
    /// `Exit` once no upgrade is in flight (or `Resume` if the process was
    /// never stopped).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// loop {
    ///     // ... accept until handoff.stopping(), then drain ...
    ///     if handoff.finish().await == handoff::Finish::Exit {
    ///         break;
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn finish(&self) -> Finish {
        let inner = &self.inner;
        let life = inner
            .life
            .wait(|l| {
                let settled = match l.phase {
                    Phase::HandedOver { .. } => l.probation_over,
                    // An upgrade cut short by a stop ends (its candidate
                    // stopped and reaped, the outcome reported) before the
                    // process exits.
                    _ => !l.upgrade_in_flight,
                };
                // Nor does it exit while a SIGHUP is passed on.
                settled && !l.passing_hangup
            })
            .await;
        if life.accepting() || matches!(life.phase, Phase::Starting | Phase::Readying) {
            return Finish::Resume;
        }
        inner.life.finish_handover();
        if let Some(successor) = inner.life.get().successor() {
            self.tell_handover(successor).await;
            // The successor holds the sockets now; the paths stay its own.
            lock(&inner.registry).release();
            // A SIGHUP that came while systemd was being told goes on first.
            inner.life.wait(|l| !l.passing_hangup).await;
        }
        Finish::Exit
    }
}

/// What [`Handoff::finish`] tells a process that stopped accepting.
///
/// ```
/// assert_ne!(handoff::Finish::Exit, handoff::Finish::Resume);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Exit: the successor serves (or the process stops for good).
    Exit,
    /// Serve again: the successor died and this process took the sockets back.
    Resume,
}
