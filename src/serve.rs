//! The library's own accept path: accept on the application's listeners
//! only while this process is the one serving, hand each connection to the
//! application's handler with a [`ConnectionGuard`], and drain them when the
//! process hands over or stops, with a deadline. A take-back (the successor
//! died) resumes accepting on the same listeners.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::drain::{ConnectionGuard, Drain, DrainReport};
use crate::handoff::{Handoff, StopReason};
use crate::stop::Finish;

/// A listener [`Serve`] can accept on: tokio's TCP and Unix listeners.
///
/// ```
/// fn takes_any<L: handoff::Accept>(_: L) {}
/// # async fn f() { takes_any(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()); }
/// ```
pub trait Accept: Send + Sync + 'static {
    /// An accepted connection.
    type Conn: Send + 'static;
    /// Accepts the next connection.
    fn accept_conn(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// What [`Serve`] tells its observer (for event lines or metrics).
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
/// lame duck, drain with a deadline, a second signal cutting at once.
///
/// ```no_run
/// # async fn f(handoff: handoff::Handoff) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::AsyncWriteExt;
/// let listener = handoff.tcp_listener("echo", "127.0.0.1:7000".parse()?)?;
/// handoff.handle_signals()?;
/// handoff.ready()?;
/// let report = handoff::Serve::new(&handoff)
///     .drain_timeout(std::time::Duration::from_secs(10))
///     .run(vec![listener], |mut stream, _guard| async move {
///         let _ = stream.write_all(b"hello\n").await;
///     })
///     .await;
/// println!("{} connections cut", report.cut);
/// # Ok(()) }
/// ```
pub struct Serve {
    handoff: Handoff,
    drain: Drain,
    drain_timeout: Duration,
    drain_delay: Duration,
    observer: Option<Observer>,
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

    /// Accepts on `listeners` while this process serves (a successor: from
    /// the moment its parent committed the handover, so nothing it accepts
    /// is lost to a rollback), runs `handler` for each connection, and
    /// returns the last drain's report once the process may exit.
    pub async fn run<L, H, F>(self, listeners: Vec<L>, handler: H) -> DrainReport
    where
        L: Accept,
        H: Fn(L::Conn, ConnectionGuard) -> F + Clone + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handoff = self.handoff.clone();
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
            if !matches!(reason, StopReason::Upgraded { .. }) && !self.drain_delay.is_zero() {
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
            if !matches!(reason, StopReason::Upgraded { .. }) {
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

/// Accepts until `stop`, backing off when accepting fails (out of fds), with
/// at most one warning a second.
async fn accept_loop<L, H, F>(listener: Arc<L>, stop: CancellationToken, drain: Drain, handler: H)
where
    L: Accept,
    H: Fn(L::Conn, ConnectionGuard) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = FIRST_BACKOFF;
    let mut suppressed = 0u64;
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept_conn() => match accepted {
                Ok(conn) => {
                    backoff = FIRST_BACKOFF;
                    tokio::spawn(handler(conn, drain.track()));
                }
                Err(error) => {
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(%error, suppressed, retry_ms = backoff.as_millis() as u64, "accept failed");
                        last_warning = Some(Instant::now());
                        suppressed = 0;
                    } else {
                        suppressed += 1;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
