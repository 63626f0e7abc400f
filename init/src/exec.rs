//! The agent's `exec`: run a program with a fixed environment, capture its output,
//! kill its process group on timeout. Children go through the [`REAPER`].

use crate::reaper::REAPER;
use kimg_contract::agent::ExecResult;
use nix::sys::signal::Signal;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// PATH of everything kimg-init starts (exec'd commands, services, hooks, the
/// emergency shell); /usr/local first, where overlays put their own tools.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// HOME of exec'd programs.
pub const HOME: &str = "/root";
/// Working directory of exec'd programs.
pub const CWD: &str = "/";
/// How long output is still collected after the program exited (background children
/// may hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Runs `argv` (non-empty) and reports its exit code and output.
pub fn run(argv: &[String], timeout: Option<Duration>) -> ExecResult {
    let Some((prog, args)) = argv.split_first() else {
        return failed(127, "exec: empty argv\n".into());
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", HOME)
        .current_dir(CWD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match REAPER.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return failed(code, format!("{prog}: {e}\n"));
        }
    };
    let pid = child.id() as i32;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    // A timeout too large for the clock is no timeout.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut timed_out = false;
    let code = match REAPER.wait(pid, deadline) {
        Some(code) => code,
        None => {
            timed_out = true;
            if let Err(e) = REAPER.kill_group(pid, Signal::SIGKILL) {
                warn!("exec: kill {prog} (pid {pid}) after timeout: {e}");
            }
            REAPER
                .wait(pid, None)
                .unwrap_or(128 + Signal::SIGKILL as i32)
        }
    };
    let stdout = stdout.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    let mut stderr = stderr.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    if timed_out {
        stderr.push_str(&format!(
            "kimg-init: {prog} killed after the timeout of {}s\n",
            timeout.map_or(0, |t| t.as_secs())
        ));
    }
    ExecResult {
        exit_code: code,
        stdout,
        stderr,
    }
}

fn failed(exit_code: i32, stderr: String) -> ExecResult {
    ExecResult {
        exit_code,
        stdout: String::new(),
        stderr,
    }
}

/// Reads a pipe to its end in a thread; the text arrives on the returned channel.
fn collect<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        let spawned = std::thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || {
                let mut buf = Vec::new();
                // A read error ends the output; what was read so far is kept.
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            });
        if let Err(e) = spawned {
            warn!("exec: cannot start an output reader: {e}");
        }
    }
    rx
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
}
