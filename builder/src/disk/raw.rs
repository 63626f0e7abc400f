//! Writing into the sparse raw disk file without filling its holes.

use super::DiskError;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Copy granularity; also the unit in which all-zero data is skipped.
const CHUNK: usize = 1 << 20;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` at `offset`, skipping all-zero 4 KiB blocks so the file stays sparse.
pub fn write_nonzero(dst: &File, path: &Path, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    const BLOCK: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // Coalesce runs of non-zero blocks into one write.
        let start = i;
        while i < data.len() && data[i..(i + BLOCK).min(data.len())].iter().any(|&b| b != 0) {
            i = (i + BLOCK).min(data.len());
        }
        if i > start {
            dst.write_all_at(&data[start..i], offset + start as u64)
                .map_err(io_err(path))?;
        } else {
            i = (i + BLOCK).min(data.len());
        }
    }
    Ok(())
}

/// Copies all of `src` into `dst` at `offset`, reading only its data extents
/// (SEEK_DATA/SEEK_HOLE) and writing only non-zero blocks.
pub fn copy_sparse(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    offset: u64,
) -> Result<(), DiskError> {
    let len = src.metadata().map_err(io_err(src_path))?.len();
    let seek_err = |e: Errno| DiskError::Io {
        path: src_path.to_path_buf(),
        source: e.into(),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let at = i64::try_from(pos).map_err(|_| seek_err(Errno::EOVERFLOW))?;
        let (data, hole) = match lseek(src, at, Whence::SeekData) {
            Ok(d) => (
                d as u64,
                lseek(src, d, Whence::SeekHole).map_err(seek_err)? as u64,
            ),
            Err(Errno::ENXIO) => break, // only a hole is left
            // No SEEK_DATA support on this filesystem: treat the rest as data.
            Err(Errno::EINVAL) => (pos, len),
            Err(e) => return Err(seek_err(e)),
        };
        let mut p = data;
        while p < hole {
            let n = ((hole - p) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], p)
                .map_err(io_err(src_path))?;
            write_nonzero(dst, dst_path, offset + p, &buf[..n])?;
            p += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (sp, dp) = (dir.path().join("s"), dir.path().join("d"));
        let src = File::create(&sp).unwrap();
        src.set_len(8 << 20).unwrap();
        src.write_all_at(b"hello", 3 << 20).unwrap();
        src.write_all_at(&[7u8; 10000], (8 << 20) - 10000).unwrap();
        let dst = File::create(&dp).unwrap();
        dst.set_len(16 << 20).unwrap();
        let src = File::open(&sp).unwrap();
        copy_sparse(&src, &sp, &dst, &dp, 1 << 20).unwrap();
        let out = std::fs::read(&dp).unwrap();
        assert_eq!(&out[(4 << 20)..(4 << 20) + 5], b"hello");
        assert_eq!(out[(9 << 20) - 1], 7);
        assert_eq!(out.iter().map(|&b| b as u64).sum::<u64>(), 532 + 70000);
        // Only a few blocks are allocated, not the 16 MiB.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dp).unwrap().blocks() * 512 < 1 << 20);
    }
}
