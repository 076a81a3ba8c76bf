//! Starting children: spawning one with the sockets, its readiness check
//! (a task whose verdict comes back to the loop), and what follows: it
//! serves (the old one retires), or it failed (a restart, or the upgrade's
//! failure reported).

use std::time::Instant;

use tokio::sync::oneshot;

use super::children::State;
use super::{Candidate, Loop, Ready, Verdict};
use crate::control::Response;
use crate::env::NOTIFY_SOCKET;
use crate::launch::resolve_program;
use crate::spawn::{spawn, SpawnSpec};
use crate::watchdog::{WATCHDOG_PID, WATCHDOG_USEC};

impl Loop {
    /// Spawns a child of the next generation and starts its readiness
    /// check. A spawn that fails counts as a failed start.
    pub(super) fn start_candidate(
        &mut self,
        upgrade: bool,
        replies: Vec<oneshot::Sender<Response>>,
    ) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let spawned = self.spawn_child();
        let (pid, pidfd) = match spawned {
            Ok(child) => child,
            Err(why) => {
                let candidate = Candidate {
                    id: 0,
                    check: tokio::spawn(async {}),
                    upgrade,
                    replies,
                    failed: None,
                    ready_at: None,
                };
                self.candidate_failed(candidate, why);
                return;
            }
        };
        // A READY=1 that an earlier process with this PID sent means nothing.
        self.inbox.forget(pid);
        let id = self.children.add(pid, pidfd, generation);
        tracing::info!(pid, generation, upgrade, "child started");
        let (ready, inbox, verdicts) = (
            self.config.ready.clone(),
            self.inbox.clone(),
            self.verdicts.clone(),
        );
        let timeout = self.config.upgrade_timeout;
        let expected = match &ready {
            Ready::Notify => "it never sent READY=1 to $NOTIFY_SOCKET (sd_notify); a server that \
                              cannot send it can be run with --ready delay=DUR or --ready http=URL"
                .to_owned(),
            Ready::Delay(delay) => format!("--ready delay={delay:?}"),
            Ready::Http { authority, path } => {
                format!("GET http://{authority}{path} never answered 2xx from the new process; answers of other processes on a shared socket do not count")
            }
        };
        let check = tokio::spawn(async move {
            let verdict = tokio::select! {
                () = ready.wait(pid, &inbox) => Verdict::Ready(id),
                () = tokio::time::sleep(timeout) => Verdict::TooSlow(id, format!(
                    "the new process (pid {pid}) was not ready within {timeout:?} ({expected}); it was killed"
                )),
            };
            let _ = verdicts.send(verdict);
        });
        self.candidate = Some(Candidate {
            id,
            check,
            upgrade,
            replies,
            failed: None,
            ready_at: None,
        });
    }

    pub(super) fn spawn_child(&self) -> Result<(u32, std::os::fd::OwnedFd), String> {
        // Resolved at each start, so a deploy that replaced the binary (or
        // a PATH entry) is what runs; missing is missing however named.
        let first = &self.config.command[0];
        let program = resolve_program(first, &self.cwd)
            .ok_or_else(|| format!("{}: not found in PATH", first.to_string_lossy()))?;
        let mut env = vec![
            (NOTIFY_SOCKET, self.notify_addr.clone().into()),
            ("PWD", self.cwd.clone().into_os_string()),
        ];
        // The watchdog passes on to the child, as systemd would set it.
        let mut pid_vars = Vec::new();
        if let Some(timeout) = self.handoff.watchdog_timeout() {
            env.push((WATCHDOG_USEC, timeout.as_micros().to_string().into()));
            pid_vars.push(WATCHDOG_PID);
        }
        let registry = crate::handoff::lock(&self.handoff.inner.registry);
        let child = spawn(&SpawnSpec {
            program: &program,
            args: &self.config.command,
            cwd: &self.cwd,
            fds: registry.handoff_fds(),
            channel: None,
            env,
            // Any program reads LISTEN_FDNAMES, so it must fit.
            vars_fd: false,
            ignore_sighup: false,
            // Killed with SIGKILL, the supervisor leaves no orphan holding
            // the sockets: its children get the stop signal and drain.
            parent_death_signal: Some(self.config.stop_signal),
            pid_vars,
        })
        .map_err(|e| e.to_string())?;
        drop(registry);
        match child.into_pidfd() {
            (pid, Some(pidfd)) => Ok((pid, pidfd)),
            (pid, None) => Err(format!("no pidfd for the new process (pid {pid})")),
        }
    }

    pub(super) fn on_verdict(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Ready(id) if self.candidate.as_ref().is_some_and(|c| c.id == id) => {
                // --min-uptime keeps an old child serving beside the new
                // one; with none serving (the first start, a restart) the
                // new one serves at once.
                if self.config.min_uptime.is_zero() || self.serving.is_none() {
                    if let Some(candidate) = self.candidate.take() {
                        self.candidate_ready(candidate);
                    }
                } else if let Some(candidate) = self.candidate.as_mut() {
                    tracing::info!(min_uptime = ?self.config.min_uptime, "new child ready; it takes over once it has lived --min-uptime");
                    candidate.ready_at = Some(Instant::now());
                }
            }
            Verdict::TooSlow(id, why) => {
                if let Some(candidate) = self.candidate.as_mut().filter(|c| c.id == id) {
                    candidate.failed = Some(why);
                    if let Some(child) = self.children.get(id) {
                        child.kill_group();
                    }
                }
            }
            // A verdict on a child that is gone already.
            Verdict::Ready(_) => {}
        }
    }

    /// The candidate is ready: it serves from now on, and whichever child
    /// serves at this moment (not when the upgrade began) retires.
    pub(super) fn candidate_ready(&mut self, candidate: Candidate) {
        let id = candidate.id;
        let Some(child) = self.children.get_mut(id) else {
            return;
        };
        child.state = State::Serving;
        let (pid, generation) = (child.pid, child.generation);
        if let Some(old) = self.serving.replace(id) {
            self.retire(old);
        }
        self.restarts.served();
        if !self.told_ready {
            // The first child that serves: now the supervisor is ready.
            self.told_ready = true;
            if let Err(error) = self.handoff.ready() {
                tracing::warn!(%error, "cannot report ready");
            }
        }
        if candidate.upgrade {
            self.upgrades_done += 1;
            tracing::info!(pid, generation, "upgrade succeeded");
        } else {
            tracing::info!(pid, generation, "child serving");
        }
        for reply in candidate.replies {
            let _ = reply.send(Response::upgraded(pid, generation));
        }
        self.status_line();
        self.run_queued_upgrade();
    }

    /// Starts the upgrade that waited for the first child, if any.
    pub(super) fn run_queued_upgrade(&mut self) {
        if let Some(replies) = self.queued_upgrade.take() {
            if replies.is_empty() {
                self.upgrade(None);
            }
            for reply in replies {
                // One upgrade; later replies are refused as "in flight".
                self.upgrade(Some(reply));
            }
        }
    }

    /// The candidate failed (exited, too slow, or could not be spawned).
    pub(super) fn candidate_failed(&mut self, candidate: Candidate, why: String) {
        candidate.check.abort();
        if candidate.upgrade {
            self.upgrades_failed += 1;
            self.last_failure = Some(why.clone());
        }
        for reply in candidate.replies {
            let _ = reply.send(Response::error(why.clone()));
        }
        self.last_error = Some(why.clone());
        if self.stopping.is_some() {
            return;
        }
        if self.serving.is_some() {
            tracing::error!(error = %why, "upgrade failed; the old child keeps serving");
        } else {
            tracing::error!(error = %why, "child did not start");
            self.handoff
                .notify(&format!("STATUS=Starting failed ({why}); retrying"));
            self.schedule_restart();
        }
        self.status_line();
        self.run_queued_upgrade();
    }
}
