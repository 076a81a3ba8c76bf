// The crate docs are the README (with every integration's quickstart,
// compiled as doc tests) when the integrations are enabled, as on docs.rs;
// else a short page whose examples need no feature.
#![cfg_attr(all(feature = "axum", feature = "tonic"), doc = include_str!("../README.md"))]
#![cfg_attr(not(all(feature = "axum", feature = "tonic")), doc = include_str!("crate-docs.md"))]
#![warn(missing_docs)]

mod accept;
#[cfg(feature = "axum")]
pub mod axum;
mod channel;
mod child;
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
mod inherited;
mod launch;
mod lifecycle;
mod listen;
mod notify;
mod pidfd;
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
mod vars_memfd;
mod watchdog;

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
