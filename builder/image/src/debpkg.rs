//! Overlays from Debian packages: `deb:PKG[,PKG...]` wherever an overlay is named
//! (`kimg run ... deb:tcpdump,iperf3`, `kimg mkcdrom ... deb:nftables`).
//!
//! The packages come from the host's apt (`apt-get download` into kimg's cache, each
//! `.deb` checked against the SHA256 `apt-cache show` gives, see
//! [`kimg_kernel::apt::download_package`]). The overlay holds the named packages'
//! files (their `data.tar`, without docs and man pages, moved into the image's
//! merged /usr) plus the ELF shared-library closure of their binaries that the image
//! lacks: the libraries of `rootfs/base.toml`'s binaries are left out; every other one
//! comes from the host when installed there, else from the package's dependencies,
//! downloaded too (only those the host has not installed). Maintainer scripts are not
//! run: alternatives and files they would generate are missing; the system users
//! they add (`adduser --system`) are added at boot by a start hook the overlay
//! carries (`/etc/kimg/start.d/50-deb-user-NAME`).
//! Modes are normalized (0755 if any x bit, else 0644; no setuid), mtimes are 0,
//! entries sorted: the same packages on the same host give the same bytes. The
//! `.tar.zst` is cached under a key of the packages' sha256s and the host's dpkg
//! database, so a second `kimg run` with the same `deb:` only asks apt for versions.

use crate::overlay::{Overlay, Source};
use kimg_formats::elf;
use kimg_kernel::apt::Download;
use kimg_util::cmd;
use kimg_util::fs::{IoError, PathContext};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The overlay argument prefix: `deb:PKG[,PKG...]`.
pub const PREFIX: &str = "deb:";
/// Cache subdirectory of the built overlays (the `.deb` files go to `debs/`).
pub const CACHE_SUBDIR: &str = "deb-overlays";
/// The host's dpkg database: what is installed (part of the cache key).
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";
/// Dependencies followed at most (a package pulling in more is not a tool).
pub const MAX_PACKAGES: usize = 100;
/// Package paths left out of the overlay (documentation).
const SKIPPED: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/bug",
];
/// Top-level directories that are symlinks into /usr in the image (merged /usr).
const MERGED: &[&str] = &["bin", "sbin", "lib", "lib64", "lib32", "libx32"];
/// Directories searched for the libraries of unpacked dependency packages.
const LIB_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "lib/x86_64-linux-gnu",
    "usr/lib",
    "lib",
];
/// Bump when the overlay's layout changes, so cached overlays are rebuilt.
const FORMAT: &str = "kimg deb overlay 1";

/// Making an overlay from Debian packages failed.
#[derive(Debug, thiserror::Error)]
pub enum DebOverlayError {
    /// The argument is not `deb:PKG[,PKG...]` with Debian package names.
    #[error(
        "overlay {0:?}: use deb:PKG[,PKG...] with Debian package names (e.g. deb:tcpdump,iperf3)"
    )]
    BadArg(String),
    /// apt is missing.
    #[error("deb: overlays need `{0}` (a Debian or Ubuntu host)")]
    NoApt(&'static str),
    /// A package is unknown to apt, or its dependencies could not be followed.
    #[error("deb:{package}: {why}")]
    Package {
        /// The package.
        package: String,
        /// What went wrong and what to do.
        why: String,
    },
    /// Downloading or unpacking a package failed.
    #[error("deb:{package}: {source}")]
    Download {
        /// The package.
        package: String,
        /// Why.
        source: Box<kimg_kernel::KernelError>,
    },
    /// An apt or dpkg command failed.
    #[error(transparent)]
    Cmd(#[from] cmd::CmdError),
    /// A library of a package's binary was found nowhere.
    #[error("{0} (add the package that has it: deb:PKG,LIBPKG)")]
    Elf(#[from] elf::ElfError),
    /// The libraries of the image could not be listed.
    #[error("the image's libraries: {0}")]
    Rootfs(#[from] Box<crate::rootfs::RootfsError>),
    /// Reading or writing files failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The package names of `deb:PKG[,PKG...]`; `None` when `arg` is no `deb:` overlay.
pub fn packages(arg: &str) -> Option<Result<Vec<String>, DebOverlayError>> {
    let list = arg.strip_prefix(PREFIX)?;
    let pkgs: Vec<String> = list.split(',').map(str::to_string).collect();
    let valid = |p: &String| {
        p.len() >= 2
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    };
    if pkgs.is_empty() || !pkgs.iter().all(valid) {
        return Some(Err(DebOverlayError::BadArg(arg.to_string())));
    }
    Some(Ok(pkgs))
}

/// The overlay's name: `deb-PKG-PKG...` (shortened for many packages).
pub fn overlay_name(pkgs: &[String]) -> String {
    let joined = format!("deb-{}", pkgs.join("-"));
    if joined.len() <= 48 {
        joined
    } else {
        format!("deb-{}-and-{}-more", pkgs[0], pkgs.len() - 1)
    }
}

/// Makes (or takes from the cache) the overlay of `deb:PKG,...` in `arg`.
pub fn overlay(arg: &str, cache: &Path) -> Result<Overlay, DebOverlayError> {
    let pkgs = packages(arg).unwrap_or_else(|| Err(DebOverlayError::BadArg(arg.into())))?;
    for program in ["apt-get", "apt-cache", "dpkg-query"] {
        if !cmd::exists(program) {
            return Err(DebOverlayError::NoApt(program));
        }
    }
    let deps = missing_dependencies(&pkgs)?;
    let records = candidates(pkgs.iter().chain(&deps))?;
    let download = |p: &String| {
        let (version, record) = records.get(p).ok_or_else(|| DebOverlayError::Package {
            package: p.clone(),
            why: "apt has no candidate version (apt-get update? a typo? `apt-cache search WORD`)"
                .into(),
        })?;
        kimg_kernel::apt::download_record(cache, p, version, record).map_err(|e| {
            DebOverlayError::Download {
                package: p.clone(),
                source: Box::new(e),
            }
        })
    };
    let named: Vec<Download> = pkgs.iter().map(download).collect::<Result<_, _>>()?;
    let dep_debs: Vec<Download> = deps.iter().map(download).collect::<Result<_, _>>()?;
    let base = crate::rootfs::base_libraries().map_err(Box::new)?;
    let name = overlay_name(&pkgs);
    let key = cache_key(&named, &dep_debs, &base);
    let debs = |d: &[Download]| d.iter().map(|d| d.deb.clone()).collect::<Vec<_>>();
    let (named, dep_debs) = (debs(&named), debs(&dep_debs));
    let dir = cache.join(CACHE_SUBDIR);
    fs::create_dir_all(&dir).with_path(&dir)?;
    let out = dir.join(format!("{name}-{}.tar.zst", &key[..16]));
    if !out.is_file() {
        build_archive(&named, &dep_debs, &base, &out)?;
    }
    Ok(Overlay {
        name,
        source: Source::Archive(out, ".tar.zst"),
        requires: Vec::new(),
    })
}

/// The cache key: kimg's overlay format, every package's name, version and sha256,
/// the image's libraries and the host's dpkg database (host libraries go into the
/// overlay too).
fn cache_key(named: &[Download], deps: &[Download], base: &[PathBuf]) -> String {
    let mut text = format!("{FORMAT}\n");
    for (kind, debs) in [("named", named), ("dep", deps)] {
        for d in debs {
            text.push_str(&format!("{kind} {} {}\n", d.package, d.sha256));
        }
    }
    for b in base {
        text.push_str(&format!("base {}\n", b.display()));
    }
    if let Ok(m) = fs::metadata(DPKG_STATUS) {
        text.push_str(&format!("dpkg {} {}\n", m.len(), m.mtime()));
    }
    kimg_util::hash::sha256(text.as_bytes())
}

/// The dependencies (Depends, Pre-Depends; recursively) of `pkgs` that the host has
/// not installed, in the order found. An installed package's own dependencies are
/// installed too, so the walk stops there. One `apt-cache depends --recurse` for all
/// (each apt-cache call loads apt's whole cache: seconds on a loaded machine).
pub fn missing_dependencies(pkgs: &[String]) -> Result<Vec<String>, DebOverlayError> {
    let mut c = cmd::command("apt-cache");
    c.args([
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ])
    .args(pkgs);
    let text = cmd::run_stdout(&mut c).map_err(|e| DebOverlayError::Package {
        package: pkgs.join(","),
        why: format!(
            "{e}\n(is it a Debian package name? `apt-cache search WORD`; after adding \
             sources, `apt-get update`)"
        ),
    })?;
    let graph = parse_depends(&text);
    let names: BTreeSet<&String> = graph.values().flatten().flatten().collect();
    let installed = installed(names.into_iter())?;
    let missing = walk(pkgs, &graph, &installed);
    if missing.len() >= MAX_PACKAGES {
        return Err(DebOverlayError::Package {
            package: pkgs.join(","),
            why: format!(
                "needs {MAX_PACKAGES} or more packages this host has not installed ({}, ...); \
                 install the big ones on the host, or make an overlay folder",
                missing[..10].join(", ")
            ),
        });
    }
    Ok(missing)
}

/// The packages reachable from `pkgs` through dependency groups that no installed
/// package satisfies (taking each group's first choice), in the order found, at most
/// [`MAX_PACKAGES`].
pub fn walk(
    pkgs: &[String],
    graph: &BTreeMap<String, Vec<Vec<String>>>,
    installed: &BTreeSet<String>,
) -> Vec<String> {
    let mut seen: BTreeSet<&String> = pkgs.iter().collect();
    let mut queue: VecDeque<&String> = pkgs.iter().collect();
    let mut out = Vec::new();
    while let Some(p) = queue.pop_front() {
        for g in graph.get(p).into_iter().flatten() {
            if g.iter().any(|d| installed.contains(d)) {
                continue;
            }
            if let Some(first) = g.first() {
                if out.len() < MAX_PACKAGES && seen.insert(first) {
                    out.push(first.clone());
                    queue.push_back(first);
                }
            }
        }
    }
    out
}

/// Each package's dependency groups in `apt-cache depends` output; a group is a list
/// of alternatives (a virtual package stands for the packages listed under it).
pub fn parse_depends(text: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut graph: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut group: Vec<String> = Vec::new();
    let mut in_virtual = false;
    let mut closed = true;
    let mut flush = |current: &Option<String>, group: &mut Vec<String>| {
        if let (Some(c), false) = (current, group.is_empty()) {
            graph
                .entry(c.clone())
                .or_default()
                .push(std::mem::take(group));
        }
        group.clear();
    };
    for line in text.lines() {
        if !line.starts_with(' ') {
            flush(&current, &mut group);
            closed = true;
            let name = line.trim();
            // Virtual packages head sections of their own in --recurse output.
            current = (!name.starts_with('<')).then(|| strip_arch(name));
            continue;
        }
        let t = line.trim_start();
        let alternative = t.starts_with('|');
        let t = t.trim_start_matches('|');
        if let Some(dep) = t
            .strip_prefix("Depends:")
            .or_else(|| t.strip_prefix("PreDepends:"))
        {
            if closed {
                flush(&current, &mut group);
            }
            let dep = dep.trim();
            in_virtual = dep.starts_with('<');
            if !in_virtual {
                group.push(strip_arch(dep));
            }
            closed = !alternative;
        } else if t.contains(':') {
            in_virtual = false; // another relation kind
        } else if in_virtual && line.starts_with("    ") {
            group.push(strip_arch(t.trim()));
        }
    }
    flush(&current, &mut group);
    graph
}

/// The candidate version and `apt-cache show` record of each package, from one call.
fn candidates<'a>(
    pkgs: impl Iterator<Item = &'a String>,
) -> Result<BTreeMap<String, (String, String)>, DebOverlayError> {
    let mut c = cmd::command("apt-cache");
    c.args(["show", "--no-all-versions"]).args(pkgs);
    let text = cmd::run_stdout(&mut c)?;
    let mut out = BTreeMap::new();
    for record in text.split("\n\n") {
        let field = |f| kimg_kernel::apt::field(record, f);
        if let (Some(p), Some(v)) = (field("Package"), field("Version")) {
            out.entry(p).or_insert((v, record.to_string()));
        }
    }
    Ok(out)
}

fn strip_arch(p: &str) -> String {
    p.split(':').next().unwrap_or(p).to_string()
}

/// Which of `names` dpkg says are installed (`ii`).
fn installed<'a>(
    names: impl Iterator<Item = &'a String>,
) -> Result<BTreeSet<String>, DebOverlayError> {
    let mut c = cmd::command("dpkg-query");
    c.args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(names)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    // Exit status 1 only means some names are not known to dpkg.
    let out = c.output().map_err(|e| cmd::spawn_error(&c, e))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, s)| s.starts_with("ii"))
        .map(|(p, _)| strip_arch(p))
        .collect())
}

/// Writes the overlay of the `named` packages (with libraries from the host or the
/// `deps` packages, none of those in `base`) to `out` as a deterministic `.tar.zst`.
pub fn build_archive(
    named: &[PathBuf],
    deps: &[PathBuf],
    base: &[PathBuf],
    out: &Path,
) -> Result<(), DebOverlayError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".deb-overlay-")
        .tempdir_in(parent)
        .with_path(parent)?;
    let root = tmp.path().join("root");
    fs::create_dir(&root).with_path(&root)?;
    let unpack_into = |deb: &Path, dest: &Path| {
        kimg_kernel::deb::unpack_data(deb, dest).map_err(|e| DebOverlayError::Download {
            package: deb.display().to_string(),
            source: Box::new(e.into()),
        })
    };
    for (i, deb) in named.iter().enumerate() {
        let dest = tmp.path().join(format!("pkg{i}"));
        unpack_into(deb, &dest)?;
        merge(&dest, &root)?;
    }
    let mut dep_dirs = Vec::new();
    for (i, deb) in deps.iter().enumerate() {
        let dest = tmp.path().join(format!("dep{i}"));
        unpack_into(deb, &dest)?;
        dep_dirs.extend(LIB_DIRS.iter().map(|d| dest.join(d)).filter(|d| d.is_dir()));
    }
    add_libraries(&root, tmp.path(), &dep_dirs, base)?;
    let mut users = Vec::new();
    for deb in named {
        for u in system_users(deb) {
            if !users.contains(&u) {
                users.push(u);
            }
        }
    }
    // One hook per user: two deb: overlays adding the same user write the same file.
    for u in &users {
        let dir = root.join(kimg_contract::cdrom::START_DIR.trim_start_matches('/'));
        fs::create_dir_all(&dir).with_path(&dir)?;
        let hook = dir.join(format!("50-deb-user-{u}"));
        fs::write(&hook, users_hook(std::slice::from_ref(u))).with_path(&hook)?;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).with_path(&hook)?;
    }
    normalize_modes(&root)?;
    let part = tmp.path().join("overlay.tar.zst");
    let file = fs::File::create(&part).with_path(&part)?;
    let write = || -> std::io::Result<()> {
        let mut z = zstd::Encoder::new(file, 9)?;
        crate::overlay::write_tree_tar(&root, &mut z, Some(0))?;
        z.finish()?.sync_all()
    };
    write().with_path(&part)?;
    Ok(kimg_util::fs::rename(&part, out)?)
}

/// The system users `deb`'s postinst would add (`adduser --system ... NAME`): tools
/// such as tcpdump drop privileges to them and fail without. Nothing when dpkg-deb is
/// missing or the package has no postinst.
fn system_users(deb: &Path) -> Vec<String> {
    let out = cmd::command("dpkg-deb")
        .arg("-I")
        .arg(deb)
        .arg("postinst")
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => parse_system_users(&String::from_utf8_lossy(&o.stdout)),
        _ => Vec::new(),
    }
}

/// The NAME of every `adduser --system ... NAME` in a shell script (continuation
/// lines joined); names with shell expansions are skipped.
pub fn parse_system_users(script: &str) -> Vec<String> {
    let joined = script.replace("\\\n", " ");
    let mut users = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "adduser") else {
            continue;
        };
        let cmd: Vec<&str> = words[i..]
            .iter()
            .take_while(|w| !matches!(**w, ";" | "||" | "&&" | "|" | "fi" | "then"))
            .copied()
            .collect();
        if !cmd.contains(&"--system") {
            continue;
        }
        let Some(name) = cmd.last().map(|n| n.trim_matches(['"', '\''])) else {
            continue;
        };
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
        if valid && !users.iter().any(|u| u == name) {
            users.push(name.to_string());
        }
    }
    users
}

/// The start hook that adds `users` (and a group of each name) at boot when missing,
/// with the first free ids from 100: busybox has no adduser in the image.
pub fn users_hook(users: &[String]) -> String {
    format!(
        r#"#!/bin/sh
# Made by kimg's deb: overlay: the system users the packages' maintainer scripts
# would add (maintainer scripts are not run).
free() {{ n=100; while cut -d: -f3 "$1" | grep -qx "$n"; do n=$((n+1)); done; echo $n; }}
for u in {}; do
  grep -q "^$u:" /etc/group || echo "$u:x:$(free /etc/group):" >> /etc/group
  gid=$(grep "^$u:" /etc/group | cut -d: -f3)
  grep -q "^$u:" /etc/passwd ||
    echo "$u:x:$(free /etc/passwd):$gid::/nonexistent:/usr/sbin/nologin" >> /etc/passwd
done
"#,
        users.join(" ")
    )
}

/// A package path in the image's merged /usr: `bin/x` -> `usr/bin/x`; `None` for
/// documentation that stays out.
pub fn image_path(rel: &Path) -> Option<PathBuf> {
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?.to_string();
    let rel = if MERGED.contains(&first.as_str()) {
        Path::new("usr").join(rel)
    } else {
        rel.to_path_buf()
    };
    if SKIPPED.iter().any(|s| rel.starts_with(s)) {
        return None;
    }
    Some(rel)
}

/// Moves an unpacked package tree into `root`, in the image's layout.
fn merge(from: &Path, root: &Path) -> Result<(), IoError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = from.join(&rel);
        for e in fs::read_dir(&dir).with_path(&dir)? {
            let e = e.with_path(&dir)?;
            let r = rel.join(e.file_name());
            let src = e.path();
            let ty = e.file_type().with_path(&src)?;
            let Some(dest_rel) = image_path(&r) else {
                continue;
            };
            let dest = root.join(&dest_rel);
            if ty.is_dir() {
                fs::create_dir_all(&dest).with_path(&dest)?;
                stack.push(r);
                continue;
            }
            if let Some(p) = dest.parent() {
                fs::create_dir_all(p).with_path(p)?;
            }
            // A later package wins, as dpkg would refuse; an overlay has no owner.
            let _ = fs::remove_file(&dest);
            fs::rename(&src, &dest).with_path(&src)?;
        }
    }
    Ok(())
}

/// Adds every library the ELF files under `root` need that is neither in `root` nor in
/// `base`: from `dep_dirs` (unpacked dependencies under `tmp`) or from the host.
fn add_libraries(
    root: &Path,
    tmp: &Path,
    dep_dirs: &[PathBuf],
    base: &[PathBuf],
) -> Result<(), DebOverlayError> {
    let elves = dynamic_elves(root)?;
    // The packages' own library dirs first: the image's ld.so searches them too.
    let dirs: Vec<PathBuf> = LIB_DIRS
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.is_dir())
        .chain(dep_dirs.iter().cloned())
        .collect();
    let libs = elf::library_closure_in(&elves, &dirs)?;
    let in_image: BTreeSet<PathBuf> = base
        .iter()
        .filter_map(|b| image_path(b.strip_prefix("/").unwrap_or(b)))
        .collect();
    for lib in libs {
        if lib.starts_with(root) {
            continue;
        }
        // A dependency's library keeps its path in the package; a host one its path.
        let rel = match dep_dirs.iter().find(|d| lib.starts_with(d)) {
            Some(_) => lib
                .strip_prefix(tmp)
                .ok()
                .and_then(|r| r.components().next().map(|c| (r, c)))
                .and_then(|(r, c)| r.strip_prefix(c.as_os_str()).ok())
                .map(Path::to_path_buf),
            None => lib.strip_prefix("/").ok().map(Path::to_path_buf),
        };
        let Some(rel) = rel.and_then(|r| image_path(&r)) else {
            continue;
        };
        if in_image.contains(&rel) {
            continue;
        }
        let dest = root.join(&rel);
        if dest.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p).with_path(p)?;
        }
        fs::copy(&lib, &dest).with_path(&lib)?;
    }
    Ok(())
}

/// The dynamically linked x86-64 ELF files under `root`, sorted.
fn dynamic_elves(root: &Path) -> Result<Vec<PathBuf>, DebOverlayError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_path(&dir)? {
            let p = e.with_path(&dir)?.path();
            let md = fs::symlink_metadata(&p).with_path(&p)?;
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && matches!(elf::elf_kind(&p), Ok(elf::ElfKind::Dynamic)) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// 0755 for directories and files with any x bit, 0644 for other files: the bytes
/// must not depend on the umask, and no setuid bit comes from a package.
fn normalize_modes(root: &Path) -> Result<(), IoError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).with_path(&dir)?;
        for e in fs::read_dir(&dir).with_path(&dir)? {
            let p = e.with_path(&dir)?.path();
            let md = fs::symlink_metadata(&p).with_path(&p)?;
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let mode = if md.mode() & 0o111 != 0 { 0o755 } else { 0o644 };
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).with_path(&p)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn arguments_name_debian_packages() {
        assert!(packages("tcpdump").is_none());
        assert_eq!(
            packages("deb:tcpdump,iperf3").unwrap().unwrap(),
            ["tcpdump", "iperf3"]
        );
        assert_eq!(packages("deb:libstdc++6").unwrap().unwrap(), ["libstdc++6"]);
        for bad in ["deb:", "deb:a,,b", "deb:../x", "deb:Tcpdump", "deb:x y"] {
            let e = packages(bad).unwrap().unwrap_err();
            assert!(e.to_string().contains("deb:PKG"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..20).map(|i| format!("package{i}")).collect();
        assert_eq!(overlay_name(&many), "deb-package0-and-19-more");
        assert_eq!(overlay_name(&["a1".into(), "b2".into()]), "deb-a1-b2");
    }

    #[test]
    fn dependencies_the_host_lacks_from_depends_output() {
        let text = "iperf3\n  PreDepends: init-system-helpers\n  Depends: debconf\n  Depends: libc6:any\n |Depends: debconf\n  Depends: <debconf-2.0>\n    cdebconf\n    debconf\n  Depends: libiperf0\n  Breaks: x\nlibiperf0\n  Depends: libsctp1\n  Depends: libc6\n<debconf-2.0>\n    debconf\nlibsctp1\n  Depends: libc6\n |Depends: libfoo\n  Depends: libbar\n";
        let graph = parse_depends(text);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            graph["iperf3"],
            vec![
                s(&["init-system-helpers"]),
                s(&["debconf"]),
                s(&["libc6"]),
                s(&["debconf", "cdebconf", "debconf"]),
                s(&["libiperf0"]),
            ]
        );
        assert_eq!(graph["libiperf0"], vec![s(&["libsctp1"]), s(&["libc6"])]);
        assert_eq!(
            graph["libsctp1"],
            vec![s(&["libc6"]), s(&["libfoo", "libbar"])]
        );
        assert_eq!(graph.len(), 3, "no virtual sections: {graph:?}");
        let installed: BTreeSet<String> = ["libc6", "debconf", "init-system-helpers"]
            .map(String::from)
            .into();
        assert_eq!(
            walk(&s(&["iperf3"]), &graph, &installed),
            ["libiperf0", "libsctp1", "libfoo"]
        );
        let all: BTreeSet<String> = ["libiperf0", "libc6", "debconf", "init-system-helpers"]
            .map(String::from)
            .into();
        assert!(walk(&s(&["iperf3"]), &graph, &all).is_empty());
    }

    #[test]
    fn system_users_of_a_postinst_and_the_hook_that_adds_them() {
        let postinst = "#!/bin/sh -e\nif ! getent passwd tcpdump >/dev/null 2>&1; then\n    adduser --system --quiet --ingroup tcpdump\t\t\\\n\t    --no-create-home --home /nonexistent\t\\\n\t    tcpdump\nfi\nadduser --system \"$USER\"\nadduser alice staff\nadduser --system --home /var/lib/x _x || true\n";
        assert_eq!(parse_system_users(postinst), ["tcpdump", "_x"]);
        let hook = users_hook(&["tcpdump".into(), "_x".into()]);
        assert!(hook.starts_with("#!/bin/sh\n") && hook.contains("for u in tcpdump _x; do"));
        if !cmd::exists("sh") {
            return;
        }
        // Run against a scratch /etc: ids from 100 up, twice is once.
        let t = tempfile::tempdir().unwrap();
        let etc = t.path();
        fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nd:x:100:100::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(etc.join("group"), "root:x:0:\n").unwrap();
        let script = hook.replace("/etc/", &format!("{}/", etc.display()));
        for _ in 0..2 {
            cmd::run(Command::new("sh").arg("-c").arg(&script)).unwrap();
        }
        let passwd = fs::read_to_string(etc.join("passwd")).unwrap();
        assert!(passwd.ends_with("tcpdump:x:101:100::/nonexistent:/usr/sbin/nologin\n_x:x:102:101::/nonexistent:/usr/sbin/nologin\n"), "{passwd}");
        assert_eq!(
            fs::read_to_string(etc.join("group")).unwrap(),
            "root:x:0:\ntcpdump:x:100:\n_x:x:101:\n"
        );
    }

    #[test]
    fn package_paths_land_in_merged_usr_without_docs() {
        let p = |s: &str| image_path(Path::new(s)).map(|p| p.display().to_string());
        assert_eq!(p("sbin/ethtool").as_deref(), Some("usr/sbin/ethtool"));
        assert_eq!(
            p("lib/x86_64-linux-gnu/libmnl.so.0").as_deref(),
            Some("usr/lib/x86_64-linux-gnu/libmnl.so.0")
        );
        assert_eq!(p("usr/bin/iperf3").as_deref(), Some("usr/bin/iperf3"));
        assert_eq!(p("etc/x.conf").as_deref(), Some("etc/x.conf"));
        assert_eq!(p("usr/share/doc/tcpdump/copyright"), None);
        assert_eq!(p("usr/share/man/man8/tcpdump.8.gz"), None);
    }

    /// Builds a `.deb` of `tree` with dpkg-deb.
    fn deb_of(tree: &Path, name: &str, out: &Path) {
        fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        fs::write(
            tree.join("DEBIAN/control"),
            format!("Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: test\n"),
        )
        .unwrap();
        cmd::run(
            cmd::command("dpkg-deb")
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(tree)
                .arg(out),
        )
        .unwrap();
    }

    fn tar_list(archive: &Path) -> String {
        cmd::run_stdout(
            Command::new("tar")
                .args(["--zstd", "--numeric-owner", "-tvf"])
                .arg(archive),
        )
        .unwrap()
    }

    #[test]
    fn packages_with_their_missing_libraries_and_the_same_bytes_twice() {
        if !cmd::exists("gcc") || !cmd::exists("dpkg-deb") || !cmd::exists("zstd") {
            eprintln!("skipping: needs gcc, dpkg-deb and zstd");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        // libkimgt.so.1 in a dependency package; tool in the named package needs it.
        let dep = d.join("dep/usr/lib/x86_64-linux-gnu");
        fs::create_dir_all(&dep).unwrap();
        fs::create_dir_all(d.join("pkg/bin")).unwrap();
        fs::create_dir_all(d.join("pkg/usr/share/doc/tool")).unwrap();
        fs::write(d.join("pkg/usr/share/doc/tool/README"), "docs").unwrap();
        fs::write(d.join("f.c"), "int f(void) { return 7; }\n").unwrap();
        fs::write(
            d.join("m.c"),
            "int f(void); int main(void) { return f(); }\n",
        )
        .unwrap();
        let gcc = |args: &[&str]| cmd::run(Command::new("gcc").args(args).current_dir(d)).unwrap();
        gcc(&[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libkimgt.so.1",
            "-o",
            "libkimgt.so.1",
            "f.c",
        ]);
        gcc(&["-o", "pkg/bin/tool", "m.c", "-L.", "-l:libkimgt.so.1"]);
        fs::copy(d.join("libkimgt.so.1"), dep.join("libkimgt.so.1.0")).unwrap();
        std::os::unix::fs::symlink("libkimgt.so.1.0", dep.join("libkimgt.so.1")).unwrap();
        fs::set_permissions(d.join("pkg/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        deb_of(&d.join("pkg"), "tool", &d.join("tool.deb"));
        deb_of(&d.join("dep"), "libkimgt1", &d.join("libkimgt1.deb"));
        let ls = ["/usr/bin/ls", "/bin/ls"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap();
        // The image has libc (and the loader): they stay out.
        let base = elf::library_closure(&[ls]).unwrap();
        let (a, b) = (d.join("a.tar.zst"), d.join("b.tar.zst"));
        let named = [d.join("tool.deb")];
        let deps = [d.join("libkimgt1.deb")];
        build_archive(&named, &deps, &base, &a).unwrap();
        build_archive(&named, &deps, &base, &b).unwrap();
        assert_eq!(
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap(),
            "same inputs, same bytes"
        );
        let list = tar_list(&a);
        assert!(
            list.contains("-rwxr-xr-x 0/0") && list.contains("usr/bin/tool"),
            "{list}"
        );
        assert!(
            list.contains("usr/lib/x86_64-linux-gnu/libkimgt.so.1\n"),
            "{list}"
        );
        assert!(!list.contains("libc.so"), "{list}");
        assert!(!list.contains("start.d"), "no users, no hook: {list}");
        assert!(!list.contains("share/doc"), "{list}");
        assert!(!list.contains(" bin/"), "merged /usr: {list}");
        assert!(list.contains("1970-01-01"), "{list}");
        assert!(fs::read_dir(d).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".deb-overlay-")));
    }
}
