//! File I/O whose errors name the path (cargo-util's `paths.rs` is the model), and
//! [`write_atomic`]: the one way kimg replaces a file so that a reader, or a crash,
//! never sees it half-written.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
    fn errors_name_the_path() {
        let e = fs::read("/nonexistent/x")
            .with_path("/nonexistent/x")
            .unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/x: "), "{e}");
    }
}
