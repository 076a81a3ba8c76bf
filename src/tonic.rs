//! tonic services through upgrades (feature `tonic`): [`Serve::tonic`].
//!
//! gRPC runs over HTTP/2, so a drain sends `GOAWAY`: calls in flight finish
//! on the old process, new calls go to the successor, and the server fails
//! no unary call that finishes by the deadline (grpcio clients see none
//! fail through upgrades). tonic's own client, on hyper, still fails one now
//! and then that a `GOAWAY` races, as against any server that drains with
//! one: it drops it unsent (`CANCELLED`), or h2 fails it with the `GOAWAY`
//! (`INTERNAL`); hyper issue 2500. Such a call was not processed: it is safe
//! to retry. A stream still open at the drain deadline (a `Watch`, a feed) is
//! ended with the gRPC status `UNAVAILABLE` ("the server is shutting down"),
//! which clients retry, rather than reset (and so is a call whose handler
//! still runs then): the old process always exits by the deadline, and the
//! client learns why its call ended. What a stream has ready at the cut (its
//! last messages, its own status) goes first. Non-gRPC routes in `Routes`
//! are served as they are.
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let handoff = handoff::Handoff::builder().build()?;
//!     let (health, health_service) = tonic_health::server::health_reporter();
//!     let routes = tonic::service::Routes::new(health_service);
//!     let listener = handoff.tcp_listener("grpc", "127.0.0.1:50051".parse()?)?;
//!     let report = handoff::Serve::new(&handoff).tonic(listener, routes).await?;
//!     # drop(health);
//!     std::process::exit(report.exit_code());
//! }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::service::Routes;

use crate::accept::{Accept, IntoListeners};
use crate::error::Error;
use crate::report::Report;
use crate::serve::Serve;

impl Serve {
    /// Serves the gRPC `routes` on `listeners` through the whole lifecycle
    /// of [`run`](Serve::run), with the drain rules of the
    /// [module docs](crate::tonic). Set a health service to `NOT_SERVING`
    /// when [`Handoff::stopping`](crate::Handoff::stopping) resolves, so
    /// that balancers watching it move on during the drain delay, and back
    /// to `SERVING` when [`Handoff::serving`](crate::Handoff::serving)
    /// resolves true again (a take-back: the successor died).
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), Box<dyn std::error::Error>> {
    /// let (_reporter, health) = tonic_health::server::health_reporter();
    /// let listener = handoff.tcp_listener("grpc", "127.0.0.1:50051".parse()?)?;
    /// let routes = tonic::service::Routes::new(health);
    /// let report = handoff::Serve::new(&handoff).tonic(listener, routes).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Serve::run): the process could not start serving.
    pub async fn tonic<L>(
        self,
        listeners: impl IntoListeners<L>,
        routes: Routes,
    ) -> Result<Report, Error>
    where
        L: Accept,
        L::Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.run(listeners, move |conn, guard| {
            let service = EndStreamsAtCut {
                routes: routes.clone(),
                cut: guard.cut_token(),
            };
            crate::http::serve_connection(conn, guard, service)
        })
        .await
    }
}

/// `routes`, with every response body ended by a gRPC status at the cut.
#[derive(Clone)]
struct EndStreamsAtCut {
    routes: Routes,
    cut: CancellationToken,
}

impl tower_service::Service<Request<Incoming>> for EndStreamsAtCut {
    type Response = Response<CutBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Request<Incoming>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let grpc = is_grpc(request.headers());
        let call = self.routes.call(request);
        let cut = self.cut.clone();
        Box::pin(async move {
            if !grpc {
                // Not gRPC (a plain route in `Routes`): left as it is.
                return Ok(call.await?.map(CutBody::passthrough));
            }
            tokio::select! {
                biased;
                response = call => Ok(response?.map(|body| CutBody::until(body, &cut))),
                // The handler still runs at the cut: the client learns why.
                () = cut.cancelled() => {
                    let response = tonic::Status::unavailable(SHUTTING_DOWN).into_http();
                    Ok(response.map(CutBody::passthrough))
                }
            }
        })
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC response body that, once the connection is cut, ends with
/// trailers `grpc-status: 14` (`UNAVAILABLE`) instead of going on. What the
/// body has ready (its last messages, its own trailers) still goes first.
struct CutBody {
    body: tonic::body::Body,
    /// None: passed through as it is.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    ended: bool,
}

impl CutBody {
    fn until(body: tonic::body::Body, cut: &CancellationToken) -> Self {
        CutBody {
            body,
            cut: Some(Box::pin(cut.clone().cancelled_owned())),
            ended: false,
        }
    }

    fn passthrough(body: tonic::body::Body) -> Self {
        CutBody {
            body,
            cut: None,
            ended: false,
        }
    }
}

/// The `grpc-message` of a stream ended at the drain deadline.
const SHUTTING_DOWN: &str = "the server is shutting down; retry";

impl http_body::Body for CutBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.ended |= frame.is_trailers();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
            Poll::Pending => {}
        }
        let cut = match &mut this.cut {
            Some(cut) => cut.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if !cut {
            return Poll::Pending;
        }
        this.ended = true;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        trailers.insert("grpc-message", HeaderValue::from_static(SHUTTING_DOWN));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.ended {
            http_body::SizeHint::with_exact(0)
        } else {
            self.body.size_hint()
        }
    }
}
