//! Retiring and stopping children: the stop signal to each child's process
//! group, drain deadlines, `SIGKILL` for what outlives them (remnant groups
//! included), and signals forwarded to the serving child.

use std::time::Instant;

use nix::sys::signal::Signal;

use super::children::State;
use super::{group_alive, Loop, Stopping};
use crate::control::Response;

impl Loop {
    /// Asks child `id` to drain and exit; kills its group at the drain deadline.
    pub(super) fn retire(&mut self, id: u64) {
        let (stop_signal, drain_timeout) = (self.config.stop_signal, self.config.drain_timeout);
        if let Some(child) = self.children.get_mut(id) {
            child.state = State::Retiring {
                deadline: Some(Instant::now() + drain_timeout),
            };
            child.signal_group(stop_signal);
        }
    }

    /// Kills the retiring children whose drain deadline passed.
    pub(super) fn kill_overdue(&mut self) {
        let now = Instant::now();
        for child in self.children.iter_mut() {
            if let State::Retiring {
                deadline: Some(deadline),
            } = child.state
            {
                if deadline <= now {
                    tracing::warn!(
                        pid = child.pid,
                        "child did not exit within the drain timeout; SIGKILL"
                    );
                    child.kill_group();
                    child.state = State::Retiring { deadline: None };
                }
            }
        }
    }

    /// Forgets remnant groups that are gone; kills those past their deadline.
    pub(super) fn check_remnants(&mut self) {
        let now = Instant::now();
        self.remnants.retain(|&(pgid, deadline)| {
            if deadline <= now {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid as i32),
                    Signal::SIGKILL,
                );
            }
            group_alive(pgid)
        });
    }

    /// Stops every child with the stop signal; a second stop kills them.
    pub(super) fn stop(&mut self, name: &str) {
        if self.stopping.is_some() {
            tracing::warn!(signal = name, "second stop signal: killing now");
            self.kill_all();
            return;
        }
        tracing::info!(
            reason = name,
            "stopping: the stop signal goes to every child"
        );
        self.handoff.notify("STOPPING=1\nSTATUS=Stopping");
        self.stopping = Some(Stopping {
            deadline: Instant::now() + self.config.drain_timeout,
        });
        self.restart_at = None;
        if let Some(candidate) = self.candidate.take() {
            candidate.check.abort();
            for reply in candidate.replies {
                let _ = reply.send(Response::error("stopping"));
            }
        }
        for reply in self.queued_upgrade.take().into_iter().flatten() {
            let _ = reply.send(Response::error("stopping"));
        }
        let stop_signal = self.config.stop_signal;
        for child in self.children.iter_mut() {
            child.signal_group(stop_signal);
            if child.state != State::Serving {
                child.state = State::Retiring { deadline: None };
            }
        }
        // No child starts any more: our copies of the sockets would only keep
        // them open after the children stop accepting, leaving new clients
        // in a backlog nobody accepts until we exit, instead of refused. (The
        // paths we bound stay recorded, to unlink at the end.)
        crate::handoff::lock(&self.handoff.inner.registry).close_all();
    }

    pub(super) fn kill_all(&mut self) {
        for child in self.children.iter() {
            child.kill_group();
        }
        for (_, deadline) in &mut self.remnants {
            *deadline = Instant::now();
        }
        self.check_remnants();
    }

    pub(super) fn forward(&self, signal: Signal) {
        if let Some(child) = self.serving.and_then(|id| self.children.get(id)) {
            child.signal(signal);
        }
    }
}
