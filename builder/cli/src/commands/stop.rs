//! `kimg stop`: stop a cluster.

use kimg_cluster as cluster;
use std::process::ExitCode;
use std::time::Duration;

/// Stop a cluster: each VM is asked to power off through its agent (sync, unmount),
/// QEMUs still running after the grace time are killed; the cluster's runtime
/// directory is removed.
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Seconds to wait for a clean poweroff before killing.
    #[arg(long, default_value_t = 15, value_parser = super::secs())]
    grace: u64,
    /// Print what happened as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg stop`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let report = cluster::stop(&a.name, Duration::from_secs(a.grace))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "kimg stop: {} VMs powered off, {} killed",
            report.graceful.len(),
            report.killed.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
