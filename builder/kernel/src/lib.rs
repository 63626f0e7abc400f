//! Kernel: getting one (Debian package, or files given by the user), its config and
//! its modules.
//!
//! [`prepare`] turns a [`KernelSource`] into a [`Kernel`]: an unpacked kernel image, its
//! `lib/modules/<version>` directory and, when there is one, its `.config`. Downloads
//! and unpacked packages live in kimg's cache and are reused.

pub mod apt;
pub mod config;
pub mod deb;
pub mod kconfig;
pub mod modules;
pub mod source;

use kimg_util::cmd::CmdError;
use kimg_util::fs::{IoError, PathContext};
use std::path::{Path, PathBuf};

/// Getting a kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// apt is needed for the default kernel but is not installed.
    #[error(
        "`{program}` is not installed, so kimg cannot fetch Debian's kernel: pass \
         --kernel-deb FILE, or --kernel FILE --modules DIR"
    )]
    NoApt {
        /// The missing program.
        program: &'static str,
    },
    /// An apt command failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// apt's output did not name a kernel package.
    #[error("could not find the kernel package behind {package}: {reason}")]
    Resolve {
        /// The package being resolved.
        package: String,
        /// What was missing.
        reason: String,
    },
    /// Reading or writing a file in the cache failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A downloaded package does not match the archive's checksum.
    #[error("{}: sha256 {actual} does not match the archive's {expected}", path.display())]
    Checksum {
        /// The downloaded file (removed).
        path: PathBuf,
        /// sha256 from `apt-cache show`.
        expected: String,
        /// sha256 of the file.
        actual: String,
    },
    /// Unpacking the kernel package failed.
    #[error(transparent)]
    Deb(#[from] deb::DebError),
    /// The package or directories do not look like a kernel.
    #[error("{}: {reason}", path.display())]
    Layout {
        /// Where kimg looked.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// Debian's current cloud kernel, fetched with apt-get.
    DebianDefault,
    /// A kernel `.deb` file (`--kernel-deb`).
    Deb(PathBuf),
    /// A kernel image and its `lib/modules/<version>` directory (`--kernel`, `--modules`).
    Files {
        /// The kernel image (bzImage / vmlinuz).
        kernel: PathBuf,
        /// The modules directory, named after the kernel version.
        modules: PathBuf,
    },
}

/// A kernel ready to be put in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// The kernel's `.config`, when known.
    pub config: Option<PathBuf>,
    /// `lib/modules/<version>`.
    pub modules_dir: PathBuf,
    /// Package name and version, e.g. `linux-image-6.1.0-56-cloud-amd64 6.1.192-2`.
    pub package: Option<String>,
}

/// Gets the kernel described by `src`, downloading and unpacking into `cache` as needed.
pub fn prepare(src: &KernelSource, cache: &Path) -> Result<Kernel, KernelError> {
    match src {
        KernelSource::DebianDefault => {
            let download = apt::download_default(cache)?;
            let mut kernel = from_deb(&download.deb, Some(&download.sha256), cache)?;
            kernel.package = Some(download.package);
            Ok(kernel)
        }
        KernelSource::Deb(deb) => from_deb(deb, None, cache),
        KernelSource::Files { kernel, modules } => from_files(kernel, modules),
    }
}

/// Unpacks `deb` into `<cache>/kernels/<sha256 of deb>/` (once) and finds the kernel.
/// `sha256` is the .deb's digest when already known (a verified download).
fn from_deb(deb: &Path, sha256: Option<&str>, cache: &Path) -> Result<Kernel, KernelError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KernelError::Io(IoError::new(path, source))
    };
    let digest = match sha256 {
        Some(d) => d.to_string(),
        None => kimg_util::hash::file_sha256(deb).with_path(deb)?.0,
    };
    // The digest names a directory: never let a corrupt marker file point elsewhere.
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KernelError::Layout {
            path: deb.to_path_buf(),
            reason: format!("bad sha256 {digest:?}"),
        });
    }
    let kernels = cache.join("kernels");
    let root = kernels.join(&digest);
    if !root.is_dir() {
        std::fs::create_dir_all(&kernels).with_path(&kernels)?;
        // Unpack beside the final place and rename, so an interrupted unpack never
        // looks complete.
        let tmp = kimg_util::fs::work_dir(&kernels, ".unpack-")?;
        deb::unpack_data(deb, tmp.path())?;
        if let Err(e) = std::fs::rename(tmp.path(), &root) {
            // Another kimg may have finished the same unpack first; theirs is as good.
            if !root.is_dir() {
                return Err(io_err(&root)(e));
            }
        }
    }
    let mut kernel = find_in_root(&root)?;
    kernel.package = package_from_file_name(deb);
    Ok(kernel)
}

/// `linux-image-X_1.2-3_amd64.deb` -> `linux-image-X 1.2-3`.
fn package_from_file_name(deb: &Path) -> Option<String> {
    let stem = deb.file_name()?.to_str()?.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (name, version, _arch) = (parts.next()?, parts.next()?, parts.next()?);
    parts
        .next()
        .is_none()
        .then(|| format!("{name} {}", version.replace("%3a", ":")))
}

/// Finds `boot/vmlinuz-<version>`, `boot/config-<version>` and the modules directory
/// in an unpacked kernel package.
fn find_in_root(root: &Path) -> Result<Kernel, KernelError> {
    let boot = root.join("boot");
    let layout = |path: &Path, reason: &str| KernelError::Layout {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .map_err(|source| KernelError::Io(IoError::new(boot.clone(), source)))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    let version = match versions.as_slice() {
        [v] => v.clone(),
        [] => return Err(layout(&boot, "no vmlinuz-* in the package")),
        _ => return Err(layout(&boot, "more than one vmlinuz-* in the package")),
    };
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&version))
        .find(|d| d.is_dir())
        .ok_or_else(|| layout(root, &format!("no lib/modules/{version} in the package")))?;
    let config = boot.join(format!("config-{version}"));
    Ok(Kernel {
        vmlinuz: boot.join(format!("vmlinuz-{version}")),
        config: config.is_file().then_some(config),
        modules_dir,
        version,
        package: None,
    })
}

/// A kernel given as files: the version is the modules directory's name.
fn from_files(kernel: &Path, modules: &Path) -> Result<Kernel, KernelError> {
    if !kernel.is_file() {
        return Err(KernelError::Layout {
            path: kernel.to_path_buf(),
            reason: "kernel image not found".into(),
        });
    }
    if !modules.is_dir() {
        return Err(KernelError::Layout {
            path: modules.to_path_buf(),
            reason: "modules directory not found".into(),
        });
    }
    let version = modules
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "..")
        .ok_or_else(|| KernelError::Layout {
            path: modules.to_path_buf(),
            reason: "modules directory must be named after the kernel version".into(),
        })?
        .to_string();
    let config = [
        modules.join(format!("../../../boot/config-{version}")),
        modules.join("build/.config"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    Ok(Kernel {
        version,
        vmlinuz: kernel.to_path_buf(),
        config,
        modules_dir: modules.to_path_buf(),
        package: None,
    })
}

#[cfg(test)]
mod tests {
    use super::config::{builtin_fragments, check, KernelConfig};
    use super::modules::ModuleIndex;
    use super::*;
    use std::time::Instant;

    #[test]
    fn package_name_from_deb_file_name() {
        assert_eq!(
            package_from_file_name(Path::new("/c/linux-image-x_1%3a6.1-2_amd64.deb")).as_deref(),
            Some("linux-image-x 1:6.1-2")
        );
        assert_eq!(package_from_file_name(Path::new("kernel.deb")), None);
    }

    /// A tiny fake kernel package: vmlinuz, config and one module.
    fn fake_kernel_deb(dir: &Path) -> PathBuf {
        let ko = modules::tests::elf_with_modinfo(b"name=virtio\0depends=\0");
        let tar = deb::tests::tar_of(&[
            ("./boot/vmlinuz-6.9-test", b"MZ kernel"),
            ("./boot/config-6.9-test", b"CONFIG_VIRTIO=y\n"),
            ("./lib/modules/6.9-test/kernel/virtio.ko", &ko),
        ]);
        let deb = deb::tests::ar(&[("debian-binary", b"2.0\n"), ("data.tar", &tar)]);
        let path = dir.join("linux-image-6.9-test_6.9-1_amd64.deb");
        std::fs::write(&path, deb).unwrap();
        path
    }

    #[test]
    fn deb_source_unpacks_once_and_finds_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_kernel_deb(dir.path());
        let cache = dir.path().join("cache");
        let k = prepare(&KernelSource::Deb(deb.clone()), &cache).unwrap();
        assert_eq!(k.version, "6.9-test");
        assert_eq!(std::fs::read(&k.vmlinuz).unwrap(), b"MZ kernel");
        assert!(k.config.as_ref().unwrap().is_file());
        assert!(k.modules_dir.ends_with("lib/modules/6.9-test"));
        assert_eq!(k.package.as_deref(), Some("linux-image-6.9-test 6.9-1"));
        // Only the final directory is left in kernels/: the temp dir was renamed.
        let entries: Vec<_> = std::fs::read_dir(cache.join("kernels")).unwrap().collect();
        assert_eq!(entries.len(), 1);
        // Reused: a marker inside survives a second prepare.
        std::fs::write(k.modules_dir.join("marker"), b"").unwrap();
        let again = prepare(&KernelSource::Deb(deb), &cache).unwrap();
        assert_eq!(again, k);
        assert!(again.modules_dir.join("marker").exists());
        let index = ModuleIndex::scan(&k.modules_dir).unwrap();
        assert_eq!(index.closure(&["virtio"]).unwrap().len(), 1);

        let files = prepare(
            &KernelSource::Files {
                kernel: k.vmlinuz.clone(),
                modules: k.modules_dir.clone(),
            },
            &cache,
        )
        .unwrap();
        assert_eq!(files.version, "6.9-test");
        assert!(files.config.is_some());
        assert!(prepare(
            &KernelSource::Files {
                kernel: dir.path().join("missing"),
                modules: k.modules_dir.clone()
            },
            &cache
        )
        .is_err());
    }

    /// End to end against Debian's archive: CI has apt and network. Downloads the real
    /// cloud kernel into a temp cache, checks module ordering and the base fragment.
    #[test]
    fn debian_default_kernel_end_to_end() {
        if !kimg_util::cmd::exists("apt-get") || !kimg_util::cmd::exists("apt-cache") {
            eprintln!("skipping: apt-get/apt-cache not installed");
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let kernel = prepare(&KernelSource::DebianDefault, cache.path()).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        let again = prepare(&KernelSource::DebianDefault, cache.path()).unwrap();
        let cached = t.elapsed();
        assert_eq!(again, kernel);
        eprintln!(
            "prepare({}): first {first:?}, cached {cached:?}",
            kernel.package.as_deref().unwrap_or("?")
        );
        assert!(kernel.vmlinuz.is_file());
        // An interrupted download (file without its verification marker) is fetched
        // again rather than reused.
        let debs: Vec<PathBuf> = std::fs::read_dir(cache.path().join("debs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let deb = debs
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .unwrap();
        let marker = PathBuf::from(format!("{}.sha256", deb.display()));
        assert!(marker.is_file(), "{debs:?}");
        std::fs::remove_file(&marker).unwrap();
        std::fs::write(deb, b"partial").unwrap();
        assert_eq!(
            prepare(&KernelSource::DebianDefault, cache.path()).unwrap(),
            kernel
        );
        assert!(marker.is_file());

        let t = Instant::now();
        let index = ModuleIndex::scan(&kernel.modules_dir).unwrap();
        eprintln!(
            "scanned {} modules in {:?}",
            index.modules.len(),
            t.elapsed()
        );
        // What `kimg build` loads in stage 1, plus the NIC driver of stage 2.
        let mut wanted = crate::modules::STAGE1_MODULES.to_vec();
        wanted.push("virtio_net");
        let order: Vec<&str> = index
            .closure(&wanted)
            .unwrap()
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        eprintln!("load order: {order:?}");
        let pos = |n: &str| order.iter().position(|m| *m == n);
        if let (Some(ring), Some(virtio), Some(pci)) =
            (pos("virtio_ring"), pos("virtio"), pos("virtio_pci"))
        {
            assert!(ring < virtio && virtio < pci, "{order:?}");
        }
        for m in &order {
            let module = index.get(m).unwrap();
            for d in &module.depends {
                assert!(
                    index.is_builtin(d) || pos(d) < pos(m),
                    "{d} after {m}: {order:?}"
                );
            }
        }
        // modules.dep: one line per module, each listing its dependencies so that every
        // entry comes before (is loaded after) the entries it depends on.
        let dep = index.modules_dep();
        assert_eq!(dep.lines().count(), index.modules.len());
        let lines: std::collections::HashMap<&str, Vec<&str>> = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k, v.split_whitespace().collect()))
            .collect();
        for (module, deps) in &lines {
            for (i, d) in deps.iter().enumerate() {
                for dd in &lines[d] {
                    let j = deps.iter().position(|x| x == dd);
                    assert!(j > Some(i), "{module}: {dd} must follow {d}");
                }
            }
        }
        let pci_line = dep
            .lines()
            .find(|l| l.starts_with("kernel/drivers/virtio/virtio_pci.ko:"));
        eprintln!("{}", pci_line.unwrap_or("virtio_pci is built in"));

        let config = KernelConfig::from_file(kernel.config.as_ref().unwrap()).unwrap();
        for (name, text) in builtin_fragments(kimg_contract::Flavour::K8s) {
            let misses = check(&config, &KernelConfig::parse(text).unwrap());
            assert!(misses.is_empty(), "{name}: {misses:#?}");
        }
    }

    #[test]
    fn missing_apt_is_a_clear_error() {
        let msg = KernelError::NoApt { program: "apt-get" }.to_string();
        assert!(msg.contains("--kernel-deb FILE"), "{msg}");
        assert!(msg.contains("--kernel FILE --modules DIR"), "{msg}");
    }
}
