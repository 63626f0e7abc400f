//! The root filesystem, staged as a directory tree that becomes the ext4 partition.
//!
//! Layout is merged-/usr (`/bin` -> `usr/bin` ...). Contents: busybox and its applet
//! links, kimg-init as `/sbin/init`, the files and binaries of `rootfs/base.toml`
//! (binaries with their shared-library closure), and the kernel's modules with a
//! `modules.dep` for busybox modprobe.

use kimg_contract::manifest::Component;
use kimg_formats::elf;
use kimg_kernel::modules::ModuleIndex;
use kimg_util::fs::{IoError, PathContext};
use serde::Deserialize;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The built-in rootfs manifest.
pub const BASE_TOML: &str = include_str!("../../../rootfs/base.toml");
/// The Kubernetes flavour's rootfs manifest.
pub const K8S_TOML: &str = include_str!("../../../rootfs/k8s.toml");

/// Where busybox, kimg-init and the module lists go.
const BUSYBOX: &str = "usr/bin/busybox";
const INIT: &str = "usr/sbin/kimg-init";
const INIT_LINK: &str = "usr/sbin/init";
/// Host directories searched for the binaries named in a rootfs manifest.
const BIN_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// Merged-/usr links at the top of the tree.
const USR_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];
/// Directories every image has, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/lib", 0o755),
    ("usr/lib64", 0o755),
    ("etc/kimg", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("mnt", 0o755),
    ("var/log", 0o755),
    ("var/lib", 0o755),
    ("var/tmp", 0o1777),
];

/// Errors staging the root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The rootfs manifest is not valid TOML of the expected shape.
    #[error("rootfs manifest {name}: {source}")]
    Manifest {
        /// Which manifest.
        name: String,
        /// Parse error with line and column.
        source: toml::de::Error,
    },
    /// A file entry has a mode that is not an octal number.
    #[error("rootfs manifest: {path}: mode {mode:?} is not octal like \"0644\"")]
    BadMode {
        /// File path in the image.
        path: String,
        /// The mode as written.
        mode: String,
    },
    /// A binary named in the manifest is not on the build host.
    #[error("rootfs: binary `{0}` not found in {dirs} on this host; install it or remove it from the rootfs manifest", dirs = BIN_DIRS.join(", "))]
    MissingBinary(String),
    /// A binary's shared libraries could not be resolved.
    #[error("rootfs: {0}")]
    Elf(#[from] elf::ElfError),
    /// Listing busybox applets failed.
    #[error("rootfs: {0}")]
    Busybox(#[from] kimg_util::cmd::CmdError),
    /// A file could not be written or copied.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A rootfs manifest (`rootfs/*.toml`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RootfsManifest {
    /// Host binaries to copy with their libraries.
    #[serde(default)]
    pub binaries: Vec<String>,
    /// Host directories whose files are all copied like binaries (CNI plugins,
    /// iptables extensions that are loaded with dlopen).
    #[serde(default)]
    pub binary_dirs: Vec<String>,
    /// Files written with inline content.
    #[serde(default, rename = "file")]
    pub files: Vec<FileSpec>,
    /// Symbolic links.
    #[serde(default, rename = "link")]
    pub links: Vec<LinkSpec>,
}

/// One `[[link]]` of a rootfs manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Absolute path of the link in the image.
    pub path: String,
    /// What it points to.
    pub target: String,
}

/// One `[[file]]` of a rootfs manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path in the image.
    pub path: String,
    /// Octal permission bits; default 0644.
    #[serde(default)]
    pub mode: Option<String>,
    /// The file's content.
    pub content: String,
}

impl RootfsManifest {
    /// Parses a manifest; `name` is used in errors.
    pub fn parse(name: &str, text: &str) -> Result<Self, RootfsError> {
        toml::from_str(text).map_err(|source| RootfsError::Manifest {
            name: name.into(),
            source,
        })
    }
}

/// Everything the root filesystem is made from.
pub struct RootfsInputs<'a> {
    /// Static kimg-init binary.
    pub init: &'a Path,
    /// Static busybox binary.
    pub busybox: &'a Path,
    /// The kernel's `lib/modules/<version>` directory.
    pub modules_dir: &'a Path,
    /// Kernel version (`uname -r`).
    pub kernel_version: &'a str,
    /// The parsed module index of `modules_dir`.
    pub modules: &'a ModuleIndex,
    /// Modules kimg-init loads in stage 2, dependency-ordered, relative paths.
    pub stage2_modules: &'a [PathBuf],
    /// Rootfs manifests, applied in order.
    pub manifests: &'a [RootfsManifest],
    /// Content of /etc/os-release.
    pub os_release: &'a str,
    /// Further binaries: (host file, path in the image, version).
    pub extra_binaries: &'a [(PathBuf, String, Option<String>)],
}

/// Stages the root filesystem in `dir` (which must exist and be empty) and returns
/// the components it copied from the host, with their digests.
pub fn stage(dir: &Path, inp: &RootfsInputs) -> Result<Vec<Component>, RootfsError> {
    for (link, target) in USR_LINKS {
        symlink(target, dir.join(link)).with_path(dir.join(link))?;
    }
    for (d, mode) in DIRS {
        mkdir_mode(&dir.join(d), *mode)?;
    }
    let mut components = Vec::new();

    // busybox and its applets; real binaries and kimg-init win over applets.
    copy_file(inp.busybox, &dir.join(BUSYBOX), 0o755)?;
    components.push(component(
        "busybox",
        inp.busybox,
        BUSYBOX,
        busybox_version(inp.busybox),
    )?);
    let applets = kimg_util::cmd::run_stdout(Command::new(inp.busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let Some(rel) = usr_path(applet) else {
            continue;
        };
        if rel == INIT_LINK {
            continue;
        }
        let link = dir.join(&rel);
        if link.symlink_metadata().is_err() {
            symlink("/usr/bin/busybox", &link).with_path(&link)?;
        }
    }

    copy_file(inp.init, &dir.join(INIT), 0o755)?;
    components.push(component(
        "kimg-init",
        inp.init,
        INIT,
        Some(env!("CARGO_PKG_VERSION").into()),
    )?);
    replace_with_symlink(&dir.join(INIT_LINK), "kimg-init")?;

    for m in inp.manifests {
        let mut bins = Vec::new();
        for name in &m.binaries {
            let host = find_binary(name).ok_or_else(|| RootfsError::MissingBinary(name.clone()))?;
            bins.push((host.clone(), host.to_string_lossy().into_owned(), None));
        }
        for d in &m.binary_dirs {
            let dir_path = Path::new(d);
            let mut files: Vec<PathBuf> = fs::read_dir(dir_path)
                .with_path(dir_path)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            bins.extend(
                files
                    .into_iter()
                    .map(|f| (f.clone(), f.to_string_lossy().into_owned(), None)),
            );
        }
        package_versions(&mut bins);
        stage_binaries(dir, &bins, &mut components)?;
        for l in &m.links {
            let link = dir.join(l.path.trim_start_matches('/'));
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).with_path(parent)?;
            }
            replace_with_symlink(&link, &l.target)?;
        }
        for f in &m.files {
            let mode = parse_mode(f)?;
            let dest = dir.join(f.path.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).with_path(parent)?;
            }
            let _ = fs::remove_file(&dest);
            fs::write(&dest, &f.content).with_path(&dest)?;
            set_mode(&dest, mode)?;
        }
    }
    stage_binaries(dir, inp.extra_binaries, &mut components)?;
    write(dir, "etc/os-release", inp.os_release, 0o644)?;

    stage_modules(dir, inp)?;
    Ok(components)
}

/// Copies the kernel's modules and writes modules.dep and kimg-init's stage-2 list.
fn stage_modules(dir: &Path, inp: &RootfsInputs) -> Result<(), RootfsError> {
    let dest = dir.join("usr/lib/modules").join(inp.kernel_version);
    copy_tree(&inp.modules_dir.join("kernel"), &dest.join("kernel"))?;
    for meta in [
        "modules.builtin",
        "modules.order",
        "modules.builtin.modinfo",
    ] {
        let src = inp.modules_dir.join(meta);
        if src.exists() {
            copy_file(&src, &dest.join(meta), 0o644)?;
        }
    }
    write(&dest, "modules.dep", &inp.modules.modules_dep(), 0o644)?;
    write(&dest, "modules.alias", &inp.modules.modules_alias(), 0o644)?;
    let list = kimg_contract::boot::modules_load_text(
        inp.stage2_modules.iter().map(|m| m.to_string_lossy()),
    );
    write(
        dir,
        kimg_contract::boot::in_tree(kimg_contract::boot::MODULES_LOAD),
        &list,
        0o644,
    )
}

/// Copies binaries (host file, image path, version) and the shared libraries they
/// need (libraries go to the path they were found at).
fn stage_binaries(
    dir: &Path,
    bins: &[(PathBuf, String, Option<String>)],
    out: &mut Vec<Component>,
) -> Result<(), RootfsError> {
    // Only ELF files have libraries; data files in binary_dirs are copied as they are.
    let elves: Vec<PathBuf> = bins
        .iter()
        .filter(|(h, _, _)| matches!(elf::elf_kind(h), Ok(elf::ElfKind::Dynamic)))
        .map(|(h, _, _)| h.clone())
        .collect();
    let libs = elf::library_closure(&elves)?;
    let lib_entries = libs
        .iter()
        .map(|l| (l.clone(), l.to_string_lossy().into_owned(), None));
    for (host, image_path, version) in bins.iter().cloned().chain(lib_entries) {
        let rel = image_path.trim_start_matches('/');
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_path(parent)?;
        }
        let _ = fs::remove_file(&dest);
        fs::copy(&host, &dest).with_path(&host)?;
        let name = Path::new(rel)
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.push(component(&name, &host, rel, version)?);
    }
    Ok(())
}

/// Fills in the Debian package version of each binary that dpkg knows (one
/// `dpkg-query` call for all); binaries outside any package keep `None`.
fn package_versions(bins: &mut [(PathBuf, String, Option<String>)]) {
    if bins.is_empty() || !kimg_util::cmd::exists("dpkg-query") {
        return;
    }
    // dpkg knows the paths it installed: try the canonical path too (merged /usr).
    let mut q = kimg_util::cmd::command("dpkg-query");
    q.arg("-S");
    for (h, _, _) in bins.iter() {
        q.arg(h);
        if let Ok(c) = fs::canonicalize(h) {
            q.arg(c);
        }
    }
    // Exit status 1 only means some paths belong to no package.
    let Ok(out) = q.stdin(std::process::Stdio::null()).output() else {
        return;
    };
    let owners = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut pkg_of = std::collections::BTreeMap::new();
    for line in owners.lines() {
        if let Some((pkgs, path)) = line.split_once(": ") {
            let pkg = pkgs
                .split(", ")
                .next()
                .unwrap_or(pkgs)
                .split(':')
                .next()
                .unwrap_or(pkgs);
            pkg_of.insert(PathBuf::from(path), pkg.to_string());
        }
    }
    let pkgs: std::collections::BTreeSet<&String> = pkg_of.values().collect();
    let mut w = kimg_util::cmd::command("dpkg-query");
    w.args(["-W", "-f", "${Package} ${Version}\n"]).args(pkgs);
    let Ok(versions) = kimg_util::cmd::run_stdout(&mut w) else {
        return;
    };
    let version_of: std::collections::BTreeMap<&str, &str> =
        versions.lines().filter_map(|l| l.split_once(' ')).collect();
    for (h, _, v) in bins.iter_mut() {
        let pkg = pkg_of
            .get(h.as_path())
            .or_else(|| fs::canonicalize(&*h).ok().and_then(|c| pkg_of.get(&c)));
        if let Some(ver) = pkg.and_then(|p| version_of.get(p.as_str())) {
            *v = Some(format!("{} {ver}", pkg.map_or("", String::as_str)));
        }
    }
}

/// The shared libraries every image has: the closure of `rootfs/base.toml`'s binaries
/// on this host (where `kimg build` takes them from), as host paths.
pub fn base_libraries() -> Result<Vec<PathBuf>, RootfsError> {
    let m = RootfsManifest::parse("base.toml", BASE_TOML)?;
    let bins = m
        .binaries
        .iter()
        .map(|b| find_binary(b).ok_or_else(|| RootfsError::MissingBinary(b.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(elf::library_closure(&bins)?)
}

fn find_binary(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    BIN_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Maps a busybox applet path (`bin/ls`, `sbin/ip`, `usr/bin/env`) to its place in
/// the merged-/usr tree; `None` for paths outside the bin dirs (`linuxrc`).
fn usr_path(applet: &str) -> Option<String> {
    let (dir, name) = applet.rsplit_once('/')?;
    let dir = match dir {
        "bin" | "usr/bin" => "usr/bin",
        "sbin" | "usr/sbin" => "usr/sbin",
        _ => return None,
    };
    Some(format!("{dir}/{name}"))
}

fn busybox_version(busybox: &Path) -> Option<String> {
    let out = Command::new(busybox).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    first
        .split_whitespace()
        .nth(1)
        .map(|v| v.trim_start_matches('v').to_string())
}

fn component(
    name: &str,
    host: &Path,
    image_path: &str,
    version: Option<String>,
) -> Result<Component, RootfsError> {
    let path = format!("/{}", image_path.trim_start_matches('/'));
    Ok(kimg_util::hash::component(name, host, path, version).with_path(host)?)
}

fn parse_mode(f: &FileSpec) -> Result<u32, RootfsError> {
    match &f.mode {
        None => Ok(0o644),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| RootfsError::BadMode {
                path: f.path.clone(),
                mode: m.clone(),
            }),
    }
}

fn write(dir: &Path, rel: &str, content: &str, mode: u32) -> Result<(), RootfsError> {
    let dest = dir.join(rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_path(parent)?;
    }
    fs::write(&dest, content).with_path(&dest)?;
    set_mode(&dest, mode)
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<(), RootfsError> {
    fs::create_dir_all(path).with_path(path)?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), RootfsError> {
    Ok(fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_path(path)?)
}

fn copy_file(src: &Path, dest: &Path, mode: u32) -> Result<(), RootfsError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_path(parent)?;
    }
    fs::copy(src, dest).with_path(src)?;
    set_mode(dest, mode)
}

fn replace_with_symlink(link: &Path, target: &str) -> Result<(), RootfsError> {
    let _ = fs::remove_file(link);
    Ok(symlink(target, link).with_path(link)?)
}

/// Copies a directory tree of regular files and directories; hard links when the
/// source is on the same filesystem (the kernel cache), else copies.
fn copy_tree(src: &Path, dest: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(dest).with_path(dest)?;
    for entry in fs::read_dir(src).with_path(src)? {
        let entry = entry.with_path(src)?;
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let ty = entry.file_type().with_path(&from)?;
        if ty.is_dir() {
            copy_tree(&from, &to)?;
        } else if ty.is_file() && fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).with_path(&from)?;
        }
    }
    Ok(())
}

/// Sets every entry's mtime and atime under `dir` (links not followed) to `mtime`,
/// so the filesystem built from it does not depend on when it was staged.
pub fn set_times(dir: &Path, mtime: i64) -> Result<(), RootfsError> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(mtime, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_path(&d)? {
            let entry = entry.with_path(&d)?;
            let p = entry.path();
            if entry.file_type().with_path(&p)?.is_dir() {
                stack.push(p.clone());
            }
            utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| RootfsError::Io(IoError::new(p.clone(), e.into())))?;
        }
    }
    utimensat(
        nix::fcntl::AT_FDCWD,
        dir,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| RootfsError::Io(IoError::new(dir.to_path_buf(), e.into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_contract::service::{start_order, ServiceSpec};
    use kimg_contract::{Role, VmId};

    #[test]
    fn base_manifest_parses_and_has_the_etc_skeleton() {
        let m = RootfsManifest::parse("base.toml", BASE_TOML).unwrap();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        for p in ["/etc/passwd", "/etc/group", "/etc/hosts"] {
            assert!(paths.contains(&p), "{p} missing");
        }
        let passwd = &m
            .files
            .iter()
            .find(|f| f.path == "/etc/passwd")
            .unwrap()
            .content;
        assert!(passwd.starts_with("root:x:0:0:"), "{passwd:?}");
    }

    #[test]
    fn k8s_manifest_parses_and_its_services_are_valid() {
        let m = RootfsManifest::parse("k8s.toml", K8S_TOML).unwrap();
        assert!(m.binaries.iter().any(|b| b == "containerd"));
        let services: Vec<_> = m
            .files
            .iter()
            .filter(|f| f.path.starts_with("/etc/kimg/services/"))
            .collect();
        assert!(services.len() >= 3);
        let all: Vec<ServiceSpec> = services
            .iter()
            .map(|f| {
                let stem = Path::new(&f.path).file_stem().unwrap().to_string_lossy();
                ServiceSpec::parse(&stem, &f.content).unwrap_or_else(|e| panic!("{}: {e}", f.path))
            })
            .collect();
        // On each role's VM: every `after` known, no cycle; what talks to the
        // apiserver starts behind the VM's one wait for its /readyz, which on vm-001
        // starts once the apiserver listens.
        for vm in [1, 2, 201] {
            let vm = VmId::new(vm).unwrap();
            let here: Vec<usize> = (0..all.len()).filter(|&i| all[i].runs_on(vm)).collect();
            let order = start_order(&all, &here).unwrap_or_else(|e| panic!("{vm}: {e}"));
            let pos = |name: &str| order.iter().position(|&i| all[i].name == name);
            let clients = [
                "kubelet",
                "kube-proxy",
                "kube-controller-manager",
                "kube-scheduler",
                "dns-records",
            ];
            for c in clients.iter().filter(|c| pos(c).is_some()) {
                let spec = all.iter().find(|s| s.name == *c).unwrap();
                assert!(spec.after.contains(&"apiserver-ready".to_string()), "{c}");
                assert!(pos("apiserver-ready") < pos(c), "{vm}: {c}");
            }
            match vm.role() {
                Role::Node => assert!(pos("kubelet").is_some() && pos("kube-proxy").is_some()),
                _ => assert_eq!(pos("apiserver-ready"), None, "{vm}"),
            }
            if vm.number() == 1 {
                assert!(pos("kube-apiserver").is_some());
                assert!(pos("kube-apiserver") < pos("apiserver-ready"));
            }
        }
    }

    #[test]
    fn manifest_errors_are_specific() {
        let err = RootfsManifest::parse("x.toml", "binaries = [1]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml"), "{err}");
        let err = RootfsManifest::parse("x.toml", "bogus = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let f = FileSpec {
            path: "/a".into(),
            mode: Some("0999".into()),
            content: String::new(),
        };
        assert!(parse_mode(&f).unwrap_err().to_string().contains("0999"));
        let f = FileSpec {
            path: "/a".into(),
            mode: Some("4755".into()),
            content: String::new(),
        };
        assert_eq!(parse_mode(&f).unwrap(), 0o4755);
    }

    #[test]
    fn applets_map_into_merged_usr() {
        assert_eq!(usr_path("bin/ls").as_deref(), Some("usr/bin/ls"));
        assert_eq!(
            usr_path("sbin/ifconfig").as_deref(),
            Some("usr/sbin/ifconfig")
        );
        assert_eq!(usr_path("usr/bin/env").as_deref(), Some("usr/bin/env"));
        assert_eq!(usr_path("linuxrc"), None);
    }
}
