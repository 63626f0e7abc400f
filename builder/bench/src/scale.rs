//! `kimg bench scale`: a big cluster on this host (the scale issue).
//!
//! - single: one VM's `run --wait` at the same memory, and its QEMU's CPU time until
//!   ready;
//! - big: wall time of `run --nodes N --routers 1 --wait` next to the floor N x one
//!   VM's QEMU CPU time / host cores (goal: ratio <= 1.5), total QEMU RSS once idle
//!   (goal: <= 12 GB for 100 VMs), their QEMUs' CPU while idle, and the time `kimg
//!   status` and `kimg stop` take;
//! - shared: the same idle VMs' proportional memory with KSM's merged pages (after
//!   two more ksmd passes) and right after `run` = 2 took them back: side by side,
//!   what sharing saves.

use super::{qemu_pids, step, BenchError};
use kimg_cluster::accel::{Accel, AccelChoice};
use kimg_cluster::qemu::Machine;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_cluster::{ksm, process};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of `kimg bench scale`.
#[derive(Debug, Clone)]
pub struct ScaleBenchOptions {
    /// The image to boot.
    pub image: PathBuf,
    /// Nodes of the big cluster (plus 1 router).
    pub nodes: u16,
    /// Memory per VM in MiB.
    pub mem_mb: u32,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Machine (`None`: kimg run's default).
    pub machine: Option<Machine>,
    /// Runtime directory for the benchmark's clusters.
    pub runtime: PathBuf,
}

/// Results of `kimg bench scale`.
#[derive(Debug, Serialize)]
pub struct ScaleBenchReport {
    /// Accelerator of all boots.
    pub accel: Accel,
    /// Machine of all boots.
    pub machine: Machine,
    /// Host cores.
    pub cores: usize,
    /// One VM: its QEMU's CPU seconds until ready.
    pub single_cpu_secs: f64,
    /// VMs of the big cluster.
    pub vms: usize,
    /// Wall seconds until all were ready.
    pub wall_secs: f64,
    /// vms x single CPU / cores.
    pub floor_secs: f64,
    /// wall / floor (goal <= 1.5).
    pub ratio: f64,
    /// CPU seconds their QEMUs used until all were ready.
    pub cpu_secs: f64,
    /// The idle VMs' QEMUs' CPU, percent of one core, all together.
    pub idle_core_pct: f64,
    /// Total QEMU RSS once idle, MB (a page several QEMUs map counts in each).
    pub idle_rss_mb: f64,
    /// Their total proportional memory once idle with nothing merged, MB.
    pub idle_pss_mb: f64,
    /// The same with KSM's merged pages, MB (`None`: KSM was not running).
    pub ksm_pss_mb: Option<f64>,
    /// Seconds from idle until ksmd had made two more passes.
    pub ksm_secs: Option<f64>,
    /// Seconds `kimg status` took.
    pub status_secs: f64,
    /// Seconds `kimg stop` took.
    pub stop_secs: f64,
    /// Host load average (1 min) when all were ready.
    pub load_avg: f64,
}

const NAME: &str = "bench-scale";
/// How long the idle VMs' CPU is measured.
const IDLE: Duration = Duration::from_secs(30);

fn options(o: &ScaleBenchOptions, nodes: u16, routers: u16) -> RunOptions {
    RunOptions {
        name: NAME.into(),
        image: o.image.clone(),
        nodes,
        routers,
        mem_mb: Some(o.mem_mb),
        cpus: Some(1),
        accel: o.accel,
        machine: o.machine,
        wait: Some(Wait::vms(Duration::from_secs(3600))),
        ..RunOptions::default()
    }
}

/// Runs the suite; `log` gets one line per measurement. A failed step leaves no
/// cluster running.
pub fn run(o: &ScaleBenchOptions, log: &dyn Fn(&str)) -> Result<ScaleBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    measure(o, log).inspect_err(|_| {
        let _ = cluster::stop(NAME, Duration::from_secs(2));
    })
}

fn measure(o: &ScaleBenchOptions, log: &dyn Fn(&str)) -> Result<ScaleBenchReport, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Every QEMU of the cluster's CPU seconds so far.
    let qemu_cpu = || -> Result<f64, BenchError> {
        Ok(qemu_pids(NAME)?
            .into_iter()
            .map(|(_, p)| super::cpu_secs(p))
            .sum())
    };

    let state = cluster::run(&options(o, 1, 0), &|_| {})?;
    let single_cpu_secs = qemu_cpu()?;
    if single_cpu_secs <= 0.0 {
        return Err(step("one VM")("its QEMU is gone"));
    }
    cluster::stop(NAME, Duration::from_secs(10))?;
    log(&format!(
        "1 VM ({}): {single_cpu_secs:.2}s QEMU CPU to ready",
        state.machine.as_str()
    ));

    let t = Instant::now();
    let state = cluster::run(&options(o, o.nodes, 1), &|_| {})?;
    let wall_secs = t.elapsed().as_secs_f64();
    let vms = state.vms.len();
    let cpu_secs = qemu_cpu()?;
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let floor_secs = vms as f64 * single_cpu_secs / cores as f64;
    log(&format!(
        "{vms} VMs ready after {wall_secs:.1}s (floor {floor_secs:.1}s, their QEMU CPU {cpu_secs:.1}s, load {load_avg:.1})"
    ));
    // Idle: the last boots settle, freed pages are reported back; what the idle VMs
    // cost the host's cores (under TCG, each wakeup of a guest is host CPU).
    std::thread::sleep(Duration::from_secs(10));
    let cpu0 = qemu_cpu()?;
    std::thread::sleep(IDLE);
    let idle_core_pct = (qemu_cpu()? - cpu0) / IDLE.as_secs_f64() * 100.0;
    let t = Instant::now();
    let (_, st) = cluster::status(NAME)?;
    let status_secs = t.elapsed().as_secs_f64();
    let idle_rss_mb = st.iter().filter_map(|v| v.qemu_rss_kib).sum::<u64>() as f64 / 1024.0;
    let pss_mb = || -> Result<f64, BenchError> {
        let kib: u64 = qemu_pids(NAME)?
            .into_iter()
            .filter_map(|(_, p)| process::pss_kib(p))
            .sum();
        Ok(kib as f64 / 1024.0)
    };
    // The same idle VMs with KSM's merged pages, then without: ksmd merges a page
    // on its second pass over it, so two more passes after idle have merged what
    // is mergeable; `run` = 2 takes every merged page back.
    let (ksm_pss_mb, ksm_secs) = match ksm::stats().filter(|k| k.running) {
        Some(k0) => {
            let t = Instant::now();
            while ksm::stats().is_some_and(|k| k.full_scans < k0.full_scans + 2)
                && t.elapsed() < Duration::from_secs(900)
            {
                std::thread::sleep(Duration::from_secs(5));
            }
            let merged = pss_mb()?;
            let secs = t.elapsed().as_secs_f64();
            ksm::unmerge_all().map_err(|e| step("unmerging KSM's pages")(e.to_string()))?;
            log(&format!(
                "KSM: proportional memory {merged:.0} MB after two passes ({secs:.0}s)"
            ));
            (Some(merged), Some(secs))
        }
        None => (None, None),
    };
    let idle_pss_mb = pss_mb()?;
    let t = Instant::now();
    cluster::stop(NAME, Duration::from_secs(30))?;
    let stop_secs = t.elapsed().as_secs_f64();
    log(&format!(
        "idle: {idle_core_pct:.1}% of a core, QEMU RSS {idle_rss_mb:.0} MB, proportional {idle_pss_mb:.0} MB unmerged; status {status_secs:.2}s, stop {stop_secs:.2}s"
    ));
    Ok(ScaleBenchReport {
        accel: state.accel,
        machine: state.machine,
        cores,
        single_cpu_secs,
        vms,
        wall_secs,
        floor_secs,
        ratio: wall_secs / floor_secs.max(f64::EPSILON),
        cpu_secs,
        idle_core_pct,
        idle_rss_mb,
        idle_pss_mb,
        ksm_pss_mb,
        ksm_secs,
        status_secs,
        stop_secs,
        load_avg,
    })
}
