//! HTTP/1.1 and HTTP/2 on one listener (hyper-util's auto connection), with
//! drain rules that drop no request (feature `hyper`).
//!
//! When draining begins:
//!
//! - **HTTP/1.1**: every response carries `Connection: close`, so a busy
//!   keep-alive client gets its last answer and reconnects (to the
//!   successor) instead of racing a close. A connection gets
//!   [`IDLE_GRACE`] to send its next request before it is closed, so a
//!   request already on its way (or a connection accepted just before the
//!   cutover) is answered, not reset.
//! - **HTTP/2**: a two-phase `GOAWAY` at once: streams in flight finish,
//!   new ones go to a new connection (the successor). (A connection that
//!   has sent no request yet gets the HTTP/1 grace first.)
//! - At the drain deadline, or on a second stop signal, whatever is left is
//!   cut: the process exits by the deadline whatever its clients do (a
//!   half-sent request, an endless stream).
//!
//! Not drained: a connection that switched protocols (a WebSocket, a
//! `CONNECT` tunnel) leaves hyper, and so the drain's tracking, once it
//! switched; its task ends when the process exits. Such an application
//! tracks it itself ([`Drain::track`](crate::Drain::track) on a `Drain` it
//! gives [`Serve::drain`], then `draining()`/`cut()` in the socket's task).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::accept::{Accept, IntoListeners};
use crate::drain::ConnectionGuard;
use crate::error::Error;
use crate::report::Report;
use crate::serve::Serve;

/// Once draining begins, how long an HTTP/1.1 connection gets to send its
/// next request before it is closed (see the [module docs](self)).
///
/// ```
/// assert_eq!(handoff::http::IDLE_GRACE, std::time::Duration::from_secs(1));
/// ```
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// The error type services may return.
///
/// ```
/// let error: handoff::http::BoxError = "bad request".into();
/// ```
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Serve {
    /// Serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on
    /// `listeners` with `service` (any `tower` service of `http` requests,
    /// such as an axum `Router`), with the drain rules of the
    /// [`http`](crate::http) module, through the whole lifecycle of
    /// [`run`](Serve::run).
    ///
    /// ```no_run
    /// use http_body_util::Full;
    /// use hyper::body::Bytes;
    ///
    /// #[tokio::main]
    /// async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     let handoff = handoff::Handoff::builder().build()?;
    ///     let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
    ///     let service = tower::service_fn(|_request: http::Request<hyper::body::Incoming>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("hello\n"))))
    ///     });
    ///     let report = handoff::Serve::new(&handoff).http(listener, service).await?;
    ///     std::process::exit(report.exit_code());
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Serve::run): the process could not start serving.
    pub async fn http<L, S, B>(
        self,
        listeners: impl IntoListeners<L>,
        service: S,
    ) -> Result<Report, Error>
    where
        L: Accept,
        L::Conn: AsyncRead + AsyncWrite + Unpin,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.run(listeners, move |conn, guard| {
            serve_connection(conn, guard, service.clone())
        })
        .await
    }
}

/// Serves one HTTP/1.1 or HTTP/2 connection with the drain rules of the
/// [`http`](crate::http) module, for a handler of one's own in
/// [`Serve::run`] (to look at the stream first, say).
///
/// ```no_run
/// # async fn f(handoff: handoff::Handoff, listener: tokio::net::TcpListener, router: axum::Router) -> Result<(), handoff::Error> {
/// handoff::Serve::new(&handoff)
///     .run(listener, move |stream, guard| {
///         handoff::http::serve_connection(stream, guard, router.clone())
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub fn serve_connection<I, S, B>(
    io: I,
    guard: ConnectionGuard,
    service: S,
) -> impl Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let draining = guard.draining_token();
    let http2 = Arc::new(AtomicBool::new(false));
    let seen = http2.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut service = service.clone();
        let (draining, seen) = (draining.clone(), seen.clone());
        async move {
            let version = request.version();
            let connect = request.method() == http::Method::CONNECT;
            if version == Version::HTTP_2 {
                seen.store(true, Ordering::Relaxed);
            }
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let mut response = service.call(request).await.map_err(Into::into)?;
            // An upgrade (101, or a tunnel) keeps its own `Connection:`.
            let switching =
                response.status().is_informational() || (connect && response.status().is_success());
            if draining.is_cancelled() && version < Version::HTTP_2 && !switching {
                // hyper closes the connection after this response.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, BoxError>(response)
        }
    });
    drive(io, guard, service, http2)
}

async fn drive<I, S, B>(io: I, guard: ConnectionGuard, service: S, http2: Arc<AtomicBool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // No timer for HTTP/1: with one, hyper arms its header-read timeout
    // (30 s by default), which also runs while a keep-alive connection is
    // idle and closes it at 30 s with no grace, the race with a client's next
    // request that the drain rules avoid; and it costs a timer per request
    // (a tenth of the user-space work of a keep-alive `GET`). As with plain
    // `axum::serve`, a client that never finishes its headers keeps its
    // connection until a drain's deadline cuts it.
    builder.http1().keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = guard.draining() => {}
    }
    if !http2.load(Ordering::Relaxed) {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = tokio::time::sleep(IDLE_GRACE) => {}
            () = guard.cut() => return,
        }
    }
    // HTTP/2: GOAWAY (in two phases). HTTP/1: close when idle, or after the
    // request in flight.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection.as_mut() => return,
        () = guard.cut() => {}
    }
    // Cut: what ended its streams at the cut (a gRPC status) gets them out
    // until the drain is over; then the connection is dropped.
    tokio::select! {
        _ = connection.as_mut() => {}
        () = guard.over() => {}
    }
}
