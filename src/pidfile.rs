//! An atomically replaced PID file: write a temporary file in the same
//! directory, then `rename` it over the old one, so a reader sees either the
//! old PID or the new one, never a half-written file.
//!
//! The directory may be writable by others (`/tmp`, a shared `/run` subdir),
//! so nothing here follows a symbolic link: the temporary file has an
//! unpredictable name and is created with `O_EXCL | O_NOFOLLOW`, something
//! other than a regular file at the PID file's path is refused rather than
//! replaced, and reading or removing the file never goes through a link.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How many random temporary names to try before giving up (each collision
/// means someone created that exact name first, which should never happen).
const TEMP_ATTEMPTS: usize = 16;
/// A PID file longer than this is not one of ours: read no further.
const MAX_PID_FILE_LEN: u64 = 64;

/// A PID file path.
#[derive(Debug, Clone)]
pub(crate) struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// The PID file at `path` (nothing is touched yet).
    pub(crate) fn new(path: PathBuf) -> Self {
        PidFile { path }
    }

    /// The PID file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with `pid`. Refuses (and leaves alone)
    /// anything at the path that is not a regular file: a directory, a
    /// symbolic link, a FIFO, a socket, a device.
    pub(crate) fn write(&self, pid: u32) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let file_name = self.path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the PID file path has no file name",
            )
        })?;
        let (tmp, mut file) = create_temp(dir, file_name)?;
        let result = (|| {
            file.write_all(format!("{pid}\n").as_bytes())?;
            file.sync_all()?;
            drop(file);
            self.check_replaceable()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Fails with a clear error if something other than a regular file (or
    /// nothing) is at the path.
    fn check_replaceable(&self) -> io::Result<()> {
        match fs::symlink_metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot inspect {}: {e}", self.path.display()),
            )),
            Ok(meta) if meta.file_type().is_file() => Ok(()),
            Ok(meta) => {
                let what = describe(meta.file_type());
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is {what}, not a PID file; remove it or choose another PID file path",
                        self.path.display()
                    ),
                ))
            }
        }
    }

    /// The PID the file names now, if it is a regular file that names one.
    /// Never follows a symbolic link and never blocks (on a FIFO, say).
    pub(crate) fn read(&self) -> Option<u32> {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.path)
            .ok()?;
        if !file.metadata().ok()?.file_type().is_file() {
            return None;
        }
        let mut text = String::new();
        file.take(MAX_PID_FILE_LEN).read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    }

    /// Removes the file if it is a regular file that still names `pid`.
    pub(crate) fn remove_if(&self, pid: u32) {
        if self.read() != Some(pid) {
            return;
        }
        // read() saw a regular file; check again just before unlinking, so a
        // link put there since is left alone.
        let is_file = fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_file());
        if !is_file {
            return;
        }
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove the PID file");
        }
    }
}

/// Creates a new temporary file `.<name>.<random>.tmp` in `dir`, mode 0644,
/// with `O_EXCL | O_NOFOLLOW`: it is never a file (or a link) that was
/// already there.
fn create_temp(dir: &Path, file_name: &std::ffi::OsStr) -> io::Result<(PathBuf, fs::File)> {
    let mut last_error = None;
    for _ in 0..TEMP_ATTEMPTS {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{:016x}.tmp", random_u64()?));
        let tmp = dir.join(tmp_name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("cannot create a temporary PID file")))
}

/// 64 random bits from the kernel (`getrandom(2)`, or `/dev/urandom` where
/// that system call is missing).
fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    loop {
        // SAFETY: bytes is a writable buffer of bytes.len() bytes.
        let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if got == bytes.len() as isize {
            return Ok(u64::from_ne_bytes(bytes));
        }
        let error = io::Error::last_os_error();
        if got < 0 && error.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if got < 0 && error.raw_os_error() != Some(libc::ENOSYS) {
            return Err(error);
        }
        // ENOSYS, or a short read (not possible for 8 bytes): the device.
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        return Ok(u64::from_ne_bytes(bytes));
    }
}

/// What a file type is, for an error message: "a directory", ….
fn describe(file_type: fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a named pipe (FIFO)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn write_replace_and_remove() {
        let tmp = crate::testutil::TempDir::new("pidfile");
        let dir = tmp.path();
        let pid_file = PidFile::new(dir.join("server.pid"));
        pid_file.write(41).unwrap();
        pid_file.write(42).unwrap();
        assert_eq!(fs::read_to_string(pid_file.path()).unwrap(), "42\n");
        pid_file.remove_if(41);
        assert_eq!(pid_file.read(), Some(42));
        pid_file.remove_if(42);
        assert!(!pid_file.path().exists());
        // Only the PID file was ever there: no temporary file is left.
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
    }

    #[test]
    fn a_symlink_at_the_old_predictable_temp_name_leaves_its_target_untouched() {
        let tmp = crate::testutil::TempDir::new("pidfile-tmp-symlink");
        let dir = tmp.path();
        let victim = dir.join("victim");
        fs::write(&victim, "precious\n").unwrap();
        // The name the temporary file used to have: `.<name>.<pid>.tmp`.
        std::os::unix::fs::symlink(&victim, dir.join(".server.pid.42.tmp")).unwrap();
        let pid_file = PidFile::new(dir.join("server.pid"));
        pid_file.write(42).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(fs::read_to_string(pid_file.path()).unwrap(), "42\n");
        assert!(fs::symlink_metadata(pid_file.path())
            .unwrap()
            .file_type()
            .is_file());
    }

    #[test]
    fn a_directory_at_the_path_is_refused_with_a_clear_error() {
        let tmp = crate::testutil::TempDir::new("pidfile-dir");
        let dir = tmp.path();
        let path = dir.join("server.pid");
        fs::create_dir(&path).unwrap();
        let error = PidFile::new(path.clone()).write(42).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!("{} is a directory", path.display())),
            "{message}"
        );
        assert!(message.contains("remove it"), "{message}");
        assert!(path.is_dir());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_at_the_path_is_refused_and_its_target_untouched() {
        let tmp = crate::testutil::TempDir::new("pidfile-symlink");
        let dir = tmp.path();
        let victim = dir.join("victim");
        fs::write(&victim, "42\n").unwrap();
        let path = dir.join("server.pid");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let pid_file = PidFile::new(path.clone());
        let message = pid_file.write(7).unwrap_err().to_string();
        assert!(message.contains("symbolic link"), "{message}");
        // Neither read nor remove_if follows the link.
        assert_eq!(pid_file.read(), None);
        pid_file.remove_if(42);
        assert!(fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "42\n");
        // Only the victim and the link: no temporary file is left behind.
        assert_eq!(fs::read_dir(dir).unwrap().count(), 2);
    }

    #[test]
    fn a_fifo_at_the_path_is_refused_and_read_does_not_block() {
        let tmp = crate::testutil::TempDir::new("pidfile-fifo");
        let dir = tmp.path();
        let path = dir.join("server.pid");
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let pid_file = PidFile::new(path.clone());
        let message = pid_file.write(42).unwrap_err().to_string();
        assert!(message.contains("named pipe"), "{message}");
        // Opening a FIFO for reading would wait for a writer; read() must not.
        assert_eq!(pid_file.read(), None);
        pid_file.remove_if(42);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_fifo());
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }
}
