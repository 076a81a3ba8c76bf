//! The upgrade itself, run in a task of its own that callers only observe:
//! start the successor with every registered fd, wait for `READY=1` from
//! exactly that process, its exit, a stop or the deadline; then commit or
//! roll back. After the commit the same task watches the successor until
//! this process exits, and takes the sockets back if the successor dies.

use std::ffi::OsString;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::wait::WaitStatus;
use tokio::sync::{broadcast, oneshot};

use crate::channel::{self, Channel};
use crate::child::{exit_error, Child, Successor};
use crate::env::{
    HANDOFF_CHANNEL_FD, HANDOFF_GENERATION, HANDOFF_NOTIFY_UPSTREAM, HANDOFF_SOCKET_PATHS,
    LISTEN_FDS_START, MAX_GENERATION,
};
use crate::error::UpgradeError;
use crate::escape::Escaped;
use crate::handoff::{lock, Handoff, SuccessorLink};
use crate::lifecycle::Phase;
use crate::spawn::{spawn, SpawnSpec};
use crate::watchdog::{WATCHDOG_PID, WATCHDOG_USEC};

/// What happened to an upgrade, as told to [`Handoff::upgrade_events`] subscribers.
#[derive(Debug, Clone)]
pub enum UpgradeEvent {
    /// An upgrade began in this process (generation `generation`).
    Started {
        /// This process's generation.
        generation: u64,
    },
    /// The successor is ready and serves from now on.
    Succeeded {
        /// The successor's PID.
        successor: u32,
    },
    /// The upgrade failed; this process keeps serving.
    Failed {
        /// Why.
        error: Arc<UpgradeError>,
    },
    /// The successor died after taking over; this process took the sockets
    /// back and serves again.
    RolledBack {
        /// The successor that died.
        successor: u32,
        /// How it died, and when.
        reason: String,
    },
}

/// The right to run the one upgrade in flight. Dropping it without running it
/// puts the process back to serving.
#[must_use = "an upgrade ticket does nothing unless run"]
pub struct UpgradeTicket {
    handoff: Handoff,
    started: bool,
}

impl Handoff {
    /// Upgrades: starts the successor, hands it every registered fd, and
    /// resolves with its PID once it is ready, after which
    /// [`stopping`](Self::stopping) resolves in this process. On failure this
    /// process keeps serving and may try again.
    ///
    /// Cancel-safe: the upgrade runs in a task of its own, so dropping this
    /// future (a timeout around it, a `select!`) changes nothing about its
    /// outcome; the events still report it.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// match handoff.upgrade().await {
    ///     Ok(pid) => println!("pid {pid} took over"),
    ///     Err(e) => eprintln!("upgrade failed, still serving: {e}"),
    /// }
    /// # }
    /// ```
    pub async fn upgrade(&self) -> Result<u32, UpgradeError> {
        self.begin_upgrade()?.run().await
    }

    /// Claims the single upgrade slot without waiting, so a caller can refuse
    /// at once (for example a `SIGHUP` while an upgrade is in flight).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// match handoff.begin_upgrade() {
    ///     Ok(ticket) => { tokio::spawn(ticket.run()); }
    ///     Err(busy) => eprintln!("not now: {busy}"),
    /// }
    /// # }
    /// ```
    pub fn begin_upgrade(&self) -> Result<UpgradeTicket, UpgradeError> {
        self.claim_upgrade(false)
    }

    /// [`begin_upgrade`](Self::begin_upgrade); with `keep_if_early`, a
    /// request that comes before the process serves is kept and run then.
    pub(crate) fn claim_upgrade(&self, keep_if_early: bool) -> Result<UpgradeTicket, UpgradeError> {
        if self.inner.pid == 1 {
            return Err(UpgradeError::Pid1);
        }
        if self.inner.generation >= MAX_GENERATION {
            return Err(UpgradeError::GenerationLimit {
                generation: self.inner.generation,
            });
        }
        self.inner.life.begin_upgrade(keep_if_early)?;
        Ok(UpgradeTicket {
            handoff: self.clone(),
            started: false,
        })
    }

    /// Runs the upgrade a kept `SIGHUP` asked for; its outcome is logged and
    /// published by the upgrade task.
    pub(crate) fn start_upgrade_in_background(&self) {
        match self.begin_upgrade() {
            Ok(ticket) => drop(ticket.start()),
            Err(reason) => tracing::warn!(pid = self.inner.pid, %reason, "upgrade not started"),
        }
    }

    /// Subscribes to upgrade events (started, succeeded, failed, rolled
    /// back), for logging or reporting. Events sent before subscribing are
    /// not replayed.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// let mut events = handoff.upgrade_events();
    /// while let Ok(event) = events.recv().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn upgrade_events(&self) -> broadcast::Receiver<UpgradeEvent> {
        self.inner.events.subscribe()
    }
}

impl UpgradeTicket {
    /// Runs the upgrade this ticket was issued for, in a task of its own; the
    /// returned future only waits for the outcome.
    pub async fn run(self) -> Result<u32, UpgradeError> {
        let outcome = self.start();
        outcome.await.unwrap_or(Err(UpgradeError::Stopping))
    }

    fn start(mut self) -> oneshot::Receiver<Result<u32, UpgradeError>> {
        self.started = true;
        let (reply, outcome) = oneshot::channel();
        tokio::spawn(drive(self.handoff.clone(), reply));
        outcome
    }
}

impl Drop for UpgradeTicket {
    fn drop(&mut self) {
        if !self.started {
            self.handoff.inner.life.abort_upgrade();
        }
    }
}

/// The upgrade task: attempt, then commit or roll back, then watch.
async fn drive(handoff: Handoff, reply: oneshot::Sender<Result<u32, UpgradeError>>) {
    let inner = &handoff.inner;
    let _ = inner.events.send(UpgradeEvent::Started {
        generation: inner.generation,
    });
    handoff.tell_upgrading();
    let (successor, parent) = match attempt(&handoff).await {
        Ok(ready) => ready,
        Err(error) => return failed(&handoff, error, reply),
    };
    let pid = successor.pid();
    // Before the commit: from the commit on, a handover (and its MAIN=1)
    // or a SIGHUP to pass on may come at any moment.
    let parent = std::sync::Arc::new(parent);
    *lock(&inner.successor) = Some(SuccessorLink {
        channel: parent.clone(),
        pidfd: None,
    });
    if !inner.life.commit(pid) {
        *lock(&inner.successor) = None;
        // A stop won the race with the commit: the successor must go.
        let status = successor.terminate(inner.kill_grace).await;
        tracing::debug!(
            successor = pid,
            ?status,
            "stopped the successor of a stopping process"
        );
        return failed(&handoff, UpgradeError::Cancelled { pid }, reply);
    }
    let Some(successor) = successor.commit() else {
        return failed(
            &handoff,
            UpgradeError::io(
                "lost the new process's pidfd",
                std::io::ErrorKind::Other.into(),
            ),
            reply,
        );
    };
    if let Some(link) = lock(&inner.successor).as_mut() {
        link.pidfd = successor.pidfd().ok();
    }
    if let Err(error) = parent.send(channel::COMMITTED) {
        // It died just now; the watch below sees its exit and takes back.
        tracing::warn!(successor = pid, %error, "cannot tell the successor it took over");
    }
    // This process, if a successor itself, is no longer its parent's safety net.
    if let Some(up) = inner.parent_channel.get() {
        let _ = up.send(channel::HANDED_OVER);
    }
    inner.upgrades_done.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        pid = inner.pid,
        generation = inner.generation,
        successor = pid,
        probation_ms = inner.probation.as_millis() as u64,
        "upgrade succeeded"
    );
    handoff.tell_committed(pid);
    let _ = inner
        .events
        .send(UpgradeEvent::Succeeded { successor: pid });
    let _ = reply.send(Ok(pid));
    watch(&handoff, successor, &parent).await;
}

fn failed(
    handoff: &Handoff,
    error: UpgradeError,
    reply: oneshot::Sender<Result<u32, UpgradeError>>,
) {
    let inner = &handoff.inner;
    if matches!(error, UpgradeError::Cancelled { .. }) {
        tracing::warn!(pid = inner.pid, generation = inner.generation, %error, "upgrade abandoned");
    } else {
        tracing::error!(pid = inner.pid, generation = inner.generation, %error, "upgrade failed; still serving");
        handoff.tell_upgrade_failed(&error.to_string());
    }
    inner.upgrades_failed.fetch_add(1, Ordering::Relaxed);
    let error = Arc::new(error);
    let _ = inner.events.send(UpgradeEvent::Failed {
        error: error.clone(),
    });
    let _ = reply.send(Err((*error).clone()));
    // Last: a stopping process may exit as soon as the upgrade is over, and
    // the outcome must have been published by then.
    inner.life.abort_upgrade();
}

/// Starts the successor and waits until it is ready. On any failure the
/// successor is stopped (`SIGTERM`, then `SIGKILL` after the grace) and reaped,
/// and the PID file names this process again.
async fn attempt(handoff: &Handoff) -> Result<(Child, Channel), UpgradeError> {
    let inner = &handoff.inner;
    // Resolved now: a deploy may have replaced the binary, or switched the
    // symlink the start directory went through.
    let launch = &inner.launch;
    let program = launch.program().ok_or_else(|| {
        UpgradeError::io(
            "cannot find the binary to run",
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "argv[0] is neither a path nor found in PATH; set Builder::command",
            ),
        )
    })?;
    let (parent, theirs) =
        Channel::pair().map_err(|e| UpgradeError::io("cannot create the readiness channel", e))?;
    let next = inner.generation + 1; // below MAX_GENERATION: checked in claim_upgrade
    let mut env: Vec<(&'static str, OsString)> =
        vec![(HANDOFF_GENERATION, next.to_string().into())];
    if let Some(upstream) = inner.upstream.addr() {
        env.push((HANDOFF_NOTIFY_UPSTREAM, upstream.to_string().into()));
    }
    tracing::info!(pid = inner.pid, generation = inner.generation, program = %program.display(), dir = %launch.dir.display(), "upgrade started");
    env.push(("PWD", launch.dir.clone().into_os_string()));
    // The service's watchdog is the successor's too once it is main: as
    // systemd would, give it the timeout and its own PID.
    let mut pid_vars = Vec::new();
    if let Some(timeout) = inner.watchdog.timeout() {
        env.push((WATCHDOG_USEC, timeout.as_micros().to_string().into()));
        pid_vars.push(WATCHDOG_PID);
    }
    let child = {
        // Only fork and exec run under the lock: no wait ever does.
        let registry = lock(&inner.registry);
        let fds = registry.handoff_fds();
        let channel_fd = LISTEN_FDS_START + fds.len() as i32;
        env.push((HANDOFF_CHANNEL_FD, channel_fd.to_string().into()));
        if let Some(paths) = registry.socket_paths() {
            env.push((HANDOFF_SOCKET_PATHS, paths.into()));
        }
        spawn(&SpawnSpec {
            program: &program,
            args: &launch.args,
            cwd: &launch.dir,
            fds,
            channel: Some(std::os::fd::AsFd::as_fd(&theirs)),
            env,
            // What does not fit in the environment goes in a memfd.
            vars_fd: true,
            ignore_sighup: true,
            parent_death_signal: None,
            pid_vars,
        })
    };
    drop(theirs);
    let child = child?;
    let pid = child.pid();
    tracing::info!(
        pid = inner.pid,
        successor = pid,
        listeners = lock(&inner.registry).len(),
        "successor started; waiting for READY=1"
    );

    let deadline = tokio::time::sleep(inner.upgrade_timeout);
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            // Exit first: a successor that exits as it says READY=1 must not
            // be committed.
            biased;
            () = child.exited() => {
                let status = child.reap().await;
                return Err(restore_pid_file(handoff, pid, exit_error(pid, status)));
            }
            _ = inner.life.wait(|l| matches!(l.phase, Phase::Stopping { .. })) => {
                break UpgradeError::Cancelled { pid };
            }
            () = &mut deadline => {
                break UpgradeError::Timeout { pid, timeout: inner.upgrade_timeout };
            }
            message = parent.next() => match message {
                message if message.pid != Some(pid) => {
                    tracing::warn!(sender = ?message.pid, successor = pid, "ignoring a message from another process");
                }
                message if message.problem.is_some() => {
                    tracing::warn!(successor = pid, problem = message.problem.as_deref().unwrap_or(""), "ignoring a malformed message from the successor");
                }
                message if message.has(channel::READY) => {
                    if child.has_exited() {
                        continue; // the exit arm reports it
                    }
                    return Ok((child, parent));
                }
                message => {
                    tracing::debug!(successor = pid, text = %Escaped(&message.text), "message from the successor");
                }
            },
        }
    };
    let status = child.terminate(inner.kill_grace).await;
    tracing::debug!(successor = pid, ?status, "failed successor reaped");
    Err(restore_pid_file(handoff, pid, outcome))
}

/// After the commit: the successor serves, this process drains. Until this
/// process finishes, watch the successor; if it dies abnormally, take the
/// sockets back. The probation timer and the successor's own handover end
/// the probation (this process may then exit once drained).
async fn watch(handoff: &Handoff, successor: Successor, parent: &Channel) {
    let inner = &handoff.inner;
    let pid = successor.pid();
    let committed = Instant::now();
    let probation = tokio::time::sleep(inner.probation);
    tokio::pin!(probation);
    let mut probation_running = true;
    loop {
        tokio::select! {
            status = successor.exited() => {
                return successor_exited(handoff, pid, status, committed);
            }
            _ = inner.life.wait(|l| l.accepting()) => {
                return; // taken back by another path: nothing left to watch
            }
            () = &mut probation, if probation_running => {
                probation_running = false;
                inner.life.end_probation();
            }
            message = parent.next() => {
                if message.has(channel::HANDED_OVER) && message.pid == Some(pid) {
                    tracing::info!(pid = inner.pid, successor = pid, "the successor handed over in turn; probation over");
                    inner.life.end_probation();
                }
            }
        }
        if inner.life.get().successor().is_none() {
            return;
        }
    }
}

/// The successor exited while this process still runs.
fn successor_exited(handoff: &Handoff, pid: u32, status: Option<WaitStatus>, since: Instant) {
    let inner = &handoff.inner;
    let life = inner.life.get();
    let clean = matches!(status, Some(WaitStatus::Exited(_, 0)));
    let how = describe(status);
    match life.phase {
        Phase::HandedOver { .. } if !clean => take_back(handoff, pid, &how, since),
        Phase::HandedOver { .. } => {
            // A clean exit is deliberate (it was stopped, or it handed over
            // and drained): nothing to take back.
            tracing::info!(
                pid = inner.pid,
                successor = pid,
                "the successor exited cleanly; not taking back"
            );
            inner.life.finish_handover();
            inner.life.successor_gone();
            inner.life.end_probation();
        }
        _ => {
            tracing::warn!(pid = inner.pid, successor = pid, exit = %how, "the successor exited while this process stops");
            inner.life.successor_gone();
        }
    }
}

/// The take-back: this process serves again.
fn take_back(handoff: &Handoff, successor: u32, how: &str, since: Instant) {
    let inner = &handoff.inner;
    if !inner.life.take_back() {
        return;
    }
    let reason = format!(
        "generation {} (pid {successor}) {how} {:.2}s after it took over",
        inner.generation + 1,
        since.elapsed().as_secs_f64()
    );
    if let Some(pid_file) = &inner.pid_file {
        if let Err(e) = pid_file.write(inner.pid) {
            tracing::error!(path = %pid_file.path().display(), error = %e, "cannot rewrite the PID file after the take-back");
        }
    }
    inner.upgrades_failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(pid = inner.pid, generation = inner.generation, successor, %reason, "the successor died; took the sockets back and serving again");
    handoff.tell_taken_back(&reason);
    let _ = inner
        .events
        .send(UpgradeEvent::RolledBack { successor, reason });
}

/// How a process ended, in words.
fn describe(status: Option<WaitStatus>) -> String {
    match status {
        Some(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Some(WaitStatus::Signaled(_, signal, _)) => format!("was killed by {}", signal.as_str()),
        other => format!("ended ({other:?})"),
    }
}

/// A successor that wrote the PID file and then failed must not leave its PID there.
fn restore_pid_file(handoff: &Handoff, child: u32, error: UpgradeError) -> UpgradeError {
    if let Some(pid_file) = &handoff.inner.pid_file {
        if pid_file.read() == Some(child) {
            if let Err(e) = pid_file.write(handoff.inner.pid) {
                tracing::warn!(path = %pid_file.path().display(), error = %e, "cannot restore the PID file");
            }
        }
    }
    error
}
