//! Start hooks: executable `/etc/kimg/start.d/NN-*`, run in name order after the
//! overlays, with the VM's number, role and hostname in their environment. Output
//! goes to /var/log/kimg/start.d.log and the console; a failure is reported, not fatal.

use crate::exec::{HOME, PATH};
use crate::reaper::REAPER;
use kimg_contract::cdrom::{START_DIR, START_LOG};
use kimg_contract::VmId;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A hook still running after this long is killed and reported.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The hooks in `dir`: executable regular files, in name order.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut hooks: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    fs::metadata(e.path())
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    hooks.sort();
    hooks
}

/// Runs every hook; returns one problem line per failed hook.
pub fn run_all(hostname: &str) -> Vec<String> {
    run(&list(Path::new(START_DIR)), hostname)
        .into_iter()
        .filter_map(Result::err)
        .collect()
}

/// Runs `hooks` in the order given: for each, `Ok(line)` when it succeeded or
/// `Err(problem)`, both naming the hook.
pub fn run(hooks: &[PathBuf], hostname: &str) -> Vec<Result<String, String>> {
    if hooks.is_empty() {
        return vec![];
    }
    let vm = hostname.parse::<VmId>().ok();
    let number = vm.map_or(String::new(), |v| v.number().to_string());
    let role = vm.map_or("reserved".to_string(), |v| v.role().to_string());
    if let Some(d) = Path::new(START_LOG).parent() {
        let _ = fs::create_dir_all(d);
    }
    let mut out = Vec::new();
    for hook in hooks {
        let shown = hook.display().to_string();
        let r = match run_one(hook, &number, &role, hostname) {
            Ok(0) => Ok(format!("start hook {shown}: ok")),
            Ok(code) => Err(format!("start hook {shown}: exit {code} (see {START_LOG})")),
            Err(e) => Err(format!("start hook {shown}: {e}")),
        };
        match &r {
            Ok(line) => info!("{line}"),
            Err(p) => error!("{p}"),
        }
        out.push(r);
    }
    out
}

fn run_one(hook: &Path, number: &str, role: &str, hostname: &str) -> std::io::Result<i32> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(START_LOG)?;
    let start = log.seek(SeekFrom::End(0))?;
    writeln!(log, "== {}", hook.display())?;
    let mut cmd = Command::new(hook);
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", HOME)
        .env("KIMG_VM_NUMBER", number)
        .env("KIMG_ROLE", role)
        .env("KIMG_HOSTNAME", hostname)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .process_group(0);
    let child = REAPER.spawn(&mut cmd)?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + TIMEOUT;
    // At boot PID 1's signal loop is not running yet: reap here.
    let code = loop {
        REAPER.reap_all();
        if let Some(code) = REAPER.wait(pid, Some(Instant::now() + Duration::from_millis(20))) {
            break code;
        }
        if Instant::now() >= deadline {
            let _ = REAPER.kill_group(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(std::io::Error::other(format!(
                "killed after {}s",
                TIMEOUT.as_secs()
            )));
        }
    };
    // Echo what the hook wrote to the console.
    let mut text = String::new();
    let mut f = fs::File::open(START_LOG)?;
    f.seek(SeekFrom::Start(start))?;
    f.take(64 * 1024).read_to_string(&mut text)?;
    for line in text.lines() {
        crate::log::console(line);
    }
    Ok(code)
}
