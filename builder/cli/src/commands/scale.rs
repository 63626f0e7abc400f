//! `kimg scaleout` and `kimg scalein`: add or remove VMs of a running cluster.

use kimg_cluster::{self as cluster, Wait};
use kimg_contract::VmId;
use std::process::ExitCode;
use std::time::Duration;

/// Add VMs to a running cluster (same image, memory and cpus as its first VM; the
/// plan gives them their networks and addresses).
///
/// Example: kimg scaleout vm-005 vm-006 --wait
#[derive(clap::Args)]
pub struct OutArgs {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Wait until the new VMs' agents report ready, and a Kubernetes image's control
    /// plane answers (`--wait=vms`: the VMs alone); at most SECS seconds.
    #[arg(long, value_name = "SECS|vms[:SECS]", num_args = 0..=1, default_missing_value = "", require_equals = true, value_parser = super::parse_wait, long_help = super::wait_help("the new VMs' agents"))]
    wait: Option<Wait>,
    /// The VMs to add.
    #[arg(required = true)]
    vms: Vec<VmId>,
}

/// Remove VMs from a running cluster: each powers off through its agent and is
/// killed after the grace time; its files go.
#[derive(clap::Args)]
pub struct InArgs {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Seconds to wait for a clean poweroff before killing.
    #[arg(long, default_value_t = 15, value_parser = super::secs())]
    grace: u64,
    /// The VMs to remove.
    #[arg(required = true)]
    vms: Vec<VmId>,
}

/// Runs `kimg scaleout`.
pub fn run_out(a: OutArgs) -> anyhow::Result<ExitCode> {
    let state = cluster::scaleout(
        &a.name,
        &a.vms,
        a.wait,
        &super::start_progress("scaleout", &a.name, "started", a.vms.len(), false),
    )?;
    eprintln!(
        "kimg scaleout: cluster {:?} has {} VMs",
        state.name,
        state.vms.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `kimg scalein`.
pub fn run_in(a: InArgs) -> anyhow::Result<ExitCode> {
    let r = cluster::scalein(&a.name, &a.vms, Duration::from_secs(a.grace))?;
    eprintln!(
        "kimg scalein: {} VMs powered off, {} killed",
        r.graceful.len(),
        r.killed.len()
    );
    Ok(ExitCode::SUCCESS)
}
