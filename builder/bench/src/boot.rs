//! `kimg bench boot`: build and single-VM boot figures (the base image issue).
//!
//! - build: `kimg build` wall time with a warm kernel cache (goal <= 10 s);
//! - boot: `kimg run --wait` start to ready for one VM (its default machine), next to
//!   the floors: the same kernel and accelerator booting a busybox-only initramfs
//!   that powers off at once, on q35 (the floor of the machine kimg used before
//!   microvm; goal: ratio <= 1.0) and on microvm, runs alternated.

use super::{median, step, BenchError};
use kimg_cluster::accel::{self, Accel, AccelChoice};
use kimg_cluster::qemu::{self, GuestCode, Machine};
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_formats::initramfs::Initramfs;
use kimg_image::{self as image, BuildOptions};
use kimg_util::fs::PathContext;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Memory the benchmark VMs get (same for floor and kimg).
const BENCH_MEM_MB: u32 = 384;

/// Results of one benchmark run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Accelerator used for both boots.
    pub accel: Accel,
    /// `kimg build` wall seconds, warm kernel cache.
    pub build_secs: f64,
    /// The machine `kimg run` chose.
    pub machine: Machine,
    /// Floor boots on q35 (wall seconds, QEMU start to exit).
    pub floor_secs: Vec<f64>,
    /// Floor boots on microvm.
    pub microvm_floor_secs: Vec<f64>,
    /// kimg boots (wall seconds, `run` start to ready).
    pub boot_secs: Vec<f64>,
    /// Median boot / median q35 floor (goal <= 1.0).
    pub ratio: f64,
    /// Median boot / median microvm floor.
    pub microvm_ratio: f64,
}

/// Options of `kimg bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Build inputs (out_dir is replaced by a scratch dir).
    pub build: BuildOptions,
    /// Boots of each kind.
    pub runs: usize,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Machine of kimg's boots (`None`: kimg run's default).
    pub machine: Option<Machine>,
    /// Scratch directory.
    pub scratch: PathBuf,
}

/// Runs the whole benchmark; `log` gets one line per measurement.
pub fn run(opts: &BenchOptions, log: &dyn Fn(&str)) -> Result<BenchReport, BenchError> {
    let out = opts.scratch.join("image");
    let mut b = opts.build.clone();
    b.out_dir = out.clone();
    // Warm the kernel cache first; the figure is the second, warm build.
    image::build(&b, &|_| {})?;
    let t = Instant::now();
    let built = image::build(&b, &|_| {})?;
    let build_secs = t.elapsed().as_secs_f64();
    log(&format!("build (warm cache): {build_secs:.2}s"));

    let accel =
        accel::choose(opts.accel, qemu::QEMU, &opts.scratch).map_err(step("accelerator"))?;
    let boot = opts.scratch.join("boot");
    std::fs::create_dir_all(&boot).with_path(&boot)?;
    let m = &built.manifest;
    let files = kimg_formats::disk::extract_esp_files(&built.image, &[&m.kernel.esp_kernel], &boot)
        .map_err(step("kernel out of the ESP"))?;
    let floor_initrd = opts.scratch.join("floor.img");
    let mut fl = Initramfs::new();
    fl.file("bin/busybox", &opts.build.busybox, 0o755).bytes(
        "init",
        "#!/bin/busybox sh\n/bin/busybox poweroff -f\n",
        0o755,
    );
    fl.write(&floor_initrd, 1, 3)
        .map_err(step("floor initramfs"))?;

    let runtime = opts.scratch.join("rt");
    std::env::set_var("KIMG_RUNTIME_DIR", &runtime);
    let (mut floor_secs, mut microvm_floor_secs, mut boot_secs) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut machine = Machine::Q35;
    for i in 0..opts.runs {
        let f = floor_boot(
            accel,
            Machine::Q35,
            &files[0],
            &floor_initrd,
            &m.kernel.cmdline,
        )?;
        log(&format!("floor boot {} (q35): {f:.2}s", i + 1));
        floor_secs.push(f);
        let f = floor_boot(
            accel,
            Machine::Microvm,
            &files[0],
            &floor_initrd,
            &m.kernel.cmdline,
        )?;
        log(&format!("floor boot {} (microvm): {f:.2}s", i + 1));
        microvm_floor_secs.push(f);
        let ro = RunOptions {
            name: "bench".into(),
            image: built.image.clone(),
            nodes: 1,
            routers: 0,
            mem_mb: Some(BENCH_MEM_MB),
            cpus: Some(1),
            accel: accel.into(),
            machine: opts.machine,
            wait: Some(Wait::vms(Duration::from_secs(120))),
            ..RunOptions::default()
        };
        let t = Instant::now();
        machine = cluster::run(&ro, &|_| {})?.machine;
        let k = t.elapsed().as_secs_f64();
        cluster::stop("bench", Duration::from_secs(10))?;
        log(&format!(
            "kimg boot {} ({}): {k:.2}s",
            i + 1,
            machine.as_str()
        ));
        boot_secs.push(k);
    }
    let ratio = median(&boot_secs) / median(&floor_secs).max(f64::EPSILON);
    let microvm_ratio = median(&boot_secs) / median(&microvm_floor_secs).max(f64::EPSILON);
    Ok(BenchReport {
        accel,
        build_secs,
        machine,
        floor_secs,
        microvm_floor_secs,
        boot_secs,
        ratio,
        microvm_ratio,
    })
}

/// Wall seconds of QEMU booting `initrd` (which powers off at once) until it exits.
fn floor_boot(
    accel: Accel,
    machine: Machine,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<f64, BenchError> {
    let mut cmd = qemu::machine(accel, machine, BENCH_MEM_MB, 1, GuestCode::Small);
    let cmdline = format!("{cmdline} {}", qemu::clock_cmdline(accel));
    cmd.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline.trim_end()]);
    cmd.args(["-serial", "null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t = Instant::now();
    let st = cmd.status().map_err(step("floor boot: qemu"))?;
    if !st.success() {
        return Err(step("floor boot")(format!("qemu exited with {st}")));
    }
    Ok(t.elapsed().as_secs_f64())
}
