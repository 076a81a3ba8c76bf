//! systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` at half the timeout,
//! from whichever generation is the service's main process at the moment.
//!
//! systemd sets `WATCHDOG_USEC` and `WATCHDOG_PID` for the main process it
//! starts. Across an upgrade the main process changes: the old one stays
//! main through its probation and drain (systemd hears `MAINPID=` of the
//! successor only then) and pings until it has told systemd; the successor
//! pings from the moment its parent says that systemd confirmed it as main
//! (`MAIN=1` on the readiness channel), or its parent is gone. Pings from a
//! process that is not main would be dropped by systemd under
//! `NotifyAccess=main` (with a warning in the journal), so none are sent.
//! A successor also gets `WATCHDOG_USEC` and its own PID in `WATCHDOG_PID`
//! in its environment, as systemd would give it, for code of its own that
//! checks `sd_watchdog_enabled(3)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::handoff::{lock, Handoff};

/// `WATCHDOG_USEC`: the timeout systemd set.
pub(crate) const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// `WATCHDOG_PID`: the process the timeout is for.
pub(crate) const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// This process's part in the service's watchdog.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The service's timeout, if systemd set one (for this process, or for
    /// the predecessor that passed it on).
    timeout: Option<Duration>,
    /// Whether this process is the service's main process for systemd.
    main: watch::Sender<bool>,
    /// The ping task runs (once per process).
    started: AtomicBool,
}

impl Watchdog {
    /// From the environment: `WATCHDOG_USEC`, if `WATCHDOG_PID` is unset or
    /// this process. `main`: whether this process starts as the main
    /// process (not a successor, which becomes it later).
    pub(crate) fn from_env(main: bool) -> Self {
        let var = |name| std::env::var(name).ok();
        let timeout = parse(
            var(WATCHDOG_USEC).as_deref(),
            var(WATCHDOG_PID).as_deref(),
            std::process::id(),
        );
        Watchdog {
            timeout,
            main: watch::Sender::new(main),
            started: AtomicBool::new(false),
        }
    }

    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// systemd knows this process as the main one now.
    pub(crate) fn became_main(&self) {
        self.main.send_replace(true);
    }

    /// Waits at most `timeout` until this process is the main one; whether
    /// it is.
    pub(crate) async fn wait_main(&self, timeout: Duration) -> bool {
        let mut main = self.main.subscribe();
        tokio::time::timeout(timeout, main.wait_for(|main| *main))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }
}

/// The timeout `usec` says, if it is for `pid` (`sd_watchdog_enabled(3)`).
fn parse(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if let Some(for_pid) = for_pid {
        if for_pid.parse::<u32>().ok()? != pid {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

impl Handoff {
    /// The service manager's watchdog timeout (systemd's `WatchdogSec=`), if
    /// it set one for this service. [`Serve`](crate::Serve) pings it; see
    /// [`run_watchdog`](Self::run_watchdog).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// if let Some(timeout) = handoff.watchdog_timeout() {
    ///     println!("systemd expects WATCHDOG=1 within {timeout:?}");
    /// }
    /// ```
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.inner.watchdog.timeout()
    }

    /// Sends `WATCHDOG=1` at half the watchdog timeout for as long as this
    /// process is the service's main process, through every upgrade: a
    /// successor starts once systemd knows it as main, and this process
    /// stops once it told systemd its successor's PID (then the future
    /// ends). Returns at once without a watchdog, or if it already runs.
    ///
    /// The pings say that this process's runtime is alive. [`Serve`]
    /// spawns this; without it, spawn it yourself once:
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// tokio::spawn(handoff.clone().run_watchdog());
    /// # }
    /// ```
    ///
    /// [`Serve`]: crate::Serve
    pub async fn run_watchdog(self) {
        let inner = &self.inner;
        let Some(timeout) = inner.watchdog.timeout() else {
            return;
        };
        if inner.watchdog.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let every = (timeout / 2).max(Duration::from_millis(1));
        tracing::debug!(
            pid = inner.pid,
            ?every,
            "pinging the service manager's watchdog"
        );
        let mut main = inner.watchdog.main.subscribe();
        loop {
            if main.wait_for(|main| *main).await.is_err() {
                return;
            }
            {
                // Checked and sent under the lock the handover takes: no
                // ping can follow this process's own MAINPID=.
                let told = lock(&inner.manager_told);
                if *told {
                    tracing::debug!(pid = inner.pid, "handed over: no more watchdog pings");
                    return;
                }
                self.notify("WATCHDOG=1");
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_is_for_the_pid_it_names() {
        let two_s = Some(Duration::from_secs(2));
        assert_eq!(parse(Some("2000000"), Some("42"), 42), two_s);
        assert_eq!(parse(Some("2000000"), None, 42), two_s);
        assert_eq!(parse(Some("2000000"), Some("41"), 42), None);
        assert_eq!(parse(Some("0"), Some("42"), 42), None);
        assert_eq!(parse(Some("soon"), None, 42), None);
        assert_eq!(parse(None, Some("42"), 42), None);
        assert_eq!(parse(Some("2000000"), Some("x"), 42), None);
    }
}
