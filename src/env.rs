//! Reading and scrubbing the variables a process is started with.
//!
//! The wire format is systemd's socket-activation protocol (`LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`, fds from 3 on) plus `HANDOFF_*` variables
//! for what systemd does not carry. Parsing is strict: a value that is not
//! exactly what the protocol allows is an error that names the variable.
//! Every variable read here is removed from the process environment before
//! `main` (see `early.rs`), so the application's own subprocesses inherit
//! none of them.
//!
//! Linux takes at most 128 KiB in one environment string (`MAX_ARG_STRLEN`),
//! which `LISTEN_FDNAMES` passes at a few thousand names. A predecessor then
//! sends the [`LONG_VARS`] that do not fit in a sealed memfd instead,
//! announced by [`HANDOFF_VARS_FD`] (see [`vars_memfd`] for the format); the
//! successor reads it as if the variables were in its environment.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::error::EnvError;
use crate::escape::Escaped;
use crate::notify::NotifyAddr;
use crate::socket::PathId;

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
/// The most bytes a successor reads from [`HANDOFF_VARS_FD`]: room for
/// [`MAX_FDS`] names of [`MAX_NAME_LEN`] bytes and as many socket path
/// identities (at most 83 bytes each), with some to spare.
pub(crate) const MAX_VARS_LEN: usize = 32 << 20;

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
const MAX_FDS: usize = 65_536;
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

/// An inherited fd, owned, with the name it arrived under.
#[derive(Debug)]
pub(crate) struct InheritedFd {
    pub fd: OwnedFd,
    pub name: Option<String>,
    /// The socket path the service bound for it (from a predecessor).
    pub path_id: Option<PathId>,
}

/// What a process takes over at start: the parsed variables, the inherited
/// fds, and a successor's end of the readiness channel.
pub(crate) type Taken = (StartEnv, Vec<InheritedFd>, Option<OwnedFd>);

/// Serialises takers so an fd is never wrapped in two `OwnedFd`s.
static TAKEN: Mutex<bool> = Mutex::new(false);

/// Reads, validates and removes the handoff variables, and takes ownership of
/// the inherited fds. Returns `None` if an earlier call already did.
pub(crate) fn take_from_process() -> Option<Result<Taken, EnvError>> {
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Read and removed before `main` (see early.rs).
    let values = crate::early::take();
    if *taken {
        return None;
    }
    *taken = true;
    let get = |name: &str| {
        values
            .iter()
            .find(|(var, _)| *var == name)
            .and_then(|(_, value)| value.clone())
    };
    let result = parse(get, std::process::id(), read_vars_fd).and_then(|env| {
        let fds = claim_fds(&env)?;
        let channel = env.channel.map(claim_channel).transpose()?;
        Ok((env, fds, channel))
    });
    Some(result)
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

fn invalid(var: &'static str, value: &str, reason: &str) -> EnvError {
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

/// A sealed memfd holding `vars` for a successor's [`HANDOFF_VARS_FD`]: each
/// as `NAME=value` followed by a NUL byte, as in an `envp` block. Sealed
/// against any change, so what the successor reads is what was written.
pub(crate) fn vars_memfd(vars: &[(&str, OsString)]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let mut bytes = Vec::new();
    for (name, value) in vars {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(b'=');
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    let fd = memfd_create(
        c"handoff-vars",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let file = std::fs::File::from(fd);
    file.write_all_at(&bytes, 0)?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file.into())
}

/// Takes over the [`HANDOFF_VARS_FD`] memfd at `fd`, reads it whole and
/// closes it. It must be a memfd sealed against writing, growing and
/// shrinking, of at most [`MAX_VARS_LEN`] bytes.
fn read_vars_fd(fd: RawFd) -> Result<Vec<u8>, String> {
    // SAFETY: stat is plain data, for which all zeroes is a value; fstat
    // only writes it (EBADF if the fd is not open).
    let open = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut stat)
    } == 0;
    if !open {
        let error = std::io::Error::last_os_error();
        return Err(format!("fd {fd} is not open: {error}"));
    }
    // SAFETY: the environment hands this fd to us and it is open (checked);
    // take_from_process runs once per process, so nothing else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    read_vars(&file).map_err(|reason| format!("fd {fd} {reason}"))
}

/// Reads a sealed memfd whole (see [`read_vars_fd`]); the error completes
/// "fd N ...".
pub(crate) fn read_vars(file: &std::fs::File) -> Result<Vec<u8>, String> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be inspected: {e}"))?;
    if !meta.file_type().is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        let kind = if kind.is_socket() {
            "socket"
        } else if kind.is_fifo() {
            "pipe"
        } else if kind.is_dir() {
            "directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "device"
        } else {
            "file of another kind"
        };
        return Err(format!("is not a memfd but a {kind}"));
    }
    let needed = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    match fcntl(file.as_fd(), FcntlArg::F_GET_SEALS) {
        Ok(seals) if SealFlag::from_bits_truncate(seals).contains(needed) => {}
        Ok(_) => return Err("is a memfd that is not sealed against changes".into()),
        Err(e) => return Err(format!("is not a sealed memfd (F_GET_SEALS: {e})")),
    }
    let len = meta.len();
    if len > MAX_VARS_LEN as u64 {
        return Err(format!("holds {len} bytes, more than {MAX_VARS_LEN}"));
    }
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| format!("cannot be read: {e}"))?;
    Ok(bytes)
}

/// Splits the memfd's `NAME=value\0` entries; only [`LONG_VARS`], each once.
fn parse_vars(bytes: &[u8]) -> Result<Vec<(&'static str, String)>, String> {
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err(if bytes.is_empty() {
            "the memfd is empty".into()
        } else {
            "the memfd's last entry does not end with a NUL byte".into()
        });
    };
    let mut vars: Vec<(&'static str, String)> = Vec::new();
    for entry in body.split(|&b| b == 0) {
        let shown = || Escaped(&String::from_utf8_lossy(&entry[..entry.len().min(40)])).to_string();
        let (name, value) = entry
            .iter()
            .position(|&b| b == b'=')
            .map(|eq| (&entry[..eq], &entry[eq + 1..]))
            .ok_or_else(|| format!("the memfd holds \"{}\", which is not NAME=value", shown()))?;
        let var = LONG_VARS
            .into_iter()
            .find(|var| var.as_bytes() == name)
            .ok_or_else(|| {
                format!(
                    "the memfd holds \"{}\"; only {} may be there",
                    shown(),
                    LONG_VARS.join(" and ")
                )
            })?;
        if vars.iter().any(|(seen, _)| *seen == var) {
            return Err(format!("the memfd holds {var} twice"));
        }
        let value = OsStr::from_bytes(value)
            .to_str()
            .ok_or_else(|| format!("the memfd's {var} is not valid UTF-8"))?;
        vars.push((var, value.to_owned()));
    }
    Ok(vars)
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

/// Takes over the readiness channel's fd, once it proved to be what it
/// claims: an open `AF_UNIX` `SOCK_SEQPACKET` socket. It is marked
/// close-on-exec, so none of this process's own subprocesses inherits it.
fn claim_channel(fd: RawFd) -> Result<OwnedFd, EnvError> {
    let wrong = |reason: String| invalid(HANDOFF_CHANNEL_FD, &fd.to_string(), &reason);
    // SAFETY: F_SETFD only sets the fd's flags; EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(wrong(format!(
            "fd {fd} is not open: {}",
            std::io::Error::last_os_error()
        )));
    }
    let int_opt = |option: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are live and sized for an int option.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value)
    };
    match (int_opt(libc::SO_DOMAIN), int_opt(libc::SO_TYPE)) {
        (Ok(libc::AF_UNIX), Ok(libc::SOCK_SEQPACKET)) => {}
        (Err(e), _) | (_, Err(e)) => {
            return Err(wrong(format!("fd {fd} is not a socket: {e}")));
        }
        _ => return Err(wrong(format!("fd {fd} is not a Unix seqpacket socket"))),
    }
    // SAFETY: the environment hands this fd to us; it is open (checked) and
    // taken once (take_from_process runs once per process).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Marks the fds `first..=last` close-on-exec: one `close_range` call, or
/// (kernels before 5.11) one `fcntl` per fd. Fds in the range that are not
/// open are skipped.
pub(crate) fn mark_cloexec(first: RawFd, last: RawFd) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets FD_CLOEXEC on
    // the fds in the range, which the caller says are ours.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if !marked {
        for fd in first..=last {
            // SAFETY: F_SETFD only sets the fd's flags; EBADF if not open.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Checks every announced fd is open, marks it close-on-exec and takes it over.
/// Two system calls however many fds there are (a server may inherit
/// thousands): one `poll` reports fds that are not open (`POLLNVAL`), one
/// `close_range(CLOSE_RANGE_CLOEXEC)` marks the whole range.
fn claim_fds(env: &StartEnv) -> Result<Vec<InheritedFd>, EnvError> {
    let (Some(&(first, _)), Some(&(last, _))) = (env.fds.first(), env.fds.last()) else {
        return Ok(Vec::new());
    };
    let mut polls: Vec<libc::pollfd> = env
        .fds
        .iter()
        .map(|&(fd, _)| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        })
        .collect();
    // SAFETY: polls is a valid array of polls.len() pollfds; timeout 0 means
    // poll only reports and never blocks.
    let polled = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
    if polled < 0 {
        // Cannot tell in one call (EINTR, ENOMEM): ask fd by fd.
        for poll in &mut polls {
            // SAFETY: F_GETFD only reads the fd's flags; EBADF if not open.
            if unsafe { libc::fcntl(poll.fd, libc::F_GETFD) } < 0 {
                poll.revents = libc::POLLNVAL;
            }
        }
    }
    if let Some(closed) = polls.iter().find(|p| p.revents & libc::POLLNVAL != 0) {
        return Err(EnvError::FdNotOpen {
            count: env.fds.len(),
            fd: closed.fd,
        });
    }
    // The range holds exactly the fds announced to us (fds are 3, 4, …).
    mark_cloexec(first, last);
    Ok(env
        .fds
        .iter()
        .enumerate()
        .map(|(i, (fd, name))| InheritedFd {
            // SAFETY: the fd is open (checked above), and the LISTEN_FDS
            // protocol hands fds 3.. to this process: nothing else in it owns
            // them, and TAKEN makes sure this happens at most once.
            fd: unsafe { OwnedFd::from_raw_fd(*fd) },
            name: name.clone(),
            path_id: env.path_ids.get(i).copied().flatten(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vars: &[(&str, &str)], pid: u32) -> Result<StartEnv, EnvError> {
        run_with_memfd(vars, pid, |fd| {
            panic!("no memfd in this test, yet fd {fd} was read")
        })
    }

    /// [`run`], with `memfd` reading the `HANDOFF_VARS_FD` memfd.
    fn run_with_memfd(
        vars: &[(&str, &str)],
        pid: u32,
        memfd: impl FnOnce(RawFd) -> Result<Vec<u8>, String>,
    ) -> Result<StartEnv, EnvError> {
        parse(
            |name| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, value)| OsString::from(value))
            },
            pid,
            memfd,
        )
    }

    fn err(vars: &[(&str, &str)]) -> String {
        run(vars, 100).expect_err("must be rejected").to_string()
    }

    const GOOD: [(&str, &str); 5] = [
        ("HANDOFF_GENERATION", "3"),
        ("HANDOFF_CHANNEL_FD", "5"),
        ("LISTEN_PID", "100"),
        ("LISTEN_FDS", "2"),
        ("LISTEN_FDNAMES", "http:admin"),
    ];

    /// The good successor environment with `var` set to `value`.
    fn with<'a>(var: &'a str, value: &str) -> Vec<(&'a str, String)> {
        let mut vars: Vec<(&str, String)> = GOOD
            .iter()
            .filter(|(k, _)| *k != var)
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect();
        vars.push((var, value.to_owned()));
        vars
    }

    fn err_with(var: &str, value: &str) -> String {
        let vars = with(var, value);
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        err(&refs)
    }

    #[test]
    fn successor_is_parsed() {
        let env = run(&GOOD, 100).unwrap();
        assert_eq!(env.mode, StartMode::Successor);
        assert_eq!(env.generation, 3);
        assert_eq!(
            env.fds,
            vec![(3, Some("http".to_owned())), (4, Some("admin".to_owned()))]
        );
        assert_eq!(env.channel, Some(5));
    }

    #[test]
    fn socket_path_identities_follow_the_fds() {
        let vars = with("HANDOFF_SOCKET_PATHS", "2049,77,1700000000,5:");
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let env = run(&refs, 100).unwrap();
        assert_eq!(env.path_ids.len(), 2);
        assert_eq!(
            env.path_ids[0].map(|id| id.to_string()).as_deref(),
            Some("2049,77,1700000000,5")
        );
        assert_eq!(env.path_ids[1], None);
    }

    #[test]
    fn nothing_set_is_fresh() {
        let env = run(&[], 100).unwrap();
        assert_eq!(env.mode, StartMode::Fresh);
        assert_eq!(env.generation, 1);
        assert!(env.fds.is_empty());
    }

    #[test]
    fn garbage_in_each_variable_names_it() {
        for (var, value) in [
            ("HANDOFF_GENERATION", "two"),
            ("HANDOFF_GENERATION", "1"),
            ("HANDOFF_GENERATION", "-4"),
            ("HANDOFF_GENERATION", "99999999999999999999999"),
            ("LISTEN_PID", "abc"),
            ("LISTEN_PID", "101"),
            ("LISTEN_FDS", "2x"),
            ("LISTEN_FDS", " 2"),
            ("LISTEN_FDS", "100000000"),
            ("LISTEN_FDNAMES", "http"),
            ("LISTEN_FDNAMES", "http:admin:extra"),
            ("LISTEN_FDNAMES", "http:http"),
            ("LISTEN_FDNAMES", "http:"),
            ("LISTEN_FDNAMES", "http:bad\u{7}name"),
            ("HANDOFF_CHANNEL_FD", "4"),
            ("HANDOFF_CHANNEL_FD", "x"),
            ("HANDOFF_NOTIFY_UPSTREAM", "relative/path"),
            ("HANDOFF_SOCKET_PATHS", "1,2,3,4"),
            ("HANDOFF_SOCKET_PATHS", "1,2,3:"),
            ("HANDOFF_SOCKET_PATHS", "1,2,3,4,5:"),
            ("HANDOFF_SOCKET_PATHS", "a,b,c,d:"),
        ] {
            let message = err_with(var, value);
            assert!(message.contains(var), "{var}={value:?}: {message}");
        }
    }

    #[test]
    fn a_generation_above_the_bound_is_refused() {
        let vars = with("HANDOFF_GENERATION", &MAX_GENERATION.to_string());
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(run(&refs, 100).unwrap().generation, MAX_GENERATION);
        for value in [
            (MAX_GENERATION + 1).to_string(),
            u64::MAX.to_string(),
            (u64::MAX - 1).to_string(),
        ] {
            let message = err_with("HANDOFF_GENERATION", &value);
            assert!(message.contains("HANDOFF_GENERATION"), "{value}: {message}");
            assert!(
                message.contains(&MAX_GENERATION.to_string()),
                "{value}: {message}"
            );
        }
    }

    #[test]
    fn successor_requires_its_companions() {
        for missing in ["HANDOFF_CHANNEL_FD", "LISTEN_PID", "LISTEN_FDNAMES"] {
            let vars: Vec<(&str, &str)> = GOOD
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let message = err(&vars);
            assert!(message.contains(missing), "{missing}: {message}");
        }
    }

    #[test]
    fn activation_follows_sd_listen_fds() {
        let env = run(&[("LISTEN_PID", "100"), ("LISTEN_FDS", "2")], 100).unwrap();
        assert_eq!(env.mode, StartMode::SocketActivated);
        assert_eq!(env.fds, vec![(3, None), (4, None)]);
        // Another process's fds are not ours: ignored, not an error.
        let env = run(&[("LISTEN_PID", "7"), ("LISTEN_FDS", "2")], 100).unwrap();
        assert_eq!(env.mode, StartMode::Fresh);
        // No LISTEN_PID at all: ignored, as sd_listen_fds does.
        let env = run(&[("LISTEN_FDS", "2")], 100).unwrap();
        assert!(env.fds.is_empty());
        // systemd may repeat names (one socket unit, several ListenStream=).
        let env = run(
            &[
                ("LISTEN_PID", "100"),
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", "web:web"),
            ],
            100,
        )
        .unwrap();
        assert_eq!(env.fds.len(), 2);
        for (vars, var) in [
            (
                &[("LISTEN_PID", "x1"), ("LISTEN_FDS", "1")][..],
                "LISTEN_PID",
            ),
            (
                &[("LISTEN_PID", "100"), ("LISTEN_FDS", "0")][..],
                "LISTEN_FDS",
            ),
            (
                &[("LISTEN_PID", "100"), ("LISTEN_FDS", "one")][..],
                "LISTEN_FDS",
            ),
            (
                &[
                    ("LISTEN_PID", "100"),
                    ("LISTEN_FDS", "1"),
                    ("LISTEN_FDNAMES", "a:b"),
                ][..],
                "LISTEN_FDNAMES",
            ),
        ] {
            let message = err(vars);
            assert!(message.contains(var), "{vars:?}: {message}");
        }
    }

    #[test]
    fn a_bad_inherited_name_cannot_break_the_error_line() {
        let message = err_with("LISTEN_FDNAMES", "http:x\nERROR forged\u{1b}[2K");
        assert!(message.contains("LISTEN_FDNAMES"), "{message}");
        assert!(!message.chars().any(char::is_control), "{message}");
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(name_problem("http"), None);
        assert!(name_problem("").is_some());
        assert!(name_problem("a:b").is_some());
        assert!(name_problem(&"x".repeat(256)).is_some());
        assert!(name_problem("tab\there").is_some());
    }

    /// The good successor environment with the long variables in a memfd
    /// (read through `memfd`) instead of `LISTEN_FDNAMES`.
    fn run_memfd(
        vars: &[(&str, &str)],
        memfd: impl FnOnce(RawFd) -> Result<Vec<u8>, String>,
    ) -> Result<StartEnv, EnvError> {
        let mut all: Vec<(&str, &str)> = GOOD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "LISTEN_FDNAMES")
            .collect();
        all.push(("HANDOFF_VARS_FD", "6"));
        for &(var, value) in vars {
            all.retain(|(k, _)| *k != var);
            all.push((var, value));
        }
        run_with_memfd(&all, 100, memfd)
    }

    #[test]
    fn long_variables_are_read_from_the_memfd_after_the_channel() {
        let env = run_memfd(&[], |fd| {
            assert_eq!(fd, 6, "the memfd follows the channel (fd 5)");
            Ok(b"LISTEN_FDNAMES=http:admin\0HANDOFF_SOCKET_PATHS=:2049,77,1700000000,5\0".to_vec())
        })
        .unwrap();
        assert_eq!(
            env.fds,
            vec![(3, Some("http".to_owned())), (4, Some("admin".to_owned()))]
        );
        assert_eq!(env.path_ids[0], None);
        assert_eq!(
            env.path_ids[1].map(|id| id.to_string()).as_deref(),
            Some("2049,77,1700000000,5")
        );
        assert_eq!(env.channel, Some(5));
    }

    #[test]
    fn a_bad_memfd_or_its_announcement_is_an_error_naming_it() {
        let never = |fd: RawFd| -> Result<Vec<u8>, String> { panic!("fd {fd} must not be read") };
        for value in ["5", "7", "x", ""] {
            let message = run_memfd(&[("HANDOFF_VARS_FD", value)], never)
                .expect_err(value)
                .to_string();
            assert!(message.contains("HANDOFF_VARS_FD"), "{value:?}: {message}");
        }
        let refused = |reason: &str| {
            let reason = reason.to_owned();
            run_memfd(&[], move |_| Err(reason))
                .expect_err("must be rejected")
                .to_string()
        };
        let message = refused("fd 6 is not a memfd but a pipe");
        assert!(
            message.contains("HANDOFF_VARS_FD") && message.contains("not a memfd but a pipe"),
            "{message}"
        );
        for (content, why) in [
            (&b""[..], "empty"),
            (b"LISTEN_FDNAMES=http:admin", "NUL"),
            (b"LISTEN_FDNAMES=http:admin\0LISTEN_FDNAMES=a:b\0", "twice"),
            (
                b"LISTEN_FDS=2\0",
                "only LISTEN_FDNAMES and HANDOFF_SOCKET_PATHS",
            ),
            (
                b"PATH=/bin\0",
                "only LISTEN_FDNAMES and HANDOFF_SOCKET_PATHS",
            ),
            (b"LISTEN_FDNAMES\0", "not NAME=value"),
            (b"LISTEN_FDNAMES=http:\xff\0", "UTF-8"),
        ] {
            let content = content.to_vec();
            let message = run_memfd(&[], move |_| Ok(content))
                .expect_err(why)
                .to_string();
            assert!(
                message.contains("HANDOFF_VARS_FD") && message.contains(why),
                "{why}: {message}"
            );
        }
        // In both places: which one counts would be a guess.
        let message = run_memfd(&[("LISTEN_FDNAMES", "http:admin")], |_| {
            Ok(b"LISTEN_FDNAMES=http:admin\0".to_vec())
        })
        .expect_err("twice")
        .to_string();
        assert!(
            message.contains("HANDOFF_VARS_FD") && message.contains("both"),
            "{message}"
        );
        // Wrong content inside a variable names it, and where it came from.
        for (content, var) in [
            (&b"LISTEN_FDNAMES=http\0"[..], "LISTEN_FDNAMES"),
            (b"LISTEN_FDNAMES=http:http\0", "LISTEN_FDNAMES"),
            (
                b"LISTEN_FDNAMES=http:admin\0HANDOFF_SOCKET_PATHS=1,2,3\0",
                "HANDOFF_SOCKET_PATHS",
            ),
        ] {
            let content = content.to_vec();
            let message = run_memfd(&[], move |_| Ok(content))
                .expect_err(var)
                .to_string();
            assert!(
                message.contains(var) && message.contains("read from HANDOFF_VARS_FD"),
                "{var}: {message}"
            );
        }
        // Without LISTEN_FDNAMES anywhere the successor's fds have no names.
        let message = run_memfd(&[], |_| Ok(b"HANDOFF_SOCKET_PATHS=:\0".to_vec()))
            .expect_err("no names")
            .to_string();
        assert!(message.contains("LISTEN_FDNAMES is missing"), "{message}");
    }

    #[test]
    fn a_memfd_round_trips_and_only_a_sealed_one_is_read() {
        use std::io::Write;
        let names: Vec<String> = (0..10_000).map(|i| format!("listener-{i:05}")).collect();
        let names = names.join(":");
        let fd = vars_memfd(&[(LISTEN_FDNAMES, names.clone().into())]).unwrap();
        let file = std::fs::File::from(fd);
        let bytes = read_vars(&file).unwrap();
        assert_eq!(parse_vars(&bytes).unwrap(), vec![(LISTEN_FDNAMES, names)]);
        // Sealed: it cannot be changed.
        assert!((&file).write_all(b"x").is_err(), "the memfd takes writes");
        assert!(file.set_len(1).is_err(), "the memfd can be truncated");

        let unsealed = nix::sys::memfd::memfd_create(
            c"handoff-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let message = read_vars(&std::fs::File::from(unsealed)).unwrap_err();
        assert!(message.contains("not sealed"), "{message}");

        let tmp = crate::testutil::TempDir::new("vars-file");
        let plain = std::fs::File::create(tmp.path().join("vars")).unwrap();
        let message = read_vars(&plain).unwrap_err();
        assert!(message.contains("not a sealed memfd"), "{message}");

        let (pipe, _writer) = nix::unistd::pipe().unwrap();
        let message = read_vars(&std::fs::File::from(pipe)).unwrap_err();
        assert!(message.contains("not a memfd but a pipe"), "{message}");

        // Larger than any real one could be: refused unread (sparse, so cheap).
        let huge = nix::sys::memfd::memfd_create(
            c"handoff-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let huge = std::fs::File::from(huge);
        huge.set_len(MAX_VARS_LEN as u64 + 1).unwrap();
        nix::fcntl::fcntl(
            &huge,
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_WRITE,
            ),
        )
        .unwrap();
        let message = read_vars(&huge).unwrap_err();
        assert!(message.contains("more than"), "{message}");
    }

    #[test]
    fn the_memfd_is_closed_once_read() {
        let fd = vars_memfd(&[(LISTEN_FDNAMES, "http".into())]).unwrap();
        let inode = |fd: RawFd| {
            // SAFETY: stat is plain data, for which all zeroes is a value;
            // fstat only writes it (EBADF if the fd is not open).
            unsafe {
                let mut stat: libc::stat = std::mem::zeroed();
                (libc::fstat(fd, &mut stat) == 0).then_some(stat.st_ino)
            }
        };
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let before = inode(raw);
        assert!(before.is_some());
        assert_eq!(read_vars_fd(raw).unwrap(), b"LISTEN_FDNAMES=http\0");
        // Closed (another test thread may have reused the number since).
        assert_ne!(inode(raw), before, "fd {raw} is still the memfd");
        let message = read_vars_fd(-1).unwrap_err();
        assert!(message.contains("not open"), "{message}");
    }

    #[test]
    fn a_long_value_is_cut_in_the_error() {
        let names = vec!["http"; 50_000].join(":");
        let message = err_with("LISTEN_FDNAMES", &names);
        assert!(message.contains("LISTEN_FDNAMES"), "{message}");
        assert!(message.contains("(249999 bytes)"), "{message}");
        assert!(message.len() < 1_000, "{} bytes", message.len());
    }
}
