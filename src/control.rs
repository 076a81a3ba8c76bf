//! The control socket: a small, versioned protocol over a Unix stream socket
//! through which `handoff upgrade` asks for an upgrade and learns its outcome,
//! and `handoff status` reads the state. Served by the library (when the
//! application calls [`Handoff::serve_control`](crate::Handoff::serve_control)) and by `handoff run`.
//!
//! **Protocol, version 1.** One request per connection: the client sends one
//! JSON object on one line (at most [`MAX_REQUEST`] bytes with the newline),
//! the server answers one JSON object on one line and closes.
//!
//! ```text
//! → {"version":1,"command":"upgrade"}
//! ← {"version":1,"ok":true,"upgraded":{"pid":4251,"generation":2}}
//! → {"version":1,"command":"status"}
//! ← {"version":1,"ok":true,"status":{"pid":4251,"generations":[…],"upgrades_done":1,…}}
//! ← {"version":1,"ok":false,"error":"the new process (pid 4260) exited with status 1 before it was ready"}
//! ```
//!
//! The socket is created with mode 0600 in a directory owned by the server's
//! user and not writable by others; the server also checks each peer's uid
//! (`SO_PEERCRED`) and refuses any other. A request that is malformed, larger
//! than [`MAX_REQUEST`], or not complete within [`REQUEST_TIMEOUT`] gets an
//! error reply; nothing a client sends disturbs serving.

use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request accepted, newline included.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client asks for.
///
/// ```
/// let request = handoff::control::Request::new(handoff::control::Command::Status);
/// assert_eq!(serde_json::to_string(&request).unwrap(), r#"{"version":1,"command":"status"}"#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Upgrade now; answer when the new process is ready (or the upgrade failed).
    Upgrade,
    /// Report the state.
    Status,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version the client speaks.
    pub version: u32,
    /// What it asks for.
    pub command: Command,
}

impl Request {
    /// A request in this crate's protocol version.
    pub fn new(command: Command) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            command,
        }
    }
}

/// The outcome of a successful upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    /// The PID that serves now.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationState {
    /// Started, not ready yet.
    Starting,
    /// Serving new connections.
    Serving,
    /// No longer accepting; finishing what it started.
    Draining,
}

/// One process of the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Its PID.
    pub pid: u32,
    /// Its generation number.
    pub generation: u64,
    /// Its state.
    pub state: GenerationState,
    /// Seconds since it started.
    pub age_secs: f64,
    /// Open connections, where the server tracks them.
    pub connections: Option<usize>,
    /// The names of its listeners.
    pub listeners: Vec<String>,
}

/// The state of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The PID that answered (the supervisor, or the serving process).
    pub pid: u32,
    /// Its processes, newest first.
    pub generations: Vec<Generation>,
    /// Upgrades that succeeded.
    pub upgrades_done: u64,
    /// Upgrades that failed.
    pub upgrades_failed: u64,
    /// Why the last failed upgrade failed.
    pub last_failure: Option<String>,
    /// Restarts of a child that did not serve, in the supervisor's current
    /// window (0 for a library server).
    #[serde(default)]
    pub restarts: u64,
    /// Why the last child failed, to start or while serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next restart comes, in seconds from now, if one is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_restart_in_secs: Option<f64>,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The protocol version of the server.
    pub version: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The outcome of an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded: Option<Upgraded>,
    /// The state, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    /// A failure reply.
    ///
    /// ```
    /// let r = handoff::control::Response::error("no");
    /// assert!(!r.ok);
    /// ```
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            version: PROTOCOL_VERSION,
            ok: false,
            error: Some(message.into()),
            upgraded: None,
            status: None,
        }
    }

    /// The reply to a successful upgrade.
    pub fn upgraded(pid: u32, generation: u64) -> Self {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            upgraded: Some(Upgraded { pid, generation }),
            status: None,
        }
    }

    /// The reply to `status`.
    pub fn status(status: Status) -> Self {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            upgraded: None,
            status: Some(status),
        }
    }
}

/// Answers commands; the server calls it once per valid request.
pub(crate) type Handler =
    Arc<dyn Fn(Command) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Makes sure `path`'s directory is safe for a control socket: created 0700
/// if missing, else owned by this user and not writable by others.
pub(crate) fn prepare_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the control socket's directory {} must be owned by uid {me} and not writable by group or others",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Accepts control connections until `stop` resolves.
pub(crate) async fn serve(
    listener: UnixListener,
    handler: Handler,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, handler.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn answer(mut stream: UnixStream, handler: Handler) {
    let response = match check_peer(&stream) {
        Err(refusal) => Response::error(refusal),
        Ok(()) => match read_request(&mut stream).await {
            Ok(request) => handler(request.command).await,
            Err(refusal) => Response::error(refusal),
        },
    };
    if !response.ok {
        tracing::info!(
            error = response.error.as_deref().unwrap_or(""),
            "control request refused"
        );
    }
    let mut line = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
    // Closing with unread input would reset the connection and could destroy
    // the reply before the client reads it: discard what is left first,
    // within bounds.
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while discarded < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

/// The peer must run as this process's user; else the reason it may not.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me => Ok(()),
        Ok(cred) => Err(format!(
            "refused: uid {} may not control this service (only uid {me})",
            cred.uid()
        )),
        Err(e) => Err(format!("refused: cannot read the peer's credentials: {e}")),
    }
}

/// Reads one request line; else the reason it is refused.
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(256);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                buf.truncate(end);
                return Ok(());
            }
            if buf.len() >= MAX_REQUEST {
                return Err(format!("request larger than {MAX_REQUEST} bytes"));
            }
            match stream.read(&mut chunk).await {
                Ok(0) => {
                    return Err(
                        "incomplete request: the connection closed before a newline".to_owned()
                    )
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("cannot read the request: {e}")),
            }
        }
    })
    .await
    .map_err(|_| format!("incomplete request: no newline within {REQUEST_TIMEOUT:?}"))?;
    read?;
    // Check the version before the rest, so a newer client hears why.
    let value: serde_json::Value =
        serde_json::from_slice(&buf).map_err(|e| format!("malformed request: {e}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported protocol version {v} (this server speaks {PROTOCOL_VERSION})"
            ))
        }
        None => return Err("malformed request: no \"version\" number".to_owned()),
    }
    serde_json::from_value(value).map_err(|e| format!("malformed request: {e}"))
}

/// Sends `command` to the control socket at `path` and waits, at most
/// `timeout`, for the answer.
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// use handoff::control::{request, Command};
/// let answer = request("/run/myserver/control.sock".as_ref(), Command::Upgrade, std::time::Duration::from_secs(60)).await?;
/// match answer.upgraded {
///     Some(up) => println!("pid {} serves", up.pid),
///     None => eprintln!("failed: {}", answer.error.unwrap_or_default()),
/// }
/// # Ok(()) }
/// ```
pub async fn request(path: &Path, command: Command, timeout: Duration) -> io::Result<Response> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        let mut line = serde_json::to_vec(&Request::new(command))?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        serde_json::from_slice::<Response>(&answer).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unreadable answer {:?}: {e}",
                    String::from_utf8_lossy(&answer)
                ),
            )
        })
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
    })?
}

/// The name under which a library-based server keeps its control socket, so
/// every generation serves on the same one.
pub const CONTROL_FD_NAME: &str = "handoff-control";

impl crate::Handoff {
    /// Serves the control protocol on a Unix socket at `path` (see the
    /// [module docs](self)), so `handoff upgrade` and `handoff status` work
    /// against this server. `drain`, if given, supplies the connection count
    /// for `status`. The socket is handed to successors like a listener: call
    /// this before [`ready`](crate::Handoff::ready). It stops answering when
    /// this process stops accepting; its successor answers from then on.
    ///
    /// ```no_run
    /// # async fn f(handoff: handoff::Handoff, drain: handoff::Drain) -> Result<(), handoff::Error> {
    /// handoff.serve_control("/run/myserver/control.sock", Some(drain.clone()))?;
    /// handoff.ready()?;
    /// # Ok(()) }
    /// ```
    pub fn serve_control(
        &self,
        path: impl AsRef<Path>,
        drain: Option<crate::Drain>,
    ) -> Result<tokio::task::JoinHandle<()>, crate::Error> {
        let path = path.as_ref();
        let context = || format!("cannot serve the control socket {}", path.display());
        prepare_dir(path).map_err(|e| crate::Error::io(context(), e))?;
        let listener = self.unix_listener_with_mode(CONTROL_FD_NAME, path, Some(0o600))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| crate::Error::io(context(), e))?;
        let listener =
            UnixListener::from_std(listener).map_err(|e| crate::Error::io(context(), e))?;
        let handoff = self.clone();
        let handler: Handler = Arc::new(move |command| {
            let (handoff, drain) = (handoff.clone(), drain.clone());
            Box::pin(async move {
                match command {
                    Command::Upgrade => match handoff.upgrade().await {
                        Ok(pid) => Response::upgraded(pid, handoff.generation() + 1),
                        Err(error) => Response::error(error.to_string()),
                    },
                    Command::Status => Response::status(handoff.status(drain.as_ref())),
                }
            })
        });
        let stopping = self.clone();
        Ok(tokio::spawn(serve(listener, handler, async move {
            stopping.stopping().await;
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_stable() {
        let request: Request =
            serde_json::from_str(r#"{"version":1,"command":"upgrade"}"#).unwrap();
        assert_eq!(request, Request::new(Command::Upgrade));
        let answer = serde_json::to_string(&Response::upgraded(7, 2)).unwrap();
        assert_eq!(
            answer,
            r#"{"version":1,"ok":true,"upgraded":{"pid":7,"generation":2}}"#
        );
        let error = serde_json::to_string(&Response::error("x")).unwrap();
        assert_eq!(error, r#"{"version":1,"ok":false,"error":"x"}"#);
    }

    #[tokio::test]
    async fn bad_requests_get_errors() {
        let tmp = crate::testutil::TempDir::new("control");
        let dir = tmp.path().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_dir(&dir.join("c.sock")).unwrap();
        let path = dir.join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let handler: Handler = Arc::new(|command| {
            Box::pin(async move {
                match command {
                    Command::Upgrade => Response::upgraded(1, 2),
                    Command::Status => Response::error("no status here"),
                }
            })
        });
        let server = tokio::spawn(serve(listener, handler, std::future::pending()));
        let raw = |bytes: Vec<u8>| {
            let path = path.clone();
            async move {
                let mut stream = UnixStream::connect(&path).await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                let _ = stream.shutdown().await;
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await.unwrap();
                serde_json::from_str::<Response>(&answer).unwrap()
            }
        };
        for (bytes, expected) in [
            (b"garbage\n".to_vec(), "malformed request"),
            (
                b"{\"version\":2,\"command\":\"upgrade\"}\n".to_vec(),
                "unsupported protocol version 2",
            ),
            (
                b"{\"version\":1,\"command\":\"explode\"}\n".to_vec(),
                "malformed request",
            ),
            (vec![b'x'; MAX_REQUEST + 10], "larger than 4096"),
            (b"{\"version\":1".to_vec(), "incomplete request"),
        ] {
            let answer = raw(bytes).await;
            assert!(!answer.ok);
            let error = answer.error.unwrap();
            assert!(error.contains(expected), "{error}");
        }
        let answer = request(&path, Command::Upgrade, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            answer.upgraded,
            Some(Upgraded {
                pid: 1,
                generation: 2
            })
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        server.abort();
    }
}
