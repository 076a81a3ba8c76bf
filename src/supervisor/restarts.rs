//! The start limit: how often a child is restarted (after a failed start,
//! or after the serving child died) before the supervisor gives up, as systemd's
//! `StartLimitBurst=`/`StartLimitIntervalSec=` do, so that a broken service
//! fails (and `Restart=` or a person takes over) instead of retrying forever.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Restarts within a sliding window, with a growing delay between them.
pub(super) struct Restarts {
    max: u32,
    window: Duration,
    recent: VecDeque<Instant>,
    /// Failures in a row since the last child that served.
    streak: u32,
}

/// What to do after a child failed to start or died.
pub(super) enum Next {
    /// Try again at this moment.
    RetryAt(Instant),
    /// The limit is reached: stop, with this explanation.
    GiveUp(String),
}

impl Restarts {
    pub fn new(max: u32, window: Duration) -> Self {
        Restarts {
            max,
            window,
            recent: VecDeque::new(),
            streak: 0,
        }
    }

    /// A child needs restarting now; decides when, or whether at all.
    pub fn next(&mut self, now: Instant) -> Next {
        while self
            .recent
            .front()
            .is_some_and(|&at| now.duration_since(at) > self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.max as usize {
            return Next::GiveUp(format!(
                "{} restarts within {:?} (--max-restarts {} --restart-window {:?})",
                self.recent.len(),
                self.window,
                self.max,
                self.window
            ));
        }
        self.recent.push_back(now);
        let delay = Duration::from_millis(100) * 2u32.saturating_pow(self.streak.min(6));
        self.streak += 1;
        Next::RetryAt(now + delay.min(Duration::from_secs(5)))
    }

    /// A child serves: the next failure starts the delays from the shortest.
    pub fn served(&mut self) {
        self.streak = 0;
    }

    /// Restarts counted in the window that ends `now`.
    pub fn count(&self, now: Instant) -> usize {
        self.recent
            .iter()
            .filter(|&&at| now.duration_since(at) <= self.window)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_after_max_restarts_within_the_window() {
        let mut restarts = Restarts::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(matches!(
                restarts.next(t0 + Duration::from_secs(i)),
                Next::RetryAt(_)
            ));
        }
        assert!(matches!(
            restarts.next(t0 + Duration::from_secs(4)),
            Next::GiveUp(_)
        ));
        // Once the window has slid past the first restarts, one more is allowed.
        assert!(matches!(
            restarts.next(t0 + Duration::from_secs(62)),
            Next::RetryAt(_)
        ));
    }

    #[test]
    fn delays_double_up_to_five_seconds_and_reset_once_serving() {
        let mut restarts = Restarts::new(100, Duration::from_secs(3600));
        let t0 = Instant::now();
        let delay = |r: &mut Restarts| match r.next(t0) {
            Next::RetryAt(at) => at - t0,
            Next::GiveUp(why) => panic!("{why}"),
        };
        assert_eq!(delay(&mut restarts), Duration::from_millis(100));
        assert_eq!(delay(&mut restarts), Duration::from_millis(200));
        for _ in 0..10 {
            delay(&mut restarts);
        }
        assert_eq!(delay(&mut restarts), Duration::from_secs(5));
        restarts.served();
        assert_eq!(delay(&mut restarts), Duration::from_millis(100));
    }
}
