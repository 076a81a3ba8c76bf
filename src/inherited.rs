//! What a process inherits at start, taken over once: the fds the
//! environment announced (checked open, marked close-on-exec, then owned)
//! and a successor's end of the readiness channel.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::env::{invalid, parse, StartEnv, HANDOFF_CHANNEL_FD};
use crate::error::EnvError;
use crate::socket::PathId;
use crate::vars_memfd::read_vars_fd;

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
