//! The one owner of a process's lifecycle: every transition between
//! starting, serving, upgrading, handed over and stopping goes through
//! [`Lifecycle`], so the invariants live here and nowhere else:
//!
//! - at most one upgrade is in flight (`Serving → Upgrading` is the only way in);
//! - a process upgrades only once it serves (its own parent's upgrade is over);
//! - a process that handed over accepts nothing until it takes the sockets
//!   back (`HandedOver → Serving`), which only its upgrade task may do;
//! - `Stopping` is final: nothing leaves it.
//!
//! The state is published on a `tokio::sync::watch` channel, so callers wait
//! for a condition (serving, stopping, taken back) instead of polling.

use tokio::sync::watch;

use crate::error::{Error, UpgradeError};
use crate::StopReason;

/// Where a process is in its life. See `docs/design.md` for the diagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not ready yet.
    Starting,
    /// `ready()` was called; a successor waits for its parent to commit.
    Readying,
    /// The process serving new connections; may upgrade.
    Serving,
    /// A successor is starting; this process still serves.
    Upgrading,
    /// A successor serves; this process drains and watches it, and takes the
    /// sockets back if it dies.
    HandedOver {
        /// The successor's PID.
        successor: u32,
    },
    /// Stopping for good.
    Stopping {
        /// Why.
        reason: StopReason,
        /// The successor that serves instead, if any (and still alive).
        successor: Option<u32>,
    },
}

/// The lifecycle as published: the phase and what goes with it.
#[derive(Debug, Clone)]
pub(crate) struct Life {
    pub phase: Phase,
    /// Whether the process ever reached `Serving` (only then may it remove
    /// socket paths and the PID file on its way out).
    pub served: bool,
    /// A `SIGHUP` that arrived before the process served, run once it does.
    pub pending_upgrade: bool,
    /// The probation after a handover is over (or the successor handed over
    /// in turn): the process may exit once drained.
    pub probation_over: bool,
    /// An upgrade task has not decided yet (commit or roll back), even if the
    /// process began to stop meanwhile: it must not exit before that.
    pub upgrade_in_flight: bool,
    /// A `SIGHUP` is being passed on to the successor: the process must not
    /// exit before it is.
    pub passing_hangup: bool,
}

impl Life {
    /// Whether the process accepts new connections in this phase.
    pub(crate) fn accepting(&self) -> bool {
        matches!(self.phase, Phase::Serving | Phase::Upgrading)
    }

    /// Why the process does not accept, if it does not (and is past starting).
    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        match &self.phase {
            Phase::HandedOver { successor } => Some(StopReason::Upgraded {
                successor: *successor,
            }),
            Phase::Stopping { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }

    /// The successor that took over, if any.
    pub(crate) fn successor(&self) -> Option<u32> {
        match self.phase {
            Phase::HandedOver { successor } => Some(successor),
            Phase::Stopping { successor, .. } => successor,
            _ => None,
        }
    }
}

/// The owner of [`Life`]: a small API of transitions, each checked.
pub(crate) struct Lifecycle {
    tx: watch::Sender<Life>,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Lifecycle {
            tx: watch::Sender::new(Life {
                phase: Phase::Starting,
                served: false,
                pending_upgrade: false,
                probation_over: false,
                upgrade_in_flight: false,
                passing_hangup: false,
            }),
        }
    }

    /// A copy of the current state.
    pub(crate) fn get(&self) -> Life {
        self.tx.borrow().clone()
    }

    /// Waits until `ready` holds, and returns the state that satisfied it.
    pub(crate) async fn wait(&self, ready: impl FnMut(&Life) -> bool) -> Life {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let life = rx.wait_for(ready).await.map(|life| life.clone());
        match life {
            Ok(life) => life,
            Err(_) => std::future::pending().await,
        }
    }

    /// Applies `change` if it returns `Ok`, publishing the new state.
    fn apply<T, E>(&self, change: impl FnOnce(&mut Life) -> Result<T, E>) -> Result<T, E> {
        let mut result = None;
        self.tx.send_if_modified(|life| {
            let mut next = life.clone();
            let outcome = change(&mut next);
            let ok = outcome.is_ok();
            result = Some(outcome);
            if ok {
                *life = next;
            }
            ok
        });
        result.expect("send_if_modified runs the closure")
    }

    /// `Starting → Readying`, once.
    pub(crate) fn begin_ready(&self) -> Result<(), Error> {
        self.apply(|life| match life.phase {
            Phase::Starting => {
                life.phase = Phase::Readying;
                Ok(())
            }
            _ => Err(Error::AlreadyReady),
        })
    }

    /// `Readying → Starting`: telling the parent failed.
    pub(crate) fn ready_failed(&self) {
        let _ = self.apply(|life| match life.phase {
            Phase::Readying => {
                life.phase = Phase::Starting;
                Ok(())
            }
            _ => Err(()),
        });
    }

    /// `Readying → Serving`. `on_serve` runs before anyone can see the new
    /// phase (so its log line comes before any upgrade's), under the state's
    /// lock: it must not use the `Lifecycle`. Returns whether a `SIGHUP` was
    /// kept meanwhile (it is taken: the caller runs it); `Err` if the process
    /// stopped first.
    pub(crate) fn serve(&self, on_serve: impl FnOnce()) -> Result<bool, ()> {
        self.apply(|life| match life.phase {
            Phase::Readying => {
                on_serve();
                life.phase = Phase::Serving;
                life.served = true;
                Ok(std::mem::take(&mut life.pending_upgrade))
            }
            _ => Err(()),
        })
    }

    /// `Serving → Upgrading`. Before the process serves, with
    /// `keep_if_early`, the request is kept (one at most) and run once it
    /// does; it is still reported as [`UpgradeError::NotReady`].
    pub(crate) fn begin_upgrade(&self, keep_if_early: bool) -> Result<(), UpgradeError> {
        let mut outcome = Err(UpgradeError::NotReady);
        self.tx.send_if_modified(|life| {
            let (result, changed) = match life.phase {
                Phase::Serving => {
                    life.phase = Phase::Upgrading;
                    life.upgrade_in_flight = true;
                    (Ok(()), true)
                }
                Phase::Starting | Phase::Readying => {
                    let keep = keep_if_early && !life.pending_upgrade;
                    life.pending_upgrade |= keep;
                    (Err(UpgradeError::NotReady), keep)
                }
                Phase::Upgrading => (Err(UpgradeError::InProgress), false),
                Phase::HandedOver { successor }
                | Phase::Stopping {
                    successor: Some(successor),
                    ..
                } => (Err(UpgradeError::AlreadyUpgraded { successor }), false),
                Phase::Stopping { .. } => (Err(UpgradeError::Stopping), false),
            };
            outcome = result;
            changed
        });
        outcome
    }

    /// `Upgrading → Serving`: the upgrade failed or was abandoned (if the
    /// process stops meanwhile, it stays stopping). The upgrade is over.
    pub(crate) fn abort_upgrade(&self) {
        let _ = self.apply(|life| {
            if !life.upgrade_in_flight {
                return Err(());
            }
            life.upgrade_in_flight = false;
            if life.phase == Phase::Upgrading {
                life.phase = Phase::Serving;
            }
            Ok(())
        });
    }

    /// `Upgrading → HandedOver`: the commit point. False if the process began
    /// stopping first (then the upgrade must be rolled back).
    pub(crate) fn commit(&self, successor: u32) -> bool {
        self.apply(|life| match life.phase {
            Phase::Upgrading => {
                life.phase = Phase::HandedOver { successor };
                life.probation_over = false;
                life.upgrade_in_flight = false;
                Ok(())
            }
            _ => Err(()),
        })
        .is_ok()
    }

    /// `HandedOver → Serving`: the successor died; this process serves again.
    pub(crate) fn take_back(&self) -> bool {
        self.apply(|life| match life.phase {
            Phase::HandedOver { .. } => {
                life.phase = Phase::Serving;
                Ok(())
            }
            _ => Err(()),
        })
        .is_ok()
    }

    /// A `SIGHUP` for a process that handed over and is still systemd's
    /// main process (in its probation or drain, or about to exit): it is
    /// for the successor. The handover becomes final at once (`HandedOver →
    /// Stopping`): systemd hears `MAINPID=` of the successor before it gets
    /// the signal, and after that this process must never take the sockets
    /// back. The successor to pass it to; `None` while one is passed on
    /// already, or with no successor.
    pub(crate) fn begin_passing_hangup(&self) -> Option<u32> {
        self.apply(|life| {
            if life.passing_hangup {
                return Err(());
            }
            let successor = match life.phase {
                Phase::HandedOver { successor } => {
                    life.phase = Phase::Stopping {
                        reason: StopReason::Upgraded { successor },
                        successor: Some(successor),
                    };
                    successor
                }
                Phase::Stopping {
                    successor: Some(successor),
                    ..
                } => successor,
                _ => return Err(()),
            };
            life.passing_hangup = true;
            Ok(successor)
        })
        .ok()
    }

    /// The `SIGHUP` was passed on, and with it the probation is over.
    pub(crate) fn end_passing_hangup(&self) {
        let _ = self.apply(|life| {
            life.passing_hangup = false;
            life.probation_over = true;
            Ok::<(), ()>(())
        });
    }

    /// The probation after a handover is over.
    pub(crate) fn end_probation(&self) {
        let _ = self.apply(|life| {
            if life.probation_over {
                return Err(());
            }
            life.probation_over = true;
            Ok(())
        });
    }

    /// `HandedOver → Stopping`: the handover is final (the process is about
    /// to exit). True if this call made it final.
    pub(crate) fn finish_handover(&self) -> bool {
        self.apply(|life| match life.phase {
            Phase::HandedOver { successor } => {
                life.phase = Phase::Stopping {
                    reason: StopReason::Upgraded { successor },
                    successor: Some(successor),
                };
                Ok(())
            }
            _ => Err(()),
        })
        .is_ok()
    }

    /// The successor of a process that stops for good is gone: nobody to hand
    /// the service to.
    pub(crate) fn successor_gone(&self) {
        let _ = self.apply(|life| match &mut life.phase {
            Phase::Stopping { successor, .. } if successor.is_some() => {
                *successor = None;
                Ok(())
            }
            _ => Err(()),
        });
    }

    /// Any phase but `Stopping` → `Stopping`. `on_stop` runs with the phase
    /// it leaves before anyone can see the stop (so what it tells systemd
    /// comes first); it runs under the state's lock, so it must not use the
    /// `Lifecycle`. Returns false if the process was stopping already.
    pub(crate) fn stop(&self, reason: StopReason, on_stop: impl FnOnce(&Phase)) -> bool {
        let mut on_stop = Some(on_stop);
        self.apply(|life| {
            let successor = match life.phase {
                Phase::Stopping { .. } => return Err(()),
                Phase::HandedOver { successor } => Some(successor),
                _ => None,
            };
            if let Some(on_stop) = on_stop.take() {
                on_stop(&life.phase);
            }
            life.phase = Phase::Stopping { reason, successor };
            life.pending_upgrade = false;
            Ok(())
        })
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> Lifecycle {
        let life = Lifecycle::new();
        life.begin_ready().unwrap();
        assert_eq!(life.serve(|| {}), Ok(false));
        life
    }

    #[test]
    fn one_upgrade_at_a_time_and_only_when_serving() {
        let life = Lifecycle::new();
        assert!(matches!(
            life.begin_upgrade(false),
            Err(UpgradeError::NotReady)
        ));
        let life = serving();
        life.begin_upgrade(false).unwrap();
        assert!(matches!(
            life.begin_upgrade(false),
            Err(UpgradeError::InProgress)
        ));
        life.abort_upgrade();
        life.begin_upgrade(false).unwrap();
        assert!(life.commit(42));
        assert!(matches!(
            life.begin_upgrade(false),
            Err(UpgradeError::AlreadyUpgraded { successor: 42 })
        ));
        assert!(!life.get().accepting());
    }

    #[test]
    fn an_early_sighup_is_kept_once_and_run_when_serving() {
        let life = Lifecycle::new();
        assert!(life.begin_upgrade(true).is_err());
        assert!(life.begin_upgrade(true).is_err());
        life.begin_ready().unwrap();
        assert!(life.begin_upgrade(true).is_err());
        assert_eq!(life.serve(|| {}), Ok(true), "one kept request");
        assert!(!life.get().pending_upgrade, "taken, never run twice");
    }

    #[test]
    fn take_back_only_from_handed_over_and_stopping_is_final() {
        let life = serving();
        assert!(!life.take_back());
        life.begin_upgrade(false).unwrap();
        assert!(life.commit(7));
        assert_eq!(
            life.get().stop_reason(),
            Some(StopReason::Upgraded { successor: 7 })
        );
        assert!(life.take_back());
        assert!(life.get().accepting());
        life.begin_upgrade(false).unwrap();
        assert!(life.commit(8));
        assert!(life.stop(StopReason::Signal("SIGTERM"), |_| {}));
        assert_eq!(life.get().successor(), Some(8));
        assert!(!life.take_back(), "a stopping process never resumes");
        assert!(!life.finish_handover());
        assert!(!life.stop(StopReason::Requested, |_| panic!("stopped twice")));
    }

    #[test]
    fn a_commit_loses_to_a_stop() {
        let life = serving();
        life.begin_upgrade(false).unwrap();
        life.stop(StopReason::Signal("SIGTERM"), |_| {});
        assert!(life.get().upgrade_in_flight, "the task has not decided yet");
        assert!(!life.commit(9));
        assert_eq!(life.get().successor(), None);
        life.abort_upgrade();
        let after = life.get();
        assert!(!after.upgrade_in_flight);
        assert!(
            matches!(after.phase, Phase::Stopping { .. }),
            "still stopping"
        );
    }
}
