//! A closed-loop HTTP/1.1 load generator on blocking std sockets.
//!
//! Each client thread sends `GET /` and waits for the full answer before it
//! sends the next. Some clients open a new connection per request
//! (`Connection: close`, and they read to EOF so the server closes first and
//! no TIME_WAIT piles up on the client side); the others keep one connection
//! alive. A keep-alive client whose *reused* connection turns out closed by
//! the server before any response byte arrived (EOF, reset or broken pipe)
//! retries once on a new connection: that is what every HTTP client does for
//! an idempotent request, so it is counted as a retry, not a failure, if the
//! retry succeeds. Everything else that does not end in `200` with a body
//! `pid=…` is a failure. Every loop is bounded in requests and in time, and
//! every socket operation has a timeout.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
/// The servers here answer in well under this.
const MAX_RESPONSE: usize = 16 * 1024;
/// Failure details kept per client, for the report.
const SAMPLES_PER_CLIENT: usize = 10;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Clients that open a new connection for every request.
    pub new_connection_clients: usize,
    /// Clients that reuse one keep-alive connection.
    pub keep_alive_clients: usize,
    /// Timeout of every connect, read and write.
    pub io_timeout: Duration,
    /// Pause after a failed request, so a refused client does not spin.
    pub failure_pause: Duration,
    /// Hard caps of each client's loop.
    pub max_requests: u64,
    pub max_time: Duration,
}

/// One failed request.
#[derive(Debug, Clone)]
pub struct FailureSample {
    pub at: Instant,
    pub what: String,
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub ok: u64,
    /// Of `ok`: by clients opening a connection per request, and by
    /// keep-alive clients (HTTP/1.1 only; the HTTP/2 load counts neither).
    pub ok_new_connection: u64,
    pub ok_keep_alive: u64,
    /// Connections opened (counted by the HTTP/2 load only).
    pub connections: u64,
    pub failed: u64,
    /// Keep-alive requests retried on a new connection (whatever the outcome).
    pub retries: u64,
    pub elapsed: Duration,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// Retries by cause.
    pub retry_causes: BTreeMap<String, u64>,
    pub samples: Vec<FailureSample>,
}

impl LoadStats {
    pub fn merge(&mut self, other: LoadStats) {
        self.ok += other.ok;
        self.ok_new_connection += other.ok_new_connection;
        self.ok_keep_alive += other.ok_keep_alive;
        self.connections += other.connections;
        self.failed += other.failed;
        self.retries += other.retries;
        for (cause, n) in other.failures {
            *self.failures.entry(cause).or_default() += n;
        }
        for (cause, n) in other.retry_causes {
            *self.retry_causes.entry(cause).or_default() += n;
        }
        self.samples.extend(other.samples);
    }

    pub fn per_second(&self) -> f64 {
        self.rate(self.ok)
    }

    /// `count` requests over this load's time, per second.
    pub fn rate(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Running clients; dropping it stops and joins them.
pub struct Load {
    stop: Arc<AtomicBool>,
    started: Instant,
    clients: Vec<JoinHandle<LoadStats>>,
}

impl Load {
    pub fn start(addr: SocketAddr, config: &LoadConfig) -> Result<Load, String> {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            clients: Vec::new(),
        };
        // `false`: a new connection per request; `true`: keep-alive.
        let mut kinds = vec![false; config.new_connection_clients];
        kinds.resize(
            config.new_connection_clients + config.keep_alive_clients,
            true,
        );
        for (i, keep_alive) in kinds.into_iter().enumerate() {
            let client = Client {
                addr,
                keep_alive,
                config: config.clone(),
                stop: load.stop.clone(),
                stats: LoadStats::default(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || client.run())
                .map_err(|e| format!("cannot start a client thread: {e}"))?;
            load.clients.push(handle);
        }
        Ok(load)
    }

    /// Stops the clients and adds up what they saw.
    pub fn finish(mut self) -> Result<LoadStats, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadStats::default();
        for handle in self.clients.drain(..) {
            total.merge(
                handle
                    .join()
                    .map_err(|_| "a client thread panicked".to_owned())?,
            );
        }
        total.elapsed = self.started.elapsed();
        total.samples.sort_by_key(|s| s.at);
        Ok(total)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.clients.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Why one exchange failed.
struct Failure {
    stage: &'static str,
    cause: String,
    /// Whether any byte of the response had arrived.
    answered: bool,
    /// Closed by the peer (EOF, reset, broken pipe), as opposed to a timeout
    /// or a bad answer.
    closed: bool,
}

impl Failure {
    fn io(stage: &'static str, error: &io::Error, answered: bool) -> Failure {
        use io::ErrorKind::*;
        let (cause, closed) = match error.kind() {
            WouldBlock | TimedOut => ("timeout".to_owned(), false),
            ConnectionRefused => ("connection refused".to_owned(), false),
            ConnectionReset => ("connection reset".to_owned(), true),
            BrokenPipe => ("broken pipe".to_owned(), true),
            ConnectionAborted => ("connection aborted".to_owned(), true),
            _ => (error.to_string(), false),
        };
        Failure {
            stage,
            cause,
            answered,
            closed,
        }
    }

    fn other(
        stage: &'static str,
        cause: impl Into<String>,
        answered: bool,
        closed: bool,
    ) -> Failure {
        Failure {
            stage,
            cause: cause.into(),
            answered,
            closed,
        }
    }

    /// A reused keep-alive connection that the server closed before answering.
    fn retryable(&self) -> bool {
        self.closed && !self.answered
    }

    fn describe(&self) -> String {
        let when = if self.answered {
            "during response"
        } else {
            "before response"
        };
        match self.stage {
            "read" => format!("read: {} {when}", self.cause),
            stage => format!("{stage}: {}", self.cause),
        }
    }
}

struct Reply {
    /// The server said `Connection: close`.
    close: bool,
    /// Length of the status line and headers, blank line included.
    head: usize,
    /// Length of the whole response.
    total: usize,
}

struct Client {
    addr: SocketAddr,
    keep_alive: bool,
    config: LoadConfig,
    stop: Arc<AtomicBool>,
    stats: LoadStats,
}

impl Client {
    fn run(mut self) -> LoadStats {
        let deadline = Instant::now() + self.config.max_time;
        let mut kept: Option<TcpStream> = None;
        let mut buf = Vec::with_capacity(1024);
        for _ in 0..self.config.max_requests {
            if self.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            let outcome = if self.keep_alive {
                self.keep_alive_request(&mut kept, &mut buf)
            } else {
                self.connect().and_then(|mut stream| {
                    exchange(
                        &mut stream,
                        CLOSE_REQUEST,
                        true,
                        &mut buf,
                        self.config.io_timeout,
                    )
                    .map(drop)
                    .map_err(|f| f.describe())
                })
            };
            match outcome {
                Ok(()) => {
                    self.stats.ok += 1;
                    if self.keep_alive {
                        self.stats.ok_keep_alive += 1;
                    } else {
                        self.stats.ok_new_connection += 1;
                    }
                }
                Err(what) => {
                    self.stats.failed += 1;
                    let kind = if self.keep_alive {
                        "keep-alive"
                    } else {
                        "new-connection"
                    };
                    let what = format!("{kind} {what}");
                    *self.stats.failures.entry(what.clone()).or_default() += 1;
                    if self.stats.samples.len() < SAMPLES_PER_CLIENT {
                        self.stats.samples.push(FailureSample {
                            at: Instant::now(),
                            what,
                        });
                    }
                    std::thread::sleep(self.config.failure_pause);
                }
            }
        }
        self.stats
    }

    fn connect(&self) -> Result<TcpStream, String> {
        let timeout = self.config.io_timeout;
        let stream = TcpStream::connect_timeout(&self.addr, timeout)
            .map_err(|e| Failure::io("connect", &e, false).describe())?;
        let setup = stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.set_nodelay(true));
        setup.map_err(|e| Failure::io("setup", &e, false).describe())?;
        Ok(stream)
    }

    /// One request on the kept connection (or a new one), with one retry
    /// if the reused connection had been closed by the server.
    fn keep_alive_request(
        &mut self,
        kept: &mut Option<TcpStream>,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let reused = kept.is_some();
        let mut stream = match kept.take() {
            Some(stream) => stream,
            None => self.connect()?,
        };
        let failure = match exchange(
            &mut stream,
            KEEP_ALIVE_REQUEST,
            false,
            buf,
            self.config.io_timeout,
        ) {
            Ok(reply) => {
                if !reply.close {
                    *kept = Some(stream);
                }
                return Ok(());
            }
            Err(failure) => failure,
        };
        if !(reused && failure.retryable()) {
            return Err(failure.describe());
        }
        self.stats.retries += 1;
        *self
            .stats
            .retry_causes
            .entry(failure.describe())
            .or_default() += 1;
        let mut stream = self.connect().map_err(|e| format!("retry {e}"))?;
        let reply = exchange(
            &mut stream,
            KEEP_ALIVE_REQUEST,
            false,
            buf,
            self.config.io_timeout,
        )
        .map_err(|f| format!("retry {}", f.describe()))?;
        if !reply.close {
            *kept = Some(stream);
        }
        Ok(())
    }
}

/// Sends `request` and reads one full response into `buf`, within
/// `timeout`. With `read_to_eof`, then waits for the server to close the
/// connection.
fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    read_to_eof: bool,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let deadline = Instant::now() + timeout;
    stream
        .write_all(request)
        .map_err(|e| Failure::io("write", &e, false))?;
    buf.clear();
    let mut chunk = [0u8; 1024];
    let reply = loop {
        let answered = !buf.is_empty();
        if Instant::now() >= deadline {
            return Err(Failure::other("read", "timeout", answered, false));
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|e| Failure::io("read", &e, answered))?;
        if n == 0 {
            return Err(Failure::other("read", "EOF", answered, true));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(Failure::other("read", "response too large", true, false));
        }
        if let Some(reply) = parse_head(buf)? {
            if buf.len() >= reply.total {
                break reply;
            }
        }
    };
    if buf.len() > reply.total {
        return Err(Failure::other(
            "read",
            "bytes after the response",
            true,
            false,
        ));
    }
    if !buf[reply.head..].starts_with(b"pid=") {
        return Err(Failure::other("body", "unexpected body", true, false));
    }
    if read_to_eof {
        // The answer is complete; errors here do not matter.
        while Instant::now() < deadline && matches!(stream.read(&mut chunk), Ok(1..)) {}
    }
    Ok(reply)
}

/// Parses the status line and headers once they are complete.
fn parse_head(buf: &[u8]) -> Result<Option<Reply>, Failure> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(Failure::other("status", format!("{status:?}"), true, false));
    }
    let (mut length, mut close) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let length = length.ok_or_else(|| Failure::other("read", "no Content-Length", true, false))?;
    Ok(Some(Reply {
        close,
        head: end + 4,
        total: end + 4 + length,
    }))
}
