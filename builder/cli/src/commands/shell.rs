//! `kimg shell`: an interactive terminal in a VM through the agent (no network), and
//! the terminal plumbing `kimg exec -it` shares: raw mode, window size, SIGWINCH.

use anyhow::Context;
use kimg_cluster::session::{self, send_on};
use kimg_contract::agent::{ExecSpec, Kind, Session, Tty};
use kimg_contract::VmId;
use nix::sys::signal::{SigSet, Signal};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

/// Open a shell in a VM: a PTY there, your terminal in raw mode here, through the
/// VM's agent (no network, no ssh). It is a login shell (/etc/profile, HOME=/root,
/// TERM from your terminal); the window size follows yours; ctrl-c and ctrl-z reach
/// the program in the foreground in the VM. `exit N` ends `kimg shell` with status N.
/// Up to 8 sessions (shells, execs, copies) per VM at once.
///
/// Examples:
///
///   kimg shell vm-001
///   kimg shell 3 -- top          # a program instead of the shell, on a PTY
///   kimg shell --name lab vm-201
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// The VM: vm-001, or just 1.
    vm: VmId,
    /// A program and its arguments instead of the login shell (after --).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs `kimg shell`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let spec = ExecSpec {
        argv: a.command,
        tty: Some(host_tty()),
        stdin: true,
        login: true,
        timeout_secs: None,
    };
    let code = interactive(&a.name, a.vm, spec)?;
    Ok(exit_code(code))
}

/// The exit status for a command's exit code (out of range: 255).
pub fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

/// The ioctl nix has no safe wrapper for.
mod ioctl {
    nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);
}

/// The host terminal's size (rows, columns), if stdout or stdin is a terminal.
fn window_size() -> Option<(u16, u16)> {
    for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
        let mut ws = nix::libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives
        // the call; fd is this process's stdin or stdout.
        if unsafe { ioctl::tiocgwinsz(fd, &mut ws) }.is_ok() && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// TERM and size of the host terminal (xterm 24x80 when there is none).
pub fn host_tty() -> Tty {
    let (rows, cols) = window_size().unwrap_or((24, 80));
    Tty {
        term: std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "xterm".into()),
        rows,
        cols,
    }
}

/// Runs `spec` (with a PTY) attached to this terminal; its exit code.
pub fn interactive(name: &str, vm: VmId, spec: ExecSpec) -> anyhow::Result<i32> {
    // SIGWINCH is taken by a thread with sigwait: block it before any thread starts.
    let mut winch = SigSet::empty();
    winch.add(Signal::SIGWINCH);
    winch.thread_block().context("block SIGWINCH")?;
    let mut s = session::open(name, vm, Session::Exec(spec))?;
    let w = s.writer().context("clone the session socket")?;
    let resize_w = s.writer().context("clone the session socket")?;
    std::thread::spawn(move || loop {
        if winch.wait().is_err() {
            return;
        }
        if let Some((rows, cols)) = window_size() {
            let mut p = rows.to_be_bytes().to_vec();
            p.extend_from_slice(&cols.to_be_bytes());
            if send_on(&resize_w, Kind::Resize, &p).is_err() {
                return;
            }
        }
    });
    let raw = super::RawMode::enter();
    // Keys go as they are typed; the process ends with the session, not with stdin.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send_on(&w, Kind::Stdin, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send_on(&w, Kind::StdinEof, b"");
    });
    let mut out = std::io::stdout();
    let result = loop {
        match s.recv() {
            Ok((Kind::Stdout | Kind::Stderr, p)) => {
                if out.write_all(&p).and_then(|()| out.flush()).is_err() {
                    break Ok(255);
                }
            }
            Ok((Kind::Exit, p)) => break session::exit_code(&p).map_err(anyhow::Error::from),
            Ok((Kind::Error, p)) => {
                break Err(anyhow::anyhow!("{vm}: {}", String::from_utf8_lossy(&p)))
            }
            Ok(_) => {}
            Err(e) => break Err(anyhow::anyhow!("{vm}: {e}")),
        }
    };
    drop(raw);
    result
}
