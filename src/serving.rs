//! Becoming the server: `ready()`, the parent's commit over the readiness
//! channel (or its death: then this process serves alone), and `serving()`.

use crate::channel::{self, Channel};
use crate::env;
use crate::error::Error;
use crate::escape::Escaped;
use crate::handoff::{lock, Handoff};
use crate::lifecycle::Phase;

impl Handoff {
    /// Tells the parent (or systemd) that this process is ready to serve.
    ///
    /// In order: inherited fds that the application did not claim are closed;
    /// the PID file, if configured, is replaced atomically; then the parent
    /// learns `READY=1` and commits its upgrade (a fresh or socket-activated
    /// process tells systemd instead). Call it once every listener is claimed.
    /// Needs a tokio runtime.
    ///
    /// A successor counts as serving once its parent committed the handover
    /// ([`serving`](Self::serving) resolves then; the library's own accept
    /// loops start only then). If the parent is gone (killed mid-upgrade),
    /// the successor serves alone: `ready()` succeeds with a warning.
    ///
    /// A `SIGHUP` that arrives before the process serves is kept (one at
    /// most) and runs as soon as it does.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.ready()?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        inner.life.begin_ready()?;
        let result = self.announce_ready();
        if result.is_err() {
            inner.life.ready_failed();
        }
        result
    }

    fn announce_ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        for name in lock(&inner.registry).close_unclaimed() {
            tracing::warn!(pid = inner.pid, listener = %Escaped(&name), "closing an inherited fd that was not claimed");
        }
        if let Some(pid_file) = &inner.pid_file {
            pid_file.write(inner.pid).map_err(|e| {
                Error::io(
                    format!("cannot write the PID file {}", pid_file.path().display()),
                    e,
                )
            })?;
        }
        let Some(fd) = lock(&inner.parent).take() else {
            self.tell_ready();
            self.become_serving();
            return Ok(());
        };
        let parent = Channel::from_fd(fd)
            .map_err(|e| Error::io("cannot open the readiness channel to the parent", e))?;
        let parent = inner.parent_channel.get_or_init(|| parent);
        match parent.send(channel::READY) {
            Ok(()) => {
                let handoff = self.clone();
                tokio::spawn(async move { handoff.await_commit().await });
            }
            Err(e) if parent_gone(&e) => self.serve_alone(&e),
            Err(source) => {
                return Err(Error::NotifyParent {
                    socket: format!("fd {}", env::HANDOFF_CHANNEL_FD),
                    source,
                })
            }
        }
        Ok(())
    }

    /// Waits for the parent's `COMMITTED=1`; its end-of-file means the parent
    /// died before it could commit, and this process serves alone. Then
    /// waits for `MAIN=1` (or the parent's exit): this process is systemd's
    /// main process from then on.
    async fn await_commit(&self) {
        let Some(parent) = self.inner.parent_channel.get() else {
            return;
        };
        let (mut committed, mut main) = (false, false);
        loop {
            match parent.recv().await {
                Ok(Some(message)) if !committed && message.has(channel::COMMITTED) => {
                    committed = true;
                    self.become_serving();
                    if main {
                        return self.inner.watchdog.became_main();
                    }
                }
                // Kept if it overtook COMMITTED=1 (a handover right at the
                // commit): this process is main once it serves.
                Ok(Some(message)) if message.has(channel::MAIN) => {
                    main = true;
                    if committed {
                        return self.inner.watchdog.became_main();
                    }
                }
                Ok(None) | Err(_) if committed => {
                    // The parent exited; it told systemd first.
                    return self.inner.watchdog.became_main();
                }
                Ok(Some(message)) => {
                    tracing::debug!(text = %Escaped(&message.text), "ignoring a message from the parent");
                }
                Ok(None) => {
                    let gone = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return self.serve_alone(&gone);
                }
                Err(e) => return self.serve_alone(&e),
            }
        }
    }

    /// The parent is gone before committing: this process is the only one
    /// left holding the sockets, so it serves.
    fn serve_alone(&self, why: &std::io::Error) {
        let inner = &self.inner;
        tracing::warn!(pid = inner.pid, generation = inner.generation, error = %why, "the parent is gone before it handed over; serving alone");
        // Under systemd the parent was the main process. With
        // NotifyAccess=all this makes the successor the main process; else
        // systemd ignores it (see docs/design.md).
        inner.upstream.send(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=Serving, generation {} (pid {}); its parent died during the upgrade",
            inner.pid, inner.generation, inner.pid
        ));
        inner.watchdog.became_main();
        self.become_serving();
    }

    fn become_serving(&self) {
        let inner = &self.inner;
        let listeners = lock(&inner.registry).len();
        let served = inner.life.serve(|| {
            tracing::info!(
                pid = inner.pid,
                generation = inner.generation,
                listeners,
                "ready"
            );
        });
        let Ok(kept_upgrade) = served else {
            return;
        };
        if kept_upgrade {
            tracing::info!(
                pid = inner.pid,
                "running the upgrade requested while getting ready"
            );
            self.start_upgrade_in_background();
        }
    }

    /// Resolves once this process serves new connections: at once for a
    /// first generation after [`ready`](Self::ready), for a successor once
    /// its parent committed the handover (or died), and again after a
    /// take-back. Returns false if the process stops for good instead.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// if handoff.serving().await {
    ///     println!("accepting from now on");
    /// }
    /// # }
    /// ```
    pub async fn serving(&self) -> bool {
        let life = self
            .inner
            .life
            .wait(|l| l.accepting() || matches!(l.phase, Phase::Stopping { .. }))
            .await;
        life.accepting()
    }
}

/// Whether a send to the parent failed because the parent is gone.
fn parent_gone(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNREFUSED | libc::ECONNRESET | libc::ENOTCONN)
    )
}
