//! The supervisor's control socket: requests go to the main loop as
//! messages, answered through a oneshot, so the loop owns every decision.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::control::{self, Command, Response};
use crate::socket::BoundPath;

/// A control request and where its answer goes.
pub(super) type Request = (Command, oneshot::Sender<Response>);

/// Binds the control socket at `path` (0600 in a 0700 directory) and serves
/// it; each request is sent to `requests`. Returns the bound path, for the
/// supervisor to unlink at exit.
pub(super) fn serve(path: &Path, requests: mpsc::Sender<Request>) -> Result<BoundPath, String> {
    // Bound here, not registered for handoff: the supervisor keeps its PID,
    // and its children must not receive this socket.
    let context = |e: &dyn std::fmt::Display| format!("control socket {}: {e}", path.display());
    control::prepare_dir(path).map_err(|e| context(&e))?;
    let (fd, bound) =
        crate::socket::bind_unix(path, nix::sys::socket::SockType::Stream, Some(0o600))
            .map_err(|e| context(&e))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(|e| context(&e))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| context(&e))?;
    let handler: control::Handler = Arc::new(move |command| {
        let requests = requests.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if requests.send((command, reply)).await.is_err() {
                return Response::error("the supervisor is stopping");
            }
            answer
                .await
                .unwrap_or_else(|_| Response::error("the supervisor is stopping"))
        })
    });
    tokio::spawn(control::serve(listener, handler, std::future::pending()));
    Ok(bound)
}
