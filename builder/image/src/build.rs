//! `kimg build`: kernel -> initramfs -> root filesystem -> disk image + manifest.
//!
//! Every step works in a temporary directory beside the output; the image and its
//! manifest are renamed into place only when everything succeeded.

use crate::rootfs::{self, RootfsInputs, RootfsManifest};
use kimg_contract::boot;
use kimg_contract::cmdline::{self, RootSpec};
use kimg_contract::manifest::{Component, KernelInfo, Manifest, MANIFEST_FORMAT};
use kimg_formats::disk::{self, DiskSpec};
use kimg_formats::initramfs::Initramfs;
use kimg_kernel::{
    self as kernel, config::KernelConfig, modules::ModuleIndex, Kernel, KernelSource,
};
use kimg_util::hash::{file_sha256, sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Modules kimg-init loads from the root filesystem in stage 2.
pub const STAGE2_MODULES: &[&str] = &["virtio_net", "virtio_rng"];
/// Further stage-2 modules of the Kubernetes flavour (the rest, e.g. xt matches,
/// the kernel loads on demand through modprobe and modules.dep).
pub const K8S_MODULES: &[&str] = &[
    "overlay",
    "br_netfilter",
    "nf_conntrack",
    "ipip",
    "rbd",
    "veth",
    "vxlan",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
];
/// systemd-boot (Debian's systemd-boot-efi), copied to the ESP so the image boots
/// on its own under UEFI with the loader entry below.
pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// Default virtual disk size.
pub const DEFAULT_SIZE: u64 = 2 << 30;

/// Errors of `kimg build`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Getting or unpacking the kernel failed.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// The kernel config lacks symbols kimg needs.
    #[error("kernel {version}: its config ({config}) lacks what kimg needs:\n  {}\nuse a kernel built with kernel-configs/base.config", misses.join("\n  "))]
    Config {
        /// Kernel version.
        version: String,
        /// Config file checked.
        config: PathBuf,
        /// One line per missing or wrong symbol.
        misses: Vec<String>,
    },
    /// Reading the kernel config failed.
    #[error(transparent)]
    ConfigParse(#[from] kernel::config::ConfigError),
    /// Module scanning or closure failed.
    #[error(transparent)]
    Modules(#[from] kernel::modules::ModuleError),
    /// Writing the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] kimg_formats::initramfs::InitramfsError),
    /// Staging the root filesystem failed.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// The Kubernetes binaries are missing or wrong.
    #[error(transparent)]
    K8s(#[from] crate::k8s::K8sError),
    /// Writing the disk failed.
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// A required input is missing.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What to do.
        hint: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Inputs of `kimg build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Where the kernel comes from.
    pub kernel: KernelSource,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Static kimg-init binary.
    pub init: PathBuf,
    /// Static busybox binary.
    pub busybox: PathBuf,
    /// Timestamp for every file (SOURCE_DATE_EPOCH).
    pub mtime: u64,
    /// zstd level of the initramfs.
    pub zstd_level: i32,
    /// The Kubernetes flavour: `Some(release)` with the Kubernetes binaries
    /// (`Some` of an empty path when `--k8s` was given without a release).
    pub k8s: Option<PathBuf>,
}

impl BuildOptions {
    /// Base name of the outputs: `hd` or `hd-k8s`.
    pub fn name(&self) -> &'static str {
        if self.k8s.is_some() {
            "hd-k8s"
        } else {
            "hd"
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Its manifest.
    pub manifest_path: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// Named step timings, in order.
    pub steps: Vec<(&'static str, f64)>,
}

/// Runs the whole build.
pub fn build(opts: &BuildOptions, log: &dyn Fn(&str)) -> Result<BuildOutput, BuildError> {
    for (what, path, hint) in [
        (
            "kimg-init",
            &opts.init,
            "build it with scripts/build-init or pass --init",
        ),
        (
            "busybox",
            &opts.busybox,
            "apt-get install busybox-static or pass --busybox",
        ),
        (
            "systemd-boot",
            &PathBuf::from(SYSTEMD_BOOT),
            "apt-get install systemd-boot-efi (the image's UEFI boot loader)",
        ),
    ] {
        if !path.is_file() {
            return Err(BuildError::Missing {
                what,
                path: path.clone(),
                hint: hint.into(),
            });
        }
    }
    // The Kubernetes binaries are checked before any work is done.
    let release = match &opts.k8s {
        None => None,
        Some(p) if p.as_os_str().is_empty() => return Err(crate::k8s::K8sError::NoRelease.into()),
        Some(p) => {
            fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
            Some(crate::k8s::find_release(p, &opts.out_dir)?)
        }
    };
    let mut steps = Vec::new();
    let mut t = Instant::now();
    let mut step = |name: &'static str, log: &dyn Fn(&str)| {
        let secs = t.elapsed().as_secs_f64();
        log(&format!("{name:<10} {secs:6.2}s"));
        steps.push((name, secs));
        t = Instant::now();
    };

    let kernel = kernel::prepare(&opts.kernel, &kimg_util::cache::cache_dir())?;
    let config_sha256 = check_config(&kernel, release.is_some())?;
    step("kernel", log);

    let index = ModuleIndex::scan(&kernel.modules_dir)?;
    let stage1 = index.closure(kimg_kernel::modules::STAGE1_MODULES)?;
    let mut stage2_wanted = STAGE2_MODULES.to_vec();
    if release.is_some() {
        stage2_wanted.extend_from_slice(K8S_MODULES);
    }
    let stage2 = index.closure(&stage2_wanted)?;
    step("modules", log);

    fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".kimg-build-")
        .tempdir_in(&opts.out_dir)
        .map_err(io_err(&opts.out_dir))?;
    let mtime = opts.mtime;

    let mut initrd = Initramfs::new();
    initrd
        .file("init", &opts.init, 0o755)
        .bytes(boot::in_tree(boot::STAGE1_MARKER), "", 0o644)
        .file("bin/busybox", &opts.busybox, 0o755)
        .symlink("bin/sh", "busybox");
    for d in ["dev", "proc", "sys", "run", "tmp", "newroot"] {
        initrd.dir(d, 0o755);
    }
    let mut load_list = Vec::new();
    for m in &stage1 {
        let rel = uncompressed_name(&m.rel_path);
        let data = module_bytes(&kernel.modules_dir.join(&m.rel_path))?;
        initrd.bytes(
            &format!("lib/modules/{}/{}", kernel.version, rel),
            data,
            0o644,
        );
        load_list.push(rel);
    }
    initrd.bytes(
        boot::in_tree(boot::MODULES_LOAD),
        boot::modules_load_text(&load_list),
        0o644,
    );
    let initrd_path = tmp.path().join("initrd.img");
    initrd.write(&initrd_path, mtime as u32, opts.zstd_level)?;
    step("initramfs", log);

    let root = tmp.path().join("root");
    fs::create_dir(&root).map_err(io_err(&root))?;
    let mut manifests = vec![RootfsManifest::parse(
        "rootfs/base.toml",
        rootfs::BASE_TOML,
    )?];
    let mut extra_binaries = Vec::new();
    if let Some(r) = &release {
        let mut k8s = RootfsManifest::parse("rootfs/k8s.toml", rootfs::K8S_TOML)?;
        crate::k8s::version::render(&mut k8s, r.kube_version)
            .map_err(crate::k8s::K8sError::Render)?;
        manifests.push(k8s);
        for (name, path) in &r.binaries {
            extra_binaries.push((
                path.clone(),
                format!("/usr/bin/{name}"),
                Some(r.version.clone()),
            ));
        }
    }
    let stage2_paths: Vec<PathBuf> = stage2.iter().map(|m| m.rel_path.clone()).collect();
    let os_release = format!(
        "ID=kimg\nNAME=kimg\nPRETTY_NAME=\"kimg {v}\"\nVERSION_ID={v}\nHOME_URL=\"https://github.com/kimg\"\n",
        v = env!("CARGO_PKG_VERSION")
    );
    let mut components = rootfs::stage(
        &root,
        &RootfsInputs {
            init: &opts.init,
            busybox: &opts.busybox,
            modules_dir: &kernel.modules_dir,
            kernel_version: &kernel.version,
            modules: &index,
            stage2_modules: &stage2_paths,
            manifests: &manifests,
            os_release: &os_release,
            extra_binaries: &extra_binaries,
        },
    )?;
    rootfs::set_times(&root, mtime as i64)?;
    step("rootfs", log);

    let cmdline = cmdline::base_cmdline(&RootSpec::default());
    let esp_dir = tmp.path().join("esp");
    fs::create_dir(&esp_dir).map_err(io_err(&esp_dir))?;
    let entry = esp_dir.join("kimg.conf");
    let entry_text = format!(
        "title kimg {v}\nversion {k}\nlinux /{kern}\ninitrd /{init}\noptions {cmdline}\n",
        v = env!("CARGO_PKG_VERSION"),
        k = kernel.version,
        kern = cmdline::ESP_KERNEL,
        init = cmdline::ESP_INITRD,
    );
    fs::write(&entry, entry_text).map_err(io_err(&entry))?;
    let loader = esp_dir.join("loader.conf");
    fs::write(&loader, "default kimg.conf\ntimeout 0\n").map_err(io_err(&loader))?;
    let esp_files = vec![
        (cmdline::ESP_KERNEL.to_string(), kernel.vmlinuz.clone()),
        (cmdline::ESP_INITRD.to_string(), initrd_path.clone()),
        ("loader/entries/kimg.conf".to_string(), entry),
        ("loader/loader.conf".to_string(), loader),
        (
            cmdline::ESP_BOOTLOADER.to_string(),
            PathBuf::from(SYSTEMD_BOOT),
        ),
    ];

    let mut head = vec![
        component(
            "kernel",
            &kernel.vmlinuz,
            &format!("esp:/{}", cmdline::ESP_KERNEL),
            kernel.package.clone(),
        )?,
        component(
            "initramfs",
            &initrd_path,
            &format!("esp:/{}", cmdline::ESP_INITRD),
            None,
        )?,
    ];
    head.push(component(
        "systemd-boot",
        Path::new(SYSTEMD_BOOT),
        &format!("esp:/{}", cmdline::ESP_BOOTLOADER),
        deb_version("systemd-boot-efi"),
    )?);
    head.append(&mut components);
    let components = head;
    // Every id on the disk derives from the inputs: same inputs, same bytes.
    let mut seed_input = format!("kimg-disk-v1 {} {}", opts.size, cmdline);
    for c in &components {
        seed_input.push_str(&format!(" {}={}", c.path, c.sha256));
    }
    let seed_hex = sha256(seed_input.as_bytes());
    let mut seed = [0u8; 32];
    hex::decode_to_slice(&seed_hex, &mut seed).unwrap_or_default();

    let img_tmp = tmp.path().join("disk.img");
    let partitions = disk::build_disk(
        &DiskSpec {
            esp_files: &esp_files,
            root_dir: &root,
            size: opts.size,
            esp_size: disk::ESP_MIN_SIZE,
            seed,
            mtime,
            // The k8s image is mostly Go binaries: compressed clusters take it from
            // 736 MB to 234 MB (v1.20.2) for ~10% longer to nodes Ready under TCG.
            compress: release.is_some(),
        },
        &img_tmp,
    )?;
    step("disk", log);

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        kimg_version: env!("CARGO_PKG_VERSION").to_string(),
        flavour: if release.is_some() { "k8s" } else { "base" }.into(),
        kernel: KernelInfo {
            version: kernel.version.clone(),
            cmdline,
            esp_kernel: cmdline::ESP_KERNEL.into(),
            esp_initrd: cmdline::ESP_INITRD.into(),
            config_sha256,
        },
        disk_size: opts.size,
        partitions,
        components,
        build_time: mtime,
    };
    let json_tmp = tmp.path().join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
    fs::write(&json_tmp, json).map_err(io_err(&json_tmp))?;
    let image = opts.out_dir.join(format!("{}.img", opts.name()));
    let manifest_path = opts.out_dir.join(format!("{}.json", opts.name()));
    fs::rename(&img_tmp, &image).map_err(io_err(&image))?;
    fs::rename(&json_tmp, &manifest_path).map_err(io_err(&manifest_path))?;
    Ok(BuildOutput {
        image,
        manifest_path,
        manifest,
        steps,
    })
}

/// Checks the kernel's config against the base fragment (and the k8s one); returns
/// the config's sha256 ("" when the kernel came without a config, which is then not
/// checked).
fn check_config(kernel: &Kernel, k8s: bool) -> Result<String, BuildError> {
    let Some(path) = &kernel.config else {
        return Ok(String::new());
    };
    let config = KernelConfig::from_file(path)?;
    let mut fragments = vec![kernel::config::base_fragment()];
    if k8s {
        fragments.push(kernel::config::k8s_fragment());
    }
    let mut misses = Vec::new();
    for text in fragments {
        let fragment = KernelConfig::parse(text)?;
        misses.extend(
            kernel::config::check(&config, &fragment)
                .iter()
                .map(|m| m.to_string()),
        );
    }
    if !misses.is_empty() {
        return Err(BuildError::Config {
            version: kernel.version.clone(),
            config: path.clone(),
            misses,
        });
    }
    Ok(file_sha256(path).map_err(io_err(path))?.0)
}

/// The installed version of a Debian package, if dpkg knows it (for the manifest).
fn deb_version(package: &str) -> Option<String> {
    kimg_util::cmd::run_stdout(
        std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Version}"])
            .arg(package),
    )
    .ok()
    .map(|v| v.trim().to_string())
    .filter(|v| !v.is_empty())
}

/// `a/b.ko.xz` -> `a/b.ko`: stage 1 loads plain modules with finit_module.
fn uncompressed_name(rel: &Path) -> String {
    let s = rel.to_string_lossy();
    s.strip_suffix(".xz")
        .or_else(|| s.strip_suffix(".zst"))
        .unwrap_or(&s)
        .to_string()
}

/// A module's bytes, decompressed when it is `.ko.xz` or `.ko.zst`.
fn module_bytes(path: &Path) -> Result<Vec<u8>, BuildError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    let name = path.to_string_lossy();
    let read = if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(file).read_to_end(&mut out)
    } else if name.ends_with(".zst") {
        zstd::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut out))
    } else {
        let mut f = file;
        f.read_to_end(&mut out)
    };
    read.map_err(io_err(path))?;
    Ok(out)
}

fn component(
    name: &str,
    path: &Path,
    image_path: &str,
    version: Option<String>,
) -> Result<Component, BuildError> {
    kimg_util::hash::component(name, path, image_path.into(), version).map_err(io_err(path))
}

/// Where kimg-init is looked for when `--init` is not given: `$KIMG_INIT`, beside
/// the kimg binary, then this workspace's musl build.
pub fn default_init() -> PathBuf {
    if let Some(p) = std::env::var_os("KIMG_INIT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("kimg-init")))
    {
        if p.is_file() {
            return p;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-musl/init/kimg-init")
}

/// SOURCE_DATE_EPOCH if set and valid, else 1 (a fixed time keeps builds reproducible).
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_module_names_lose_their_suffix() {
        assert_eq!(
            uncompressed_name(Path::new("kernel/a/b.ko.xz")),
            "kernel/a/b.ko"
        );
        assert_eq!(
            uncompressed_name(Path::new("kernel/a/b.ko.zst")),
            "kernel/a/b.ko"
        );
        assert_eq!(
            uncompressed_name(Path::new("kernel/a/b.ko")),
            "kernel/a/b.ko"
        );
    }

    #[test]
    fn module_bytes_decompresses_xz_and_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let plain = b"\x7fELF module bytes".to_vec();
        let xz = dir.path().join("m.ko.xz");
        let mut enc = liblzma::write::XzEncoder::new(fs::File::create(&xz).unwrap(), 6);
        std::io::Write::write_all(&mut enc, &plain).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("m.ko.zst");
        fs::write(&zst, zstd::encode_all(&plain[..], 3).unwrap()).unwrap();
        let ko = dir.path().join("m.ko");
        fs::write(&ko, &plain).unwrap();
        for p in [xz, zst, ko] {
            assert_eq!(module_bytes(&p).unwrap(), plain, "{}", p.display());
        }
    }
}
