//! Connection tracking and draining: a guard per connection, a signal that
//! tells connections to finish up, and a bounded wait that cuts whatever is
//! left at the deadline.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Tracks open connections and drains them with a deadline
/// ([`Serve`](crate::Serve) does both for the connections it accepts).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let drain = handoff::Drain::new();
/// let guard = drain.track();
/// tokio::spawn(async move {
///     guard.draining().await; // finish the current request, then close
///     drop(guard);
/// });
/// let report = drain.drain(Duration::from_secs(5), std::future::pending()).await;
/// assert_eq!(report.cut, 0);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    active: AtomicUsize,
    idle: Notify,
    /// The signals new connections get; replaced by [`Drain::resume`].
    epoch: std::sync::Mutex<Epoch>,
}

/// The three signals of one drain, as a connection sees them.
#[derive(Clone, Default)]
struct Epoch {
    /// Finish up.
    draining: CancellationToken,
    /// Stop now (the deadline is near, or the drain was forced).
    cut: CancellationToken,
    /// The drain is over: whatever is still open is dropped.
    over: CancellationToken,
}

impl Shared {
    fn epoch(&self) -> std::sync::MutexGuard<'_, Epoch> {
        self.epoch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Held by one connection for as long as it is open.
///
/// ```
/// let drain = handoff::Drain::new();
/// let guard = drain.track();
/// assert_eq!(drain.active(), 1);
/// drop(guard);
/// assert_eq!(drain.active(), 0);
/// ```
pub struct ConnectionGuard {
    inner: Arc<Shared>,
    epoch: Epoch,
}

/// The outcome of [`Drain::drain`].
///
/// ```
/// let report = handoff::DrainReport { waited: std::time::Duration::ZERO, cut: 0, forced: false };
/// assert!(report.is_clean());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// How long the drain waited.
    pub waited: Duration,
    /// Connections still open when the wait ended; told to close at once.
    pub cut: usize,
    /// Whether the wait ended early because draining was forced.
    pub forced: bool,
}

impl DrainReport {
    /// True if every connection finished by itself.
    ///
    /// ```
    /// let report = handoff::DrainReport { waited: std::time::Duration::ZERO, cut: 1, forced: true };
    /// assert!(!report.is_clean());
    /// ```
    pub fn is_clean(&self) -> bool {
        self.cut == 0
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("active", &self.active())
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl Drain {
    /// A tracker with no connections.
    ///
    /// ```
    /// assert_eq!(handoff::Drain::new().active(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers one connection until the guard is dropped.
    ///
    /// ```
    /// let drain = handoff::Drain::new();
    /// let _guard = drain.track();
    /// assert_eq!(drain.active(), 1);
    /// ```
    pub fn track(&self) -> ConnectionGuard {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard {
            inner: self.inner.clone(),
            epoch: self.inner.epoch().clone(),
        }
    }

    /// The number of open connections.
    ///
    /// ```
    /// assert_eq!(handoff::Drain::new().active(), 0);
    /// ```
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Whether draining has begun.
    ///
    /// ```
    /// assert!(!handoff::Drain::new().is_draining());
    /// ```
    pub fn is_draining(&self) -> bool {
        self.inner.epoch().draining.is_cancelled()
    }

    /// Ends a drain because this process serves again (it took the sockets
    /// back from a successor that died): connections tracked from now on
    /// are neither told to finish up nor cut. Those told already still are,
    /// and a later drain's deadline cuts them too; those cut already are
    /// dropped now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let drain = handoff::Drain::new();
    /// let _ = drain.drain(std::time::Duration::ZERO, std::future::pending()).await;
    /// assert!(drain.is_draining());
    /// drain.resume();
    /// assert!(!drain.is_draining());
    /// assert!(!drain.track().is_draining());
    /// # }
    /// ```
    pub fn resume(&self) {
        let mut epoch = self.inner.epoch();
        if epoch.cut.is_cancelled() {
            // That drain ended (or was about to): a new one starts clean.
            epoch.over.cancel();
            *epoch = Epoch::default();
        } else if epoch.draining.is_cancelled() {
            // Interrupted before its cut: the connections it told to finish
            // up share the next drain's cut with the new ones.
            epoch.draining = CancellationToken::new();
        }
    }

    /// Tells every connection to finish up ([`ConnectionGuard::draining`]),
    /// then waits until all are closed, `timeout` passes, or `force`
    /// resolves. Connections still open then are told to close at once
    /// ([`ConnectionGuard::cut`]) and counted in the report. The cut comes a
    /// little before the deadline (a quarter of `timeout`, at most 250 ms), so that a protocol can
    /// end what it cut properly (a gRPC status) before the process exits;
    /// the wait never outlasts `timeout`.
    ///
    /// This is the library's one drain. [`Serve`](crate::Serve) calls it
    /// with [`Handoff::forced`](crate::Handoff::forced) as `force`, and also
    /// keeps systemd informed (`STATUS=`, and `EXTEND_TIMEOUT_USEC=` so that
    /// a shorter `TimeoutStopSec=` does not cut the drain short).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// let drain = handoff::Drain::new();
    /// let stuck = drain.track();
    /// let report = drain.drain(Duration::from_millis(10), std::future::pending()).await;
    /// assert_eq!(report.cut, 1);
    /// # drop(stuck);
    /// # }
    /// ```
    pub async fn drain(&self, timeout: Duration, force: impl Future<Output = ()>) -> DrainReport {
        let start = Instant::now();
        let epoch = self.inner.epoch().clone();
        epoch.draining.cancel();
        let flush = cut_flush(timeout);
        let deadline = tokio::time::sleep(timeout - flush);
        tokio::pin!(deadline, force);
        let forced = loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active() == 0 {
                break false;
            }
            tokio::select! {
                () = &mut idle => {}
                () = &mut deadline => break false,
                () = &mut force => break true,
            }
        };
        let cut = self.active();
        if cut > 0 {
            epoch.cut.cancel();
            // The cut connections close now; give them the flush time.
            let _ = tokio::time::timeout(flush, self.idle()).await;
            epoch.over.cancel();
        }
        DrainReport {
            waited: start.elapsed(),
            cut,
            forced,
        }
    }

    /// Resolves once no connection is open.
    async fn idle(&self) {
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// How long before a drain's deadline its cut comes: a quarter of the
/// timeout, at most 250 ms.
fn cut_flush(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_millis(250))
}

impl ConnectionGuard {
    /// Resolves when draining begins: finish the request in progress, then
    /// close. How soon an idle connection closes is the protocol's business:
    /// [`Serve::http`](crate::Serve::http) gives an idle HTTP/1 connection a
    /// short grace, so a request already on its way is answered, not reset.
    ///
    /// ```no_run
    /// # async fn f(guard: handoff::ConnectionGuard) {
    /// guard.draining().await; // answer what is pending, then close
    /// # }
    /// ```
    pub async fn draining(&self) {
        self.epoch.draining.cancelled().await
    }

    /// The drain signal, for code that checks it without awaiting.
    #[cfg_attr(not(feature = "hyper"), allow(dead_code))]
    pub(crate) fn draining_token(&self) -> CancellationToken {
        self.epoch.draining.clone()
    }

    /// The cut signal, for code that checks it without awaiting.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn cut_token(&self) -> CancellationToken {
        self.epoch.cut.clone()
    }

    /// Resolves when the drain is over: what is still open is dropped.
    #[cfg_attr(not(feature = "hyper"), allow(dead_code))]
    pub(crate) async fn over(&self) {
        self.epoch.over.cancelled().await
    }

    /// Whether draining has begun for this connection.
    ///
    /// ```
    /// let drain = handoff::Drain::new();
    /// assert!(!drain.track().is_draining());
    /// ```
    pub fn is_draining(&self) -> bool {
        self.epoch.draining.is_cancelled()
    }

    /// Resolves when the connection must close now: the drain deadline is
    /// near (the cut comes up to 250 ms before it, so that a protocol can
    /// end what it cut properly) or draining was forced.
    ///
    /// ```no_run
    /// # async fn f(guard: handoff::ConnectionGuard) {
    /// guard.cut().await; // stop whatever the connection does
    /// # }
    /// ```
    pub async fn cut(&self) {
        self.epoch.cut.cancelled().await
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_last_connection() {
        let drain = Drain::new();
        let guards: Vec<_> = (0..3).map(|_| drain.track()).collect();
        for guard in guards {
            tokio::spawn(async move {
                guard.draining().await;
                tokio::task::yield_now().await;
                drop(guard);
            });
        }
        let report = drain
            .drain(Duration::from_secs(10), std::future::pending())
            .await;
        assert_eq!(report.cut, 0);
        assert!(!report.forced);
        assert!(report.waited < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn force_cuts_at_once() {
        let drain = Drain::new();
        let guard = drain.track();
        let report = drain.drain(Duration::from_secs(3600), async {}).await;
        assert_eq!(report.cut, 1);
        assert!(report.forced);
        // The guard is told to close now.
        tokio::time::timeout(Duration::from_secs(5), guard.cut())
            .await
            .unwrap();
    }
}
