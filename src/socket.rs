//! Looking at a socket fd (family, type, listening, bound address) and binding
//! new ones with the options a server wants.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, getsockname, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};

/// The kinds of fd the registry hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdKind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A UDP socket (IPv4 or IPv6).
    Udp,
    /// A listening Unix stream socket.
    UnixListener,
    /// A Unix datagram socket.
    UnixDatagram,
    /// Any other fd: a file, a pipe, an eventfd…
    Other,
}

impl FdKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            FdKind::TcpListener => "a listening TCP socket",
            FdKind::Udp => "a UDP socket",
            FdKind::UnixListener => "a listening Unix stream socket",
            FdKind::UnixDatagram => "a Unix datagram socket",
            FdKind::Other => "an fd",
        }
    }
}

/// A socket's local address, in a form that can be compared with a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LocalAddr {
    Inet(SocketAddr),
    Unix(PathBuf),
    UnixAbstract(Vec<u8>),
    Unnamed,
}

impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalAddr::Inet(addr) => write!(f, "{addr}"),
            LocalAddr::Unix(path) => write!(f, "{}", path.display()),
            LocalAddr::UnixAbstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            LocalAddr::Unnamed => write!(f, "(unbound)"),
        }
    }
}

impl LocalAddr {
    /// Whether a socket bound here satisfies a request for `wanted`. A request
    /// for port 0 ("any port") accepts any port on the same IP.
    pub(crate) fn satisfies(&self, wanted: &LocalAddr) -> bool {
        match (self, wanted) {
            (LocalAddr::Inet(have), LocalAddr::Inet(want)) => {
                have == want || (want.port() == 0 && have.ip() == want.ip())
            }
            _ => self == wanted,
        }
    }
}

/// What an fd turned out to be.
#[derive(Debug, Clone)]
pub(crate) struct FdInfo {
    pub kind: Option<FdKind>,
    pub addr: LocalAddr,
    /// "IPv4", "Unix", …; `None` for an fd that is not a socket.
    family: Option<&'static str>,
    /// "listening TCP socket", "pipe", …
    what: &'static str,
}

impl fmt::Display for FdInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.family {
            Some(family) => write!(f, "{family} {} bound to {}", self.what, self.addr),
            None => f.write_str(self.what),
        }
    }
}

fn int_opt(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len point to a c_int and its size, as getsockopt
    // requires for these SOL_SOCKET integer options; the fd is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Finds out what `fd` is: which kind of socket, bound where; or not a
/// socket. Three system calls for a socket: this runs once per inherited fd,
/// so its cost is paid a thousand times by a server with a thousand listeners.
pub(crate) fn inspect(fd: BorrowedFd<'_>) -> io::Result<FdInfo> {
    // SO_ACCEPTCONN is set only on listening stream sockets, so for the
    // common case (a listener) it also answers SO_TYPE.
    let listening = match int_opt(fd, libc::SO_ACCEPTCONN) {
        Ok(value) => value != 0,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return not_a_socket(fd),
        Err(e) => return Err(e),
    };
    let ty = if listening {
        libc::SOCK_STREAM
    } else {
        int_opt(fd, libc::SO_TYPE)?
    };
    let storage: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let addr = local_addr(&storage);
    let inet = matches!(addr, LocalAddr::Inet(_));
    let unix = matches!(addr, LocalAddr::Unix(_) | LocalAddr::UnixAbstract(_))
        || storage.family() == Some(AddressFamily::Unix);
    let family = match &addr {
        LocalAddr::Inet(SocketAddr::V4(_)) => "IPv4",
        LocalAddr::Inet(SocketAddr::V6(_)) => "IPv6",
        _ if unix => "Unix",
        _ => "other-family",
    };
    let (kind, what) = match (inet, unix, ty, listening) {
        (true, _, libc::SOCK_STREAM, true) => (Some(FdKind::TcpListener), "listening TCP socket"),
        (true, _, libc::SOCK_STREAM, false) => (None, "TCP socket that is not listening"),
        (true, _, libc::SOCK_DGRAM, _) => (Some(FdKind::Udp), "UDP socket"),
        (_, true, libc::SOCK_STREAM, true) => {
            (Some(FdKind::UnixListener), "listening stream socket")
        }
        (_, true, libc::SOCK_STREAM, false) => (None, "stream socket that is not listening"),
        (_, true, libc::SOCK_DGRAM, _) => (Some(FdKind::UnixDatagram), "datagram socket"),
        _ => (None, "socket of another type"),
    };
    Ok(FdInfo {
        kind,
        addr,
        family: Some(family),
        what,
    })
}

fn not_a_socket(fd: BorrowedFd<'_>) -> io::Result<FdInfo> {
    let stat = nix::sys::stat::fstat(fd)?;
    let what = match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFIFO => "pipe",
        libc::S_IFCHR => "character device",
        libc::S_IFDIR => "directory",
        _ => "not a socket",
    };
    Ok(FdInfo {
        kind: None,
        addr: LocalAddr::Unnamed,
        family: None,
        what,
    })
}

fn local_addr(storage: &SockaddrStorage) -> LocalAddr {
    if let Some(v4) = storage.as_sockaddr_in() {
        return LocalAddr::Inet(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = storage.as_sockaddr_in6() {
        return LocalAddr::Inet(SocketAddr::V6((*v6).into()));
    }
    if let Some(unix) = storage.as_unix_addr() {
        if let Some(path) = unix.path() {
            return LocalAddr::Unix(path.to_path_buf());
        }
        if let Some(name) = unix.as_abstract() {
            return LocalAddr::UnixAbstract(name.to_vec());
        }
    }
    LocalAddr::Unnamed
}

/// Binds a listening TCP socket with `SO_REUSEADDR` and the largest backlog
/// the kernel allows. An IPv6 socket is `IPV6_V6ONLY` if `v6_only`, else as
/// the system sets it (`net.ipv6.bindv6only`), as std's are.
pub(crate) fn bind_tcp(addr: SocketAddr, v6_only: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() && v6_only {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(fd)
}

/// Which file a socket path was when it was bound: device, inode and change
/// time (inode numbers are reused at once on tmpfs, so the inode alone is
/// not enough). Passed to successors as `dev,ino,ctime,nsec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathId(u64, u64, i64, i64);

impl PathId {
    fn of(meta: &std::fs::Metadata) -> Self {
        PathId(meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
    }

    /// Parses `dev,ino,ctime,nsec`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(',');
        let mut next = || {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        let id = PathId(
            next()?.parse().ok()?,
            next()?.parse().ok()?,
            next()?.parse().ok()?,
            next()?.parse().ok()?,
        );
        parts.next().is_none().then_some(id)
    }
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{},{}", self.0, self.1, self.2, self.3)
    }
}

/// A Unix socket path bound by this service (by this process or a
/// predecessor), remembered by [`PathId`] so that it is only ever unlinked
/// while it is still the same file.
#[derive(Debug, Clone)]
pub(crate) struct BoundPath {
    pub path: PathBuf,
    pub identity: PathId,
}

impl BoundPath {
    fn record(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(BoundPath {
            path: path.to_path_buf(),
            identity: PathId::of(&meta),
        })
    }

    /// Unlinks the path if it is still the socket this process bound.
    pub(crate) fn unlink_if_ours(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if PathId::of(&meta) == self.identity => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "cannot unlink socket path");
                }
            }
            _ => {
                tracing::debug!(path = %self.path.display(), "socket path is no longer ours; left alone")
            }
        }
    }
}

/// Removes a socket file at `path` that nobody listens on any more, so a
/// restart after a crash can bind again. Anything else at the path is left.
fn remove_stale(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_socket() {
        if let Err(e) = StdUnixStream::connect(path) {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                tracing::info!(path = %path.display(), "removing stale socket path");
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds a Unix socket of `ty` at `path`, listening if it is a stream socket.
/// `mode`, if given, is set on the path before its identity is recorded
/// (changing it later would change the ctime that identifies it).
pub(crate) fn bind_unix(
    path: &Path,
    ty: SockType,
    mode: Option<u32>,
) -> io::Result<(OwnedFd, BoundPath)> {
    remove_stale(path);
    let fd = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    if let Some(mode) = mode {
        if let Err(e) =
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    let bound = BoundPath::record(path)?;
    if ty == SockType::Stream {
        if let Err(e) = listen(&fd, Backlog::MAXCONN) {
            bound.unlink_if_ours();
            return Err(e.into());
        }
    }
    Ok((fd, bound))
}

/// Binds a UDP socket; `v6_only` as for [`bind_tcp`].
pub(crate) fn bind_udp(addr: SocketAddr, v6_only: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() && v6_only {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(fd)
}

/// Whether two addresses describe the same place (for the "already held" check).
pub(crate) fn same_place(a: &LocalAddr, b: &LocalAddr) -> bool {
    match (a, b) {
        (LocalAddr::Inet(x), LocalAddr::Inet(y)) => x.port() != 0 && x == y,
        (LocalAddr::Unnamed, _) | (_, LocalAddr::Unnamed) => false,
        _ => a == b,
    }
}
