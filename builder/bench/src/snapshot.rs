//! `kimg bench snapshot`: the snapshot issue's figures, side by side in one run.
//!
//! - cold: wall time of `kimg run --nodes 4 --routers 2 --wait` (6 VMs) to ready;
//! - save: `kimg snapshot save` of that cluster (pause to snapshot written), the
//!   time the VMs were paused, and each VM's state file and layer next to its RAM;
//! - restore: `kimg run --from` of that snapshot to every VM ready (files checked,
//!   state read, clocks set); ratio restore / cold (goal <= 0.25).
//!
//! Snapshots go to a scratch cache (KIMG_CACHE), so no user's snapshot is touched.

use super::BenchError;
use kimg_cluster::accel::{Accel, AccelChoice};
use kimg_cluster::network::NetBackend;
use kimg_cluster::restore::{self, FromOptions};
use kimg_cluster::snapshot::{self, SaveOptions};
use kimg_cluster::{self as cluster, RunOptions, Wait};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of `kimg bench snapshot`.
#[derive(Debug, Clone)]
pub struct SnapshotBenchOptions {
    /// The image to boot.
    pub image: PathBuf,
    /// Memory per VM in MiB.
    pub mem_mb: u32,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Runtime directory of the benchmark's clusters.
    pub runtime: PathBuf,
    /// Cache directory of the benchmark's snapshots.
    pub cache: PathBuf,
}

/// Results of `kimg bench snapshot`.
#[derive(Debug, Serialize)]
pub struct SnapshotBenchReport {
    /// Accelerator.
    pub accel: Accel,
    /// VMs of the cluster.
    pub vms: usize,
    /// Cold boot of the cluster to every VM ready, seconds.
    pub cold_secs: f64,
    /// `snapshot save`, seconds.
    pub save_secs: f64,
    /// Of that, seconds the VMs were paused.
    pub paused_secs: f64,
    /// `run --from` to every VM ready, seconds.
    pub restore_secs: f64,
    /// restore / cold (goal <= 0.25).
    pub ratio: f64,
    /// Guest RAM per VM, MiB.
    pub ram_mb: u32,
    /// Mean state file per VM (zstd), MiB.
    pub state_mb: f64,
    /// Mean frozen layer per VM, MiB.
    pub layer_mb: f64,
    /// Host load average (1 min) at the end.
    pub load_avg: f64,
}

const NAME: &str = "bench-snap";
const SNAP: &str = "bench";
const WAIT: Duration = Duration::from_secs(900);

/// Runs the suite; `log` gets one line per measurement. A failed step leaves no
/// cluster running.
pub fn run(
    o: &SnapshotBenchOptions,
    log: &dyn Fn(&str),
) -> Result<SnapshotBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    std::env::set_var("KIMG_CACHE", &o.cache);
    measure(o, log).inspect_err(|_| {
        let _ = cluster::stop(NAME, Duration::from_secs(2));
    })
}

fn measure(
    o: &SnapshotBenchOptions,
    log: &dyn Fn(&str),
) -> Result<SnapshotBenchReport, BenchError> {
    let opts = RunOptions {
        name: NAME.into(),
        image: o.image.clone(),
        nodes: 4,
        routers: 2,
        mem_mb: Some(o.mem_mb),
        net: NetBackend::User,
        cpus: Some(1),
        accel: o.accel,
        wait: Some(Wait::vms(WAIT)),
        ..RunOptions::default()
    };
    let t = Instant::now();
    let state = cluster::run(&opts, &|_| {})?;
    let cold_secs = t.elapsed().as_secs_f64();
    let vms = state.vms.len();
    log(&format!("{vms} VMs: cold boot to ready {cold_secs:.2}s"));
    // Let the boots' last work settle, as a user's cluster would have.
    std::thread::sleep(Duration::from_secs(3));

    let t = Instant::now();
    let m = snapshot::save(&SaveOptions {
        cluster: NAME.into(),
        snap: SNAP.into(),
        stop: true,
    })?;
    let save_secs = t.elapsed().as_secs_f64();
    let mean_mb = |suffix: &str| {
        let (n, bytes) = m
            .files
            .iter()
            .filter(|f| f.path.ends_with(suffix))
            .fold((0u64, 0u64), |(n, b), f| (n + 1, b + f.size));
        bytes as f64 / n.max(1) as f64 / (1 << 20) as f64
    };
    let state_mb = mean_mb(snapshot::STATE);
    let layer_mb = mean_mb(snapshot::LAYER);
    log(&format!(
        "save: {save_secs:.2}s ({:.2}s paused); per VM: state {state_mb:.1} MiB + layer {layer_mb:.1} MiB of {} MiB RAM",
        m.paused_secs, o.mem_mb
    ));

    let t = Instant::now();
    let restored = restore::run_from(
        &FromOptions {
            snap: SNAP.into(),
            name: NAME.into(),
            wait: Some(Wait::vms(WAIT)),
        },
        &|_| {},
    )?;
    let restore_secs = t.elapsed().as_secs_f64();
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    cluster::stop(NAME, Duration::from_secs(10))?;
    snapshot::remove(SNAP)?;
    let ratio = restore_secs / cold_secs.max(f64::EPSILON);
    log(&format!(
        "restore to ready {restore_secs:.2}s = {ratio:.2} x cold (goal <= 0.25; load {load_avg:.1})"
    ));
    Ok(SnapshotBenchReport {
        accel: restored.accel,
        vms,
        cold_secs,
        save_secs,
        paused_secs: m.paused_secs,
        restore_secs,
        ratio,
        ram_mb: o.mem_mb,
        state_mb,
        layer_mb,
        load_avg,
    })
}
