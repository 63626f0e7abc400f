//! Waiting for a virtio-serial port's host side without spinning.
//!
//! While no host client is connected, a port reads EOF and polls POLLHUP at once,
//! so neither read nor poll can block on it. The kernel signals the port's owner
//! (O_ASYNC) when the host connects and when bytes come, though: a port armed with
//! [`arm`] directs that signal (SIGIO) at the calling thread, which keeps it
//! blocked and sleeps in [`wait`] until it comes (or a fallback timeout passes).
//! Nine ports that slept 20-50 ms between looks cost an idle VM a tenth of a
//! core under TCG; now an idle port costs nothing until the host comes.

use nix::sys::signal::{SigSet, Signal};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Longest sleep of an armed port with no host: its events end the sleep at once;
/// this bounds a request's latency if one were missed. Nine ports waking every
/// 500 ms were most of an idle VM's wakeups (its host CPU under TCG: 0.87% of a
/// core per VM, 0.38% at 10 s).
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// The signal the kernel sends for a port's events.
const SIG: Signal = Signal::SIGIO;
// Linux's fcntl ABI (asm-generic/fcntl.h); the libc crate lacks them for musl.
const F_SETSIG: nix::libc::c_int = 10;
const F_SETOWN_EX: nix::libc::c_int = 15;
const F_OWNER_TID: nix::libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    kind: nix::libc::c_int,
    pid: nix::libc::pid_t,
}

/// Directs the port's host-connected and data-ready signal at the calling thread
/// and blocks it there, so it stays pending for [`wait`]. Threads spawned later
/// from this one inherit the mask: children must unblock what they need (exec
/// does, for every signal).
pub fn arm(port: BorrowedFd<'_>) -> nix::Result<()> {
    SigSet::from(SIG).thread_block()?;
    let fd = port.as_raw_fd();
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: nix::unistd::gettid().as_raw(),
    };
    // SAFETY: fcntl on a descriptor we hold, with a pointer to a valid
    // f_owner_ex that lives across the call.
    let r = unsafe { nix::libc::fcntl(fd, F_SETOWN_EX, &raw const owner) };
    nix::errno::Errno::result(r)?;
    // SAFETY: fcntl on a descriptor we hold; integer arguments only.
    let r = unsafe { nix::libc::fcntl(fd, F_SETSIG, SIG as nix::libc::c_int) };
    nix::errno::Errno::result(r)?;
    // SAFETY: fcntl on a descriptor we hold; integer arguments only.
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFL) };
    nix::errno::Errno::result(flags)?;
    // SAFETY: as above.
    let r = unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFL, flags | nix::libc::O_ASYNC) };
    nix::errno::Errno::result(r).map(drop)
}

/// Sleeps until the armed port's signal comes (host connected, bytes in) or
/// `max` passes. A signal that came since the last wait returns at once, so an
/// event between a look at the port and this call is not missed.
pub fn wait(max: Duration) {
    let set = SigSet::from(SIG);
    let ts = nix::sys::time::TimeSpec::from_duration(max);
    // SAFETY: sigtimedwait with a valid signal set and timespec that outlive the
    // call and a null siginfo pointer (allowed); it only consumes a pending signal.
    unsafe {
        nix::libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), ts.as_ref());
    }
}

/// Waits while a port has no host: until its event (at most [`MAX_WAIT`]) if it was
/// [`arm`]ed, else `poll_every` (arming failed, or a test's socket).
pub fn idle(armed: bool, poll_every: Duration) {
    if armed {
        wait(MAX_WAIT);
    } else {
        std::thread::sleep(poll_every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// Bytes arriving on an armed descriptor end the wait long before its timeout
    /// (a socket stands in for the port: the kernel signals both the same way).
    #[test]
    fn bytes_on_an_armed_descriptor_end_the_wait() {
        let t = std::thread::spawn(|| {
            let (mine, mut theirs) = UnixStream::pair().unwrap();
            arm(mine.as_fd()).unwrap();
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                theirs.write_all(b"x").unwrap();
                theirs
            });
            let start = Instant::now();
            wait(Duration::from_secs(30));
            let waited = start.elapsed();
            drop(writer.join().unwrap());
            waited
        });
        assert!(t.join().unwrap() < Duration::from_secs(20));
    }

    /// With nothing happening, the wait ends at its timeout.
    #[test]
    fn an_idle_wait_ends_at_its_timeout() {
        let t = std::thread::spawn(|| {
            let (mine, _theirs) = UnixStream::pair().unwrap();
            arm(mine.as_fd()).unwrap();
            let start = Instant::now();
            wait(Duration::from_millis(200));
            start.elapsed()
        });
        assert!(t.join().unwrap() >= Duration::from_millis(190));
    }
}
