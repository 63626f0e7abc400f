//! `kimg build`: kernel -> initramfs -> root filesystem -> disk image + manifest.
//!
//! Every step works in a temporary directory beside the output; the image and its
//! manifest are renamed into place only when everything succeeded.

use crate::k8s::preload;
use crate::plan::Plan;
use crate::rootfs::{self, RootfsInputs};
use kimg_contract::boot;
use kimg_contract::cmdline::{self, RootSpec};
use kimg_contract::manifest::{Component, KernelInfo, Manifest, MANIFEST_FORMAT};
use kimg_contract::Flavour;
use kimg_formats::disk::{self, DiskSpec};
use kimg_formats::initramfs::Initramfs;
use kimg_kernel::{
    self as kernel, config::KernelConfig, modules::ModuleIndex, Kernel, KernelSource,
};
use kimg_util::fs::{IoError, PathContext};
use kimg_util::hash::{file_sha256, sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    #[error("kernel {version}: its config ({config}) lacks what kimg needs:\n  {}\nuse a kernel built with kimg's requirements (`kimg kernel config` and `kimg kernel build` apply them; `kimg build --kernel-source DIR` does both)", misses.join("\n  "))]
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
    #[error("{what} not found at {path}: {hint} (`kimg doctor` checks what kimg needs)")]
    Missing {
        /// What.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What to do.
        hint: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
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
    /// What the image is for.
    pub flavour: Flavour,
    /// The Kubernetes release (folder or tarball) of the Kubernetes flavour.
    pub k8s_release: Option<PathBuf>,
    /// Folders of container image tarballs (`*.tar`) the Kubernetes flavour carries
    /// pre-pulled, after the release's own `images/`.
    pub k8s_images: Vec<PathBuf>,
    /// Leave those tarballs to the nodes' boot-time import even where they could be
    /// imported at build time ([`crate::k8s::preload`]).
    pub k8s_images_at_boot: bool,
}

impl BuildOptions {
    /// Base name of the outputs: `hd` or `hd-k8s`.
    pub fn name(&self) -> &'static str {
        self.flavour.image_stem()
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

/// Named steps with their timings, logged as they finish.
struct Steps<'a> {
    log: &'a dyn Fn(&str),
    done: Vec<(&'static str, f64)>,
}

impl Steps<'_> {
    /// Runs one step and records how long it took.
    fn run<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        let t = Instant::now();
        let out = f()?;
        let secs = t.elapsed().as_secs_f64();
        (self.log)(&format!("{name:<10} {secs:6.2}s"));
        self.done.push((name, secs));
        Ok(out)
    }
}

/// The module closures of the two stages (paths relative to the modules dir).
struct Modules {
    index: ModuleIndex,
    stage1: Vec<PathBuf>,
    stage2: Vec<PathBuf>,
}

/// The ESP's files (path on the ESP, file) and the manifest's components so far.
struct Esp {
    files: Vec<(String, PathBuf)>,
    components: Vec<Component>,
}

/// Runs the whole build: inputs checked, the flavour's plan resolved (its release
/// checked before any work), then kernel, modules, initramfs, rootfs, ESP, disk, and
/// the outputs put in place.
pub fn build(opts: &BuildOptions, log: &dyn Fn(&str)) -> Result<BuildOutput, BuildError> {
    check_inputs(opts)?;
    let plan = Plan::resolve(opts)?;
    let mut steps = Steps {
        log,
        done: Vec::new(),
    };
    let (kernel, config_sha256) = steps.run("kernel", || prepare_kernel(opts, &plan))?;
    let modules = steps.run("modules", || module_closures(&kernel, &plan))?;
    fs::create_dir_all(&opts.out_dir).with_path(&opts.out_dir)?;
    // Everything is written under this hidden directory, removed when dropped.
    // Locked while it lives; a killed build's is removed by the next one.
    let tmp = kimg_util::fs::work_dir(&opts.out_dir, ".kimg-build-")?;
    let initrd = steps.run("initramfs", || {
        write_initramfs(opts, &kernel, &modules, tmp.path())
    })?;
    let root = tmp.path().join("root");
    let components = steps.run("rootfs", || {
        stage_rootfs(opts, &plan, &kernel, &modules, &root)
    })?;
    let cmdline = cmdline::base_cmdline(&RootSpec::default());
    let esp = steps.run("esp", || {
        esp_files(&kernel, &initrd, &cmdline, &tmp.path().join("esp"))
    })?;
    let components = [esp.components, components].concat();
    let img_tmp = tmp.path().join("disk.img");
    let partitions = steps.run("disk", || {
        write_disk(
            opts,
            &plan,
            &esp.files,
            &root,
            &cmdline,
            &components,
            &img_tmp,
        )
    })?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        kimg_version: env!("CARGO_PKG_VERSION").to_string(),
        flavour: plan.flavour,
        kernel: KernelInfo {
            version: kernel.version.clone(),
            cmdline,
            esp_kernel: cmdline::ESP_KERNEL.into(),
            esp_initrd: cmdline::ESP_INITRD.into(),
            config_sha256,
            mmio: kimg_kernel::modules::STAGE1_MODULES.contains(&"virtio_mmio"),
        },
        disk_size: opts.size,
        partitions,
        components,
        build_time: opts.mtime,
    };
    let (image, manifest_path) = install(opts, &img_tmp, &manifest)?;
    Ok(BuildOutput {
        image,
        manifest_path,
        manifest,
        steps: steps.done,
    })
}

/// kimg-init, busybox and systemd-boot exist (before any work is done).
fn check_inputs(opts: &BuildOptions) -> Result<(), BuildError> {
    for (what, path, hint) in [
        (
            "kimg-init",
            &opts.init,
            "check --init or $KIMG_INIT (without them kimg uses the kimg-init it carries)",
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
    Ok(())
}

/// The kernel, unpacked from the cache, its config checked against the plan's
/// fragments; returns it and the config's sha256.
fn prepare_kernel(opts: &BuildOptions, plan: &Plan) -> Result<(Kernel, String), BuildError> {
    let kernel = kernel::prepare(&opts.kernel, &kimg_util::cache::cache_dir())?;
    let sha = check_config(&kernel, &plan.kernel_fragments)?;
    Ok((kernel, sha))
}

/// The module closures: what stage 1 loads from the initramfs, what stage 2 loads
/// from the root.
fn module_closures(kernel: &Kernel, plan: &Plan) -> Result<Modules, BuildError> {
    let index = ModuleIndex::scan(&kernel.modules_dir)?;
    let stage1: Vec<PathBuf> = index
        .closure(kimg_kernel::modules::STAGE1_MODULES)?
        .iter()
        .map(|m| m.rel_path.clone())
        .collect();
    // Every boot runs stage 1 first, so stage 2 skips what it loaded (virtio and
    // virtio_ring): the kernel checks a module's signature before it finds the
    // module already loaded, so a second request is not free.
    let stage2 = index
        .closure(&plan.stage2_modules)?
        .iter()
        .map(|m| m.rel_path.clone())
        .filter(|m| !stage1.contains(m))
        .collect();
    Ok(Modules {
        index,
        stage1,
        stage2,
    })
}

/// The initramfs: kimg-init as /init, the stage-1 marker, busybox, and the stage-1
/// modules (decompressed: stage 1 loads them with finit_module) with their list.
fn write_initramfs(
    opts: &BuildOptions,
    kernel: &Kernel,
    modules: &Modules,
    dir: &Path,
) -> Result<PathBuf, BuildError> {
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
    for m in &modules.stage1 {
        let rel = uncompressed_name(m);
        let data = module_bytes(&kernel.modules_dir.join(m))?;
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
    let path = dir.join("initrd.img");
    initrd.write(&path, opts.mtime as u32, opts.zstd_level)?;
    Ok(path)
}

/// The root filesystem's tree at `root`, every time set to the build's; returns the
/// components it holds.
fn stage_rootfs(
    opts: &BuildOptions,
    plan: &Plan,
    kernel: &Kernel,
    modules: &Modules,
    root: &Path,
) -> Result<Vec<Component>, BuildError> {
    fs::create_dir(root).with_path(root)?;
    let os_release = format!(
        "ID=kimg\nNAME=kimg\nPRETTY_NAME=\"kimg {v}\"\nVERSION_ID={v}\nHOME_URL=\"https://github.com/kimg\"\n",
        v = env!("CARGO_PKG_VERSION")
    );
    let mut components = rootfs::stage(
        root,
        &RootfsInputs {
            init: &opts.init,
            busybox: &opts.busybox,
            modules_dir: &kernel.modules_dir,
            kernel_version: &kernel.version,
            modules: &modules.index,
            stage2_modules: &modules.stage2,
            manifests: &plan.rootfs,
            os_release: &os_release,
            extra_binaries: &plan.extra_binaries,
        },
    )?;
    if !plan.preload_images.is_empty() {
        let store = root.join(preload::CONTAINERD_ROOT.trim_start_matches('/'));
        preload::import(&plan.preload_images, &store)?;
        for (name, file) in &plan.preload_images {
            let at = format!("{}{name}", preload::COMPONENT_PREFIX);
            components.push(component(name, file, &at, None)?);
        }
    }
    rootfs::set_times(root, opts.mtime as i64)?;
    Ok(components)
}

/// The ESP's files (kernel, initramfs, systemd-boot and its entry for UEFI boots),
/// written under `dir`, with their components.
fn esp_files(kernel: &Kernel, initrd: &Path, cmdline: &str, dir: &Path) -> Result<Esp, BuildError> {
    fs::create_dir(dir).with_path(dir)?;
    let entry = dir.join("kimg.conf");
    let entry_text = format!(
        "title kimg {v}\nversion {k}\nlinux /{kern}\ninitrd /{init}\noptions {cmdline}\n",
        v = env!("CARGO_PKG_VERSION"),
        k = kernel.version,
        kern = cmdline::ESP_KERNEL,
        init = cmdline::ESP_INITRD,
    );
    fs::write(&entry, entry_text).with_path(&entry)?;
    let loader = dir.join("loader.conf");
    fs::write(&loader, "default kimg.conf\ntimeout 0\n").with_path(&loader)?;
    let files = vec![
        (cmdline::ESP_KERNEL.to_string(), kernel.vmlinuz.clone()),
        (cmdline::ESP_INITRD.to_string(), initrd.to_path_buf()),
        ("loader/entries/kimg.conf".to_string(), entry),
        ("loader/loader.conf".to_string(), loader),
        (
            cmdline::ESP_BOOTLOADER.to_string(),
            PathBuf::from(SYSTEMD_BOOT),
        ),
    ];
    let components = vec![
        component(
            "kernel",
            &kernel.vmlinuz,
            &format!("esp:/{}", cmdline::ESP_KERNEL),
            kernel.package.clone(),
        )?,
        component(
            "initramfs",
            initrd,
            &format!("esp:/{}", cmdline::ESP_INITRD),
            None,
        )?,
        component(
            "systemd-boot",
            Path::new(SYSTEMD_BOOT),
            &format!("esp:/{}", cmdline::ESP_BOOTLOADER),
            deb_version("systemd-boot-efi"),
        )?,
    ];
    Ok(Esp { files, components })
}

/// The qcow2 at `out`; every id on the disk derives from the inputs (same inputs,
/// same bytes). Returns the partitions for the manifest.
fn write_disk(
    opts: &BuildOptions,
    plan: &Plan,
    esp_files: &[(String, PathBuf)],
    root: &Path,
    cmdline: &str,
    components: &[Component],
    out: &Path,
) -> Result<Vec<kimg_contract::manifest::Partition>, BuildError> {
    let mut seed_input = format!("kimg-disk-v1 {} {}", opts.size, cmdline);
    for c in components {
        seed_input.push_str(&format!(" {}={}", c.path, c.sha256));
    }
    let seed_hex = sha256(seed_input.as_bytes());
    let mut seed = [0u8; 32];
    hex::decode_to_slice(&seed_hex, &mut seed).unwrap_or_default();
    Ok(disk::build_disk(
        &DiskSpec {
            esp_files,
            root_dir: root,
            size: opts.size,
            esp_size: disk::ESP_MIN_SIZE,
            seed,
            mtime: opts.mtime,
            compress: plan.compress,
            keep_owners: if plan.preload_images.is_empty() {
                &[]
            } else {
                &[preload::CONTAINERD_ROOT]
            },
        },
        out,
    )?)
}

/// Puts the image and its manifest in place. The old manifest goes first, so that a
/// crash in between leaves an image without a manifest (which `kimg run` refuses),
/// never a new image paired with an old manifest.
fn install(
    opts: &BuildOptions,
    img_tmp: &Path,
    manifest: &Manifest,
) -> Result<(PathBuf, PathBuf), BuildError> {
    let image = opts.out_dir.join(format!("{}.img", opts.name()));
    let manifest_path = opts.out_dir.join(format!("{}.json", opts.name()));
    match fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(IoError::new(&manifest_path, e).into())
        }
        _ => {}
    }
    kimg_util::fs::rename(img_tmp, &image)?;
    let json = serde_json::to_string_pretty(manifest).unwrap_or_default() + "\n";
    kimg_util::fs::write_atomic(&manifest_path, json)?;
    Ok((image, manifest_path))
}

/// Checks the kernel's config against the plan's fragments; returns
/// the config's sha256 ("" when the kernel came without a config, which is then not
/// checked).
fn check_config(
    kernel: &Kernel,
    fragments: &[(&'static str, &'static str)],
) -> Result<String, BuildError> {
    let Some(path) = &kernel.config else {
        return Ok(String::new());
    };
    let config = KernelConfig::from_file(path)?;
    let mut misses = Vec::new();
    for (_, text) in fragments {
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
    Ok(file_sha256(path).with_path(path)?.0)
}

/// The installed version of a Debian package, if dpkg knows it (for the manifest).
fn deb_version(package: &str) -> Option<String> {
    kimg_util::cmd::run_stdout(
        kimg_util::cmd::command("dpkg-query")
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
    let file = fs::File::open(path).with_path(path)?;
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
    read.with_path(path)?;
    Ok(out)
}

fn component(
    name: &str,
    path: &Path,
    image_path: &str,
    version: Option<String>,
) -> Result<Component, BuildError> {
    Ok(kimg_util::hash::component(name, path, image_path.into(), version).with_path(path)?)
}

/// kimg-init when `--init` is not given: `$KIMG_INIT` (for kimg-init's developers),
/// else `embedded`, the one the kimg binary carries, written to the cache by its sha256.
pub fn default_init(embedded: &[u8]) -> Result<PathBuf, BuildError> {
    if let Some(p) = std::env::var_os("KIMG_INIT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    Ok(crate::embedded::init_file(embedded)?)
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
