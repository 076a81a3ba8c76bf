//! What `handoff run` was asked to do: its sockets, readiness check,
//! deadlines, stop signal and command.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::Ready;

/// Where a supervised socket is bound.
///
/// ```
/// use handoff::supervisor::Listen;
/// let (name, addr) = Listen::parse("web=tcp://127.0.0.1:8080").unwrap();
/// assert_eq!(name, "web");
/// assert!(matches!(addr, Listen::Tcp(_)));
/// assert!(Listen::parse("web=ftp://x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `tcp://HOST:PORT`
    Tcp(SocketAddr),
    /// `udp://HOST:PORT`
    Udp(SocketAddr),
    /// `unix:///path`
    Unix(PathBuf),
}

impl Listen {
    /// Parses `NAME=ADDR`.
    pub fn parse(text: &str) -> Result<(String, Listen), String> {
        let (name, addr) = text.split_once('=').ok_or_else(|| {
            format!("{text:?}: expected NAME=ADDR, e.g. web=tcp://127.0.0.1:8080")
        })?;
        let inet = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("{text:?}: {a:?} is not HOST:PORT ({e})"))
        };
        let listen = if let Some(a) = addr.strip_prefix("tcp://") {
            Listen::Tcp(inet(a)?)
        } else if let Some(a) = addr.strip_prefix("udp://") {
            Listen::Udp(inet(a)?)
        } else if let Some(p) = addr.strip_prefix("unix://") {
            Listen::Unix(PathBuf::from(p))
        } else {
            return Err(format!(
                "{text:?}: ADDR must start with tcp://, udp:// or unix://"
            ));
        };
        Ok((name.to_owned(), listen))
    }
}

/// What `handoff run` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    /// Named sockets to own (reused by name if systemd passed them).
    pub listen: Vec<(String, Listen)>,
    /// How a child shows it is ready.
    pub ready: Ready,
    /// How long a new child has to get ready.
    pub upgrade_timeout: Duration,
    /// How long a stopping child has to exit before `SIGKILL`.
    pub drain_timeout: Duration,
    /// The control socket to serve, if any.
    pub control: Option<PathBuf>,
    /// The signal that asks a child to stop (drain and exit).
    pub stop_signal: Signal,
    /// The child's command: program and arguments.
    pub command: Vec<OsString>,
    /// Restarts of a child that is not serving (a crash loop, a missing
    /// binary) allowed within [`restart_window`](Self::restart_window);
    /// one more and the supervisor exits with the last error.
    pub max_restarts: u32,
    /// The sliding window of [`max_restarts`](Self::max_restarts).
    pub restart_window: Duration,
    /// In an upgrade, how long a new child must live after it said ready
    /// before it takes over (the old one serves on beside it until then);
    /// one that dies sooner is a failed upgrade. Zero: it takes over at
    /// once, as does any child when none serves.
    pub min_uptime: Duration,
}
