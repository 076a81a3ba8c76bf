//! The supervisor and systemd's watchdog (`WatchdogSec=`).
//!
//! The supervisor pings systemd (`WATCHDOG=1` at half the timeout) for as
//! long as its own loop runs, restarts included: a crash loop ends at the
//! start limit, and then `Restart=` takes over. It passes the watchdog on
//! to each child as systemd would (`WATCHDOG_USEC`, and the child's own PID
//! in `WATCHDOG_PID`), and holds the serving child to it once the child has
//! pinged (to the supervisor's notify socket): a child that then misses its
//! timeout is hung, and is replaced, not the whole service. It gets
//! `SIGABRT` (as systemd's `WatchdogSignal=`, for a core dump) and `SIGKILL`
//! after the kill grace, and a new child starts at once on the same
//! sockets. Children that never ping (most servers) are not watched.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::children::State;
use super::Loop;

/// How long a hung child has after `SIGABRT` before `SIGKILL`.
const ABORT_GRACE: Duration = Duration::from_secs(2);

impl Loop {
    /// Each tick of the watchdog interval: ping systemd, check the child.
    pub(super) fn on_watchdog_tick(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.handoff.notify("WATCHDOG=1");
        self.check_serving_child();
    }

    /// Replaces the serving child if it pinged once and then stopped.
    fn check_serving_child(&mut self) {
        let (Some(timeout), Some(id)) = (self.handoff.watchdog_timeout(), self.serving) else {
            return;
        };
        let Some(child) = self.children.get_mut(id) else {
            return;
        };
        let Some(last) = self.inbox.last_ping(child.pid) else {
            return;
        };
        let silent = last.elapsed();
        if silent <= timeout {
            return;
        }
        let why = format!(
            "the serving process (pid {}) sent no WATCHDOG=1 for {:.1} s, over its watchdog timeout of {:?}: it hangs",
            child.pid,
            silent.as_secs_f64(),
            timeout
        );
        tracing::error!(pid = child.pid, error = %why, "replacing a hung child: SIGABRT, then SIGKILL (the sockets stay open)");
        child.signal_group(Signal::SIGABRT);
        child.state = State::Retiring {
            deadline: Some(Instant::now() + ABORT_GRACE),
        };
        self.serving = None;
        self.serving_lost(why);
    }
}
