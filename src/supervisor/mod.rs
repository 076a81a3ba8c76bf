//! `handoff run`: a resident supervisor with a stable PID that owns the
//! listening sockets and runs a server written in any language that speaks
//! systemd socket activation. Upgrading starts a new child with the same
//! sockets, waits until it is ready, then stops the old one; a failed child
//! is killed and the old one keeps serving. A child that dies is restarted
//! with backoff while the sockets stay open, up to a start limit. As PID 1 it
//! reaps every orphan.
//!
//! One owner for the state: `Loop` holds the table of children and
//! decides every transition, one event at a time (a signal, a control
//! request, a child reaped, a readiness verdict, a timer). Waiting for a
//! child to get ready runs in a task that reports back, so the loop always
//! answers: `status` during a crash loop, `upgrade` to deploy the fix,
//! `SIGTERM` to stop. The loop's methods live by concept in `candidates`
//! (starting a child and its verdict), `stopping` (retiring, deadlines,
//! stop), `status` (what `handoff status` and systemd hear) and `watchdog`;
//! the loop itself, a child's exit and upgrades are here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::control::{Command, Response};
use crate::launch::logical_cwd;
use crate::notify::{monotonic_usec, NotifyListener};
use crate::readiness::Inbox;
pub use crate::readiness::{parse_duration, Ready};
use crate::Handoff;

pub(crate) mod accepted_by;
mod candidates;
mod children;
mod config;
mod control_socket;
mod listeners;
mod reaper;
mod restarts;
mod status;
mod stopping;
mod watchdog;

use children::{Children, State};
pub use config::{Config, HostPort, Listen};
use restarts::{Next, Restarts};

/// Runs the supervisor until it is told to stop; returns the exit status:
/// the serving child's, or an error if it gave up (the start limit) or could
/// not start at all.
///
/// `handoff` reads the environment (e.g. systemd's sockets). Call this on a
/// current-thread tokio runtime (as the `handoff` command does): children
/// are forked from that one thread, which their parent-death signal is tied
/// to, and the reaper must not run between a fork and its pidfd.
pub async fn run(handoff: Handoff, config: Config) -> Result<i32, String> {
    // Logical, so that `cd current && handoff run -- ./server` starts each
    // child through the `current` symlink as it is at that moment.
    let cwd = logical_cwd().map_err(|e| format!("cannot read the working directory: {e}"))?;
    if config.command.is_empty() {
        return Err("no command to run".into());
    }
    listeners::claim_all(&handoff, &config.listen)?;
    let notify =
        NotifyListener::bind().map_err(|e| format!("cannot create the notify socket: {e}"))?;
    let notify_addr = notify.addr().to_string();
    let (requests, incoming) = mpsc::channel(16);
    let control = match &config.control {
        Some(path) => Some(control_socket::serve(path, requests)?),
        None => None,
    };
    let reaped = reaper::start().map_err(|e| format!("cannot install the SIGCHLD handler: {e}"))?;
    let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
    let mut main = Loop {
        restarts: Restarts::new(config.max_restarts, config.restart_window),
        handoff,
        config,
        cwd,
        notify_addr,
        inbox: Inbox::start(notify),
        children: Children::default(),
        serving: None,
        candidate: None,
        restart_at: None,
        stopping: None,
        gave_up: None,
        next_generation: 1,
        upgrades_done: 0,
        upgrades_failed: 0,
        last_failure: None,
        last_error: None,
        serving_exit: None,
        told_ready: false,
        queued_upgrade: None,
        remnants: Vec::new(),
        verdicts,
    };
    let result = main.run(incoming, reaped, verdicts_rx).await;
    if let Some(path) = control {
        path.unlink_if_ours();
    }
    result
}

/// A child that is getting ready, and who waits for the outcome.
struct Candidate {
    id: u64,
    /// The task that waits for the readiness check.
    check: tokio::task::JoinHandle<()>,
    /// An upgrade (asked for) rather than a restart (after a failure).
    upgrade: bool,
    replies: Vec<oneshot::Sender<Response>>,
    /// Set when it already failed (not ready in time) and is being killed.
    failed: Option<String>,
    /// When it said ready; it takes over once it has lived `--min-uptime`
    /// more (until then the serving child serves on beside it).
    ready_at: Option<Instant>,
}

/// What the readiness task found.
enum Verdict {
    Ready(u64),
    TooSlow(u64, String),
}

/// Stopping for good: every child was told; killed at the deadline.
struct Stopping {
    deadline: Instant,
}

/// The one owner of the supervisor's state.
struct Loop {
    handoff: Handoff,
    config: Config,
    cwd: PathBuf,
    /// The notify socket children get as NOTIFY_SOCKET, and what it heard.
    notify_addr: String,
    inbox: Arc<Inbox>,
    children: Children,
    serving: Option<u64>,
    candidate: Option<Candidate>,
    restarts: Restarts,
    restart_at: Option<Instant>,
    stopping: Option<Stopping>,
    gave_up: Option<String>,
    next_generation: u64,
    upgrades_done: u64,
    upgrades_failed: u64,
    last_failure: Option<String>,
    /// Why the last child failed (to start, or while serving).
    last_error: Option<String>,
    /// The exit code of the child that served when the stop began.
    serving_exit: Option<i32>,
    /// Whether `Handoff::ready` was called (once a first child served).
    told_ready: bool,
    /// Process groups whose leader (a child) was reaped while other members
    /// lived on (a server behind a shell script without `exec`, workers):
    /// killed at their deadline, waited for before the supervisor exits.
    remnants: Vec<(u32, Instant)>,
    /// An upgrade asked for while the first child got ready, with who
    /// waits for its outcome; it starts once that child is ready or failed.
    queued_upgrade: Option<Vec<oneshot::Sender<Response>>>,
    verdicts: mpsc::UnboundedSender<Verdict>,
}

/// The next tick of `interval`, or never.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves at `at`, or never.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Loop {
    async fn run(
        &mut self,
        mut incoming: mpsc::Receiver<control_socket::Request>,
        mut reaped: mpsc::UnboundedReceiver<reaper::Reaped>,
        mut verdicts: mpsc::UnboundedReceiver<Verdict>,
    ) -> Result<i32, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("cannot install a signal handler: {e}"));
        let (mut hup, mut term, mut int) = (
            sig(SignalKind::hangup())?,
            sig(SignalKind::terminate())?,
            sig(SignalKind::interrupt())?,
        );
        let (mut usr1, mut usr2) = (
            sig(SignalKind::user_defined1())?,
            sig(SignalKind::user_defined2())?,
        );
        let inbox = self.inbox.clone();
        // Half the watchdog timeout, as sd_watchdog_enabled(3) advises.
        let mut watchdog = self.handoff.watchdog_timeout().map(|timeout| {
            tokio::time::interval((timeout / 2).max(std::time::Duration::from_millis(1)))
        });
        if let Some(interval) = &watchdog {
            tracing::info!(every = ?interval.period(), "pinging the service manager's watchdog");
        }
        self.start_candidate(false, Vec::new());
        loop {
            if self.stopping.is_some() && self.children.is_empty() && self.remnants.is_empty() {
                break;
            }
            let stop_deadline = self.stopping.as_ref().map(|s| s.deadline);
            let proven_at = self
                .candidate
                .as_ref()
                .and_then(|c| c.ready_at)
                .map(|at| at + self.config.min_uptime);
            let kill_deadline = self.children.next_deadline();
            tokio::select! {
                // Exits first: a child that died is never promoted on a
                // verdict or a timer that raced its exit.
                biased;
                Some(reaped) = reaped.recv() => {
                    self.on_reaped(reaped.pid, reaped.code);
                    // Out of the table now: the zombie may go.
                    let _ = reaped.forgotten.send(());
                }
                Some(verdict) = verdicts.recv() => self.on_verdict(verdict),
                () = inbox.status_changed.notified() => {
                    // The serving child's own STATUS=, relayed (STATUS= alone:
                    // a READY=1 here would end a reload systemd is watching).
                    if self.serving.is_some() && self.stopping.is_none() && self.candidate.is_none() {
                        self.handoff.notify(&format!("STATUS={}", self.status_text()));
                    }
                }
                Some((command, reply)) = incoming.recv() => match command {
                    Command::Upgrade => self.upgrade(Some(reply)),
                    Command::Status => drop(reply.send(Response::status(self.status()))),
                },
                Some(()) = hup.recv() => self.upgrade(None),
                Some(()) = term.recv() => self.stop("SIGTERM"),
                Some(()) = int.recv() => self.stop("SIGINT"),
                Some(()) = usr1.recv() => self.forward(Signal::SIGUSR1),
                Some(()) = usr2.recv() => self.forward(Signal::SIGUSR2),
                () = until(self.restart_at) => {
                    self.restart_at = None;
                    self.start_candidate(false, Vec::new());
                }
                () = until(kill_deadline) => self.kill_overdue(),
                // No event tells when a group's last member is gone (they
                // are not our children): look every 100 ms while any is left.
                () = tokio::time::sleep(std::time::Duration::from_millis(100)), if !self.remnants.is_empty() => {
                    self.check_remnants();
                }
                _ = tick(&mut watchdog) => self.on_watchdog_tick(),
                () = until(proven_at) => {
                    if let Some(candidate) = self.candidate.take() {
                        self.candidate_ready(candidate);
                    }
                }
                () = until(stop_deadline) => {
                    tracing::warn!("drain timeout: killing what is left");
                    self.kill_all();
                    // Again in a second if something survives it.
                    if let Some(stopping) = &mut self.stopping {
                        stopping.deadline = Instant::now() + std::time::Duration::from_secs(1);
                    }
                }
            }
        }
        let stopped_as_asked = 128 + self.config.stop_signal as i32;
        match (self.gave_up.take(), self.serving_exit) {
            (Some(why), _) => Err(why),
            // A requested stop that went as asked (the child died of the
            // stop signal, as uvicorn and plain Node do) is a clean stop.
            (None, Some(code)) if code == stopped_as_asked => Ok(0),
            (None, code) => Ok(code.unwrap_or(0)),
        }
    }

    fn on_reaped(&mut self, pid: u32, code: i32) {
        let Some(child) = self.children.reaped(pid) else {
            tracing::debug!(pid, code, "reaped an orphan");
            return;
        };
        self.inbox.forget(pid);
        if group_alive(pid) {
            // Its group lives on without it. A retiring child's group had
            // the stop signal and keeps the drain deadline; any other
            // (a failed start, a crash) is killed now.
            let deadline = match child.state {
                State::Retiring {
                    deadline: Some(deadline),
                } => deadline,
                _ if self.stopping.is_some() => self
                    .stopping
                    .as_ref()
                    .map_or_else(Instant::now, |s| s.deadline),
                _ => Instant::now(),
            };
            tracing::info!(
                pgid = pid,
                "the child exited; what it started lives on and goes at the deadline"
            );
            self.remnants.push((pid, deadline));
            self.check_remnants();
        }
        let exit = exit_text(pid, code);
        if let Some(candidate) = self.candidate.take_if(|c| c.id == child.id) {
            let why = match (&candidate.failed, candidate.ready_at) {
                (Some(why), _) => why.clone(),
                (None, Some(ready_at)) => format!(
                    "the new process {exit} {:.1} s after it said ready, within --min-uptime {:?}",
                    ready_at.elapsed().as_secs_f64(),
                    self.config.min_uptime
                ),
                (None, None) => format!("the new process {exit} before it was ready"),
            };
            self.candidate_failed(candidate, why);
        } else if self.serving == Some(child.id) {
            self.serving = None;
            if self.stopping.is_some() {
                self.serving_exit = Some(code);
                return;
            }
            let why = format!("the serving process {exit}");
            tracing::error!(error = %why, "the serving child died (the sockets stay open)");
            self.serving_lost(why);
        } else {
            tracing::debug!(
                pid,
                code,
                generation = child.generation,
                "retired child exited"
            );
        }
    }

    /// No child serves any more (it died, or hangs): a child getting ready
    /// (an upgrade) takes over if it can; one that is ready and proving
    /// --min-uptime takes over now (no old child serves beside it any
    /// more); else a restart.
    fn serving_lost(&mut self, why: String) {
        self.handoff.notify(&format!("STATUS=Restarting: {why}"));
        self.last_error = Some(why);
        match &self.candidate {
            Some(candidate) if candidate.ready_at.is_some() => {
                if let Some(candidate) = self.candidate.take() {
                    self.candidate_ready(candidate);
                }
            }
            Some(_) => {}
            None => self.schedule_restart(),
        }
    }

    fn schedule_restart(&mut self) {
        match self.restarts.next(Instant::now()) {
            Next::RetryAt(at) => self.restart_at = Some(at),
            Next::GiveUp(limit) => {
                let last = self.last_error.as_deref().unwrap_or("unknown");
                let why = format!("giving up after {limit}; the last error: {last}");
                tracing::error!(error = %why, "start limit reached");
                self.handoff.notify(&format!("STATUS=Failed: {why}"));
                self.gave_up = Some(why);
                self.stop("the start limit");
            }
        }
    }

    /// An upgrade asked for (`SIGHUP` or the control socket).
    fn upgrade(&mut self, reply: Option<oneshot::Sender<Response>>) {
        let refuse = |reply: Option<oneshot::Sender<Response>>, why: &str| {
            tracing::info!(reason = why, "upgrade request ignored");
            if let Some(reply) = reply {
                let _ = reply.send(Response::error(why));
            }
        };
        if self.stopping.is_some() {
            return refuse(reply, "stopping");
        }
        if self.candidate.as_ref().is_some_and(|c| c.upgrade) {
            if reply.is_none() {
                // A SIGHUP (systemctl reload): it joins the upgrade in
                // flight, whose outcome sends the READY=1 that ends it.
                self.handoff
                    .notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
            }
            return refuse(reply, "an upgrade is already in flight");
        }
        if self.candidate.is_some() && self.last_error.is_none() {
            // The first child is still getting ready, and nothing failed:
            // the upgrade follows once it has (it may be ready any moment).
            tracing::info!("upgrade queued until the first child is ready");
            self.queued_upgrade
                .get_or_insert_with(Vec::new)
                .extend(reply);
            return;
        }
        if let Some(restart) = self.candidate.take() {
            // A restart is getting ready after a failure (no child serves):
            // the upgrade replaces it at once, since that is how a fix
            // arrives.
            restart.check.abort();
            self.retire(restart.id);
        }
        self.restart_at = None;
        self.handoff.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=Upgrading",
            monotonic_usec()
        ));
        self.start_candidate(true, reply.into_iter().collect());
    }
}

/// Whether the process group `pgid` still has a live member (a zombie
/// waiting for whoever inherited it does not count). Its ID is not reused
/// while it has any member, so a group that is gone cannot be mistaken.
fn group_alive(pgid: u32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), None).is_ok()
        && accepted_by::group_has_live_member(pgid)
}

/// "(pid N) exited with status C" or "(pid N) was killed by signal S".
fn exit_text(pid: u32, code: i32) -> String {
    if code > 128 {
        let name = Signal::try_from(code - 128).map_or("an unknown signal", |s| s.as_str());
        format!("(pid {pid}) was killed by signal {name}")
    } else {
        format!("(pid {pid}) exited with status {code}")
    }
}
