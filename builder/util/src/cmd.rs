//! Running external programs (qemu-img, mkfs.ext4, apt-get, ...) in one checked way.
//!
//! Every program is found by [`find`] (PATH, then the sbin directories a normal user's
//! PATH lacks) and built with [`command`]; every call goes through [`run`], which names
//! the program in the error, carries its exit status and the tail of its stderr, and
//! says when the program is not installed (and that `kimg doctor` checks them all).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Searched after PATH: Debian keeps mkfs.ext4, debugfs and e2fsck here, and a normal
/// user's PATH lacks them (root's has them).
pub const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// An external program failed to start or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program is neither on PATH nor in [`SBIN_DIRS`].
    #[error("`{program}` was not found on PATH nor in /usr/local/sbin, /usr/sbin, /sbin: install it ({hint}); `kimg doctor` checks everything kimg needs")]
    NotFound {
        /// Program name.
        program: String,
        /// Which package provides it.
        hint: String,
    },
    /// The program could not be started.
    #[error("could not start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// Last lines of stderr (or stdout when stderr is empty).
        stderr: String,
    },
}

/// The Debian package that provides a program kimg calls, for error messages.
pub fn package_hint(program: &str) -> &'static str {
    match program {
        "qemu-img" => "apt-get install qemu-utils",
        "vde_switch" => "apt-get install vde2",
        "qemu-system-x86_64" => "apt-get install qemu-system-x86",
        "mkfs.ext4" | "e2fsck" | "debugfs" => "apt-get install e2fsprogs",
        "apt-get" | "apt-cache" => {
            "a Debian/Ubuntu host, or pass --kernel-deb / --kernel and --modules"
        }
        "busybox" => "apt-get install busybox-static",
        "sgdisk" => "apt-get install gdisk",
        "fsck.vfat" => "apt-get install dosfstools",
        "xorriso" => "apt-get install xorriso",
        "tmux" => "apt-get install tmux",
        "make" | "gcc" | "flex" | "bison" | "bc" => {
            "apt-get install gcc make flex bison bc libelf-dev libssl-dev"
        }
        _ => "`kimg doctor` lists what kimg needs",
    }
}

/// Renders a command for messages: program and arguments, space separated.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin closed; returns its output when it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output, CmdError> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().map_err(|e| spawn_error(cmd, e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(CmdError::Failed {
            command: display(cmd),
            status: out.status.to_string(),
            stderr: tail(if out.stderr.is_empty() {
                &out.stdout
            } else {
                &out.stderr
            }),
        })
    }
}

/// Like [`run`], returning stdout as (lossy) UTF-8.
pub fn run_stdout(cmd: &mut Command) -> Result<String, CmdError> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// Like [`run`], but calls `on_line` with each line of stdout as it comes (for progress
/// on long steps such as a kernel build); stderr is kept for the error message.
pub fn run_lines(cmd: &mut Command, on_line: &mut dyn FnMut(&str)) -> Result<(), CmdError> {
    use std::io::{BufRead, Read};
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(cmd, e))?;
    let mut stderr = child.stderr.take();
    // Drain stderr on a thread so neither pipe fills up and blocks the child.
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    if let Some(out) = child.stdout.take() {
        for line in io::BufReader::new(out).split(b'\n').map_while(Result::ok) {
            on_line(&String::from_utf8_lossy(&line));
        }
    }
    let status = child.wait().map_err(|e| spawn_error(cmd, e))?;
    let err = err_thread.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(CmdError::Failed {
            command: display(cmd),
            status: status.to_string(),
            stderr: tail(&err),
        })
    }
}

/// Maps a spawn failure to [`CmdError`], with an install hint for a missing program.
pub fn spawn_error(cmd: &Command, e: io::Error) -> CmdError {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == io::ErrorKind::NotFound {
        let hint = package_hint(&program).to_string();
        CmdError::NotFound { program, hint }
    } else {
        CmdError::Spawn {
            command: display(cmd),
            source: e,
        }
    }
}

/// Where `program` is: itself when it names a path (holds a `/`), else the first
/// executable file of that name in PATH's directories, then in [`SBIN_DIRS`]. The one
/// lookup of every program kimg runs, so whoever runs kimg finds the same tools.
pub fn find(program: impl AsRef<OsStr>) -> Option<PathBuf> {
    let program = Path::new(program.as_ref());
    if program.as_os_str().is_empty() {
        return None;
    }
    if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

/// A [`Command`] for `program` as found by [`find`]; argv[0] stays the name given
/// (what `ps` and the pid checks see). A program found nowhere keeps its bare name, so
/// spawning it fails with [`CmdError::NotFound`] and its install hint.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    match find(program) {
        Some(path) => {
            let mut c = Command::new(path);
            c.arg0(program);
            c
        }
        None => Command::new(program),
    }
}

/// True when [`find`] finds `program`.
pub fn exists(program: impl AsRef<OsStr>) -> bool {
    find(program).is_some()
}

/// A regular file with an execute bit (what execvp would run).
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The last 20 lines of some output, for error messages.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_status_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert!(msg.contains("sh -c"), "{msg}");
    }

    #[test]
    fn missing_program_says_what_to_install() {
        let err = run(&mut Command::new("qemu-img-definitely-missing")).unwrap_err();
        assert!(matches!(err, CmdError::NotFound { .. }), "{err}");
        assert!(run_stdout(Command::new("sh").args(["-c", "echo hi"])).unwrap() == "hi\n");
        assert!(err.to_string().contains("kimg doctor"), "{err}");
    }

    #[test]
    fn sbin_tools_are_found_with_a_users_path() {
        // A normal user's PATH: mkfs.ext4 (e2fsprogs, /usr/sbin or /sbin) is still found.
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("kimg-test-tool");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find(&tool), Some(tool.clone()));
        assert_eq!(find("no-such-kimg-tool"), None);
        assert_eq!(find(""), None);
        if Path::new("/usr/sbin/mkfs.ext4").exists() || Path::new("/sbin/mkfs.ext4").exists() {
            let found = with_path("/usr/bin:/bin", || find("mkfs.ext4"));
            let found = found.expect("mkfs.ext4 found outside PATH");
            assert!(
                found.starts_with("/usr/sbin") || found.starts_with("/sbin"),
                "{found:?}"
            );
            let out = with_path("/usr/bin:/bin", || {
                run_stdout(command("mkfs.ext4").arg("-V"))
            });
            assert!(
                out.is_ok() || matches!(out, Err(CmdError::Failed { .. })),
                "{out:?}"
            );
        }
    }

    /// Runs `f` with PATH set to `path` (this test binary's other tests do not read PATH
    /// concurrently in a way that matters: they use programs in /usr/bin and /bin).
    fn with_path<T>(path: &str, f: impl FnOnce() -> T) -> T {
        let old = std::env::var_os("PATH");
        std::env::set_var("PATH", path);
        let out = f();
        match old {
            Some(p) => std::env::set_var("PATH", p),
            None => std::env::remove_var("PATH"),
        }
        out
    }
}
