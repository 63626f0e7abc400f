//! `kimg run`: start a cluster.

use anyhow::Context;
use kimg::vm::accel::AccelChoice;
use kimg::vm::cluster::{self, RunEvent, RunOptions};
use kimg::vm::network::NetBackend;
use kimg_contract::VmId;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Start a cluster of VMs from an image: vm-001.. are nodes, vm-201.. routers,
/// vm-221.. testers.
///
/// Nodes and routers share the cluster network (192.168.1.N, fd00:6b69:0:1::N),
/// routers and testers the tester network (192.168.2.N, fd00:6b69:0:2::N); nodes and
/// testers route through vm-201, routers forward. The networks are closed: by
/// default one vde_switch per network (no root); `--net bridge` (root) uses Linux
/// bridges and taps inside a network namespace `kimg-NAME`. `kimg status` shows the
/// plan. Each VM gets its own qcow2 layer over the image (the image is never written), a
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
    /// Number of testers (vm-221..).
    #[arg(long, default_value_t = 0)]
    testers: u16,
    /// Memory in MiB: for every VM (`--mem 256`) or one VM (`--mem vm-001=1024`);
    /// repeat to combine.
    #[arg(long, value_name = "MB|VM=MB", default_value = "384", value_parser = parse_mem)]
    mem: Vec<MemArg>,
    /// Network backend: user (vde_switch, no root) or bridge (netns, root).
    #[arg(long, value_enum, default_value_t = NetBackend::User)]
    net: NetBackend,
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
}

/// One `--mem` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemArg {
    /// Every VM.
    All(u32),
    /// One VM.
    Vm(VmId, u32),
}

fn parse_mem(s: &str) -> Result<MemArg, String> {
    let mb = |m: &str| {
        m.parse::<u32>()
            .ok()
            .filter(|m| *m >= 64)
            .ok_or_else(|| format!("{m:?}: memory is a number of MiB, at least 64"))
    };
    match s.split_once('=') {
        None => Ok(MemArg::All(mb(s)?)),
        Some((vm, m)) => Ok(MemArg::Vm(vm.parse().map_err(|e| format!("{e}"))?, mb(m)?)),
    }
}

/// Runs `kimg run`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut mem_mb = 384;
    let mut mem_overrides = Vec::new();
    for m in &a.mem {
        match *m {
            MemArg::All(mb) => mem_mb = mb,
            MemArg::Vm(vm, mb) => mem_overrides.push((vm, mb)),
        }
    }
    let opts = RunOptions {
        name: a.name.clone(),
        image: a.image,
        nodes: a.nodes,
        routers: a.routers,
        testers: a.testers,
        mem_overrides,
        net: a.net,
        mem_mb,
        cpus: a.cpus,
        accel: a.accel,
        wait: a.wait.map(Duration::from_secs),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_for_all_or_one_vm() {
        assert_eq!(parse_mem("256"), Ok(MemArg::All(256)));
        assert_eq!(
            parse_mem("vm-001=1024"),
            Ok(MemArg::Vm(VmId::new(1).unwrap(), 1024))
        );
        for bad in ["", "12", "x=256", "vm-001=", "vm-001=lots"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
    }
}
