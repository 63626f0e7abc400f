//! Power off: stop every process, sync, unmount, remount / read-only, power off.

use crate::mounts;
use crate::reaper::REAPER;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sync, Pid};
use std::time::{Duration, Instant};

/// How long processes get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);

/// Powers the machine off. Never returns; if the power-off call fails, sleeps forever.
pub fn power_off(reason: &str) -> ! {
    info!("powering off ({reason})");
    crate::services::stop();
    signal_all(Signal::SIGTERM);
    if !reap_for(GRACE) {
        signal_all(Signal::SIGKILL);
        reap_for(Duration::from_millis(500));
    }
    sync();
    if let Err(e) = mounts::unmount_all() {
        warn!("shutdown: {e}");
    }
    sync();
    let e = match reboot(RebootMode::RB_POWER_OFF) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    error!("power off failed: {e}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn signal_all(sig: Signal) {
    // kill(-1) from PID 1 reaches every process but itself; ESRCH means none left.
    if let Err(e) = kill(Pid::from_raw(-1), sig) {
        if e != nix::errno::Errno::ESRCH {
            warn!("shutdown: kill(-1, {sig}): {e}");
        }
    }
}

/// Reaps until no children are left (true) or `limit` passes (false).
fn reap_for(limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !REAPER.reap_all() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
