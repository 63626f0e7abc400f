//! `kimg logs`: a VM's console log, or one of its services' logs.

use kimg_cluster as cluster;
use kimg_contract::VmId;
use std::io::Write;
use std::process::ExitCode;

/// Print everything a VM's serial console printed since boot (kernel messages at
/// warning level and up, kimg-init's lines, emergency shells), or with SERVICE that
/// service's output (/var/log/SERVICE.log in the VM, read through the agent).
/// The console log works for dead VMs too, until `kimg stop` removes the cluster.
///
/// Example: kimg logs vm-001 containerd -n 20
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
    /// A service's log instead of the console (see `kimg status` for the services).
    service: Option<String>,
}

/// Runs `kimg logs`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let paths = cluster::vm_paths(&a.name, a.vm)?;
    if let Some(service) = a.service {
        return service_log(&a.name, a.vm, &service, a.tail);
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

/// Prints a service's log from the VM; names only the services the VM has when the
/// one asked for is not among them.
fn service_log(
    name: &str,
    vm: VmId,
    service: &str,
    tail: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let (_, vms) = cluster::status(name)?;
    let known: Vec<String> = vms
        .iter()
        .find(|v| v.vm == vm)
        .and_then(|v| v.agent.as_ref())
        .map(|a| a.services.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    if !known.iter().any(|k| k == service) {
        anyhow::bail!(
            "{vm} has no service {service:?} (its services: {}); `kimg logs {vm}` shows the console",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    let path = format!("{}/{service}.log", kimg_contract::service::LOG_DIR);
    let argv = match tail {
        Some(n) => vec!["tail".into(), "-n".into(), n.to_string(), path],
        None => vec!["cat".into(), path],
    };
    // Streamed: neither kimg-init nor kimg holds the log whole.
    let spec = kimg_contract::agent::ExecSpec {
        argv,
        tty: None,
        stdin: false,
        login: false,
        timeout_secs: None,
    };
    let code = cluster::exec_stream(
        name,
        vm,
        spec,
        None,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
