//! The README's axum quickstart, with the address from the command line:
//! five lines of handoff code (marked) and no `tracing` subscriber, so the
//! library reports each upgrade's outcome as one line on stderr.
//!
//! ```text
//! axum_quickstart [ADDR]    # default 127.0.0.1:8080
//! ```

use axum::{routing::get, Router};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let handoff = handoff::Handoff::builder().build()?; // 1
    let hello = format!("pid={}\n", std::process::id());
    let app = Router::new()
        .route("/", get(move || async move { hello }))
        .merge(handoff::axum::health(&handoff)); // 2: GET /healthz, /readyz
    let listener = handoff.tcp_listener("http", addr.parse()?)?; // 3
    let report = handoff::Serve::new(&handoff).axum(listener, app).await?; // 4
    std::process::exit(report.exit_code()); // 5
}
