//! `kimg exec`: run a command in a VM, its output streamed as it comes.

use super::shell::{exit_code, host_tty, interactive};
use kimg_cluster as cluster;
use kimg_contract::agent::ExecSpec;
use kimg_contract::VmId;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Run a command in a VM through its agent (docker exec conventions): its stdout and
/// stderr reach yours as they are written, and `kimg exec` exits with its exit code.
/// It returns when the command exits, with all it printed, even if a background
/// child keeps running. `-i` forwards your stdin (its end closes the command's),
/// `-t` runs the command on a PTY (with `-i` on a terminal: raw mode, window size).
///
/// Examples:
///
///   kimg exec vm-001 -- ip -br addr
///   kimg exec 3 -- ping -c 5 192.168.1.1      # lines arrive as ping prints them
///   echo hi | kimg exec -i vm-001 -- cat
///   kimg exec -it vm-002 -- top
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Kill the command (its process group) after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = super::secs())]
    timeout: Option<u64>,
    /// Forward stdin to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// The VM: vm-001, or just 1.
    vm: VmId,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs `kimg exec`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let spec = ExecSpec {
        argv: a.command,
        tty: a.tty.then(host_tty),
        stdin: a.interactive,
        login: false,
        timeout_secs: a.timeout,
    };
    if a.tty && a.interactive && std::io::stdin().is_terminal() {
        return Ok(exit_code(interactive(&a.name, a.vm, spec)?));
    }
    let stdin: Option<Box<dyn std::io::Read + Send>> = if a.interactive {
        Some(Box::new(std::io::stdin()))
    } else {
        None
    };
    let code = cluster::exec_stream(
        &a.name,
        a.vm,
        spec,
        stdin,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    Ok(exit_code(code))
}
