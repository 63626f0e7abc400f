//! Fuzzes the overlay unpacker with arbitrary archive bytes (plain, or behind a gzip,
//! xz or zstd magic), on both paths: streamed (hash unknown) and sendfile (hash known).
//! Whatever the archive says, nothing outside the root it is unpacked onto may
//! change: no new names beside it, and the files already there (one beside the root,
//! reachable by `../beside/...` links; one at a fixed absolute path; a device-like
//! file in the root's /dev) keep their mode, owner, mtime and contents. And the
//! unpacker must return (kimg-init never panics).
#![no_main]

use kimg_init::unpack;

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file outside every root at a path the dictionary (`unpack.dict`) knows, for
/// absolute symlink targets (the tempdir's name is random).
const FIXED_OUTSIDE: &str = "/tmp/kimg-fuzz-outside/secret";

/// What must not change of a file: mode, owner, mtime, size, contents.
#[derive(Debug, PartialEq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    contents: Vec<u8>,
}

fn seen(p: &Path) -> Option<Seen> {
    let md = std::fs::symlink_metadata(p).ok()?;
    let contents = if md.is_file() {
        std::fs::read(p).ok()?
    } else {
        Vec::new()
    };
    Some(Seen {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        contents,
    })
}

/// Makes `p` a file with `contents` and `mode` (again, if a run changed it).
fn plant(p: &Path, contents: &[u8], mode: u32) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    if seen(p).is_none_or(|s| s.contents != contents || s.mode & 0o7777 != mode) {
        let _ = std::fs::remove_file(p);
        std::fs::write(p, contents).unwrap();
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::tempdir() else { return };
    let root = t.path().join("root");
    let beside = t.path().join("beside");
    for d in [&root, &beside] {
        std::fs::create_dir(d).unwrap();
    }
    let guarded: Vec<PathBuf> = vec![
        beside.join("secret"),
        beside.join("tool"),
        root.join("dev/vda"),
        PathBuf::from(FIXED_OUTSIDE),
        beside.clone(),
        root.join("dev"),
    ];
    plant(&guarded[0], b"beside", 0o600);
    plant(&guarded[1], b"#!/bin/sh\n", 0o755);
    plant(&guarded[2], b"disk", 0o660);
    plant(&guarded[3], b"outside", 0o600);
    let before: Vec<_> = guarded.iter().map(|p| seen(p)).collect();
    let archive = t.path().join("a.tar");
    std::fs::write(&archive, data).unwrap();
    for known in [None, Some(("00", data.len() as u64))] {
        let _ = unpack::unpack_file(&archive, &root, &mut |_| {}, known);
        for (p, b) in guarded.iter().zip(&before) {
            assert_eq!(&seen(p), b, "{} changed", p.display());
        }
        let mut names: Vec<_> = std::fs::read_dir(&beside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["secret", "tool"], "wrote beside the root");
        let mut names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.tar", "beside", "root"], "wrote next to the root");
        let mut names: Vec<_> = std::fs::read_dir(Path::new(FIXED_OUTSIDE).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["secret"], "wrote beside the fixed outside file");
        assert!(!Path::new("/tmp/kimg-fuzz-escape").exists());
    }
});
