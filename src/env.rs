//! Reading and scrubbing the variables a process is started with.
//!
//! The wire format is systemd's socket-activation protocol (`LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`, fds from 3 on) plus `HANDOFF_*` variables
//! for what systemd does not carry. Parsing is strict: a value that is not
//! exactly what the protocol allows is an error that names the variable.
//! Every variable read here is removed from the process environment before
//! `main` (see `early.rs`), so the application's own subprocesses inherit
//! none of them.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
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

/// Every variable this module consumes; all are removed from the environment.
pub(crate) const CONSUMED: [&str; 8] = [
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    NOTIFY_SOCKET,
    HANDOFF_GENERATION,
    HANDOFF_NOTIFY_UPSTREAM,
    HANDOFF_SOCKET_PATHS,
    HANDOFF_CHANNEL_FD,
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
    let result = parse(get, std::process::id()).and_then(|env| {
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

/// Parses the variables read through `get`, for the process `pid`.
pub(crate) fn parse(
    get: impl Fn(&str) -> Option<OsString>,
    pid: u32,
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
        let fds = match text(LISTEN_FDS)? {
            None => Vec::new(),
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
                let count = parse_count(&count)?;
                let names = text(LISTEN_FDNAMES)?.ok_or_else(|| EnvError::Missing {
                    var: LISTEN_FDNAMES,
                    reason: "a successor's fds must all be named".into(),
                })?;
                let names = parse_names(&names, count, true)?;
                (0..count)
                    .map(|i| LISTEN_FDS_START + i as RawFd)
                    .zip(names.into_iter().map(Some))
                    .collect()
            }
        };
        let path_ids = match text(HANDOFF_SOCKET_PATHS)? {
            Some(value) => parse_path_ids(&value, fds.len())?,
            None => Vec::new(),
        };
        let channel = text(HANDOFF_CHANNEL_FD)?.ok_or_else(|| EnvError::Missing {
            var: HANDOFF_CHANNEL_FD,
            reason: format!("{HANDOFF_GENERATION} is set, so the parent's channel must be too"),
        })?;
        let expected = LISTEN_FDS_START as u64 + fds.len() as u64;
        if parse_number(HANDOFF_CHANNEL_FD, &channel)? != expected {
            return Err(invalid(
                HANDOFF_CHANNEL_FD,
                &channel,
                &format!(
                    "the channel follows the {} passed fds, at fd {expected}",
                    fds.len()
                ),
            ));
        }
        return Ok(StartEnv {
            mode: StartMode::Successor,
            generation,
            fds,
            path_ids,
            channel: Some(expected as RawFd),
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

fn invalid(var: &'static str, value: &str, reason: &str) -> EnvError {
    EnvError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.to_owned(),
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
        parse(
            |name| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, value)| OsString::from(value))
            },
            pid,
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
}
