//! How the supervisor knows a child serves: `READY=1` over its notify
//! socket (from that very PID), a fixed delay, or an HTTP URL answering 2xx.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::handoff::lock;
use crate::notify::NotifyListener;
use crate::supervisor::accepted_by;

/// Reads the supervisor's notify socket all the time, so a child's
/// `sd_notify` (`STATUS=`, `WATCHDOG=1`, …) never finds it full, and
/// remembers who said `READY=1`: by the sender's PID (which the kernel
/// vouches for), and by the sender's process group, so that a helper the
/// child runs (`handoff notify READY=1`, `systemd-notify --ready`) speaks
/// for it: each child leads a group of its own.
pub(crate) struct Inbox {
    ready: Mutex<HashSet<u32>>,
    /// Process groups one of whose members said `READY=1`.
    ready_groups: Mutex<HashSet<u32>>,
    /// The last `STATUS=` of each process group, for the supervisor's own.
    statuses: Mutex<std::collections::HashMap<u32, String>>,
    /// When each process group last sent `WATCHDOG=1`.
    pings: Mutex<std::collections::HashMap<u32, std::time::Instant>>,
    changed: tokio::sync::Notify,
    /// Notified when a `STATUS=` arrived.
    pub(crate) status_changed: tokio::sync::Notify,
}

/// The longest child `STATUS=` relayed; the rest is cut.
const MAX_STATUS: usize = 200;

impl Inbox {
    /// Starts draining `listener`. Needs a tokio runtime.
    pub(crate) fn start(listener: NotifyListener) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox {
            ready: Mutex::new(HashSet::new()),
            ready_groups: Mutex::new(HashSet::new()),
            statuses: Mutex::new(std::collections::HashMap::new()),
            pings: Mutex::new(std::collections::HashMap::new()),
            changed: tokio::sync::Notify::new(),
            status_changed: tokio::sync::Notify::new(),
        });
        let reader = inbox.clone();
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(message) => {
                        reader.note_status(&message);
                        reader.note_ping(&message);
                        match message.pid {
                            Some(pid) if message.has("READY=1") => {
                                lock(&reader.ready).insert(pid);
                                // Looked up now, while the sender lives (a
                                // helper waits on a BARRIER=1 sent after this).
                                if let Some(group) = accepted_by::process_group(pid) {
                                    lock(&reader.ready_groups).insert(group);
                                }
                                reader.changed.notify_waiters();
                            }
                            sender => {
                                tracing::debug!(?sender, text = %crate::escape::Escaped(&message.text), "notify message")
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "notify socket");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        inbox
    }

    async fn ready(&self, pid: u32) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if lock(&self.ready).contains(&pid) || lock(&self.ready_groups).contains(&pid) {
                return;
            }
            changed.await;
        }
    }

    /// Forgets a child that exited.
    pub(crate) fn forget(&self, pid: u32) {
        lock(&self.ready).remove(&pid);
        lock(&self.ready_groups).remove(&pid);
        lock(&self.statuses).remove(&pid);
        lock(&self.pings).remove(&pid);
    }

    /// Notes the sender group's `WATCHDOG=1`.
    fn note_ping(&self, message: &crate::channel::Message) {
        if let Some(pid) = message.pid.filter(|_| message.has("WATCHDOG=1")) {
            let group = accepted_by::process_group(pid).unwrap_or(pid);
            if lock(&self.pings)
                .insert(group, std::time::Instant::now())
                .is_none()
            {
                tracing::info!(
                    pgid = group,
                    "the child pings the watchdog: while it serves, it is replaced if it stops"
                );
            }
        }
    }

    /// When the child `pid` (or its group) last sent `WATCHDOG=1`, if ever.
    pub(crate) fn last_ping(&self, pid: u32) -> Option<std::time::Instant> {
        lock(&self.pings).get(&pid).copied()
    }

    /// Keeps the sender group's last `STATUS=` (printable, bounded).
    fn note_status(&self, message: &crate::channel::Message) {
        let (Some(pid), None) = (message.pid, &message.problem) else {
            return;
        };
        let Some(status) = message
            .text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("STATUS="))
        else {
            return;
        };
        let group = accepted_by::process_group(pid).unwrap_or(pid);
        let clean: String = status
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_STATUS)
            .collect();
        lock(&self.statuses).insert(group, clean);
        self.status_changed.notify_one();
    }

    /// The last `STATUS=` the child `pid` (or its group) sent, if any.
    pub(crate) fn status_of(&self, pid: u32) -> Option<String> {
        lock(&self.statuses).get(&pid).cloned()
    }
}

/// A readiness check for children of `handoff run`.
///
/// ```
/// use handoff::supervisor::Ready;
/// assert_eq!("notify".parse::<Ready>().unwrap(), Ready::Notify);
/// assert!("http=http://127.0.0.1:8080/healthz".parse::<Ready>().is_ok());
/// assert!("delay=2s".parse::<Ready>().is_ok());
/// assert!("soon".parse::<Ready>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The child sends `READY=1` to `NOTIFY_SOCKET` (`sd_notify`).
    Notify,
    /// The child counts as ready this long after it started.
    Delay(Duration),
    /// The child counts as ready once `GET` on this URL answers 2xx, from
    /// a connection the child itself (or a process of its group) accepted:
    /// on a socket the old child also accepts on, its answers do not count.
    Http {
        /// `host:port` to connect to.
        authority: String,
        /// The path to request.
        path: String,
    },
}

impl FromStr for Ready {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "notify" {
            return Ok(Ready::Notify);
        }
        if let Some(delay) = text.strip_prefix("delay=") {
            return parse_duration(delay).map(Ready::Delay);
        }
        if let Some(url) = text.strip_prefix("http=") {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| format!("{url:?}: only http:// URLs can be polled"))?;
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if authority.is_empty() || !authority.contains(':') {
                return Err(format!("{url:?}: expected http://HOST:PORT/PATH"));
            }
            return Ok(Ready::Http {
                authority: authority.to_owned(),
                path: path.to_owned(),
            });
        }
        Err(format!(
            "{text:?}: expected notify, delay=DURATION or http=URL"
        ))
    }
}

/// A duration such as `30s`, `500ms`, `2m`; a bare number is seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(handoff::supervisor::parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert_eq!(handoff::supervisor::parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(handoff::supervisor::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"));
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 30s, 500ms or 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(number * scale).map_err(|e| format!("{text:?}: {e}"))
}

impl Ready {
    /// Resolves once the child `pid` is ready by this check. Never fails by
    /// itself; the caller bounds it with the upgrade timeout and the child's exit.
    pub(crate) async fn wait(&self, pid: u32, inbox: &Inbox) {
        match self {
            Ready::Notify => inbox.ready(pid).await,
            Ready::Delay(delay) => tokio::time::sleep(*delay).await,
            Ready::Http { authority, path } => loop {
                if http_ok(authority, path, pid).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }
}

/// One `GET`; true on a 2xx status line from the child `pid` (or a
/// process of its group, such as a worker): a connection that another
/// process accepted (the old child, on the same shared socket) does not
/// count, whatever it answers.
async fn http_ok(authority: &str, path: &str, pid: u32) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        let (server, client) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
        // /proc is read off the runtime's one thread, which the
        // supervisor's loop needs.
        let inode = loop {
            let found =
                tokio::task::spawn_blocking(move || accepted_by::accepted_inode(server, client));
            if let Some(inode) = found.await.ok().flatten() {
                break inode;
            }
            // Still in the backlog: whoever accepts it next.
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ours = tokio::task::spawn_blocking(move || accepted_by::group_holds(pid, inode));
        if !ours.await.unwrap_or(false) {
            return Some(false);
        }
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        let status = std::str::from_utf8(&head[9..12]).ok()?;
        Some(status.starts_with('2'))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
