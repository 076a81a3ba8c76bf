//! A closed-loop load: threads that send `GET /` as fast as answers come back,
//! half on a new connection per request, half on keep-alive connections.
//! Every failure is recorded with its cause. Bounded in time.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{get, KeepAlive};

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
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.retries += other.retries;
        self.errors.extend(other.errors);
        self.pids.extend(other.pids);
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
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(0));
        let mut threads = Vec::new();
        for i in 0..fresh + kept {
            let stop = stop.clone();
            let progress = progress.clone();
            let keep_alive = i >= fresh;
            threads.push(std::thread::spawn(move || {
                client(addr, keep_alive, &stop, &progress)
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

fn client(addr: SocketAddr, keep_alive: bool, stop: &AtomicBool, progress: &Mutex<u64>) -> Stats {
    let started = Instant::now();
    let mut stats = Stats::default();
    let mut kept = KeepAlive::new(addr);
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_RUN {
        let result = if keep_alive {
            kept.get("/")
        } else {
            get(addr, "/")
        };
        match result {
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
