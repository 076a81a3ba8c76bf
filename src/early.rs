//! What the process was started with, captured before `main`.
//!
//! The handoff variables must leave the environment (so the application's
//! subprocesses inherit none of them), but changing the environment is only
//! sound while one thread runs: `setenv`/`unsetenv` race with `getenv` in
//! other threads, and `#[tokio::main]` starts its workers before the first
//! line of `main`. So a constructor in `.init_array`, which the loader runs
//! before `main` on the one thread that exists then (in a program; a
//! library loaded later with `dlopen` into a threaded process gets no such
//! guarantee, nor does a program whose own constructors start threads),
//! reads the variables,
//! removes them, and marks the inherited fds close-on-exec (the readiness
//! channel and the memfd of `HANDOFF_VARS_FD` too). [`Builder::build`]
//! later parses that snapshot, from whatever thread, at whatever time.
//!
//! [`Builder::build`]: crate::Builder::build

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use crate::env::{
    CONSUMED, HANDOFF_CHANNEL_FD, HANDOFF_VARS_FD, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID,
};

/// Each consumed variable with the value it had at start.
pub(crate) type Snapshot = Vec<(&'static str, Option<OsString>)>;

static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();

/// Runs before `main`. `#[used]` keeps it in the object file, and [`take`]
/// reads it, so the linker keeps that object whenever the library is used.
#[used]
#[link_section = ".init_array"]
static CAPTURE_AT_START: extern "C" fn() = capture_at_start;

extern "C" fn capture_at_start() {
    // A panic must not unwind out of an `extern "C"` constructor.
    let _ = std::panic::catch_unwind(capture);
}

/// Reads and removes the variables once; later calls find the snapshot.
fn capture() -> &'static Snapshot {
    SNAPSHOT.get_or_init(|| {
        let values: Snapshot = CONSUMED
            .iter()
            .map(|&var| (var, std::env::var_os(var)))
            .collect();
        for var in CONSUMED {
            std::env::remove_var(var);
        }
        mark_inherited_cloexec(&values);
        values
    })
}

/// The snapshot taken at start (or now, where the constructor did not run:
/// then the caller is responsible for calling it before other threads read
/// the environment).
pub(crate) fn take() -> &'static Snapshot {
    // A use of the constructor's static, which the optimizer cannot fold
    // away, so its object is linked whatever else the binary uses.
    let _ = std::hint::black_box(&CAPTURE_AT_START);
    capture()
}

/// Marks the fds the environment announces for this process close-on-exec,
/// so a subprocess started before [`crate::Builder::build`] inherits none.
/// Nothing is validated here: `build` checks every fd and reports errors.
fn mark_inherited_cloexec(values: &Snapshot) {
    let get = |name: &str| {
        values
            .iter()
            .find(|(var, _)| *var == name)
            .and_then(|(_, value)| value.as_ref()?.to_str()?.parse::<u32>().ok())
    };
    if get(LISTEN_PID) != Some(std::process::id()) {
        return;
    }
    let count = get(LISTEN_FDS).unwrap_or(0);
    if count == 0 || count as usize > crate::env::MAX_FDS {
        return;
    }
    // The channel follows the fds, and the memfd of long variables (see
    // vars_memfd.rs) the channel.
    let channel = u32::from(get(HANDOFF_CHANNEL_FD).is_some());
    let vars = u32::from(get(HANDOFF_VARS_FD).is_some());
    let last = LISTEN_FDS_START + (count + channel + vars) as RawFd - 1;
    crate::inherited::mark_cloexec(LISTEN_FDS_START, last);
}
