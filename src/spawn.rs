//! Starting the successor: `fork`, lay out fds at 3.. and the environment,
//! `execve` the binary, and say which setup step failed if one did.
//!
//! Between `fork` and `execve` the child may only make async-signal-safe
//! calls (the parent is multi-threaded), so everything it needs is built
//! before the fork: `argv`, `envp` with a blank `LISTEN_PID=` that the child
//! fills with its own PID, and the fd tables.
//!
//! What `execve` would refuse with `E2BIG` is refused before the fork (see
//! `spawn/exec_limits.rs`). The started process is a [`Child`], watched
//! through its pidfd (see `child.rs`).

mod exec_limits;

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::{fork, pipe2, ForkResult};

use crate::child::Child;
use crate::env::{HANDOFF_VARS_FD, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID};
use crate::error::UpgradeError;
use crate::vars_memfd::vars_memfd;
use exec_limits::{check_sizes, move_long_vars, soft_limit, total_size, ExecLimits};

/// Digits enough for any PID.
const PID_DIGITS: usize = 20;

/// What to start and what to give it.
pub(crate) struct SpawnSpec<'a> {
    /// Absolute path of the binary.
    pub program: &'a Path,
    /// `argv`, including `argv[0]`.
    pub args: &'a [OsString],
    pub cwd: &'a Path,
    /// Fds to place at 3, 4, … with their names.
    pub fds: Vec<(&'a str, BorrowedFd<'a>)>,
    /// One more fd, placed right after `fds` (at `3 + fds.len()`) and not
    /// counted in `LISTEN_FDS`: the successor's end of the readiness channel.
    pub channel: Option<BorrowedFd<'a>>,
    /// Variables to add to (or replace in) this process's environment.
    pub env: Vec<(&'static str, OsString)>,
    /// Variables set to the child's own PID (written in the child, like
    /// `LISTEN_PID`, which is always one when fds are passed).
    pub pid_vars: Vec<&'static str>,
    /// Whether the program reads `HANDOFF_VARS_FD` (a handoff successor,
    /// with a `channel`): then those of `LISTEN_FDNAMES` and
    /// `HANDOFF_SOCKET_PATHS` that do not fit in the environment go into a
    /// sealed memfd, placed after `channel` and not counted in `LISTEN_FDS`.
    /// Otherwise (any program under the supervisor) they must fit.
    pub vars_fd: bool,
    /// Start with `SIGHUP` ignored (a handoff successor installs its own
    /// handler; an arbitrary program under the supervisor must not).
    pub ignore_sighup: bool,
    /// Sent to the child if this process dies (`PR_SET_PDEATHSIG`): the
    /// supervisor's children drain and exit rather than hold the sockets
    /// as orphans. Never for a handoff successor, which outlives its parent.
    pub parent_death_signal: Option<nix::sys::signal::Signal>,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn env_entry(key: &OsStr, value: &OsStr) -> io::Result<CString> {
    let mut entry = key.as_bytes().to_vec();
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    cstring(&entry, "an environment variable")
}

/// What the child's setup was doing when it failed (sent with errno).
const STEP_FDS: i32 = 1;
const STEP_CHDIR: i32 = 2;
const STEP_EXEC: i32 = 3;

/// Everything the child needs, built before the fork.
struct Prepared {
    program: CString,
    cwd: CString,
    _args: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` and the other `pid_vars`, each followed by room for
    /// the digits and a NUL.
    pid_entries: Vec<Vec<u8>>,
    envp: Vec<*const libc::c_char>,
    sources: Vec<RawFd>,
    scratch: Vec<RawFd>,
    /// The `HANDOFF_VARS_FD` memfd, open until the child has its copy.
    _vars: Option<OwnedFd>,
    ignore_sighup: bool,
    parent_death_signal: libc::c_int,
    /// This process's PID, to tell in the child whether it already died.
    parent: libc::pid_t,
}

fn prepare(spec: &SpawnSpec<'_>) -> Result<Prepared, UpgradeError> {
    prepare_with(spec, ExecLimits::of_this_process())
}

fn prepare_with(spec: &SpawnSpec<'_>, limits: ExecLimits) -> Result<Prepared, UpgradeError> {
    let invalid = |e| UpgradeError::io("cannot prepare the new process", e);
    let program =
        cstring(spec.program.as_os_str().as_bytes(), "the program path").map_err(invalid)?;
    let cwd = cstring(spec.cwd.as_os_str().as_bytes(), "the working directory").map_err(invalid)?;
    let args = spec
        .args
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<io::Result<Vec<_>>>()
        .map_err(invalid)?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());

    let mut extra = spec.env.clone();
    let passing = !spec.fds.is_empty();
    if passing {
        let names: Vec<&str> = spec.fds.iter().map(|(name, _)| *name).collect();
        extra.push((LISTEN_FDS, spec.fds.len().to_string().into()));
        extra.push((LISTEN_FDNAMES, names.join(":").into()));
    }
    let mut pid_vars = spec.pid_vars.clone();
    if passing {
        pid_vars.push(LISTEN_PID);
    }
    let replaced = |key: &OsStr| {
        key == LISTEN_PID
            || key == HANDOFF_VARS_FD
            || pid_vars.iter().any(|k| OsStr::new(k) == key)
            || extra.iter().any(|(k, _)| OsStr::new(k) == key)
    };
    let inherited: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(key, _)| !replaced(key))
        .collect();
    let moved = move_long_vars(spec, &inherited, &mut extra, &pid_vars, limits);
    let vars = if moved.is_empty() {
        None
    } else {
        let fd = LISTEN_FDS_START as usize + spec.fds.len() + usize::from(spec.channel.is_some());
        extra.push((HANDOFF_VARS_FD, fd.to_string().into()));
        Some(vars_memfd(&moved).map_err(|e| {
            UpgradeError::io(
                format!(
                    "cannot create the memfd for {} (too long for the environment)",
                    moved
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                e,
            )
        })?)
    };
    let total = total_size(spec, &inherited, &extra, &pid_vars);
    check_sizes(spec, &inherited, &extra, total, limits)?;

    let mut env = Vec::new();
    for (key, value) in &inherited {
        env.push(env_entry(key, value).map_err(invalid)?);
    }
    for (key, value) in &extra {
        env.push(env_entry(OsStr::new(key), value).map_err(invalid)?);
    }
    let pid_entries: Vec<Vec<u8>> = pid_vars
        .iter()
        .map(|var| {
            let mut entry = format!("{var}=").into_bytes();
            entry.resize(entry.len() + PID_DIGITS + 1, 0);
            entry
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.extend(
        pid_entries
            .iter()
            .map(|e| e.as_ptr().cast::<libc::c_char>()),
    );
    envp.push(std::ptr::null());

    let mut sources: Vec<RawFd> = spec.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    sources.extend(spec.channel.map(|fd| fd.as_raw_fd()));
    sources.extend(vars.as_ref().map(|fd| fd.as_raw_fd()));
    let scratch = vec![-1; sources.len()];
    Ok(Prepared {
        program,
        cwd,
        _args: args,
        argv,
        _env: env,
        pid_entries,
        envp,
        sources,
        scratch,
        _vars: vars,
        ignore_sighup: spec.ignore_sighup,
        parent_death_signal: spec.parent_death_signal.map_or(0, |s| s as libc::c_int),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
    })
}

/// Runs in the child between `fork` and `execve`. Only async-signal-safe
/// calls; no allocation. On failure, writes the step (`STEP_*`) and errno
/// to `err_fd` and exits 127.
///
/// # Safety
/// Must only be called in the child right after `fork`, with `p` built by
/// [`prepare`] and `err_fd` the write end of a close-on-exec pipe.
unsafe fn exec_child(p: &mut Prepared, err_fd: RawFd) -> ! {
    let count = p.sources.len() as RawFd;
    let first_free = LISTEN_FDS_START + count;
    // Keep the error pipe out of the way of fds 3..3+count.
    let err_fd = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, first_free);
    let fail = |fd: RawFd, step: i32| -> ! {
        let errno = *libc::__errno_location();
        if fd >= 0 {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&step.to_ne_bytes());
            bytes[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        }
        libc::_exit(127)
    };
    if err_fd < 0 {
        fail(-1, STEP_FDS);
    }
    // Own process group, so a failed upgrade can kill everything it started.
    libc::setpgid(0, 0);
    // A clean signal state: nothing blocked, SIGPIPE back to its default (the
    // Rust runtime ignores it), and SIGHUP ignored until the new process
    // installs its own handler, so an early SIGHUP cannot kill it.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    if p.ignore_sighup {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    if p.parent_death_signal != 0 {
        // The signal comes when the thread that forked exits: the
        // supervisor forks from its one runtime thread, which lives as
        // long as it does. A parent that died before this call is caught
        // by the check after it.
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            p.parent_death_signal as libc::c_ulong,
        );
        if libc::getppid() != p.parent {
            libc::_exit(1);
        }
    }

    // LISTEN_PID and the other PID variables: this process's PID, written
    // into the pre-built entries (each `NAME=` and room for the digits).
    let mut pid = libc::getpid() as u64;
    let mut digits = [0u8; PID_DIGITS];
    let mut n = 0;
    loop {
        digits[PID_DIGITS - 1 - n] = b'0' + (pid % 10) as u8;
        n += 1;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    for entry in p.pid_entries.iter_mut() {
        let start = entry.len() - PID_DIGITS - 1;
        entry[start..start + n].copy_from_slice(&digits[PID_DIGITS - n..]);
        entry[start + n] = 0;
    }

    if count > 0 {
        // Placed in order, 3 first, a source is overwritten before it is
        // read only if it sits inside the range below its own target: copy
        // those above the range first. The rest are placed directly, so a
        // successor passing on the fds it inherited at 3.. needs no second
        // copy of them (with thousands of fds, the fd limit would not do).
        for (i, &src) in p.sources.iter().enumerate() {
            p.scratch[i] = src;
            if (LISTEN_FDS_START..LISTEN_FDS_START + i as RawFd).contains(&src) {
                let tmp = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free);
                if tmp < 0 {
                    fail(err_fd, STEP_FDS);
                }
                p.scratch[i] = tmp;
            }
        }
        for (i, &src) in p.scratch.iter().enumerate() {
            let target = LISTEN_FDS_START + i as RawFd;
            // dup2 leaves the new fd without FD_CLOEXEC: it survives execve.
            // Onto itself it is a no-op that keeps the flag: clear it then.
            let placed = if src == target {
                libc::fcntl(src, libc::F_SETFD, 0)
            } else {
                libc::dup2(src, target)
            };
            if placed < 0 {
                fail(err_fd, STEP_FDS);
            }
        }
    }
    // Anything else above the handed-over fds must not reach the successor,
    // even an fd some other code opened without O_CLOEXEC. Old kernels lack
    // close_range; every fd this crate opens is close-on-exec anyway.
    libc::syscall(
        libc::SYS_close_range,
        first_free as libc::c_uint,
        libc::c_uint::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    );
    if libc::chdir(p.cwd.as_ptr()) < 0 {
        fail(err_fd, STEP_CHDIR);
    }
    libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
    fail(err_fd, STEP_EXEC)
}

/// Starts the successor and returns once `execve` succeeded. Needs a tokio runtime.
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> Result<Child, UpgradeError> {
    let mut prepared = prepare(spec)?;
    let (err_read, err_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| UpgradeError::io("cannot create a pipe", e.into()))?;
    // SAFETY: the child runs only exec_child, which makes async-signal-safe
    // calls on memory prepared before the fork, then execs or exits.
    let pid = match unsafe { fork() } {
        Ok(ForkResult::Child) => unsafe { exec_child(&mut prepared, err_write.as_raw_fd()) },
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(UpgradeError::io("cannot fork", e.into())),
    };
    drop(err_write);
    // The child calls setpgid itself too; whichever runs first wins, and
    // from here on the group exists, so a rollback can always kill it. (After
    // the child's execve this fails with EACCES: it already did it.)
    let _ = nix::unistd::setpgid(pid, pid);
    // The pidfd before anything that can fail: from here on every error path
    // kills the group and reaps the child (off this thread: see `Child`'s
    // `Drop`).
    let child = Child::new(pid)?;

    // The pipe closes on a successful execve; otherwise it carries errno.
    let mut buf = Vec::new();
    let mut reader = std::fs::File::from(err_read);
    reader
        .read_to_end(&mut buf)
        .map_err(|e| UpgradeError::io("cannot read the exec status pipe", e))?;
    if let Ok(bytes) = <[u8; 8]>::try_from(buf.as_slice()) {
        let step = i32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"));
        let errno = i32::from_ne_bytes(bytes[4..].try_into().expect("4 bytes"));
        return Err(child_error(spec, prepared.sources.len(), step, errno));
    }
    Ok(child)
}

/// What the child's failed setup step means, for the operator.
fn child_error(spec: &SpawnSpec<'_>, fds: usize, step: i32, errno: i32) -> UpgradeError {
    let source = io::Error::from_raw_os_error(errno);
    let program = spec.program.to_path_buf();
    match (step, errno) {
        (STEP_EXEC, libc::ENOENT) => UpgradeError::BinaryMissing { program },
        (STEP_EXEC, libc::E2BIG) => UpgradeError::ExecTooLarge { program },
        (STEP_EXEC, _) => UpgradeError::NotExecutable {
            program,
            source: std::sync::Arc::new(source),
        },
        (STEP_CHDIR, _) => UpgradeError::io(
            format!(
                "the new process cannot enter the working directory {}",
                spec.cwd.display()
            ),
            source,
        ),
        _ => {
            let limit = soft_limit(|limit| {
                // SAFETY: getrlimit writes one rlimit into the struct it is given.
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, limit) }
            })
            .map_or_else(|| "unknown".to_owned(), |soft| soft.to_string());
            UpgradeError::io(
                format!("cannot place the {fds} fds for the new process at fd 3 and up (RLIMIT_NOFILE is {limit})"),
                source,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec for `/bin/true` passing the same fd under each of `names`.
    pub(super) fn spec<'a>(
        args: &'a [OsString],
        names: &'a [String],
        fd: BorrowedFd<'a>,
        vars_fd: bool,
    ) -> SpawnSpec<'a> {
        SpawnSpec {
            program: Path::new("/bin/true"),
            args,
            cwd: Path::new("/"),
            fds: names.iter().map(|name| (name.as_str(), fd)).collect(),
            channel: Some(fd),
            env: Vec::new(),
            pid_vars: Vec::new(),
            vars_fd,
            ignore_sighup: false,
            parent_death_signal: None,
        }
    }

    #[test]
    fn a_failed_setup_step_says_which() {
        let stdin = std::io::stdin();
        let args = vec![OsString::from("true")];
        let spec = spec(&args, &[], std::os::fd::AsFd::as_fd(&stdin), true);
        let too_large = child_error(&spec, 1, STEP_EXEC, libc::E2BIG).to_string();
        assert!(
            too_large.contains("E2BIG") && too_large.contains("too large"),
            "{too_large}"
        );
        assert!(!too_large.contains("cannot be executed"), "{too_large}");
        let fds = child_error(&spec, 14_500, STEP_FDS, libc::EMFILE).to_string();
        assert!(
            fds.contains("14500 fds") && fds.contains("RLIMIT_NOFILE") && !fds.contains("executed"),
            "{fds}"
        );
        let cwd = child_error(&spec, 1, STEP_CHDIR, libc::ENOENT).to_string();
        assert!(cwd.contains("working directory /"), "{cwd}");
        assert!(matches!(
            child_error(&spec, 1, STEP_EXEC, libc::ENOENT),
            UpgradeError::BinaryMissing { .. }
        ));
        assert!(matches!(
            child_error(&spec, 1, STEP_EXEC, libc::EACCES),
            UpgradeError::NotExecutable { .. }
        ));
    }
}
