//! `kimg build`: arguments and output.

use anyhow::Context;
use kimg::image::{self, BuildOptions};
use kimg::kernel::KernelSource;
use std::path::PathBuf;
use std::process::ExitCode;

/// Build a bootable image: Debian's cloud kernel (fetched with apt-get download and
/// cached in ~/.cache/kimg), an initramfs with kimg-init and the modules that reach
/// the disk, and an ext4 root with busybox, kimg-init as /sbin/init and all modules.
///
/// Writes OUT/hd.img (qcow2: GPT with a FAT32 ESP and an ext4 root) and OUT/hd.json
/// (the manifest: kernel, command line, partitions, every component's sha256).
#[derive(clap::Args)]
pub struct Args {
    /// Output directory.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Use this Debian linux-image .deb instead of fetching the cloud kernel.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "modules"])]
    kernel_deb: Option<PathBuf>,
    /// Use this kernel image (bzImage); needs --modules.
    #[arg(long, value_name = "FILE", requires = "modules")]
    kernel: Option<PathBuf>,
    /// The kernel's modules directory (.../lib/modules/VERSION).
    #[arg(long, value_name = "DIR", requires = "kernel")]
    modules: Option<PathBuf>,
    /// Virtual disk size (K, M, G suffixes).
    #[arg(long, default_value = "2G", value_parser = super::parse_size)]
    size: u64,
    /// The static kimg-init binary [default: $KIMG_INIT, beside kimg, or this workspace's musl build].
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// The static busybox to install.
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Build the Kubernetes flavour (hd-k8s.img): containerd, runc, CNI plugins, etcd,
    /// iptables, conntrack, ipset from this host's Debian packages, and the
    /// Kubernetes binaries from --k8s-release.
    #[arg(long)]
    k8s: bool,
    /// A Kubernetes release: kubernetes-server-linux-amd64.tar.gz or its folder.
    #[arg(long, value_name = "PATH", requires = "k8s")]
    k8s_release: Option<PathBuf>,
    /// Print the manifest as JSON on stdout instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg build`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let kernel = match (a.kernel_deb, a.kernel, a.modules) {
        (Some(deb), _, _) => KernelSource::Deb(deb),
        (None, Some(kernel), Some(modules)) => KernelSource::Files { kernel, modules },
        _ => KernelSource::DebianDefault,
    };
    let opts = BuildOptions {
        out_dir: a.out,
        kernel,
        size: a.size,
        init: a.init.unwrap_or_else(image::default_init),
        busybox: a.busybox,
        mtime: image::source_date_epoch(),
        zstd_level: 9,
        k8s: a.k8s.then(|| a.k8s_release.unwrap_or_default()),
    };
    let start = std::time::Instant::now();
    let out = image::build(&opts, &|line| eprintln!("kimg build: {line}"))
        .context("kimg build failed")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out.manifest)?);
    } else {
        let size = std::fs::metadata(&out.image).map(|m| m.len()).unwrap_or(0);
        println!(
            "{} ({:.1} MiB qcow2, kernel {}) and {} in {:.1}s",
            out.image.display(),
            size as f64 / (1 << 20) as f64,
            out.manifest.kernel.version,
            out.manifest_path.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
