//! sha256 digests of files and byte slices, as lower-case hex.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// sha256 of a file's content; also returns its size.
pub fn file_sha256(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

/// A manifest component for `file`: its size and sha256, as it sits at `path` in the
/// image.
pub fn component(
    name: &str,
    file: &Path,
    path: String,
    version: Option<String>,
) -> io::Result<kimg_contract::manifest::Component> {
    let (sha256, size) = file_sha256(file)?;
    Ok(kimg_contract::manifest::Component {
        name: name.into(),
        path,
        version,
        size,
        sha256,
    })
}

/// sha256 of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(file_sha256(&p).unwrap(), (sha256(b"abc"), 3));
    }
}
