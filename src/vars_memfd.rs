//! The sealed memfd of the variables too long for the environment
//! ([`LONG_VARS`], announced by
//! [`HANDOFF_VARS_FD`](crate::env::HANDOFF_VARS_FD)): written for a
//! successor, read and checked by it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use crate::env::LONG_VARS;
use crate::escape::Escaped;

/// The most bytes a successor reads from [`HANDOFF_VARS_FD`]: room for
/// [`MAX_FDS`] names of [`MAX_NAME_LEN`] bytes and as many socket path
/// identities (at most 83 bytes each), with some to spare.
///
/// [`HANDOFF_VARS_FD`]: crate::env::HANDOFF_VARS_FD
/// [`MAX_FDS`]: crate::env::MAX_FDS
/// [`MAX_NAME_LEN`]: crate::env::MAX_NAME_LEN
pub(crate) const MAX_VARS_LEN: usize = 32 << 20;

/// A sealed memfd holding `vars` for a successor's [`HANDOFF_VARS_FD`]: each
/// as `NAME=value` followed by a NUL byte, as in an `envp` block. Sealed
/// against any change, so what the successor reads is what was written.
///
/// [`HANDOFF_VARS_FD`]: crate::env::HANDOFF_VARS_FD
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
///
/// [`HANDOFF_VARS_FD`]: crate::env::HANDOFF_VARS_FD
pub(crate) fn read_vars_fd(fd: RawFd) -> Result<Vec<u8>, String> {
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
pub(crate) fn parse_vars(bytes: &[u8]) -> Result<Vec<(&'static str, String)>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::LISTEN_FDNAMES;

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
}
