//! The console login: a root shell on the serial console once the boot is ready,
//! respawned when it exits, so that `kimg console VM` gives a prompt as xcluster's
//! `vm N` did. `kimg.console=off` on the kernel command line leaves the console alone.
//!
//! The shell is a login shell (`sh -l`: /etc/profile) in its own session with the
//! serial line as controlling tty, so job control and ctrl-c work. Once it runs, the
//! kernel's console loglevel is lowered so that log lines (kimg-init's own errors go to
//! /dev/kmsg at level 3) do not garble the prompt; they stay in `dmesg`.

use crate::reaper::REAPER;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The consoles the kernel writes to; the last one is /dev/console.
pub const ACTIVE_CONSOLES: &str = "/sys/class/tty/console/active";
/// The shell, run as `sh -l`.
pub const SHELL: &str = "/bin/sh";
/// root's home, the shell's working directory.
pub const HOME: &str = "/root";
/// TERM of the console shell: what a serial line promises (any terminal speaks it).
pub const TERM: &str = "vt100";
/// The kernel's printk levels; the first number is the console loglevel.
pub const PRINTK: &str = "/proc/sys/kernel/printk";
/// Console loglevel while a shell owns the console: only emerg, alert and crit print
/// (kimg-init's errors are level 3, the boot's `loglevel=4` would show them).
pub const QUIET_LOGLEVEL: &str = "3";
/// First back-off after a shell that died young; doubles up to [`MAX_DELAY`].
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// Longest wait between two respawns of a shell that keeps dying.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A shell that lived this long exited on purpose (`exit`, ctrl-d): respawn at once.
pub const STABLE: Duration = Duration::from_secs(10);

/// Quiets the kernel console and starts the thread that keeps a shell on it.
pub fn start() -> std::io::Result<()> {
    if let Err(e) = std::fs::write(PRINTK, QUIET_LOGLEVEL) {
        warn!("console: cannot lower the console loglevel in {PRINTK}: {e}");
    }
    std::thread::Builder::new()
        .name("console".into())
        .spawn(keep_a_shell)
        .map(drop)
}

/// The respawn loop: one shell at a time, back-off while shells die young.
fn keep_a_shell() {
    let tty = tty_path(std::fs::read_to_string(ACTIVE_CONSOLES).ok().as_deref());
    let mut delay = MIN_DELAY;
    loop {
        let started = Instant::now();
        match spawn(&tty) {
            // PID 1's signal loop reaps it and hands the status over.
            Ok(pid) => {
                let code = REAPER.wait(pid, None);
                info!("console shell on {} exited ({code:?})", tty.display());
            }
            Err(e) => error!("console: cannot start {SHELL} on {}: {e}", tty.display()),
        }
        if started.elapsed() >= STABLE {
            delay = MIN_DELAY;
        } else {
            std::thread::sleep(delay);
            delay = next_delay(delay);
        }
    }
}

/// The back-off after `delay`: doubled, at most [`MAX_DELAY`].
pub fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(MAX_DELAY)
}

/// The tty device behind /dev/console (the last of the active consoles, e.g.
/// `ttyS0`); /dev/console itself when that cannot be read or looks odd.
pub fn tty_path(active: Option<&str>) -> PathBuf {
    let name = active.and_then(|a| a.split_whitespace().last());
    match name {
        Some(n) if n.bytes().all(|b| b.is_ascii_alphanumeric()) => Path::new("/dev").join(n.trim()),
        _ => PathBuf::from(crate::log::CONSOLE),
    }
}

fn open_tty(path: &Path) -> std::io::Result<File> {
    // O_NOCTTY: PID 1 is a session leader and must not take the tty as its own.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(path)
}

/// Starts `sh -l` on `tty` as session leader with the tty as controlling terminal.
fn spawn(tty: &Path) -> std::io::Result<i32> {
    let t = open_tty(tty)?;
    let home = if Path::new(HOME).is_dir() { HOME } else { "/" };
    let mut cmd = Command::new(SHELL);
    cmd.arg("-l")
        .env_clear()
        .env("PATH", crate::exec::PATH)
        .env("HOME", home)
        .env("TERM", TERM)
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("SHELL", SHELL)
        .current_dir(home)
        .stdin(t.try_clone()?)
        .stdout(t.try_clone()?)
        .stderr(t);
    with_controlling_tty(&mut cmd);
    REAPER.spawn(&mut cmd).map(|c| c.id() as i32)
}

/// Has `cmd` start a session whose controlling terminal is its stdin (a tty), so
/// ctrl-c and job control reach it (console shells, the emergency shell).
pub fn with_controlling_tty(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (setsid, ioctl) on fd 0, which is the tty.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tty_is_the_last_active_console() {
        assert_eq!(tty_path(Some("ttyS0\n")), Path::new("/dev/ttyS0"));
        assert_eq!(tty_path(Some("tty0 ttyS0\n")), Path::new("/dev/ttyS0"));
        assert_eq!(tty_path(Some("")), Path::new(crate::log::CONSOLE));
        assert_eq!(tty_path(Some("../x")), Path::new(crate::log::CONSOLE));
        assert_eq!(tty_path(None), Path::new(crate::log::CONSOLE));
    }

    #[test]
    fn back_off_doubles_up_to_the_cap() {
        let mut d = MIN_DELAY;
        let mut seen = vec![d];
        for _ in 0..10 {
            d = next_delay(d);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_secs(2));
        assert_eq!(*seen.last().unwrap(), MAX_DELAY);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
}
