//! `kimg exec`: run a command in a VM.

use kimg_cluster as cluster;
use kimg_contract::VmId;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Run a command in a VM through its agent; prints its stdout and stderr and exits
/// with its exit code.
///
/// Example: kimg exec vm-001 -- ip -br addr
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = super::secs())]
    timeout: Option<u64>,
    /// The VM: vm-001, or just 1.
    vm: VmId,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs `kimg exec`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let r = cluster::exec(&a.name, a.vm, a.command, a.timeout.map(Duration::from_secs))?;
    std::io::stdout().write_all(r.stdout.as_bytes())?;
    std::io::stderr().write_all(r.stderr.as_bytes())?;
    Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)))
}
