//! `kimg ls`: the clusters this user runs.

use kimg_cluster::list::{self, human_age};
use std::process::ExitCode;

/// List the clusters this user runs: name, image, VMs running of all, state (running,
/// partly, dead) and age. A dead one is cleaned up with `kimg stop --name NAME`.
#[derive(clap::Args)]
pub struct Args {
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg ls`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let clusters = list::clusters();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&clusters)?);
        return Ok(ExitCode::SUCCESS);
    }
    if clusters.is_empty() {
        eprintln!(
            "kimg ls: no clusters in {} (start one with `kimg run`)",
            kimg_cluster::runtime_root().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<8} {:>7} {:>5}  IMAGE",
        "NAME", "STATE", "VMS", "AGE"
    );
    for c in clusters {
        println!(
            "{:<16} {:<8} {:>7} {:>5}  {}",
            c.name,
            c.state.as_str(),
            format!("{}/{}", c.running, c.vms),
            human_age(c.age_secs),
            c.image.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
