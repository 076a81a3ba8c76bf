//! `handoff run`: a resident supervisor with a stable PID that owns the
//! listening sockets and runs a server written in any language that speaks
//! systemd socket activation. Upgrading starts a new child with the same
//! sockets, waits until it is ready, then stops the old one; a failed child
//! is killed and the old one keeps serving. A child that dies is restarted
//! with backoff while the sockets stay open. As PID 1 it reaps every orphan.
//!
//! All reaping is central: on `SIGCHLD` the supervisor collects every exited
//! child with `waitpid(-1)`, its own children and orphans alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::control::{self, Command, Generation, GenerationState, Response, Status};
use crate::env::NOTIFY_SOCKET;
use crate::notify::{monotonic_usec, NotifyListener};
pub use crate::readiness::{parse_duration, Ready};

mod config;
use crate::handoff::lock;
use crate::spawn::{resolve_program, spawn, SpawnSpec};
use crate::Handoff;
pub use config::{Config, Listen};

/// One child and where it is in its life.
struct Proc {
    pid: u32,
    generation: u64,
    state: GenerationState,
    started: Instant,
}

#[derive(Default)]
struct Shared {
    procs: Vec<Proc>,
    serving: Option<u32>,
    upgrading: bool,
    stopping: bool,
    next_generation: u64,
    upgrades_done: u64,
    upgrades_failed: u64,
    last_failure: Option<String>,
    /// Exit statuses of reaped children, as shell-style codes (128+signal).
    /// Kept for a while after the reaping (every waiter looks at once).
    exits: HashMap<u32, (i32, Instant)>,
}

struct Supervisor {
    handoff: Handoff,
    config: Config,
    program: PathBuf,
    cwd: PathBuf,
    /// The notify socket children get as NOTIFY_SOCKET, and what it heard.
    notify_addr: String,
    inbox: Arc<crate::readiness::Inbox>,
    shared: Mutex<Shared>,
    exited: Notify,
    /// The control socket's path, unlinked when the supervisor exits.
    control_path: Mutex<Option<crate::socket::BoundPath>>,
    /// Notified whenever `Shared::serving` changes.
    serving_changed: Notify,
}

/// Runs the supervisor until it is told to stop; returns the exit status:
/// the serving child's, or 1 if no child ever became ready.
///
/// `handoff` must be built before the runtime starts (it reads the
/// environment, e.g. systemd's sockets); call this inside a tokio runtime.
pub async fn run(handoff: Handoff, config: Config) -> Result<i32, String> {
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    let first = config.command.first().ok_or("no command to run")?;
    let program = resolve_program(first, &cwd)
        .ok_or_else(|| format!("{}: not found in PATH", first.to_string_lossy()))?;
    for (name, listen) in &config.listen {
        let claimed = match listen {
            Listen::Tcp(addr) => handoff.std_tcp_listener(name, *addr).map(drop),
            Listen::Udp(addr) => handoff.std_udp_socket(name, *addr).map(drop),
            Listen::Unix(path) => handoff.std_unix_listener(name, path).map(drop),
        };
        claimed.map_err(|e| e.to_string())?;
    }
    let notify =
        NotifyListener::bind().map_err(|e| format!("cannot create the notify socket: {e}"))?;
    let notify_addr = notify.addr().to_string();
    let inbox = crate::readiness::Inbox::start(notify);
    let supervisor = Arc::new(Supervisor {
        handoff,
        config,
        program,
        cwd,
        notify_addr,
        inbox,
        shared: Mutex::new(Shared {
            next_generation: 1,
            ..Shared::default()
        }),
        exited: Notify::new(),
        control_path: Mutex::new(None),
        serving_changed: Notify::new(),
    });
    let code = supervisor.main().await;
    if let Some(path) = lock(&supervisor.control_path).take() {
        path.unlink_if_ours();
    }
    code
}

impl Supervisor {
    async fn main(self: &Arc<Self>) -> Result<i32, String> {
        let sig = |kind| signal(kind).map_err(|e| format!("cannot install a signal handler: {e}"));
        let (mut hup, mut term, mut int, mut chld) = (
            sig(SignalKind::hangup())?,
            sig(SignalKind::terminate())?,
            sig(SignalKind::interrupt())?,
            sig(SignalKind::child())?,
        );
        let (mut usr1, mut usr2) = (
            sig(SignalKind::user_defined1())?,
            sig(SignalKind::user_defined2())?,
        );
        {
            let me = self.clone();
            tokio::spawn(async move {
                while chld.recv().await.is_some() {
                    me.reap();
                }
            });
        }
        let (requests, mut incoming) = mpsc::channel::<(Command, oneshot::Sender<Response>)>(16);
        if let Some(path) = &self.config.control {
            self.serve_control(path, requests)?;
        }
        tokio::select! {
            () = self.start_serving() => {}
            Some(()) = term.recv() => return Ok(self.shutdown("SIGTERM", &mut term, &mut int).await),
            Some(()) = int.recv() => return Ok(self.shutdown("SIGINT", &mut term, &mut int).await),
        }
        self.handoff.ready().map_err(|e| e.to_string())?;
        self.status_line();

        let name = loop {
            // Woken when the serving child changes, so the exit watched below
            // is always the current serving child's.
            let changed = self.serving_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let serving = lock(&self.shared).serving;
            tokio::select! {
                () = &mut changed => {}
                Some(()) = hup.recv() => self.begin_upgrade(None),
                Some((command, reply)) = incoming.recv() => match command {
                    Command::Upgrade => self.begin_upgrade(Some(reply)),
                    Command::Status => drop(reply.send(Response::status(self.status()))),
                },
                Some(()) = term.recv() => break "SIGTERM",
                Some(()) = int.recv() => break "SIGINT",
                Some(()) = usr1.recv() => self.forward(Signal::SIGUSR1),
                Some(()) = usr2.recv() => self.forward(Signal::SIGUSR2),
                code = self.wait_exit(serving.unwrap_or(0)), if serving.is_some() => {
                    // Still the serving child? (Not one an upgrade retired meanwhile.)
                    let pid = serving.unwrap_or(0);
                    if lock(&self.shared).serving == Some(pid) {
                        self.child_died(pid, code).await;
                    }
                }
            }
        };
        Ok(self.shutdown(name, &mut term, &mut int).await)
    }

    /// Collects every exited child (and, as PID 1, every orphan).
    fn reap(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => status,
            };
            let (pid, code) = match status {
                WaitStatus::Exited(pid, code) => (pid, code),
                WaitStatus::Signaled(pid, signal, _) => (pid, 128 + signal as i32),
                _ => continue,
            };
            let pid = pid.as_raw() as u32;
            let mut shared = lock(&self.shared);
            if shared.procs.iter().any(|p| p.pid == pid) {
                shared
                    .procs
                    .retain(|p| p.pid != pid || p.state == GenerationState::Serving);
                // Forget exits long seen, so the map stays small over months.
                shared
                    .exits
                    .retain(|_, (_, at)| at.elapsed() < Duration::from_secs(600));
                shared.exits.insert(pid, (code, Instant::now()));
                drop(shared);
                self.inbox.forget(pid);
            } else {
                tracing::debug!(pid, code, "reaped an orphan");
            }
        }
        self.exited.notify_waiters();
    }

    /// Resolves with the exit code of child `pid` once it has been reaped.
    async fn wait_exit(&self, pid: u32) -> i32 {
        loop {
            let notified = self.exited.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((code, _)) = lock(&self.shared).exits.get(&pid) {
                return *code;
            }
            notified.await;
        }
    }

    /// Starts a child of the next generation; returns its PID.
    fn start_child(&self) -> Result<(u32, u64), String> {
        let generation = {
            let mut shared = lock(&self.shared);
            shared.next_generation += 1;
            shared.next_generation - 1
        };
        let registry = lock(&self.handoff.inner.registry);
        let child = spawn(&SpawnSpec {
            program: &self.program,
            args: &self.config.command,
            cwd: &self.cwd,
            fds: registry.handoff_fds(),
            channel: None,
            env: vec![(NOTIFY_SOCKET, self.notify_addr.clone().into())],
            ignore_sighup: false,
        })
        .map_err(|e| e.to_string())?;
        drop(registry);
        let pid = child.into_pid();
        lock(&self.shared).procs.insert(
            0,
            Proc {
                pid,
                generation,
                state: GenerationState::Starting,
                started: Instant::now(),
            },
        );
        tracing::info!(pid, generation, "child started");
        Ok((pid, generation))
    }

    /// Starts a child and waits until it is ready; on failure it is killed
    /// and reaped, and the reason returned.
    async fn start_ready_child(&self) -> Result<(u32, u64), String> {
        let (pid, generation) = self.start_child()?;
        let timeout = self.config.upgrade_timeout;
        let outcome = tokio::select! {
            () = self.config.ready.wait(pid, &self.inbox) => Ok(()),
            code = self.wait_exit(pid) => Err(format!("the new process {} before it was ready", exit_text(pid, code))),
            () = tokio::time::sleep(timeout) => Err(format!("the new process (pid {pid}) was not ready within {timeout:?}; it was killed")),
        };
        match outcome {
            Ok(()) => {
                let mut shared = lock(&self.shared);
                if let Some(p) = shared.procs.iter_mut().find(|p| p.pid == pid) {
                    p.state = GenerationState::Serving;
                }
                shared.serving = Some(pid);
                drop(shared);
                self.serving_changed.notify_waiters();
                Ok((pid, generation))
            }
            Err(why) => {
                self.kill_group(pid);
                self.wait_exit(pid).await;
                lock(&self.shared).procs.retain(|p| p.pid != pid);
                Err(why)
            }
        }
    }

    /// The first child, or a replacement after a crash: retried with backoff.
    async fn start_serving(&self) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.start_ready_child().await {
                Ok(_) => return,
                Err(why) => {
                    tracing::error!(error = %why, retry_in = ?delay, "child did not start");
                    self.handoff
                        .notify(&format!("STATUS=Starting failed ({why}); retrying"));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn begin_upgrade(self: &Arc<Self>, reply: Option<oneshot::Sender<Response>>) {
        {
            let mut shared = lock(&self.shared);
            if shared.upgrading || shared.stopping {
                let why = if shared.stopping {
                    "stopping"
                } else {
                    "an upgrade is already in flight"
                };
                tracing::info!(reason = why, "upgrade request ignored");
                if let Some(reply) = reply {
                    let _ = reply.send(Response::error(why));
                }
                return;
            }
            shared.upgrading = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let response = me.upgrade().await;
            lock(&me.shared).upgrading = false;
            if let Some(reply) = reply {
                let _ = reply.send(response);
            }
        });
    }

    async fn upgrade(self: &Arc<Self>) -> Response {
        self.handoff.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=Upgrading",
            monotonic_usec()
        ));
        let old = lock(&self.shared).serving;
        match self.start_ready_child().await {
            Ok((pid, generation)) => {
                if let Some(old) = old {
                    self.retire(old);
                }
                lock(&self.shared).upgrades_done += 1;
                tracing::info!(pid, generation, "upgrade succeeded");
                self.status_line();
                Response::upgraded(pid, generation)
            }
            Err(why) => {
                {
                    let mut shared = lock(&self.shared);
                    shared.upgrades_failed += 1;
                    shared.last_failure = Some(why.clone());
                }
                tracing::error!(error = %why, "upgrade failed; the old child keeps serving");
                self.status_line();
                Response::error(why)
            }
        }
    }

    /// Asks `pid` to drain and exit; kills its group at the drain deadline.
    fn retire(self: &Arc<Self>, pid: u32) {
        if let Some(p) = lock(&self.shared).procs.iter_mut().find(|p| p.pid == pid) {
            p.state = GenerationState::Draining;
        }
        let _ = kill(Pid::from_raw(pid as i32), self.config.stop_signal);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = me.wait_exit(pid) => {}
                () = tokio::time::sleep(me.config.drain_timeout) => {
                    // Not reaped yet, so the PID (and group) is still this child's.
                    tracing::warn!(pid, "child did not exit within the drain timeout; SIGKILL");
                    me.kill_group(pid);
                }
            }
        });
    }

    fn kill_group(&self, pid: u32) {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }

    fn forward(&self, signal: Signal) {
        if let Some(pid) = lock(&self.shared).serving {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    async fn child_died(&self, pid: u32, code: i32) {
        {
            let mut shared = lock(&self.shared);
            shared.serving = None;
            shared.procs.retain(|p| p.pid != pid);
        }
        let why = format!("the serving process {}", exit_text(pid, code));
        tracing::error!(error = %why, "the serving child died; restarting it (the sockets stay open)");
        self.handoff.notify(&format!("STATUS=Restarting: {why}"));
        self.start_serving().await;
        self.status_line();
    }

    /// Stops every child with the stop signal, waits for the drain deadline,
    /// kills what is left; returns the serving child's exit status.
    async fn shutdown(
        &self,
        name: &str,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> i32 {
        tracing::info!(
            signal = name,
            "stopping: forwarding the stop signal to every child"
        );
        self.handoff.notify("STOPPING=1\nSTATUS=Stopping");
        let (serving, pids) = {
            let mut shared = lock(&self.shared);
            shared.stopping = true;
            (
                shared.serving,
                shared.procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
            )
        };
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), self.config.stop_signal);
        }
        let all = async {
            for &pid in &pids {
                self.wait_exit(pid).await;
            }
        };
        tokio::select! {
            () = all => {}
            () = tokio::time::sleep(self.config.drain_timeout) => tracing::warn!("drain timeout: killing what is left"),
            Some(()) = term.recv() => tracing::warn!("second stop signal: killing now"),
            Some(()) = int.recv() => tracing::warn!("second stop signal: killing now"),
        }
        for &pid in &pids {
            self.kill_group(pid);
        }
        for &pid in &pids {
            self.wait_exit(pid).await;
        }
        let shared = lock(&self.shared);
        serving
            .and_then(|pid| shared.exits.get(&pid).map(|(code, _)| *code))
            .unwrap_or(0)
    }

    fn status(&self) -> Status {
        let shared = lock(&self.shared);
        let listeners: Vec<String> = self.config.listen.iter().map(|(n, _)| n.clone()).collect();
        Status {
            pid: std::process::id(),
            generations: shared
                .procs
                .iter()
                .map(|p| Generation {
                    pid: p.pid,
                    generation: p.generation,
                    state: p.state,
                    age_secs: p.started.elapsed().as_secs_f64(),
                    connections: None,
                    listeners: listeners.clone(),
                })
                .collect(),
            upgrades_done: shared.upgrades_done,
            upgrades_failed: shared.upgrades_failed,
            last_failure: shared.last_failure.clone(),
        }
    }

    /// `READY=1` and a status line for systemd (ends a reload, too).
    fn status_line(&self) {
        let shared = lock(&self.shared);
        let serving = shared
            .procs
            .iter()
            .find(|p| p.state == GenerationState::Serving);
        let mut status = match serving {
            Some(p) => format!("Serving, generation {} (pid {})", p.generation, p.pid),
            None => "No child serving".to_owned(),
        };
        if let Some(failure) = &shared.last_failure {
            status.push_str("; last upgrade failed: ");
            status.push_str(failure);
        }
        drop(shared);
        self.handoff.notify(&format!("READY=1\nSTATUS={status}"));
    }

    fn serve_control(
        self: &Arc<Self>,
        path: &std::path::Path,
        requests: mpsc::Sender<(Command, oneshot::Sender<Response>)>,
    ) -> Result<(), String> {
        // Bound here, not registered for handoff: the supervisor keeps its
        // PID, and its children must not receive this socket.
        let context = |e: &dyn std::fmt::Display| format!("control socket {}: {e}", path.display());
        control::prepare_dir(path).map_err(|e| context(&e))?;
        let (fd, bound) =
            crate::socket::bind_unix(path, nix::sys::socket::SockType::Stream, Some(0o600))
                .map_err(|e| context(&e))?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).map_err(|e| context(&e))?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| context(&e))?;
        *lock(&self.control_path) = Some(bound);
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
        Ok(())
    }
}

/// "(pid N) exited with status C" or "(pid N) was killed by signal S".
fn exit_text(pid: u32, code: i32) -> String {
    if code > 128 {
        let name = Signal::try_from(code - 128).map_or("an unknown signal", |s| s.as_str());
        format!("(pid {pid}) was killed by signal {name}")
    } else {
        format!("(pid {pid}) exited with status {code}")
    }
}
