//! `kimg bench exec`: the session ports' figures (the issue about living inside the
//! cluster), in one VM:
//!
//! - exec round trip of `true` (median of 50), next to a `status` round trip on the
//!   control port (median of 50);
//! - `kimg cp` host -> VM of a 100 MB file (sha256 checked in the VM), next to the VM
//!   reading the same bytes from its cdrom (an overlay holding the file, page cache
//!   dropped first, `dd` of /dev/sr0; the exec round trip is subtracted).

use super::{median, step, BenchError};
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::qemu::VmPaths;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_contract::agent::Op;
use kimg_contract::VmId;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of `kimg bench exec`.
#[derive(Debug, Clone)]
pub struct ExecBenchOptions {
    /// The image to boot.
    pub image: PathBuf,
    /// Memory of the VM in MiB.
    pub mem_mb: u32,
    /// Size of the copied file in MB.
    pub mb: u64,
    /// Round trips per median.
    pub runs: usize,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Runtime directory (and scratch space) of the benchmark.
    pub runtime: PathBuf,
}

/// Results of `kimg bench exec`.
#[derive(Debug, Serialize)]
pub struct ExecBenchReport {
    /// Median `status` round trip, ms.
    pub status_ms: f64,
    /// Median exec of `true` round trip, ms.
    pub exec_true_ms: f64,
    /// exec / status.
    pub exec_ratio: f64,
    /// Bytes copied.
    pub bytes: u64,
    /// `kimg cp` host -> VM, seconds.
    pub cp_secs: f64,
    /// `kimg cp` throughput, MB/s.
    pub cp_mb_s: f64,
    /// Bytes of the cdrom read in the VM.
    pub cdrom_bytes: u64,
    /// The VM reading its cdrom (cold cache), seconds.
    pub cdrom_secs: f64,
    /// Cdrom read throughput, MB/s.
    pub cdrom_mb_s: f64,
    /// cp throughput / cdrom throughput.
    pub cp_ratio: f64,
}

const NAME: &str = "bench-exec";
const VM: &str = "vm-001";

/// Runs the suite; `log` gets one line per measurement. A failed step leaves no
/// cluster running.
pub fn run(o: &ExecBenchOptions, log: &dyn Fn(&str)) -> Result<ExecBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    let r = measure(o, log);
    let _ = cluster::stop(NAME, Duration::from_secs(10));
    r
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(o: &ExecBenchOptions, log: &dyn Fn(&str)) -> Result<ExecBenchReport, BenchError> {
    let vm: VmId = VM.parse().map_err(step("vm"))?;
    // The file, and an overlay folder holding it for the cdrom.
    let scratch = o.runtime.join("bench-exec-data");
    let root = scratch.join("bench-data/root/bench");
    std::fs::create_dir_all(&root).map_err(step("mkdir overlay"))?;
    std::fs::write(scratch.join("bench-data/overlay.toml"), "").map_err(step("overlay.toml"))?;
    let file = root.join("data.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).map_err(step("data"))?);
        // Incompressible, so no layer on the way can cheat.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..o.mb {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block).map_err(step("write data"))?;
        }
        f.flush().map_err(step("write data"))?;
    }
    let bytes = o.mb << 20;
    let opts = RunOptions {
        name: NAME.into(),
        image: o.image.clone(),
        nodes: 1,
        routers: 0,
        testers: 0,
        mem_mb: Some(o.mem_mb),
        cpus: Some(1),
        accel: o.accel,
        wait: Some(Wait::vms(Duration::from_secs(900))),
        overlays: vec!["bench-data".into()],
        ovlpath: vec![scratch.clone()],
        ..RunOptions::default()
    };
    cluster::run(&opts, &|_| {})?;
    log("1 VM with the overlay ready");
    let paths = VmPaths::new(&cluster::cluster_dir(NAME)?, vm);

    let mut status = Vec::new();
    let mut exec = Vec::new();
    for _ in 0..o.runs {
        let t = Instant::now();
        kimg_cluster::agent::request(&paths.agent(), Op::Status, Duration::from_secs(30))
            .map_err(step("status"))?;
        status.push(ms(t.elapsed()));
        let t = Instant::now();
        let r = cluster::exec(NAME, vm, vec!["true".into()], None)?;
        exec.push(ms(t.elapsed()));
        if r.exit_code != 0 {
            return Err(step("exec true")(format!("exit {}", r.exit_code)));
        }
    }
    let (status_ms, exec_true_ms) = (median(&status), median(&exec));
    log(&format!(
        "round trips (median of {}): status {status_ms:.1} ms, exec true {exec_true_ms:.1} ms",
        o.runs
    ));

    let t = Instant::now();
    cluster::copy_in(NAME, vm, &file, "/root/data.bin")?;
    let cp_secs = t.elapsed().as_secs_f64();
    log(&format!("kimg cp of {} MB: {cp_secs:.2} s", o.mb));

    let sectors = cluster::exec(
        NAME,
        vm,
        vec!["cat".into(), "/sys/block/sr0/size".into()],
        None,
    )?;
    let cdrom_bytes = sectors.stdout.trim().parse::<u64>().unwrap_or(0) * 512;
    let drop = "sync; echo 3 > /proc/sys/vm/drop_caches";
    let r = cluster::exec(NAME, vm, vec!["sh".into(), "-c".into(), drop.into()], None)?;
    if r.exit_code != 0 {
        return Err(step("drop caches")(r.stderr));
    }
    let t = Instant::now();
    let dd = "dd if=/dev/sr0 of=/dev/null bs=1M";
    let r = cluster::exec(NAME, vm, vec!["sh".into(), "-c".into(), dd.into()], None)?;
    let cdrom_secs = (t.elapsed().as_secs_f64() - exec_true_ms / 1000.0).max(1e-6);
    if r.exit_code != 0 {
        return Err(step("dd /dev/sr0")(r.stderr));
    }
    log(&format!(
        "cdrom read of {:.0} MB: {cdrom_secs:.2} s",
        cdrom_bytes as f64 / 1e6
    ));
    let cp_mb_s = bytes as f64 / 1e6 / cp_secs.max(1e-6);
    let cdrom_mb_s = cdrom_bytes as f64 / 1e6 / cdrom_secs;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ExecBenchReport {
        status_ms,
        exec_true_ms,
        exec_ratio: exec_true_ms / status_ms.max(1e-6),
        bytes,
        cp_secs,
        cp_mb_s,
        cdrom_bytes,
        cdrom_secs,
        cdrom_mb_s,
        cp_ratio: cp_mb_s / cdrom_mb_s.max(1e-6),
    })
}
