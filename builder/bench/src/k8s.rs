//! `kimg bench k8s`: the Kubernetes flavour's figures (issue 5), in one run:
//!
//! - hd-k8s.img's size: bytes of the qcow2 file and of it compressed with xz (the
//!   publish module's encoder, preset 6), next to xcluster's hd-k8s image (847 MB
//!   uncompressed; goal: well under half);
//! - one node booted from it to containerd ready (`kimg run` start until the agent
//!   reports the containerd service ready), next to the base image's `kimg run
//!   --wait` to ready, same machine, same run.

use super::BenchError;
use kimg_cluster::accel::AccelChoice;
use kimg_cluster::{self as cluster, RunOptions, Wait};
use kimg_contract::service::ServiceState;
use kimg_contract::VmId;
use kimg_image::publish::{self, Codec};
use kimg_util::fs::PathContext;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// xcluster's hd-k8s image, uncompressed (its README).
pub const XCLUSTER_HD_K8S_BYTES: u64 = 847_000_000;

const NAME: &str = "bench-k8s";
const WAIT: Duration = Duration::from_secs(600);

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct K8sBenchOptions {
    /// The k8s image (`kimg build --k8s`).
    pub k8s_image: PathBuf,
    /// The base image (`kimg build`).
    pub base_image: PathBuf,
    /// Memory of the VM in MiB.
    pub mem_mb: u32,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Runtime dir of the benchmark's clusters.
    pub runtime: PathBuf,
    /// Scratch dir for the compressed image.
    pub scratch: PathBuf,
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct K8sBenchReport {
    /// hd-k8s.img qcow2 file bytes.
    pub qcow2_bytes: u64,
    /// hd-k8s.img compressed with xz -6.
    pub xz_bytes: u64,
    /// xcluster's hd-k8s image bytes.
    pub xcluster_bytes: u64,
    /// qcow2 / xcluster.
    pub qcow2_ratio: f64,
    /// Seconds from `kimg run` to containerd ready on vm-001 (k8s image).
    pub containerd_ready_secs: f64,
    /// Seconds from `kimg run` to ready (base image, one VM).
    pub base_ready_secs: f64,
}

fn options(o: &K8sBenchOptions, image: &Path) -> RunOptions {
    RunOptions {
        name: NAME.into(),
        image: image.to_path_buf(),
        nodes: 1,
        mem_mb: Some(o.mem_mb),
        cpus: Some(1),
        accel: o.accel,
        ..RunOptions::default()
    }
}

/// Runs the suite; `log` gets one line per measurement. No cluster is left running.
pub fn run(o: &K8sBenchOptions, log: &dyn Fn(&str)) -> Result<K8sBenchReport, BenchError> {
    std::env::set_var("KIMG_RUNTIME_DIR", &o.runtime);
    let r = measure(o, log);
    let _ = cluster::stop(NAME, Duration::from_secs(5));
    r
}

fn measure(o: &K8sBenchOptions, log: &dyn Fn(&str)) -> Result<K8sBenchReport, BenchError> {
    let qcow2_bytes = std::fs::metadata(&o.k8s_image)
        .with_path(&o.k8s_image)?
        .len();
    let xz = o.scratch.join("hd-k8s.img.xz");
    let (_, xz_bytes) = publish::compress(
        &o.k8s_image,
        &xz,
        Codec::Xz,
        6,
        publish::default_threads(),
        &|_| {},
    )?;
    log(&format!(
        "hd-k8s.img {qcow2_bytes} bytes, xz {xz_bytes} bytes"
    ));

    let t = Instant::now();
    cluster::run(
        &RunOptions {
            wait: Some(Wait::vms(WAIT)),
            ..options(o, &o.base_image)
        },
        &|_| {},
    )?;
    let base_ready_secs = t.elapsed().as_secs_f64();
    cluster::stop(NAME, Duration::from_secs(5))?;
    log(&format!("base image ready: {base_ready_secs:.2}s"));

    let t = Instant::now();
    cluster::run(&options(o, &o.k8s_image), &|_| {})?;
    let vm1 = VmId::new(1);
    let containerd_ready_secs = loop {
        let (_, vms) = cluster::status(NAME)?;
        let ready = vms
            .iter()
            .filter(|v| Some(v.vm) == vm1)
            .filter_map(|v| v.agent.as_ref())
            .flat_map(|a| a.services.iter())
            .any(|s| s.name == "containerd" && s.state == ServiceState::Ready);
        if ready {
            break t.elapsed().as_secs_f64();
        }
        if t.elapsed() > WAIT {
            return Err(BenchError::Step {
                step: "containerd on vm-001".into(),
                why: format!(
                    "not ready within {WAIT:?} (see `kimg status`, /var/log/containerd.log)"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    log(&format!(
        "k8s image containerd ready: {containerd_ready_secs:.2}s"
    ));
    Ok(K8sBenchReport {
        qcow2_bytes,
        xz_bytes,
        xcluster_bytes: XCLUSTER_HD_K8S_BYTES,
        qcow2_ratio: qcow2_bytes as f64 / XCLUSTER_HD_K8S_BYTES as f64,
        containerd_ready_secs,
        base_ready_secs,
    })
}
