//! The variables a process is started with: the names and bounds of the
//! protocol, and strict parsing of them into a [`StartEnv`].
//!
//! The wire format is systemd's socket-activation protocol (`LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`, fds from 3 on) plus `HANDOFF_*` variables
//! for what systemd does not carry. Parsing is strict: a value that is not
//! exactly what the protocol allows is an error that names the variable.
//! Every variable read here is removed from the process environment before
//! `main` (see `early.rs`), so the application's own subprocesses inherit
//! none of them. Taking over the fds they announce is `inherited.rs`.
//!
//! Linux takes at most 128 KiB in one environment string (`MAX_ARG_STRLEN`),
//! which `LISTEN_FDNAMES` passes at a few thousand names. A predecessor then
//! sends the [`LONG_VARS`] that do not fit in a sealed memfd instead,
//! announced by [`HANDOFF_VARS_FD`] (see `vars_memfd.rs` for the format);
//! the successor reads it as if the variables were in its environment.

use std::ffi::OsString;
use std::os::fd::RawFd;

use crate::error::EnvError;
use crate::escape::Escaped;
use crate::notify::NotifyAddr;
use crate::socket::PathId;
use crate::vars_memfd::parse_vars;

pub(crate) const LISTEN_FDS: &str = "LISTEN_FDS";
pub(crate) const LISTEN_PID: &str = "LISTEN_PID";
pub(crate) const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The generation of a successor (2 for the first upgrade, at most
/// [`MAX_GENERATION`]). Its presence means "started by a handoff parent".
pub(crate) const HANDOFF_GENERATION: &str = "HANDOFF_GENERATION";
/// systemd's own `NOTIFY_SOCKET`, carried past the parent's private one.
pub(crate) const HANDOFF_NOTIFY_UPSTREAM: &str = "HANDOFF_NOTIFY_UPSTREAM";
/// For each passed fd (`:`-separated, in `LISTEN_FDS` order): the
/// [`PathId`] of the Unix socket path the service bound for it, or nothing.
/// Lets the last generation unlink a path its predecessor created.
pub(crate) const HANDOFF_SOCKET_PATHS: &str = "HANDOFF_SOCKET_PATHS";
/// The fd of a successor's end of the readiness channel (see `channel.rs`):
/// always the one right after the `LISTEN_FDS` fds.
pub(crate) const HANDOFF_CHANNEL_FD: &str = "HANDOFF_CHANNEL_FD";
/// The fd of a sealed memfd holding the [`LONG_VARS`] that did not fit in
/// the environment: always the one right after the readiness channel. Set
/// only when needed, so a successor with few fds gets plain variables.
pub(crate) const HANDOFF_VARS_FD: &str = "HANDOFF_VARS_FD";

/// The variables that may travel in the [`HANDOFF_VARS_FD`] memfd instead of
/// the environment: the two that grow with the number of fds.
pub(crate) const LONG_VARS: [&str; 2] = [LISTEN_FDNAMES, HANDOFF_SOCKET_PATHS];

/// Every variable this module consumes; all are removed from the environment.
pub(crate) const CONSUMED: [&str; 9] = [
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    NOTIFY_SOCKET,
    HANDOFF_GENERATION,
    HANDOFF_NOTIFY_UPSTREAM,
    HANDOFF_SOCKET_PATHS,
    HANDOFF_CHANNEL_FD,
    HANDOFF_VARS_FD,
];

/// The first inherited fd, as in `sd_listen_fds(3)`.
pub(crate) const LISTEN_FDS_START: RawFd = 3;
/// More inherited fds than this is treated as a malformed `LISTEN_FDS`.
pub(crate) const MAX_FDS: usize = 65_536;
/// The highest `HANDOFF_GENERATION` accepted. Each successor gets
/// `generation + 1`, so a bound far below `u64::MAX` keeps that from
/// overflowing; at one upgrade a second it is still 136 years of upgrades.
pub(crate) const MAX_GENERATION: u64 = u32::MAX as u64;
/// `FDNAME_MAX` in systemd.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// How this process was started.
///
/// ```no_run
/// # fn main() -> Result<(), handoff::Error> {
/// let handoff = handoff::Handoff::builder().build()?;
/// match handoff.start_mode() {
///     handoff::StartMode::Fresh => println!("first generation, binding sockets"),
///     handoff::StartMode::SocketActivated => println!("sockets from systemd"),
///     handoff::StartMode::Successor => println!("generation {}", handoff.generation()),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Started by hand or by a service manager without sockets.
    Fresh,
    /// Started by systemd (or `systemd-socket-activate`) with sockets.
    SocketActivated,
    /// Started by a running `handoff` process as its successor.
    Successor,
}

/// What the environment said, before any fd is taken over.
#[derive(Debug, PartialEq)]
pub(crate) struct StartEnv {
    pub mode: StartMode,
    pub generation: u64,
    /// Inherited fds in order, with their names where the sender gave them.
    pub fds: Vec<(RawFd, Option<String>)>,
    /// For each inherited fd, the socket path the service bound, if any.
    pub path_ids: Vec<Option<PathId>>,
    /// A successor's end of the readiness channel to its parent.
    pub channel: Option<RawFd>,
    /// systemd's notify socket, if the service runs under systemd.
    pub notify_upstream: Option<NotifyAddr>,
}

fn fresh(notify_upstream: Option<NotifyAddr>) -> StartEnv {
    StartEnv {
        mode: StartMode::Fresh,
        generation: 1,
        fds: Vec::new(),
        path_ids: Vec::new(),
        channel: None,
        notify_upstream,
    }
}

/// Parses the variables read through `get`, for the process `pid`; the
/// contents of a [`HANDOFF_VARS_FD`] memfd are read through `read_vars`
/// (once its fd number proved right).
pub(crate) fn parse(
    get: impl Fn(&str) -> Option<OsString>,
    pid: u32,
    read_vars: impl FnOnce(RawFd) -> Result<Vec<u8>, String>,
) -> Result<StartEnv, EnvError> {
    let text = |var: &'static str| -> Result<Option<String>, EnvError> {
        match get(var) {
            None => Ok(None),
            Some(value) => value
                .into_string()
                .map(Some)
                .map_err(|value| EnvError::Invalid {
                    var,
                    value: value.to_string_lossy().into_owned(),
                    reason: "not valid UTF-8".into(),
                }),
        }
    };
    let notify = |var: &'static str| -> Result<Option<NotifyAddr>, EnvError> {
        text(var)?
            .map(|value| {
                NotifyAddr::parse(&value).map_err(|reason| EnvError::Invalid { var, value, reason })
            })
            .transpose()
    };

    if let Some(value) = text(HANDOFF_GENERATION)? {
        let generation = parse_number(HANDOFF_GENERATION, &value)?;
        if generation < 2 {
            return Err(invalid(
                HANDOFF_GENERATION,
                &value,
                "a successor's generation is at least 2",
            ));
        }
        if generation > MAX_GENERATION {
            return Err(invalid(
                HANDOFF_GENERATION,
                &value,
                &format!("a generation is at most {MAX_GENERATION}"),
            ));
        }
        let count = match text(LISTEN_FDS)? {
            None => None,
            Some(count) => {
                let listen_pid = text(LISTEN_PID)?.ok_or_else(|| EnvError::Missing {
                    var: LISTEN_PID,
                    reason: format!("{LISTEN_FDS} is set"),
                })?;
                let target = parse_number(LISTEN_PID, &listen_pid)?;
                if target != u64::from(pid) {
                    return Err(invalid(
                        LISTEN_PID,
                        &listen_pid,
                        &format!("the fds were passed to pid {target}, but this is pid {pid}"),
                    ));
                }
                Some(parse_count(&count)?)
            }
        };
        let passed = count.unwrap_or(0);
        let channel = text(HANDOFF_CHANNEL_FD)?.ok_or_else(|| EnvError::Missing {
            var: HANDOFF_CHANNEL_FD,
            reason: format!("{HANDOFF_GENERATION} is set, so the parent's channel must be too"),
        })?;
        let channel_fd = LISTEN_FDS_START as u64 + passed as u64;
        if parse_number(HANDOFF_CHANNEL_FD, &channel)? != channel_fd {
            return Err(invalid(
                HANDOFF_CHANNEL_FD,
                &channel,
                &format!("the channel follows the {passed} passed fds, at fd {channel_fd}"),
            ));
        }
        // The long variables, from the memfd if the parent sent one.
        let long = match text(HANDOFF_VARS_FD)? {
            None => Vec::new(),
            Some(value) => {
                let expected = channel_fd + 1;
                if parse_number(HANDOFF_VARS_FD, &value)? != expected {
                    return Err(invalid(
                        HANDOFF_VARS_FD,
                        &value,
                        &format!("the memfd follows the channel, at fd {expected}"),
                    ));
                }
                let bytes = read_vars(expected as RawFd)
                    .map_err(|reason| invalid(HANDOFF_VARS_FD, &value, &reason))?;
                let long = parse_vars(&bytes)
                    .map_err(|reason| invalid(HANDOFF_VARS_FD, &value, &reason))?;
                for (var, _) in &long {
                    if get(var).is_some() {
                        return Err(invalid(
                            HANDOFF_VARS_FD,
                            &value,
                            &format!("{var} is both in the memfd and in the environment"),
                        ));
                    }
                }
                long
            }
        };
        // A long variable and where it came from, for the errors.
        let long_text = |var: &'static str| -> Result<Option<(String, &'static str)>, EnvError> {
            match long.iter().find(|(name, _)| *name == var) {
                Some((_, value)) => Ok(Some((value.clone(), " (read from HANDOFF_VARS_FD)"))),
                None => Ok(text(var)?.map(|value| (value, ""))),
            }
        };
        let fds = match count {
            None => Vec::new(),
            Some(count) => {
                let (names, from) =
                    long_text(LISTEN_FDNAMES)?.ok_or_else(|| EnvError::Missing {
                        var: LISTEN_FDNAMES,
                        reason: "a successor's fds must all be named".into(),
                    })?;
                let names = parse_names(&names, count, true).map_err(|e| e.read_from(from))?;
                (0..count)
                    .map(|i| LISTEN_FDS_START + i as RawFd)
                    .zip(names.into_iter().map(Some))
                    .collect()
            }
        };
        let path_ids = match long_text(HANDOFF_SOCKET_PATHS)? {
            Some((value, from)) => {
                parse_path_ids(&value, fds.len()).map_err(|e| e.read_from(from))?
            }
            None => Vec::new(),
        };
        return Ok(StartEnv {
            mode: StartMode::Successor,
            generation,
            fds,
            path_ids,
            channel: Some(channel_fd as RawFd),
            notify_upstream: notify(HANDOFF_NOTIFY_UPSTREAM)?,
        });
    }

    // Socket activation, following sd_listen_fds(3): no LISTEN_PID, or one
    // naming another process, means "not for us"; a malformed one is an error.
    let notify_upstream = notify(NOTIFY_SOCKET)?;
    let Some(listen_pid) = text(LISTEN_PID)? else {
        return Ok(fresh(notify_upstream));
    };
    let target = parse_number(LISTEN_PID, &listen_pid)?;
    if target != u64::from(pid) {
        tracing::debug!(
            listen_pid = target,
            pid,
            "LISTEN_PID names another process; ignoring LISTEN_FDS"
        );
        return Ok(fresh(notify_upstream));
    }
    let Some(count) = text(LISTEN_FDS)? else {
        return Ok(fresh(notify_upstream));
    };
    let count = parse_count(&count)?;
    if count == 0 {
        return Err(invalid(
            LISTEN_FDS,
            "0",
            "socket activation passes at least one fd",
        ));
    }
    let names: Vec<Option<String>> = match text(LISTEN_FDNAMES)? {
        Some(names) => parse_names(&names, count, false)?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None; count],
    };
    Ok(StartEnv {
        mode: StartMode::SocketActivated,
        generation: 1,
        fds: (0..count)
            .map(|i| LISTEN_FDS_START + i as RawFd)
            .zip(names)
            .collect(),
        path_ids: Vec::new(),
        channel: None,
        notify_upstream,
    })
}

/// Values longer than this are cut in errors (`LISTEN_FDNAMES` may hold
/// megabytes).
const MAX_SHOWN: usize = 200;

pub(crate) fn invalid(var: &'static str, value: &str, reason: &str) -> EnvError {
    let value = if value.len() > MAX_SHOWN {
        let mut end = MAX_SHOWN;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &value[..end], value.len())
    } else {
        value.to_owned()
    };
    EnvError::Invalid {
        var,
        value,
        reason: reason.to_owned(),
    }
}

impl EnvError {
    /// Adds where the value came from (`from` is empty for the environment).
    fn read_from(self, from: &str) -> Self {
        match self {
            EnvError::Invalid { var, value, reason } if !from.is_empty() => EnvError::Invalid {
                var,
                value,
                reason: format!("{reason}{from}"),
            },
            other => other,
        }
    }
}

/// A plain decimal number: digits only, no sign, no spaces.
fn parse_number(var: &'static str, value: &str) -> Result<u64, EnvError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(var, value, "not a decimal number"));
    }
    value
        .parse()
        .map_err(|_| invalid(var, value, "number out of range"))
}

fn parse_count(value: &str) -> Result<usize, EnvError> {
    let count = parse_number(LISTEN_FDS, value)?;
    if count > MAX_FDS as u64 {
        return Err(invalid(
            LISTEN_FDS,
            value,
            &format!("more than {MAX_FDS} fds"),
        ));
    }
    Ok(count as usize)
}

/// Splits `LISTEN_FDNAMES`. `strict` (successors) also requires every name to
/// be a valid, unique handoff name; systemd may repeat names or leave them empty.
fn parse_names(value: &str, count: usize, strict: bool) -> Result<Vec<String>, EnvError> {
    let names: Vec<String> = if value.is_empty() && count == 0 {
        Vec::new()
    } else {
        value.split(':').map(str::to_owned).collect()
    };
    if names.len() != count {
        return Err(invalid(
            LISTEN_FDNAMES,
            value,
            &format!("it has {} names but LISTEN_FDS is {count}", names.len()),
        ));
    }
    // Thousands of names: duplicates found through a set, not pairwise.
    let mut seen = std::collections::HashSet::with_capacity(if strict { names.len() } else { 0 });
    for (i, name) in names.iter().enumerate() {
        let problem = if strict {
            name_problem(name)
        } else if name.len() > MAX_NAME_LEN {
            Some("longer than 255 bytes")
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(invalid(
                LISTEN_FDNAMES,
                value,
                &format!("name {i} (\"{}\") is {reason}", Escaped(name)),
            ));
        }
        if strict && !seen.insert(name.as_str()) {
            return Err(invalid(
                LISTEN_FDNAMES,
                value,
                &format!("name \"{}\" appears twice", Escaped(name)),
            ));
        }
    }
    Ok(names)
}

fn parse_path_ids(value: &str, count: usize) -> Result<Vec<Option<PathId>>, EnvError> {
    let fields: Vec<&str> = value.split(':').collect();
    if fields.len() != count {
        return Err(invalid(
            HANDOFF_SOCKET_PATHS,
            value,
            &format!("it has {} fields but LISTEN_FDS is {count}", fields.len()),
        ));
    }
    fields
        .into_iter()
        .map(|field| match field {
            "" => Ok(None),
            id => PathId::parse(id).map(Some).ok_or_else(|| {
                invalid(
                    HANDOFF_SOCKET_PATHS,
                    value,
                    &format!("\"{}\" is not dev,ino,ctime,nsec", Escaped(id)),
                )
            }),
        })
        .collect()
}

/// Why `name` cannot be used as an fd name, or `None` if it can.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 255 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Some("not printable ASCII")
    } else if name.contains(':') {
        Some("using ':', the LISTEN_FDNAMES separator")
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
