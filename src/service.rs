//! What the service manager (systemd) hears, over `NOTIFY_SOCKET`: readiness,
//! status lines, reloads (`RELOADING=1` … `READY=1`), the main-PID handover
//! to a successor, stopping, and drain-time extensions. Without a
//! `NOTIFY_SOCKET` all of this is skipped.

use std::time::Duration;

use crate::drain::{Drain, DrainReport};
use crate::env::StartMode;
use crate::handoff::{lock, Handoff};
use crate::notify::monotonic_usec;

/// How long the old process waits for systemd to confirm `MAINPID=` before it
/// stops anyway.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

impl Handoff {
    fn serving_status(&self) -> String {
        let inner = &self.inner;
        let mut status = format!(
            "Serving, generation {} (pid {})",
            inner.generation, inner.pid
        );
        if let Some(failure) = &*lock(&inner.last_failure) {
            status.push_str("; last upgrade failed: ");
            status.push_str(failure);
        }
        status
    }

    /// First readiness of the service (not a successor: its parent reports it).
    pub(crate) fn tell_ready(&self) {
        if self.inner.mode != StartMode::Successor {
            let status = self.serving_status();
            self.inner
                .upstream
                .send(&format!("READY=1\nSTATUS={status}"));
        }
    }

    /// An upgrade begins: `RELOADING=1` with the time, which systemd needs to
    /// match the reply to the `SIGHUP` it sent (`Type=notify-reload`).
    pub(crate) fn tell_upgrading(&self) {
        let next = self.inner.generation + 1;
        self.inner.upstream.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=Upgrading: starting generation {next}",
            monotonic_usec()
        ));
    }

    /// The successor is ready and committed: the reload is over (`READY=1`).
    /// systemd's main PID stays this process's for now, so that a take-back
    /// never races systemd's view of the main process; see
    /// [`tell_handover`](Self::tell_handover).
    pub(crate) fn tell_committed(&self, successor: u32) {
        let next = self.inner.generation + 1;
        self.inner.upstream.send(&format!(
            "READY=1\nSTATUS=Serving, generation {next} (pid {successor}); generation {} (pid {}) drains and watches it",
            self.inner.generation, self.inner.pid
        ));
    }

    /// The handover is final: systemd learns the successor's PID, and this
    /// process waits until systemd has processed that (`BARRIER=1`) so that it
    /// never sees its main process exit. Once per process; a second caller
    /// waits for the first's telling to be over.
    pub(crate) async fn tell_handover(&self, successor: u32) {
        let inner = &self.inner;
        inner
            .handover_told
            .get_or_init(|| self.handover(successor))
            .await;
    }

    async fn handover(&self, successor: u32) {
        let inner = &self.inner;
        // A successor that upgraded in turn before its parent handed over
        // to it is not main yet: systemd would refuse its MAINPID=. (Without
        // systemd there is no one to wait for.)
        if inner.upstream.addr().is_some() && !inner.watchdog.wait_main(BARRIER_TIMEOUT).await {
            tracing::warn!(
                pid = inner.pid,
                successor,
                "systemd does not know this process as its main process yet; telling it MAINPID= anyway"
            );
        }
        let next = inner.generation + 1;
        let sent = {
            let mut told = lock(&inner.manager_told);
            *told = true;
            // The last ping, in the message that hands over: systemd checks
            // the sender once, as the main process it still is.
            let ping = if inner.watchdog.timeout().is_some() {
                "WATCHDOG=1\n"
            } else {
                ""
            };
            inner.upstream.send(&format!(
                "MAINPID={successor}\n{ping}STATUS=Serving, generation {next} (pid {successor})"
            ))
        };
        if sent && !inner.upstream.barrier(BARRIER_TIMEOUT).await {
            tracing::warn!(
                pid = inner.pid,
                successor,
                "systemd did not confirm MAINPID= in time"
            );
        }
        // The successor's turn to be main (and ping the watchdog).
        if let Some(link) = &*lock(&inner.successor) {
            let _ = link.channel.send(crate::channel::MAIN);
        }
    }

    /// The successor died after the commit and this process took the sockets
    /// back: it is the main process (it never stopped being one for systemd).
    pub(crate) fn tell_taken_back(&self, reason: &str) {
        *lock(&self.inner.last_failure) = Some(reason.to_owned());
        let status = self.serving_status();
        self.inner.upstream.send(&format!(
            "MAINPID={}\nREADY=1\nSTATUS={status}",
            self.inner.pid
        ));
    }

    /// The upgrade failed: end the reload (`READY=1`; systemd has no way to
    /// fail one) and say why in `STATUS=`.
    pub(crate) fn tell_upgrade_failed(&self, error: &str) {
        *lock(&self.inner.last_failure) = Some(error.to_owned());
        let status = self.serving_status();
        self.inner
            .upstream
            .send(&format!("READY=1\nSTATUS={status}"));
    }

    /// This process stops for good (not after a handover: then it is no
    /// longer the main process and systemd ignores it).
    pub(crate) fn tell_stopping(&self) {
        self.inner
            .upstream
            .send("STOPPING=1\nSTATUS=Stopping: no longer accepting");
    }

    /// Sends any `sd_notify` lines (`WATCHDOG=1`, `STATUS=…`) to the service
    /// manager, if there is one. Returns whether they were sent.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.notify("STATUS=Warming caches");
    /// ```
    pub fn notify(&self, lines: &str) -> bool {
        self.inner.upstream.send(lines)
    }

    /// As [`notify`](Self::notify), then waits (at most `timeout`) until the
    /// service manager has processed the lines (`BARRIER=1`, as
    /// `sd_notify_barrier(3)`), so that this process is still alive when
    /// the manager looks at who sent them. True if the manager answered.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// let processed = handoff.notify_and_wait("READY=1", std::time::Duration::from_secs(5)).await;
    /// # }
    /// ```
    pub async fn notify_and_wait(&self, lines: &str, timeout: Duration) -> bool {
        self.inner.upstream.send(lines) && self.inner.upstream.barrier(timeout).await
    }

    /// [`Drain::drain`] with this process's force signal (a second
    /// `SIGTERM`), announced to systemd in `STATUS=`. [`Serve`](crate::Serve)'s drain.
    pub(crate) async fn drain(&self, drain: &Drain, timeout: Duration) -> DrainReport {
        if self.handed_over().is_none() {
            self.inner.upstream.send(&format!(
                "STATUS=Stopping: draining {} connections",
                drain.active()
            ));
        }
        drain.drain(timeout, self.forced()).await
    }

    /// Asks systemd not to kill this process for `work` more (plus a
    /// second): `EXTEND_TIMEOUT_USEC=`, so that a `TimeoutStopSec=` shorter
    /// than the lame duck, the drain and the shutdown stages together does
    /// not cut them short. Not after a handover: then systemd watches the
    /// successor.
    pub(crate) fn extend_stop_timeout(&self, work: Duration) {
        if self.handed_over().is_none() {
            let extend = work.saturating_add(Duration::from_secs(1));
            self.inner
                .upstream
                .send(&format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros()));
        }
    }
}
