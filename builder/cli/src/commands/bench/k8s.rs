//! `kimg bench k8s`: the Kubernetes image's figures and cold starts, variant by
//! variant.

use super::{progress, runtime_dir, scratch_dir};
use kimg_bench as bench;
use kimg_bench::k8s_start::COLUMNS;
use kimg_cluster::accel::AccelChoice;
use std::path::PathBuf;
use std::process::ExitCode;

/// The Kubernetes image: hd-k8s.img's size (qcow2 bytes and xz-compressed) next to
/// xcluster's 847 MB hd-k8s image (goal: well under half), one node booting to
/// containerd ready next to the base image booting to ready; then a cold start's
/// breakdown for each shape (etcd serving, apiserver port and /readyz, each node
/// registered and Ready, the default service account, a first pod Running; goal for
/// 4 nodes + 2 routers: every node Ready within 60 s) and the cluster's QEMU CPU over
/// a minute once idle, for kimg's defaults and the variants asked for (another image
/// with --against, say one built before a change; vm-001 on one vCPU; images
/// imported at boot), alternating for --rounds rounds. Needs the pause image in the
/// image (`scripts/k8s-release` builds it). A cold start of 4+2 and its idle minute
/// take 3-5 minutes under TCG.
///
/// A change to the k8s image against the image before it, 3 runs each:
///
/// kimg bench k8s --shapes 4+2 --against /tmp/before/hd-k8s.img --rounds 3
#[derive(clap::Args)]
pub struct K8sArgs {
    /// The image from `kimg build --k8s`.
    #[arg(long, default_value = "out/hd-k8s.img")]
    k8s_image: PathBuf,
    /// The image from `kimg build`.
    #[arg(long, default_value = "out/hd.img")]
    base_image: PathBuf,
    /// Memory of the VM in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Cluster shapes of the cold-start breakdown, NODES+ROUTERS, comma-separated
    /// (`none`: no breakdown).
    #[arg(long, default_value = "2+1,4+2", value_parser = parse_shapes)]
    shapes: Shapes,
    /// The same release built with `kimg build --k8s --k8s-images-at-boot`: adds the
    /// variant whose nodes import the images at boot.
    #[arg(long, value_name = "IMAGE")]
    at_boot_image: Option<PathBuf>,
    /// Another `kimg build --k8s` image (say, built before a change): adds the
    /// variant that runs it.
    #[arg(long, value_name = "IMAGE")]
    against: Option<PathBuf>,
    /// Adds the variant whose vm-001 has one vCPU (kimg gives it two).
    #[arg(long)]
    vm001_one_vcpu: bool,
    /// Cold starts of each variant on each shape; the variants take turns.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// `--shapes`: (nodes, routers) pairs.
#[derive(Debug, Clone)]
struct Shapes(Vec<(u16, u16)>);

fn parse_shapes(s: &str) -> Result<Shapes, String> {
    if s == "none" {
        return Ok(Shapes(Vec::new()));
    }
    s.split(',')
        .map(|one| {
            let (n, r) = one
                .split_once('+')
                .ok_or_else(|| format!("{one:?}: a shape is NODES+ROUTERS, e.g. 4+2"))?;
            let num = |x: &str| {
                x.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{one:?}: {x:?} is not a number"))
            };
            let nodes = num(n)?;
            if nodes == 0 {
                return Err(format!("{one:?}: a Kubernetes cluster needs a node"));
            }
            Ok((nodes, num(r)?))
        })
        .collect::<Result<_, _>>()
        .map(Shapes)
}

pub fn run(a: K8sArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime_dir()?;
    let scratch = scratch_dir("kimg-bench-")?;
    let opts = bench::k8s::K8sBenchOptions {
        k8s_image: a.k8s_image,
        base_image: a.base_image,
        mem_mb: a.mem,
        accel: a.accel,
        runtime: runtime.path().to_path_buf(),
        scratch: scratch.path().to_path_buf(),
    };
    let r = bench::k8s::run(&opts, &progress(a.json))?;
    let mut variants = vec![bench::k8s_start::Variant {
        label: "kimg defaults".into(),
        image: opts.k8s_image.clone(),
        vm001_cpus: None,
    }];
    if let Some(image) = a.against {
        variants.push(bench::k8s_start::Variant {
            label: "--against image".into(),
            image,
            vm001_cpus: None,
        });
    }
    if a.vm001_one_vcpu {
        variants.push(bench::k8s_start::Variant {
            label: "vm-001 on 1 vCPU".into(),
            image: opts.k8s_image.clone(),
            vm001_cpus: Some(1),
        });
    }
    if let Some(image) = a.at_boot_image {
        variants.push(bench::k8s_start::Variant {
            label: "images imported at boot".into(),
            image,
            vm001_cpus: None,
        });
    }
    let starts = bench::k8s_start::run(
        &bench::k8s_start::K8sStartOptions {
            shapes: a.shapes.0,
            variants,
            rounds: a.rounds,
            limit: std::time::Duration::from_secs(900),
            accel: a.accel,
            runtime: runtime.path().to_path_buf(),
        },
        &progress(a.json),
    )?;
    if a.json {
        let all = serde_json::json!({ "image": r, "cold_starts": starts });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "hd-k8s.img (qcow2)              {:8.1} MB   (xcluster hd-k8s: {:.0} MB; ratio {:.2}, goal < 0.5)",
        mb(r.qcow2_bytes),
        mb(r.xcluster_bytes),
        r.qcow2_ratio
    );
    println!("hd-k8s.img.xz                   {:8.1} MB", mb(r.xz_bytes));
    println!(
        "1 node to containerd ready      {:8.2} s    (base image to ready: {:.2} s)",
        r.containerd_ready_secs, r.base_ready_secs
    );
    if !starts.is_empty() {
        println!("\ncold start, seconds from `kimg run` (-: not reached in 900 s):");
        let c = COLUMNS;
        println!(
            "{:<6} {:<24} {:>6} {:>6} {:>7} {:>11} {:>9} {:>8} {:>8} {:>9} {:>8}",
            "shape", "variant", c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        );
        let row = |shape: &str, variant: &str, v: &[Option<f64>; 9]| {
            let f = |i: usize| v[i].map_or("-".to_string(), |s| format!("{s:.1}"));
            println!(
                "{shape:<6} {variant:<24} {:>6} {:>6} {:>7} {:>11} {:>9} {:>8} {:>8} {:>9} {:>8}",
                f(0),
                f(1),
                f(2),
                f(3),
                f(4),
                f(5),
                f(6),
                f(7),
                f(8)
            );
        };
        for s in &starts {
            row(&s.shape(), &s.variant, &s.figures());
        }
        if a.rounds > 1 {
            println!("\nmedians of the runs that reached each milestone:");
            for (shape, variant, figures) in bench::k8s_start::medians(&starts) {
                row(&shape, &variant, &figures);
            }
        }
        println!(
            "idle CPU: seconds of host CPU the cluster's QEMUs (vm-001's alone) used in {} s, {} s after the pod ran",
            bench::k8s_start::IDLE_WINDOW.as_secs(),
            bench::k8s_start::SETTLE.as_secs()
        );
        println!("goal: 4+2 every node Ready within 60 s under TCG on this 2-core machine");
    }
    Ok(ExitCode::SUCCESS)
}
