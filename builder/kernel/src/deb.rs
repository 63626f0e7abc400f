//! Debian package (`.deb`) reader: the `ar` container and its `data.tar.*` member.
//!
//! A `.deb` may come from anywhere (`--kernel-deb FILE`), so everything here treats it
//! as untrusted: lengths are checked before slicing and tar entries go through
//! [`tar::Entry::unpack_in`], which refuses absolute paths, `..` and writes through
//! symlinks that lead out of the destination.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Reading or unpacking a `.deb` failed.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    /// The file could not be opened or read.
    #[error("{}: {source}", deb.display())]
    Io {
        /// The package.
        deb: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The `ar` container is malformed.
    #[error("{}: not a valid Debian package: {reason}", deb.display())]
    Format {
        /// The package.
        deb: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No `data.tar`, `data.tar.xz`, `data.tar.zst` or `data.tar.gz` member.
    #[error("{}: no data.tar member (found: {members})", deb.display())]
    NoData {
        /// The package.
        deb: PathBuf,
        /// The member names that were present, comma separated.
        members: String,
    },
    /// Decompressing or unpacking the data member failed.
    #[error("{}: member {member}: {source}", deb.display())]
    Unpack {
        /// The package.
        deb: PathBuf,
        /// The `ar` member being unpacked.
        member: String,
        /// Why.
        source: io::Error,
    },
    /// A tar entry would land outside the destination directory.
    #[error("{}: member {member}: refusing unsafe entry {entry:?}", deb.display())]
    UnsafeEntry {
        /// The package.
        deb: PathBuf,
        /// The `ar` member being unpacked.
        member: String,
        /// The entry's path as stored.
        entry: String,
    },
}

/// One `ar` member: its name and where its data lies in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArMember {
    /// Name with any GNU-style trailing `/` and padding removed.
    pub name: String,
    /// Byte offset of the data in the archive.
    pub offset: u64,
    /// Data size in bytes.
    pub size: u64,
}

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
const AR_HEADER_LEN: u64 = 60;

/// Lists the members of an `ar` archive read from `r` (of total length `len`).
///
/// Pure over the reader so tests can feed truncated or garbage bytes.
pub fn ar_members<R: Read + Seek>(r: &mut R, len: u64) -> Result<Vec<ArMember>, String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| "shorter than the ar magic".to_string())?;
    if &magic != AR_MAGIC {
        return Err("missing \"!<arch>\" magic".into());
    }
    let mut members = Vec::new();
    let mut pos = 8u64;
    while pos < len {
        if len - pos < AR_HEADER_LEN {
            return Err(format!("truncated member header at offset {pos}"));
        }
        let mut hdr = [0u8; AR_HEADER_LEN as usize];
        r.seek(SeekFrom::Start(pos))
            .and_then(|_| r.read_exact(&mut hdr))
            .map_err(|e| format!("reading header at offset {pos}: {e}"))?;
        if &hdr[58..60] != b"`\n" {
            return Err(format!("bad member header terminator at offset {pos}"));
        }
        let name = String::from_utf8_lossy(&hdr[0..16]);
        let name = name.trim_end().trim_end_matches('/').to_string();
        let size_text = String::from_utf8_lossy(&hdr[48..58]);
        let size: u64 = size_text
            .trim()
            .parse()
            .map_err(|_| format!("member {name:?}: bad size field {size_text:?}"))?;
        let offset = pos + AR_HEADER_LEN;
        let end = offset
            .checked_add(size)
            .filter(|&end| end <= len)
            .ok_or_else(|| format!("member {name:?} is truncated ({size} bytes declared)"))?;
        members.push(ArMember { name, offset, size });
        // Member data is padded to an even offset; a missing final pad byte ends the
        // loop (pos > len), as GNU ar tolerates too.
        pos = end + (end % 2);
    }
    Ok(members)
}

/// Unpacks the `data.tar*` member of `deb` into `dest` (created if missing).
///
/// Returns the name of the member that was unpacked.
pub fn unpack_data(deb: &Path, dest: &Path) -> Result<String, DebError> {
    let io_err = |source| DebError::Io {
        deb: deb.to_path_buf(),
        source,
    };
    let mut file = File::open(deb).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let members = ar_members(&mut file, len).map_err(|reason| DebError::Format {
        deb: deb.to_path_buf(),
        reason,
    })?;
    let data = members
        .iter()
        .find(|m| {
            matches!(
                m.name.as_str(),
                "data.tar" | "data.tar.xz" | "data.tar.zst" | "data.tar.gz"
            )
        })
        .ok_or_else(|| DebError::NoData {
            deb: deb.to_path_buf(),
            members: members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let unpack_err = |source| DebError::Unpack {
        deb: deb.to_path_buf(),
        member: data.name.clone(),
        source,
    };
    file.seek(SeekFrom::Start(data.offset))
        .map_err(unpack_err)?;
    let raw = BufReader::new(file.take(data.size));
    let reader: Box<dyn Read> = match data.name.as_str() {
        "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(raw)),
        "data.tar.zst" => Box::new(zstd::Decoder::with_buffer(raw).map_err(unpack_err)?),
        "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(raw)),
        _ => Box::new(raw),
    };
    std::fs::create_dir_all(dest).map_err(unpack_err)?;
    let mut archive = tar::Archive::new(reader);
    // Keep only the rwx bits: setuid files from an untrusted package must not appear
    // in the cache of a user who may run kimg as root.
    archive.set_preserve_permissions(false);
    for entry in archive.entries().map_err(unpack_err)? {
        let mut entry = entry.map_err(unpack_err)?;
        let path = entry.path_bytes().into_owned();
        // unpack_in returns Ok(false) for entries it skips as unsafe: fail loudly instead,
        // a package with such entries is not one we want to boot.
        if !entry.unpack_in(dest).map_err(unpack_err)? {
            return Err(DebError::UnsafeEntry {
                deb: deb.to_path_buf(),
                member: data.name.clone(),
                entry: String::from_utf8_lossy(&path).into_owned(),
            });
        }
    }
    Ok(data.name.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// Builds an `ar` archive from (name, data) members, GNU style (`name/`).
    pub(crate) fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = AR_MAGIC.to_vec();
        for (name, data) in members {
            let hdr = format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                format!("{name}/"),
                0,
                0,
                0,
                "100644",
                data.len()
            );
            assert_eq!(hdr.len(), 60);
            out.extend_from_slice(hdr.as_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    /// A tar with the given (path, content) regular files.
    pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn deb_with(data_name: &str, data: &[u8]) -> Vec<u8> {
        ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", b"x"),
            (data_name, data),
        ])
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn unpacks_every_compression() {
        let tar = tar_of(&[("./boot/vmlinuz-1", b"kernel"), ("./lib/a.ko", b"odd")]);
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            io::Write::write_all(&mut e, &tar).unwrap();
            e.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in [
            ("data.tar", &tar),
            ("data.tar.xz", &xz),
            ("data.tar.zst", &zst),
            ("data.tar.gz", &gz),
        ] {
            let deb = write(dir.path(), &format!("{name}.deb"), &deb_with(name, data));
            let dest = dir.path().join(format!("out-{name}"));
            assert_eq!(unpack_data(&deb, &dest).unwrap(), name);
            assert_eq!(
                std::fs::read(dest.join("boot/vmlinuz-1")).unwrap(),
                b"kernel"
            );
            assert_eq!(std::fs::read(dest.join("lib/a.ko")).unwrap(), b"odd");
        }
    }

    #[test]
    fn reads_dpkg_deb_output() {
        if !kimg_util::cmd::exists("dpkg-deb") {
            eprintln!("skipping: dpkg-deb not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: x <x@y>\nDescription: t\n",
        )
        .unwrap();
        std::fs::write(root.join("boot/vmlinuz-9"), b"k").unwrap();
        let deb = dir.path().join("t.deb");
        kimg_util::cmd::run(
            std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(&root)
                .arg(&deb),
        )
        .unwrap();
        let dest = dir.path().join("out");
        assert_eq!(unpack_data(&deb, &dest).unwrap(), "data.tar.xz");
        assert_eq!(std::fs::read(dest.join("boot/vmlinuz-9")).unwrap(), b"k");
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let good = deb_with("data.tar", &tar_of(&[("a", b"1")]));
        for cut in [0, 3, 8, 30, 68, 80, good.len() - 1] {
            let bytes = &good[..cut];
            let r = ar_members(&mut Cursor::new(bytes), bytes.len() as u64);
            // Cutting exactly at a member boundary is a valid (shorter) archive.
            if let Ok(m) = r {
                assert!(m.iter().all(|m| m.offset + m.size <= cut as u64));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        for (i, bytes) in [
            b"".to_vec(),
            b"hello world, not a deb".to_vec(),
            good[..good.len() - 5].to_vec(),
            deb_with("data.tar.xz", b"not xz at all"),
            deb_with("data.tar.zst", b"not zstd"),
            deb_with("data.tar.gz", b"not gzip"),
            deb_with("data.tar", b"not a tar, but long enough? no"),
            ar(&[("debian-binary", b"2.0\n")]),
        ]
        .iter()
        .enumerate()
        {
            let deb = write(dir.path(), &format!("bad{i}.deb"), bytes);
            let err = unpack_data(&deb, &dir.path().join(format!("o{i}")));
            let msg = err.expect_err("must fail").to_string();
            assert!(msg.contains(&format!("bad{i}.deb")), "{msg}");
        }
        // An oversized size field must not be trusted.
        let mut huge = deb_with("data.tar", b"ab");
        let field = 8 + 60 + 4 + 48;
        huge[field..field + 10].copy_from_slice(b"9999999999");
        assert!(ar_members(&mut Cursor::new(&huge), huge.len() as u64).is_err());
    }

    #[test]
    fn refuses_escaping_entries() {
        // tar::Builder refuses to write `..`, so forge the header bytes directly.
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let name = b"../evil";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[b'x'; 512]);
        t.extend_from_slice(&[0u8; 1024]);
        let dir = tempfile::tempdir().unwrap();
        let deb = write(dir.path(), "evil.deb", &deb_with("data.tar", &t));
        let dest = dir.path().join("d/out");
        let err = unpack_data(&deb, &dest).unwrap_err();
        assert!(matches!(err, DebError::UnsafeEntry { .. }), "{err}");
        assert!(!dir.path().join("d/evil").exists());
    }
}
