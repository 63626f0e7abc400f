//! `kimg run`: start a cluster.

use anyhow::Context;
use kimg::vm::accel::AccelChoice;
use kimg::vm::cluster::{self, RunEvent, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Start a cluster of VMs from an image: vm-001.. are nodes, vm-201.. routers.
///
/// Each VM gets its own qcow2 layer over the image (the image is never written), a
/// serial console logged to a file, and an agent socket that `kimg status`, `kimg
/// exec` and `kimg stop` use. A running cluster with the same name is stopped first.
/// KVM is used when it really works here, else TCG.
#[derive(clap::Args)]
pub struct Args {
    /// Cluster name.
    #[arg(long, default_value = super::DEFAULT_CLUSTER)]
    name: String,
    /// Image built by `kimg build` (its .json manifest must be beside it).
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Number of nodes (vm-001..).
    #[arg(long, default_value_t = 4)]
    nodes: u16,
    /// Number of routers (vm-201..).
    #[arg(long, default_value_t = 2)]
    routers: u16,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = 384)]
    mem: u32,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Wait until every VM reports ready (at most SECS seconds, default 120).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "120", require_equals = true)]
    wait: Option<u64>,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
    /// Print the cluster's state as JSON when started.
    #[arg(long)]
    json: bool,
    /// Attach this ready overlay cdrom (from `kimg mkcdrom`) to every VM.
    #[arg(long, conflicts_with = "overlays")]
    cdrom: Option<PathBuf>,
    /// Overlay directories searched before $KIMG_OVLPATH and the built-in ones.
    #[arg(long = "ovlpath", value_name = "DIR")]
    ovlpath: Vec<PathBuf>,
    /// Overlays (names or archive paths, as for `kimg mkcdrom`) put on a cdrom that
    /// every VM unpacks at its first boot.
    overlays: Vec<String>,
}

/// Runs `kimg run`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        name: a.name.clone(),
        image: a.image,
        nodes: a.nodes,
        routers: a.routers,
        mem_mb: a.mem,
        cpus: a.cpus,
        accel: a.accel,
        wait: a.wait.map(Duration::from_secs),
        cdrom: a.cdrom,
        overlays: a.overlays,
        ovlpath: a.ovlpath,
    };
    let quiet = a.quiet || a.json;
    let state = cluster::run(&opts, &|ev| {
        if quiet {
            return;
        }
        match ev {
            RunEvent::Replaced => eprintln!(
                "kimg run: stopped the running cluster {:?} first",
                opts.name
            ),
            RunEvent::Accel(acc) => eprintln!("kimg run: accelerator {}", acc.as_str()),
            RunEvent::Started(vm) => eprintln!("kimg run: {vm} started"),
            RunEvent::Ready(vm, st, t) => {
                eprintln!(
                    "kimg run: {vm} {} after {:.2}s",
                    serde_json::to_string(&st)
                        .unwrap_or_default()
                        .trim_matches('"'),
                    t.as_secs_f64()
                )
            }
        }
    })
    .with_context(|| format!("kimg run --name {} failed", opts.name))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else if !quiet {
        eprintln!(
            "kimg run: cluster {:?} up with {} VMs; try `kimg exec --name {} vm-001 -- uname -a`",
            state.name,
            state.vms.len(),
            state.name
        );
    }
    Ok(ExitCode::SUCCESS)
}
