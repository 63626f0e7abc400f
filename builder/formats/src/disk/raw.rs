//! Writing into the sparse raw disk file without filling its holes.

use super::DiskError;
use kimg_util::fs::IoError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Granularity at which all-zero data is skipped (the ext4 and page size).
const BLOCK: usize = 4096;

/// Writes `data` at `offset`, skipping all-zero 4 KiB blocks so the file stays sparse.
pub fn write_nonzero(dst: &File, path: &Path, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    let nonzero = |at: usize| {
        data[at..(at + BLOCK).min(data.len())]
            .iter()
            .any(|&b| b != 0)
    };
    let mut i = 0;
    while i < data.len() {
        // Coalesce runs of non-zero blocks into one write.
        let start = i;
        while i < data.len() && nonzero(i) {
            i = (i + BLOCK).min(data.len());
        }
        if i > start {
            dst.write_all_at(&data[start..i], offset + start as u64)
                .map_err(|source| DiskError::Io(IoError::new(path.to_path_buf(), source)))?;
        } else {
            i = (i + BLOCK).min(data.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[3 << 20..(3 << 20) + 5].copy_from_slice(b"hello");
        let n = data.len();
        data[n - 10_000..].fill(7);
        write_nonzero(&f, &path, 1 << 20, &data).unwrap();
        let out = std::fs::read(&path).unwrap();
        assert_eq!(&out[(4 << 20)..(4 << 20) + 5], b"hello");
        assert_eq!(out[(9 << 20) - 1], 7);
        assert_eq!(out.iter().map(|&b| u64::from(b)).sum::<u64>(), 532 + 70_000);
        // Only the non-zero blocks are allocated, not the 8 MiB written.
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
    }
}
