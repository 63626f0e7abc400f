//! `kimg bench snapshot`: the snapshot issue's figures, side by side in one run.
//!
//! - cold: wall time of `kimg run --nodes 4 --routers 2 --wait` (6 VMs) to ready;
//! - save: `kimg snapshot save` of that cluster (pause to snapshot written), the
//!   time the VMs were paused, and each VM's state file and layer next to its RAM;
//! - restore: `kimg run --from` of that snapshot to every VM ready (files checked,
//!   state read, clocks set); ratio restore / cold (goal <= 0.25).
//! - with a Kubernetes image: 2 nodes + 1 router (the flavour's default sizes), cold
//!   `kimg run` to every node Ready next to `run --from` to every node Ready, the
//!   save between them; a node counts as Ready when its Ready condition holds and
//!   its kubelet renewed its Lease after the step began (a restored Node object
//!   says Ready before its kubelet runs again). Goal <= 0.1.
//!
//! Snapshots go to a scratch cache (KIMG_CACHE), so no user's snapshot is touched.

use super::k8s_start::{answers, get_argv, nodes_of, NODES_PATH};
use super::BenchError;
use kimg_cluster::accel::{Accel, AccelChoice};
use kimg_cluster::network::NetBackend;
use kimg_cluster::restore::{self, FromOptions};
use kimg_cluster::snapshot::{self, SaveOptions};
use kimg_cluster::{self as cluster, session, RunOptions, Wait};
use kimg_contract::k8s::CONTROL_PLANE;
use kimg_util::civil::utc_now;
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
    /// A Kubernetes image (`kimg build --k8s` with a real release): adds the
    /// Kubernetes measurement.
    pub k8s_image: Option<PathBuf>,
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
    /// The Kubernetes measurement, given a Kubernetes image.
    pub k8s: Option<K8sSnapshotReport>,
}

/// Restore next to cold start of a Kubernetes cluster, to every node Ready.
#[derive(Debug, Serialize)]
pub struct K8sSnapshotReport {
    /// Nodes.
    pub nodes: u16,
    /// Routers.
    pub routers: u16,
    /// `kimg run` to every node Ready, seconds.
    pub cold_secs: f64,
    /// `snapshot save --stop`, seconds.
    pub save_secs: f64,
    /// Of that, seconds the VMs were paused.
    pub paused_secs: f64,
    /// `run --from` to every node Ready (Lease renewed after the restore), seconds.
    pub restore_secs: f64,
    /// restore / cold (goal <= 0.1).
    pub ratio: f64,
    /// Guest RAM of all VMs, MiB.
    pub ram_mb: u32,
    /// State files of all VMs (zstd), MiB.
    pub state_mb: f64,
}

const NAME: &str = "bench-snap";
const SNAP: &str = "bench";
const K8S_SNAP: &str = "bench-k8s";
const WAIT: Duration = Duration::from_secs(900);
/// The Kubernetes cluster's shape: the issue's 2 nodes + 1 router.
const K8S_SHAPE: (u16, u16) = (2, 1);
/// How often vm-001 is asked whether every node is Ready.
const POLL: Duration = Duration::from_secs(2);
/// The node Leases, one per node, named like it.
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";

/// Runs the suite; `log` gets one line per measurement. A failed step leaves no
/// cluster running.
pub fn run(
    o: &SnapshotBenchOptions,
    log: &dyn Fn(&str),
) -> Result<SnapshotBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    std::env::set_var("KIMG_CACHE", &o.cache);
    let mut r = measure(o, log).inspect_err(|_| {
        let _ = cluster::stop(NAME, Duration::from_secs(2));
    })?;
    if let Some(image) = &o.k8s_image {
        r.k8s = Some(measure_k8s(o, image, log).inspect_err(|_| {
            let _ = cluster::stop(NAME, Duration::from_secs(2));
            let _ = snapshot::remove(K8S_SNAP);
        })?);
    }
    Ok(r)
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
        k8s: None,
    })
}

/// Cold start, save and restore of a Kubernetes cluster, each start until every
/// node is Ready with its Lease renewed after the start began.
fn measure_k8s(
    o: &SnapshotBenchOptions,
    image: &std::path::Path,
    log: &dyn Fn(&str),
) -> Result<K8sSnapshotReport, BenchError> {
    let (nodes, routers) = K8S_SHAPE;
    let since = utc_now();
    let t = Instant::now();
    let state = cluster::run(
        &RunOptions {
            name: NAME.into(),
            image: image.to_path_buf(),
            nodes,
            routers,
            accel: o.accel,
            wait: Some(Wait::vms(WAIT)),
            ..RunOptions::default()
        },
        &|_| {},
    )?;
    nodes_ready(nodes, &since, t, "cold start")?;
    let cold_secs = t.elapsed().as_secs_f64();
    let ram_mb: u32 = state.vms.iter().map(|v| v.mem_mb).sum();
    log(&format!(
        "Kubernetes {nodes} nodes + {routers} router: cold start to every node Ready {cold_secs:.1}s"
    ));

    let t = Instant::now();
    let m = snapshot::save(&SaveOptions {
        cluster: NAME.into(),
        snap: K8S_SNAP.into(),
        stop: true,
    })?;
    let save_secs = t.elapsed().as_secs_f64();
    let state_mb = m
        .files
        .iter()
        .filter(|f| f.path.ends_with(snapshot::STATE))
        .map(|f| f.size)
        .sum::<u64>() as f64
        / (1 << 20) as f64;
    log(&format!(
        "save: {save_secs:.1}s ({:.1}s paused); state {state_mb:.0} MiB for {ram_mb} MiB of guest RAM",
        m.paused_secs
    ));

    let since = utc_now();
    let t = Instant::now();
    restore::run_from(
        &FromOptions {
            snap: K8S_SNAP.into(),
            name: NAME.into(),
            wait: Some(Wait::vms(WAIT)),
        },
        &|_| {},
    )?;
    nodes_ready(nodes, &since, t, "restore")?;
    let restore_secs = t.elapsed().as_secs_f64();
    cluster::stop(NAME, Duration::from_secs(10))?;
    snapshot::remove(K8S_SNAP)?;
    let ratio = restore_secs / cold_secs.max(f64::EPSILON);
    log(&format!(
        "restore to every node Ready {restore_secs:.1}s = {ratio:.2} x cold (goal <= 0.1)"
    ));
    Ok(K8sSnapshotReport {
        nodes,
        routers,
        cold_secs,
        save_secs,
        paused_secs: m.paused_secs,
        restore_secs,
        ratio,
        ram_mb,
        state_mb,
    })
}

/// Polls vm-001 until `nodes` nodes are Ready, each with its Lease renewed at or
/// after `since`; fails after [`WAIT`] from `t`.
fn nodes_ready(nodes: u16, since: &str, t: Instant, step: &str) -> Result<(), BenchError> {
    let argv = get_argv(&[NODES_PATH, LEASES_PATH]);
    while t.elapsed() < WAIT {
        if let Ok(out) = session::exec(
            NAME,
            CONTROL_PLANE,
            argv.clone(),
            Some(Duration::from_secs(30)),
        ) {
            if let [(nodes_json, 200), (leases_json, 200)] = answers(&out.stdout).as_slice() {
                if all_ready_since(&nodes_of(nodes_json), &leases_of(leases_json), since)
                    .is_some_and(|n| n == usize::from(nodes))
                {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(POLL);
    }
    Err(BenchError::Step {
        step: step.into(),
        why: format!("not every node Ready within {WAIT:?}"),
    })
}

/// The number of nodes when every node is Ready with a Lease renewed at or after
/// `since` (`None` if one is not).
fn all_ready_since(
    nodes: &[(String, bool)],
    leases: &[(String, String)],
    since: &str,
) -> Option<usize> {
    let fresh = |node: &str| {
        leases
            .iter()
            .any(|(n, renew)| n == node && renew.get(..since.len()).is_some_and(|r| r >= since))
    };
    nodes
        .iter()
        .all(|(n, ready)| *ready && fresh(n))
        .then_some(nodes.len())
}

/// (name, spec.renewTime) of each Lease in a Lease list.
fn leases_of(json: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some((
                l["metadata"]["name"].as_str()?.to_string(),
                l["spec"]["renewTime"].as_str()?.to_string(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_counts_when_ready_with_a_lease_renewed_since() {
        let leases = leases_of(
            r#"{"items":[{"metadata":{"name":"vm-001"},"spec":{"renewTime":"2026-11-29T20:51:03.123456Z"}},
                         {"metadata":{"name":"vm-002"},"spec":{"renewTime":"2026-11-29T20:50:59.000001Z"}}]}"#,
        );
        assert_eq!(leases.len(), 2);
        let ready = |a: bool, b: bool| vec![("vm-001".to_string(), a), ("vm-002".to_string(), b)];
        // Renewed before the step began: not yet.
        assert_eq!(
            all_ready_since(&ready(true, true), &leases, "2026-11-29T20:51:00"),
            None
        );
        // Renewed in the same second as the start: counts.
        assert_eq!(
            all_ready_since(&ready(true, true), &leases, "2026-11-29T20:50:59"),
            Some(2)
        );
        // Not Ready: not yet, however fresh.
        assert_eq!(
            all_ready_since(&ready(true, false), &leases, "2026-11-29T20:50:00"),
            None
        );
        // No Lease for a node: not yet.
        assert_eq!(
            all_ready_since(&ready(true, true), &leases[..1], "2026-11-29T20:50:00"),
            None
        );
        assert!(leases_of("not json").is_empty());
    }
}
