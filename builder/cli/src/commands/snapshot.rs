//! `kimg snapshot save/ls/rm`: snapshots of running clusters in the image cache.

use anyhow::Context;
use kimg_cluster::snapshot::{self, SaveOptions};
use std::process::ExitCode;

/// Save a running cluster (every VM's RAM, devices and disk layer) and start new
/// clusters from it in seconds with `kimg run --from SNAP`.
///
/// Snapshots live in the image cache (`~/.cache/kimg/snapshots/SNAP/`); each file's
/// sha256 is checked before a restore, and a snapshot whose base image, kimg-init or
/// QEMU changed is refused.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Pause every VM, save each one's state and freeze its disk layer, then resume
    /// them (or quit them with --stop).
    Save {
        /// Cluster name.
        #[arg(long, default_value = super::DEFAULT_CLUSTER)]
        name: String,
        /// Quit the cluster after the save instead of resuming it.
        #[arg(long)]
        stop: bool,
        /// Snapshot name.
        snap: String,
    },
    /// List the snapshots.
    Ls {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (refused while a cluster restored from it runs).
    Rm {
        /// Snapshot name.
        snap: String,
    },
}

/// Runs `kimg snapshot`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    match a.command {
        Sub::Save { name, stop, snap } => {
            let m = snapshot::save(&SaveOptions {
                cluster: name.clone(),
                snap: snap.clone(),
                stop,
            })
            .with_context(|| format!("kimg snapshot save --name {name} {snap} failed"))?;
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            eprintln!(
                "kimg snapshot: {snap} saved from cluster {name:?}: {} VMs, {} MiB, {:.2}s ({:.2}s paused){}",
                m.vms.len(),
                bytes >> 20,
                m.save_secs,
                m.paused_secs,
                if stop { "; cluster stopped" } else { "" }
            );
        }
        Sub::Ls { json } => {
            let list = snapshot::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                eprintln!("kimg snapshot: none; save one with `kimg snapshot save SNAP`");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<12} {:>4} {:>9}  {:<20} IMAGE",
                "NAME", "CLUSTER", "VMS", "SIZE", "SAVED (UTC)"
            );
            for s in list {
                if !s.ok {
                    println!("{:<20} (unreadable manifest)", s.name);
                    continue;
                }
                println!(
                    "{:<20} {:<12} {:>4} {:>8}M  {:<20} {}",
                    s.name,
                    s.cluster,
                    s.vms,
                    s.bytes >> 20,
                    kimg_image::fetch::utc_date(s.created),
                    s.image.display()
                );
            }
        }
        Sub::Rm { snap } => {
            snapshot::remove(&snap)?;
            eprintln!("kimg snapshot: {snap} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
