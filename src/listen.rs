//! Named sockets and fds: an inherited one with the name is returned if there
//! is one, else a new one is bound. Either way it is kept for the successor.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::socket::SockType;

use crate::error::Error;
use crate::fds::Wanted;
use crate::handoff::{lock, Handoff};
use crate::socket::{bind_tcp, bind_udp, bind_unix, FdKind, LocalAddr};

impl Handoff {
    fn claim_socket(
        &self,
        name: &str,
        kind: FdKind,
        addr: LocalAddr,
        bind: impl FnOnce() -> io::Result<(OwnedFd, Option<crate::socket::BoundPath>)>,
    ) -> Result<OwnedFd, Error> {
        let shown = addr.to_string();
        let wanted = Wanted { kind, addr };
        let claimed = lock(&self.inner.registry).claim(name, &wanted, || {
            bind().map_err(|source| Error::Bind {
                name: name.to_owned(),
                addr: shown.clone(),
                source: with_dual_stack_hint(source, &wanted.addr),
            })
        })?;
        tracing::debug!(
            pid = self.inner.pid,
            generation = self.inner.generation,
            listener = name,
            addr = %claimed.addr,
            "listening"
        );
        Ok(claimed.fd)
    }

    /// Whether claiming `name` at `addr` would take an inherited socket
    /// rather than bind one.
    pub(crate) fn inherits(&self, name: &str, kind: FdKind, addr: SocketAddr) -> bool {
        let wanted = Wanted {
            kind,
            addr: LocalAddr::Inet(addr),
        };
        lock(&self.inner.registry).inherits(name, &wanted)
    }

    /// A listening TCP socket named `name` bound to `addr` (IPv4 or IPv6), as
    /// a std listener. Port 0 accepts an inherited socket on any port. On
    /// `[::]` it is dual-stack where the system says so, as std's are (see
    /// [`Builder::ipv6_only`](crate::Builder::ipv6_only)).
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let listener = handoff.std_tcp_listener("http", "[::1]:8080".parse().unwrap())?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn std_tcp_listener(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<std::net::TcpListener, Error> {
        let fd = self.claim_socket(name, FdKind::TcpListener, LocalAddr::Inet(addr), || {
            bind_tcp(addr, self.inner.ipv6_only).map(|fd| (fd, None))
        })?;
        Ok(fd.into())
    }

    /// A listening TCP socket named `name`, as a tokio listener. Needs a runtime.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), handoff::Error> {
    /// let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse().unwrap())?;
    /// let (stream, peer) = listener.accept().await.unwrap();
    /// # Ok(()) }
    /// ```
    pub fn tcp_listener(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpListener, Error> {
        let listener = self.std_tcp_listener(name, addr)?;
        to_tokio(name, listener, tokio::net::TcpListener::from_std)
    }

    /// A UDP socket named `name` bound to `addr`, as a std socket.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let socket = handoff.std_udp_socket("dns", "127.0.0.1:5353".parse().unwrap())?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn std_udp_socket(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<std::net::UdpSocket, Error> {
        let fd = self.claim_socket(name, FdKind::Udp, LocalAddr::Inet(addr), || {
            bind_udp(addr, self.inner.ipv6_only).map(|fd| (fd, None))
        })?;
        Ok(fd.into())
    }

    /// A UDP socket named `name`, as a tokio socket. Needs a runtime.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), handoff::Error> {
    /// let socket = handoff.udp_socket("dns", "127.0.0.1:5353".parse().unwrap())?;
    /// # Ok(()) }
    /// ```
    pub fn udp_socket(&self, name: &str, addr: SocketAddr) -> Result<tokio::net::UdpSocket, Error> {
        let socket = self.std_udp_socket(name, addr)?;
        to_tokio(name, socket, tokio::net::UdpSocket::from_std)
    }

    /// A listening Unix stream socket named `name` at `path`, as a std
    /// listener. A stale socket file nobody listens on is replaced; the path is
    /// unlinked when the last generation stops, if it is still this socket's.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let listener = handoff.std_unix_listener("admin", "/run/myserver/admin.sock")?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn std_unix_listener(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<std::os::unix::net::UnixListener, Error> {
        self.unix_listener_with_mode(name, path.as_ref(), None)
    }

    /// As [`std_unix_listener`](Self::std_unix_listener), with the socket
    /// file's mode set when it is bound.
    pub(crate) fn unix_listener_with_mode(
        &self,
        name: &str,
        path: &Path,
        mode: Option<u32>,
    ) -> Result<std::os::unix::net::UnixListener, Error> {
        let fd = self.claim_socket(
            name,
            FdKind::UnixListener,
            LocalAddr::Unix(path.to_path_buf()),
            || bind_unix(path, SockType::Stream, mode).map(|(fd, bound)| (fd, Some(bound))),
        )?;
        Ok(fd.into())
    }

    /// A listening Unix stream socket named `name`, as a tokio listener. Needs a runtime.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), handoff::Error> {
    /// let listener = handoff.unix_listener("admin", "/run/myserver/admin.sock")?;
    /// # Ok(()) }
    /// ```
    pub fn unix_listener(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener, Error> {
        let listener = self.std_unix_listener(name, path)?;
        to_tokio(name, listener, tokio::net::UnixListener::from_std)
    }

    /// A Unix datagram socket named `name` at `path`, as a std socket.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// let socket = handoff.std_unix_datagram("log", "/run/myserver/log.sock")?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn std_unix_datagram(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<std::os::unix::net::UnixDatagram, Error> {
        let path = path.as_ref();
        let fd = self.claim_socket(
            name,
            FdKind::UnixDatagram,
            LocalAddr::Unix(path.to_path_buf()),
            || bind_unix(path, SockType::Datagram, None).map(|(fd, bound)| (fd, Some(bound))),
        )?;
        Ok(fd.into())
    }

    /// A Unix datagram socket named `name`, as a tokio socket. Needs a runtime.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), handoff::Error> {
    /// let socket = handoff.unix_datagram("log", "/run/myserver/log.sock")?;
    /// # Ok(()) }
    /// ```
    pub fn unix_datagram(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixDatagram, Error> {
        let socket = self.std_unix_datagram(name, path)?;
        to_tokio(name, socket, tokio::net::UnixDatagram::from_std)
    }

    /// Any other fd (a file, a pipe, a memfd…) passed on under `name`: the
    /// inherited one if there is one, else the one `create` opens. The caller
    /// gets its own duplicate; the original goes to the successor.
    ///
    /// ```no_run
    /// # let handoff = handoff::Handoff::builder().build().unwrap();
    /// use std::os::fd::OwnedFd;
    /// let log: OwnedFd = handoff.fd("access-log", || {
    ///     std::fs::OpenOptions::new().append(true).create(true).open("/tmp/access.log").map(Into::into)
    /// })?;
    /// # Ok::<(), handoff::Error>(())
    /// ```
    pub fn fd(
        &self,
        name: &str,
        create: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> Result<OwnedFd, Error> {
        let wanted = Wanted {
            kind: FdKind::Other,
            addr: LocalAddr::Unnamed,
        };
        let claimed = lock(&self.inner.registry).claim(name, &wanted, || {
            create()
                .map(|fd| (fd, None))
                .map_err(|e| Error::io(format!("cannot open the fd {name:?}"), e))
        })?;
        Ok(claimed.fd)
    }
}

/// An address in use on a wildcard may be a dual-stack `[::]` socket on the
/// same port (the system's default, and std's): say so.
fn with_dual_stack_hint(error: io::Error, addr: &LocalAddr) -> io::Error {
    match addr {
        LocalAddr::Inet(addr)
            if error.kind() == io::ErrorKind::AddrInUse && addr.ip().is_unspecified() =>
        {
            let port = addr.port();
            io::Error::new(
                error.kind(),
                format!(
                    "{error}; note that [::]:{port} is dual-stack unless bound IPv6-only, so it \
                     also holds 0.0.0.0:{port}: to listen on both, bind IPv6 sockets IPv6-only \
                     (Builder::ipv6_only, handoff run --ipv6-only) or listen on [::] alone"
                ),
            )
        }
        _ => error,
    }
}

fn to_tokio<S, T>(
    name: &str,
    socket: S,
    convert: impl FnOnce(S) -> io::Result<T>,
) -> Result<T, Error>
where
    S: SetNonblocking,
{
    socket
        .set_nonblocking_mode()
        .and_then(|()| convert(socket))
        .map_err(|e| {
            Error::io(
                format!("cannot register {name:?} with the tokio runtime"),
                e,
            )
        })
}

/// The std socket types' `set_nonblocking`, behind one name.
trait SetNonblocking: Sized {
    fn set_nonblocking_mode(&self) -> io::Result<()>;
}

macro_rules! set_nonblocking {
    ($($ty:ty),*) => {$(
        impl SetNonblocking for $ty {
            fn set_nonblocking_mode(&self) -> io::Result<()> {
                self.set_nonblocking(true)
            }
        }
    )*};
}

set_nonblocking!(
    std::net::TcpListener,
    std::net::UdpSocket,
    std::os::unix::net::UnixListener,
    std::os::unix::net::UnixDatagram
);
