//! The initramfs: an in-memory file tree written as a zstd-compressed cpio (newc).
//!
//! Entries are kept sorted and owned by root with one fixed mtime, so the same
//! inputs give the same bytes. Parent directories are added on demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Errors writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A host file that should go in could not be read.
    #[error("initramfs: cannot read {path} (for /{entry}): {source}")]
    Read {
        /// Host path.
        path: PathBuf,
        /// Path inside the initramfs.
        entry: String,
        /// Why.
        source: io::Error,
    },
    /// The archive could not be written.
    #[error("initramfs: cannot write {path}: {source}")]
    Write {
        /// Output path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An entry is larger than newc's 32-bit size field.
    #[error("initramfs: /{0} is larger than 4 GiB")]
    TooLarge(String),
}

#[derive(Debug, Clone)]
enum Content {
    Dir,
    File(PathBuf),
    Bytes(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    mode: u32,
    content: Content,
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// An initramfs being assembled. Paths are absolute-looking (`/init`) or relative;
/// both mean the same place.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.insert(path, mode, Content::Dir)
    }

    /// Adds a copy of a host file.
    pub fn file(&mut self, path: &str, host: &Path, mode: u32) -> &mut Self {
        self.insert(path, mode, Content::File(host.to_path_buf()))
    }

    /// Adds a file with the given content.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.insert(path, mode, Content::Bytes(data.into()))
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.insert(path, 0o777, Content::Symlink(target.to_string()))
    }

    /// Paths in archive order (for tests and listings).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn insert(&mut self, path: &str, mode: u32, content: Content) -> &mut Self {
        let path = path.trim_matches('/');
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry {
                mode: 0o755,
                content: Content::Dir,
            });
        }
        self.entries.insert(
            path.to_string(),
            Entry {
                mode: mode & 0o7777,
                content,
            },
        );
        self
    }

    /// Writes the tree as cpio newc compressed with zstd to `out`; returns the
    /// compressed size. `mtime` is stamped on every entry.
    pub fn write(&self, out: &Path, mtime: u32, level: i32) -> Result<u64, InitramfsError> {
        let werr = |source| InitramfsError::Write {
            path: out.to_path_buf(),
            source,
        };
        let file = File::create(out).map_err(werr)?;
        let mut z = zstd::Encoder::new(BufWriter::new(file), level).map_err(werr)?;
        self.write_cpio(&mut z, mtime)?;
        let mut w = z.finish().map_err(werr)?;
        w.flush().map_err(werr)?;
        let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        Ok(file.metadata().map_err(werr)?.len())
    }

    /// Writes the uncompressed cpio newc stream.
    pub fn write_cpio<W: Write>(&self, w: &mut W, mtime: u32) -> Result<(), InitramfsError> {
        let werr = |source| InitramfsError::Write {
            path: PathBuf::from("<cpio stream>"),
            source,
        };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let data = match &entry.content {
                Content::Dir => Vec::new(),
                Content::Bytes(b) => b.clone(),
                Content::Symlink(t) => t.as_bytes().to_vec(),
                Content::File(host) => {
                    let mut buf = Vec::new();
                    File::open(host)
                        .and_then(|mut f| f.read_to_end(&mut buf))
                        .map_err(|source| InitramfsError::Read {
                            path: host.clone(),
                            entry: path.clone(),
                            source,
                        })?;
                    buf
                }
            };
            let (kind, nlink) = match entry.content {
                Content::Dir => (S_IFDIR, 2),
                Content::Symlink(_) => (S_IFLNK, 1),
                _ => (S_IFREG, 1),
            };
            let size =
                u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(path.clone()))?;
            let mut cw = cpio::newc::Builder::new(path)
                .ino(ino as u32 + 1)
                .mode(kind | entry.mode)
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(mtime)
                .write(&mut *w, size);
            cw.write_all(&data).map_err(werr)?;
            cw.finish().map_err(werr)?;
        }
        cpio::newc::trailer(&mut *w).map_err(werr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample(dir: &Path) -> Initramfs {
        let host = dir.join("host-file");
        std::fs::write(&host, b"#!/bin/sh\necho hi\n").unwrap();
        let mut t = Initramfs::new();
        t.file("/init", &host, 0o755)
            .bytes("etc/kimg/marker", "", 0o644)
            .symlink("bin/sh", "busybox")
            .dir("proc", 0o555)
            .bytes("lib/modules/6.1/kernel/a.ko", vec![1u8, 2, 3], 0o644);
        t
    }

    #[test]
    fn parents_are_added_and_order_is_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let t = sample(dir.path());
        let paths: Vec<_> = t.paths().collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "etc",
                "etc/kimg",
                "etc/kimg/marker",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/a.ko",
                "proc"
            ]
        );
    }

    #[test]
    fn gnu_cpio_reads_back_names_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let t = sample(dir.path());
        let mut raw = Vec::new();
        t.write_cpio(&mut raw, 1_700_000_000).unwrap();
        let cpio_file = dir.path().join("x.cpio");
        std::fs::write(&cpio_file, &raw).unwrap();
        let out = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&cpio_file)
            .output()
            .expect("cpio is installed (apt-get install cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("-rwxr-xr-x   1 root     root           18 "),
            "{listing}"
        );
        assert!(listing.contains("bin/sh -> busybox"), "{listing}");
        assert!(
            listing.contains("dr-xr-xr-x   2 root     root            0"),
            "{listing}"
        );
        assert_eq!(listing.lines().count(), 12, "{listing}");
    }

    #[test]
    fn compressed_output_is_deterministic_and_valid_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let t = sample(dir.path());
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        t.write(&a, 1, 3).unwrap();
        t.write(&b, 1, 3).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let st = Command::new("zstd")
            .args(["-t", "-q"])
            .arg(&a)
            .status()
            .unwrap();
        assert!(st.success());
    }

    #[test]
    fn missing_host_file_names_both_paths() {
        let mut t = Initramfs::new();
        t.file("init", Path::new("/nonexistent/kimg-init"), 0o755);
        let err = t.write_cpio(&mut Vec::new(), 0).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/kimg-init") && err.contains("/init"),
            "{err}"
        );
    }
}
