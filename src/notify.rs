//! The `sd_notify` datagram protocol: a parent's private notify socket that
//! hears `READY=1` from its successor (checking the sender's PID with
//! `SCM_CREDENTIALS`), sending messages to such a socket, and [`Upstream`]:
//! the service manager's (systemd's) socket, with the `BARRIER=1` handshake.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram as StdUnixDatagram};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags, UnixAddr};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Where notify messages go: a path, or a Linux abstract socket name (`@name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotifyAddr {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// Parses a `NOTIFY_SOCKET` value.
    pub(crate) fn parse(value: &str) -> Result<Self, String> {
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return Err("an abstract socket name needs at least one byte after '@'".into());
            }
            Ok(NotifyAddr::Abstract(name.as_bytes().to_vec()))
        } else if value.starts_with('/') {
            Ok(NotifyAddr::Path(PathBuf::from(value)))
        } else {
            Err("expected an absolute path or an abstract name starting with '@'".into())
        }
    }

    fn socket_addr(&self) -> io::Result<UnixSocketAddr> {
        match self {
            NotifyAddr::Path(path) => UnixSocketAddr::from_pathname(path),
            NotifyAddr::Abstract(name) => UnixSocketAddr::from_abstract_name(name),
        }
    }

    /// Sends one datagram of newline-separated `KEY=VALUE` lines.
    pub(crate) fn send(&self, message: &str) -> io::Result<()> {
        let socket = StdUnixDatagram::unbound()?;
        let sent = socket.send_to_addr(message.as_bytes(), &self.socket_addr()?)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notify message truncated",
            ));
        }
        Ok(())
    }
}

impl NotifyAddr {
    fn unix_addr(&self) -> io::Result<UnixAddr> {
        Ok(match self {
            NotifyAddr::Path(path) => UnixAddr::new(path.as_path())?,
            NotifyAddr::Abstract(name) => UnixAddr::new_abstract(name)?,
        })
    }

    /// Sends `message` with `fd` attached (`SCM_RIGHTS`).
    fn send_with_fd(&self, message: &str, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        let socket = StdUnixDatagram::unbound()?;
        let fds = [fd.as_raw_fd()];
        let iov = [io::IoSlice::new(message.as_bytes())];
        sendmsg(
            socket.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&self.unix_addr()?),
        )?;
        Ok(())
    }
}

/// The service manager's notify socket: `NOTIFY_SOCKET` as systemd set it.
/// Without one every call is a no-op; when sending fails the service goes on
/// serving, and only the first failure is logged.
#[derive(Debug)]
pub(crate) struct Upstream {
    addr: Option<NotifyAddr>,
    warned: AtomicBool,
}

impl Upstream {
    pub(crate) fn new(addr: Option<NotifyAddr>) -> Self {
        Upstream {
            addr,
            warned: AtomicBool::new(false),
        }
    }

    pub(crate) fn addr(&self) -> Option<&NotifyAddr> {
        self.addr.as_ref()
    }

    fn warn_once(&self, addr: &NotifyAddr, error: &io::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(pid = std::process::id(), socket = %addr, %error, "cannot notify the service manager; serving goes on");
        }
    }

    /// Sends newline-separated `KEY=VALUE` lines; true if they were sent.
    pub(crate) fn send(&self, message: &str) -> bool {
        let Some(addr) = &self.addr else {
            return false;
        };
        tracing::debug!(socket = %addr, message, "notify");
        match addr.send(message) {
            Ok(()) => true,
            Err(error) => {
                self.warn_once(addr, &error);
                false
            }
        }
    }

    /// The `BARRIER=1` handshake (as `sd_notify_barrier(3)`): sends the write
    /// end of a pipe and waits, at most `timeout`, until the manager closes it,
    /// which it does once it has processed every earlier message. True if the
    /// manager answered.
    pub(crate) async fn barrier(&self, timeout: Duration) -> bool {
        let Some(addr) = &self.addr else {
            return false;
        };
        let result = async {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            addr.send_with_fd("BARRIER=1", std::os::fd::AsFd::as_fd(&write))?;
            drop(write);
            let read = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
            // The read end becomes readable (hang-up) once every copy of the
            // write end is closed.
            tokio::time::timeout(timeout, read.readable())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to BARRIER=1"))?
        }
        .await;
        match result {
            Ok(()) => true,
            Err(error) => {
                self.warn_once(addr, &error);
                false
            }
        }
    }
}

/// `MONOTONIC_USEC=` for `RELOADING=1`: now on `CLOCK_MONOTONIC`, in µs.
pub(crate) fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

impl fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyAddr::Path(path) => write!(f, "{}", path.display()),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

pub(crate) use crate::channel::Message;

/// A private notify socket under an abstract name, readable by this process only
/// in the sense that every message carries its sender's PID.
pub(crate) struct NotifyListener {
    socket: UnixDatagram,
    addr: NotifyAddr,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl NotifyListener {
    /// Binds a new socket under a fresh abstract name. Needs a tokio runtime.
    pub(crate) fn bind() -> io::Result<Self> {
        loop {
            let name = format!(
                "handoff/{}/{}/{:x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                nanos()
            );
            let addr = NotifyAddr::Abstract(name.into_bytes());
            let socket = match StdUnixDatagram::bind_addr(&addr.socket_addr()?) {
                Ok(socket) => socket,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            };
            setsockopt(&socket, sockopt::PassCred, &true)?;
            socket.set_nonblocking(true)?;
            let socket = UnixDatagram::from_std(socket)?;
            return Ok(NotifyListener { socket, addr });
        }
    }

    pub(crate) fn addr(&self) -> &NotifyAddr {
        &self.addr
    }

    /// Waits for the next datagram. Fds attached to it are closed, and a
    /// truncated one is returned with its problem noted, never as an error.
    pub(crate) async fn recv(&self) -> io::Result<Message> {
        let fd = self.socket.as_raw_fd();
        loop {
            let message = self
                .socket
                .async_io(Interest::READABLE, || crate::channel::recv_message(fd))
                .await?;
            // A datagram socket has no end-of-file; an empty datagram is one.
            if let Some(message) = message {
                return Ok(message);
            }
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notify_socket_values() {
        assert_eq!(
            NotifyAddr::parse("/run/systemd/notify"),
            Ok(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyAddr::parse("@x"),
            Ok(NotifyAddr::Abstract(b"x".to_vec()))
        );
        assert!(NotifyAddr::parse("@").is_err());
        assert!(NotifyAddr::parse("run/notify").is_err());
        assert_eq!(NotifyAddr::parse("@abc").unwrap().to_string(), "@abc");
    }

    #[tokio::test]
    async fn the_barrier_completes_when_the_receiver_closes_the_fd() {
        let listener = NotifyListener::bind().unwrap();
        let upstream = Upstream::new(Some(listener.addr().clone()));
        let barrier = tokio::spawn(async move { upstream.barrier(Duration::from_secs(30)).await });
        // The "manager" reads the message; receiving and dropping the fd closes it.
        let msg = listener.recv().await.unwrap();
        assert!(msg.text.lines().any(|l| l == "BARRIER=1"));
        assert!(msg.problem.unwrap().contains("1 fds (closed)"));
        assert!(
            barrier.await.unwrap(),
            "the barrier returned once the fd was closed"
        );
        // No manager at all: a no-op.
        assert!(!Upstream::new(None).barrier(Duration::from_secs(1)).await);
        assert!(!Upstream::new(None).send("READY=1"));
    }

    #[tokio::test]
    async fn a_message_carries_the_senders_pid() {
        let listener = NotifyListener::bind().unwrap();
        listener.addr().send("READY=1\nSTATUS=hello").unwrap();
        let msg = listener.recv().await.unwrap();
        assert_eq!(msg.pid, Some(std::process::id()));
        assert!(msg.has("READY=1"));
        assert!(!msg.has("READY=0"));
    }
}
