//! `kimg suspend` and `kimg resume`: a cluster put away (in the cache, so it
//! survives a host reboot) and brought back as it was.

use anyhow::Context;
use kimg_cluster::{restore, Wait};
use std::process::ExitCode;

/// Save a running cluster into the cache and quit its VMs; `kimg resume` brings it
/// back as it was (processes, files, uptime), after a host reboot too.
#[derive(clap::Args)]
pub struct SuspendArgs {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
}

/// Bring back a cluster put away by `kimg suspend` (its saved state is used up).
#[derive(clap::Args)]
pub struct ResumeArgs {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Wait until the cluster is ready again: every VM's agent, and a Kubernetes
    /// image's control plane (`--wait=vms`: the VMs alone); at most SECS seconds.
    #[arg(long, value_name = "SECS|vms[:SECS]", num_args = 0..=1, default_missing_value = "", require_equals = true, value_parser = super::parse_wait, long_help = super::wait_help("the VMs' agents"))]
    wait: Option<Wait>,
}

/// Runs `kimg suspend`.
pub fn run_suspend(a: SuspendArgs) -> anyhow::Result<ExitCode> {
    let m = restore::suspend(&a.name)
        .with_context(|| format!("kimg suspend --name {} failed", a.name))?;
    eprintln!(
        "kimg suspend: cluster {:?} suspended ({} VMs, {:.2}s); `kimg resume --name {}` brings it back",
        a.name,
        m.vms.len(),
        m.save_secs,
        a.name
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `kimg resume`.
pub fn run_resume(a: ResumeArgs) -> anyhow::Result<ExitCode> {
    let state = restore::resume(
        &a.name,
        a.wait,
        &super::start_progress("resume", &a.name, "restored", 0, false),
    )
    .with_context(|| format!("kimg resume --name {} failed", a.name))?;
    eprintln!(
        "kimg resume: cluster {:?} back with {} VMs",
        state.name,
        state.vms.len()
    );
    Ok(ExitCode::SUCCESS)
}
