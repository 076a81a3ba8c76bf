//! Error types. Each variant names the cause in words an operator can act on.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A malformed handoff or socket-activation environment variable.
///
/// A successor that meets one of these fails before it tells its parent it is
/// ready, so the parent rolls back and keeps serving.
///
/// ```
/// use handoff::EnvError;
/// let err = EnvError::Invalid {
///     var: "LISTEN_FDS",
///     value: "three".into(),
///     reason: "not a decimal number".into(),
/// };
/// assert!(err.to_string().contains("LISTEN_FDS"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The variable's value cannot be parsed or is out of range.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// Its value, lossily converted to UTF-8.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A variable that must accompany another one is absent.
    #[error("environment variable {var} is missing: {reason}")]
    Missing {
        /// The variable's name.
        var: &'static str,
        /// Why it is required.
        reason: String,
    },
    /// `LISTEN_FDS` announces an fd that is not open in this process.
    #[error("environment variable LISTEN_FDS={count} announces fd {fd}, but fd {fd} is not open")]
    FdNotOpen {
        /// The announced count.
        count: usize,
        /// The first fd that is not open.
        fd: i32,
    },
}

/// An error from setting up a [`Handoff`](crate::Handoff) or claiming a named fd.
///
/// ```
/// use handoff::Error;
/// let err = Error::NameInUse { name: "http".into() };
/// assert_eq!(err.to_string(), "fd name \"http\" is already in use in this process");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The environment handed to this process is malformed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The name does not fit the `LISTEN_FDNAMES` rules.
    #[error("invalid fd name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The application asked twice for the same name with the same kind and
    /// address (one name may hold several sockets at different addresses).
    #[error("fd name {name:?} is already in use in this process")]
    NameInUse {
        /// The name.
        name: String,
    },
    /// An inherited fd has the requested name but is of another kind.
    #[error(
        "inherited fd {fd} named {name:?} (LISTEN_FDNAMES) is not {expected} (found: {found})"
    )]
    WrongKind {
        /// The name.
        name: String,
        /// The fd number it arrived on.
        fd: i32,
        /// What the application asked for.
        expected: &'static str,
        /// What the fd really is.
        found: String,
    },
    /// An inherited socket has the requested name but another address.
    #[error("inherited socket {name:?} is bound to {inherited}, but {requested} was requested")]
    AddressMismatch {
        /// The name.
        name: String,
        /// The address of the inherited socket.
        inherited: String,
        /// The address the application asked for.
        requested: String,
    },
    /// The address to bind is already held by a socket under another name.
    #[error("cannot bind {addr} as {name:?}: that address is already held as {other:?}")]
    AddressHeldByOtherName {
        /// The name the application asked for.
        name: String,
        /// The address.
        addr: String,
        /// The name of the socket that holds it.
        other: String,
    },
    /// Binding a new socket failed.
    #[error("cannot bind {name:?} to {addr}: {source}")]
    Bind {
        /// The name.
        name: String,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// [`Builder::build`](crate::Builder::build) was called before in this process.
    #[error("a Handoff was already built in this process; clone that one instead")]
    AlreadyBuilt,
    /// `ready()` was called twice.
    #[error("ready() was already called")]
    AlreadyReady,
    /// Telling the parent that this process is ready failed (other than
    /// because the parent is gone: then this process serves alone).
    #[error("cannot tell the parent ({socket}) that this process is ready: {source}")]
    NotifyParent {
        /// The parent's readiness channel.
        socket: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why an upgrade failed. After any of these the process keeps serving and a
/// later upgrade may succeed.
///
/// ```
/// use handoff::UpgradeError;
/// let err = UpgradeError::Exited { pid: 42, code: 1 };
/// assert_eq!(err.to_string(), "the new process (pid 42) exited with status 1 before it was ready");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade has not finished yet.
    #[error("an upgrade is already in flight")]
    InProgress,
    /// This process already handed over to a successor.
    #[error("this process already handed over to pid {successor}")]
    AlreadyUpgraded {
        /// The successor's PID.
        successor: u32,
    },
    /// This process has not called `ready()` yet, so it cannot hand over.
    #[error("this process is not ready yet")]
    NotReady,
    /// This process is shutting down.
    #[error("this process is shutting down")]
    Stopping,
    /// This process is PID 1 (a container without an init): when it exits,
    /// the kernel kills every process in its PID namespace, the successor too.
    /// An init such as tini is no way out: it exits with its child, the
    /// first generation, and so does the container.
    #[error("this process is PID 1, so its successor would be killed when it exits; run the server under `handoff run` to upgrade it in place (an init such as tini exits with its child, the first generation, which ends the container just the same)")]
    Pid1,
    /// The generation counter is exhausted.
    #[error("generation {generation} is the last one; restart the service to upgrade again")]
    GenerationLimit {
        /// This process's generation.
        generation: u64,
    },
    /// The binary to run does not exist.
    #[error("the new binary {} does not exist", program.display())]
    BinaryMissing {
        /// The path that was executed.
        program: PathBuf,
    },
    /// The binary exists but cannot be executed.
    #[error("the new binary {} cannot be executed: {source}", program.display())]
    NotExecutable {
        /// The path that was executed.
        program: PathBuf,
        /// The error `execve` returned.
        #[source]
        source: Arc<io::Error>,
    },
    /// One argument or environment string of the new process is longer than
    /// Linux takes (`MAX_ARG_STRLEN`, 32 pages: 128 KiB), so `execve` would
    /// fail with `E2BIG`. Found before anything was started.
    #[error("cannot start the new process: {what} is {size} bytes, but Linux takes at most {limit} in one argument or environment string (MAX_ARG_STRLEN; execve would fail with E2BIG); {hint}; nothing was started")]
    ArgumentTooLong {
        /// Which string: `argument 2`, `environment variable NAME`.
        what: String,
        /// Its size in bytes (with `NAME=` and the NUL).
        size: usize,
        /// The limit in bytes.
        limit: usize,
        /// What to do about it.
        hint: String,
    },
    /// The new process's arguments and environment together are larger than
    /// Linux takes (a quarter of the stack limit, at most 6 MiB), so
    /// `execve` would fail with `E2BIG`. Found before anything was started.
    #[error("cannot start the new process: its arguments and environment take {size} bytes, but Linux takes at most {limit} (a quarter of RLIMIT_STACK, at most 6 MiB; execve would fail with E2BIG); the largest is {largest}; shrink the environment or the arguments; nothing was started")]
    ArgumentsTooLarge {
        /// Their size in bytes, with one pointer each and room for what the
        /// kernel adds.
        size: usize,
        /// The limit in bytes.
        limit: usize,
        /// The largest string and its size.
        largest: String,
    },
    /// `execve` failed with `E2BIG` although the sizes were checked (the
    /// kernel counts differently, or a script's interpreter added more).
    #[error("the new binary {} was not started: the kernel refused its argument list and environment as too large (E2BIG); shrink the environment or the arguments", program.display())]
    ExecTooLarge {
        /// The path that was executed.
        program: PathBuf,
    },
    /// The successor exited before it was ready.
    #[error("the new process (pid {pid}) exited with status {code} before it was ready")]
    Exited {
        /// Its PID.
        pid: u32,
        /// Its exit status.
        code: i32,
    },
    /// The successor was killed by a signal before it was ready.
    #[error("the new process (pid {pid}) was killed by signal {signal} before it was ready")]
    Killed {
        /// Its PID.
        pid: u32,
        /// The signal's name, e.g. `SIGSEGV`.
        signal: String,
    },
    /// The successor did not report ready within the upgrade timeout; it was killed.
    #[error("the new process (pid {pid}) was not ready within {timeout:?}; it was killed")]
    Timeout {
        /// Its PID.
        pid: u32,
        /// The upgrade timeout.
        timeout: Duration,
    },
    /// The upgrade was abandoned because this process began to stop.
    #[error("the upgrade was abandoned because this process is stopping; the new process (pid {pid}) was stopped")]
    Cancelled {
        /// The successor's PID.
        pid: u32,
    },
    /// An OS call failed while preparing or supervising the successor.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
}

impl UpgradeError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        UpgradeError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
