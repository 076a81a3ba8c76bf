//! An atomically replaced PID file: write a temporary file in the same
//! directory, then `rename` it over the old one, so a reader sees either the
//! old PID or the new one, never a half-written file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A PID file path.
#[derive(Debug, Clone)]
pub(crate) struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        PidFile { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with `pid`.
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
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{pid}.tmp"));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(format!("{pid}\n").as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The PID the file names now, if it names one.
    pub(crate) fn read(&self) -> Option<u32> {
        fs::read_to_string(&self.path).ok()?.trim().parse().ok()
    }

    /// Removes the file if it still names `pid`.
    pub(crate) fn remove_if(&self, pid: u32) {
        if self.read() == Some(pid) {
            if let Err(error) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove the PID file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
