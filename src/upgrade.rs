//! The upgrade itself: one at a time, start the successor with every
//! registered fd, wait for `READY=1` from exactly that process, its exit, or
//! the deadline; then either hand over or roll back.

use std::ffi::OsString;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::env::{
    HANDOFF_GENERATION, HANDOFF_NOTIFY_UPSTREAM, HANDOFF_SOCKET_PATHS, NOTIFY_SOCKET,
};
use crate::error::UpgradeError;
use crate::notify::NotifyListener;
use crate::spawn::{exit_error, spawn, SpawnSpec};
use crate::upgrader::{lock, Handoff, State, StopReason};

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
}

/// The right to run the one upgrade in flight. Dropping it without running it
/// puts the process back to serving.
#[must_use = "an upgrade ticket does nothing unless run"]
pub struct UpgradeTicket {
    handoff: Handoff,
    done: bool,
}

impl Handoff {
    /// Upgrades: starts the successor, hands it every registered fd, and
    /// resolves with its PID once it is ready, after which
    /// [`stopping`](Self::stopping) resolves in this process. On failure this
    /// process keeps serving and may try again.
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
        if self.is_stopping() {
            if let Some(successor) = self.handed_over() {
                return Err(UpgradeError::AlreadyUpgraded { successor });
            }
            return Err(UpgradeError::Stopping);
        }
        let mut state = lock(&self.inner.state);
        match *state {
            State::Starting | State::Readying => Err(UpgradeError::NotReady),
            State::Upgrading => Err(UpgradeError::InProgress),
            State::HandedOver { successor } => Err(UpgradeError::AlreadyUpgraded { successor }),
            State::Serving => {
                *state = State::Upgrading;
                Ok(UpgradeTicket {
                    handoff: self.clone(),
                    done: false,
                })
            }
        }
    }

    /// Subscribes to upgrade events (started, succeeded, failed), for logging
    /// or reporting. Events sent before subscribing are not replayed.
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
    /// Runs the upgrade this ticket was issued for.
    pub async fn run(mut self) -> Result<u32, UpgradeError> {
        let handoff = self.handoff.clone();
        let inner = &handoff.inner;
        let _ = inner.events.send(UpgradeEvent::Started {
            generation: inner.generation,
        });
        handoff.tell_upgrading();
        let result = attempt(&handoff).await;
        self.done = true;
        match &result {
            Ok(successor) => {
                *lock(&inner.state) = State::HandedOver {
                    successor: *successor,
                };
                lock(&inner.registry).release();
                tracing::info!(
                    pid = inner.pid,
                    generation = inner.generation,
                    successor,
                    "upgrade succeeded"
                );
                inner
                    .upgrades_done
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Before this process stops accepting and drains: systemd
                // must know its new main process first.
                handoff.tell_handover(*successor).await;
                let _ = inner.events.send(UpgradeEvent::Succeeded {
                    successor: *successor,
                });
                handoff.request_stop(StopReason::Upgraded {
                    successor: *successor,
                });
            }
            Err(error) => {
                *lock(&inner.state) = State::Serving;
                tracing::error!(pid = inner.pid, generation = inner.generation, %error, "upgrade failed; still serving");
                inner
                    .upgrades_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                handoff.tell_upgrade_failed(&error.to_string());
                let error = Arc::new(error.clone());
                let _ = inner.events.send(UpgradeEvent::Failed { error });
            }
        }
        result
    }
}

impl Drop for UpgradeTicket {
    fn drop(&mut self) {
        if !self.done {
            let mut state = lock(&self.handoff.inner.state);
            if *state == State::Upgrading {
                *state = State::Serving;
            }
        }
    }
}

async fn attempt(handoff: &Handoff) -> Result<u32, UpgradeError> {
    let inner = &handoff.inner;
    let program = inner.program.clone().ok_or_else(|| {
        UpgradeError::io(
            "cannot find the binary to run",
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "argv[0] is neither a path nor found in PATH; set Builder::command",
            ),
        )
    })?;
    let listener = NotifyListener::bind()
        .map_err(|e| UpgradeError::io("cannot create the private notify socket", e))?;
    let mut env: Vec<(&'static str, OsString)> = vec![
        (
            HANDOFF_GENERATION,
            (inner.generation + 1).to_string().into(),
        ),
        (NOTIFY_SOCKET, listener.addr().to_string().into()),
    ];
    if let Some(upstream) = inner.upstream.addr() {
        env.push((HANDOFF_NOTIFY_UPSTREAM, upstream.to_string().into()));
    }
    tracing::info!(pid = inner.pid, generation = inner.generation, program = %program.display(), "upgrade started");
    let child = {
        let registry = lock(&inner.registry);
        if let Some(paths) = registry.socket_paths() {
            env.push((HANDOFF_SOCKET_PATHS, paths.into()));
        }
        spawn(&SpawnSpec {
            program: &program,
            args: &inner.args,
            cwd: &inner.cwd,
            fds: registry.handoff_fds(),
            env,
            ignore_sighup: true,
        })?
    };
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
            message = listener.recv() => match message {
                Ok(message) if message.pid == Some(pid) => {
                    if message.has("READY=1") {
                        break Ok(pid);
                    }
                    tracing::debug!(successor = pid, text = %message.text, "notify message from successor");
                }
                Ok(message) => {
                    tracing::warn!(sender = ?message.pid, successor = pid, "ignoring a notify message from another process");
                }
                Err(e) => break Err(UpgradeError::io("cannot read the private notify socket", e)),
            },
            () = child.exited() => {
                let status = child.kill_and_reap();
                return Err(restore_pid_file(handoff, pid, exit_error(pid, status)));
            }
            () = &mut deadline => {
                break Err(UpgradeError::Timeout { pid, timeout: inner.upgrade_timeout });
            }
            () = inner.stop.cancelled() => {
                break Err(UpgradeError::Cancelled { pid });
            }
        }
    };
    match outcome {
        Ok(pid) => {
            child.disown();
            Ok(pid)
        }
        Err(error) => {
            child.kill_and_reap();
            Err(restore_pid_file(handoff, pid, error))
        }
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
