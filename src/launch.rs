//! What a successor is started as: the binary, its arguments and its
//! working directory, looked up again at each upgrade.
//!
//! Deploys switch a symlink (`current -> releases/v2`) and the server was
//! started as `cd current && ./server`. The kernel keeps a process's working
//! directory as the directory it resolved to (`releases/v1`), so paths are
//! taken relative to the *logical* working directory instead: `$PWD`, as the
//! shell keeps it, when it names the same directory as `getcwd()`. Joined
//! with `argv[0]` as given and resolved only when the successor is started,
//! the path goes through the symlink as it is then.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How to start a successor.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// `argv[0]` as given (looked up in `PATH` if it has no slash), or the
    /// program given to `Builder::command` (relative to `dir`).
    program: OsString,
    from_path: bool,
    /// `argv`, including `argv[0]`.
    pub args: Vec<OsString>,
    /// The logical working directory, which the successor starts in (and
    /// gets as `PWD`).
    pub dir: PathBuf,
}

impl Launch {
    /// As this process was started: its `argv`, from its logical working
    /// directory.
    pub(crate) fn this_process() -> io::Result<Launch> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let program = args.first().cloned().unwrap_or_default();
        Ok(Launch {
            from_path: !program.as_bytes().contains(&b'/'),
            program,
            args,
            dir: logical_cwd()?,
        })
    }

    /// `program` (relative to the logical working directory) with `args`.
    pub(crate) fn command(program: PathBuf, args: Vec<OsString>) -> io::Result<Launch> {
        let mut argv = vec![program.clone().into_os_string()];
        argv.extend(args);
        Ok(Launch {
            program: program.into_os_string(),
            from_path: false,
            args: argv,
            dir: logical_cwd()?,
        })
    }

    /// The binary to execute now: `None` if a bare name is not in `PATH`.
    pub(crate) fn program(&self) -> Option<PathBuf> {
        if self.from_path {
            resolve_program(&self.program, &self.dir)
        } else {
            Some(self.dir.join(&self.program))
        }
    }
}

/// The working directory as the user sees it: `$PWD` if it is absolute and
/// names the same directory as `getcwd()` (through symlinks), else
/// `getcwd()`.
pub(crate) fn logical_cwd() -> io::Result<PathBuf> {
    let physical = std::env::current_dir()?;
    let logical = std::env::var_os("PWD").map(PathBuf::from);
    Ok(match logical {
        Some(logical) if logical.is_absolute() && same_dir(&logical, &physical) => logical,
        _ => physical,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.is_dir() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `argv0` made absolute against `cwd` if it has a slash, else looked up in
/// `PATH` (relative entries against `cwd`). Not `/proc/self/exe`: a deploy
/// replaces the file at the path.
pub(crate) fn resolve_program(argv0: &OsStr, cwd: &Path) -> Option<PathBuf> {
    let given = Path::new(argv0);
    if argv0.as_bytes().contains(&b'/') {
        return Some(cwd.join(given));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| cwd.join(dir).join(given))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_with_a_slash_is_made_absolute_against_the_start_directory() {
        let cwd = Path::new("/srv/app");
        assert_eq!(
            resolve_program(OsStr::new("./bin/server"), cwd),
            Some(PathBuf::from("/srv/app/./bin/server"))
        );
        assert_eq!(
            resolve_program(OsStr::new("/usr/bin/server"), cwd),
            Some(PathBuf::from("/usr/bin/server"))
        );
    }

    #[test]
    fn a_bare_argv0_is_looked_up_in_path() {
        // `sh` is on PATH on any machine these tests run on; a made-up name is not.
        let found = resolve_program(OsStr::new("sh"), Path::new("/")).expect("sh on PATH");
        assert!(
            found.is_absolute() && found.ends_with("sh"),
            "{}",
            found.display()
        );
        assert_eq!(
            resolve_program(OsStr::new("no-such-binary-handoff-test"), Path::new("/")),
            None
        );
    }

    #[test]
    fn the_logical_directory_is_taken_only_where_it_is_the_same() {
        let tmp = crate::testutil::TempDir::new("launch");
        let real = tmp.path().join("releases/v1");
        std::fs::create_dir_all(&real).unwrap();
        let link = tmp.path().join("current");
        std::os::unix::fs::symlink("releases/v1", &link).unwrap();
        assert!(same_dir(&link, &real));
        assert!(!same_dir(&link, tmp.path()));
        assert!(!same_dir(&tmp.path().join("missing"), &real));
    }
}
