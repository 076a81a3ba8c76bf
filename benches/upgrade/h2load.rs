//! A closed-loop HTTP/2 load generator: hyper's client over cleartext
//! HTTP/2 with prior knowledge, several connections, several concurrent
//! streams on each.
//!
//! Each stream sends `GET /` and waits for the whole answer (`200`, a body
//! `pid=…`) before it sends the next. A request the server did not process
//! is retried on a new connection and counted as a retry, not a failure, if
//! the retry succeeds; RFC 9113 (§8.7, §6.8) makes these safe to retry:
//!
//! - a stream that a `GOAWAY` left out (its id above the last-stream-id), or
//!   one opened after the client got the `GOAWAY` (h2 refuses it locally);
//! - a stream reset with `REFUSED_STREAM`;
//! - a request that hyper gives back unsent (the connection closed first).
//!
//! Everything else is a failure, a stream cut while in flight (the
//! connection closed under it) included. Once a connection's `GOAWAY`
//! arrived, its streams end and the connection is replaced by a new one,
//! which goes to whichever process accepts then. Every request has a
//! timeout, and the load ends when told to or after `max_time`.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::load::{FailureSample, LoadStats};

/// Failure details kept per stream, for the report.
const SAMPLES_PER_STREAM: usize = 5;

#[derive(Debug, Clone)]
pub struct H2Config {
    /// Connections open at a time.
    pub connections: usize,
    /// Concurrent streams on each connection.
    pub streams: usize,
    /// Timeout of a connect (with the HTTP/2 handshake) and of a request.
    pub io_timeout: Duration,
    /// Pause after a failed request, so a refused client does not spin.
    pub failure_pause: Duration,
    /// Hard cap of the load's time.
    pub max_time: Duration,
}

/// The running load; dropping it stops it.
pub struct H2Load {
    stop: CancellationToken,
    started: Instant,
    slots: Vec<JoinHandle<Result<LoadStats, String>>>,
}

impl H2Load {
    pub fn start(addr: SocketAddr, config: &H2Config) -> Result<H2Load, String> {
        let mut load = H2Load {
            stop: CancellationToken::new(),
            started: Instant::now(),
            slots: Vec::new(),
        };
        let deadline = load.started + config.max_time;
        for i in 0..config.connections {
            // One thread per connection, each a current-thread runtime. On a
            // multi-thread runtime, hyper 1.12's client can fail a request it
            // has already handed to h2 (HEADERS sent) with the connection's
            // GOAWAY error and no request given back, when the GOAWAY is read
            // on another worker between h2's `send_request` and the
            // `poll_ready` after it (`ClientTask::poll`): the error of a
            // refused stream, for a stream the server may have processed. On
            // one thread nothing runs between the two, and what a GOAWAY
            // fails was never sent. (Found by tests/axum.rs.)
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start an HTTP/2 client runtime: {e}"))?;
            let (config, stop) = (config.clone(), load.stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("h2-client-{i}"))
                .spawn(move || Ok(runtime.block_on(slot(addr, config, stop, deadline))))
                .map_err(|e| format!("cannot start an HTTP/2 client thread: {e}"))?;
            load.slots.push(thread);
        }
        Ok(load)
    }

    /// Stops the streams and adds up what they saw.
    pub fn finish(mut self) -> Result<LoadStats, String> {
        self.stop.cancel();
        let mut total = LoadStats::default();
        for slot in self.slots.drain(..) {
            total.merge(
                slot.join()
                    .map_err(|_| "an HTTP/2 client thread panicked".to_owned())??,
            );
        }
        total.elapsed = self.started.elapsed();
        total.samples.sort_by_key(|s| s.at);
        Ok(total)
    }
}

impl Drop for H2Load {
    fn drop(&mut self) {
        self.stop.cancel();
        for slot in self.slots.drain(..) {
            let _ = slot.join();
        }
    }
}

/// How one request ended.
enum Outcome {
    Ok,
    /// Not processed by the server (see the module docs): retry elsewhere.
    Refused(String),
    Failed(String),
}

/// One connection at a time, replaced when it goes away, with `streams`
/// closed loops on it (tasks of this thread's runtime). Requests refused on one connection are retried
/// first thing on the next.
async fn slot(
    addr: SocketAddr,
    config: H2Config,
    stop: CancellationToken,
    deadline: Instant,
) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut carried = 0;
    while !stop.is_cancelled() && Instant::now() < deadline {
        let sender = match connect(addr, config.io_timeout).await {
            Ok(sender) => {
                stats.connections += 1;
                sender
            }
            Err(what) => {
                fail(&mut stats, format!("connect: {what}"));
                pause(&config, &stop).await;
                continue;
            }
        };
        let streams: Vec<_> = (0..config.streams)
            .map(|i| {
                tokio::spawn(stream_loop(
                    addr,
                    sender.clone(),
                    i < carried,
                    config.clone(),
                    stop.clone(),
                    deadline,
                ))
            })
            .collect();
        // Each stream carries at most one refused request over, so the next
        // connection's streams can take them all.
        carried = 0;
        drop(sender);
        for stream in streams {
            match stream.await {
                Ok((seen, retry)) => {
                    stats.merge(seen);
                    carried += usize::from(retry);
                }
                Err(e) => fail(&mut stats, format!("client task: {e}")),
            }
        }
    }
    stats
}

/// Opens a connection and does the HTTP/2 handshake; the connection is
/// driven by its own task until it closes.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<Empty<Bytes>>, String> {
    let connecting = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

/// Sends requests on one connection one after another until the connection
/// goes away or the load stops. Returns what it saw, and whether its last
/// request was refused and is to be retried on the next connection.
async fn stream_loop(
    addr: SocketAddr,
    mut sender: SendRequest<Empty<Bytes>>,
    mut retry: bool,
    config: H2Config,
    stop: CancellationToken,
    deadline: Instant,
) -> (LoadStats, bool) {
    let mut stats = LoadStats::default();
    let uri = format!("http://{addr}/");
    loop {
        if stop.is_cancelled() || Instant::now() >= deadline {
            // A refused request still pending at the end is not sent again.
            return (stats, false);
        }
        if sender.ready().await.is_err() {
            // The connection closed between requests: nothing was lost.
            return (stats, retry);
        }
        let outcome = tokio::time::timeout(config.io_timeout, request(&mut sender, &uri))
            .await
            .unwrap_or_else(|_| Outcome::Failed("timeout".to_owned()));
        match outcome {
            Outcome::Ok => {
                stats.ok += 1;
                retry = false;
            }
            Outcome::Refused(cause) => {
                stats.retries += 1;
                *stats.retry_causes.entry(cause).or_default() += 1;
                return (stats, true);
            }
            Outcome::Failed(what) => {
                let what = if retry { format!("retry {what}") } else { what };
                retry = false;
                fail(&mut stats, what);
                pause(&config, &stop).await;
            }
        }
    }
}

async fn request(sender: &mut SendRequest<Empty<Bytes>>, uri: &str) -> Outcome {
    let request = match Request::get(uri).body(Empty::new()) {
        Ok(request) => request,
        Err(e) => return Outcome::Failed(format!("request: {e}")),
    };
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut error) => {
            if error.take_message().is_some() {
                return Outcome::Refused("not sent: the connection was closing".to_owned());
            }
            return classify(error.error());
        }
    };
    let status = response.status();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return match classify(&error) {
                Outcome::Failed(what) => Outcome::Failed(format!("body: {what}")),
                // Reset while the body was on its way: the server answered.
                _ => Outcome::Failed(format!("body: {error}")),
            };
        }
    };
    if status != StatusCode::OK {
        return Outcome::Failed(format!("status {status}"));
    }
    if !body.starts_with(b"pid=") {
        return Outcome::Failed("unexpected body".to_owned());
    }
    Outcome::Ok
}

/// Whether an error says the server did not process the stream.
fn classify(error: &hyper::Error) -> Outcome {
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // h2 gives a stream the GOAWAY's error only if its id is above
            // the last-stream-id, or if it was opened after the GOAWAY; a
            // stream in flight when the connection closes gets an I/O error.
            if h2.is_go_away() && h2.is_remote() {
                let reason = h2.reason().map_or("?".to_owned(), |r| format!("{r:?}"));
                return Outcome::Refused(format!("GOAWAY ({reason}): stream not processed"));
            }
            if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Outcome::Refused("RST_STREAM REFUSED_STREAM".to_owned());
            }
            return Outcome::Failed(format!("h2: {h2}"));
        }
        source = e.source();
    }
    Outcome::Failed(error.to_string())
}

fn fail(stats: &mut LoadStats, what: String) {
    stats.failed += 1;
    let what = format!("HTTP/2 {what}");
    *stats.failures.entry(what.clone()).or_default() += 1;
    if stats.samples.len() < SAMPLES_PER_STREAM {
        stats.samples.push(FailureSample {
            at: Instant::now(),
            what,
        });
    }
}

async fn pause(config: &H2Config, stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(config.failure_pause) => {}
        () = stop.cancelled() => {}
    }
}
