//! `kimg apply`: put overlays onto running VMs.

use anyhow::Context;
use kimg_cluster::apply::{self, ApplyOptions};
use kimg_contract::VmId;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Put overlays onto running VMs, without a reboot. The overlays are found and
/// ordered as for `kimg run` (names on the search path, archives, deb:PKG, each
/// `requires` first) onto a cdrom that goes into every VM's cdrom drive; kimg-init
/// checks every overlay (an entry leading out of / or into /proc, /sys, /dev or /run
/// refuses the whole apply, nothing written), unpacks them as at boot, runs the
/// start hooks they carry, applies sysctls, starts new services and
/// restarts those whose service file changed; the cdrom is ejected after.
/// `kimg status` lists each VM's overlays, "at boot" or "applied at".
///
///   kimg apply --ovlpath ./ovl myservice
///   kimg apply --vms vm-001,vm-201 deb:tcpdump
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// The VMs to apply to, comma-separated (vm-001,vm-201 or 1,201); every VM if absent.
    #[arg(long, value_delimiter = ',', value_name = "VM,...")]
    vms: Vec<VmId>,
    /// Extra overlay directories, searched first (repeatable).
    #[arg(long = "ovlpath", value_name = "DIR")]
    ovlpath: Vec<PathBuf>,
    /// Overlay names, archive paths or deb:PKG[,PKG...].
    #[arg(required = true)]
    overlays: Vec<String>,
}

/// Runs `kimg apply`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let opts = ApplyOptions {
        cluster: a.name.clone(),
        vms: a.vms,
        overlays: a.overlays,
        ovlpath: a.ovlpath,
    };
    let results =
        apply::apply(&opts).with_context(|| format!("kimg apply --name {} failed", a.name))?;
    let mut failed = 0;
    for r in &results {
        match &r.result {
            Ok(rep) => {
                let names: Vec<&str> = rep.overlays.iter().map(|o| o.name.as_str()).collect();
                let mut line = format!(
                    "kimg apply: {}: {} ({:.2}s)",
                    r.vm,
                    names.join(", "),
                    rep.secs
                );
                for (what, list) in [
                    ("hooks", &rep.hooks),
                    ("started", &rep.started),
                    ("restarted", &rep.restarted),
                ] {
                    if !list.is_empty() {
                        line.push_str(&format!("; {what}: {}", list.join(", ")));
                    }
                }
                eprintln!("{line}");
                for p in &rep.problems {
                    eprintln!("kimg apply: {}: problem: {p}", r.vm);
                }
                if !rep.problems.is_empty() {
                    failed += 1;
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("kimg apply: error: {e}");
            }
        }
    }
    eprintln!(
        "kimg apply: {} of {} VMs applied without problems in {:.2}s",
        results.len() - failed,
        results.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}
