//! Reaping for PID 1 without stealing exit statuses from the agent's exec threads.
//!
//! PID 1 must `waitpid(-1)` to collect orphans, which would also collect the children
//! that exec threads wait for. So exec children are spawned through [`Reaper::spawn`],
//! which registers the pid *while holding the lock*; the reaper holds the same lock
//! while it calls `waitpid`, so it can never collect such a child before it is
//! registered (nor while std's spawn waits for a child whose exec failed).
//! Exec threads never call `Child::wait`; they wait on the map with [`Reaper::wait`].
//! Statuses of unregistered pids (orphans) are dropped.
//!
//! Every child of PID 1 starts through [`Reaper::spawn`], which also clears the
//! signal mask PID 1 runs with.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Pids being waited for, with their exit code once reaped.
pub struct Reaper {
    watched: Mutex<BTreeMap<i32, Option<i32>>>,
    exited: Condvar,
}

/// The one reaper of this process.
pub static REAPER: Reaper = Reaper::new();

/// The exit code a shell would report: the code, or 128 + the signal number.
pub fn exit_code(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

impl Default for Reaper {
    fn default() -> Self {
        Self::new()
    }
}

impl Reaper {
    /// An empty reaper.
    pub const fn new() -> Reaper {
        Reaper {
            watched: Mutex::new(BTreeMap::new()),
            exited: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<i32, Option<i32>>> {
        // Nothing panics while holding the lock (and panics abort), so a poisoned
        // lock still holds consistent data.
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` with no signal blocked and registers its pid before the reaper
    /// can see it exit.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        // PID 1 blocks the signals its main loop reads (SIGCHLD, SIGTERM, ...), and a
        // blocked mask survives exec: a service would ignore the SIGTERM that stops
        // it, and a shell's command the ctrl-c meant for it.
        // SAFETY: runs in the forked child before exec; pthread_sigmask is
        // async-signal-safe and touches nothing of the parent's memory.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::signal::SigSet::empty().thread_set_mask()?;
                Ok(())
            });
        }
        let mut watched = self.lock();
        let child = cmd.spawn()?;
        watched.insert(child.id() as i32, None);
        Ok(child)
    }

    /// Records `code` for `pid` as [`Reaper::reap_all`] does; false if nobody watches
    /// `pid` (an orphan).
    #[cfg(test)]
    pub fn record(&self, pid: i32, code: i32) -> bool {
        let mut watched = self.lock();
        match watched.get_mut(&pid) {
            Some(slot) => {
                *slot = Some(code);
                self.exited.notify_all();
                true
            }
            None => false,
        }
    }

    /// Reaps every exited child without blocking. Returns whether children remain.
    ///
    /// Holds the lock while reaping, so it never runs during [`Reaper::spawn`]: std's
    /// spawn itself waits for a child whose exec failed, and panics if that child was
    /// reaped from under it.
    pub fn reap_all(&self) -> bool {
        let mut watched = self.lock();
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return true,
                Ok(status) => {
                    if let Some((pid, code)) = exit_code(status) {
                        if let Some(slot) = watched.get_mut(&pid) {
                            *slot = Some(code);
                            self.exited.notify_all();
                        }
                    }
                }
                Err(Errno::EINTR) => {}
                Err(_) => return false, // ECHILD: no children left
            }
        }
    }

    /// Waits for `pid`'s exit code until `deadline`; `None` on timeout (the pid stays
    /// watched) or if `pid` is not watched.
    pub fn wait(&self, pid: i32, deadline: Option<Instant>) -> Option<i32> {
        let mut watched = self.lock();
        loop {
            match watched.get(&pid) {
                None => return None,
                Some(Some(code)) => {
                    let code = *code;
                    watched.remove(&pid);
                    return Some(code);
                }
                Some(None) => {}
            }
            watched = match deadline {
                None => self.exited.wait(watched).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.exited
                        .wait_timeout(watched, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Sends `sig` to the process group `pid` leads, if `pid` has not been reaped (so
    /// the pid cannot have been reused).
    pub fn kill_group(&self, pid: i32, sig: Signal) -> nix::Result<()> {
        let watched = self.lock();
        if matches!(watched.get(&pid), Some(None)) {
            kill(Pid::from_raw(-pid), sig)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Once;
    use std::time::Duration;

    /// Runs a background reaper, as PID 1's SIGCHLD handling does, for tests that
    /// spawn children through [`REAPER`]. Every child of the test process must be
    /// spawned that way.
    pub(crate) fn start_test_reaper() {
        static START: Once = Once::new();
        START.call_once(|| {
            std::thread::spawn(|| loop {
                REAPER.reap_all();
                std::thread::sleep(Duration::from_millis(5));
            });
        });
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by the test reaper, as in PID 1
    fn children_start_with_no_signal_blocked() {
        start_test_reaper();
        let mut mask = nix::sys::signal::SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        // As PID 1 has it; only this test's thread, and only while it spawns.
        let old = mask
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .unwrap();
        // grep itself: a shell (dash) would clear the mask it was given.
        let mut cmd = Command::new("grep");
        cmd.args(["SigBlk", "/proc/self/status"])
            .stdout(std::process::Stdio::piped())
            .current_dir("/")
            .process_group(0);
        let spawned = REAPER.spawn(&mut cmd);
        old.thread_set_mask().unwrap();
        let mut child = spawned.unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert_eq!(REAPER.wait(child.id() as i32, None), Some(0));
        assert_eq!(out.trim(), "SigBlk:\t0000000000000000", "{out}");
    }

    #[test]
    fn statuses_of_unwatched_pids_are_dropped() {
        let r = Reaper::new();
        assert!(!r.record(424242, 0));
        assert_eq!(r.wait(424242, None), None);
    }

    #[test]
    fn a_recorded_status_is_handed_out_once() {
        let r = Reaper::new();
        r.lock().insert(7, None);
        let soon = Some(Instant::now() + Duration::from_millis(20));
        assert_eq!(r.wait(7, soon), None, "times out while running");
        assert!(r.record(7, 3));
        assert_eq!(r.wait(7, None), Some(3));
        assert_eq!(r.wait(7, None), None, "forgotten after");
    }

    #[test]
    fn waiters_wake_on_record() {
        static R: Reaper = Reaper::new();
        R.lock().insert(9, None);
        let t = std::thread::spawn(|| R.wait(9, None));
        std::thread::sleep(Duration::from_millis(20));
        assert!(R.record(9, 137));
        assert_eq!(t.join().unwrap(), Some(137));
    }

    #[test]
    fn exit_codes_like_a_shell() {
        let p = Pid::from_raw(5);
        assert_eq!(exit_code(WaitStatus::Exited(p, 2)), Some((5, 2)));
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some((5, 137))
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    #[allow(clippy::zombie_processes, reason = "the reaper thread reaps it")]
    fn real_child_through_the_reaper() {
        start_test_reaper();
        let child = REAPER
            .spawn(Command::new("sh").args(["-c", "exit 5"]))
            .unwrap();
        assert_eq!(REAPER.wait(child.id() as i32, None), Some(5));
    }
}
