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
    Kernel(KernelArgs),
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
        Suite::Kernel(k) => kernel(k),
    }
}

fn kernel(a: KernelArgs) -> anyhow::Result<ExitCode> {
    let quiet = a.json;
    let log = |l: &str| {
        if !quiet {
            eprintln!("kimg bench: {l}");
        }
    };
    let tree = match a.source {
        Some(t) => t,
        None => kimg::kernel::source::fetch(&kimg::cache::cache_dir(), &log)?,
    };
    let scratch = tempfile::Builder::new().prefix("kimg-bench-").tempdir()?;
    let jobs = a.jobs.unwrap_or_else(kimg::kernel::source::default_jobs);
    let opts = bench::kernel::KernelBenchOptions {
        tree,
        jobs,
        cached_ok: a.cached_ok,
        runs: a.runs.max(1),
        accel: a.accel,
        init: a.init.unwrap_or_else(image::default_init),
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
