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
/// // Host names are resolved once, here.
/// let (_, Listen::Tcp(local)) = Listen::parse("web=tcp://localhost:8080").unwrap() else {
///     unreachable!()
/// };
/// assert!(local.resolved.iter().all(|a| a.ip().is_loopback() && a.port() == 8080));
/// assert!(Listen::parse("web=ftp://x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `tcp://HOST:PORT`
    Tcp(HostPort),
    /// `udp://HOST:PORT`
    Udp(HostPort),
    /// `unix:///path`
    Unix(PathBuf),
}

/// `HOST:PORT` as written (an IP address or a host name) and the addresses
/// it resolved to, in the resolver's order. The socket is bound at the
/// first of them that can be bound: one `--listen` is one socket, as the
/// children that take only fd 3 expect. (For both IPv4 and IPv6, listen on
/// `[::]`, which is dual-stack where the system says so, or give two.)
///
/// ```
/// use handoff::supervisor::HostPort;
/// let any = HostPort::resolve("[::]:8080").unwrap();
/// assert_eq!(any.resolved, ["[::]:8080".parse().unwrap()]);
/// assert!(HostPort::resolve("localhost").unwrap_err().contains("HOST:PORT"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// As given.
    pub written: String,
    /// What it resolved to; never empty.
    pub resolved: Vec<SocketAddr>,
}

impl HostPort {
    /// Parses an IP address with a port, or resolves a host name with one
    /// (through the system's resolver: `/etc/hosts`, then DNS).
    pub fn resolve(text: &str) -> Result<HostPort, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(HostPort {
                written: text.to_owned(),
                resolved: vec![addr],
            });
        }
        let (host, port) = text
            .rsplit_once(':')
            .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .ok_or_else(|| {
                format!(
                    "{text:?} is not HOST:PORT (e.g. 127.0.0.1:8080, [::]:8080, localhost:8080)"
                )
            })?;
        let mut resolved: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
            .map_err(|e| format!("cannot resolve {host:?} (in {text:?}): {e}"))?
            .collect();
        let mut seen = std::collections::HashSet::new();
        resolved.retain(|addr| seen.insert(*addr));
        if resolved.is_empty() {
            return Err(format!(
                "{host:?} (in {text:?}) resolved to no address with port {port}"
            ));
        }
        Ok(HostPort {
            written: text.to_owned(),
            resolved,
        })
    }
}

impl Listen {
    /// Parses `NAME=ADDR`.
    pub fn parse(text: &str) -> Result<(String, Listen), String> {
        let (name, addr) = text.split_once('=').ok_or_else(|| {
            format!("{text:?}: expected NAME=ADDR, e.g. web=tcp://127.0.0.1:8080")
        })?;
        let inet = |a: &str| HostPort::resolve(a).map_err(|e| format!("{text:?}: {e}"));
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
