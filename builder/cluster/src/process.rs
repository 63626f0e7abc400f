//! The host processes of a cluster (QEMU, vde_switch): are they still running, and
//! are they still the process kimg started.
//!
//! A pid alone is not an identity: once the process exits the kernel may give the
//! number to any other process of the user. kimg records each daemon's start time
//! (`/proc/PID/stat` field 22, clock ticks since boot) beside its pid file right
//! after starting it, and signals a pid only while the process there started at that
//! very tick. Without a record of that pid (a start that died before writing it,
//! or a pid file written again since) the process must have started before its pid
//! file was written, which a recycled pid cannot.

use crate::qemu::VmPaths;
use kimg_util::fs::{read_to_string_nofollow, IoError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The instant `after` from now, saturating: a huge timeout (`Duration::MAX`) means
/// "about forever", never an overflow panic.
pub fn deadline(after: Duration) -> Instant {
    deadline_from(Instant::now(), after)
}

/// The instant `after` from `start`, saturating like [`deadline`].
pub fn deadline_from(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .or_else(|| start.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(start)
}

/// How long to wait for a process to go after SIGKILL before calling it stuck
/// (uninterruptible sleep in the kernel, e.g. on a hung NFS or disk).
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// The record of a daemon's start time beside its pid file (`qemu.pid` ->
/// `qemu.pid.start`).
pub fn start_record(pidfile: &Path) -> PathBuf {
    let mut p = pidfile.as_os_str().to_owned();
    p.push(".start");
    PathBuf::from(p)
}

/// The start time of `pid` in clock ticks since boot, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Records the start time of the process named by `pidfile` (just started by kimg).
pub fn record_start(pidfile: &Path) -> Result<i32, IoError> {
    let text = read_to_string_nofollow(pidfile)?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        IoError::new(
            pidfile,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a pid"),
        )
    })?;
    let start = start_time(pid).ok_or_else(|| {
        IoError::new(
            pidfile,
            std::io::Error::other(format!("process {pid} exited right after its start")),
        )
    })?;
    kimg_util::fs::write_atomic(&start_record(pidfile), format!("{pid} {start}\n"))?;
    Ok(pid)
}

/// The pid in `pidfile` while that process still runs, is called `comm_prefix`...
/// and is the very process started then (see the module doc).
pub fn daemon_pid(pidfile: &Path, comm_prefix: &str) -> Option<Pid> {
    let pid: i32 = read_to_string_nofollow(pidfile).ok()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if !comm.starts_with(comm_prefix) || !alive(pid) {
        return None;
    }
    let started = start_time(pid)?;
    let record = read_to_string_nofollow(&start_record(pidfile)).ok();
    let mut words = record
        .iter()
        .flat_map(|r| r.split_whitespace())
        .map(|w| w.parse::<u64>().ok());
    let same = match (words.next().flatten(), words.next().flatten()) {
        // The record is of this pid: it must be the very same start.
        (Some(p), Some(start)) if u64::try_from(pid).ok() == Some(p) => start == started,
        // No record, or one of another pid (the pid file was written again since,
        // e.g. QEMU restarted by hand): the process must predate its pid file.
        _ => started_before(started, pidfile),
    };
    same.then_some(Pid::from_raw(pid))
}

/// Whether a process that started `ticks` after boot started before `file` was
/// last written (with a second of slack for the clocks' granularity).
fn started_before(ticks: u64, file: &Path) -> bool {
    let Ok(mtime) = fs::symlink_metadata(file).and_then(|m| m.modified()) else {
        return false;
    };
    let Some(uptime) = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
    else {
        return false;
    };
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    };
    let age = uptime - ticks as f64 / hz;
    let Ok(written_ago) = SystemTime::now().duration_since(mtime) else {
        return true;
    };
    age + 1.0 >= written_ago.as_secs_f64()
}

/// The pid of a VM's QEMU if it is still running (and is the QEMU kimg started).
pub fn qemu_pid(paths: &VmPaths) -> Option<Pid> {
    daemon_pid(&paths.pidfile(), "qemu")
}

/// The number of a `KEY: N kB` line of a /proc file (status, smaps_rollup,
/// meminfo), if the file and the line are there.
pub fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The resident set of process `pid` in KiB (`VmRSS` of /proc/PID/status), if it runs.
pub fn rss_kib(pid: Pid) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS")
}

/// The proportional set of process `pid` in KiB (`Pss` of /proc/PID/smaps_rollup):
/// its resident pages, each shared one divided among the processes that map it, so
/// pages KSM merged across VMs count once in a sum over their QEMUs.
pub fn pss_kib(pid: Pid) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

/// The CPU time (utime + stime) process `pid` used so far, if it runs.
pub fn cpu_time(pid: Pid) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ticks = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    };
    Some(Duration::from_secs_f64(
        (ticks(14)? + ticks(15)?) as f64 / hz,
    ))
}

/// Whether process `pid` exists and is not a zombie (a killed daemon whose parent,
/// e.g. a container's PID 1, does not reap keeps its /proc entry).
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest.trim_start());
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}

/// Whether any QEMU runs on the host (any user's, any cluster's; a zombie does not
/// count: the QEMUs of a stopped cluster are ones for a moment).
pub fn any_qemu_runs() -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return true; // cannot tell: say yes, the careful answer
    };
    procs.filter_map(Result::ok).any(|e| {
        let pid = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
        pid.is_some_and(|pid| {
            fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("qemu-system"))
                && alive(pid)
        })
    })
}

/// Waits until `running` says no or `until` passes; whether it is gone.
pub fn wait_gone(running: impl Fn() -> bool, until: Instant) -> bool {
    loop {
        if !running() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs `pid` once and waits at most `wait` for `running` to say it is gone;
/// whether it went. A process in uninterruptible sleep may outlive any signal: the
/// caller reports it instead of waiting forever.
pub fn kill_and_wait(pid: Pid, running: impl Fn() -> bool, wait: Duration) -> bool {
    let _ = kill(pid, Signal::SIGKILL);
    wait_gone(running, deadline(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_qemu_counts_until_it_is_a_zombie() {
        // A program named like QEMU (comm is its file name's first 15 bytes).
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-system-x86_64");
        fs::copy("/bin/sleep", &fake).unwrap();
        let mut child = std::process::Command::new(&fake).arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(alive(pid) && any_qemu_runs());
        // Killed and not reaped yet: a zombie, which no longer counts.
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        assert!(wait_gone(|| alive(pid), deadline(Duration::from_secs(10))));
        assert!(
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok(),
            "reaped too early"
        );
        child.wait().unwrap();
    }

    #[test]
    fn own_rss_and_cpu_time_are_read() {
        let me = Pid::this();
        let rss = rss_kib(me).unwrap();
        assert!(rss > 100 && rss < 10 << 20, "{rss} KiB");
        // Shared library pages count in part: never more than the resident set.
        let pss = pss_kib(me).unwrap();
        assert!(pss > 0 && pss <= rss, "pss {pss} KiB, rss {rss} KiB");
        // Burn a little CPU so that at least one tick is counted.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time(me).unwrap() > Duration::ZERO);
        assert_eq!(rss_kib(Pid::from_raw(i32::MAX - 1)), None);
        assert_eq!(pss_kib(Pid::from_raw(i32::MAX - 1)), None);
        assert!(proc_kib("/proc/meminfo", "MemAvailable").is_some_and(|k| k > 0));
        // A key is a whole key: "Pss" is not "Pss_Anon".
        assert_eq!(proc_kib("/proc/meminfo", "MemAvail"), None);
    }

    #[test]
    fn deadlines_saturate() {
        let d = deadline(Duration::MAX);
        assert!(d > Instant::now() + Duration::from_secs(3600));
        let d = deadline(Duration::from_secs(u64::MAX));
        assert!(d > Instant::now());
    }

    #[test]
    fn a_process_that_never_goes_is_given_up_on_after_the_wait() {
        let t = Instant::now();
        // Pid of a process that does not exist: SIGKILL fails, "running" stays true.
        let gone = kill_and_wait(
            Pid::from_raw(i32::MAX - 1),
            || true,
            Duration::from_millis(300),
        );
        assert!(!gone);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A pid file that names another process of ours (a recycled pid) is not taken
    /// for the daemon, even when its name starts like the daemon's.
    #[test]
    fn a_recycled_pid_with_the_daemons_name_is_not_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-fake");
        fs::copy("/bin/sleep", &fake).unwrap();
        let mut child = Command::new(&fake).arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let pidfile = dir.path().join("qemu.pid");
        fs::write(&pidfile, format!("{pid}\n")).unwrap();
        // As started: it is the daemon.
        record_start(&pidfile).unwrap();
        assert_eq!(daemon_pid(&pidfile, "qemu"), Some(Pid::from_raw(pid)));
        // The record says another start time: not the daemon.
        fs::write(start_record(&pidfile), format!("{pid} 1\n")).unwrap();
        assert_eq!(daemon_pid(&pidfile, "qemu"), None);
        // A record of another pid and a pid file written since the process
        // started (the daemon restarted by hand): the daemon.
        fs::write(start_record(&pidfile), "1 1\n").unwrap();
        fs::write(&pidfile, format!("{pid}\n")).unwrap();
        assert_eq!(daemon_pid(&pidfile, "qemu"), Some(Pid::from_raw(pid)));
        // No record, and the pid file is older than the process: not the daemon.
        fs::remove_file(start_record(&pidfile)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(&pidfile)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(daemon_pid(&pidfile, "qemu"), None);
        // A symlinked pid file is never read.
        let link = dir.path().join("link.pid");
        std::os::unix::fs::symlink(&pidfile, &link).unwrap();
        assert_eq!(daemon_pid(&link, "qemu"), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
