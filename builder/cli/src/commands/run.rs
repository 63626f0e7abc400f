//! `kimg run`: start a cluster.

use anyhow::Context;
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::network::NetBackend;
use kimg_cluster::qemu::Machine;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_contract::VmId;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Image built by `kimg build` (its .json manifest must be beside it), or the name
    /// of an image in the cache (`kimg images`).
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
    /// repeat to combine. Default 384; a Kubernetes image: 2048 for vm-001 (the
    /// control plane), 1536 for the other nodes, 384 for routers and testers.
    #[arg(long, value_name = "MB|VM=MB", value_parser = parse_mem)]
    mem: Vec<PerVm>,
    /// Network backend: user (vde_switch, no root) or bridge (netns, root).
    #[arg(long, value_enum, default_value_t = NetBackend::User)]
    net: NetBackend,
    /// vCPUs: for every VM (`--cpus 2`) or one VM (`--cpus vm-201=2`); repeat to
    /// combine. Default 1; a Kubernetes image: 2 for vm-001 (the control plane).
    #[arg(long, value_name = "N|VM=N", value_parser = parse_cpus)]
    cpus: Vec<PerVm>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Wait until the cluster is ready: every VM's agent, and a Kubernetes image's
    /// control plane (`--wait=vms`: the VMs alone); at most SECS seconds.
    #[arg(long, value_name = "SECS|vms[:SECS]", num_args = 0..=1, default_missing_value = "", require_equals = true, value_parser = super::parse_wait, long_help = super::wait_help("the VMs' agents"))]
    wait: Option<Wait>,
    /// Boot through UEFI (OVMF) from the image's own ESP (systemd-boot, its loader
    /// entry's command line) instead of giving QEMU the kernel: proves the image boots
    /// on its own. The hostname then reaches the VM as an SMBIOS OEM string.
    #[arg(long)]
    uefi: bool,
    /// QEMU machine [default: q35]. microvm (no legacy PC devices, virtio-mmio)
    /// boots faster, direct kernel boot only, an image built to boot on it; --uefi
    /// needs q35.
    #[arg(long, value_enum)]
    machine: Option<Machine>,
    /// Extra kernel command line for every VM, after kimg's own words (so it wins):
    /// `--append loglevel=7` for a chatty kernel, `--append kimg.cdrom=off` to attach
    /// the overlay cdrom without unpacking it (mount /dev/sr0 and look by hand),
    /// `--append kimg.console=off` for a serial console without a login shell.
    /// Direct kernel boot only: with --uefi the image's loader entry decides.
    #[arg(
        long,
        value_name = "ARGS",
        conflicts_with = "uefi",
        allow_hyphen_values = true
    )]
    append: Option<String>,
    /// Start the cluster from a snapshot (`kimg snapshot save`) instead of booting:
    /// the VMs, their memory, processes and disks as saved, on new networks, clocks
    /// set to now. Image, size, memory and overlays come from the snapshot.
    #[arg(long, value_name = "SNAP")]
    from: Option<String>,
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
    /// Overlays (names, archive paths or deb:PKG[,PKG...] for tools from Debian
    /// packages, as for `kimg mkcdrom`) put on a cdrom that every VM unpacks at its
    /// first boot. Example: kimg run deb:tcpdump,iperf3
    overlays: Vec<String>,
}

/// One `--mem` or `--cpus` value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PerVm {
    /// Every VM.
    All(u32),
    /// One VM.
    Vm(VmId, u32),
}

/// `N` or `VM=N` with N in `range`.
fn parse_per_vm(
    s: &str,
    range: std::ops::RangeInclusive<u32>,
    what: &str,
) -> Result<PerVm, String> {
    let n = |m: &str| {
        m.parse::<u32>()
            .ok()
            .filter(|m| range.contains(m))
            .ok_or_else(|| format!("{m:?}: {what} from {} to {}", range.start(), range.end()))
    };
    match s.split_once('=') {
        None => Ok(PerVm::All(n(s)?)),
        Some((vm, m)) => Ok(PerVm::Vm(vm.parse().map_err(|e| format!("{e}"))?, n(m)?)),
    }
}

fn parse_mem(s: &str) -> Result<PerVm, String> {
    parse_per_vm(s, 64..=1 << 20, "memory is a number of MiB")
}

fn parse_cpus(s: &str) -> Result<PerVm, String> {
    parse_per_vm(s, 1..=64, "vCPUs are a number")
}

/// The value for every VM (if given) and the per-VM ones, last word wins.
fn split(args: &[PerVm]) -> (Option<u32>, Vec<(VmId, u32)>) {
    let mut all = None;
    let mut per = Vec::new();
    for a in args {
        match *a {
            PerVm::All(n) => all = Some(n),
            PerVm::Vm(vm, n) => per.push((vm, n)),
        }
    }
    (all, per)
}

/// Runs `kimg run`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Some(snap) = &a.from {
        return run_from(&a, snap);
    }
    let (mem_mb, mem_overrides) = split(&a.mem);
    let (cpus, cpus_overrides) = split(&a.cpus);
    let opts = RunOptions {
        name: a.name.clone(),
        image: kimg_image::fetch::resolve_image(&a.image),
        nodes: a.nodes,
        routers: a.routers,
        testers: a.testers,
        mem_overrides,
        net: a.net,
        mem_mb,
        cpus,
        cpus_overrides,
        accel: a.accel,
        wait: a.wait,
        uefi: a.uefi,
        machine: a.machine,
        cdrom: a.cdrom,
        append: a.append.unwrap_or_default(),
        overlays: a.overlays,
        ovlpath: a.ovlpath,
    };
    let quiet = a.quiet || a.json;
    let total = opts.size().members().map_or(0, |m| m.len());
    let state = cluster::run(
        &opts,
        &super::start_progress("run", &opts.name, "started", total, quiet),
    )
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

/// `kimg run --from SNAP`.
fn run_from(a: &Args, snap: &str) -> anyhow::Result<ExitCode> {
    let opts = kimg_cluster::restore::FromOptions {
        snap: snap.to_string(),
        name: a.name.clone(),
        wait: a.wait,
    };
    let quiet = a.quiet || a.json;
    let state = kimg_cluster::restore::run_from(
        &opts,
        &super::start_progress("run", &opts.name, "restored", 0, quiet),
    )
    .with_context(|| format!("kimg run --from {snap} --name {} failed", opts.name))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else if !quiet {
        eprintln!(
            "kimg run: cluster {:?} restored from {snap} with {} VMs",
            state.name,
            state.vms.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_cluster::WaitFor;
    use std::time::Duration;

    #[test]
    fn wait_for_the_cluster_or_the_vms_with_or_without_seconds() {
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            args: Args,
        }
        let parse = |argv: &[&str]| {
            <Run as clap::Parser>::try_parse_from(
                std::iter::once("run").chain(argv.iter().copied()),
            )
            .map(|r| r.args)
        };
        let wait = |argv: &[&str]| parse(argv).unwrap().wait;
        let secs = |n| Some(Duration::from_secs(n));
        let ready = |limit| {
            Some(Wait {
                what: WaitFor::Ready,
                limit,
            })
        };
        let vms = |limit| {
            Some(Wait {
                what: WaitFor::Vms,
                limit,
            })
        };
        assert_eq!(wait(&[]), None);
        assert_eq!(wait(&["--wait"]), ready(None));
        assert_eq!(wait(&["--wait=600"]), ready(secs(600)));
        assert_eq!(wait(&["--wait=vms"]), vms(None));
        assert_eq!(wait(&["--wait=vms:30"]), vms(secs(30)));
        // A value needs `=`: after a space it is an overlay, as before.
        let a = parse(&["--wait", "vms"]).unwrap();
        assert_eq!((a.wait, a.overlays), (ready(None), vec!["vms".to_string()]));
        for bad in ["--wait=vms:", "--wait=all", "--wait=-1"] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn mem_for_all_or_one_vm() {
        let vm1 = VmId::new(1).unwrap();
        assert_eq!(parse_mem("256"), Ok(PerVm::All(256)));
        assert_eq!(parse_mem("vm-001=1024"), Ok(PerVm::Vm(vm1, 1024)));
        for bad in ["", "12", "x=256", "vm-001=", "vm-001=lots"] {
            assert!(parse_mem(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("1=2"), Ok(PerVm::Vm(vm1, 2)));
        assert!(parse_cpus("0").is_err());
        let (all, per) = split(&[PerVm::Vm(vm1, 2), PerVm::All(4)]);
        assert_eq!((all, per), (Some(4), vec![(vm1, 2)]));
        // Nothing for every VM: the flavour's default applies.
        assert_eq!(split(&[PerVm::Vm(vm1, 2)]).0, None);
    }
}
