//! The emergency shell: `/bin/sh` on /dev/console in its own session with the console
//! as controlling tty, respawned whenever it exits, while PID 1 reaps forever.

use crate::log::CONSOLE;
use std::fs::{File, OpenOptions};
use std::process::Command;
use std::time::Duration;

/// The shell (busybox in the initramfs).
pub const SHELL: &str = "/bin/sh";

/// Prints `why` on the console and runs the shell forever.
pub fn shell(why: &str) -> ! {
    for line in why.lines() {
        crate::log::console(line);
    }
    crate::log::console(&format!(
        "starting an emergency shell ({SHELL}) on {CONSOLE}"
    ));
    loop {
        match spawn() {
            Ok(pid) => reap_until(pid),
            Err(e) => error!("emergency shell: {e}"),
        }
        crate::log::console("emergency shell exited; starting a new one");
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn open_console() -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(CONSOLE)
}

fn spawn() -> std::io::Result<i32> {
    let tty = open_console()?;
    let mut cmd = Command::new(SHELL);
    cmd.env("PATH", crate::exec::PATH)
        .env("HOME", "/")
        .env("TERM", "linux")
        .stdin(tty.try_clone()?)
        .stdout(tty.try_clone()?)
        .stderr(tty);
    crate::console::with_controlling_tty(&mut cmd);
    cmd.spawn().map(|c| c.id() as i32)
}

/// Reaps every child until `pid` is among them (or no children are left).
fn reap_until(pid: i32) {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(None::<nix::unistd::Pid>, None) {
            Ok(WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _, _)) if p.as_raw() == pid => {
                return
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
