//! [`Handoff`]: what this process is (fresh, socket-activated or a successor),
//! its configuration, `ready()`, stopping and exiting. The lifecycle itself
//! is owned by [`Lifecycle`](crate::lifecycle::Lifecycle).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::os::fd::OwnedFd;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, Channel};
use crate::env::{self, Escaped, StartMode};
use crate::error::Error;
use crate::fds::Registry;
use crate::lifecycle::{Lifecycle, Phase};
use crate::notify::Upstream;
use crate::pidfile::PidFile;
use crate::spawn::resolve_program;
use crate::upgrade::UpgradeEvent;

/// The default time a successor has to become ready.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default probation: how long a process that handed over stays alive at
/// least, to take the sockets back if its successor dies.
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(1);
/// The default grace between `SIGTERM` and `SIGKILL` for a failed successor.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Configures a [`Handoff`].
///
/// ```no_run
/// use std::time::Duration;
/// # fn main() -> Result<(), handoff::Error> {
/// let handoff = handoff::Handoff::builder()
///     .pid_file("/run/myserver.pid")
///     .upgrade_timeout(Duration::from_secs(10))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pid_file: Option<PathBuf>,
    upgrade_timeout: Duration,
    probation: Duration,
    kill_grace: Duration,
    command: Option<(PathBuf, Vec<OsString>)>,
}

impl Builder {
    /// Keep a PID file at `path` that always names the process serving new
    /// connections. Each generation writes it atomically before it reports ready.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// How long a successor may take to report ready before it is killed and
    /// the upgrade fails. Default: [`DEFAULT_UPGRADE_TIMEOUT`].
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// After handing over, stay alive at least this long, watching the
    /// successor: if it dies abnormally before this process exits (during the
    /// probation or the drain, whichever is longer), this process takes the
    /// sockets back and serves again. Under systemd the main PID passes to the
    /// successor only when the probation ends, so the take-back never races
    /// systemd. Default: [`DEFAULT_PROBATION`]; zero keeps only the drain.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), handoff::Error> {
    /// let handoff = handoff::Handoff::builder()
    ///     .probation(std::time::Duration::from_secs(5))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn probation(mut self, probation: Duration) -> Self {
        self.probation = probation;
        self
    }

    /// How long a successor that failed (not ready in time, or abandoned)
    /// gets after `SIGTERM` to finish what it accepted, before its process
    /// group is killed. Default: [`DEFAULT_KILL_GRACE`].
    ///
    /// ```no_run
    /// # fn main() -> Result<(), handoff::Error> {
    /// let handoff = handoff::Handoff::builder()
    ///     .kill_grace(std::time::Duration::from_millis(500))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Start `program` with `args` (not including `argv[0]`) as the successor,
    /// instead of the binary and arguments this process was started with.
    pub fn command(
        mut self,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        self.command = Some((program.into(), args.into_iter().map(Into::into).collect()));
        self
    }

    /// Reads the environment this process was started with, takes over the
    /// inherited fds and removes every handoff variable from the environment.
    ///
    /// Call it early, before other threads read the environment (first thing
    /// in `main`, before starting the tokio runtime, is best). It may be called
    /// once per process; a second call returns [`Error::AlreadyBuilt`].
    pub fn build(self) -> Result<Handoff, Error> {
        let (start, inherited, channel) = env::take_from_process().ok_or(Error::AlreadyBuilt)??;
        let cwd = std::env::current_dir()
            .map_err(|e| Error::io("cannot read the working directory", e))?;
        let (program, args) = match self.command {
            Some((program, args)) => {
                let mut argv = vec![program.clone().into_os_string()];
                argv.extend(args);
                (Some(cwd.join(program)), argv)
            }
            None => {
                let argv: Vec<OsString> = std::env::args_os().collect();
                let program = argv.first().and_then(|argv0| resolve_program(argv0, &cwd));
                (program, argv)
            }
        };
        let pid = std::process::id();
        tracing::info!(pid, generation = start.generation, mode = ?start.mode, inherited = inherited.len(), "handoff started");
        let (events, _) = broadcast::channel(64);
        Ok(Handoff {
            inner: Arc::new(Inner {
                mode: start.mode,
                generation: start.generation,
                pid,
                program,
                args,
                cwd,
                pid_file: self.pid_file.map(PidFile::new),
                upgrade_timeout: self.upgrade_timeout,
                probation: self.probation,
                kill_grace: self.kill_grace,
                parent: Mutex::new(channel),
                parent_channel: std::sync::OnceLock::new(),
                upstream: Upstream::new(start.notify_upstream),
                last_failure: Mutex::new(None),
                started: std::time::Instant::now(),
                upgrades_done: Default::default(),
                upgrades_failed: Default::default(),
                registry: Mutex::new(Registry::new(inherited)),
                life: Lifecycle::new(),
                force: CancellationToken::new(),
                manager_told: std::sync::atomic::AtomicBool::new(false),
                events,
            }),
        })
    }
}

/// Why this process must stop accepting.
///
/// ```
/// let reason = handoff::StopReason::Signal("SIGTERM");
/// assert_eq!(reason.to_string(), "received SIGTERM");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A successor is ready and serves from now on.
    Upgraded {
        /// The successor's PID.
        successor: u32,
    },
    /// A termination signal arrived.
    Signal(&'static str),
    /// The application called [`Handoff::request_stop`].
    Requested,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Upgraded { successor } => write!(f, "handed over to pid {successor}"),
            StopReason::Signal(name) => write!(f, "received {name}"),
            StopReason::Requested => write!(f, "stop requested"),
        }
    }
}

/// The handle a server uses to get its sockets, say it is ready, upgrade,
/// and learn when to stop. Cheap to clone; all clones share one state.
///
/// ```no_run
/// # async fn serve(listener: tokio::net::TcpListener) {}
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let handoff = handoff::Handoff::builder().build()?;
///     tokio::runtime::Runtime::new()?.block_on(async {
///         let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
///         handoff.handle_signals()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
///         tokio::spawn(serve(listener));
///         handoff.ready()?;
///         let reason = handoff.stopping().await;
///         println!("stopping: {reason}");
///         Ok(())
///     })
/// }
/// ```
#[derive(Clone)]
pub struct Handoff {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub mode: StartMode,
    pub generation: u64,
    pub pid: u32,
    pub program: Option<PathBuf>,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub pid_file: Option<PidFile>,
    pub upgrade_timeout: Duration,
    pub probation: Duration,
    pub kill_grace: Duration,
    /// A successor's end of the readiness channel, until `ready()` takes it.
    pub parent: Mutex<Option<OwnedFd>>,
    /// The same, once `ready()` opened it (to tell the parent later that
    /// this process handed over in turn).
    pub parent_channel: std::sync::OnceLock<Channel>,
    pub upstream: Upstream,
    pub last_failure: Mutex<Option<String>>,
    pub started: std::time::Instant,
    pub upgrades_done: std::sync::atomic::AtomicU64,
    pub upgrades_failed: std::sync::atomic::AtomicU64,
    pub registry: Mutex<Registry>,
    /// The one owner of the lifecycle.
    pub life: Lifecycle,
    pub force: CancellationToken,
    /// Whether systemd was told `MAINPID=` of the successor already.
    pub manager_told: std::sync::atomic::AtomicBool,
    pub events: broadcast::Sender<UpgradeEvent>,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every
/// critical section here leaves the data consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("pid", &self.inner.pid)
            .field("generation", &self.inner.generation)
            .field("mode", &self.inner.mode)
            .field("phase", &self.inner.life.get().phase)
            .finish()
    }
}

impl Handoff {
    /// Starts configuring a `Handoff`.
    ///
    /// ```no_run
    /// let handoff = handoff::Handoff::builder().build().expect("bad handoff environment");
    /// ```
    pub fn builder() -> Builder {
        Builder {
            pid_file: None,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            probation: DEFAULT_PROBATION,
            kill_grace: DEFAULT_KILL_GRACE,
            command: None,
        }
    }

    /// How this process was started.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// if handoff.start_mode() == handoff::StartMode::Successor {
    ///     println!("taking over from my predecessor");
    /// }
    /// ```
    pub fn start_mode(&self) -> StartMode {
        self.inner.mode
    }

    /// The generation: 1 for a fresh start, one more with each upgrade.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// println!("generation {}", handoff.generation());
    /// ```
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

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
    /// died before it could commit, and this process serves alone.
    async fn await_commit(&self) {
        let Some(parent) = self.inner.parent_channel.get() else {
            return;
        };
        loop {
            match parent.recv().await {
                Ok(Some(message)) if message.has(channel::COMMITTED) => {
                    return self.become_serving();
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

    /// Resolves once this process must stop accepting: after a successor took
    /// over, on `SIGTERM`/`SIGINT` (with [`handle_signals`](Self::handle_signals)),
    /// or after [`request_stop`](Self::request_stop).
    ///
    /// After a handover the process may take the sockets back (its successor
    /// died): it then serves again, and `stopping()` waits for the next stop.
    /// [`serve`](Self::serve) handles this; a hand-written accept loop does so
    /// with [`finish`](Self::finish).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// let reason = handoff.stopping().await;
    /// println!("no longer accepting: {reason}");
    /// # }
    /// ```
    pub async fn stopping(&self) -> StopReason {
        let life = self.inner.life.wait(|l| l.stop_reason().is_some()).await;
        life.stop_reason().unwrap_or(StopReason::Requested)
    }

    /// Whether this process must not accept now (it handed over or stops).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// assert!(!handoff.is_stopping());
    /// ```
    pub fn is_stopping(&self) -> bool {
        self.inner.life.get().stop_reason().is_some()
    }

    /// Asks this process to stop accepting, for good, as `SIGTERM` would. The
    /// first reason given is kept.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.request_stop(handoff::StopReason::Requested);
    /// assert!(handoff.is_stopping());
    /// ```
    pub fn request_stop(&self, reason: StopReason) {
        let inner = &self.inner;
        let shown = reason.to_string();
        inner.life.stop(reason, |left| {
            tracing::info!(pid = inner.pid, generation = inner.generation, reason = %shown, "stopping");
            if !matches!(left, Phase::HandedOver { .. }) {
                // No successor will take the fds: let the sockets close as
                // soon as the application drops its own copies.
                lock(&inner.registry).close_all();
                self.tell_stopping();
            }
        });
    }

    /// Resolves when draining must end at once (a second `SIGTERM`/`SIGINT`,
    /// or [`force_stop`](Self::force_stop)).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// handoff.forced().await;
    /// eprintln!("cutting remaining connections");
    /// # }
    /// ```
    pub async fn forced(&self) {
        self.inner.force.cancelled().await
    }

    /// Ends draining at once; implies [`request_stop`](Self::request_stop).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.force_stop();
    /// ```
    pub fn force_stop(&self) {
        self.request_stop(StopReason::Requested);
        self.inner.force.cancel();
    }

    /// Call when this process has stopped accepting and drained, before it
    /// exits. After a handover it waits out the probation
    /// ([`Builder::probation`]); if the successor died meanwhile and this
    /// process took the sockets back, it returns [`Finish::Resume`]: accept
    /// again. Otherwise it tells systemd the successor's PID, releases the
    /// sockets and returns [`Finish::Exit`]. Without a handover it returns
    /// `Exit` once no upgrade is in flight (or `Resume` if the process was
    /// never stopped).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// loop {
    ///     // ... accept until handoff.stopping(), then drain ...
    ///     if handoff.finish().await == handoff::Finish::Exit {
    ///         break;
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn finish(&self) -> Finish {
        let inner = &self.inner;
        let life = inner
            .life
            .wait(|l| match l.phase {
                Phase::HandedOver { .. } => l.probation_over,
                // An upgrade cut short by a stop ends (its candidate stopped
                // and reaped, the outcome reported) before the process exits.
                _ => !l.upgrade_in_flight,
            })
            .await;
        if life.accepting() || matches!(life.phase, Phase::Starting | Phase::Readying) {
            return Finish::Resume;
        }
        inner.life.finish_handover();
        if let Some(successor) = inner.life.get().successor() {
            self.tell_handover(successor).await;
            // The successor holds the sockets now; the paths stay its own.
            lock(&inner.registry).release();
        }
        Finish::Exit
    }

    /// This process's state, as `handoff status` shows it. `drain`, if given,
    /// supplies the number of open connections.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let status = handoff.status(None);
    /// println!("{} upgrades done", status.upgrades_done);
    /// ```
    pub fn status(&self, drain: Option<&crate::Drain>) -> crate::control::Status {
        use crate::control::{Generation, GenerationState};
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let state = match inner.life.get().phase {
            Phase::Starting | Phase::Readying => GenerationState::Starting,
            Phase::Serving | Phase::Upgrading => GenerationState::Serving,
            Phase::HandedOver { .. } | Phase::Stopping { .. } => GenerationState::Draining,
        };
        crate::control::Status {
            pid: inner.pid,
            generations: vec![Generation {
                pid: inner.pid,
                generation: inner.generation,
                state,
                age_secs: inner.started.elapsed().as_secs_f64(),
                connections: drain.map(crate::Drain::active),
                listeners: lock(&inner.registry).names(),
            }],
            // Every generation after the first is one upgrade that succeeded.
            upgrades_done: inner.generation - 1 + inner.upgrades_done.load(Ordering::Relaxed),
            upgrades_failed: inner.upgrades_failed.load(Ordering::Relaxed),
            last_failure: lock(&inner.last_failure).clone(),
        }
    }

    /// The successor this process handed over to, if any.
    pub(crate) fn handed_over(&self) -> Option<u32> {
        self.inner.life.get().successor()
    }
}

/// What [`Handoff::finish`] tells a process that stopped accepting.
///
/// ```
/// assert_ne!(handoff::Finish::Exit, handoff::Finish::Resume);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Exit: the successor serves (or the process stops for good).
    Exit,
    /// Serve again: the successor died and this process took the sockets back.
    Resume,
}

/// Whether a send to the parent failed because the parent is gone.
fn parent_gone(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNREFUSED | libc::ECONNRESET | libc::ENOTCONN)
    )
}

impl Drop for Inner {
    /// A process that stops without a successor removes what it left on disk:
    /// the PID file (if it still names this process) and the Unix socket
    /// paths it bound (if they are still its own), but only if it ever
    /// served: a successor that failed at start-up leaves its predecessor's
    /// paths alone. A process that handed over and exits without
    /// [`Handoff::finish`] still tells systemd its successor's PID.
    fn drop(&mut self) {
        let life = self.life.get();
        if let Some(successor) = life.successor() {
            if !self
                .manager_told
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                self.upstream.send(&format!("MAINPID={successor}"));
            }
            return;
        }
        if !life.served {
            return;
        }
        if let Some(pid_file) = &self.pid_file {
            pid_file.remove_if(self.pid);
        }
        lock(&self.registry).unlink_paths();
    }
}
