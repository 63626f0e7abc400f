//! Overlays: finding them, ordering them by `requires`, and turning each into a tar
//! stream for the cdrom (`kimg mkcdrom`).
//!
//! An overlay is a folder `NAME/` on the search path holding `overlay.toml` and a
//! `root/` tree (made into a deterministic tar: sorted, uid/gid 0, mtimes from
//! SOURCE_DATE_EPOCH when set), or an xcluster-style folder with an executable `tar`
//! script, or a ready archive given by path (`.tar`, `.tar.gz`, `.tar.xz`, `.tar.zst`),
//! or `deb:PKG[,PKG...]`: Debian packages made into an archive ([`crate::debpkg`]).

use kimg_formats::iso::{self, IsoImage, IsoSource};
use kimg_util::fs::IoError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable with extra overlay directories (colon separated).
pub const ENV_OVLPATH: &str = "KIMG_OVLPATH";
/// Suffixes of ready archives, with the compression each means.
pub const ARCHIVE_SUFFIXES: &[&str] = &[".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst"];

/// Errors of overlay handling.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Named overlay not found on the search path.
    #[error("overlay {name:?} not found in {searched} (a folder NAME/ with overlay.toml and root/, or with an executable `tar` script; or give an archive path)")]
    NotFound {
        /// What was asked for.
        name: String,
        /// The directories searched, joined.
        searched: String,
    },
    /// `requires` forms a cycle.
    #[error("overlay requires form a cycle: {0}")]
    Cycle(String),
    /// Bad overlay.toml.
    #[error("{path}: {why}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Reading an overlay failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A `deb:` overlay could not be made.
    #[error(transparent)]
    Deb(#[from] crate::debpkg::DebOverlayError),
    /// Writing the ISO failed.
    #[error(transparent)]
    Iso(#[from] iso::IsoError),
}

/// `overlay.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayToml {
    /// One line saying what the overlay is for.
    #[serde(default)]
    pub description: String,
    /// Overlays that must be unpacked before this one.
    #[serde(default)]
    pub requires: Vec<String>,
}

/// Where an overlay's tar stream comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A `root/` tree (folder with overlay.toml).
    Tree(PathBuf),
    /// An executable `tar` script writing the archive to its argument.
    Script(PathBuf),
    /// A ready archive; the suffix (`.tar`, `.tar.zst`, ...) is kept on the cdrom.
    Archive(PathBuf, &'static str),
}

/// A resolved overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Its name (folder name, or archive name without suffix).
    pub name: String,
    /// Where it comes from.
    pub source: Source,
    /// Its `requires`.
    pub requires: Vec<String>,
}

/// The search path: `--ovlpath` dirs, then `$KIMG_OVLPATH`, then the built-in
/// overlays kimg carries.
pub fn search_path(cli: &[PathBuf]) -> Result<Vec<PathBuf>, OverlayError> {
    let mut path = cli.to_vec();
    if let Some(env) = std::env::var_os(ENV_OVLPATH) {
        path.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    path.push(builtin_dir()?);
    Ok(path)
}

/// The built-in overlays (the source tree's overlays/, carried in the binary and
/// written to the cache on first use, so an installed kimg needs no checkout).
pub fn builtin_dir() -> Result<PathBuf, OverlayError> {
    Ok(crate::embedded::overlays_dir()?)
}

fn archive_suffix(arg: &str) -> Option<&'static str> {
    ARCHIVE_SUFFIXES.iter().copied().find(|s| arg.ends_with(s))
}

/// Finds one overlay by name or archive path; makes a `deb:PKG,...` one.
pub fn find(arg: &str, path: &[PathBuf]) -> Result<Overlay, OverlayError> {
    if arg.starts_with(crate::debpkg::PREFIX) {
        return Ok(crate::debpkg::overlay(arg, &kimg_util::cache::cache_dir())?);
    }
    if let Some(suffix) = archive_suffix(arg) {
        let p = Path::new(arg);
        if p.is_file() {
            let file = p.file_name().map(|f| f.to_string_lossy().into_owned());
            let name = file.unwrap_or_default();
            let name = name[..name.len() - suffix.len()].to_string();
            let suffix = if suffix == ".tgz" { ".tar.gz" } else { suffix };
            return Ok(Overlay {
                name,
                source: Source::Archive(p.to_path_buf(), suffix),
                requires: vec![],
            });
        }
    }
    let valid = !arg.is_empty() && !arg.contains('/') && arg != "." && arg != "..";
    for dir in path.iter().filter(|_| valid) {
        let d = dir.join(arg);
        let toml = d.join("overlay.toml");
        let script = d.join("tar");
        if toml.is_file() {
            let text = fs::read_to_string(&toml)
                .map_err(|source| OverlayError::Io(IoError::new(toml.clone(), source)))?;
            let m: OverlayToml = toml::from_str(&text).map_err(|e| OverlayError::Manifest {
                path: toml.clone(),
                why: e.to_string(),
            })?;
            let root = d.join("root");
            if !root.is_dir() {
                return Err(OverlayError::Manifest {
                    path: toml,
                    why: format!("{} is missing (the tree copied to /)", root.display()),
                });
            }
            return Ok(Overlay {
                name: arg.to_string(),
                source: Source::Tree(root),
                requires: m.requires,
            });
        }
        if script.is_file()
            && fs::metadata(&script).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
        {
            return Ok(Overlay {
                name: arg.to_string(),
                source: Source::Script(script),
                requires: vec![],
            });
        }
    }
    Err(OverlayError::NotFound {
        name: arg.to_string(),
        searched: path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
    })
}

/// Resolves `args` in command-line order with every `requires` placed before its
/// dependants, each overlay once. Missing overlays and cycles are errors.
pub fn resolve(args: &[String], path: &[PathBuf]) -> Result<Vec<Overlay>, OverlayError> {
    let mut out: Vec<Overlay> = Vec::new();
    let mut cache: HashMap<String, Overlay> = HashMap::new();
    for arg in args {
        let mut stack = Vec::new();
        visit(arg, path, &mut cache, &mut stack, &mut out)?;
    }
    Ok(out)
}

fn visit(
    arg: &str,
    path: &[PathBuf],
    cache: &mut HashMap<String, Overlay>,
    stack: &mut Vec<String>,
    out: &mut Vec<Overlay>,
) -> Result<(), OverlayError> {
    let ov = match cache.get(arg) {
        Some(o) => o.clone(),
        None => {
            let o = find(arg, path)?;
            cache.insert(arg.to_string(), o.clone());
            o
        }
    };
    if out.iter().any(|o| o.name == ov.name) {
        return Ok(());
    }
    if stack.contains(&ov.name) {
        stack.push(ov.name.clone());
        return Err(OverlayError::Cycle(stack.join(" -> ")));
    }
    stack.push(ov.name.clone());
    for r in &ov.requires {
        visit(r, path, cache, stack, out)?;
    }
    stack.pop();
    out.push(ov);
    Ok(())
}

/// SOURCE_DATE_EPOCH, when set to a number.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// The overlay's file name on the cdrom: `NN-NAME.tar[.zst|.gz|.xz]`.
pub fn cdrom_name(index: usize, ov: &Overlay) -> String {
    let suffix = match &ov.source {
        Source::Tree(_) => ".tar.zst",
        Source::Script(_) => ".tar",
        Source::Archive(_, s) => s,
    };
    format!("{:02}-{}{suffix}", index + 1, ov.name)
}

/// Writes `root` as a deterministic tar: entries sorted by path, uid/gid 0, mtimes
/// `epoch` when given, hard links kept, sockets and fifos skipped... fifos kept.
pub fn write_tree_tar(root: &Path, w: &mut dyn Write, epoch: Option<i64>) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut links: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    let mut all = Vec::new();
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names.into_iter().rev() {
            let r = rel.join(n);
            if fs::symlink_metadata(root.join(&r))?.is_dir() {
                stack.push(r.clone());
            }
            all.push(r);
        }
    }
    all.sort();
    for rel in all {
        let full = root.join(&rel);
        let md = fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(md.mode() & 0o7777);
        let mtime = epoch.unwrap_or(md.mtime()).max(0) as u64;
        h.set_mtime(mtime);
        let ft = md.file_type();
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &rel, fs::read_link(&full)?)?;
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &rel, first)?;
                    continue;
                }
                links.insert(key, rel.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            b.append_data(&mut h, &rel, fs::File::open(&full)?)?;
        }
        // Sockets, fifos and device nodes do not belong in an overlay tree.
    }
    b.finish()
}

/// The cdrom content of one overlay.
fn fill<'a>(ov: &'a Overlay, epoch: Option<i64>, tmpdir: &'a Path) -> iso::Fill<'a> {
    Box::new(move |w: &mut dyn Write| -> Result<(), String> {
        match &ov.source {
            Source::Tree(root) => {
                let mut z = zstd::Encoder::new(w, 3).map_err(|e| e.to_string())?;
                write_tree_tar(root, &mut z, epoch)
                    .map_err(|e| format!("{}: {e}", root.display()))?;
                z.finish().map_err(|e| e.to_string())?;
                Ok(())
            }
            Source::Archive(p, _) => {
                let mut f = fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
                io::copy(&mut f, w).map_err(|e| format!("{}: {e}", p.display()))?;
                Ok(())
            }
            Source::Script(script) => {
                let out = tmpdir.join(format!("{}.tar", ov.name));
                kimg_util::cmd::run(
                    Command::new(script)
                        .arg(&out)
                        .current_dir(script.parent().unwrap_or(Path::new("."))),
                )
                .map_err(|e| e.to_string())?;
                let mut f = fs::File::open(&out)
                    .map_err(|e| format!("{} wrote no {}: {e}", script.display(), out.display()))?;
                io::copy(&mut f, w).map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    })
}

/// Turns tree and script overlays into archives under `dir`, written once, so that
/// several cdroms (one per VM when an add-on gives each its own first overlay) carry
/// the same bytes without compressing or running anything again; ready archives
/// stay where they are.
pub fn render(overlays: &[Overlay], dir: &Path) -> Result<Vec<Overlay>, OverlayError> {
    fs::create_dir_all(dir).map_err(|e| OverlayError::Io(IoError::new(dir, e)))?;
    let epoch = source_date_epoch();
    let scratch = kimg_util::fs::work_dir(dir, ".render-")?;
    overlays
        .iter()
        .map(|ov| {
            let suffix = match &ov.source {
                Source::Archive(..) => return Ok(ov.clone()),
                Source::Tree(_) => ".tar.zst",
                Source::Script(_) => ".tar",
            };
            let out = dir.join(format!("{}{suffix}", ov.name));
            let io = |e: io::Error| OverlayError::Io(IoError::new(&out, e));
            let mut f = fs::File::create(&out).map_err(io)?;
            fill(ov, epoch, scratch.path())(&mut f).map_err(|why| io(io::Error::other(why)))?;
            Ok(Overlay {
                name: ov.name.clone(),
                source: Source::Archive(out.clone(), suffix),
                requires: ov.requires.clone(),
            })
        })
        .collect()
}

/// Writes the cdrom for `overlays` (already ordered) to `out`.
pub fn mkcdrom(out: &Path, overlays: &[Overlay]) -> Result<IsoImage, OverlayError> {
    let epoch = source_date_epoch();
    let tmp = kimg_util::fs::work_dir(&std::env::temp_dir(), "kimg-mkcdrom-")?;
    let files: Vec<IsoSource> = overlays
        .iter()
        .enumerate()
        .map(|(i, ov)| IsoSource {
            name: cdrom_name(i, ov),
            fill: fill(ov, epoch, tmp.path()),
        })
        .collect();
    Ok(iso::write(out, files, epoch.unwrap_or(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(base: &Path, name: &str, requires: &[&str]) {
        let d = base.join(name);
        fs::create_dir_all(d.join("root/etc")).unwrap();
        let req: Vec<String> = requires.iter().map(|r| format!("{r:?}")).collect();
        fs::write(
            d.join("overlay.toml"),
            format!(
                "description = \"test {name}\"\nrequires = [{}]\n",
                req.join(",")
            ),
        )
        .unwrap();
        fs::write(d.join("root/etc").join(name), name).unwrap();
    }

    #[test]
    fn requires_come_first_once_and_cycles_fail() {
        let t = tempfile::tempdir().unwrap();
        folder(t.path(), "a", &[]);
        folder(t.path(), "b", &["a"]);
        folder(t.path(), "c", &["b", "a"]);
        let p = vec![t.path().to_path_buf()];
        let names = |args: &[&str]| -> Vec<String> {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            resolve(&args, &p)
                .unwrap()
                .into_iter()
                .map(|o| o.name)
                .collect()
        };
        assert_eq!(names(&["c"]), ["a", "b", "c"]);
        assert_eq!(names(&["b", "a", "c"]), ["a", "b", "c"]);
        folder(t.path(), "x", &["y"]);
        folder(t.path(), "y", &["x"]);
        let e = resolve(&["x".into()], &p).unwrap_err();
        assert!(matches!(e, OverlayError::Cycle(_)), "{e}");
        assert!(e.to_string().contains("x -> y -> x"), "{e}");
        let e = resolve(&["nope".into()], &p).unwrap_err();
        assert!(e.to_string().contains("\"nope\" not found"), "{e}");
    }

    #[test]
    fn missing_overlay_or_failing_script_leaves_no_iso() {
        let t = tempfile::tempdir().unwrap();
        folder(t.path(), "a", &[]);
        let bad = t.path().join("bad");
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join("tar"), "#!/bin/sh\necho broken >&2\nexit 3\n").unwrap();
        fs::set_permissions(bad.join("tar"), fs::Permissions::from_mode(0o755)).unwrap();
        let p = vec![t.path().to_path_buf()];
        let ovs = resolve(&["a".into(), "bad".into()], &p).unwrap();
        let out = t.path().join("out/c.iso");
        fs::create_dir(t.path().join("out")).unwrap();
        let e = mkcdrom(&out, &ovs).unwrap_err();
        assert!(
            e.to_string().contains("02-bad.tar") && e.to_string().contains("broken"),
            "{e}"
        );
        assert_eq!(fs::read_dir(t.path().join("out")).unwrap().count(), 0);
    }

    #[test]
    fn tree_tar_is_deterministic_and_gnu_tar_reads_it() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        let long = "d".repeat(120);
        fs::create_dir_all(root.join(&long)).unwrap();
        fs::write(root.join(&long).join("f".repeat(150)), "long").unwrap();
        fs::write(root.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("usr/bin/tool"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
        std::os::unix::fs::symlink("tool", root.join("usr/bin/link")).unwrap();
        let mut a = Vec::new();
        write_tree_tar(&root, &mut a, Some(1_000_000)).unwrap();
        let mut b = Vec::new();
        write_tree_tar(&root, &mut b, Some(1_000_000)).unwrap();
        assert_eq!(a, b);
        let tarfile = t.path().join("a.tar");
        fs::write(&tarfile, &a).unwrap();
        let list = kimg_util::cmd::run_stdout(
            Command::new("tar")
                .args(["--numeric-owner", "-tvf"])
                .arg(&tarfile),
        )
        .unwrap();
        assert!(list.contains("-rwsr-xr-x 0/0"), "{list}");
        assert!(list.contains("usr/bin/link -> tool"), "{list}");
        assert!(
            list.contains("usr/bin/tool2 link to usr/bin/tool"),
            "{list}"
        );
        assert!(list.contains(&"f".repeat(150)), "{list}");
        assert!(list.contains("1970-01-12"), "{list}");
    }
}
