//! `kimg console`: the interactive serial console of a VM.

use anyhow::Context;
use kimg_cluster as cluster;
use kimg_contract::VmId;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

/// The detach key: ctrl-] (as telnet).
const DETACH: u8 = 0x1d;

/// Attach to a VM's serial console (ttyS0): what you type goes to the VM, what it
/// prints comes back. Press ctrl-] to detach; the VM keeps running.
///
/// Once booted, every VM keeps a root login shell on its console (respawned when it
/// exits), so this is a terminal on the VM: type `hostname` and Enter. Boot with
/// `kimg run --append kimg.console=off` for a console without a shell. `kimg consoles`
/// opens every VM's console in one tmux session. The console log (`kimg logs VM`) has
/// everything printed since boot.
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// The VM: vm-001, or just 1.
    vm: VmId,
}

/// The console log's unfinished last line (the shell's prompt, usually), at most 256
/// bytes; nothing if the log cannot be read.
fn last_line(log: &std::path::Path) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(256))).is_err()
        || f.read_to_end(&mut tail).is_err()
    {
        return Vec::new();
    }
    match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => tail.split_off(i + 1),
        None => Vec::new(),
    }
}

/// Runs `kimg console`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let paths = cluster::vm_paths(&a.name, a.vm)?;
    if cluster::qemu_pid(&paths).is_none() {
        anyhow::bail!(
            "{} is not running; see `kimg logs --name {} {}`",
            a.vm,
            a.name,
            a.vm
        );
    }
    let sock = paths.console();
    let stream =
        UnixStream::connect(&sock).with_context(|| format!("connect to {}", sock.display()))?;
    let mut from_vm = stream.try_clone().context("clone console socket")?;
    eprintln!("kimg console: {} (detach with ctrl-])\r", a.vm);
    let _raw = super::RawMode::enter();
    // The shell printed its prompt before we came: show that last line again.
    let mut out = std::io::stdout();
    let _ = out
        .write_all(&last_line(&paths.console_log()))
        .and_then(|()| out.flush());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut to_vm = stream;
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let (keep, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
            Some(i) => (i, true),
            None => (n, false),
        };
        if to_vm.write_all(&buf[..keep]).is_err() || detach {
            break;
        }
    }
    drop(_raw);
    eprintln!("\nkimg console: detached from {}", a.vm);
    Ok(ExitCode::SUCCESS)
}
