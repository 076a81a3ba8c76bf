//! [`Handoff`]: what this process is (fresh, socket-activated or a successor),
//! its lifecycle (starting, serving, upgrading, handed over, stopping), and
//! `ready()`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::env::{self, StartMode};
use crate::error::Error;
use crate::fds::Registry;
use crate::notify::{NotifyAddr, Upstream};
use crate::pidfile::PidFile;
use crate::spawn::resolve_program;
use crate::upgrade::UpgradeEvent;

/// The default time a successor has to become ready.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

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
        let (start, inherited) = env::take_from_process().ok_or(Error::AlreadyBuilt)??;
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
                notify_parent: start.notify_parent,
                upstream: Upstream::new(start.notify_upstream),
                last_failure: Mutex::new(None),
                started: std::time::Instant::now(),
                upgrades_done: Default::default(),
                upgrades_failed: Default::default(),
                registry: Mutex::new(Registry::new(inherited)),
                state: Mutex::new(State::Starting),
                stop: CancellationToken::new(),
                force: CancellationToken::new(),
                stop_reason: Mutex::new(None),
                events,
            }),
        })
    }
}

/// Where this process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Not ready yet.
    Starting,
    /// In `ready()`: telling the parent (or systemd); not upgradable yet.
    Readying,
    /// Ready; may upgrade.
    Serving,
    /// A successor is starting.
    Upgrading,
    /// A successor took over; this process drains and exits.
    HandedOver { successor: u32 },
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
    pub notify_parent: Option<NotifyAddr>,
    pub upstream: Upstream,
    pub last_failure: Mutex<Option<String>>,
    pub started: std::time::Instant,
    pub upgrades_done: std::sync::atomic::AtomicU64,
    pub upgrades_failed: std::sync::atomic::AtomicU64,
    pub registry: Mutex<Registry>,
    pub state: Mutex<State>,
    pub stop: CancellationToken,
    pub force: CancellationToken,
    pub stop_reason: Mutex<Option<StopReason>>,
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
            .field("state", &*lock(&self.inner.state))
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

    /// Tells the parent (or systemd) that this process serves.
    ///
    /// In order: inherited fds that the application did not claim are closed;
    /// the PID file, if configured, is replaced atomically; then the parent
    /// learns `READY=1` and completes its upgrade. Call it once every listener
    /// is claimed and accepting.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.ready()?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        {
            let mut state = lock(&inner.state);
            if *state != State::Starting {
                return Err(Error::AlreadyReady);
            }
            *state = State::Readying;
        }
        let result = self.announce_ready();
        // Only now may this process upgrade: its own parent's upgrade (if
        // any) is over, so two upgrades are never in flight at once.
        *lock(&inner.state) = if result.is_ok() {
            State::Serving
        } else {
            State::Starting
        };
        result
    }

    fn announce_ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        for name in lock(&inner.registry).close_unclaimed() {
            tracing::warn!(pid = inner.pid, listener = %name, "closing an inherited fd that was not claimed");
        }
        if let Some(pid_file) = &inner.pid_file {
            pid_file.write(inner.pid).map_err(|e| {
                Error::io(
                    format!("cannot write the PID file {}", pid_file.path().display()),
                    e,
                )
            })?;
        }
        if let Some(parent) = &inner.notify_parent {
            parent
                .send(&format!("READY=1\nMAINPID={}", inner.pid))
                .map_err(|source| Error::NotifyParent {
                    socket: parent.to_string(),
                    source,
                })?;
        }
        self.tell_ready();
        let listeners = lock(&inner.registry).len();
        tracing::info!(
            pid = inner.pid,
            generation = inner.generation,
            listeners,
            "ready"
        );
        Ok(())
    }

    /// Resolves once this process must stop accepting: after a successor took
    /// over, on `SIGTERM`/`SIGINT` (with [`handle_signals`](Self::handle_signals)),
    /// or after [`request_stop`](Self::request_stop).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) {
    /// let reason = handoff.stopping().await;
    /// println!("no longer accepting: {reason}");
    /// # }
    /// ```
    pub async fn stopping(&self) -> StopReason {
        self.inner.stop.cancelled().await;
        lock(&self.inner.stop_reason)
            .clone()
            .unwrap_or(StopReason::Requested)
    }

    /// Whether this process must stop accepting.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// assert!(!handoff.is_stopping());
    /// ```
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// Asks this process to stop accepting, as `SIGTERM` would. The first
    /// reason given is kept.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// handoff.request_stop(handoff::StopReason::Requested);
    /// assert!(handoff.is_stopping());
    /// ```
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut slot = lock(&self.inner.stop_reason);
            if slot.is_some() {
                return;
            }
            tracing::info!(pid = self.inner.pid, generation = self.inner.generation, %reason, "stopping");
            if !matches!(reason, StopReason::Upgraded { .. }) {
                // No successor will take the fds: let the sockets close as
                // soon as the application drops its own copies.
                lock(&self.inner.registry).close_all();
                self.tell_stopping();
            }
            *slot = Some(reason);
        }
        self.inner.stop.cancel();
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
        let state = match *lock(&inner.state) {
            State::Starting | State::Readying => GenerationState::Starting,
            State::Serving | State::Upgrading => GenerationState::Serving,
            State::HandedOver { .. } => GenerationState::Draining,
        };
        let state = if self.is_stopping() {
            GenerationState::Draining
        } else {
            state
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

    pub(crate) fn handed_over(&self) -> Option<u32> {
        match *lock(&self.inner.state) {
            State::HandedOver { successor } => Some(successor),
            _ => None,
        }
    }
}

impl Drop for Inner {
    /// A process that stops without a successor removes what it left on disk:
    /// the PID file (if it still names this process) and the Unix socket
    /// paths it bound (if they are still its own).
    fn drop(&mut self) {
        if matches!(*lock(&self.state), State::HandedOver { .. }) {
            return;
        }
        if let Some(pid_file) = &self.pid_file {
            pid_file.remove_if(self.pid);
        }
        lock(&self.registry).unlink_paths();
    }
}
