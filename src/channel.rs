//! The readiness channel between a process and the successor it starts: one
//! end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`, inherited by the successor
//! at a known fd (`HANDOFF_CHANNEL_FD`).
//!
//! Nothing else can reach it: it has no name in any namespace, so no other
//! user (nor any process that does not hold the fd) can send to it. Each end
//! learns of the other's death as end-of-file. The messages are `sd_notify`
//! style `KEY=VALUE` lines:
//!
//! | from | message | meaning |
//! |---|---|---|
//! | successor | `READY=1` | it serves; commit the handover |
//! | parent | `COMMITTED=1` | the handover is committed: accept from now on |
//! | successor | `HANDED_OVER=1` | it handed over to a successor of its own |
//! | parent | `MAIN=1` | systemd confirmed the successor as its main process (`MAINPID=`) |
//!
//! [`recv_message`] reads any datagram safely: fds attached to it are always
//! closed, and truncated or oversized messages are reported, never fatal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The successor says it serves.
pub(crate) const READY: &str = "READY=1";
/// The parent committed the handover.
pub(crate) const COMMITTED: &str = "COMMITTED=1";
/// The successor handed over in turn.
pub(crate) const HANDED_OVER: &str = "HANDED_OVER=1";
/// The successor is systemd's main process now.
pub(crate) const MAIN: &str = "MAIN=1";

/// The largest message read whole; longer ones are reported as oversized.
const MAX_MESSAGE: usize = 4096;
/// `SCM_MAX_FD`: the most fds the kernel attaches to one message.
const SCM_MAX_FD: usize = 253;

/// One received message and what the kernel said about it.
#[derive(Debug, Default)]
pub(crate) struct Message {
    /// The sender's PID (`SCM_CREDENTIALS`), if the socket passes credentials.
    pub pid: Option<u32>,
    pub text: String,
    /// Why the message cannot be trusted whole (truncated, carried fds), if so.
    pub problem: Option<String>,
}

impl Message {
    /// Whether the message has the line `line` (and no problem).
    pub(crate) fn has(&self, line: &str) -> bool {
        self.problem.is_none() && self.text.lines().any(|l| l == line)
    }
}

/// Reads one message from `fd` without blocking. `Ok(None)` is end-of-file
/// (a stream or seqpacket peer closed). Every fd attached to the message is
/// closed, even when the kernel truncated the control data.
pub(crate) fn recv_message(fd: RawFd) -> io::Result<Option<Message>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // u64 words keep the control buffer aligned for `cmsghdr`.
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe {
        libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
            + libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<RawFd>()) as u32)
    } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut message = Message::default();
    let mut problems = Vec::new();
    let mut fds_closed = 0usize;
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk it within those bounds.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            let len = header.cmsg_len - libc::CMSG_LEN(0) as usize;
            if header.cmsg_level == libc::SOL_SOCKET {
                if header.cmsg_type == libc::SCM_RIGHTS {
                    let count = len / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        // The kernel just installed this fd for us; nobody else owns it.
                        drop(OwnedFd::from_raw_fd(raw));
                        fds_closed += 1;
                    }
                } else if header.cmsg_type == libc::SCM_CREDENTIALS
                    && len >= std::mem::size_of::<libc::ucred>()
                {
                    let creds = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    message.pid = u32::try_from(creds.pid).ok();
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if fds_closed > 0 {
        problems.push(format!("it carried {fds_closed} fds (closed)"));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        problems.push("its control data was truncated".to_owned());
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        problems.push(format!("it was longer than {MAX_MESSAGE} bytes"));
    }
    if n == 0 && problems.is_empty() && message.pid.is_none() {
        return Ok(None);
    }
    let len = (n as usize).min(buf.len());
    message.text = String::from_utf8_lossy(&buf[..len]).into_owned();
    if !problems.is_empty() {
        message.problem = Some(problems.join("; "));
    }
    Ok(Some(message))
}

/// One end of a readiness channel.
pub(crate) struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// Set once the peer closed its end (or reading failed): see [`Channel::next`].
    closed: std::sync::atomic::AtomicBool,
}

impl Channel {
    /// A new pair: this process's end (with `SO_PASSCRED`, so each message
    /// carries its sender's PID), and the end for the successor. Both are
    /// close-on-exec; the spawner places the successor's end without the flag.
    /// Needs a tokio runtime.
    pub(crate) fn pair() -> io::Result<(Channel, OwnedFd)> {
        let mut fds = [-1; 2];
        // SAFETY: socketpair writes two new fds into the array on success.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair just returned these fds; nothing else owns them.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::PassCred, &true)?;
        Ok((Channel::from_fd(ours)?, theirs))
    }

    /// Wraps an inherited end (already checked to be a seqpacket socket).
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        // SAFETY: F_SETFL with O_NONBLOCK only changes the file status flags.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open for as
        // long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Channel {
            fd,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends one message. Fails (`EPIPE`, `ECONNREFUSED`) once the peer is gone.
    pub(crate) fn send(&self, text: &str) -> io::Result<()> {
        // SAFETY: text is a live buffer of text.len() bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                text.as_ptr().cast(),
                text.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next message, for a caller that also waits for other events:
    /// once the peer closed its end (or reading failed, which is logged) it
    /// never resolves again.
    pub(crate) async fn next(&self) -> Message {
        use std::sync::atomic::Ordering;
        if !self.closed.load(Ordering::Relaxed) {
            match self.recv().await {
                Ok(Some(message)) => return message,
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot read the readiness channel"),
            }
            self.closed.store(true, Ordering::Relaxed);
        }
        std::future::pending().await
    }

    /// Waits for the next message; `Ok(None)` once the peer closed its end.
    pub(crate) async fn recv(&self) -> io::Result<Option<Message>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_message(fd.as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// How many of this process's fds are open on `path`.
    fn fds_on(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == path))
            .count()
    }

    #[tokio::test]
    async fn messages_carry_the_pid_and_eof_means_the_peer_is_gone() {
        let (ours, theirs) = Channel::pair().unwrap();
        let theirs = Channel::from_fd(theirs).unwrap();
        theirs.send(READY).unwrap();
        let message = ours.recv().await.unwrap().unwrap();
        assert!(message.has(READY));
        assert_eq!(message.pid, Some(std::process::id()));
        ours.send(COMMITTED).unwrap();
        assert!(theirs.recv().await.unwrap().unwrap().has(COMMITTED));
        drop(ours);
        assert!(theirs.recv().await.unwrap().is_none(), "end-of-file");
        assert!(theirs.send(READY).is_err(), "the peer is gone");
    }

    #[tokio::test]
    async fn attached_fds_are_closed_and_never_fatal() {
        let (ours, theirs) = Channel::pair().unwrap();
        let tmp = crate::testutil::TempDir::new("channel-fds");
        let path = tmp.path().join("marker");
        std::fs::write(&path, b"").unwrap();
        // 200 fds in one message (more than any fixed small buffer holds).
        let files: Vec<std::fs::File> = (0..200)
            .map(|_| std::fs::File::open(&path).unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        let iov = [io::IoSlice::new(READY.as_bytes())];
        nix::sys::socket::sendmsg::<()>(
            theirs.as_raw_fd(),
            &iov,
            &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(files);
        let message = ours.recv().await.unwrap().unwrap();
        assert!(
            message.problem.as_deref().unwrap_or("").contains("200 fds"),
            "{message:?}"
        );
        assert!(!message.has(READY), "a message with fds does not count");
        assert_eq!(fds_on(&path), 0, "every received fd was closed");
        // An oversized message is reported, and the channel still works.
        let big = vec![b'x'; MAX_MESSAGE + 100];
        nix::sys::socket::send(
            theirs.as_raw_fd(),
            &big,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let message = ours.recv().await.unwrap().unwrap();
        assert!(message.problem.unwrap().contains("longer than"));
        nix::sys::socket::send(
            theirs.as_raw_fd(),
            READY.as_bytes(),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        assert!(ours.recv().await.unwrap().unwrap().has(READY));
    }
}
