//! The `axum_server` example (an axum `Router` on `handoff::Serve::axum`,
//! HTTP/1.1 and HTTP/2 on one port) under real load on 127.0.0.1: upgrades
//! with GETs and POSTs over HTTP/1.1 and HTTP/2, a half-sent request that
//! must not hold the old generation past its drain deadline. (The hygiene
//! of its subprocesses is in tests/hygiene.rs.)

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::get;
use common::load::Load;
use common::{wait_exit, Line, Options, Server, DEADLINE};

const EXAMPLE: &str = "axum_server";

/// 8 HTTP/1.1 clients (4 connecting per request, 4 keep-alive), every other
/// request a `POST /echo` of 1 to 8 KB of varying bytes, through 20
/// upgrades: no request fails, none is retried, every echo is exact.
#[test]
fn http1_gets_and_posts_through_20_upgrades_lose_nothing() {
    let server = Server::start(EXAMPLE);
    let load = Load::start_mixed(server.addr(), 4, 4, true);
    load.wait_for_more(200);
    let pids = server.upgrade_many(20, || load.wait_for_more(100));
    let stats = load.stop();
    println!(
        "axum http/1.1: {} requests ok ({} POSTs echoing {} KB exactly), {} failed, {} retries, {} PIDs answered",
        stats.ok,
        stats.posts,
        stats.posted_bytes / 1024,
        stats.failed,
        stats.retries,
        stats.pids.len()
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert_eq!(stats.retries, 0, "keep-alive requests retried");
    assert!(stats.ok > 2000, "the load ran: {} requests", stats.ok);
    assert!(stats.posts > 1000, "the POSTs ran: {}", stats.posts);
    server.assert_generations(&pids, &stats.pids);
    assert!(
        stats.pids.len() > 10,
        "the load reached most generations: {:?}",
        stats.pids
    );
}

/// HTTP/2 with prior knowledge (hyper's client): 4 connections with 4
/// concurrent streams each, in a closed loop of `GET /`, `POST /echo` and
/// `GET /sleep?ms=0`, through 20 upgrades. A request is retried only when
/// HTTP/2 says the server did not process it (RFC 9113 §8.7): the server's
/// GOAWAY (NO_ERROR) covered it (its stream above the last stream id, or not
/// opened once the GOAWAY arrived), a `REFUSED_STREAM` reset, or hyper gave
/// it back unsent. No request fails; and the server's own log of the
/// `/sleep` handlers it began equals, generation by generation, the `/sleep`
/// answers the clients got, so no retried request was one the server had
/// begun. (Each connection runs on a current-thread runtime: see
/// [`h2load`] for the hyper race a multi-thread one lets through.)
#[test]
fn http2_streams_through_20_upgrades_lose_nothing() {
    let server = Server::start(EXAMPLE);
    let load = h2load::H2Load::start(server.addr(), 4, 4);
    load.wait_for_more(200);
    let pids = server.upgrade_many(20, || load.wait_for_more(100));
    let stats = load.stop();

    // Every /sleep handler the generations began printed `sleeping ... ms=0`
    // before answering. A last one (ms=1), sent after the load stopped, is
    // printed after all of them: once it is read, all of theirs are.
    let marker = get(server.addr(), "/sleep?ms=1").expect("GET /sleep?ms=1");
    assert_eq!(marker.status, 200);
    server.events.wait(0, DEADLINE, "the marker /sleep", |l| {
        l.is("sleeping") && l.get("ms") == "1"
    });
    let mut begun_by_pid: BTreeMap<u32, u64> = BTreeMap::new();
    for line in server.events.snapshot() {
        let line = Line::parse(&line);
        if line.is("sleeping") && line.get("ms") == "0" {
            *begun_by_pid.entry(line.num("pid") as u32).or_default() += 1;
        }
    }
    let begun: u64 = begun_by_pid.values().sum();
    let differ: Vec<_> = pids
        .iter()
        .map(|pid| {
            let (server, client) = (
                begun_by_pid.get(pid).copied().unwrap_or(0),
                stats.sleeps_by_pid.get(pid).copied().unwrap_or(0),
            );
            (pid, server, client)
        })
        .filter(|(_, server, client)| server != client)
        .collect();
    println!(
        "axum http/2: {} requests ok over {} connections ({} POSTs echoing {} KB exactly, {} /sleep), {} failed; \
         retried as not processed: {} after GOAWAY, {} REFUSED_STREAM, {} unsent; \
         /sleep handlers the server began: {}; {} PIDs answered",
        stats.ok,
        stats.connections,
        stats.posts,
        stats.posted_bytes / 1024,
        stats.sleeps,
        stats.failed,
        stats.retried_goaway,
        stats.retried_refused,
        stats.retried_unsent,
        begun,
        stats.pids.len()
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 2000, "the load ran: {} requests", stats.ok);
    assert!(stats.posts > 500, "the POSTs ran: {}", stats.posts);
    assert!(
        differ.is_empty(),
        "/sleep handlers begun by the server vs /sleep answers, (pid, begun, answered): {differ:?}; \
         retried requests: {:#?}",
        stats.retried
    );
    assert_eq!(begun, stats.sleeps);
    assert!(
        stats.connections > 20,
        "clients reconnected after the GOAWAYs: {} connections",
        stats.connections
    );
    server.assert_generations(&pids, &stats.pids);
    assert!(
        stats.pids.len() > 10,
        "the load reached most generations: {:?}",
        stats.pids
    );
}

/// The inode of the server's end of the TCP connection whose client end is
/// `client` (from `/proc/net/tcp`), once a process has accepted it.
fn server_side_inode(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests serve on 127.0.0.1"),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 9 && fields[1] == local && fields[2] == remote)
            .then(|| fields[9].parse().ok())
            .flatten()
            .filter(|&inode| inode != 0)
    })
}

/// Whether `pid` holds the socket with `inode` among its fds.
fn holds_socket(pid: u32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy() == wanted))
}

/// What the server sends on `stream` until it closes it (or the deadline).
fn read_until_closed(stream: &mut std::net::TcpStream) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("{e} after {} bytes", got.len())),
        }
    }
}

/// Two clients hold half-sent requests open in the old generation (a POST
/// with `Content-Length: 100` and 10 bytes of its body; half a request
/// line): with `--drain-timeout 2`, the old generation exits by its drain
/// deadline all the same (status 1: it cut what was left), both
/// connections are closed, and the new generation answers.
#[test]
fn a_half_sent_request_does_not_hold_the_old_generation_past_its_drain_deadline() {
    const DRAIN: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_millis(1500);
    let server = Server::start_with(
        Options::new(EXAMPLE)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--drain-timeout")
            .arg("2"),
    );
    let old = server.first_pid;
    let addr = server.addr();
    let mut body = common::http::connect(addr).expect("connect");
    body.write_all(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n\
          Content-Length: 100\r\n\r\n0123456789",
    )
    .expect("send the head and 10 bytes of the body");
    let mut head = common::http::connect(addr).expect("connect");
    head.write_all(b"GET / HT")
        .expect("send half a request line");
    // Both connections are the old generation's (accepted by it, not left
    // in the backlog for the successor).
    for stream in [&body, &head] {
        let client = stream.local_addr().expect("client address");
        server.wait_until("the old generation to accept the connection", || {
            server_side_inode(addr, client).is_some_and(|inode| holds_socket(old, inode))
        });
    }

    let new = server.upgrade().expect("upgrade");
    let (_, stopping) =
        server
            .events
            .wait(0, DEADLINE, "the old generation to stop accepting", |l| {
                l.is("stopping") && l.num("pid") == u64::from(old)
            });
    let drain_began = Instant::now();
    assert!(
        stopping.num("connections") >= 2,
        "both held connections drain: {}",
        stopping.raw
    );
    let status = wait_exit(old, DRAIN + MARGIN);
    let exited_after = drain_began.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!("the old generation {old} still runs {exited_after:?} into a {DRAIN:?} drain")
    });
    let (_, exit) = server
        .events
        .wait(0, DEADLINE, "the old generation's exit line", |l| {
            l.is("exit") && l.num("pid") == u64::from(old)
        });
    let body_got = read_until_closed(&mut body).expect("the held POST's connection is closed");
    let head_got =
        read_until_closed(&mut head).expect("the half request line's connection is closed");
    println!(
        "half-sent requests: old generation exited {} ms after its drain began (deadline {} ms), status {status:?}; \
         drain waited {} ms, cut {}; the server sent {} bytes on the held POST, {} on the half request line",
        exited_after.as_millis(),
        DRAIN.as_millis(),
        exit.num("waited_ms"),
        exit.num("cut"),
        body_got.len(),
        head_got.len()
    );
    assert!(
        exited_after <= DRAIN + MARGIN,
        "exited {exited_after:?} into the drain"
    );
    assert!(
        exit.num("waited_ms") <= (DRAIN + Duration::from_millis(500)).as_millis() as u64,
        "the drain outlasted its timeout: {}",
        exit.raw
    );
    // The POST never completed: it was still open at the deadline and cut.
    assert!(exit.num("cut") >= 1, "the held POST was cut: {}", exit.raw);
    assert_eq!(status, Some(1), "a drain that cut connections exits 1");
    assert!(
        !String::from_utf8_lossy(&body_got).contains(" 200 "),
        "the incomplete POST was not answered as if complete"
    );
    let response = get(addr, "/").expect("GET / from the new generation");
    assert_eq!((response.status, response.pid()), (200, Some(new)));
    assert_eq!(server.processes(), vec![new]);
}
/// A closed-loop HTTP/2 load on hyper's client, with prior knowledge.
///
/// Each connection runs on its own current-thread runtime. On a multi-thread
/// runtime, hyper 1.12's HTTP/2 client can fail a request it has already
/// handed to h2 (stream opened, HEADERS on their way to the server) with the
/// connection's GOAWAY error and no request given back, when the GOAWAY is
/// read on another worker between `h2::client::SendRequest::send_request`
/// and the `poll_ready` that follows it (`ClientTask::poll` in
/// hyper/src/proto/h2/client.rs). That error is the same one h2 gives a
/// stream the server refused, so no client can tell the two apart, and
/// retrying it can run a request twice: this test saw it (the server began
/// one `/sleep` handler more than the clients were answered, with one
/// "GOAWAY" retry on that generation's connection). On one thread nothing
/// runs between those two calls, and what the GOAWAY fails was never sent.
mod h2load {
    use std::collections::{BTreeMap, BTreeSet};
    use std::error::Error as _;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::client::conn::http2::SendRequest;
    use hyper::{Request, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use crate::common::http::IO_TIMEOUT;
    use crate::common::load::body_for;

    /// No load runs longer than this, whatever the test does.
    const MAX_RUN: Duration = Duration::from_secs(240);
    /// Attempts of one request that the server refused before it counts as failed.
    const MAX_ATTEMPTS: u32 = 10;

    #[derive(Debug, Default)]
    pub struct Stats {
        pub ok: u64,
        pub posts: u64,
        pub posted_bytes: u64,
        pub sleeps: u64,
        pub failed: u64,
        pub errors: Vec<String>,
        /// Retries of requests the server's GOAWAY said it did not process.
        pub retried_goaway: u64,
        /// Retries of requests the server reset with REFUSED_STREAM.
        pub retried_refused: u64,
        /// Retries of requests hyper gave back unsent (the connection closed first).
        pub retried_unsent: u64,
        pub connections: u64,
        pub pids: BTreeSet<u32>,
        /// `/sleep` answers by the PID that gave them.
        pub sleeps_by_pid: BTreeMap<u32, u64>,
        /// Each retry: the request, why, and the error.
        pub retried: Vec<String>,
    }

    impl Stats {
        fn merge(&mut self, other: Stats) {
            self.ok += other.ok;
            self.posts += other.posts;
            self.posted_bytes += other.posted_bytes;
            self.sleeps += other.sleeps;
            self.failed += other.failed;
            self.errors.extend(other.errors);
            self.retried_goaway += other.retried_goaway;
            self.retried_refused += other.retried_refused;
            self.retried_unsent += other.retried_unsent;
            self.pids.extend(other.pids);
            for (pid, n) in other.sleeps_by_pid {
                *self.sleeps_by_pid.entry(pid).or_default() += n;
            }
            self.retried.extend(other.retried);
            self.connections += other.connections;
        }
    }

    pub struct H2Load {
        stop: Arc<AtomicBool>,
        progress: Arc<AtomicU64>,
        threads: Vec<JoinHandle<Stats>>,
    }

    impl H2Load {
        /// `connections` connections, each with `streams` concurrent streams.
        pub fn start(addr: SocketAddr, connections: usize, streams: usize) -> H2Load {
            let stop = Arc::new(AtomicBool::new(false));
            let progress = Arc::new(AtomicU64::new(0));
            let threads = (0..connections)
                .map(|c| {
                    let (stop, progress) = (stop.clone(), progress.clone());
                    std::thread::spawn(move || {
                        // One thread per connection, each a current-thread
                        // runtime: see the module docs for why not a
                        // multi-thread one.
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a tokio runtime");
                        runtime.block_on(connection(addr, c, streams, stop, progress))
                    })
                })
                .collect();
            H2Load {
                stop,
                progress,
                threads,
            }
        }

        pub fn answered(&self) -> u64 {
            self.progress.load(Ordering::SeqCst)
        }

        /// Waits until `n` more requests were answered.
        pub fn wait_for_more(&self, n: u64) {
            let target = self.answered() + n;
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.answered() < target {
                assert!(
                    Instant::now() < deadline,
                    "the HTTP/2 load made no progress"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        pub fn stop(self) -> Stats {
            self.stop.store(true, Ordering::SeqCst);
            let mut total = Stats::default();
            for thread in self.threads {
                total.merge(thread.join().expect("the HTTP/2 load panicked"));
            }
            total
        }
    }

    /// One connection slot and its `streams` stream tasks.
    async fn connection(
        addr: SocketAddr,
        c: usize,
        streams: usize,
        stop: Arc<AtomicBool>,
        progress: Arc<AtomicU64>,
    ) -> Stats {
        let slot = Arc::new(Slot::new(addr));
        let tasks: Vec<_> = (0..streams)
            .map(|s| {
                let seed = 1000 + (c * streams + s) as u64;
                tokio::spawn(stream_loop(
                    slot.clone(),
                    seed,
                    stop.clone(),
                    progress.clone(),
                ))
            })
            .collect();
        let mut total = Stats::default();
        for task in tasks {
            total.merge(task.await.expect("a stream task panicked"));
        }
        total.connections = slot.opened.load(Ordering::SeqCst);
        total
    }

    /// One HTTP/2 connection shared by several stream tasks, replaced when
    /// the server sends it away.
    struct Slot {
        addr: SocketAddr,
        current: tokio::sync::Mutex<(u64, Option<SendRequest<Full<Bytes>>>)>,
        opened: AtomicU64,
    }

    impl Slot {
        fn new(addr: SocketAddr) -> Slot {
            Slot {
                addr,
                current: tokio::sync::Mutex::new((0, None)),
                opened: AtomicU64::new(0),
            }
        }

        /// The current connection (its epoch and a sender), connecting if
        /// there is none or it closed.
        async fn get(&self) -> Result<(u64, SendRequest<Full<Bytes>>), String> {
            let mut current = self.current.lock().await;
            if let Some(sender) = &current.1 {
                if !sender.is_closed() {
                    return Ok((current.0, sender.clone()));
                }
            }
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            self.opened.fetch_add(1, Ordering::SeqCst);
            current.0 += 1;
            current.1 = Some(sender.clone());
            Ok((current.0, sender))
        }

        /// Stops using connection `epoch` for new requests.
        async fn retire(&self, epoch: u64) {
            let mut current = self.current.lock().await;
            if current.0 == epoch {
                current.1 = None;
            }
        }
    }

    #[derive(Debug)]
    enum Kind {
        Get,
        Post(Bytes),
        Sleep,
    }

    enum Outcome {
        Answered(Version, u16, Bytes),
        /// Not processed by the server (RFC 9113 §8.7): safe to retry.
        NotProcessed(&'static str, String),
        Failed(String),
    }

    /// Why the server did not process a request, if HTTP/2 says it did not.
    fn not_processed(error: &hyper::Error) -> Option<&'static str> {
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                // h2 gives a GOAWAY's error only to the streams above its
                // last stream id, and to requests made after it arrived; a
                // stream the server began and then lost ends otherwise (a
                // reset, a broken pipe).
                if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                    return Some("goaway");
                }
                if h2.is_reset()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                {
                    return Some("refused");
                }
                return None;
            }
            source = cause.source();
        }
        None
    }

    async fn attempt(
        sender: &mut SendRequest<Full<Bytes>>,
        addr: SocketAddr,
        kind: &Kind,
    ) -> Outcome {
        let (method, path, body) = match kind {
            Kind::Get => ("GET", "/", Bytes::new()),
            Kind::Post(body) => ("POST", "/echo", body.clone()),
            Kind::Sleep => ("GET", "/sleep?ms=0", Bytes::new()),
        };
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(Full::new(body))
            .expect("a request");
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => {
                if error.take_message().is_some() {
                    return Outcome::NotProcessed("unsent", error.into_error().to_string());
                }
                let error = error.into_error();
                return match not_processed(&error) {
                    Some(why) => {
                        Outcome::NotProcessed(why, format!("{error} ({:?})", error.source()))
                    }
                    None => Outcome::Failed(format!("{error} ({:?})", error.source())),
                };
            }
        };
        let (version, status) = (response.version(), response.status().as_u16());
        // Answer headers arrived: the server began this stream, so from here
        // any error is a lost request.
        match response.into_body().collect().await {
            Ok(body) => Outcome::Answered(version, status, body.to_bytes()),
            Err(error) => Outcome::Failed(format!("body: {error} ({:?})", error.source())),
        }
    }

    async fn stream_loop(
        slot: Arc<Slot>,
        seed: u64,
        stop: Arc<AtomicBool>,
        progress: Arc<AtomicU64>,
    ) -> Stats {
        let started = Instant::now();
        let mut stats = Stats::default();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_RUN {
            n += 1;
            let kind = match n % 3 {
                0 => Kind::Post(Bytes::from(body_for(seed, n))),
                1 => Kind::Get,
                _ => Kind::Sleep,
            };
            let mut attempts = 0;
            let outcome = loop {
                attempts += 1;
                let (epoch, mut sender) = match slot.get().await {
                    Ok(got) => got,
                    Err(error) => break Err(error),
                };
                let outcome =
                    match tokio::time::timeout(IO_TIMEOUT, attempt(&mut sender, slot.addr, &kind))
                        .await
                    {
                        Ok(outcome) => outcome,
                        Err(_) => Outcome::Failed(format!("no answer in {IO_TIMEOUT:?}")),
                    };
                match outcome {
                    Outcome::Answered(version, status, body) => break Ok((version, status, body)),
                    Outcome::NotProcessed(why, error) => {
                        let kind = match &kind {
                            Kind::Post(_) => "POST /echo",
                            Kind::Get => "GET /",
                            Kind::Sleep => "GET /sleep",
                        };
                        stats.retried.push(format!(
                            "{kind} on connection {epoch} of stream task {seed}, attempt {attempts}: {why}: {error}"
                        ));
                        match why {
                            "goaway" => stats.retried_goaway += 1,
                            "refused" => stats.retried_refused += 1,
                            _ => stats.retried_unsent += 1,
                        }
                        // This connection is going away: new requests go to a new one.
                        slot.retire(epoch).await;
                        if attempts >= MAX_ATTEMPTS {
                            break Err(format!("not processed {attempts} times (last: {why})"));
                        }
                    }
                    Outcome::Failed(error) => {
                        slot.retire(epoch).await;
                        break Err(error);
                    }
                }
            };
            let checked = outcome.and_then(|(version, status, body)| {
                if version != Version::HTTP_2 {
                    return Err(format!("answered over {version:?}"));
                }
                if status != 200 {
                    return Err(format!("status {status}"));
                }
                match &kind {
                    Kind::Post(sent) if body != *sent => Err(format!(
                        "echo differs: sent {} bytes, got {}",
                        sent.len(),
                        body.len()
                    )),
                    Kind::Post(sent) => {
                        stats.posts += 1;
                        stats.posted_bytes += sent.len() as u64;
                        Ok(())
                    }
                    Kind::Sleep | Kind::Get => {
                        let text = String::from_utf8_lossy(&body);
                        let pid = text
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("pid="))
                            .and_then(|p| p.parse().ok());
                        match (pid, &kind) {
                            (Some(pid), Kind::Sleep) => {
                                stats.sleeps += 1;
                                *stats.sleeps_by_pid.entry(pid).or_default() += 1;
                                Ok(())
                            }
                            (Some(pid), _) => {
                                stats.pids.insert(pid);
                                Ok(())
                            }
                            (None, _) => Err(format!("no pid in {text:?}")),
                        }
                    }
                }
            });
            match checked {
                Ok(()) => {
                    stats.ok += 1;
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                Err(error) => {
                    stats.failed += 1;
                    stats.errors.push(error);
                }
            }
        }
        stats
    }
}
