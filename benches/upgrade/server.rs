//! The servers under test: how each strategy starts its first process and
//! replaces the serving process by a new one.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::events::Kind;
use crate::procs::{Family, Result};
use crate::{serve, Ctx};

/// The longest wait for one event line (a start with 1000 listeners binds
/// them one by one and takes seconds).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// `http_server` with one `--listen` per address, run from the temp dir.
pub fn http_server(ctx: &Ctx, listen: &[String]) -> Command {
    let mut command = Command::new(&ctx.http_server);
    for addr in listen {
        command.arg("--listen").arg(addr);
    }
    // Each upgrade waits for the old process's exit: a probation would only
    // add its length to every round. What is measured (ready, stopping)
    // happens before it.
    command.arg("--probation").arg("0");
    command.current_dir(&ctx.tmp);
    command
}

/// `axum_server` (`Serve::axum`) on `addr`, run from the temp dir, as
/// [`http_server`] (no probation).
pub fn axum_server(ctx: &Ctx, addr: &str) -> Command {
    let mut command = Command::new(&ctx.axum_server);
    command.arg("--listen").arg(addr);
    command.arg("--probation").arg("0");
    command.current_dir(&ctx.tmp);
    command
}

/// This binary as the plain `axum::serve` server (`serve.rs`), on `addr`.
fn plain_axum_server(ctx: &Ctx, addr: &str) -> Command {
    let mut command = Command::new(&ctx.bench);
    command
        .env(serve::SERVE_VAR, "axum")
        .env(serve::ADDR_VAR, addr)
        .env(serve::GENERATION_VAR, "1")
        .current_dir(&ctx.tmp);
    command
}

/// This binary as the SO_REUSEPORT server (`serve.rs`), run from the temp dir.
fn reuseport_server(ctx: &Ctx, addr: &str, generation: u64) -> Command {
    let mut command = Command::new(&ctx.bench);
    command
        .env(serve::SERVE_VAR, "reuseport")
        .env(serve::ADDR_VAR, addr)
        .env(serve::GENERATION_VAR, generation.to_string())
        .current_dir(&ctx.tmp);
    command
}

/// This binary as the bare handoff server (`serve.rs`): `listeners` std
/// listeners, nothing served.
fn bare_server(ctx: &Ctx, listeners: usize) -> Command {
    let mut command = Command::new(&ctx.bench);
    command
        .env(serve::SERVE_VAR, "bare")
        .env(serve::LISTENERS_VAR, listeners.to_string())
        .current_dir(&ctx.tmp);
    command
}

/// How the serving process is replaced (see the top of `upgrade.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `SIGHUP` to `http_server`: the successor inherits the socket.
    Handoff,
    /// `SIGHUP` to `axum_server` (`Serve::axum`), likewise.
    Axum,
    /// Plain `axum::serve`, no handoff: a throughput baseline, never restarted.
    PlainAxum,
    /// `SIGHUP` to the bare server: the handoff mechanism alone.
    Bare,
    /// `SIGTERM`, wait for the exit, start a fresh `http_server` on the port.
    Naive,
    /// A new process binds its own `SO_REUSEPORT` socket; then the old one
    /// gets `SIGTERM`.
    ReusePort,
}

/// The serving process of one lineage.
pub struct Server {
    family: Family,
    strategy: Strategy,
    pid: i32,
    generation: u64,
    pub addr: SocketAddr,
    /// The first process's start: spawn → `ready`.
    pub startup: Duration,
}

/// How long one handoff upgrade took, from the signal.
pub struct Upgrade {
    pub ready: Duration,
    pub stopping: Duration,
}

impl Server {
    /// Starts the first process with `listeners` sockets on ephemeral ports
    /// and waits until it is ready.
    pub fn start(ctx: &Ctx, strategy: Strategy, name: &str, listeners: usize) -> Result<Server> {
        let mut family = Family::new(name, ctx.tmp.join(format!("{name}.log")));
        let command = match strategy {
            Strategy::ReusePort => reuseport_server(ctx, "127.0.0.1:0", 1),
            Strategy::Bare => bare_server(ctx, listeners),
            Strategy::Axum => axum_server(ctx, "127.0.0.1:0"),
            Strategy::PlainAxum => plain_axum_server(ctx, "127.0.0.1:0"),
            _ => http_server(ctx, &vec!["127.0.0.1:0".to_owned(); listeners]),
        };
        let spawned = Instant::now();
        let pid = family.spawn(command)?;
        let listening = family.wait_for("listening", EVENT_TIMEOUT, |e| {
            e.kind == Kind::Listening && e.pid == pid
        })?;
        let addr = *listening
            .addrs
            .first()
            .ok_or_else(|| format!("{name}: no address in {:?}", listening.line))?;
        let ready = family.wait_for("ready", EVENT_TIMEOUT, |e| {
            e.kind == Kind::Ready && e.pid == pid
        })?;
        Ok(Server {
            family,
            strategy,
            pid,
            generation: ready.generation,
            addr,
            startup: ready.at.saturating_duration_since(spawned),
        })
    }

    /// Upgrades with SIGHUP; returns once the old process has exited.
    pub fn upgrade(&mut self) -> Result<Upgrade> {
        let (old, next) = (self.pid, self.generation + 1);
        let signalled = Instant::now();
        self.family.signal(old, Signal::SIGHUP)?;
        let ready =
            self.family
                .wait_for(&format!("ready of generation {next}"), EVENT_TIMEOUT, |e| {
                    e.kind == Kind::Ready && e.generation == next && e.pid != old
                })?;
        let stopping =
            self.family
                .wait_for(&format!("stopping of pid {old}"), EVENT_TIMEOUT, |e| {
                    e.kind == Kind::Stopping && e.pid == old
                })?;
        self.family
            .wait_for(&format!("exit of pid {old}"), EVENT_TIMEOUT, |e| {
                e.kind == Kind::Exit && e.pid == old
            })?;
        self.family.reap(old)?;
        (self.pid, self.generation) = (ready.pid, next);
        Ok(Upgrade {
            ready: ready.at.saturating_duration_since(signalled),
            stopping: stopping.at.saturating_duration_since(signalled),
        })
    }

    /// Replaces the serving process the strategy's way; returns the time from
    /// the first step until the new process was ready.
    pub fn restart(&mut self, ctx: &Ctx) -> Result<Duration> {
        let addr = self.addr.to_string();
        match self.strategy {
            Strategy::PlainAxum => Err("the plain axum server is never restarted".to_owned()),
            Strategy::Handoff | Strategy::Axum | Strategy::Bare => self.upgrade().map(|u| u.ready),
            Strategy::Naive => {
                let begun = Instant::now();
                self.family.stop(self.pid, EVENT_TIMEOUT)?;
                let pid = self.family.spawn(http_server(ctx, &[addr]))?;
                let ready = self.family.wait_for("ready", EVENT_TIMEOUT, |e| {
                    e.kind == Kind::Ready && e.pid == pid
                })?;
                self.pid = pid;
                Ok(ready.at.saturating_duration_since(begun))
            }
            Strategy::ReusePort => {
                let begun = Instant::now();
                let pid = self
                    .family
                    .spawn(reuseport_server(ctx, &addr, self.generation + 1))?;
                let ready = self.family.wait_for("ready", EVENT_TIMEOUT, |e| {
                    e.kind == Kind::Ready && e.pid == pid
                })?;
                self.family.stop(self.pid, EVENT_TIMEOUT)?;
                (self.pid, self.generation) = (pid, self.generation + 1);
                Ok(ready.at.saturating_duration_since(begun))
            }
        }
    }

    /// The serving process's CPU time so far (user + system, all its
    /// threads), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map_err(|e| format!("cannot read /proc/{}/stat: {e}", self.pid))?;
        // `pid (comm) state ppid …`: utime and stime are fields 14 and 15,
        // the 12th and 13th after the comm.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let mut fields = after.split_whitespace().skip(11);
        let mut tick = || fields.next().and_then(|f| f.parse::<u64>().ok());
        let (Some(user), Some(system)) = (tick(), tick()) else {
            return Err(format!("unexpected /proc/{}/stat: {stat:?}", self.pid));
        };
        // SAFETY: sysconf takes a constant and touches no memory.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos((user + system) * 1_000_000_000 / hz))
    }

    pub fn stop(mut self) -> Result<()> {
        self.family.stop(self.pid, EVENT_TIMEOUT).map(drop)
    }
}
