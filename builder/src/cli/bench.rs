//! `kimg bench`: the issues' figures, each suite measured side by side in one run.

use kimg::bench::{self, boot::BenchOptions};
use kimg::image::{self, BuildOptions};
use kimg::kernel::KernelSource;
use kimg::vm::accel::AccelChoice;
use std::path::PathBuf;
use std::process::ExitCode;

/// Measure what the issues ask for; each suite prints its figures next to what they
/// are compared with, measured in the same run.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(clap::Subcommand)]
enum Suite {
    Boot(BootArgs),
    Cdrom(CdromArgs),
}

/// `kimg mkcdrom` vs `xorriso -as mkisofs -R` on the same ~200 MB of overlays (goal:
/// kimg faster), and in one VM booted with that cdrom, kimg-init's unpacking at boot
/// vs busybox tar extracting the same archives (goal: kimg-init faster).
#[derive(clap::Args)]
struct CdromArgs {
    /// Image to boot (from `kimg build`).
    #[arg(long, default_value = "out/hd.img")]
    image: PathBuf,
    /// Size of the overlay set in MB.
    #[arg(long, default_value_t = 200)]
    mb: u64,
    /// Runs of each ISO writer; medians are compared.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Accelerator for the VM.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `kimg build` with a warm kernel cache (goal <= 10 s), and one VM's boot to ready
/// next to the floor: the same kernel and machine booting a busybox-only initramfs
/// that powers off at once (goal: ratio <= 1.5).
#[derive(clap::Args)]
struct BootArgs {
    /// Boots of each kind; medians are compared.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Accelerator for both boots.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
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

/// Runs `kimg bench`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    match a.suite {
        Suite::Boot(b) => boot(b),
        Suite::Cdrom(c) => cdrom(c),
    }
}

fn cdrom(a: CdromArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::Builder::new().prefix("kimg-bench-").tempdir()?;
    let opts = bench::cdrom::CdromBenchOptions {
        image: a.image,
        mb: a.mb,
        runs: a.runs.max(1),
        accel: a.accel,
        scratch: scratch.path().to_path_buf(),
    };
    let quiet = a.json;
    let r = bench::cdrom::run(&opts, &|l| {
        if !quiet {
            eprintln!("kimg bench: {l}");
        }
    })?;
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
            "unpack in VM: kimg-init             {:6.2} s",
            r.kimg_init_unpack_secs
        );
        println!(
            "unpack in VM: busybox tar           {:6.2} s",
            r.busybox_tar_secs
        );
        println!(
            "ratio busybox / kimg-init           {:6.2}     (goal > 1: kimg-init faster)",
            r.unpack_speedup
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn boot(a: BootArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::Builder::new().prefix("kimg-bench-").tempdir()?;
    let opts = BenchOptions {
        build: BuildOptions {
            out_dir: PathBuf::new(),
            name: "hd".into(),
            kernel: a
                .kernel_deb
                .map_or(KernelSource::DebianDefault, KernelSource::Deb),
            size: image::DEFAULT_SIZE,
            init: a.init.unwrap_or_else(image::default_init),
            busybox: PathBuf::from("/bin/busybox"),
            mtime: image::source_date_epoch(),
            zstd_level: 9,
        },
        runs: a.runs.max(1),
        accel: a.accel,
        scratch: scratch.path().to_path_buf(),
    };
    let quiet = a.json;
    let r = bench::boot::run(&opts, &|l| {
        if !quiet {
            eprintln!("kimg bench: {l}");
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("accelerator                         {}", r.accel.as_str());
        println!(
            "kimg build, warm kernel cache       {:6.2} s   (goal <= 10 s)",
            r.build_secs
        );
        println!(
            "floor: busybox initramfs, poweroff  {:6.2} s   (median of {})",
            bench::median(&r.floor_secs),
            r.floor_secs.len()
        );
        println!(
            "kimg run --wait, 1 VM, to ready     {:6.2} s   (median of {})",
            bench::median(&r.boot_secs),
            r.boot_secs.len()
        );
        println!(
            "ratio boot / floor                  {:6.2}     (goal <= 1.5)",
            r.ratio
        );
    }
    Ok(ExitCode::SUCCESS)
}
