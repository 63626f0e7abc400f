//! File I/O whose errors name the path (cargo-util's `paths.rs` is the model), and
//! [`write_atomic`]: the one way kimg replaces a file so that a reader, or a crash,
//! never sees it half-written.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An I/O error and the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoError {
    /// The file or directory the operation was on.
    pub path: PathBuf,
    /// What the operating system said.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// An error on `path`.
    pub fn new(path: impl Into<PathBuf>, source: io::Error) -> IoError {
        IoError {
            path: path.into(),
            source,
        }
    }
}

/// Attaches a path to the error of an I/O result.
pub trait PathContext<T> {
    /// The result, its error naming `path`.
    fn with_path(self, path: impl AsRef<Path>) -> Result<T, IoError>;
}

impl<T> PathContext<T> for io::Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T, IoError> {
        self.map_err(|source| IoError::new(path.as_ref(), source))
    }
}

/// A closure for `map_err` that names `path` (for chains where `with_path` does not fit).
pub fn err_at(path: &Path) -> impl FnOnce(io::Error) -> IoError + '_ {
    move |source| IoError::new(path, source)
}

/// Writes `contents` to `path` atomically: a temporary file beside it, synced, then
/// renamed over it. Readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), IoError> {
    write_atomic_with(path, |f| f.write_all(contents.as_ref()))
}

/// [`write_atomic`] for contents written by `fill` into the temporary file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), IoError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.as_deref().unwrap_or("kimg")))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_path(dir)?;
    fill(tmp.as_file_mut()).with_path(tmp.path())?;
    tmp.as_file().sync_all().with_path(tmp.path())?;
    tmp.persist(path).map_err(|e| IoError::new(path, e.error))?;
    Ok(())
}

/// How old an unlocked hidden work directory must be before a later run removes it
/// (its creator locks it right after making it; the age covers that instant).
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// A hidden work directory beside an output (`.kimg-build-XXXX`), removed when
/// dropped and locked (`flock` on the directory) while it lives, so that a later
/// run can tell the leftovers of a killed one from the work of a live one.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
    _lock: Flock<File>,
}

impl WorkDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory (e.g. renamed into place); the lock goes.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Makes a [`WorkDir`] `PREFIX*` in `parent`, after removing the stale ones of the
/// same prefix there ([`clean_stale`]).
pub fn work_dir(parent: &Path, prefix: &str) -> Result<WorkDir, IoError> {
    clean_stale(parent, prefix, STALE_AFTER);
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_path(parent)?;
    let file = File::open(dir.path()).with_path(dir.path())?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| IoError::new(dir.path(), io::Error::from_raw_os_error(e as i32)))?;
    Ok(WorkDir { dir, _lock: lock })
}

/// Removes the directories `PREFIX*` in `parent` that a killed run left: older than
/// `age` and not locked by a live one (see [`WorkDir`]). Best effort: what cannot be
/// removed stays for a later run. Returns what was removed.
pub fn clean_stale(parent: &Path, prefix: &str, age: Duration) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = e.path();
        let old = fs::symlink_metadata(&path).is_ok_and(|m| {
            m.is_dir()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a >= age)
        });
        if !old {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // Locked: a live run's. The lock is held while removing, so no new owner
        // can take the directory meanwhile (nobody takes an old one anyway).
        let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Opens `path` for reading without following a symlink at its last component
/// (`O_NOFOLLOW`): files in a directory another process could write to (the runtime
/// dir's pid files and state) must be the files themselves, not links elsewhere.
pub fn open_nofollow(path: &Path) -> Result<File, IoError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .with_path(path)
}

/// The whole of `path` as text, read through [`open_nofollow`].
pub fn read_to_string_nofollow(path: &Path) -> Result<String, IoError> {
    use std::io::Read;
    let mut s = String::new();
    open_nofollow(path)?
        .read_to_string(&mut s)
        .with_path(path)?;
    Ok(s)
}

/// Renames `from` to `to`, the error naming both.
pub fn rename(from: &Path, to: &Path) -> Result<(), IoError> {
    fs::rename(from, to).map_err(|e| {
        IoError::new(
            to,
            io::Error::new(e.kind(), format!("rename from {}: {e}", from.display())),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, "one").unwrap();
        write_atomic(&p, "two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the file itself is left");
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, "old").unwrap();
        let e = write_atomic_with(&p, |_| Err(io::Error::other("disk full"))).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nofollow_reads_files_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, "x").unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(read_to_string_nofollow(&f).unwrap(), "x");
        let e = read_to_string_nofollow(&l).unwrap_err();
        assert_eq!(e.source.raw_os_error(), Some(40), "ELOOP: {e}");
    }

    #[test]
    fn stale_work_dirs_go_and_live_or_young_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(600);
        // A live run's: old (a long build), but locked.
        let live = work_dir(dir.path(), ".kimg-build-").unwrap();
        File::open(live.path()).unwrap().set_modified(old).unwrap();
        // A killed run's leftover: old, unlocked.
        let dead = dir.path().join(".kimg-build-dead");
        fs::create_dir_all(dead.join("root/sub")).unwrap();
        File::open(&dead).unwrap().set_modified(old).unwrap();
        // A young unlocked one (just made, not yet locked by its owner).
        let young = dir.path().join(".kimg-build-young");
        fs::create_dir(&young).unwrap();
        // Another prefix is none of our business.
        let other = dir.path().join(".other");
        fs::create_dir(&other).unwrap();
        File::open(&other).unwrap().set_modified(old).unwrap();
        let removed = clean_stale(dir.path(), ".kimg-build-", STALE_AFTER);
        assert_eq!(removed, std::slice::from_ref(&dead));
        assert!(!dead.exists() && live.path().exists() && young.exists() && other.exists());
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists(), "a dropped work dir is removed");
    }

    #[test]
    fn errors_name_the_path() {
        let e = fs::read("/nonexistent/x")
            .with_path("/nonexistent/x")
            .unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/x: "), "{e}");
    }
}
