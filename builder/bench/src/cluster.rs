//! `kimg bench cluster`: the cluster launcher's figures (the cluster issue).
//!
//! - single: one VM's `kimg run --wait`, and the CPU time (utime + stime) its QEMU
//!   used until ready, read from /proc;
//! - cluster: wall time of `kimg run --nodes 4 --wait` (4 nodes + 2 routers = 6 VMs)
//!   next to the floor 6 x single CPU time / host cores: on a machine whose cores are
//!   all busy booting, no launcher can beat that (goal: ratio <= 1.5);
//! - QEMU RSS per idle VM of that cluster (MB);
//! - a 20-node cluster (plus the routers) must start and reach ready: its time and
//!   total QEMU RSS.

use super::{step, BenchError};
use kimg_cluster::accel::{Accel, AccelChoice};
use kimg_cluster::network::NetBackend;
use kimg_cluster::process;
use kimg_cluster::qemu::VmPaths;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use nix::unistd::Pid;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of `kimg bench cluster`.
#[derive(Debug, Clone)]
pub struct ClusterBenchOptions {
    /// The image to boot.
    pub image: PathBuf,
    /// Memory per VM in MiB.
    pub mem_mb: u32,
    /// Nodes of the big cluster.
    pub big_nodes: u16,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Network backend.
    pub net: NetBackend,
    /// Runtime directory for the benchmark's clusters.
    pub runtime: PathBuf,
}

/// Results of `kimg bench cluster`.
#[derive(Debug, Serialize)]
pub struct ClusterBenchReport {
    /// Accelerator of all boots.
    pub accel: Accel,
    /// Host cores.
    pub cores: usize,
    /// One VM: wall seconds of `run --wait`.
    pub single_wall_secs: f64,
    /// One VM: its QEMU's CPU seconds until ready.
    pub single_cpu_secs: f64,
    /// 6 VMs: wall seconds of `run --nodes 4 --routers 2 --wait`.
    pub cluster_wall_secs: f64,
    /// 6 x single CPU / cores.
    pub cluster_floor_secs: f64,
    /// CPU seconds the 6 QEMUs used until all were ready.
    pub cluster_cpu_secs: f64,
    /// Host load average (1 min) when the cluster was ready: others' work slows it.
    pub load_avg: f64,
    /// cluster QEMU CPU / (6 x single CPU): what booting in parallel costs beyond
    /// the CPU itself; with the host's cores all ours, wall ratio ~ this.
    pub cpu_ratio: f64,
    /// cluster wall / floor (goal <= 1.5).
    pub ratio: f64,
    /// Mean QEMU RSS of an idle VM of the 6-VM cluster, MB.
    pub idle_rss_mb: f64,
    /// VMs of the big cluster.
    pub big_vms: usize,
    /// Wall seconds until all of them were ready.
    pub big_wall_secs: f64,
    /// Their total QEMU RSS, MB.
    pub big_total_rss_mb: f64,
}

const NAME: &str = "bench-cluster";
const WAIT: Duration = Duration::from_secs(900);

fn options(o: &ClusterBenchOptions, nodes: u16, routers: u16) -> RunOptions {
    RunOptions {
        name: NAME.into(),
        image: o.image.clone(),
        nodes,
        routers,
        testers: 0,
        mem_mb: Some(o.mem_mb),
        mem_overrides: Vec::new(),
        cpus_overrides: Vec::new(),
        net: o.net,
        cpus: Some(1),
        accel: o.accel,
        wait: Some(Wait::vms(WAIT)),
        ..RunOptions::default()
    }
}

/// Starts a cluster, returns its wall time to ready and its QEMU pids.
fn timed_run(opts: &RunOptions) -> Result<(f64, Vec<i32>, Accel), BenchError> {
    let t = Instant::now();
    let state = cluster::run(opts, &|_| {})?;
    let wall = t.elapsed().as_secs_f64();
    let dir = cluster::cluster_dir(NAME)?;
    let pids = state
        .vms
        .iter()
        .filter_map(|r| cluster::qemu_pid(&VmPaths::new(&dir, r.vm)))
        .map(|p| p.as_raw())
        .collect();
    Ok((wall, pids, state.accel))
}

/// utime + stime of a process in seconds.
fn cpu_secs(pid: i32) -> Result<f64, BenchError> {
    process::cpu_time(Pid::from_raw(pid))
        .map(|d| d.as_secs_f64())
        .ok_or_else(|| step("QEMU CPU time")(format!("process {pid} is gone")))
}

/// Resident set of a process in MB (VmRSS).
fn rss_mb(pid: i32) -> f64 {
    process::rss_kib(Pid::from_raw(pid)).map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// Runs the suite; `log` gets one line per measurement. A failed step leaves no
/// cluster running.
pub fn run(o: &ClusterBenchOptions, log: &dyn Fn(&str)) -> Result<ClusterBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    measure(o, log).inspect_err(|_| {
        let _ = cluster::stop(NAME, Duration::from_secs(2));
    })
}

fn measure(o: &ClusterBenchOptions, log: &dyn Fn(&str)) -> Result<ClusterBenchReport, BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let stop = || cluster::stop(NAME, Duration::from_secs(10));

    let (single_wall_secs, pids, accel) = timed_run(&options(o, 1, 0))?;
    let single_cpu_secs = cpu_secs(pids.first().copied().unwrap_or(0))?;
    stop()?;
    log(&format!(
        "1 VM: ready after {single_wall_secs:.2}s wall, {single_cpu_secs:.2}s QEMU CPU"
    ));

    let (cluster_wall_secs, pids, _) = timed_run(&options(o, 4, 2))?;
    let cluster_cpu_secs = pids
        .iter()
        .map(|&p| cpu_secs(p).unwrap_or(0.0))
        .sum::<f64>();
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    // Idle: let the boot's last work settle before reading the resident sets.
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss_mb = pids.iter().map(|&p| rss_mb(p)).sum::<f64>() / pids.len().max(1) as f64;
    stop()?;
    let cluster_floor_secs = 6.0 * single_cpu_secs / cores as f64;
    log(&format!(
        "6 VMs: ready after {cluster_wall_secs:.2}s (floor {cluster_floor_secs:.2}s, their QEMU CPU {cluster_cpu_secs:.2}s, load {load_avg:.1}), idle RSS {idle_rss_mb:.0} MB per VM"
    ));

    let (big_wall_secs, pids, _) = timed_run(&options(o, o.big_nodes, 2))?;
    std::thread::sleep(Duration::from_secs(3));
    let big_total_rss_mb = pids.iter().map(|&p| rss_mb(p)).sum();
    let big_vms = pids.len();
    stop()?;
    log(&format!(
        "{big_vms} VMs: ready after {big_wall_secs:.2}s, total RSS {big_total_rss_mb:.0} MB"
    ));

    Ok(ClusterBenchReport {
        accel,
        cores,
        single_wall_secs,
        single_cpu_secs,
        cluster_wall_secs,
        cluster_floor_secs,
        cluster_cpu_secs,
        load_avg,
        cpu_ratio: cluster_cpu_secs / (6.0 * single_cpu_secs).max(f64::EPSILON),
        ratio: cluster_wall_secs / cluster_floor_secs.max(f64::EPSILON),
        idle_rss_mb,
        big_vms,
        big_wall_secs,
        big_total_rss_mb,
    })
}
