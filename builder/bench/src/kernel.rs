//! `kimg bench kernel`: a kernel built from source (defconfig + base + k8s fragments)
//! next to Debian's modular cloud kernel.
//!
//! - build: wall time of `make bzImage modules` + `modules_install` for the assembled
//!   config, out of tree, in a fresh cache (unless a cached build is allowed);
//! - boot: `kimg run --wait` start to ready for one VM, an image with each kernel,
//!   same machine and accelerator, in the same run; ratio built / Debian.

use super::{median, step, BenchError};
use kimg_cluster::accel::{self, Accel, AccelChoice};
use kimg_cluster::qemu;
use kimg_cluster::{self as cluster, RunEvent, RunOptions, Wait};
use kimg_contract::agent::BootState;
use kimg_image::{self as image, BuildOptions};
use kimg_kernel::source::{self, Base, Fragment};
use kimg_kernel::KernelSource;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Memory the benchmark VMs get.
const BENCH_MEM_MB: u32 = 384;

/// Options of `kimg bench kernel`.
#[derive(Debug, Clone)]
pub struct KernelBenchOptions {
    /// The kernel source tree.
    pub tree: PathBuf,
    /// Parallel compile jobs.
    pub jobs: usize,
    /// Reuse a build from kimg's cache (the build time is then not measured).
    pub cached_ok: bool,
    /// Boots of each kernel; medians are compared.
    pub runs: usize,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The static kimg-init binary.
    pub init: PathBuf,
    /// Scratch directory.
    pub scratch: PathBuf,
}

/// Results of `kimg bench kernel`.
#[derive(Debug, Serialize)]
pub struct KernelBenchReport {
    /// Accelerator used for the boots.
    pub accel: Accel,
    /// The built kernel's release.
    pub release: String,
    /// Parallel jobs of the build.
    pub jobs: usize,
    /// Wall seconds of the build; `None` when a cached build was used.
    pub build_secs: Option<f64>,
    /// Files compiled.
    pub compiled: usize,
    /// Boots of the built kernel's image (seconds to ready).
    pub built_boot_secs: Vec<f64>,
    /// Boots of the Debian kernel's image.
    pub debian_boot_secs: Vec<f64>,
    /// Median built / median Debian.
    pub ratio: f64,
}

/// Runs the benchmark; `log` gets progress and one line per measurement.
pub fn run(opts: &KernelBenchOptions, log: &dyn Fn(&str)) -> Result<KernelBenchReport, BenchError> {
    // A fresh cache makes the build a real, full build.
    let cache = if opts.cached_ok {
        kimg_util::cache::cache_dir()
    } else {
        opts.scratch.join("cache")
    };
    let t = Instant::now();
    let built = source::assemble_and_build(
        &opts.tree,
        &Base::Defconfig,
        &Fragment::embedded(kimg_contract::Flavour::K8s)?,
        opts.jobs,
        &cache,
        log,
    )?;
    let build_secs = (!built.cached).then(|| t.elapsed().as_secs_f64());
    match build_secs {
        Some(s) => log(&format!(
            "kernel build ({} files, -j{}): {s:.0}s",
            built.compiled, opts.jobs
        )),
        None => log("kernel build: cached, not measured"),
    }

    let image_with = |name: &str, kernel: KernelSource| {
        let b = BuildOptions {
            out_dir: opts.scratch.join(name),
            kernel,
            size: image::DEFAULT_SIZE,
            init: opts.init.clone(),
            busybox: PathBuf::from("/bin/busybox"),
            mtime: image::source_date_epoch(),
            zstd_level: 9,
            flavour: kimg_contract::Flavour::Base,
            k8s_release: None,
            k8s_images: Vec::new(),
            k8s_images_at_boot: false,
        };
        image::build(&b, &|_| {})
    };
    let built_img = image_with(
        "built",
        KernelSource::Files {
            kernel: built.vmlinuz.clone(),
            modules: built.modules_dir.clone(),
        },
    )?;
    let debian_img = image_with("debian", KernelSource::DebianDefault)?;

    let accel =
        accel::choose(opts.accel, qemu::QEMU, &opts.scratch).map_err(step("accelerator"))?;
    std::env::set_var("KIMG_RUNTIME_DIR", opts.scratch.join("rt"));
    let (mut built_boot_secs, mut debian_boot_secs) = (Vec::new(), Vec::new());
    for i in 0..opts.runs {
        for (which, img, out) in [
            ("built", &built_img.image, &mut built_boot_secs),
            ("debian", &debian_img.image, &mut debian_boot_secs),
        ] {
            let s = boot_to_ready(which, img, accel)?;
            log(&format!("{which} kernel boot {}: {s:.2}s", i + 1));
            out.push(s);
        }
    }
    let ratio = median(&built_boot_secs) / median(&debian_boot_secs).max(f64::EPSILON);
    Ok(KernelBenchReport {
        accel,
        release: built.release,
        jobs: opts.jobs,
        build_secs,
        compiled: built.compiled,
        built_boot_secs,
        debian_boot_secs,
        ratio,
    })
}

/// Seconds from `kimg run` to the one VM answering ready.
fn boot_to_ready(which: &'static str, image: &Path, accel: Accel) -> Result<f64, BenchError> {
    let ro = RunOptions {
        name: "bench-kernel".into(),
        image: image.to_path_buf(),
        nodes: 1,
        routers: 0,
        mem_mb: Some(BENCH_MEM_MB),
        cpus: Some(1),
        accel: accel.into(),
        wait: Some(Wait::vms(Duration::from_secs(180))),
        ..RunOptions::default()
    };
    let state = std::sync::Mutex::new(None);
    let t = Instant::now();
    let result = cluster::run(&ro, &|e| {
        if let RunEvent::Ready(_, s, _) = e {
            if let Ok(mut st) = state.lock() {
                *st = Some(s);
            }
        }
    });
    let secs = t.elapsed().as_secs_f64();
    cluster::stop("bench-kernel", Duration::from_secs(10))?;
    result?;
    match state.into_inner().ok().flatten() {
        Some(BootState::Ready) => Ok(secs),
        // Degraded: the kernel lacks something.
        s => Err(step(&format!("the {which} kernel's VM"))(format!(
            "came up {}, not ready",
            s.map_or_else(|| "without a state".into(), |s| format!("{s:?}"))
        ))),
    }
}
