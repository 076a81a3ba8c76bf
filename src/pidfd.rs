//! Signals through a pidfd: they reach that very process, or nobody (once
//! it is reaped, `ESRCH`), never a process that reused its PID.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::signal::Signal;

/// Sends `signal` to the process `pidfd` refers to.
pub(crate) fn send_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we borrow for the call, a signal
    // number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
