//! `kimg logs`: a VM's console log.

use kimg::vm::cluster;
use kimg_contract::VmId;
use std::io::Write;
use std::process::ExitCode;

/// Print everything a VM's serial console printed since boot (kernel messages at
/// warning level and up, kimg-init's lines, emergency shells). Works for dead VMs
/// too, until `kimg stop` removes the cluster.
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Print only the last N lines.
    #[arg(long, short = 'n', value_name = "N")]
    tail: Option<usize>,
    /// The VM: vm-001, or just 1.
    vm: VmId,
    /// A service's log instead of the console (services are not supported yet).
    service: Option<String>,
}

/// Runs `kimg logs`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let paths = cluster::vm_paths(&a.name, a.vm)?;
    if let Some(service) = a.service {
        anyhow::bail!(
            "{}: no such service {service:?} (kimg-init runs no services yet; `kimg logs {}` shows the console)",
            a.vm,
            a.vm
        );
    }
    let text = match a.tail {
        Some(n) => cluster::console_tail(&paths, n).join("\n") + "\n",
        None => {
            let raw = std::fs::read(paths.console_log()).unwrap_or_default();
            String::from_utf8_lossy(&raw).replace('\r', "")
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
