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

use crate::channel::Channel;
use crate::env::StartMode;
use crate::error::Error;
use crate::fds::Registry;
use crate::inherited;
use crate::launch::Launch;
use crate::lifecycle::{Lifecycle, Phase};
use crate::notify::Upstream;
use crate::pidfile::PidFile;
use crate::upgrade::UpgradeEvent;
use crate::watchdog::Watchdog;

/// The default time a successor has to become ready.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default probation: how long a process that handed over stays alive at
/// least, to take the sockets back if its successor dies.
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(1);
/// The default grace between `SIGTERM` and `SIGKILL` for a failed successor.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// The successor a process committed to: its end of the readiness channel,
/// and its pidfd.
pub(crate) struct SuccessorLink {
    pub channel: Arc<Channel>,
    pub pidfd: Option<OwnedFd>,
}

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
    ipv6_only: bool,
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

    /// IPv6 sockets this process binds accept IPv6 only (`IPV6_V6ONLY`).
    /// By default they are left as the system sets them, as std's are: a
    /// listener on `[::]` is then dual-stack (IPv4 clients arrive as
    /// `::ffff:a.b.c.d`) unless `net.ipv6.bindv6only` is 1. Inherited
    /// sockets keep what they were bound with.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), handoff::Error> {
    /// let handoff = handoff::Handoff::builder().ipv6_only(true).build()?;
    /// let v6 = handoff.std_tcp_listener("http6", "[::]:8080".parse().unwrap())?;
    /// # Ok(()) }
    /// ```
    pub fn ipv6_only(mut self, only: bool) -> Self {
        self.ipv6_only = only;
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

    /// Parses the environment this process was started with and takes over
    /// the inherited fds.
    ///
    /// It may run anywhere, on any thread, `#[tokio::main]` included: the
    /// handoff variables were read and removed from the environment before
    /// `main` (while only one thread existed), and the inherited fds marked
    /// close-on-exec, so the application's subprocesses inherit neither.
    /// It may be called once per process; a second call returns
    /// [`Error::AlreadyBuilt`].
    ///
    /// ```no_run
    /// #[tokio::main]
    /// async fn main() -> Result<(), handoff::Error> {
    ///     let handoff = handoff::Handoff::builder().build()?;
    ///     println!("generation {}", handoff.generation());
    ///     Ok(())
    /// }
    /// ```
    pub fn build(self) -> Result<Handoff, Error> {
        let (start, inherited, channel) =
            inherited::take_from_process().ok_or(Error::AlreadyBuilt)??;
        let launch = match self.command {
            Some((program, args)) => Launch::command(program, args),
            None => Launch::this_process(),
        }
        .map_err(|e| Error::io("cannot read the working directory", e))?;
        let pid = std::process::id();
        tracing::debug!(pid, generation = start.generation, mode = ?start.mode, inherited = inherited.len(), "handoff started");
        let (events, _) = broadcast::channel(64);
        Ok(Handoff {
            inner: Arc::new(Inner {
                mode: start.mode,
                generation: start.generation,
                pid,
                launch,
                pid_file: self.pid_file.map(PidFile::new),
                upgrade_timeout: self.upgrade_timeout,
                probation: self.probation,
                kill_grace: self.kill_grace,
                ipv6_only: self.ipv6_only,
                parent: Mutex::new(channel),
                parent_channel: std::sync::OnceLock::new(),
                successor: Mutex::new(None),
                handover_told: tokio::sync::OnceCell::new(),
                watchdog: Watchdog::from_env(start.mode != StartMode::Successor),
                upstream: Upstream::new(start.notify_upstream),
                last_failure: Mutex::new(None),
                started: std::time::Instant::now(),
                upgrades_done: Default::default(),
                upgrades_failed: Default::default(),
                registry: Mutex::new(Registry::new(
                    inherited,
                    start.mode == StartMode::SocketActivated,
                )),
                life: Lifecycle::new(),
                force: CancellationToken::new(),
                manager_told: Mutex::new(false),
                signals: std::sync::atomic::AtomicBool::new(false),
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
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let handoff = handoff::Handoff::builder().build()?;
///     let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
///     handoff.handle_signals()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
///     tokio::spawn(serve(listener)); // or better: handoff::Serve, which drains
///     handoff.ready()?;
///     let reason = handoff.stopping().await;
///     println!("stopping: {reason}");
///     Ok(())
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
    /// How to start the successor (resolved at each upgrade).
    pub launch: Launch,
    pub pid_file: Option<PidFile>,
    pub upgrade_timeout: Duration,
    pub probation: Duration,
    pub kill_grace: Duration,
    /// See [`Builder::ipv6_only`].
    pub ipv6_only: bool,
    /// A successor's end of the readiness channel, until `ready()` takes it.
    pub parent: Mutex<Option<OwnedFd>>,
    /// The same, once `ready()` opened it (to tell the parent later that
    /// this process handed over in turn).
    pub parent_channel: std::sync::OnceLock<Channel>,
    /// The successor this process commits (or committed) to: to say
    /// `MAIN=1` once systemd knows it as main, and to pass a `SIGHUP` on.
    pub successor: Mutex<Option<SuccessorLink>>,
    /// Done once systemd was told `MAINPID=` of the successor (and
    /// answered, or the wait timed out): every caller waits for the one
    /// telling.
    pub handover_told: tokio::sync::OnceCell<()>,
    /// The service's watchdog, and whether this process is main for it.
    pub watchdog: Watchdog,
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
    /// Held while a message goes to systemd that only the main process may
    /// send (`WATCHDOG=1`, `MAINPID=`), so none follows the handover.
    pub manager_told: Mutex<bool>,
    /// Whether `handle_signals` installed the handler.
    pub signals: std::sync::atomic::AtomicBool,
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
            ipv6_only: false,
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
            restarts: 0,
            last_error: None,
            next_restart_in_secs: None,
        }
    }

    /// The successor this process handed over to, if any.
    pub(crate) fn handed_over(&self) -> Option<u32> {
        self.inner.life.get().successor()
    }
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
            let mut told = lock(&self.manager_told);
            if !*told {
                *told = true;
                self.upstream.send(&format!("MAINPID={successor}"));
                if let Some(link) = &*lock(&self.successor) {
                    let _ = link.channel.send(crate::channel::MAIN);
                }
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
