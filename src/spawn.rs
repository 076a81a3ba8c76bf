//! Starting the successor: `fork`, lay out fds at 3.. and the environment,
//! `execve` the binary; then watch it through a pidfd, and never leave it a
//! zombie.
//!
//! Between `fork` and `execve` the child may only make async-signal-safe
//! calls (the parent is multi-threaded), so everything it needs is built
//! before the fork: `argv`, `envp` with a blank `LISTEN_PID=` that the child
//! fills with its own PID, and the fd tables.
//!
//! What `execve` would refuse with `E2BIG` is refused before the fork, with
//! what is too big: one string longer than `MAX_ARG_STRLEN` (128 KiB), or
//! all of them over a quarter of `RLIMIT_STACK` (at most 6 MiB). A handoff
//! successor gets the variables that grow with the number of fds
//! (`LISTEN_FDNAMES`, `HANDOFF_SOCKET_PATHS`) in a sealed memfd instead when
//! they do not fit (see `env.rs`), so thousands of listeners still hand over.

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};
use tokio::io::unix::AsyncFd;

use crate::env::{
    vars_memfd, HANDOFF_VARS_FD, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID,
    LONG_VARS,
};
use crate::error::UpgradeError;

/// Digits enough for any PID.
const PID_DIGITS: usize = 20;
/// Room left in the `execve` limit for what the kernel adds itself: a
/// script's `#!` line (up to 256 bytes) and its path (up to `PATH_MAX`).
const EXEC_MARGIN: usize = 8 * 1024;

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

/// A started successor. Dropping it before [`Child::commit`] kills its
/// process group and reaps it.
pub(crate) struct Child {
    pid: Pid,
    pidfd: Option<AsyncFd<OwnedFd>>,
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

/// Linux's limits on what `execve` takes; beyond them it fails with `E2BIG`.
#[derive(Debug, Clone, Copy)]
struct ExecLimits {
    /// One argument or environment string, NUL included (`MAX_ARG_STRLEN`:
    /// 32 pages).
    string: usize,
    /// All strings and their pointers: a quarter of the soft `RLIMIT_STACK`,
    /// at most 6 MiB (¾ of `_STK_LIM`), at least 128 KiB (`ARG_MAX`).
    total: usize,
}

impl ExecLimits {
    fn of_this_process() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(4096);
        let stack = soft_limit(|limit| {
            // SAFETY: getrlimit writes one rlimit into the struct it is given.
            unsafe { libc::getrlimit(libc::RLIMIT_STACK, limit) }
        })
        .unwrap_or(8 << 20);
        let quarter = usize::try_from(stack / 4).unwrap_or(usize::MAX);
        ExecLimits {
            string: 32 * page,
            total: quarter.clamp(128 << 10, 6 << 20),
        }
    }
}

/// The soft limit a `getrlimit` call in `get` reports (`RLIM_INFINITY` is
/// `u64::MAX`).
fn soft_limit(get: impl FnOnce(&mut libc::rlimit) -> libc::c_int) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    (get(&mut limit) == 0).then_some(limit.rlim_cur as u64)
}

/// Bytes of one `NAME=value` entry in `envp`, NUL included.
fn entry_len(key: &str, value: &OsStr) -> usize {
    key.len() + 1 + value.len() + 1
}

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
    let pid_entries_len: usize = pid_vars
        .iter()
        .map(|var| var.len() + 1 + PID_DIGITS + 1)
        .sum();
    // What execve counts: every string with its NUL (the program path too)
    // and a pointer for each; plus what the kernel may add.
    let total = |extra: &[(&'static str, OsString)]| {
        let strings = spec.program.as_os_str().len()
            + 1
            + spec.args.iter().map(|a| a.len() + 1).sum::<usize>()
            + inherited
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
            + extra.iter().map(|(k, v)| entry_len(k, v)).sum::<usize>()
            + pid_entries_len;
        let pointers = spec.args.len() + inherited.len() + extra.len() + pid_vars.len() + 4;
        strings + pointers * std::mem::size_of::<*const libc::c_char>() + EXEC_MARGIN
    };
    // The long variables that do not fit go into the memfd, largest first:
    // each one too long alone, then as many as the total needs (counting
    // the HANDOFF_VARS_FD entry that would announce them).
    let announce = entry_len(HANDOFF_VARS_FD, OsStr::new("65536"))
        + std::mem::size_of::<*const libc::c_char>();
    let mut moved: Vec<(&'static str, OsString)> = Vec::new();
    while let Some((i, len)) = extra
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| spec.vars_fd && LONG_VARS.contains(k))
        .map(|(i, (k, v))| (i, entry_len(k, v)))
        .max_by_key(|&(_, len)| len)
    {
        if len <= limits.string && total(&extra) + announce <= limits.total {
            break;
        }
        moved.push(extra.remove(i));
    }
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
    check_sizes(spec, &inherited, &extra, total(&extra), limits)?;

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

/// Refuses, before the fork, what `execve` would refuse with `E2BIG`: one
/// string too long, or all of them (`total` bytes) too large.
fn check_sizes(
    spec: &SpawnSpec<'_>,
    inherited: &[(OsString, OsString)],
    extra: &[(&'static str, OsString)],
    total: usize,
    limits: ExecLimits,
) -> Result<(), UpgradeError> {
    // Every string with its size and what to call it.
    let mut strings: Vec<(usize, String)> = vec![(
        spec.program.as_os_str().len() + 1,
        format!("the program path {}", spec.program.display()),
    )];
    strings.extend(
        spec.args
            .iter()
            .enumerate()
            .map(|(i, a)| (a.len() + 1, format!("argument {i}"))),
    );
    strings.extend(inherited.iter().map(|(k, v)| {
        (
            k.len() + v.len() + 2,
            format!("environment variable {}", k.to_string_lossy()),
        )
    }));
    strings.extend(
        extra
            .iter()
            .map(|(k, v)| (entry_len(k, v), format!("environment variable {k}"))),
    );
    let hint = |what: &str| {
        if what == format!("environment variable {LISTEN_FDNAMES}") {
            format!(
                "it names {} fds, and this program can only receive their names in its environment: use fewer or shorter names",
                spec.fds.len()
            )
        } else if what.starts_with("argument") || what.starts_with("the program") {
            "shorten it".to_owned()
        } else {
            "shorten it or remove it from the environment".to_owned()
        }
    };
    if let Some((size, what)) = strings.iter().find(|(size, _)| *size > limits.string) {
        return Err(UpgradeError::ArgumentTooLong {
            hint: hint(what),
            what: what.clone(),
            size: *size,
            limit: limits.string,
        });
    }
    if total > limits.total {
        let (size, what) = strings
            .iter()
            .max_by_key(|(size, _)| *size)
            .expect("the program path is always there");
        return Err(UpgradeError::ArgumentsTooLarge {
            size: total,
            limit: limits.total,
            largest: format!("{what} ({size} bytes)"),
        });
    }
    Ok(())
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
    // kills the group and reaps the child (off this thread: see `Drop`).
    let mut child = Child { pid, pidfd: None };
    child.pidfd = Some(
        open_pidfd(pid.as_raw())
            .and_then(register)
            .map_err(|e| UpgradeError::io("cannot open a pidfd for the new process", e))?,
    );

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

/// A pidfd for `pid`: readable once the process has exited (Linux 5.3+).
fn open_pidfd(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (always
    // close-on-exec) or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for as long
    // as it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

impl Child {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Resolves once the process has exited (it is then a zombie until reaped).
    pub(crate) async fn exited(&self) {
        if let Some(pidfd) = &self.pidfd {
            // A pidfd becomes readable when the process exits.
            if let Ok(mut guard) = pidfd.readable().await {
                guard.retain_ready();
                return;
            }
        }
        std::future::pending().await
    }

    /// Kills the child's whole process group (it and anything it started).
    pub(crate) fn kill_group(&self) {
        self.signal_group(Signal::SIGKILL);
    }

    /// Whether the process has exited (without waiting).
    pub(crate) fn has_exited(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return false;
        };
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; timeout 0 never blocks.
        unsafe { libc::poll(&mut poll, 1, 0) > 0 && poll.revents & libc::POLLIN != 0 }
    }

    /// Reaps a child whose pidfd reported its exit: `waitpid` returns at once.
    pub(crate) async fn reap(mut self) -> Option<WaitStatus> {
        self.exited().await;
        self.pidfd = None;
        let pid = self.pid;
        std::mem::forget(self);
        loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(status) => return Some(status),
                Err(_) => return None,
            }
        }
    }

    /// Rolls the child back: `SIGTERM` to its group, so whatever it accepted
    /// can be answered, then `SIGKILL` after `grace`; then reaps it and
    /// returns how it ended.
    pub(crate) async fn terminate(self, grace: std::time::Duration) -> Option<WaitStatus> {
        self.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            tracing::warn!(
                pid = self.pid(),
                grace_ms = grace.as_millis() as u64,
                "the new process did not exit after SIGTERM; killing it"
            );
        }
        // Anything the group started and left behind goes too.
        self.kill_group();
        self.reap().await
    }

    fn signal_group(&self, signal: Signal) {
        // While the child is not yet reaped its PID, and so the group ID,
        // cannot be reused, so this cannot hit an unrelated group.
        if let Err(e) = killpg(self.pid, signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid.as_raw(), error = %e, "cannot signal the new process group");
            }
        }
    }

    /// Hands the child over to a caller that reaps with `waitpid(-1)` itself
    /// (the supervisor), with its pidfd: nothing here will wait for it or
    /// kill it.
    pub(crate) fn into_pidfd(mut self) -> (u32, Option<OwnedFd>) {
        let pidfd = self.pidfd.take().map(AsyncFd::into_inner);
        let pid = self.pid();
        std::mem::forget(self);
        (pid, pidfd)
    }
}

/// A successor after the commit point: watched through its pidfd, never
/// killed by this process (dropping it only closes the pidfd).
pub(crate) struct Successor {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
}

impl Child {
    /// The commit point: from here on this process never kills the child.
    pub(crate) fn commit(mut self) -> Option<Successor> {
        let pidfd = self.pidfd.take()?;
        let pid = self.pid;
        std::mem::forget(self);
        Some(Successor { pid, pidfd })
    }
}

impl Successor {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// A copy of its pidfd, to signal it later without naming a PID.
    pub(crate) fn pidfd(&self) -> io::Result<OwnedFd> {
        self.pidfd.get_ref().try_clone()
    }

    /// Resolves once the successor exited, and reaps it (the wait returns at
    /// once then); returns how it ended.
    pub(crate) async fn exited(&self) -> Option<WaitStatus> {
        match self.pidfd.readable().await {
            Ok(mut guard) => guard.retain_ready(),
            Err(_) => std::future::pending().await,
        }
        loop {
            match waitpid(self.pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(status) => return Some(status),
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Child {
    /// Kills the group and reaps the child without ever blocking the caller
    /// (which may hold a lock): the wait runs on a thread of its own.
    fn drop(&mut self) {
        self.kill_group();
        self.pidfd = None;
        let pid = self.pid;
        let wait = move || loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                _ => return,
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(wait)),
            Err(_) => drop(std::thread::spawn(wait)),
        }
    }
}

/// How a reaped child ended, as an upgrade error.
pub(crate) fn exit_error(pid: u32, status: Option<WaitStatus>) -> UpgradeError {
    match status {
        Some(WaitStatus::Exited(_, code)) => UpgradeError::Exited { pid, code },
        Some(WaitStatus::Signaled(_, signal, _)) => UpgradeError::Killed {
            pid,
            signal: signal.as_str().to_owned(),
        },
        other => UpgradeError::io(
            format!("the new process (pid {pid}) ended before it was ready"),
            io::Error::other(format!("{other:?}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec for `/bin/true` passing the same fd under each of `names`.
    fn spec<'a>(
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

    /// The `envp` a prepared child would get, as text.
    fn envp(prepared: &Prepared) -> Vec<String> {
        prepared
            ._env
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }

    fn long_names(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| format!("a-listener-with-a-long-name-{i:05}"))
            .collect()
    }

    #[test]
    fn an_argument_too_long_for_execve_fails_before_the_fork() {
        let args = vec![
            OsString::from("true"),
            OsString::from("x".repeat(200 << 10)),
        ];
        let stdin = std::io::stdin();
        let spec = spec(&args, &[], std::os::fd::AsFd::as_fd(&stdin), true);
        // spawn() itself: nothing forked, so no runtime is needed either.
        let error = spawn(&spec).err().expect("refused");
        assert!(
            matches!(error, UpgradeError::ArgumentTooLong { ref what, size, .. } if what == "argument 1" && size == (200 << 10) + 1),
            "{error:?}"
        );
        let message = error.to_string();
        for part in [
            "argument 1",
            "204801 bytes",
            "MAX_ARG_STRLEN",
            "nothing was started",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[test]
    fn names_that_do_not_fit_go_into_a_memfd_the_successor_reads() {
        let names = long_names(10_000);
        let stdin = std::io::stdin();
        let fd = std::os::fd::AsFd::as_fd(&stdin);
        let args = vec![OsString::from("true")];
        let prepared = prepare(&spec(&args, &names, fd, true)).unwrap();
        let env = envp(&prepared);
        assert!(
            !env.iter().any(|e| e.starts_with("LISTEN_FDNAMES=")),
            "LISTEN_FDNAMES stays in the environment"
        );
        assert!(env.contains(&"LISTEN_FDS=10000".to_owned()));
        // After the 10,000 fds at 3.. and the channel at 10003.
        assert!(env.contains(&"HANDOFF_VARS_FD=10004".to_owned()), "{env:?}");
        assert_eq!(prepared.sources.len(), 10_002);
        // What the successor makes of it.
        let get = |var: &str| {
            env.iter()
                .find_map(|e| e.strip_prefix(&format!("{var}=")).map(OsString::from))
        };
        let memfd = std::fs::File::from(prepared._vars.as_ref().unwrap().try_clone().unwrap());
        let parsed = crate::env::parse(
            |var| {
                if var == LISTEN_PID {
                    Some("100".into())
                } else if var == crate::env::HANDOFF_GENERATION {
                    Some("2".into())
                } else if var == crate::env::HANDOFF_CHANNEL_FD {
                    Some("10003".into()) // set by the upgrade, not by spawn
                } else {
                    get(var)
                }
            },
            100,
            |at| {
                assert_eq!(at, 10_004);
                crate::env::read_vars(&memfd)
            },
        )
        .unwrap();
        let got: Vec<String> = parsed
            .fds
            .into_iter()
            .filter_map(|(_, name)| name)
            .collect();
        assert_eq!(got, names);

        // Few names stay in the environment, for any socket-activation reader.
        let few = long_names(3);
        let prepared = prepare(&spec(&args, &few, fd, true)).unwrap();
        assert!(prepared._vars.is_none());
        assert!(envp(&prepared).contains(&format!("LISTEN_FDNAMES={}", few.join(":"))));
    }

    #[test]
    fn a_program_that_only_reads_the_environment_gets_an_error_naming_the_variable() {
        let names = long_names(10_000);
        let stdin = std::io::stdin();
        let args = vec![OsString::from("true")];
        let error = prepare(&spec(
            &args,
            &names,
            std::os::fd::AsFd::as_fd(&stdin),
            false,
        ))
        .err()
        .expect("refused");
        let message = error.to_string();
        for part in [
            "environment variable LISTEN_FDNAMES",
            "it names 10000 fds",
            "fewer or shorter names",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[test]
    fn the_total_counts_and_the_long_variables_move_to_fit_it() {
        let limits = ExecLimits {
            string: 128 << 10,
            total: (std::env::vars_os()
                .map(|(k, v)| k.len() + v.len() + 10)
                .sum::<usize>())
                + EXEC_MARGIN
                + (100 << 10),
        };
        let stdin = std::io::stdin();
        let fd = std::os::fd::AsFd::as_fd(&stdin);
        // Each string fits, together they do not.
        let args: Vec<OsString> = std::iter::once("true".into())
            .chain((0..3).map(|i| OsString::from(format!("{i}").repeat(40 << 10))))
            .collect();
        let error = prepare_with(&spec(&args, &[], fd, true), limits)
            .err()
            .expect("refused");
        assert!(
            matches!(error, UpgradeError::ArgumentsTooLarge { ref largest, .. } if largest.starts_with("argument ")),
            "{error:?}"
        );
        assert!(error.to_string().contains("RLIMIT_STACK"), "{error}");
        // 2,000 names (72 KB) fit in one string, but not beside a 60 KB
        // argument: they move to the memfd, and the rest fits.
        let names = long_names(2_000);
        let args = vec![OsString::from("true"), OsString::from("y".repeat(60 << 10))];
        let prepared = prepare_with(&spec(&args, &names, fd, true), limits).unwrap();
        assert!(prepared._vars.is_some(), "the names stayed");
        assert!(!envp(&prepared)
            .iter()
            .any(|e| e.starts_with("LISTEN_FDNAMES=")));
        assert!(prepare_with(&spec(&args, &names, fd, false), limits).is_err());
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
