//! The test plays systemd's notify socket (a datagram socket with
//! `SO_PASSCRED`, so every message carries its sender's PID) and checks the
//! exact conversation across start, a good upgrade, a failed upgrade and stop:
//! who sent `MAINPID=`, and that the old process waited for the `BARRIER=1`
//! answer before it stopped.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{signal, wait_exit, Options, Server, DEADLINE};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

/// One notify datagram.
struct Message {
    pid: u32,
    text: String,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The fake service manager.
struct Manager {
    messages: Arc<(Mutex<Vec<Message>>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages: Arc<(Mutex<Vec<Message>>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut buf = [0u8; 4096];
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let mut space = nix::cmsg_space!(
                        nix::sys::socket::UnixCredentials,
                        [std::os::fd::RawFd; 4]
                    );
                    let Ok(msg) = recvmsg::<UnixAddr>(
                        socket.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    ) else {
                        continue; // timeout: check `stop`
                    };
                    let mut message = Message {
                        pid: 0,
                        text: String::new(),
                        fds: Vec::new(),
                    };
                    for cmsg in msg.cmsgs().expect("control messages") {
                        match cmsg {
                            ControlMessageOwned::ScmCredentials(creds) => {
                                message.pid = creds.pid() as u32
                            }
                            ControlMessageOwned::ScmRights(fds) => {
                                // SAFETY: the kernel just gave these fds to us.
                                message.fds.extend(
                                    fds.into_iter()
                                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                );
                            }
                            _ => {}
                        }
                    }
                    let len = msg.bytes;
                    message.text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    messages.0.lock().unwrap().push(message);
                    messages.1.notify_all();
                }
            })
        };
        Manager {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the first message at index `from` or later that matches;
    /// returns its index.
    fn wait(&self, from: usize, what: &str, matches: impl Fn(&Message) -> bool) -> usize {
        let deadline = Instant::now() + DEADLINE;
        let mut messages = self.messages.0.lock().unwrap();
        loop {
            if let Some(i) = (from..messages.len()).find(|&i| matches(&messages[i])) {
                return i;
            }
            let now = Instant::now();
            if now >= deadline {
                let seen: Vec<String> = messages
                    .iter()
                    .map(|m| format!("{}: {:?}", m.pid, m.text))
                    .collect();
                drop(messages);
                panic!("no notify message: {what}; seen:\n{}", seen.join("\n"));
            }
            messages = self
                .messages
                .1
                .wait_timeout(messages, deadline - now)
                .unwrap()
                .0;
        }
    }

    fn with<T>(&self, i: usize, f: impl FnOnce(&mut Message) -> T) -> T {
        f(&mut self.messages.0.lock().unwrap()[i])
    }

    fn all(&self) -> Vec<(u32, String)> {
        self.messages
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|m| (m.pid, m.text.clone()))
            .collect()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[test]
fn the_conversation_with_systemd_across_start_upgrade_failure_and_stop() {
    let dir = common::TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let manager = Manager::bind(&socket_path);
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    options.env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    let server = Server::start_with(options);
    let first = server.first_pid;

    // Start: READY=1 with a status, from the main process.
    let i = manager.wait(0, "READY=1 at start", |m| m.has("READY=1"));
    manager.with(i, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(
            m.value("STATUS"),
            Some(format!("Serving, generation 1 (pid {first})").as_str())
        );
    });

    // A good upgrade: RELOADING=1 with a time at or after the signal, then
    // MAINPID=<successor> and READY=1 from the old main process, then a
    // barrier, and only after the answer does the old process stop.
    let before_signal = monotonic_usec();
    signal(first, libc::SIGHUP);
    let reloading = manager.wait(i + 1, "RELOADING=1", |m| m.has("RELOADING=1"));
    manager.with(reloading, |m| {
        assert_eq!(m.pid, first);
        let usec: u64 = m
            .value("MONOTONIC_USEC")
            .expect("MONOTONIC_USEC")
            .parse()
            .unwrap();
        assert!(
            usec >= before_signal,
            "MONOTONIC_USEC {usec} is before the signal ({before_signal})"
        );
    });
    // The reload ends at the commit, from the old main process, which stays
    // the main process through the probation; MAINPID= comes at its end.
    let committed = manager.wait(reloading + 1, "READY=1", |m| m.has("READY=1"));
    manager.with(committed, |m| {
        assert_eq!(m.pid, first, "the old main process ends the reload");
        assert!(
            m.value("MAINPID").is_none(),
            "no MAINPID= before the probation ends"
        );
    });
    let handover = manager.wait(committed + 1, "MAINPID=", |m| m.value("MAINPID").is_some());
    let second: u32 = manager.with(handover, |m| {
        assert_eq!(m.pid, first, "the old main process announces its successor");
        m.value("MAINPID").unwrap().parse().unwrap()
    });
    assert_ne!(second, first);
    let barrier = manager.wait(handover + 1, "BARRIER=1", |m| m.has("BARRIER=1"));
    let barrier_fd = manager.with(barrier, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(m.fds.len(), 1, "BARRIER=1 carries one fd");
        m.fds.pop().unwrap()
    });
    // Until we answer, the old process does not exit: systemd must know its
    // new main process first. (It stopped accepting at the commit.)
    server
        .events
        .wait(0, DEADLINE, "the successor to be ready", |l| {
            l.is("ready") && l.num("pid") == u64::from(second)
        });
    assert!(
        !server
            .events
            .snapshot()
            .iter()
            .any(|l| l.starts_with(&format!("exit pid={first} "))),
        "the old process exited before systemd confirmed MAINPID="
    );
    assert!(std::path::Path::new(&format!("/proc/{first}")).exists());
    drop(barrier_fd); // the answer
    server
        .events
        .wait(0, DEADLINE, "the old process to stop", |l| {
            l.is("stopping") && l.num("pid") == u64::from(first)
        });
    assert_eq!(wait_exit(first, DEADLINE), Some(Some(0)));

    // A failed upgrade still ends the reload with READY=1; STATUS= says why.
    server.replace_binary(Some(b"#!/bin/sh\nexit 1\n"), 0o755);
    signal(second, libc::SIGHUP);
    let reloading = manager.wait(barrier + 1, "RELOADING=1 (failing)", |m| {
        m.has("RELOADING=1")
    });
    let failed = manager.wait(reloading + 1, "READY=1 after the failure", |m| {
        m.has("READY=1")
    });
    manager.with(failed, |m| {
        assert_eq!(m.pid, second);
        let status = m.value("STATUS").unwrap_or_default();
        assert!(
            status.contains("last upgrade failed") && status.contains("exited with status 1"),
            "{status}"
        );
        assert!(m.value("MAINPID").is_none(), "no handover on failure");
    });
    server.restore_binary("http_server");

    // Stop: STOPPING=1, and the drain deadline announced to systemd.
    signal(second, libc::SIGTERM);
    let stopping = manager.wait(failed + 1, "STOPPING=1", |m| m.has("STOPPING=1"));
    manager.with(stopping, |m| assert_eq!(m.pid, second));
    let extend = manager.wait(stopping + 1, "EXTEND_TIMEOUT_USEC=", |m| {
        m.value("EXTEND_TIMEOUT_USEC").is_some()
    });
    manager.with(extend, |m| {
        let usec: u64 = m.value("EXTEND_TIMEOUT_USEC").unwrap().parse().unwrap();
        // http_server's default drain timeout is 30 s.
        assert!(usec >= 30_000_000, "{usec}");
    });
    assert_eq!(wait_exit(second, DEADLINE), Some(Some(0)));

    // Nothing came from anyone but the main process of the moment.
    let handover_index = handover;
    for (i, (pid, text)) in manager.all().into_iter().enumerate() {
        let main = if i <= barrier.max(handover_index) {
            first
        } else {
            second
        };
        assert_eq!(
            pid, main,
            "message {i} {text:?} from pid {pid}, but the main process was {main}"
        );
    }
}

#[test]
fn an_unreachable_notify_socket_gives_one_warning_and_serving_goes_on() {
    let dir = common::TempDir::new("notify-missing");
    let missing = dir.path().join("nobody-listens-here.sock");
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    options.env.push((
        "NOTIFY_SOCKET".into(),
        missing.to_string_lossy().into_owned(),
    ));
    let server = Server::start_with(options);
    let first = server.first_pid;
    // Start, an upgrade (RELOADING=1, MAINPID=, BARRIER=1) and more: all fail to send.
    let second = server.upgrade_ok();
    assert_eq!(
        common::http::get(server.addr(), "/").unwrap().pid(),
        Some(second)
    );
    let warnings = |pid: u32| {
        server
            .stderr_all()
            .lines()
            .filter(|l| {
                l.contains("cannot notify the service manager")
                    && l.contains(&format!("pid={pid} "))
            })
            .count()
    };
    assert_eq!(
        warnings(first),
        1,
        "one warning from the first generation:\n{}",
        server.stderr_tail()
    );
    assert_eq!(warnings(second), 0, "the successor has not tried yet");
}

/// A second `SIGHUP` (a second `systemctl reload`) that reaches the old main
/// process during its probation is for the service: the old process tells
/// systemd `MAINPID=<successor>`, waits for the answer, and only then passes
/// the signal on and exits; the successor, now the main process, upgrades
/// and tells systemd `RELOADING=1` itself. (It used to exit as soon as it
/// had sent `MAINPID=`, before passing the signal on: the reload was lost.)
#[test]
fn a_sighup_in_the_probation_is_passed_on_once_systemd_knows_the_successor() {
    let dir = common::TempDir::new("notify-pass-on");
    let socket_path = dir.path().join("notify.sock");
    let manager = Manager::bind(&socket_path);
    let mut options = Options::new("http_server")
        .arg("--listen")
        .arg("127.0.0.1:0");
    options.env.push((
        "NOTIFY_SOCKET".into(),
        socket_path.to_string_lossy().into_owned(),
    ));
    let server = Server::start_with(options);
    let first = server.first_pid;
    let ready = manager.wait(0, "READY=1 at start", |m| m.has("READY=1"));
    signal(first, libc::SIGHUP);
    let committed = manager.wait(ready + 1, "READY=1 at the commit", |m| m.has("READY=1"));
    let (_, line) = server
        .events
        .wait(0, DEADLINE, "the upgrade to succeed", |l| {
            l.is("upgrade succeeded")
        });
    let second = line.num("successor") as u32;

    // Within the probation (1 s): the second reload.
    signal(first, libc::SIGHUP);
    let handover = manager.wait(committed + 1, "MAINPID=", |m| m.value("MAINPID").is_some());
    manager.with(handover, |m| {
        assert_eq!(m.pid, first);
        assert_eq!(m.value("MAINPID"), Some(second.to_string().as_str()));
    });
    let barrier = manager.wait(handover + 1, "BARRIER=1", |m| m.has("BARRIER=1"));
    let barrier_fd = manager.with(barrier, |m| m.fds.pop().expect("BARRIER=1 carries an fd"));
    // Until systemd answers, the old process neither passes the signal on
    // nor exits.
    assert!(
        Path::new(&format!("/proc/{first}")).exists(),
        "the old process exited before systemd confirmed MAINPID="
    );
    assert!(
        !server
            .events
            .snapshot()
            .iter()
            .any(|l| l.starts_with(&format!("upgrade started pid={second} "))),
        "the successor upgraded before systemd knew it as the main process"
    );
    drop(barrier_fd); // the answer
    let reloading = manager.wait(barrier + 1, "RELOADING=1 from the successor", |m| {
        m.has("RELOADING=1")
    });
    manager.with(reloading, |m| assert_eq!(m.pid, second));
    let (_, line) = server
        .events
        .wait(0, DEADLINE, "the successor's own upgrade", |l| {
            l.is("upgrade succeeded") && l.num("pid") == u64::from(second)
        });
    let third = line.num("successor") as u32;
    assert_ne!(third, second);
    assert_eq!(wait_exit(first, DEADLINE), Some(Some(0)));
}
