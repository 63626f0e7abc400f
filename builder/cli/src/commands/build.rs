//! `kimg build`: arguments and output.

use anyhow::Context;
use kimg_contract::Flavour;
use kimg_image::k8s::download;
use kimg_image::{self as image, BuildOptions};
use kimg_kernel::KernelSource;
use std::path::PathBuf;
use std::process::ExitCode;

/// Build a bootable image: Debian's cloud kernel (fetched with apt-get download and
/// cached in ~/.cache/kimg), an initramfs with kimg-init and the modules that reach
/// the disk, and an ext4 root with busybox, kimg-init as /sbin/init and all modules.
///
/// Writes OUT/hd.img (qcow2: GPT with a FAT32 ESP and an ext4 root) and OUT/hd.json
/// (the manifest: kernel, command line, partitions, every component's sha256).
///
/// The Kubernetes flavour (OUT/hd-k8s.img) needs the Kubernetes server binaries:
///
///   kimg build --k8s --k8s-version v1.31.4        # downloaded once, then from the cache
///   kimg build --k8s --k8s-release kubernetes-server-linux-amd64.tar.gz
///   kimg build --k8s --k8s-release "$(scripts/k8s-release)"   # built from Debian's source
///   KIMG_K8S_MIRROR=http://mirror.lan/k8s kimg build --k8s --k8s-version v1.31.4
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
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
    /// Build the kernel from this source tree (defconfig + kernel-configs/base.config,
    /// everything the boot needs built in; cached) - see `kimg kernel build`.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel_deb", "kernel", "modules"])]
    kernel_source: Option<PathBuf>,
    /// Virtual disk size (K, M, G suffixes).
    #[arg(long, default_value = "2G", value_parser = super::parse_size)]
    size: u64,
    /// The static kimg-init binary [default: $KIMG_INIT, else the one built into kimg].
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// The static busybox to install.
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Build the Kubernetes flavour (hd-k8s.img): containerd, runc, CNI plugins, etcd,
    /// iptables, conntrack, ipset from this host's Debian packages, and the
    /// Kubernetes binaries from --k8s-version or --k8s-release; the kernel is checked
    /// against kernel-configs/k8s.config too (with --kernel-source, it is built with it).
    #[arg(long)]
    k8s: bool,
    /// A Kubernetes release: kubernetes-server-linux-amd64.tar.gz or its folder
    /// (scripts/k8s-release builds one from Debian's source). Image tarballs in its
    /// `images/` folder (the pause image, a test image) go into the image pre-pulled.
    #[arg(long, value_name = "PATH", requires = "k8s")]
    k8s_release: Option<PathBuf>,
    /// A Kubernetes release to download, e.g. v1.31.4: its
    /// kubernetes-server-linux-amd64.tar.gz from --k8s-mirror, verified against the
    /// published .sha512 and cached in ~/.cache/kimg/k8s-releases/VERSION/; later
    /// builds of that version use the cache and need no network. The official
    /// tarball has no pause image: give one with --k8s-images for pods to start offline.
    #[arg(
        long,
        value_name = "VERSION",
        requires = "k8s",
        conflicts_with = "k8s_release"
    )]
    k8s_version: Option<String>,
    /// Where --k8s-version downloads from: a base URL holding
    /// VERSION/kubernetes-server-linux-amd64.tar.gz and its .sha512, as dl.k8s.io does
    /// [default: $KIMG_K8S_MIRROR, else https://dl.k8s.io/release].
    #[arg(long, value_name = "URL", requires = "k8s_version")]
    k8s_mirror: Option<String>,
    /// A folder of container image tarballs (`*.tar`, as `docker save` writes) to
    /// carry pre-pulled, so pods start offline. Repeatable. kimg imports them (and the
    /// release's `images/`) into the image's containerd store at build time, with this
    /// host's containerd; a build not run as root leaves them to each node's boot.
    #[arg(long, value_name = "DIR", requires = "k8s")]
    k8s_images: Vec<PathBuf>,
    /// Leave the image tarballs to each node's boot (kimg-images imports them before
    /// kubelet starts) instead of importing them at build time: the image's bytes then
    /// depend on its inputs alone (containerd's store records times), and every node
    /// spends ~30 s of CPU under TCG importing a 33 MB image.
    #[arg(long, requires = "k8s")]
    k8s_images_at_boot: bool,
    /// Print the manifest as JSON on stdout instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs `kimg build`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let flavour = super::kernel::flavour(a.k8s);
    let release = match &a.k8s_version {
        Some(version) => Some(download_release(version, a.k8s_mirror.as_deref())?),
        None => a.k8s_release.clone(),
    };
    let k8s = (flavour, release, a.k8s_images.clone(), a.k8s_images_at_boot);
    if let Some(tree) = &a.kernel_source {
        use kimg_kernel::source::{self, Base, Fragment};
        let built = source::assemble_and_build(
            tree,
            &Base::Defconfig,
            &Fragment::embedded(flavour)?,
            source::default_jobs(),
            &kimg_util::cache::cache_dir(),
            &|l| eprintln!("kimg build: kernel: {l}"),
        )
        .context("building the kernel from source failed")?;
        let kernel = KernelSource::Files {
            kernel: built.vmlinuz,
            modules: built.modules_dir,
        };
        return build_with(a.out, kernel, a.size, a.init, a.busybox, k8s, a.json);
    }
    let kernel = match (a.kernel_deb, a.kernel, a.modules) {
        (Some(deb), _, _) => KernelSource::Deb(deb),
        (None, Some(kernel), Some(modules)) => KernelSource::Files { kernel, modules },
        _ => KernelSource::DebianDefault,
    };
    build_with(a.out, kernel, a.size, a.init, a.busybox, k8s, a.json)
}

/// The tarball of Kubernetes `version`: from kimg's cache, else downloaded from
/// `mirror` (else `$KIMG_K8S_MIRROR`, else dl.k8s.io), verified, then cached.
fn download_release(version: &str, mirror: Option<&str>) -> anyhow::Result<PathBuf> {
    let version = download::parse_version(version)?;
    let env = std::env::var(download::MIRROR_ENV).ok();
    let mirror = mirror
        .or(env.as_deref().filter(|m| !m.is_empty()))
        .unwrap_or(download::DEFAULT_MIRROR);
    let mirror = download::parse_mirror(mirror)?;
    let bars = super::fetch::StepBars::default();
    let got = download::fetch_release(
        &version,
        &mirror,
        &kimg_util::cache::cache_dir(),
        &|step, done, total| bars.update(step, done, total),
    )?;
    bars.finish();
    match &got.downloaded {
        Some(sha512) => eprintln!(
            "kimg build: Kubernetes {version}: {} downloaded, sha512 {sha512} verified, cached as {}",
            got.url,
            got.tarball.display()
        ),
        None => eprintln!(
            "kimg build: Kubernetes {version}: {} (cached)",
            got.tarball.display()
        ),
    }
    Ok(got.tarball)
}

fn build_with(
    out_dir: PathBuf,
    kernel: KernelSource,
    size: u64,
    init: Option<PathBuf>,
    busybox: PathBuf,
    (flavour, k8s_release, k8s_images, k8s_images_at_boot): (
        Flavour,
        Option<PathBuf>,
        Vec<PathBuf>,
        bool,
    ),
    json: bool,
) -> anyhow::Result<ExitCode> {
    let opts = BuildOptions {
        out_dir,
        kernel,
        size,
        init: match init {
            Some(p) => p,
            None => image::default_init(super::KIMG_INIT)?,
        },
        busybox,
        mtime: image::source_date_epoch(),
        zstd_level: 9,
        flavour,
        k8s_release,
        k8s_images,
        k8s_images_at_boot,
    };
    let start = std::time::Instant::now();
    let out = image::build(&opts, &|line| eprintln!("kimg build: {line}"))
        .context("kimg build failed")?;
    if json {
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
