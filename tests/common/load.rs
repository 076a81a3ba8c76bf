//! A closed-loop load: threads that send `GET /` as fast as answers come back,
//! half on a new connection per request, half on keep-alive connections;
//! optionally every other request a `POST /echo` with a body of a few KB
//! whose echo is checked byte for byte. Every failure is recorded with its
//! cause. Bounded in time.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{get, post, KeepAlive};

/// No load runs longer than this, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(240);

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub retries: u64,
    pub errors: Vec<String>,
    /// PIDs that answered.
    pub pids: BTreeSet<u32>,
    /// POSTs whose echo came back equal to what was sent (counted in `ok` too).
    pub posts: u64,
    /// Body bytes those POSTs sent (and got back).
    pub posted_bytes: u64,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.retries += other.retries;
        self.errors.extend(other.errors);
        self.pids.extend(other.pids);
        self.posts += other.posts;
        self.posted_bytes += other.posted_bytes;
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stats>>,
    progress: Arc<Mutex<u64>>,
}

impl Load {
    /// Starts `fresh` clients that connect per request and `kept` keep-alive clients.
    pub fn start(addr: SocketAddr, fresh: usize, kept: usize) -> Load {
        Self::start_mixed(addr, fresh, kept, false)
    }

    /// As [`start`](Self::start); with `posts`, every other request of each
    /// client is a `POST /echo` with a body of 1 to 8 KB of varying bytes
    /// (the server must answer it with the same bytes).
    pub fn start_mixed(addr: SocketAddr, fresh: usize, kept: usize, posts: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(0));
        let mut threads = Vec::new();
        for i in 0..fresh + kept {
            let stop = stop.clone();
            let progress = progress.clone();
            let keep_alive = i >= fresh;
            let seed = i as u64 + 1;
            threads.push(std::thread::spawn(move || {
                client(addr, keep_alive, posts.then_some(seed), &stop, &progress)
            }));
        }
        Load {
            stop,
            threads,
            progress,
        }
    }

    /// Requests answered so far (all clients).
    pub fn answered(&self) -> u64 {
        *self.progress.lock().unwrap()
    }

    /// Waits until `n` more requests were answered, so each phase of a test
    /// really runs under load.
    pub fn wait_for_more(&self, n: u64) {
        let target = self.answered() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() < target {
            assert!(Instant::now() < deadline, "the load made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn stop(self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Stats::default();
        for thread in self.threads {
            total.merge(thread.join().expect("load thread panicked"));
        }
        total
    }
}

/// A body of 1 to 8 KB of bytes that differ from one request to the next
/// (a xorshift stream): any mix-up or truncation shows in the echo.
pub fn body_for(seed: u64, n: u64) -> Vec<u8> {
    let mut state =
        (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let len = 1024 + (next() % 7169) as usize;
    (0..len).map(|_| next() as u8).collect()
}

fn client(
    addr: SocketAddr,
    keep_alive: bool,
    posts: Option<u64>,
    stop: &AtomicBool,
    progress: &Mutex<u64>,
) -> Stats {
    let started = Instant::now();
    let mut stats = Stats::default();
    let mut kept = KeepAlive::new(addr);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_RUN {
        n += 1;
        let body = posts
            .filter(|_| n.is_multiple_of(2))
            .map(|seed| body_for(seed, n));
        let result = match (&body, keep_alive) {
            (None, true) => kept.get("/"),
            (None, false) => get(addr, "/"),
            (Some(body), true) => kept.post("/echo", body),
            (Some(body), false) => post(addr, "/echo", body),
        };
        match result {
            Ok(response) if response.status == 200 && body.is_some() => {
                let sent = body.as_deref().unwrap_or_default();
                if response.bytes == sent {
                    stats.ok += 1;
                    stats.posts += 1;
                    stats.posted_bytes += sent.len() as u64;
                    *progress.lock().unwrap() += 1;
                } else {
                    stats.failed += 1;
                    stats.errors.push(format!(
                        "echo differs: sent {} bytes, got {} bytes",
                        sent.len(),
                        response.bytes.len()
                    ));
                }
            }
            Ok(response) if response.status == 200 => {
                stats.ok += 1;
                if let Some(pid) = response.pid() {
                    stats.pids.insert(pid);
                }
                *progress.lock().unwrap() += 1;
            }
            Ok(response) => {
                stats.failed += 1;
                stats.errors.push(format!("status {}", response.status));
            }
            Err(error) => {
                stats.failed += 1;
                let kind = if keep_alive { "keep-alive" } else { "fresh" };
                stats.errors.push(format!("{kind}: {error}"));
            }
        }
    }
    stats.retries = kept.retries;
    stats
}
