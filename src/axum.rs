//! An axum `Router` through upgrades (feature `axum`): [`Serve::axum`],
//! and [`health`] routes that answer for the lifecycle.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let handoff = handoff::Handoff::builder().build()?;
//!     let app = Router::new()
//!         .route("/", get(|| async { "hello\n" }))
//!         .merge(handoff::axum::health(&handoff));
//!     let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//!     let report = handoff::Serve::new(&handoff).axum(listener, app).await?;
//!     std::process::exit(report.exit_code());
//! }
//! ```

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::accept::{Accept, IntoListeners};
use crate::error::Error;
use crate::handoff::Handoff;
use crate::report::Report;
use crate::serve::Serve;

impl Serve {
    /// Serves `router` on `listeners`, HTTP/1.1 and HTTP/2 on each, with the
    /// drain rules of the [`http`](crate::http) module, through the whole
    /// lifecycle of [`run`](Serve::run): signals, ready, accepting only while
    /// this process serves, lame duck, drain with a deadline, the shutdown
    /// stages. See the [module docs](crate::axum) for a whole `main`.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff) -> Result<(), Box<dyn std::error::Error>> {
    /// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi\n" }));
    /// let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
    /// let report = handoff::Serve::new(&handoff).axum(listener, app).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`run`](Serve::run): the process could not start serving.
    pub async fn axum<L>(
        self,
        listeners: impl IntoListeners<L>,
        router: Router,
    ) -> Result<Report, Error>
    where
        L: Accept,
        L::Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.http(listeners, router).await
    }
}

/// `GET /healthz` (liveness: 200 while the process answers) and `GET
/// /readyz` (readiness: 503 from the moment this process decided to stop,
/// so a load balancer stops sending new work during the drain delay; 200
/// while it serves; 503 before it serves).
///
/// ```no_run
/// # let handoff = handoff::Handoff::builder().build().unwrap();
/// let app: axum::Router = axum::Router::new().merge(handoff::axum::health(&handoff));
/// ```
pub fn health(handoff: &Handoff) -> Router {
    let handoff = handoff.clone();
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let ready = handoff.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}
