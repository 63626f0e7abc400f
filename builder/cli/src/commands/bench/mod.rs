//! `kimg bench`: the issues' figures, each suite measured side by side in one run.

mod k8s;

use kimg_bench::{self as bench, boot::BenchOptions};
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::network::NetBackend;
use kimg_cluster::qemu::Machine;
use kimg_image::{self as image, BuildOptions};
use kimg_kernel::KernelSource;
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Measure what the issues ask for; each suite prints its figures next to what they
/// are compared with, measured in the same run. ctrl-c stops the bench's clusters
/// and removes its temp dirs.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(clap::Subcommand)]
enum Suite {
    Boot(BootArgs),
    Cluster(ClusterArgs),
    Scale(ScaleArgs),
    Publish(PublishArgs),
    Cdrom(CdromArgs),
    Kernel(KernelArgs),
    K8s(k8s::K8sArgs),
    Snapshot(SnapshotArgs),
    Exec(ExecArgs),
}

/// The agent's streams in one VM: exec round trip of `true` (median of 50) next to a
/// `status` round trip, and `kimg cp` host -> VM of a 100 MB file next to the VM
/// reading the same bytes from its cdrom (cold page cache).
#[derive(clap::Args)]
struct ExecArgs {
    /// Image built by `kimg build`.
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Memory of the VM in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Size of the copied file in MB.
    #[arg(long, default_value_t = 100)]
    mb: u64,
    /// Round trips per median.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `kimg publish` next to `xz -T0 -6` on the same image (size ratio goal <= 1.0, time
/// ratio goal < 1.0), then `kimg fetch` of the published local .xz (MB/s, sha256
/// verification included).
#[derive(clap::Args)]
struct PublishArgs {
    /// The image (built by `kimg build`, NAME.json beside it).
    #[arg(default_value = "out/hd.img")]
    image: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `kimg mkcdrom` vs `xorriso -as mkisofs -R` on the same ~200 MB of overlays (goal:
/// kimg faster), and kimg-init's unpacking of that cdrom at boot vs busybox tar
/// extracting the same archives first thing in a fresh VM of the same image (goal:
/// kimg-init faster); busybox tar in kimg-init's VM afterwards is shown too.
#[derive(clap::Args)]
struct CdromArgs {
    /// Image to boot (from `kimg build`).
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Size of the overlay set in MB.
    #[arg(long, default_value_t = 200)]
    mb: u64,
    /// Runs of each ISO writer and of each unpacking VM; medians are compared.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Accelerator for the VM.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// A kernel built from source (defconfig + base.config + k8s.config) next to Debian's
/// modular cloud kernel: the build's wall time here, and each kernel's image booting
/// to ready, medians and ratio, in the same run. A fresh build takes tens of minutes.
#[derive(clap::Args)]
struct KernelArgs {
    /// The kernel source tree [default: `kimg kernel source`'s, fetched if needed].
    #[arg(long, value_name = "DIR")]
    source: Option<PathBuf>,
    /// Parallel compile jobs [default: number of CPUs].
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
    /// Use a build from kimg's cache if there is one (the build time is then not measured).
    #[arg(long)]
    cached_ok: bool,
    /// Boots of each kernel; medians are compared.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Accelerator for the boots.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// The static kimg-init binary.
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// Cluster start: wall time of `kimg run --nodes 4 --wait` (6 VMs) next to the floor
/// 6 x one VM's QEMU CPU time to ready / host cores (goal: ratio <= 1.5), QEMU RSS
/// per idle VM, and a 20-node cluster's time to ready and total RSS.
#[derive(clap::Args)]
struct ClusterArgs {
    /// Image built by `kimg build`.
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Nodes of the big cluster (plus 2 routers).
    #[arg(long, default_value_t = 20)]
    big_nodes: u16,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Network backend.
    #[arg(long, value_enum, default_value_t = NetBackend::User)]
    net: NetBackend,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// A big cluster: N nodes + 1 router to ready next to the floor N x one VM's QEMU CPU
/// time / host cores (goal: ratio <= 1.5), their total QEMU RSS once idle (goal: <=
/// 12 GB for 100 VMs), and how long status and stop of them take.
#[derive(clap::Args)]
struct ScaleArgs {
    /// Image built by `kimg build`.
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Nodes (plus 1 router).
    #[arg(long, default_value_t = 100)]
    nodes: u16,
    /// Memory per VM in MiB (the smallest the base image boots with).
    #[arg(long, default_value_t = 128)]
    mem: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// QEMU machine of kimg's VMs [default: kimg run's, q35].
    #[arg(long, value_enum)]
    machine: Option<Machine>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `kimg build` with a warm kernel cache (goal <= 10 s), and one VM's boot to ready
/// next to the floors, measured alternately: the same kernel booting a busybox-only
/// initramfs that powers off at once on q35 (goal: ratio <= 1.0) and on microvm.
#[derive(clap::Args)]
struct BootArgs {
    /// Boots of each kind; medians are compared.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Accelerator for both boots.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// QEMU machine of kimg's VMs [default: kimg run's, q35].
    #[arg(long, value_enum)]
    machine: Option<Machine>,
    /// Use this Debian linux-image .deb instead of the cloud kernel.
    #[arg(long, value_name = "FILE")]
    kernel_deb: Option<PathBuf>,
    /// The static kimg-init binary.
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// Snapshots: 4 nodes + 2 routers, restore (`kimg run --from`) to ready next to a
/// cold boot to ready in the same run (goal: ratio <= 0.25), the save's time and
/// pause, and each VM's snapshot size next to its RAM. With --k8s-image, also a
/// Kubernetes cluster of 2 nodes + 1 router: restore to every node Ready next to a
/// cold start to every node Ready (goal: ratio <= 0.1); a node counts once its
/// kubelet renewed its Lease after the start began. The Kubernetes part takes ~5
/// minutes under TCG.
#[derive(clap::Args)]
struct SnapshotArgs {
    /// Image built by `kimg build`.
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Image built by `kimg build --k8s` with a real release (e.g. from
    /// `scripts/k8s-release`): adds the Kubernetes measurement.
    #[arg(long)]
    k8s_image: Option<PathBuf>,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = 384)]
    mem: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg bench`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    stop_clusters_on_interrupt()?;
    let done = match a.suite {
        Suite::Boot(b) => boot(b),
        Suite::Cluster(c) => cluster(c),
        Suite::Scale(s) => scale(s),
        Suite::Publish(p) => publish(p),
        Suite::Cdrom(c) => cdrom(c),
        Suite::Kernel(k) => kernel(k),
        Suite::K8s(k) => k8s::run(k),
        Suite::Snapshot(s) => snapshot(s),
        Suite::Exec(e) => exec(e),
    };
    // A suite that failed because its clusters were being stopped under it: the
    // interrupt's thread ends the process once they are gone, not this error.
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::park();
    }
    done
}

fn snapshot(a: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime_dir()?;
    let cache = scratch_dir("kimg-bench-cache-")?;
    let opts = bench::snapshot::SnapshotBenchOptions {
        image: kimg_image::fetch::resolve_image(&a.image),
        mem_mb: a.mem,
        accel: a.accel,
        runtime: runtime.path().to_path_buf(),
        cache: cache.path().to_path_buf(),
        k8s_image: a.k8s_image.as_deref().map(kimg_image::fetch::resolve_image),
    };
    let r = bench::snapshot::run(&opts, &progress(a.json))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} VMs ({}): restore to ready {:.2}s vs cold boot to ready {:.2}s = {:.2} (goal <= 0.25)",
        r.vms,
        r.accel.as_str(),
        r.restore_secs,
        r.cold_secs,
        r.ratio
    );
    println!(
        "save {:.2}s ({:.2}s paused); per VM: state {:.1} MiB + layer {:.1} MiB for {} MiB of RAM (load {:.1})",
        r.save_secs, r.paused_secs, r.state_mb, r.layer_mb, r.ram_mb, r.load_avg
    );
    if let Some(k) = &r.k8s {
        println!(
            "Kubernetes {} nodes + {} router: restore to every node Ready {:.1}s vs cold start {:.1}s = {:.2} (goal <= 0.1)",
            k.nodes, k.routers, k.restore_secs, k.cold_secs, k.ratio
        );
        println!(
            "  save {:.1}s ({:.1}s paused); state {:.0} MiB for {} MiB of guest RAM",
            k.save_secs, k.paused_secs, k.state_mb, k.ram_mb
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn scale(a: ScaleArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime_dir()?;
    let opts = bench::scale::ScaleBenchOptions {
        image: kimg_image::fetch::resolve_image(&a.image),
        nodes: a.nodes,
        mem_mb: a.mem,
        accel: a.accel,
        machine: a.machine,
        runtime: runtime.path().to_path_buf(),
    };
    let r = bench::scale::run(&opts, &progress(a.json))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "accelerator, machine, host cores     {}, {}, {}",
        r.accel.as_str(),
        r.machine.as_str(),
        r.cores
    );
    println!(
        "1 VM: QEMU CPU to ready              {:7.2} s",
        r.single_cpu_secs
    );
    println!(
        "{:3} VMs to ready                     {:7.1} s   (floor {} x CPU / cores = {:.1} s; load {:.1})",
        r.vms, r.wall_secs, r.vms, r.floor_secs, r.load_avg
    );
    println!(
        "ratio / floor                        {:7.2}     (goal <= 1.5)",
        r.ratio
    );
    println!(
        "idle VMs' QEMU CPU                   {:7.1} %   of one core ({:.2}% per VM)",
        r.idle_core_pct,
        r.idle_core_pct / r.vms.max(1) as f64
    );
    println!(
        "total QEMU RSS once idle             {:7.0} MB  (goal <= 12000 MB for 100 VMs; {:.0} MB per VM)",
        r.idle_rss_mb,
        r.idle_rss_mb / r.vms.max(1) as f64
    );
    let per_vm = |mb: f64| mb / r.vms.max(1) as f64;
    println!(
        "  proportional, nothing merged       {:7.0} MB  ({:.0} MB per VM)",
        r.idle_pss_mb,
        per_vm(r.idle_pss_mb)
    );
    match (r.ksm_pss_mb, r.ksm_secs) {
        (Some(mb), Some(secs)) => println!(
            "  proportional, KSM merged           {:7.0} MB  ({:.0} MB per VM; {:.2} of unmerged; ksmd's two passes took {secs:.0} s)",
            mb,
            per_vm(mb),
            mb / r.idle_pss_mb.max(f64::EPSILON)
        ),
        _ => println!("  proportional, KSM merged                 -     (KSM was not running)"),
    }
    println!(
        "kimg status / kimg stop              {:7.2} s / {:.2} s",
        r.status_secs, r.stop_secs
    );
    Ok(ExitCode::SUCCESS)
}

fn cluster(a: ClusterArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime_dir()?;
    let opts = bench::cluster::ClusterBenchOptions {
        image: a.image,
        mem_mb: a.mem,
        big_nodes: a.big_nodes,
        accel: a.accel,
        net: a.net,
        runtime: runtime.path().to_path_buf(),
    };
    let quiet = a.json;
    let r = bench::cluster::run(&opts, &progress(quiet))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "accelerator, host cores              {}, {}",
        r.accel.as_str(),
        r.cores
    );
    println!(
        "1 VM: run --wait to ready            {:6.2} s   (QEMU CPU {:.2} s)",
        r.single_wall_secs, r.single_cpu_secs
    );
    println!(
        "6 VMs (4 nodes, 2 routers) to ready  {:6.2} s   (floor 6 x CPU / cores = {:.2} s)",
        r.cluster_wall_secs, r.cluster_floor_secs
    );
    println!(
        "  their QEMU CPU until ready         {:6.2} s   (host load average {:.1})",
        r.cluster_cpu_secs, r.load_avg
    );
    println!(
        "  their CPU / (6 x single CPU)       {:6.2}     (> 1: parallel boots cost extra CPU)",
        r.cpu_ratio
    );
    println!(
        "ratio cluster / floor                {:6.2}     (goal <= 1.5)",
        r.ratio
    );
    println!(
        "QEMU RSS per idle VM                 {:6.0} MB",
        r.idle_rss_mb
    );
    println!(
        "{} VMs ({} nodes, 2 routers) ready   {:6.2} s   (total QEMU RSS {:.0} MB)",
        r.big_vms,
        r.big_vms.saturating_sub(2),
        r.big_wall_secs,
        r.big_total_rss_mb
    );
    Ok(ExitCode::SUCCESS)
}

fn boot(a: BootArgs) -> anyhow::Result<ExitCode> {
    let scratch = scratch_dir("kimg-bench-")?;
    let opts = BenchOptions {
        build: BuildOptions {
            out_dir: PathBuf::new(),
            kernel: a
                .kernel_deb
                .map_or(KernelSource::DebianDefault, KernelSource::Deb),
            size: image::DEFAULT_SIZE,
            init: match a.init {
                Some(p) => p,
                None => image::default_init(super::KIMG_INIT)?,
            },
            busybox: PathBuf::from("/bin/busybox"),
            mtime: image::source_date_epoch(),
            zstd_level: 9,
            flavour: kimg_contract::Flavour::Base,
            k8s_release: None,
            k8s_images: Vec::new(),
            k8s_images_at_boot: false,
        },
        runs: a.runs.max(1),
        accel: a.accel,
        machine: a.machine,
        scratch: scratch.path().to_path_buf(),
    };
    let quiet = a.json;
    let r = bench::boot::run(&opts, &progress(quiet))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("accelerator                         {}", r.accel.as_str());
        println!(
            "kimg build, warm kernel cache       {:6.2} s   (goal <= 10 s)",
            r.build_secs
        );
        println!(
            "floor q35: busybox initrd, poweroff {:6.2} s   (median of {})",
            bench::median(&r.floor_secs),
            r.floor_secs.len()
        );
        println!(
            "floor microvm: the same             {:6.2} s   (median of {})",
            bench::median(&r.microvm_floor_secs),
            r.microvm_floor_secs.len()
        );
        println!(
            "kimg run --wait, 1 VM, to ready     {:6.2} s   (median of {}, {})",
            bench::median(&r.boot_secs),
            r.boot_secs.len(),
            r.machine.as_str()
        );
        println!(
            "ratio boot / q35 floor              {:6.2}     (goal <= 1.0)",
            r.ratio
        );
        println!(
            "ratio boot / microvm floor          {:6.2}",
            r.microvm_ratio
        );
        if !r.parts.is_empty() {
            println!("where a kimg boot went (medians of {}):", r.parts.len());
            for (part, secs) in bench::boot::BootParts::medians(&r.parts) {
                println!("  {part:<36}{secs:6.2} s");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn publish(a: PublishArgs) -> anyhow::Result<ExitCode> {
    if !a.image.is_file() {
        anyhow::bail!(
            "{}: no image; run `kimg build` first or pass the image",
            a.image.display()
        );
    }
    let scratch = scratch_dir("kimg-bench-")?;
    let quiet = a.json;
    let r = bench::publish::run(
        &bench::publish::PublishBenchOptions {
            image: a.image,
            scratch: scratch.path().to_path_buf(),
        },
        &progress(quiet),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!("image (qcow2)                 {:8.1} MB", mb(r.image_bytes));
    println!(
        "xz -T0 -6                     {:8.1} MB  {:6.2} s",
        mb(r.xz_bytes),
        r.xz_secs
    );
    println!(
        "kimg publish (level 6)        {:8.1} MB  {:6.2} s",
        mb(r.kimg_bytes),
        r.kimg_secs
    );
    println!(
        "size ratio kimg/xz            {:8.3}      (goal <= 1.0)",
        r.size_ratio
    );
    println!(
        "time ratio kimg/xz            {:8.3}      (goal < 1.0)",
        r.time_ratio
    );
    println!(
        "kimg fetch, local .xz         {:8.1} MB/s archive, {:.1} MB/s image, {:.2} s (sha256 verified)",
        r.fetch_archive_mb_s, r.fetch_image_mb_s, r.fetch_secs
    );
    Ok(ExitCode::SUCCESS)
}

fn cdrom(a: CdromArgs) -> anyhow::Result<ExitCode> {
    let scratch = scratch_dir("kimg-bench-")?;
    let opts = bench::cdrom::CdromBenchOptions {
        image: a.image,
        mb: a.mb,
        runs: a.runs.max(1),
        accel: a.accel,
        scratch: scratch.path().to_path_buf(),
    };
    let quiet = a.json;
    let r = bench::cdrom::run(&opts, &progress(quiet))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "overlay archives                    {:6.1} MB",
            r.overlay_bytes as f64 / 1e6
        );
        println!(
            "kimg mkcdrom                        {:6.3} s   (median of {})",
            bench::median(&r.kimg_mkcdrom_secs),
            r.kimg_mkcdrom_secs.len()
        );
        println!(
            "xorriso -as mkisofs -R              {:6.3} s   (median of {})",
            bench::median(&r.xorriso_secs),
            r.xorriso_secs.len()
        );
        println!(
            "ratio xorriso / kimg                {:6.2}     (goal > 1: kimg faster)",
            r.mkcdrom_speedup
        );
        println!(
            "unpack: kimg-init at boot           {:6.2} s   (median of {})",
            r.kimg_init_unpack_secs,
            r.xorriso_secs.len()
        );
        println!(
            "unpack: busybox tar, fresh VM       {:6.2} s   (median of {})",
            r.busybox_tar_secs,
            r.xorriso_secs.len()
        );
        println!(
            "  (busybox tar after it, same VM    {:6.2} s: guest RAM already touched)",
            r.busybox_tar_same_vm_secs
        );
        println!(
            "ratio busybox / kimg-init           {:6.2}     (goal > 1: kimg-init faster)",
            r.unpack_speedup
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn kernel(a: KernelArgs) -> anyhow::Result<ExitCode> {
    let log = progress(a.json);
    let tree = match a.source {
        Some(t) => t,
        None => kimg_kernel::source::fetch(&kimg_util::cache::cache_dir(), &log)?,
    };
    let scratch = scratch_dir("kimg-bench-")?;
    let jobs = a.jobs.unwrap_or_else(kimg_kernel::source::default_jobs);
    let opts = bench::kernel::KernelBenchOptions {
        tree,
        jobs,
        cached_ok: a.cached_ok,
        runs: a.runs.max(1),
        accel: a.accel,
        init: match a.init {
            Some(p) => p,
            None => image::default_init(super::KIMG_INIT)?,
        },
        scratch: scratch.path().to_path_buf(),
    };
    let r = bench::kernel::run(&opts, &log)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("accelerator                          {}", r.accel.as_str());
        match r.build_secs {
            Some(s) => println!(
                "kernel build {} (-j{}, {} files)  {:7.0} s",
                r.release, r.jobs, r.compiled, s
            ),
            None => println!("kernel build {}: cached, not measured", r.release),
        }
        println!(
            "boot to ready, built kernel          {:7.2} s   (median of {})",
            bench::median(&r.built_boot_secs),
            r.built_boot_secs.len()
        );
        println!(
            "boot to ready, Debian cloud kernel   {:7.2} s   (median of {})",
            bench::median(&r.debian_boot_secs),
            r.debian_boot_secs.len()
        );
        println!("ratio built / Debian                 {:7.2}", r.ratio);
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress lines on stderr, unless the figures go out as JSON.
fn exec(a: ExecArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime_dir()?;
    let opts = bench::exec::ExecBenchOptions {
        image: a.image,
        mem_mb: a.mem,
        mb: a.mb,
        runs: a.runs.max(1),
        accel: a.accel,
        runtime: runtime.path().to_path_buf(),
    };
    let r = bench::exec::run(&opts, &progress(a.json))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "round trip, median of {:<3}         status {:7.1} ms   exec true {:7.1} ms   ratio {:.2}",
        opts.runs, r.status_ms, r.exec_true_ms, r.exec_ratio
    );
    println!(
        "host -> VM, {:.0} MB                  kimg cp {:6.1} MB/s ({:.2} s)   cdrom read {:6.1} MB/s ({:.2} s)   ratio {:.2}",
        r.bytes as f64 / 1e6,
        r.cp_mb_s,
        r.cp_secs,
        r.cdrom_mb_s,
        r.cdrom_secs,
        r.cp_ratio
    );
    Ok(ExitCode::SUCCESS)
}

/// The bench's temp dirs (runtime roots of its clusters, scratch), for
/// [`stop_clusters_on_interrupt`] to remove.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Set once an interrupt is being handled.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A runtime root for the bench's clusters, in /tmp (QEMU's socket paths have a
/// length limit): removed when it drops, or on an interrupt.
fn runtime_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("kimg-bench-rt-")
        .tempdir_in("/tmp")?;
    Ok(registered(dir))
}

/// A scratch dir of the bench in the system's temp dir: removed when it drops, or on
/// an interrupt.
fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(registered(
        tempfile::Builder::new().prefix(prefix).tempdir()?,
    ))
}

/// `dir`, noted in [`TEMP_DIRS`].
fn registered(dir: tempfile::TempDir) -> tempfile::TempDir {
    TEMP_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.path().to_path_buf());
    dir
}

/// On ctrl-c (or SIGTERM, SIGHUP) the bench stops its clusters and removes its temp
/// dirs before it exits: their QEMUs run in sessions of their own, which a terminal's
/// ctrl-c does not reach, and a bench killed by the signal never gets to its own `stop`.
/// The signals are blocked here, before any thread starts, and taken by one thread
/// with sigwait; std's `Command` unblocks them in every child (QEMU, curl, builds).
fn stop_clusters_on_interrupt() -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| anyhow::anyhow!("block SIGINT, SIGTERM, SIGHUP: {e}"))?;
    std::thread::spawn(move || {
        let Ok(sig) = set.wait() else { return };
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\nkimg bench: {sig}: stopping the bench's clusters");
        let dirs = TEMP_DIRS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Only a runtime root of the bench's own (each suite points KIMG_RUNTIME_DIR at
        // one): before that, the root is the user's, whose clusters are not ours.
        let ours = std::env::var_os("KIMG_RUNTIME_DIR")
            .is_some_and(|root| dirs.iter().any(|d| Path::new(&root).starts_with(d)));
        if ours {
            // Twice: a VM the suite launched while the first pass ran goes too. The
            // suite's thread may hold a cluster's lock (a launch): no other kimg uses
            // this root, so the lock is not asked for.
            for _ in 0..2 {
                for c in kimg_cluster::list::clusters() {
                    let stopped = kimg_cluster::stop_holding_lock(&c.name, Duration::from_secs(5));
                    if let Err(e) = stopped {
                        eprintln!("kimg bench: stop {}: {e}", c.name);
                    }
                }
            }
        }
        for d in &dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        // Then die of the signal, as an interrupted program does (the shell sees it).
        // SAFETY: SIG_DFL installs no handler; nothing runs in signal context.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        let mut one = SigSet::empty();
        one.add(sig);
        let _ = one.thread_unblock();
        let _ = nix::sys::signal::raise(sig);
    });
    Ok(())
}

fn progress(quiet: bool) -> impl Fn(&str) {
    move |line| {
        // Once interrupted, figures of a suite whose clusters are going say nothing.
        if !quiet && !INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("kimg bench: {line}");
        }
    }
}
