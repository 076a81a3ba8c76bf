//! The serving lifecycle an application runs in one call: signals, ready,
//! accept on the application's listeners only while this process is the one
//! serving, hand each connection to the application's handler with a
//! [`ConnectionGuard`], lame duck, drain with a deadline when the process
//! hands over or stops, then the ordered [`Shutdown`]. A take-back (the
//! successor died) resumes accepting on the same listeners.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::accept::{accept_loop, Accept, IntoListeners};
use crate::drain::{ConnectionGuard, Drain, DrainReport};
use crate::error::Error;
use crate::handoff::{Handoff, StopReason};
use crate::report::Report;
use crate::shutdown::Shutdown;
use crate::stop::Finish;

/// What [`Serve`] tells its observer (for event lines or metrics).
///
/// ```no_run
/// # let handoff = handoff::Handoff::builder().build().unwrap();
/// let serve = handoff::Serve::new(&handoff).on_event(|event| match event {
///     handoff::ServeEvent::StoppedAccepting { reason, connections } => {
///         eprintln!("{reason}; draining {connections} connections")
///     }
///     other => eprintln!("{other:?}"),
/// });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeEvent {
    /// A stop signal arrived; accepting goes on this long (lame duck).
    LameDuck {
        /// The drain delay.
        delay: Duration,
    },
    /// Accepting stopped; the open connections drain now.
    StoppedAccepting {
        /// Why.
        reason: StopReason,
        /// Connections open at that moment.
        connections: usize,
    },
    /// The successor died and this process serves again.
    Resumed,
}

type Observer = Arc<dyn Fn(&ServeEvent) + Send + Sync>;

/// Serves connections through a process's whole life: upgrades, take-backs,
/// lame duck, drain with a deadline, a second signal cutting at once. This is
/// the raw-TCP integration (a handler per connection, for a protocol of the
/// application's own); `http`, `axum` and `tonic` (cargo features) serve
/// those protocols with their drain rules.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let handoff = handoff::Handoff::builder().build()?;
///     let listener = handoff.tcp_listener("echo", "127.0.0.1:7000".parse()?)?;
///     let report = handoff::Serve::new(&handoff)
///         .drain_timeout(std::time::Duration::from_secs(10))
///         .run(listener, |mut stream, guard| async move {
///             // A long-lived protocol watches guard.draining() to finish up.
///             let _ = stream.write_all(b"hello\n").await;
///             drop(guard);
///         })
///         .await?;
///     std::process::exit(report.exit_code());
/// }
/// ```
pub struct Serve {
    handoff: Handoff,
    drain: Drain,
    drain_timeout: Duration,
    drain_delay: Duration,
    observer: Option<Observer>,
    shutdown: Option<Shutdown>,
}

impl Serve {
    /// Serving for `handoff`, with a 30 s drain deadline and no lame duck.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let serve = handoff::Serve::new(&handoff);
    /// ```
    pub fn new(handoff: &Handoff) -> Self {
        Serve {
            handoff: handoff.clone(),
            drain: Drain::new(),
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            observer: None,
            shutdown: None,
        }
    }

    /// Tracks connections in `drain` (to share it with a status endpoint).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let drain = handoff::Drain::new();
    /// let serve = handoff::Serve::new(&handoff).drain(drain.clone());
    /// ```
    pub fn drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    /// How long open connections get to finish; then they are cut, and the
    /// process exits whatever they do.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let serve = handoff::Serve::new(&handoff).drain_timeout(std::time::Duration::from_secs(5));
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Lame duck: after a stop signal (not after an upgrade, where the
    /// successor serves), keep accepting this long first, so load balancers
    /// that watch readiness stop sending traffic. A second signal cuts it.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let serve = handoff::Serve::new(&handoff).drain_delay(std::time::Duration::from_secs(2));
    /// ```
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Calls `observer` on each [`ServeEvent`].
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let serve = handoff::Serve::new(&handoff).on_event(|event| eprintln!("{event:?}"));
    /// ```
    pub fn on_event(mut self, observer: impl Fn(&ServeEvent) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    fn tell(&self, event: ServeEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    /// Runs `shutdown`'s stages once the last drain is over, before
    /// [`run`](Self::run) returns: components close in order, after the
    /// connections that use them (and not at all after a take-back).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let mut shutdown = handoff::Shutdown::new(std::time::Duration::from_secs(10));
    /// shutdown.stage("stores", std::time::Duration::from_secs(5)).add("db", || async { Ok::<(), String>(()) });
    /// let serve = handoff::Serve::new(&handoff).then(shutdown);
    /// ```
    pub fn then(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// Runs the whole serving life of the process, and returns once it may
    /// exit:
    ///
    /// 1. installs [`Handoff::handle_signals`] unless it already is, and
    ///    calls [`Handoff::ready`] unless it was called (so an application
    ///    that needs to do more first calls `ready()` itself);
    /// 2. accepts on `listeners` while this process serves (a successor:
    ///    from the moment its parent committed the handover, so nothing it
    ///    accepts is lost to a rollback) and runs `handler` for each
    ///    connection with its [`ConnectionGuard`];
    /// 3. on a stop signal, keeps accepting for the [drain delay](Self::drain_delay);
    ///    then stops accepting and drains, cutting what is left at the
    ///    [deadline](Self::drain_timeout) or at a second signal; after a
    ///    handover, serves again if the successor dies in its probation;
    /// 4. runs the [`then`](Self::then) shutdown stages.
    ///
    /// Where the application installed no `tracing` subscriber, each upgrade
    /// outcome is also printed as one line on stderr, so a failed upgrade is
    /// never silent ([`Handoff::upgrade_events`] is the hook to do better).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff, listener: tokio::net::TcpListener) -> Result<(), handoff::Error> {
    /// let report = handoff::Serve::new(&handoff)
    ///     .run(listener, |stream, guard| async move {
    ///         // serve `stream`; finish up on guard.draining(); stop on guard.cut()
    ///         drop((stream, guard));
    ///     })
    ///     .await?;
    /// std::process::exit(report.exit_code());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// What [`Handoff::ready`] or [`Handoff::handle_signals`] returned: the
    /// process could not start serving.
    pub async fn run<L, H, F>(
        self,
        listeners: impl IntoListeners<L>,
        handler: H,
    ) -> Result<Report, Error>
    where
        L: Accept,
        H: Fn(L::Conn, ConnectionGuard) -> F + Clone + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handoff = self.handoff.clone();
        match handoff.handle_signals() {
            // Installed by the application, or by another `Serve`.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("cannot install the signal handler", e)),
            Ok(_) => {}
        }
        let _stderr = crate::report::StderrFallback::start(&handoff);
        tokio::spawn(handoff.clone().run_watchdog());
        match handoff.ready() {
            Ok(()) | Err(Error::AlreadyReady) => {}
            Err(error) => return Err(error),
        }
        let drain = self.serve(listeners.into_listeners(), handler).await;
        let shutdown = match self.shutdown {
            Some(shutdown) => Some(shutdown.run(handoff.forced()).await),
            None => None,
        };
        Ok(Report { drain, shutdown })
    }

    async fn serve<L, H, F>(&self, listeners: Vec<L>, handler: H) -> DrainReport
    where
        L: Accept,
        H: Fn(L::Conn, ConnectionGuard) -> F + Clone + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handoff = &self.handoff;
        let mut listeners: Vec<Arc<L>> = listeners.into_iter().map(Arc::new).collect();
        let mut report = DrainReport {
            waited: Duration::ZERO,
            cut: 0,
            forced: false,
        };
        while handoff.serving().await {
            let stop = CancellationToken::new();
            let tasks: Vec<_> = listeners
                .iter()
                .map(|listener| {
                    tokio::spawn(accept_loop(
                        listener.clone(),
                        stop.clone(),
                        self.drain.clone(),
                        handler.clone(),
                    ))
                })
                .collect();
            let reason = handoff.stopping().await;
            let for_good = !matches!(reason, StopReason::Upgraded { .. });
            if for_good {
                // systemd must not kill the process before it is done.
                let stages = self
                    .shutdown
                    .as_ref()
                    .map_or(Duration::ZERO, Shutdown::overall);
                handoff.extend_stop_timeout(
                    self.drain_delay
                        .saturating_add(self.drain_timeout)
                        .saturating_add(stages),
                );
            }
            if for_good && !self.drain_delay.is_zero() {
                self.tell(ServeEvent::LameDuck {
                    delay: self.drain_delay,
                });
                tokio::select! {
                    () = tokio::time::sleep(self.drain_delay) => {}
                    () = handoff.forced() => {}
                }
            }
            stop.cancel();
            for task in tasks {
                let _ = task.await;
            }
            if for_good {
                // A stop for good: close the listeners now, so new clients are
                // refused rather than left waiting in a backlog.
                listeners.clear();
            }
            self.tell(ServeEvent::StoppedAccepting {
                reason,
                connections: self.drain.active(),
            });
            // Drain; a take-back meanwhile resumes at once.
            tokio::select! {
                drained = handoff.drain(&self.drain, self.drain_timeout) => report = drained,
                true = handoff.serving() => {}
            }
            if handoff.finish().await == Finish::Exit {
                return report;
            }
            self.drain.resume();
            self.tell(ServeEvent::Resumed);
        }
        report
    }
}

impl Handoff {
    /// Runs the task `start` makes while this process serves: it is dropped
    /// (closing what it owns only if it owns it) when the process hands over
    /// or stops, and started again after a take-back. Returns when the
    /// process stops for good (a stop signal, or [`finish`](Handoff::finish)
    /// after a handover) or when the task ends by itself. For sockets that
    /// [`Serve`] does not fit (UDP, a protocol of one's own), with the
    /// sockets shared (`Arc`) so that a take-back finds them open.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff, socket: std::sync::Arc<tokio::net::UdpSocket>) {
    /// let serving = tokio::spawn({
    ///     let handoff = handoff.clone();
    ///     async move {
    ///         handoff
    ///             .while_serving(|| {
    ///                 let socket = socket.clone();
    ///                 async move {
    ///                     let mut buf = [0u8; 512];
    ///                     while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
    ///                         let _ = socket.send_to(&buf[..n], peer).await;
    ///                     }
    ///                 }
    ///             })
    ///             .await
    ///     }
    /// });
    /// handoff.ready().unwrap();
    /// loop {
    ///     handoff.stopping().await;
    ///     if handoff.finish().await == handoff::Finish::Exit {
    ///         break; // else: taken back, serving again
    ///     }
    /// }
    /// let _ = serving.await;
    /// # }
    /// ```
    pub async fn while_serving<F, Fut>(&self, mut start: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        while self.serving().await {
            tokio::select! {
                _ = self.stopping() => {}
                () = start() => return,
            }
        }
    }
}
