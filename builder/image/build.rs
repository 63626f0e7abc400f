//! Build script: lists the built-in overlays (the workspace's `overlays/`) as a Rust
//! table in OUT_DIR, every file by `include_bytes!`, so the kimg binary carries them
//! and works without its source tree (`overlay::builtin_dir` writes them to the cache).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: kimg-image's build script: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?;
    let out_dir = std::env::var("OUT_DIR").map_err(|e| e.to_string())?;
    let root = Path::new(&manifest_dir).join("../../overlays");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries = Vec::new();
    walk(&root, Path::new(""), &mut entries)?;
    let mut rs = String::from(
        "/// The built-in overlays: (path under overlays/, kind, mode, contents); kind 0 a\n\
         /// directory, 1 a file, 2 a symlink (contents: its target). Sorted by path.\n\
         pub(crate) static BUILTIN_OVERLAYS: &[(&str, u8, u32, &[u8])] = &[\n",
    );
    for (rel, path, kind, mode) in entries {
        let rel = rel
            .to_str()
            .ok_or(format!("{}: not UTF-8", path.display()))?;
        let contents = match kind {
            1 => format!("include_bytes!({:?})", abs(&path)?),
            2 => {
                let target = fs::read_link(&path).map_err(|e| at(&path, e))?;
                let target = target
                    .to_str()
                    .ok_or(format!("{}: not UTF-8", path.display()))?;
                format!("{:?}.as_bytes()", target)
            }
            _ => "&[]".to_string(),
        };
        let _ = writeln!(rs, "    ({rel:?}, {kind}, 0o{mode:o}, {contents}),");
    }
    rs.push_str("];\n");
    let dest = Path::new(&out_dir).join("builtin_overlays.rs");
    fs::write(&dest, rs).map_err(|e| at(&dest, e))
}

type Entry = (PathBuf, PathBuf, u8, u32);

/// Every entry under `dir`, sorted, directories before what they hold.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<(), String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| at(dir, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| at(dir, e)))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let md = fs::symlink_metadata(&path).map_err(|e| at(&path, e))?;
        let mode = md.permissions().mode() & 0o7777;
        if md.is_dir() {
            out.push((rel.clone(), path.clone(), 0, mode));
            walk(&path, &rel, out)?;
        } else if md.is_file() {
            out.push((rel, path, 1, mode));
        } else if md.file_type().is_symlink() {
            out.push((rel, path, 2, 0o777));
        } else {
            return Err(format!(
                "{}: only files, directories and symlinks",
                path.display()
            ));
        }
    }
    Ok(())
}

fn abs(path: &Path) -> Result<String, String> {
    let p = fs::canonicalize(path).map_err(|e| at(path, e))?;
    p.to_str()
        .map(str::to_string)
        .ok_or(format!("{}: not UTF-8", p.display()))
}

fn at(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}
