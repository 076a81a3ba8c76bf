//! What the supervisor reports: `handoff status`, and `STATUS=` (with
//! `READY=1` once a child served) for systemd.

use std::time::Instant;

use super::Loop;
use crate::control::{Generation, Status};

impl Loop {
    pub(super) fn status(&self) -> Status {
        let listeners: Vec<String> = self.config.listen.iter().map(|(n, _)| n.clone()).collect();
        Status {
            pid: std::process::id(),
            generations: self
                .children
                .iter()
                .map(|c| Generation {
                    pid: c.pid,
                    generation: c.generation,
                    state: c.reported_state(),
                    age_secs: c.started.elapsed().as_secs_f64(),
                    connections: None,
                    listeners: listeners.clone(),
                })
                .collect(),
            upgrades_done: self.upgrades_done,
            upgrades_failed: self.upgrades_failed,
            last_failure: self.last_failure.clone(),
            restarts: self.restarts.count(Instant::now()) as u64,
            last_error: self.last_error.clone(),
            next_restart_in_secs: self
                .restart_at
                .map(|at| at.saturating_duration_since(Instant::now()).as_secs_f64()),
        }
    }

    /// `READY=1` and a status line for systemd (ends a reload, too).
    pub(super) fn status_line(&self) {
        if self.stopping.is_some() {
            return;
        }
        // READY=1 only once a child served: before, systemd must go on
        // waiting (TimeoutStartSec=), not start what depends on us.
        let ready = if self.told_ready { "READY=1\n" } else { "" };
        self.handoff
            .notify(&format!("{ready}STATUS={}", self.status_text()));
    }

    /// What `STATUS=` says: who serves, what it says itself, the last
    /// failed upgrade.
    pub(super) fn status_text(&self) -> String {
        let serving = self.serving.and_then(|id| self.children.get(id));
        let mut status = match serving {
            Some(c) => format!("Serving, generation {} (pid {})", c.generation, c.pid),
            None => "No child serving".to_owned(),
        };
        if let Some(child_says) = serving.and_then(|c| self.inbox.status_of(c.pid)) {
            status.push_str("; it says: ");
            status.push_str(&child_says);
        }
        if let Some(failure) = &self.last_failure {
            status.push_str("; last upgrade failed: ");
            status.push_str(failure);
        }
        status
    }
}
