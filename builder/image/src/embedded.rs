//! What the kimg binary carries so that it works outside its source tree: the built-in
//! overlays (a table that build.rs makes from `overlays/`) and kimg-init (whose bytes
//! the CLI crate embeds). Each is written to the cache on first use, in a directory
//! named by its sha256, so two kimg versions never share a stale copy.

use kimg_util::fs::{IoError, PathContext};
use kimg_util::hash::{file_sha256, sha256};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

include!(concat!(env!("OUT_DIR"), "/builtin_overlays.rs"));

/// Modification time of the written overlay files: fixed, so a cdrom made from a
/// built-in overlay has the same bytes on every host (as SOURCE_DATE_EPOCH=1 would).
const OVERLAY_MTIME: Duration = Duration::from_secs(1);

/// The built-in overlays as a directory (one folder per overlay), written to
/// `CACHE/overlays/SHA256/` the first time.
pub fn overlays_dir() -> Result<PathBuf, IoError> {
    overlays_dir_in(&kimg_util::cache::cache_dir().join("overlays"))
}

fn overlays_dir_in(parent: &Path) -> Result<PathBuf, IoError> {
    let mut h = Sha256::new();
    for (path, kind, mode, data) in BUILTIN_OVERLAYS {
        h.update(format!("{path}\0{kind}\0{mode:o}\0{}\0", data.len()));
        h.update(data);
    }
    let dir = parent.join(hex::encode(h.finalize()));
    if dir.is_dir() {
        return Ok(dir);
    }
    fs::create_dir_all(parent).with_path(parent)?;
    // Written whole in a hidden temp dir, then renamed: a reader never sees half.
    let tmp = tempfile::Builder::new()
        .prefix(".overlays-")
        .tempdir_in(parent)
        .with_path(parent)?;
    for (rel, kind, mode, data) in BUILTIN_OVERLAYS {
        let path = tmp.path().join(rel);
        match kind {
            0 => fs::create_dir(&path).with_path(&path)?,
            2 => symlink(String::from_utf8_lossy(data).as_ref(), &path).with_path(&path)?,
            _ => fs::write(&path, data).with_path(&path)?,
        }
        if *kind != 2 {
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).with_path(&path)?;
        }
    }
    // Deepest first: setting a directory's time after its children were made.
    for (rel, kind, _, _) in BUILTIN_OVERLAYS.iter().rev() {
        if *kind != 2 {
            let path = tmp.path().join(rel);
            fs::File::open(&path)
                .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + OVERLAY_MTIME))
                .with_path(&path)?;
        }
    }
    let tmp = tmp.keep();
    if let Err(e) = fs::rename(&tmp, &dir) {
        // Another kimg wrote the same content first: use theirs.
        let _ = fs::remove_dir_all(&tmp);
        if !dir.is_dir() {
            return Err(IoError::new(&dir, e));
        }
    }
    Ok(dir)
}

/// `kimg_init` (the bytes the kimg binary carries) as an executable file,
/// `CACHE/init/SHA256/kimg-init`, written the first time and checked every time.
pub fn init_file(kimg_init: &[u8]) -> Result<PathBuf, IoError> {
    init_file_in(&kimg_util::cache::cache_dir().join("init"), kimg_init)
}

fn init_file_in(parent: &Path, kimg_init: &[u8]) -> Result<PathBuf, IoError> {
    let sha = sha256(kimg_init);
    let dir = parent.join(&sha);
    let path = dir.join("kimg-init");
    if file_sha256(&path).is_ok_and(|(have, _)| have == sha) {
        return Ok(path);
    }
    fs::create_dir_all(&dir).with_path(&dir)?;
    kimg_util::fs::write_atomic_with(&path, |f| {
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.write_all(kimg_init)
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_overlays_are_written_once_with_their_modes() {
        let cache = tempfile::tempdir().unwrap();
        let dir = overlays_dir_in(cache.path()).unwrap();
        let toml = dir.join("test/overlay.toml");
        assert!(toml.is_file(), "{}", toml.display());
        let hook = dir.join("test/root/etc/kimg/start.d/50-kimg-test");
        let mode = fs::metadata(&hook).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{mode:o}");
        // Same bytes as the source tree, and found again without writing.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../overlays/test/overlay.toml");
        assert_eq!(fs::read(&toml).unwrap(), fs::read(src).unwrap());
        assert_eq!(overlays_dir_in(cache.path()).unwrap(), dir);
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 1);
    }

    #[test]
    fn init_is_written_by_its_hash_and_rewritten_when_damaged() {
        let cache = tempfile::tempdir().unwrap();
        let p = init_file_in(cache.path(), b"\x7fELF pretend").unwrap();
        assert!(p.to_string_lossy().contains(&sha256(b"\x7fELF pretend")));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::write(&p, b"damaged").unwrap();
        assert_eq!(init_file_in(cache.path(), b"\x7fELF pretend").unwrap(), p);
        assert_eq!(fs::read(&p).unwrap(), b"\x7fELF pretend");
    }
}
