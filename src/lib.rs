//! # handoff
//!
//! Zero-downtime restarts for network servers on Linux. A running server
//! starts its new binary, hands it the listening sockets (the same kernel
//! sockets, never re-bound), waits until the new process says it is ready,
//! then stops accepting and drains its own connections before it exits.
//!
//! The handoff speaks systemd's socket-activation protocol: the successor gets
//! its fds at 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and its own
//! `LISTEN_PID`, and reports readiness with `READY=1` over the `sd_notify`
//! protocol to a private socket of its parent, which checks the sender's PID.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First thing: read the handoff environment, before threads start.
//!     let handoff = handoff::Handoff::builder().pid_file("/tmp/demo.pid").build()?;
//!     tokio::runtime::Runtime::new()?.block_on(async {
//!         let listener = handoff.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//!         handoff.handle_signals()?; // SIGHUP upgrades; SIGTERM/SIGINT stop
//!         let drain = handoff::Drain::new();
//!         let accept = {
//!             let (handoff, drain) = (handoff.clone(), drain.clone());
//!             tokio::spawn(async move {
//!                 loop {
//!                     tokio::select! {
//!                         _ = handoff.stopping() => break, // drops the listener
//!                         Ok((stream, _)) = listener.accept() => {
//!                             let guard = drain.track();
//!                             tokio::spawn(async move { /* serve stream */ drop((stream, guard)); });
//!                         }
//!                     }
//!                 }
//!             })
//!         };
//!         handoff.ready()?;
//!         handoff.stopping().await;
//!         accept.await?;
//!         let report = drain.drain(Duration::from_secs(30), handoff.forced()).await;
//!         // Return (rather than `process::exit`) so the Handoff is dropped: a
//!         // last generation removes its PID file and Unix socket paths.
//!         println!("{} connections cut", report.cut);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! The pieces: [`Handoff`] (start mode, named sockets, [`Handoff::ready`],
//! [`Handoff::upgrade`], [`Handoff::stopping`]), [`Drain`] (connection
//! tracking with a deadline), and [`Handoff::handle_signals`].

#![warn(missing_docs)]

mod accept;
#[cfg(feature = "axum")]
pub mod axum;
mod channel;
pub mod control;
mod drain;
mod early;
mod env;
mod error;
mod escape;
mod fds;
mod handoff;
#[cfg(feature = "hyper")]
pub mod http;
mod lifecycle;
mod listen;
mod notify;
mod pidfile;
mod readiness;
mod report;
mod serve;
mod service;
mod serving;
mod shutdown;
mod signals;
mod socket;
mod spawn;
mod stop;
pub mod supervisor;
#[cfg(feature = "tonic")]
pub mod tonic;
mod upgrade;

#[cfg(test)]
mod testutil;

pub use accept::{Accept, IntoListeners};
pub use drain::{ConnectionGuard, Drain, DrainReport};
pub use env::StartMode;
pub use error::{EnvError, Error, UpgradeError};
pub use handoff::{
    Builder, Handoff, StopReason, DEFAULT_KILL_GRACE, DEFAULT_PROBATION, DEFAULT_UPGRADE_TIMEOUT,
};
pub use report::Report;
pub use serve::{Serve, ServeEvent};
pub use shutdown::{ComponentReport, Outcome, Shutdown, ShutdownReport, Stage, Workers};
pub use socket::FdKind;
pub use stop::Finish;
pub use upgrade::{UpgradeEvent, UpgradeTicket};

/// The README's code examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
