//! The wall clock set from the host (`set_clock` agent op): a restored VM's clock is
//! behind by the time between save and restore.

use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// Sets CLOCK_REALTIME to `secs`.`nanos` since the epoch.
pub fn set(secs: i64, nanos: u32) -> Result<(), String> {
    if nanos >= 1_000_000_000 || secs < 0 {
        return Err(format!("set_clock: {secs}.{nanos:09} is not a time"));
    }
    let ts = TimeSpec::new(secs, i64::from(nanos));
    clock_settime(ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("set_clock: clock_settime: {e}"))?;
    info!("clock set from the host to {secs}.{nanos:09}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonsense_times_are_refused_before_the_kernel_sees_them() {
        assert!(set(1, 1_000_000_000).unwrap_err().contains("not a time"));
        assert!(set(-5, 0).is_err());
    }
}
