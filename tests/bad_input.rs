//! Garbage in the handoff variables: the server refuses to start with an
//! error that names the variable, exits 2, and never panics. (Its parent
//! would see that exit and roll back.) Socket activation meant for another
//! process is ignored, as sd_listen_fds(3) specifies.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{example_path, spawn_retrying, wait_exit, TempDir, DEADLINE};

/// Kills and reaps the child if the test ends while it runs.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `http_server` with `env`, optionally with `fd` placed at fd 3, and
/// `LISTEN_PID` set to the server's own PID when `own_listen_pid`.
fn run(env: &[(&str, &str)], fd: Option<RawFd>, own_listen_pid: bool, args: &[&str]) -> Output {
    let dir = TempDir::new("bad-input");
    let bin = dir.path().join("http_server");
    std::fs::copy(example_path("http_server"), &bin).expect("copy the binary");
    // sh sets LISTEN_PID to its own PID, then execs the server (same PID).
    let script = if own_listen_pid {
        "export LISTEN_PID=$$; exec \"$0\" \"$@\""
    } else {
        "exec \"$0\" \"$@\""
    };
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", script])
        .arg(&bin)
        .args(args)
        .env_remove("LISTEN_PID")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A real readiness channel where the variables say it is.
    let channel_at: Option<RawFd> = env
        .iter()
        .find(|(k, _)| *k == "HANDOFF_CHANNEL_FD")
        .and_then(|(_, v)| v.parse().ok())
        // The test's own fd goes at 3: then it is what the channel must be.
        .filter(|&at| !(at == 3 && fd.is_some()));
    // SAFETY: fcntl, dup2, socketpair and close are async-signal-safe and
    // only touch the child's fd table.
    unsafe {
        command.pre_exec(move || {
            let failed = || Err(std::io::Error::last_os_error());
            if let Some(fd) = fd {
                if place_at_3(fd) < 0 {
                    return failed();
                }
            }
            // After fd 3 is placed, so the pair cannot land on it.
            if let Some(at) = channel_at {
                let mut pair = [-1; 2];
                if libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, pair.as_mut_ptr()) < 0
                    || libc::dup2(pair[0], at) < 0
                {
                    return failed();
                }
                if pair[0] != at {
                    libc::close(pair[0]);
                }
            }
            Ok(())
        });
    }
    let child = spawn_retrying(&mut command);
    let pid = child.id();
    let mut guard = Guard(Some(child));
    assert!(
        wait_exit_keep(pid),
        "http_server did not exit on bad input {env:?}"
    );
    guard
        .0
        .take()
        .expect("child")
        .wait_with_output()
        .expect("collect output")
}

/// In a child before `exec`: makes `fd` the inheritable fd 3 (`dup2(3, 3)`
/// would keep `FD_CLOEXEC`, so fd 3 itself gets the flag cleared instead).
/// Async-signal-safe; returns what the system call did (negative on error).
fn place_at_3(fd: RawFd) -> libc::c_int {
    // SAFETY: fcntl and dup2 only touch this process's fd table.
    unsafe {
        if fd == 3 {
            libc::fcntl(3, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, 3)
        }
    }
}

/// Waits for the process to exit without reaping it (`wait_with_output` does).
fn wait_exit_keep(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only inspects the child's state.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid siginfo_t to fill in.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid is valid to read for a waitid result.
        if rc == 0 && unsafe { info.si_pid() } == pid as i32 {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_refused(output: &Output, var: &str, detail: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit status for bad {var}; stderr:\n{stderr}"
    );
    assert!(stderr.contains(var), "the error names {var}:\n{stderr}");
    assert!(
        stderr.contains(detail),
        "the error says {detail:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("ready"),
        "it never reported ready"
    );
}

const SUCCESSOR: [(&str, &str); 1] = [("HANDOFF_GENERATION", "2")];

/// A successor's variables with `extra` over them; the readiness channel is
/// at its place (right after the `LISTEN_FDS` fds) unless `extra` says otherwise.
fn successor_with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = SUCCESSOR
        .iter()
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    let fds: usize = extra
        .iter()
        .find(|(k, _)| *k == "LISTEN_FDS")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    env.push(("HANDOFF_CHANNEL_FD", (3 + fds).to_string()));
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key, (*value).to_owned()));
    }
    env
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// One malformed environment: extra variables over a successor's, whether
/// `LISTEN_PID` is the server's own, and what the error must say.
struct Case {
    env: &'static [(&'static str, &'static str)],
    own_listen_pid: bool,
    var: &'static str,
    detail: &'static str,
}

const CASES: &[Case] = &[
    Case {
        env: &[("HANDOFF_GENERATION", "two")],
        own_listen_pid: false,
        var: "HANDOFF_GENERATION",
        detail: "not a decimal number",
    },
    Case {
        env: &[("HANDOFF_GENERATION", "1")],
        own_listen_pid: false,
        var: "HANDOFF_GENERATION",
        detail: "at least 2",
    },
    Case {
        env: &[("HANDOFF_CHANNEL_FD", "9")],
        own_listen_pid: false,
        var: "HANDOFF_CHANNEL_FD",
        detail: "follows the 0 passed fds",
    },
    Case {
        env: &[("HANDOFF_VARS_FD", "9")],
        own_listen_pid: false,
        var: "HANDOFF_VARS_FD",
        detail: "the memfd follows the channel, at fd 4",
    },
    Case {
        env: &[("HANDOFF_NOTIFY_UPSTREAM", "relative/path")],
        own_listen_pid: false,
        var: "HANDOFF_NOTIFY_UPSTREAM",
        detail: "absolute path",
    },
    Case {
        env: &[("LISTEN_FDS", "1x")],
        own_listen_pid: true,
        var: "LISTEN_FDS",
        detail: "not a decimal number",
    },
    Case {
        env: &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "http0"),
            ("LISTEN_PID", "1"),
        ],
        own_listen_pid: false,
        var: "LISTEN_PID",
        detail: "passed to pid 1",
    },
    Case {
        env: &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "http0")],
        own_listen_pid: true,
        var: "LISTEN_FDNAMES",
        detail: "1 names but LISTEN_FDS is 2",
    },
    Case {
        env: &[("LISTEN_FDS", "1")],
        own_listen_pid: true,
        var: "LISTEN_FDNAMES",
        detail: "missing",
    },
    Case {
        env: &[("LISTEN_FDS", "40"), ("LISTEN_FDNAMES", NAMES_40)],
        own_listen_pid: true,
        var: "LISTEN_FDS",
        detail: "is not open",
    },
];

const ACTIVATION_CASES: &[Case] = &[
    Case {
        env: &[("LISTEN_FDS", "40")],
        own_listen_pid: true,
        var: "LISTEN_FDS",
        detail: "is not open",
    },
    Case {
        env: &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "a:b:c")],
        own_listen_pid: true,
        var: "LISTEN_FDNAMES",
        detail: "3 names but LISTEN_FDS is 2",
    },
    Case {
        env: &[("LISTEN_FDS", "1"), ("LISTEN_PID", "12ab")],
        own_listen_pid: false,
        var: "LISTEN_PID",
        detail: "not a decimal number",
    },
];

#[test]
fn garbage_in_each_handoff_variable_is_named() {
    for case in CASES {
        let output = run(
            &as_refs(&successor_with(case.env)),
            None,
            case.own_listen_pid,
            &["--listen", "127.0.0.1:0"],
        );
        assert_refused(&output, case.var, case.detail);
    }
    // Socket activation (no HANDOFF_GENERATION), as sd_listen_fds(3) reads it.
    for case in ACTIVATION_CASES {
        let output = run(
            case.env,
            None,
            case.own_listen_pid,
            &["--listen", "127.0.0.1:0"],
        );
        assert_refused(&output, case.var, case.detail);
    }
    // A successor without its parent's readiness channel.
    let output = run(&[("HANDOFF_GENERATION", "2")], None, false, &[]);
    assert_refused(&output, "HANDOFF_CHANNEL_FD", "missing");
    // The channel's fd is something else: a file.
    let file = std::fs::File::open("/dev/null").unwrap();
    let env = [("HANDOFF_GENERATION", "2"), ("HANDOFF_CHANNEL_FD", "3")];
    let output = run(&env, Some(file.as_raw_fd()), false, &[]);
    assert_refused(&output, "HANDOFF_CHANNEL_FD", "is not a socket");
}

const NAMES_40: &str = "a0:a1:a2:a3:a4:a5:a6:a7:a8:a9:b0:b1:b2:b3:b4:b5:b6:b7:b8:b9:c0:c1:c2:c3:c4:c5:c6:c7:c8:c9:d0:d1:d2:d3:d4:d5:d6:d7:d8:d9";

#[test]
fn an_fd_that_is_not_what_its_name_claims_is_refused() {
    let env = successor_with(&[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "http0")]);
    let env = as_refs(&env);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let output = run(
        &env,
        Some(udp.as_raw_fd()),
        true,
        &["--listen", "127.0.0.1:0"],
    );
    assert_refused(
        &output,
        "LISTEN_FDNAMES",
        "is not a listening TCP socket (found: IPv4 UDP socket",
    );

    let file = std::fs::File::open("/dev/null").unwrap();
    let output = run(
        &env,
        Some(file.as_raw_fd()),
        true,
        &["--listen", "127.0.0.1:0"],
    );
    assert_refused(&output, "LISTEN_FDNAMES", "found: character device");

    // A TCP listener, but on another address than the one asked for.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let output = run(
        &env,
        Some(other.as_raw_fd()),
        true,
        &["--listen", "127.0.0.2:9"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is bound to 127.0.0.1:") && stderr.contains("127.0.0.2:9 was requested"),
        "{stderr}"
    );
}

#[test]
fn socket_activation_for_another_process_is_ignored() {
    // sd_listen_fds(3): LISTEN_PID naming another process means "not for
    // us": the server binds its own socket and serves.
    let dir = TempDir::new("ignored-activation");
    let bin = dir.path().join("http_server");
    std::fs::copy(example_path("http_server"), &bin).unwrap();
    let child = spawn_retrying(
        Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "3")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let pid = child.id();
    let mut guard = Guard(Some(child));
    let stdout = guard
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let ready = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.starts_with("ready")))
        .and_then(Result::ok);
    assert!(
        ready.is_some_and(|l| l.contains(&format!("pid={pid}"))),
        "it started and serves"
    );
    common::signal(pid, libc::SIGTERM);
    drop(lines);
    assert_eq!(
        wait_exit(pid, DEADLINE),
        Some(Some(0)),
        "clean exit on SIGTERM"
    );
    guard.0 = None;
}

/// A name that came from outside (systemd's `LISTEN_FDNAMES`) cannot forge a
/// log line: control characters are logged escaped.
#[test]
fn an_inherited_name_with_control_characters_is_logged_escaped() {
    let unclaimed = TcpListener::bind("127.0.0.1:0").unwrap();
    let evil = "evil\nERROR forged line\u{1b}[31m";
    let child = {
        let dir = TempDir::new("escaped-name");
        let bin = dir.path().join("http_server");
        std::fs::copy(example_path("http_server"), &bin).expect("copy the binary");
        let fd = unclaimed.as_raw_fd();
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""])
            .arg(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", evil)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: place_at_3 is async-signal-safe and only touches the
        // child's fd table.
        unsafe {
            command.pre_exec(move || {
                if place_at_3(fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        (dir, spawn_retrying(&mut command))
    };
    let (_dir, child) = child;
    let pid = child.id();
    let mut guard = Guard(Some(child));
    let stdout = guard
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout");
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|l| l.starts_with("ready"));
    assert!(ready, "it serves, having closed the fd nobody claimed");
    common::signal(pid, libc::SIGTERM);
    let output = guard.0.take().expect("child").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(r"evil\nERROR forged line\u{1b}[31m"),
        "{stderr}"
    );
    assert!(
        !stderr.lines().any(|l| l.starts_with("ERROR forged")),
        "a forged line:\n{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "a raw escape byte:\n{stderr}");
}
