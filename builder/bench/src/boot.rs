//! `kimg bench boot`: build and single-VM boot figures (the base image issue).
//!
//! - build: `kimg build` wall time with a warm kernel cache (goal <= 10 s);
//! - boot: `kimg run --wait` start to ready for one VM (its default machine), next to
//!   the floors: the same kernel and accelerator booting a busybox-only initramfs
//!   that powers off at once, on q35 (the floor of the machine kimg used before
//!   microvm; goal: ratio <= 1.0) and on microvm, runs alternated;
//! - where each kimg boot went ([`BootParts`]), from the guest's kernel log.

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
    /// Where each kimg boot went (a boot whose guest could not be asked is left out).
    pub parts: Vec<BootParts>,
}

/// Where one kimg boot's wall time went, by the guest's clock (dmesg timestamps and
/// the agent's ready time).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BootParts {
    /// The wall time less the guest's ready time: kimg run's host side, QEMU and
    /// firmware, the kernel's decompression (all before the guest's clock starts),
    /// and the ready answer's way back.
    pub before_kernel_secs: f64,
    /// Kernel start to `/init`.
    pub kernel_secs: f64,
    /// kimg-init's stage 1: modules, the root, switch_root, until stage 2's banner.
    pub stage1_secs: f64,
    /// Stage 2 to ready: modules, network, overlays, services.
    pub stage2_secs: f64,
}

impl BootParts {
    /// Each part's name and its median over `parts`, in boot order.
    pub fn medians(parts: &[BootParts]) -> [(&'static str, f64); 4] {
        let m = |f: fn(&BootParts) -> f64| median(&parts.iter().map(f).collect::<Vec<_>>());
        [
            (
                "host, QEMU, firmware, decompression",
                m(|p| p.before_kernel_secs),
            ),
            ("kernel to /init", m(|p| p.kernel_secs)),
            ("kimg-init stage 1 (initramfs)", m(|p| p.stage1_secs)),
            ("kimg-init stage 2 to ready", m(|p| p.stage2_secs)),
        ]
    }
}

/// The kernel's log line when it starts the initramfs' `/init`.
const RUN_INIT: &str = "Run /init as init process";

/// Splits a boot of `wall_secs` whose guest was ready at `ready_secs` of its clock,
/// by its kernel log `dmesg` (`[seconds] text` lines); `None` without both marks.
pub fn boot_parts(dmesg: &str, ready_secs: f64, wall_secs: f64) -> Option<BootParts> {
    let at = |needle: &str| {
        dmesg.lines().find_map(|l| {
            let (stamp, text) = l.strip_prefix('[')?.split_once(']')?;
            text.contains(needle)
                .then(|| stamp.trim().parse::<f64>().ok())
                .flatten()
        })
    };
    let init = at(RUN_INIT)?;
    let stage2 = at(&format!(
        "{}{}",
        kimg_contract::boot::LOG_PREFIX,
        kimg_contract::boot::STAGE2_BANNER
    ))?;
    Some(BootParts {
        before_kernel_secs: wall_secs - ready_secs,
        kernel_secs: init,
        stage1_secs: stage2 - init,
        stage2_secs: ready_secs - stage2,
    })
}

/// Asks the bench cluster's vm-001 for its kernel log and ready time.
fn parts_of(wall_secs: f64) -> Result<BootParts, BenchError> {
    let vm = kimg_contract::VmId::FIRST;
    let dmesg = cluster::session::exec(BENCH, vm, vec!["dmesg".into()], None)?;
    let (_, vms) = cluster::status(BENCH)?;
    let ready = vms
        .first()
        .and_then(|v| v.agent.as_ref()?.ready_secs)
        .ok_or_else(|| step("boot breakdown")("the agent reported no ready time"))?;
    boot_parts(&dmesg.stdout, ready, wall_secs).ok_or_else(|| {
        step("boot breakdown")(format!("no {RUN_INIT:?} or stage 2 banner in dmesg"))
    })
}

/// The bench cluster's name.
const BENCH: &str = "bench";

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
    let (mut floor_secs, mut microvm_floor_secs, mut boot_secs, mut parts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
            name: BENCH.into(),
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
        match parts_of(k) {
            Ok(p) => parts.push(p),
            Err(e) => log(&format!("kimg boot {}: no breakdown: {e}", i + 1)),
        }
        cluster::stop(BENCH, Duration::from_secs(10))?;
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
        parts,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_splits_at_init_and_stage_2() {
        let dmesg = "[    0.000000] Linux version 6.1.0\n\
                     [    1.804928] Run /init as init process\n\
                     [    1.905488] kimg-init: stage 1 (initramfs), version 0.1.0\n\
                     [    2.674421] kimg-init: stage 2 (root filesystem), version 0.1.0\n\
                     [    3.011327] kimg-init: loaded 7 modules from /etc/kimg/modules.load\n";
        let p = boot_parts(dmesg, 3.25, 3.95).unwrap();
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(p.before_kernel_secs, 0.70), "{p:?}");
        assert!(near(p.kernel_secs, 1.804928), "{p:?}");
        assert!(near(p.stage1_secs, 2.674421 - 1.804928), "{p:?}");
        assert!(near(p.stage2_secs, 3.25 - 2.674421), "{p:?}");
        // The parts add up to the wall time.
        let sum = p.before_kernel_secs + p.kernel_secs + p.stage1_secs + p.stage2_secs;
        assert!(near(sum, 3.95), "{sum}");
    }

    #[test]
    fn a_log_without_both_marks_gives_no_breakdown() {
        assert_eq!(boot_parts("", 3.0, 4.0), None);
        let no_stage2 = "[    1.8] Run /init as init process\n[    2.0] kimg-init: stage 1\n";
        assert_eq!(boot_parts(no_stage2, 3.0, 4.0), None);
        let garbage =
            "[ x ] Run /init as init process\nRun /init [\n[] kimg-init: stage 2 (root filesystem)";
        assert_eq!(boot_parts(garbage, 3.0, 4.0), None);
    }
}
