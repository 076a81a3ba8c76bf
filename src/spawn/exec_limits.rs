//! What `execve` accepts: Linux's limits, what a start counts against them,
//! the check before the fork with its errors, and which long variables go
//! into the memfd instead of the environment.
//!
//! What `execve` would refuse with `E2BIG` is refused before the fork, with
//! what is too big: one string longer than `MAX_ARG_STRLEN` (128 KiB), or
//! all of them over a quarter of `RLIMIT_STACK` (at most 6 MiB). A handoff
//! successor gets the variables that grow with the number of fds
//! (`LISTEN_FDNAMES`, `HANDOFF_SOCKET_PATHS`) in a sealed memfd instead when
//! they do not fit (see `vars_memfd.rs`), so thousands of listeners still
//! hand over.

use std::ffi::{OsStr, OsString};

use super::{SpawnSpec, PID_DIGITS};
use crate::env::{HANDOFF_VARS_FD, LISTEN_FDNAMES, LONG_VARS};
use crate::error::UpgradeError;

/// Room left in the `execve` limit for what the kernel adds itself: a
/// script's `#!` line (up to 256 bytes) and its path (up to `PATH_MAX`).
const EXEC_MARGIN: usize = 8 * 1024;

/// Linux's limits on what `execve` takes; beyond them it fails with `E2BIG`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ExecLimits {
    /// One argument or environment string, NUL included (`MAX_ARG_STRLEN`:
    /// 32 pages).
    string: usize,
    /// All strings and their pointers: a quarter of the soft `RLIMIT_STACK`,
    /// at most 6 MiB (¾ of `_STK_LIM`), at least 128 KiB (`ARG_MAX`).
    total: usize,
}

impl ExecLimits {
    pub(super) fn of_this_process() -> Self {
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
pub(super) fn soft_limit(get: impl FnOnce(&mut libc::rlimit) -> libc::c_int) -> Option<u64> {
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

/// What `execve` counts for `spec`, with `inherited` and `extra` in the
/// environment and an entry for each of `pid_vars`, against
/// [`ExecLimits::total`].
pub(super) fn total_size(
    spec: &SpawnSpec<'_>,
    inherited: &[(OsString, OsString)],
    extra: &[(&'static str, OsString)],
    pid_vars: &[&'static str],
) -> usize {
    let pid_entries_len: usize = pid_vars
        .iter()
        .map(|var| var.len() + 1 + PID_DIGITS + 1)
        .sum();
    // What execve counts: every string with its NUL (the program path too)
    // and a pointer for each; plus what the kernel may add.
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
}

/// Takes out of `extra`, and returns, the [`LONG_VARS`] that do not fit in
/// the environment of a `spec` that reads `HANDOFF_VARS_FD` (none for any
/// other): they go into the memfd.
pub(super) fn move_long_vars(
    spec: &SpawnSpec<'_>,
    inherited: &[(OsString, OsString)],
    extra: &mut Vec<(&'static str, OsString)>,
    pid_vars: &[&'static str],
    limits: ExecLimits,
) -> Vec<(&'static str, OsString)> {
    let total = |extra: &[(&'static str, OsString)]| total_size(spec, inherited, extra, pid_vars);
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
        if len <= limits.string && total(extra) + announce <= limits.total {
            break;
        }
        moved.push(extra.remove(i));
    }
    moved
}

/// Refuses, before the fork, what `execve` would refuse with `E2BIG`: one
/// string too long, or all of them (`total` bytes) too large.
pub(super) fn check_sizes(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::LISTEN_PID;
    use crate::spawn::tests::spec;
    use crate::spawn::{prepare, prepare_with, spawn, Prepared};

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
                crate::vars_memfd::read_vars(&memfd)
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
}
