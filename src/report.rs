//! What a serving life ends with ([`Report`]), and the stderr line per
//! upgrade outcome for applications that installed no `tracing` subscriber.

use std::io::Write;

use crate::drain::DrainReport;
use crate::handoff::Handoff;
use crate::shutdown::ShutdownReport;
use crate::upgrade::UpgradeEvent;

/// How [`Serve::run`](crate::Serve::run) ended: the last drain and, if one
/// was given, the ordered shutdown.
///
/// ```
/// use std::time::Duration;
/// let report = handoff::Report {
///     drain: handoff::DrainReport { waited: Duration::ZERO, cut: 0, forced: false },
///     shutdown: None,
/// };
/// assert!(report.is_clean());
/// assert_eq!(report.exit_code(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct Report {
    /// The last drain.
    pub drain: DrainReport,
    /// The [`Shutdown`](crate::Shutdown) stages, if [`then`](crate::Serve::then) gave any.
    pub shutdown: Option<ShutdownReport>,
}

impl Report {
    /// True if every connection finished by itself and every component closed.
    ///
    /// ```
    /// # let report = handoff::Report { drain: handoff::DrainReport { waited: std::time::Duration::ZERO, cut: 2, forced: false }, shutdown: None };
    /// assert!(!report.is_clean()); // two connections were cut
    /// ```
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// An exit status: 0 when clean; 1 when connections were cut or a
    /// component failed or was late; 2 when the shutdown was forced or ran
    /// out of time ([`ShutdownReport::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        let drain = i32::from(!self.drain.is_clean());
        let shutdown = self
            .shutdown
            .as_ref()
            .map_or(0, |s| i32::from(s.exit_code()));
        drain.max(shutdown)
    }
}

/// Prints each upgrade outcome on stderr while it lives, if no global
/// `tracing` subscriber is set (else the library's own log lines say it).
pub(crate) struct StderrFallback {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StderrFallback {
    pub fn start(handoff: &Handoff) -> StderrFallback {
        if tracing::dispatcher::has_been_set() {
            return StderrFallback { task: None };
        }
        let mut events = handoff.upgrade_events();
        let pid = std::process::id();
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => print_outcome(pid, &event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        StderrFallback { task: Some(task) }
    }
}

impl Drop for StderrFallback {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn print_outcome(pid: u32, event: &UpgradeEvent) {
    let line = match event {
        UpgradeEvent::Started { .. } => return,
        UpgradeEvent::Succeeded { successor } => {
            format!("handoff[{pid}]: upgrade succeeded: pid {successor} serves now")
        }
        UpgradeEvent::Failed { error } => {
            format!("handoff[{pid}]: upgrade failed, this process serves on: {error}")
        }
        UpgradeEvent::RolledBack { successor, reason } => format!(
            "handoff[{pid}]: upgrade rolled back: pid {successor} {reason}; this process serves again"
        ),
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
