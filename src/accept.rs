//! Accepting: the listeners [`Serve`](crate::Serve) takes, and the loop that
//! accepts on one of them until told to stop, backing off when the process
//! is out of fds.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::drain::{ConnectionGuard, Drain};

/// A listener [`Serve`](crate::Serve) can accept on: tokio's TCP and Unix
/// listeners, or one's own. `accept_conn` must be quick and cancel-safe
/// (it is dropped when accepting stops): a TLS handshake belongs in the
/// per-connection handler, not here. A failure that is one client's (a
/// connection reset or aborted before it was accepted, or an error of one's
/// own with no OS error code) is skipped; any other OS error (out of fds,
/// say) makes the loop back off, with at most one warning a second.
///
/// ```
/// fn takes_any<L: handoff::Accept>(_: L) {}
/// # async fn f() { takes_any(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()); }
/// ```
pub trait Accept: Send + Sync + 'static {
    /// An accepted connection.
    type Conn: Send + 'static;
    /// Accepts the next connection.
    ///
    /// ```
    /// # async fn f(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    /// use handoff::Accept;
    /// let stream = listener.accept_conn().await?;
    /// # Ok(()) }
    /// ```
    fn accept_conn(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        let (stream, _) = self.accept().await?;
        // Nagle only delays small responses; servers want them out at once.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// One listener or several, as [`Serve`](crate::Serve) takes them.
///
/// ```
/// fn serve_on<L: handoff::Accept>(_: impl handoff::IntoListeners<L>) {}
/// # async fn f() -> std::io::Result<()> {
/// let a = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let b = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// serve_on(vec![a, b]);
/// serve_on(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
/// # Ok(()) }
/// ```
pub trait IntoListeners<L: Accept> {
    /// The listeners, in order.
    ///
    /// ```
    /// # async fn f() -> std::io::Result<()> {
    /// use handoff::IntoListeners;
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// assert_eq!(listener.into_listeners().len(), 1);
    /// # Ok(()) }
    /// ```
    fn into_listeners(self) -> Vec<L>;
}

impl<L: Accept> IntoListeners<L> for L {
    fn into_listeners(self) -> Vec<L> {
        vec![self]
    }
}

impl<L: Accept> IntoListeners<L> for Vec<L> {
    fn into_listeners(self) -> Vec<L> {
        self
    }
}

impl<L: Accept, const N: usize> IntoListeners<L> for [L; N] {
    fn into_listeners(self) -> Vec<L> {
        self.into()
    }
}

/// Accepts until `stop`, backing off when accepting fails (out of fds), with
/// at most one warning a second.
pub(crate) async fn accept_loop<L, H, F>(
    listener: Arc<L>,
    stop: CancellationToken,
    drain: Drain,
    handler: H,
) where
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
                Err(error) if one_clients(&error) => {
                    // One client's trouble (it reset before we accepted, say).
                    tracing::debug!(%error, "accept failed");
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

/// Whether an accept failed for one client's reasons (so the next accept
/// may well succeed), rather than the process's (out of fds, say: then
/// retrying at once would spin).
fn one_clients(error: &io::Error) -> bool {
    match error.raw_os_error() {
        Some(code) => matches!(
            code,
            libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::ETIMEDOUT
        ),
        None => true,
    }
}
