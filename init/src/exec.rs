//! The agent's exec: start a program (pipes, or a PTY for `-t` and shells) with a
//! fixed environment, and pump its output to the host in bounded pieces.
//!
//! One thread (the session's) does everything with poll(2): no reader threads per
//! exec. Output is read only while the outgoing buffer has room, so what kimg-init
//! holds per exec is bounded whatever the program prints; the program waits on its
//! full pipe instead. When the started process exits, what its pipes (or the PTY)
//! hold at that moment is drained and the exec ends, even if a background child
//! keeps the pipes open (docker exec's rule). Children go through the [`REAPER`].

use crate::reaper::REAPER;
use kimg_contract::agent::{ExecResult, ExecSpec, Kind, MAX_FRAME};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::Signal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// PATH of everything kimg-init starts (exec'd commands, services, hooks, the
/// emergency shell); /usr/local first, where overlays put their own tools.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// HOME of exec'd programs.
pub const HOME: &str = "/root";
/// Working directory of exec'd programs (login shells start in [`HOME`]).
pub const CWD: &str = "/";
/// The shell of `kimg shell` and of login execs.
pub const SHELL: &str = "/bin/sh";
/// Output kept per stream by [`run`] (kimg-init's own uses); the rest is dropped.
pub const CAPTURE_MAX: usize = 1 << 20;
/// After the exit, how long bytes the pipes said they hold may fail to come.
const DRAIN_STUCK: Duration = Duration::from_secs(2);
/// Longest pause between checks for the program's exit.
const MAX_TICK: Duration = Duration::from_millis(50);

/// The three ioctls nix has no safe wrapper for.
mod ioctl {
    nix::ioctl_read_bad!(fionread, nix::libc::FIONREAD, nix::libc::c_int);
    nix::ioctl_write_ptr_bad!(tiocswinsz, nix::libc::TIOCSWINSZ, nix::libc::winsize);
    nix::ioctl_write_int_bad!(tiocsctty, nix::libc::TIOCSCTTY);
}
use ioctl::{fionread, tiocsctty, tiocswinsz};

/// A started program: its pid (leader of its own process group) and our ends.
pub struct Child {
    /// Pid, also its process group (and session, with a PTY).
    pub pid: i32,
    /// Where its stdin goes: the pipe, or the PTY master.
    pub input: Option<OwnedFd>,
    /// Its output: stdout and stderr pipes, or the PTY master as stdout.
    pub outputs: Vec<(Kind, OwnedFd)>,
    /// Whether it runs on a PTY.
    pub pty: bool,
}

/// A program that could not be started: the shell's exit code and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    /// 127 (not found) or 126 (not executable, or no PTY).
    pub code: i32,
    /// For the program's stderr.
    pub message: String,
}

/// The argv a spec runs: login shells go through `sh -l` so /etc/profile is read.
pub fn argv_of(spec: &ExecSpec) -> Vec<String> {
    if !spec.login {
        return spec.argv.clone();
    }
    let mut v: Vec<String> = vec![SHELL.into(), "-l".into()];
    if !spec.argv.is_empty() {
        v.extend(["-c".into(), "exec \"$@\"".into(), "sh".into()]);
        v.extend(spec.argv.iter().cloned());
    }
    v
}

fn set_flags(fd: &OwnedFd, nonblock: bool) -> nix::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    if nonblock {
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

fn spawn_error(prog: &str, e: &std::io::Error) -> SpawnError {
    SpawnError {
        code: if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
        message: format!("{prog}: {e}\n"),
    }
}

/// Starts the program of `spec` with the fixed environment.
pub fn spawn(spec: &ExecSpec) -> Result<Child, SpawnError> {
    let argv = argv_of(spec);
    let Some((prog, args)) = argv.split_first() else {
        return Err(SpawnError {
            code: 127,
            message: "exec: empty argv\n".into(),
        });
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", HOME);
    if spec.login {
        cmd.env("USER", "root")
            .env("LOGNAME", "root")
            .env("SHELL", SHELL)
            .current_dir(if std::path::Path::new(HOME).is_dir() {
                HOME
            } else {
                CWD
            });
    } else {
        cmd.current_dir(CWD);
    }
    let Some(tty) = &spec.tty else {
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = REAPER.spawn(&mut cmd).map_err(|e| spawn_error(prog, &e))?;
        let pid = child.id() as i32;
        let input = child.stdin.take().map(OwnedFd::from);
        let mut outputs = Vec::new();
        if let Some(o) = child.stdout.take() {
            outputs.push((Kind::Stdout, OwnedFd::from(o)));
        }
        if let Some(e) = child.stderr.take() {
            outputs.push((Kind::Stderr, OwnedFd::from(e)));
        }
        for fd in input.iter().chain(outputs.iter().map(|(_, f)| f)) {
            if let Err(e) = set_flags(fd, true) {
                warn!("exec: O_NONBLOCK on a pipe of {prog}: {e}");
            }
        }
        return Ok(Child {
            pid,
            input,
            outputs,
            pty: false,
        });
    };
    cmd.env("TERM", &tty.term);
    let ws = winsize(tty.rows, tty.cols);
    let pty = openpty(&ws, None).map_err(|e| SpawnError {
        code: 126,
        message: format!("openpty: {e}\n"),
    })?;
    // Other threads spawn too: neither end may leak into their children, or the
    // master would never see the hangup.
    for fd in [&pty.master, &pty.slave] {
        if let Err(e) = set_flags(fd, false) {
            warn!("exec: FD_CLOEXEC on a pty: {e}");
        }
    }
    let dup = |fd: &OwnedFd| {
        fd.try_clone().map(Stdio::from).map_err(|e| SpawnError {
            code: 126,
            message: format!("dup pty: {e}\n"),
        })
    };
    cmd.stdin(dup(&pty.slave)?)
        .stdout(dup(&pty.slave)?)
        .stderr(dup(&pty.slave)?);
    // SAFETY: runs in the forked child before exec; setsid and ioctl are
    // async-signal-safe and touch nothing of the parent's memory. TIOCSCTTY takes
    // an int argument, and fd 0 is the PTY slave (std dup2'd it before this runs).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            tiocsctty(0, 0)?;
            Ok(())
        });
    }
    let spawned = REAPER.spawn(&mut cmd);
    drop(cmd); // our copies of the slave: the master sees EIO once the child's close
    drop(pty.slave);
    let child = spawned.map_err(|e| spawn_error(prog, &e))?;
    if let Err(e) = set_flags(&pty.master, true) {
        warn!("exec: O_NONBLOCK on the pty of {prog}: {e}");
    }
    let input = pty.master.try_clone().ok();
    Ok(Child {
        pid: child.id() as i32,
        input,
        outputs: vec![(Kind::Stdout, pty.master)],
        pty: true,
    })
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets the window size of the PTY behind `master` (the kernel signals SIGWINCH).
pub fn resize(master: BorrowedFd<'_>, rows: u16, cols: u16) {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if let Err(e) = unsafe { tiocswinsz(master.as_raw_fd(), &ws) } {
        warn!("exec: resize pty to {rows}x{cols}: {e}");
    }
}

/// Bytes waiting in a pipe or PTY (0 if unknown).
pub fn pending(fd: BorrowedFd<'_>) -> usize {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which outlives the call.
    match unsafe { fionread(fd.as_raw_fd(), &mut n) } {
        Ok(_) => usize::try_from(n).unwrap_or(0),
        Err(_) => 0,
    }
}

/// One non-blocking read into `buf`: `Some(n)` (0 = end), `None` if nothing now.
/// A PTY master reads EIO once every slave is closed: that is its end.
pub fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Some(n),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return None,
            Err(_) => return Some(0),
        }
    }
}

/// Ends a program whose host went away: the PTY hangup (SIGHUP) or SIGKILL of its
/// group, then waits a little so the reaper forgets it.
pub fn hang_up(child: Child) {
    let pid = child.pid;
    let pty = child.pty;
    drop(child); // closes the master: the kernel hangs the terminal up
    if !pty
        || REAPER
            .wait(pid, Some(Instant::now() + Duration::from_secs(2)))
            .is_none()
    {
        if let Err(e) = REAPER.kill_group(pid, Signal::SIGKILL) {
            warn!("exec: kill group {pid}: {e}");
        }
        let _ = REAPER.wait(pid, Some(Instant::now() + Duration::from_secs(5)));
    }
}

/// What the pump needs from the other end: room for output, a place to put it,
/// and (for sessions) its own descriptor to poll and service.
pub trait Sink {
    /// Whether another [`MAX_FRAME`] of output may be handed over now.
    fn has_room(&self) -> bool;
    /// Takes output of `kind` (at most [`MAX_FRAME`] bytes).
    fn output(&mut self, kind: Kind, bytes: &[u8]);
    /// The descriptor to poll and what for, if any.
    fn poll_fd(&self) -> Option<(BorrowedFd<'_>, PollFlags)>;
    /// Services the sink after poll said `revents`; `Err` ends the exec (host gone).
    fn service(&mut self, revents: PollFlags, child: &mut Child) -> Result<(), String>;
    /// Bytes to write to the program's stdin, if any are waiting (cleared by the
    /// pump as it writes them); `None` when stdin is to be closed.
    fn stdin(&mut self) -> &mut Option<Vec<u8>>;
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The program exited with this code (128 + signal when killed).
    Exited(i32),
    /// The host went away; the program was hung up or killed.
    HungUp(String),
}

/// Runs `child` to its end, moving output to `sink` and stdin from it; kills the
/// group after `timeout` (a note goes to stderr).
pub fn pump(mut child: Child, sink: &mut dyn Sink, timeout: Option<Duration>) -> Ended {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut buf = vec![0u8; MAX_FRAME];
    let mut open: Vec<bool> = vec![true; child.outputs.len()];
    // Set when the program exited: bytes still to drain per output.
    let mut drain: Option<(i32, Vec<usize>)> = None;
    let mut tick = Duration::from_millis(1);
    let mut timed_out = false;
    let mut last_read = Instant::now();
    loop {
        // Hand waiting stdin bytes to the program (non-blocking; the rest waits).
        let mut close_input = false;
        match sink.stdin() {
            Some(bytes) if !bytes.is_empty() => match &child.input {
                Some(fd) => match nix::unistd::write(fd, bytes) {
                    Ok(n) => {
                        bytes.drain(..n);
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(_) => bytes.clear(), // the program closed its stdin
                },
                None => bytes.clear(),
            },
            Some(_) => {}
            None => close_input = !child.pty && child.input.is_some(),
        }
        if close_input {
            child.input = None;
        }
        let want_in = matches!(sink.stdin(), Some(b) if !b.is_empty());
        let room = sink.has_room();
        let mut fds: Vec<PollFd> = Vec::with_capacity(4);
        let mut which: Vec<usize> = Vec::with_capacity(3);
        for (i, (_, fd)) in child.outputs.iter().enumerate() {
            let drained = matches!(&drain, Some((_, left)) if left[i] == 0);
            if open[i] && room && !drained {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        let input_at = match (&child.input, want_in) {
            (Some(fd), true) => {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let sink_at = sink.poll_fd().map(|(fd, ev)| {
            fds.push(PollFd::new(fd, ev));
            fds.len() - 1
        });
        let wait = if drain.is_some() {
            Duration::from_millis(20)
        } else {
            tick
        };
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO),
        )
        .unwrap_or(0);
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        tick = if ready > 0 {
            Duration::from_millis(1)
        } else {
            (tick * 2).min(MAX_TICK)
        };
        if let Some(at) = sink_at {
            if let Err(why) = sink.service(revents[at], &mut child) {
                hang_up(child);
                return Ended::HungUp(why);
            }
        }
        let _ = input_at; // stdin is retried every round; POLLOUT only wakes us
        for (slot, &i) in which.iter().enumerate() {
            if revents[slot].is_empty() || !sink.has_room() {
                continue;
            }
            let (kind, fd) = &child.outputs[i];
            let limit = match &drain {
                Some((_, left)) => left[i].min(buf.len()),
                None => buf.len(),
            };
            match read_some(fd.as_fd(), &mut buf[..limit]) {
                Some(0) => open[i] = false,
                Some(n) => {
                    last_read = Instant::now();
                    sink.output(*kind, &buf[..n]);
                    if let Some((_, left)) = &mut drain {
                        left[i] = left[i].saturating_sub(n);
                    }
                }
                None => {}
            }
        }
        if drain.is_none() {
            if let Some(code) = REAPER.wait(child.pid, Some(Instant::now())) {
                if child.pty {
                    // PTY output reaches the master through a work queue: let it land.
                    std::thread::sleep(Duration::from_millis(20));
                }
                let left = child
                    .outputs
                    .iter()
                    .map(|(_, fd)| pending(fd.as_fd()))
                    .collect();
                drain = Some((code, left));
                last_read = Instant::now();
            } else if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out {
                timed_out = true;
                if let Err(e) = REAPER.kill_group(child.pid, Signal::SIGKILL) {
                    warn!("exec: kill group {} after timeout: {e}", child.pid);
                }
                let secs = timeout.map_or(0, |t| t.as_secs());
                let note = format!("kimg-init: killed after the timeout of {secs}s\n");
                sink.output(Kind::Stderr, note.as_bytes());
            }
        }
        if let Some((code, left)) = &drain {
            let done = left.iter().zip(&open).all(|(n, o)| *n == 0 || !*o);
            // The safety net: bytes said to be there that never come.
            let stuck = sink.has_room() && last_read.elapsed() > DRAIN_STUCK;
            if done || stuck {
                return Ended::Exited(*code);
            }
        }
    }
}

/// Output kept in memory, up to [`CAPTURE_MAX`] per stream.
struct Capture {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdin: Option<Vec<u8>>,
}

impl Sink for Capture {
    fn has_room(&self) -> bool {
        true
    }
    fn output(&mut self, kind: Kind, bytes: &[u8]) {
        let v = if kind == Kind::Stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let n = bytes.len().min(CAPTURE_MAX.saturating_sub(v.len()));
        v.extend_from_slice(&bytes[..n]);
    }
    fn poll_fd(&self) -> Option<(BorrowedFd<'_>, PollFlags)> {
        None
    }
    fn service(&mut self, _: PollFlags, _: &mut Child) -> Result<(), String> {
        Ok(())
    }
    fn stdin(&mut self) -> &mut Option<Vec<u8>> {
        &mut self.stdin
    }
}

/// Runs `argv` (non-empty) and reports its exit code and output (each stream cut at
/// [`CAPTURE_MAX`]); for kimg-init's own commands and tests.
pub fn run(argv: &[String], timeout: Option<Duration>) -> ExecResult {
    let spec = ExecSpec {
        argv: argv.to_vec(),
        tty: None,
        stdin: false,
        login: false,
        timeout_secs: None,
    };
    let child = match spawn(&spec) {
        Ok(c) => c,
        Err(e) => {
            return ExecResult {
                exit_code: e.code,
                stdout: String::new(),
                stderr: e.message,
            }
        }
    };
    let mut cap = Capture {
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdin: None,
    };
    let code = match pump(child, &mut cap, timeout) {
        Ended::Exited(c) => c,
        Ended::HungUp(_) => 128 + Signal::SIGKILL as i32,
    };
    ExecResult {
        exit_code: code,
        stdout: String::from_utf8_lossy(&cap.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&cap.stderr).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::tests::start_test_reaper;

    fn sv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exit_code_and_both_streams() {
        start_test_reaper();
        let r = run(&sv(&["sh", "-c", "echo out; echo err >&2; exit 3"]), None);
        assert_eq!(r.exit_code, 3);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
    }

    #[test]
    fn environment_is_fixed() {
        start_test_reaper();
        let r = run(&sv(&["sh", "-c", "echo $PATH $HOME; pwd"]), None);
        assert_eq!(r.stdout, format!("{PATH} {HOME}\n/\n"));
        assert_eq!(r.exit_code, 0);
    }

    #[test]
    fn missing_program_is_127() {
        start_test_reaper();
        let r = run(&sv(&["no-such-program-kimg"]), None);
        assert_eq!(r.exit_code, 127);
        assert!(r.stderr.contains("no-such-program-kimg"), "{}", r.stderr);
        assert_eq!(run(&[], None).exit_code, 127);
    }

    #[test]
    fn a_background_child_holding_the_pipe_does_not_hold_the_exec() {
        start_test_reaper();
        let start = Instant::now();
        let r = run(&sv(&["sh", "-c", "echo hello; sleep 5 &"]), None);
        assert_eq!((r.exit_code, r.stdout.as_str()), (0, "hello\n"));
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn output_written_just_before_the_exit_after_a_quiet_while_is_kept() {
        start_test_reaper();
        let r = run(&sv(&["sh", "-c", "sleep 3; echo late"]), None);
        assert_eq!(r.stdout, "late\n");
    }

    #[test]
    fn output_beyond_the_pipe_size_is_all_drained() {
        start_test_reaper();
        let r = run(
            &sv(&["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"]),
            None,
        );
        assert_eq!(r.stdout.len(), 300000);
    }

    #[test]
    fn failed_spawns_race_with_a_busy_reaper() {
        start_test_reaper();
        let busy = std::thread::spawn(|| {
            let end = Instant::now() + Duration::from_millis(500);
            while Instant::now() < end {
                REAPER.reap_all();
            }
        });
        let not_exec =
            std::env::temp_dir().join(format!("kimg-init-noexec-{}", std::process::id()));
        std::fs::write(&not_exec, "echo hi\n").unwrap();
        let not_exec = not_exec.to_string_lossy().into_owned();
        for _ in 0..50 {
            assert_eq!(run(&sv(&["/nonexistent/kimg"]), None).exit_code, 127);
            // A PATH lookup with a changed environment takes std's fork path.
            assert_eq!(run(&sv(&["no-such-program-kimg"]), None).exit_code, 127);
            assert_eq!(run(&sv(&[&not_exec]), None).exit_code, 126);
        }
        std::fs::remove_file(&not_exec).unwrap();
        busy.join().unwrap();
    }

    #[test]
    fn timeout_kills_the_group() {
        start_test_reaper();
        let start = Instant::now();
        let r = run(
            &sv(&["sh", "-c", "sleep 30 & sleep 30"]),
            Some(Duration::from_millis(300)),
        );
        assert_eq!(r.exit_code, 137);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(r.stderr.contains("timeout"), "{}", r.stderr);
    }

    #[test]
    fn huge_timeout_is_no_timeout() {
        start_test_reaper();
        let r = run(&sv(&["true"]), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(r.exit_code, 0);
    }

    #[test]
    fn signalled_is_128_plus() {
        start_test_reaper();
        let r = run(&sv(&["sh", "-c", "kill -TERM $$"]), None);
        assert_eq!(r.exit_code, 128 + 15);
    }

    #[test]
    fn login_argv_reads_the_profile_and_keeps_arguments() {
        let mut spec = ExecSpec {
            argv: vec![],
            tty: None,
            stdin: false,
            login: true,
            timeout_secs: None,
        };
        assert_eq!(argv_of(&spec), sv(&[SHELL, "-l"]));
        spec.argv = sv(&["echo", "a b"]);
        assert_eq!(
            argv_of(&spec),
            sv(&[SHELL, "-l", "-c", "exec \"$@\"", "sh", "echo", "a b"])
        );
    }
}
