//! A fake service manager: systemd's notify socket (a datagram socket with
//! `SO_PASSCRED`, so every message carries its sender's PID), recording
//! every message and the fds it carries (a `BARRIER=1` is answered by
//! dropping its fd).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

use super::DEADLINE;

/// One notify datagram.
pub struct Message {
    pub pid: u32,
    pub text: String,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    pub fn value(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The fake service manager.
pub struct Manager {
    messages: Arc<(Mutex<Vec<Message>>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Manager {
    pub fn bind(path: &Path) -> Manager {
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
    pub fn wait(&self, from: usize, what: &str, matches: impl Fn(&Message) -> bool) -> usize {
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

    pub fn with<T>(&self, i: usize, f: impl FnOnce(&mut Message) -> T) -> T {
        f(&mut self.messages.0.lock().unwrap()[i])
    }

    pub fn all(&self) -> Vec<(u32, String)> {
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
