//! Logging for PID 1: lines `<N>kimg-init: ...` to /dev/kmsg, /dev/console as fallback,
//! and a panic hook that logs before the abort.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

/// The kernel log device; lines written here get a `<N>` level prefix.
pub const KMSG: &str = "/dev/kmsg";
/// The system console (the serial console in a kimg VM).
pub const CONSOLE: &str = "/dev/console";
/// Prefix of every line kimg-init writes.
pub const PREFIX: &str = kimg_contract::boot::LOG_PREFIX;

/// Kernel log levels kimg-init uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed (shown on the console even with `loglevel=4`).
    Err = 3,
    /// Something is odd but the boot goes on.
    Warn = 4,
    /// Progress.
    Info = 6,
}

/// /dev/kmsg, kept open once opened: the descriptor stays valid while stage 1 moves
/// /dev into the new root and after the chroot.
static KMSG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Logs `msg` at `level`: to /dev/kmsg, else to /dev/console, else to stderr.
pub fn log(level: Level, msg: &str) {
    let line = format!("<{}>{PREFIX}{msg}\n", level as u8);
    if write_kmsg(line.as_bytes()).is_ok() {
        return;
    }
    // kmsg is unavailable (no /dev yet, or not PID 1): the console gets the line
    // without the level; stderr is the last resort and its failure is nowhere to go.
    let plain = format!("{PREFIX}{msg}\n");
    if write_device(CONSOLE, plain.as_bytes()).is_err() {
        let _ = std::io::stderr().write_all(plain.as_bytes());
    }
}

/// Writes `kimg-init: msg` straight to /dev/console (falls back to stderr), so that it
/// shows on the serial console whatever the kernel's loglevel.
pub fn console(msg: &str) {
    let line = format!("{PREFIX}{msg}\n");
    if write_device(CONSOLE, line.as_bytes()).is_err() {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn write_kmsg(bytes: &[u8]) -> std::io::Result<()> {
    // Logging must work even if a thread died holding the lock.
    let mut kmsg = KMSG_FILE.lock().unwrap_or_else(|e| e.into_inner());
    if kmsg.is_none() {
        *kmsg = Some(open_device(KMSG)?);
    }
    match kmsg.as_mut() {
        Some(f) => f.write_all(bytes),
        None => Err(std::io::ErrorKind::NotFound.into()),
    }
}

fn open_device(path: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(path)
}

fn write_device(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    open_device(path)?.write_all(bytes)
}

/// Makes a panic log its message before the (panic=abort) abort.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log(Level::Err, &format!("PANIC: {info}"));
    }));
}

/// Logs a formatted message at info level.
macro_rules! info {
    ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, &format!($($t)*)) };
}

/// Logs a formatted message at warning level.
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, &format!($($t)*)) };
}

/// Logs a formatted message at error level.
macro_rules! error {
    ($($t:tt)*) => { $crate::log::log($crate::log::Level::Err, &format!($($t)*)) };
}
