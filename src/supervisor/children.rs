//! The supervisor's table of children: each one's identity, generation and
//! state. A child is in the table from its spawn until it is reaped, so a
//! PID found here cannot have been recycled (only reaping frees it), and
//! signals go through its pidfd, which names that process and no other.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::control::GenerationState;

/// Where one child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Started; not ready yet (the first child, a restart or an upgrade).
    Starting,
    /// The one child that serves.
    Serving,
    /// Told to stop (an upgrade replaced it, a failed start, or a stop);
    /// killed at `deadline` if still alive.
    Retiring { deadline: Option<Instant> },
}

/// One child, from spawn to reaping.
pub(super) struct Child {
    /// Never reused within a supervisor's life (PIDs are).
    pub id: u64,
    pub pid: u32,
    pidfd: OwnedFd,
    pub generation: u64,
    pub state: State,
    pub started: Instant,
}

impl Child {
    /// Sends `signal` to this very process (through its pidfd).
    pub fn signal(&self, signal: Signal) {
        if let Err(error) = crate::pidfd::send_signal(self.pidfd.as_fd(), signal) {
            tracing::debug!(pid = self.pid, %signal, %error, "signal not delivered");
        }
    }

    /// Kills the child (through its pidfd, even if it left its group) and
    /// its process group: it and whatever it started. Only while it is in
    /// the table (not reaped), so the group ID is still its.
    pub fn kill_group(&self) {
        self.signal(Signal::SIGKILL);
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }

    /// Sends `signal` to the child's whole process group (a server behind
    /// a shell script without `exec`, and its workers); to the child alone
    /// (its pidfd) if that group is gone (it joined another). Once only: a
    /// second stop signal means "stop now" to many servers, the library's
    /// among them.
    pub fn signal_group(&self, signal: Signal) {
        if killpg(Pid::from_raw(self.pid as i32), signal).is_err() {
            self.signal(signal);
        }
    }

    /// The state as the control protocol reports it.
    pub fn reported_state(&self) -> GenerationState {
        match self.state {
            State::Starting => GenerationState::Starting,
            State::Serving => GenerationState::Serving,
            State::Retiring { .. } => GenerationState::Draining,
        }
    }
}

/// Every child not yet reaped, newest first.
#[derive(Default)]
pub(super) struct Children {
    list: Vec<Child>,
    next_id: u64,
}

impl Children {
    /// Records a child just spawned; returns its id.
    pub fn add(&mut self, pid: u32, pidfd: OwnedFd, generation: u64) -> u64 {
        self.next_id += 1;
        self.list.insert(
            0,
            Child {
                id: self.next_id,
                pid,
                pidfd,
                generation,
                state: State::Starting,
                started: Instant::now(),
            },
        );
        self.next_id
    }

    pub fn get(&self, id: u64) -> Option<&Child> {
        self.list.iter().find(|c| c.id == id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Child> {
        self.list.iter_mut().find(|c| c.id == id)
    }

    /// Removes the child that had `pid`, once it has been reaped.
    pub fn reaped(&mut self, pid: u32) -> Option<Child> {
        let index = self.list.iter().position(|c| c.pid == pid)?;
        Some(self.list.remove(index))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Child> {
        self.list.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Child> {
        self.list.iter_mut()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The earliest kill deadline of a retiring child.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|c| match c.state {
                State::Retiring { deadline } => deadline,
                _ => None,
            })
            .min()
    }
}
